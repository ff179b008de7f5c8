//! Snapshot state: the [`Persist`] trait and the state file format.
//!
//! A state file is `magic (8) | format version (u32 LE) | payload length (u64 LE)
//! | blake3 of payload (32) | payload`, the payload being bincode. Corruption,
//! truncation and other format versions are refused with a clear error.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Something whose state can be saved into and rebuilt from a snapshot.
pub trait Persist: Sized {
    /// The serialisable state.
    type State: Serialize + DeserializeOwned;
    /// What restoring needs besides the state.
    type Args;
    /// Failure to save or restore.
    type Error;
    /// Captures the current state (the VM must be paused).
    fn save(&self) -> Result<Self::State, Self::Error>;
    /// Rebuilds from `args` and a saved `state`.
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, Self::Error>;
}

/// First bytes of every state file.
pub const MAGIC: [u8; 8] = *b"DRAFTVM\0";
/// Version of the payload layout this build reads and writes (2: the VM
/// configuration records its CPU template).
pub const FORMAT_VERSION: u32 = 2;
const HEADER_LEN: usize = 8 + 4 + 8 + 32;

/// A state file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// I/O error on the file.
    #[error("state file {path}: {err}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        err: std::io::Error,
    },
    /// The file does not start with the state-file magic.
    #[error("{0} is not a drafter VM state file (bad magic)")]
    BadMagic(PathBuf),
    /// Written by an incompatible version.
    #[error("state file {path} has format version {found}, this build reads version {expected}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Version this build supports.
        expected: u32,
    },
    /// Shorter than its header says.
    #[error("state file {path} is truncated ({actual} of {expected} bytes)")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes present.
        actual: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// Payload does not match its checksum.
    #[error("state file {0} is corrupted (checksum mismatch)")]
    Checksum(PathBuf),
    /// The payload could not be encoded or decoded.
    #[error("state file {path}: cannot decode state: {reason}")]
    Codec {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Serialises `state` into a state file at `path`, atomically (temp file + rename).
pub fn write_state_file<T: Serialize>(path: &Path, state: &T) -> Result<(), StateFileError> {
    let io = |err| StateFileError::Io {
        path: path.to_path_buf(),
        err,
    };
    let payload = bincode::serialize(state).map_err(|e| StateFileError::Codec {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(&payload).as_bytes());
    out.extend_from_slice(&payload);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&out).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads and verifies a state file written by [`write_state_file`].
pub fn read_state_file<T: DeserializeOwned>(path: &Path) -> Result<T, StateFileError> {
    let bytes = std::fs::read(path).map_err(|err| StateFileError::Io {
        path: path.to_path_buf(),
        err,
    })?;
    decode(path, &bytes)
}

/// Verifies and decodes the bytes of a state file (what [`read_state_file`]
/// does after reading it); `path` only names the file in errors.
pub fn decode<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, StateFileError> {
    let p = || path.to_path_buf();
    if bytes.len() < 8 || bytes[..8] != MAGIC {
        return Err(StateFileError::BadMagic(p()));
    }
    if bytes.len() < HEADER_LEN {
        return Err(StateFileError::Truncated {
            path: p(),
            actual: bytes.len() as u64,
            expected: HEADER_LEN as u64,
        });
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(&bytes[8..12]);
    let found = u32::from_le_bytes(v);
    if found != FORMAT_VERSION {
        return Err(StateFileError::Version {
            path: p(),
            found,
            expected: FORMAT_VERSION,
        });
    }
    let mut l = [0u8; 8];
    l.copy_from_slice(&bytes[12..20]);
    let len = u64::from_le_bytes(l);
    let expected = (HEADER_LEN as u64).saturating_add(len);
    if (bytes.len() as u64) < expected {
        return Err(StateFileError::Truncated {
            path: p(),
            actual: bytes.len() as u64,
            expected,
        });
    }
    let payload = &bytes[HEADER_LEN..expected as usize];
    if blake3::hash(payload).as_bytes() != &bytes[20..52] {
        return Err(StateFileError::Checksum(p()));
    }
    bincode::deserialize(payload).map_err(|e| StateFileError::Codec {
        path: p(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, PartialEq, Debug)]
    struct S {
        a: u64,
        b: Vec<u8>,
    }

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vmm-persist-{}-{name}", std::process::id()))
    }

    #[test]
    fn round_trip_and_every_kind_of_damage_is_named() {
        let path = tmp("state");
        let s = S {
            a: 7,
            b: vec![1; 300],
        };
        write_state_file(&path, &s).unwrap_or_else(|e| panic!("{e}"));
        let back: S = read_state_file(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, s);
        let good = std::fs::read(&path).unwrap_or_default();

        let mut flipped = good.clone();
        flipped[HEADER_LEN + 10] ^= 0x01;
        let e = decode::<S>(&path, &flipped).err();
        assert!(matches!(e, Some(StateFileError::Checksum(_))), "{e:?}");

        let e = decode::<S>(&path, &good[..good.len() - 5]).err();
        assert!(matches!(e, Some(StateFileError::Truncated { .. })), "{e:?}");

        let mut other = good.clone();
        other[8] = 9;
        let e = decode::<S>(&path, &other).err();
        assert!(
            matches!(e, Some(StateFileError::Version { found: 9, .. })),
            "{e:?}"
        );

        let e = decode::<S>(&path, b"\x7fELF not a state file").err();
        assert!(matches!(e, Some(StateFileError::BadMagic(_))), "{e:?}");
        let _ = std::fs::remove_file(&path);
    }
}
