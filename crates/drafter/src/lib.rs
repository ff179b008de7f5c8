//! The orchestration library users embed: snapshotter, runner, registry, peer, terminator.
//!
//! [`migration`] moves a running VM between processes or hosts: guest memory,
//! the VM's snapshot state and read-only drives travel as devices of a
//! `drafter-storage` migration. [`peer`] runs one VM and hands it from peer
//! to peer (the library behind `drafter-peer`).

pub mod migration;
pub mod peer;
