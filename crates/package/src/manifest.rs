//! The manifest: the archive's first entry, listing every device with its
//! size and blake3 hash, and the rules for device names.

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::PackageError;

/// The manifest format version this crate writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;

/// Name of the manifest entry, always the archive's first entry.
pub const MANIFEST_ENTRY: &str = "manifest.json";

/// Prefix of every device entry in the archive (`devices/<name>`).
pub const DEVICE_PREFIX: &str = "devices/";

/// Longest device name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Largest manifest accepted when reading, in bytes.
pub(crate) const MAX_MANIFEST_LEN: u64 = 16 << 20;

/// What a package holds: `{"formatVersion":1,"devices":[…]}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always [`FORMAT_VERSION`] for packages this crate reads or writes.
    pub format_version: u32,
    /// The devices, in archive order.
    pub devices: Vec<DeviceEntry>,
}

/// One device of a package.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// The device name (`memory`, `disk`, …).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// The lowercase hex blake3 hash of its content.
    pub blake3: String,
}

impl Manifest {
    /// The entry of device `name`, if the package has it.
    pub fn device(&self, name: &str) -> Option<&DeviceEntry> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// The device names, comma-separated, for messages.
    pub fn names(&self) -> String {
        let names: Vec<&str> = self.devices.iter().map(|d| d.name.as_str()).collect();
        if names.is_empty() {
            "no devices".to_owned()
        } else {
            names.join(", ")
        }
    }

    /// Sum of the device sizes.
    pub fn total_size(&self) -> u64 {
        self.devices.iter().map(|d| d.size).sum()
    }

    /// Parses and validates the manifest of `package` from its bytes.
    pub(crate) fn parse(bytes: &[u8], package: &Path) -> Result<Self, PackageError> {
        let malformed = |detail: String| PackageError::MalformedManifest {
            path: package.to_path_buf(),
            detail,
        };
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
        match value.get("formatVersion") {
            None => return Err(malformed("no formatVersion field".into())),
            Some(v) if v.as_u64() == Some(u64::from(FORMAT_VERSION)) => {}
            Some(v) => {
                return Err(PackageError::UnsupportedVersion {
                    path: package.to_path_buf(),
                    found: v.to_string(),
                })
            }
        }
        let manifest: Manifest =
            serde_json::from_value(value).map_err(|e| malformed(e.to_string()))?;
        let mut seen = HashSet::new();
        for d in &manifest.devices {
            validate_name(&d.name).map_err(|e| malformed(e.to_string()))?;
            if !seen.insert(d.name.as_str()) {
                return Err(malformed(format!("device {:?} is listed twice", d.name)));
            }
            let hex_ok = d.blake3.len() == 64
                && d.blake3
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !hex_ok {
                return Err(malformed(format!(
                    "device {:?} has blake3 {:?}, not 64 lowercase hex digits",
                    d.name, d.blake3
                )));
            }
        }
        Ok(manifest)
    }
}

/// Checks a device name: non-empty, at most [`MAX_NAME_LEN`] bytes of
/// `[A-Za-z0-9._-]`, not `.`, `..` nor `manifest.json`.
pub fn validate_name(name: &str) -> Result<(), PackageError> {
    let reason = if name.is_empty() {
        Some("it is empty".to_owned())
    } else if name.len() > MAX_NAME_LEN {
        Some(format!("it is longer than {MAX_NAME_LEN} bytes"))
    } else if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(format!(
            "it contains {c:?}; only letters, digits, '.', '_' and '-' are allowed"
        ))
    } else if name == "." || name == ".." {
        Some("it is a path component".to_owned())
    } else if name == MANIFEST_ENTRY {
        Some("it is reserved for the package's manifest".to_owned())
    } else {
        None
    };
    match reason {
        Some(reason) => Err(PackageError::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Checks a list of device names: non-empty, each valid, no duplicates.
pub(crate) fn validate_names<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> Result<(), PackageError> {
    let mut seen = HashSet::new();
    for name in names {
        validate_name(name)?;
        if !seen.insert(name) {
            return Err(PackageError::DuplicateDevice {
                name: name.to_owned(),
            });
        }
    }
    if seen.is_empty() {
        return Err(PackageError::NoDevices);
    }
    Ok(())
}

/// The archive entry path of device `name`.
pub(crate) fn entry_path(name: &str) -> String {
    format!("{DEVICE_PREFIX}{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["memory", "disk-1", "a.b_c", "X9"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "..", ".", "manifest.json", "sp ace", "é"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_name(&"a".repeat(MAX_NAME_LEN + 1)).is_err());
        assert!(matches!(
            validate_names(["a", "b", "a"]),
            Err(PackageError::DuplicateDevice { .. })
        ));
        assert!(matches!(
            validate_names(std::iter::empty::<&str>()),
            Err(PackageError::NoDevices)
        ));
    }

    #[test]
    fn manifest_versions_and_shapes_are_checked() {
        let p = Path::new("p.tar.zst");
        let h = "0".repeat(64);
        let good =
            format!(r#"{{"formatVersion":1,"devices":[{{"name":"a","size":1,"blake3":"{h}"}}]}}"#);
        assert_eq!(
            Manifest::parse(good.as_bytes(), p)
                .map(|m| m.devices.len())
                .ok(),
            Some(1)
        );
        let v2 = r#"{"formatVersion":2,"whatever":true}"#;
        let e = Manifest::parse(v2.as_bytes(), p)
            .err()
            .map(|e| e.to_string());
        assert!(e
            .unwrap_or_default()
            .contains("unsupported formatVersion 2"));
        for bad in [
            "{".to_owned(),
            r#"{"devices":[]}"#.to_owned(),
            r#"{"formatVersion":1}"#.to_owned(),
            format!(
                r#"{{"formatVersion":1,"devices":[{{"name":"a/b","size":1,"blake3":"{h}"}}]}}"#
            ),
            r#"{"formatVersion":1,"devices":[{"name":"a","size":1,"blake3":"xyz"}]}"#.to_owned(),
        ] {
            let e = Manifest::parse(bad.as_bytes(), p)
                .err()
                .map(|e| e.to_string());
            assert!(
                e.as_deref()
                    .unwrap_or_default()
                    .contains("malformed manifest.json"),
                "{bad}: {e:?}"
            );
        }
    }
}
