//! The one error type of this crate: every variant renders as a single line
//! that names the problem, the package or file, and the device if one is
//! involved.

use std::io;
use std::path::PathBuf;

use crate::manifest::FORMAT_VERSION;

/// Why archiving, extracting or reading a package failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PackageError {
    /// A device name the package format does not allow.
    #[error("invalid device name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The same device name was given twice.
    #[error("device {name:?} is given twice")]
    DuplicateDevice {
        /// The repeated name.
        name: String,
    },
    /// Two devices to extract would be written to the same file.
    #[error("devices {first:?} and {second:?} would both be written to {}", .path.display())]
    DuplicateOutput {
        /// The first device naming the path.
        first: String,
        /// The second device naming the path.
        second: String,
        /// The shared output path.
        path: PathBuf,
    },
    /// An empty list of devices.
    #[error("no devices given")]
    NoDevices,
    /// A devices configuration (JSON) that could not be parsed.
    #[error("invalid devices configuration: {detail}")]
    DevicesJson {
        /// The parser's explanation, with line and column.
        detail: String,
    },
    /// An input device file could not be opened or read.
    #[error("cannot read device {name:?} from {}: {source}", .path.display())]
    Input {
        /// The device.
        name: String,
        /// Its file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// An input device file changed between hashing and archiving.
    #[error("device {name:?} ({}) changed while it was being archived: {detail}", .path.display())]
    InputChanged {
        /// The device.
        name: String,
        /// Its file.
        path: PathBuf,
        /// What changed.
        detail: String,
    },
    /// The package file could not be written.
    #[error("cannot write package {}: {source}", .path.display())]
    WritePackage {
        /// The package being written.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The package file could not be opened.
    #[error("cannot open package {}: {source}", .path.display())]
    OpenPackage {
        /// The package.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The package ends early.
    #[error("package {} is truncated{}", .path.display(), in_device(.device))]
    Truncated {
        /// The package.
        path: PathBuf,
        /// The device being read when it ended, if any.
        device: Option<String>,
    },
    /// The package's compressed or tar stream is damaged.
    #[error("package {} is corrupt{}: {detail}", .path.display(), in_device(.device))]
    Corrupt {
        /// The package.
        path: PathBuf,
        /// The device being read, if any.
        device: Option<String>,
        /// What the decoder found.
        detail: String,
    },
    /// A device's content does not match its manifest hash.
    #[error(
        "package {} is corrupt: device {name:?} has blake3 {actual}, the manifest says {expected}",
        .path.display()
    )]
    HashMismatch {
        /// The package.
        path: PathBuf,
        /// The device.
        name: String,
        /// Hash recorded in the manifest.
        expected: String,
        /// Hash of the extracted bytes.
        actual: String,
    },
    /// A device's entry does not have the size its manifest records.
    #[error(
        "package {} is corrupt: device {name:?} holds {actual} bytes, the manifest says {expected}",
        .path.display()
    )]
    SizeMismatch {
        /// The package.
        path: PathBuf,
        /// The device.
        name: String,
        /// Size recorded in the manifest.
        expected: u64,
        /// Size of the entry.
        actual: u64,
    },
    /// The archive has no `manifest.json` at all.
    #[error("package {} has no manifest.json ({detail}); not a drafter package?", .path.display())]
    MissingManifest {
        /// The package.
        path: PathBuf,
        /// What was found instead.
        detail: String,
    },
    /// `manifest.json` is present but not the first entry.
    #[error(
        "package {}: manifest.json is not the first entry (the first is {first:?})",
        .path.display()
    )]
    ManifestNotFirst {
        /// The package.
        path: PathBuf,
        /// The name of the first entry.
        first: String,
    },
    /// `manifest.json` is not valid JSON or misses required fields.
    #[error("package {}: malformed manifest.json: {detail}", .path.display())]
    MalformedManifest {
        /// The package.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The manifest's `formatVersion` is not the one this crate reads.
    #[error(
        "package {} has unsupported formatVersion {found} (this drafter reads formatVersion {FORMAT_VERSION})",
        .path.display()
    )]
    UnsupportedVersion {
        /// The package.
        path: PathBuf,
        /// The version found, as written in the manifest.
        found: String,
    },
    /// A requested device is not in the package.
    #[error("package {} has no device {name:?} (it has: {available})", .path.display())]
    MissingDevice {
        /// The package.
        path: PathBuf,
        /// The requested device.
        name: String,
        /// The devices the package does have, comma-separated.
        available: String,
    },
    /// An output file exists and `force` was not given.
    #[error(
        "{} (device {name:?}) already exists; not overwriting it without force (--force)",
        .path.display()
    )]
    OutputExists {
        /// The device.
        name: String,
        /// The existing file.
        path: PathBuf,
    },
    /// An output file could not be written.
    #[error("cannot write device {name:?} to {}: {source}", .path.display())]
    WriteOutput {
        /// The device.
        name: String,
        /// The output file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

fn in_device(device: &Option<String>) -> String {
    match device {
        Some(d) => format!(" (in device {d:?})"),
        None => String::new(),
    }
}

impl PackageError {
    /// Classifies an error met while reading a package's stream: an early end
    /// is truncation, anything else corruption.
    pub(crate) fn reading(path: &std::path::Path, device: Option<&str>, e: io::Error) -> Self {
        let msg = e.to_string();
        let eof = e.kind() == io::ErrorKind::UnexpectedEof
            || msg.contains("failed to read entire block")
            || msg.contains("unexpected EOF");
        if eof {
            PackageError::Truncated {
                path: path.to_path_buf(),
                device: device.map(str::to_owned),
            }
        } else {
            PackageError::Corrupt {
                path: path.to_path_buf(),
                device: device.map(str::to_owned),
                detail: msg,
            }
        }
    }
}
