//! Errors of blueprint building.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while building a blueprint.
#[derive(Debug, thiserror::Error)]
pub enum BlueprintError {
    /// A file system operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// A layer archive is unreadable or inconsistent.
    #[error("corrupt layer {layer}: {reason}")]
    CorruptLayer {
        /// Layer digest or name.
        layer: String,
        /// What is wrong.
        reason: String,
    },
    /// The image (manifest, index, config, archive) is invalid.
    #[error("invalid image: {0}")]
    InvalidImage(String),
    /// A blob's content does not match its digest.
    #[error("blob {digest} is corrupt: content hashes to {actual}")]
    DigestMismatch {
        /// Expected digest.
        digest: String,
        /// Digest of the content read.
        actual: String,
    },
    /// A media type this builder does not handle.
    #[error("unsupported media type {0}")]
    UnsupportedMediaType(String),
    /// Pulling from a registry failed.
    #[error("registry: {0}")]
    Registry(String),
    /// An external tool failed.
    #[error("{tool} failed: {message}")]
    Tool {
        /// The program.
        tool: String,
        /// Its error output or the reason it could not run.
        message: String,
    },
    /// Not enough free space for the output.
    #[error("not enough space in {}: need {need} bytes, {have} available", dir.display())]
    NoSpace {
        /// Directory checked.
        dir: PathBuf,
        /// Bytes needed.
        need: u64,
        /// Bytes available.
        have: u64,
    },
    /// Invalid user input.
    #[error("{0}")]
    Invalid(String),
}

/// Shorthand result type.
pub type Result<T, E = BlueprintError> = std::result::Result<T, E>;

/// Attaches a description and path to an I/O error.
pub trait IoContext<T> {
    /// Wraps the error as [`BlueprintError::Io`].
    fn ctx(self, what: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| BlueprintError::Io {
            what,
            path: path.into(),
            source,
        })
    }
}
