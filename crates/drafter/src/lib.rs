//! The orchestration library users embed: snapshotter, runner, registry, peer, terminator.
//!
//! [`migration`] moves a running VM between processes or hosts: guest memory,
//! the VM's snapshot state and read-only drives travel as devices of a
//! `drafter-storage` migration. [`peer`] runs one VM and hands it from peer
//! to peer (the library behind `drafter-peer`). [`snapshotter`] turns a
//! blueprint into a package (a set of named device files, see [`devices`]
//! and [`package_config`]); [`runner`] resumes a package in place and
//! suspends it back into the same files. Both call the guest agent's hooks
//! through [`agent`].

pub mod agent;
pub mod devices;
pub mod dial;
pub mod duration;
mod files;
pub mod in_use;
pub mod migration;
pub mod package_config;
pub mod peer;
pub mod registry;
pub mod runner;
pub mod snapshotter;
pub mod terminator;
