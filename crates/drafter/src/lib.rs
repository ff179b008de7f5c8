//! The orchestration library users embed: snapshotter, runner, registry, peer, terminator.
//!
//! [`migration`] moves a running VM between processes or hosts: guest memory,
//! the VM's snapshot state and read-only drives travel as devices of a
//! `drafter-storage` migration.

pub mod migration;
