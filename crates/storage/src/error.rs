//! Errors of block devices.

use std::io;

/// An error from a block device operation.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An access reached past the end of the device.
    #[error("{len} bytes at offset {offset} are outside the device ({size} bytes)")]
    OutOfRange {
        /// Start of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Size of the device.
        size: u64,
    },
    /// The device was opened read-only.
    #[error("device is read-only")]
    ReadOnly,
    /// An I/O error from the backing store.
    #[error("I/O error on {what}: {source}")]
    Io {
        /// What was being accessed.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A block size that is not a power of two between 512 B and 4 MiB.
    #[error("invalid block size {0}: must be a power of two between 512 B and 4 MiB")]
    InvalidBlockSize(u32),
    /// A persistent state file does not describe this device.
    #[error("corrupt state file {path}: {reason}")]
    CorruptState {
        /// Path of the state file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Sizes of parts that must agree do not.
    #[error("size mismatch: {0}")]
    SizeMismatch(String),
    /// A block of a lazy device could not be fetched.
    #[error("block {block} is not available: {reason}")]
    Unavailable {
        /// Index of the block.
        block: u64,
        /// Why it could not be fetched.
        reason: String,
    },
    /// A lazy device was written before the migration handed it authority.
    #[error("device is not writable before authority is transferred")]
    NotAuthoritative,
}

impl StorageError {
    /// Wraps an I/O error with a description of what was being accessed.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        StorageError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Result alias for device operations.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
