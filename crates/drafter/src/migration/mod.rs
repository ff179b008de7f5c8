//! Live migration of a running VM between processes or hosts.
//!
//! A VM moves as devices of a `drafter-storage` migration:
//!
//! * `memory`: the MAP_SHARED memory file backing guest RAM, whose dirty
//!   pages come from the VMM's dirty log ([`VmMemoryDirtySource`]);
//! * `state`: the VM's snapshot state in a small fixed-size device
//!   ([`StateFrame`]), written in the suspend hook after the VM is paused,
//!   so the final dirty cycle carries it;
//! * `drive/<name>`: each drive, read from its file. A read-only drive is
//!   sent once; a writable one is a tracked device whose dirty blocks are
//!   the ones the guest wrote through the VMM's virtio-blk device
//!   ([`VmDriveDirtySource`]), so it is re-sent like memory in the dirty
//!   cycles and the final one (after the pause, when no block request is in
//!   flight, and after the file is flushed).
//!
//! * `file/<name>`: a file that travels with the VM without being part of
//!   it (a package's `config`, `kernel`, `initramfs`): sent once, kept by
//!   the destination in its work directory (`file-<name>`) and passed on by
//!   its next migration, so the last hop (`drafter-terminator`) can write
//!   the whole package again. A registry ([`crate::registry`]) sends them;
//!   a VM booted or restored by a peer has none.
//!
//! The destination receives each drive into its work directory
//! (`drive-<name>`) and the restored VM opens it as the source did (a
//! writable drive read-write). Drives are never fetched lazily: the VMM
//! reads and writes the drive file directly, so even a VM that resumes at
//! authority ([`Resume::AtAuthority`]) waits until every drive block is
//! here (fetched with priority), while its memory stays post-copy.
//!
//! [`VmMigrationSource`] runs on the host that has the VM. It pauses the VM
//! for the handover and keeps it paused until the destination acknowledges
//! that it runs it; if the handover does not complete, it resumes the VM
//! itself (or, in the one window where it cannot know, keeps it paused and
//! saved: [`VmMigrationError::AuthorityUnknown`]). [`VmMigrationDestination`]
//! receives the VM, restores it paused once it has what it needs (every
//! block, [`Resume::AfterComplete`]; or the state, with missing memory pages
//! fetched on demand through userfaultfd, [`Resume::AtAuthority`]), asks
//! for authority and resumes it only once the source committed. The
//! protocol and its fault cases are described in
//! [`drafter_storage::migrator`].

mod destination;
mod dirty_source;
mod error;
mod guest_memory;
mod page_provider;
mod phase;
mod report;
mod source;
mod state;

pub use destination::{
    DestinationOptions, IncomingVm, Resume, VmMigrationDestination, MAX_FETCH_WORKERS,
};
pub use dirty_source::{page_indices, VmDriveDirtySource, VmMemoryDirtySource};
pub use error::VmMigrationError;
pub use guest_memory::{GuestMemoryDevice, Harvesting, Harvests};
pub use page_provider::LazyPageProvider;
pub use phase::{engine_observer, VmObserver, VmPhase};
pub use report::VmMigrationReport;
pub use source::{SourceOptions, VmMigrationSource, MEMORY_BLOCK_SIZE};
pub use state::{StateFrame, StateFrameError, DEFAULT_STATE_CAPACITY};

/// Name of the guest memory device.
pub const MEMORY_DEVICE: &str = "memory";
/// Name of the VM state device.
pub const STATE_DEVICE: &str = "state";
/// Prefix of drive device names (`drive/<name>`).
pub const DRIVE_PREFIX: &str = "drive/";
/// Prefix of the names of files that travel with the VM (`file/<name>`).
pub const FILE_PREFIX: &str = "file/";

/// True if `name` can be stored as (part of) a file name on the destination.
fn usable_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The device name for the drive called `name`, refusing names that could
/// not be stored as a file name on the destination.
pub fn drive_device_name(name: &str) -> Result<String, VmMigrationError> {
    if usable_name(name) {
        Ok(format!("{DRIVE_PREFIX}{name}"))
    } else {
        Err(VmMigrationError::BadDriveName(name.to_string()))
    }
}

/// The device name for the travelling file called `name` (a package device
/// such as `config` or `kernel`), refusing names that could not be stored as
/// a file name on the destination.
pub fn file_device_name(name: &str) -> Result<String, VmMigrationError> {
    if usable_name(name) {
        Ok(format!("{FILE_PREFIX}{name}"))
    } else {
        Err(VmMigrationError::BadFileName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drive_names_are_checked() {
        assert_eq!(drive_device_name("oci").ok().as_deref(), Some("drive/oci"));
        assert_eq!(
            drive_device_name("rootfs.ext4").ok().as_deref(),
            Some("drive/rootfs.ext4")
        );
        for bad in ["", "..", "a/b", "../x", "sp ace"] {
            assert!(
                matches!(
                    drive_device_name(bad),
                    Err(VmMigrationError::BadDriveName(_))
                ),
                "{bad:?}"
            );
        }
    }
}
