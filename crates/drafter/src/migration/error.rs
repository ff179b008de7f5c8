//! Errors of VM migration.

use std::path::PathBuf;

use drafter_storage::migrator::Authority;

use super::state::StateFrameError;

fn unresolved_note(saved: Option<&(PathBuf, PathBuf)>) -> String {
    match saved {
        Some((state, memory)) => format!(
            " and saved as {} with {}: restore it from those only if the destination does not run it",
            state.display(),
            memory.display()
        ),
        None => " until the destination is known not to run it".into(),
    }
}

/// Why migrating a VM out or in failed.
#[derive(Debug, thiserror::Error)]
pub enum VmMigrationError {
    /// A drive name cannot be used as a device name.
    #[error("drive name {0:?} is not usable for migration (use letters, digits, '-', '_' or '.')")]
    BadDriveName(String),
    /// A travelling file's name cannot be used as a device name.
    #[error("package file name {0:?} is not usable for migration (use letters, digits, '-', '_' or '.')")]
    BadFileName(String),
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
    /// The handover failed after Commit was sent and before the destination
    /// acknowledged it: the destination runs the VM if Commit reached it.
    /// The VM is kept paused on the source (and saved, if `saved` is set)
    /// until an operator has checked the destination.
    #[error("{source}; the VM is kept paused here{}", unresolved_note(.saved.as_deref()))]
    AuthorityUnknown {
        /// The migration's failure (its authority is unknown).
        source: drafter_storage::MigrationError,
        /// The saved snapshot of the paused VM (state file, memory file).
        saved: Option<Box<(PathBuf, PathBuf)>>,
    },
    /// The VMM refused an operation.
    #[error("VM: {0}")]
    Vmm(#[from] drafter_vmm::Error),
    /// The received VM state is unusable.
    #[error(transparent)]
    State(#[from] StateFrameError),
    /// The source did not send a device the VM needs.
    #[error("the source sent no {0:?} device")]
    MissingDevice(String),
    /// The VM arrived but could not be restored or resumed here. The
    /// destination declined the handover (it never ran the VM), so the
    /// source keeps running it, and the files this receive made are removed.
    #[error(
        "restoring the received VM failed: {0}; the handover was declined: the source keeps the VM"
    )]
    Restore(Box<VmMigrationError>),
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
        self.authority() == Authority::Source
    }

    /// Who holds authority after this failure (the source for any failure
    /// that is not the migration's).
    pub fn authority(&self) -> Authority {
        match self {
            VmMigrationError::Migration(e) => e.authority,
            VmMigrationError::AuthorityUnknown { .. } => Authority::Unknown,
            _ => Authority::Source,
        }
    }
}
