//! Errors of VM migration.

use std::path::PathBuf;

use super::state::StateFrameError;

/// Why migrating a VM out or in failed.
#[derive(Debug, thiserror::Error)]
pub enum VmMigrationError {
    /// A writable drive cannot be migrated yet: the guest's writes to it go
    /// straight to the file and bypass the migration engine's dirty tracking.
    #[error(
        "drive {0:?} is writable: live migration supports read-only drives only for now \
         (guest writes to a drive bypass the migration engine)"
    )]
    WritableDrive(String),
    /// A drive name cannot be used as a device name.
    #[error("drive name {0:?} is not usable for migration (use letters, digits, '-', '_' or '.')")]
    BadDriveName(String),
    /// The memory file does not match the VM's memory.
    #[error("memory file {path} holds {actual} bytes, the VM has {expected} bytes of RAM")]
    MemoryFileSize {
        /// The memory file.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// The VM's RAM size.
        expected: u64,
    },
    /// The VMM's guest memory does not add up to the configured RAM.
    #[error("guest memory holds {actual} bytes, the VM's configuration says {expected}")]
    GuestMemorySize {
        /// Bytes mapped.
        actual: u64,
        /// Bytes configured.
        expected: u64,
    },
    /// A local device could not be opened or used.
    #[error(transparent)]
    Storage(#[from] drafter_storage::StorageError),
    /// The migration itself failed (see [`drafter_storage::MigrationError`]
    /// for who holds authority).
    #[error(transparent)]
    Migration(#[from] drafter_storage::MigrationError),
    /// The VMM refused an operation.
    #[error("VM: {0}")]
    Vmm(#[from] drafter_vmm::Error),
    /// The received VM state is unusable.
    #[error(transparent)]
    State(#[from] StateFrameError),
    /// The source did not send a device the VM needs.
    #[error("the source sent no {0:?} device")]
    MissingDevice(String),
    /// The VM arrived completely but could not be restored here; its state
    /// and memory files are kept so it can be restored by hand (authority
    /// has moved: the source no longer runs it).
    #[error("restoring the received VM failed: {source}; its state.bin and memory.bin are kept in {}", dir.display())]
    Restore {
        /// Where the received files are.
        dir: PathBuf,
        /// What went wrong.
        source: Box<VmMigrationError>,
    },
    /// A local file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl VmMigrationError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        VmMigrationError::Io {
            what: what.into(),
            source,
        }
    }

    /// True if the VM still runs (or may be resumed) where it was: the
    /// migration failed before authority moved.
    pub fn source_keeps_authority(&self) -> bool {
        match self {
            VmMigrationError::Migration(e) => e.source_keeps_authority,
            _ => true,
        }
    }
}
