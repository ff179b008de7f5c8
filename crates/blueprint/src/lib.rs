//! VM blueprints: the guest OS (`vmlinux`, `initramfs`, `rootfs.ext4`) and
//! OCI images converted to ext4 disks holding a runtime bundle (`oci.ext4`).
//!
//! Everything is built without loop mounts: trees are staged in a directory,
//! turned into ext4 with `mkfs.ext4 -d`, and ownership, modes, xattrs and
//! device nodes the builder could not stage are fixed with `debugfs -w`.

pub mod bundle;
pub mod cli;
pub mod error;
pub mod ext4;
pub mod image;
pub mod layer;
pub mod oci;
pub mod os;
pub mod progress;
pub mod registry;
pub mod testing;
pub mod tree;

pub use error::{BlueprintError, Result};
