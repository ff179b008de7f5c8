//! The `--devices` JSON configuration shared with the Go Drafter:
//! `[{"name":"memory","path":"out/package/memory.bin"}, …]`.

use std::path::PathBuf;

use serde::Deserialize;

use crate::error::PackageError;

/// The Go Drafter packager's default `--devices` value.
pub const DEFAULT_DEVICES_JSON: &str = r#"[{"name":"state","path":"out/package/state.bin"},{"name":"memory","path":"out/package/memory.bin"},{"name":"kernel","path":"out/package/vmlinux"},{"name":"disk","path":"out/package/rootfs.ext4"},{"name":"config","path":"out/package/config.json"},{"name":"oci","path":"out/blueprint/oci.ext4"}]"#;

/// One entry of a devices configuration: a device name and its file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    /// The device name in the package.
    pub name: String,
    /// The file to archive from or extract to.
    pub path: PathBuf,
}

/// Parses a devices configuration; unknown fields and malformed JSON are
/// refused with the parser's one-line explanation.
pub fn parse_device_specs(json: &str) -> Result<Vec<(String, PathBuf)>, PackageError> {
    let specs: Vec<DeviceSpec> =
        serde_json::from_str(json).map_err(|e| PackageError::DevicesJson {
            detail: e.to_string(),
        })?;
    Ok(specs.into_iter().map(|s| (s.name, s.path)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_parses_and_bad_json_is_refused() {
        assert_eq!(
            parse_device_specs(DEFAULT_DEVICES_JSON)
                .map(|d| d.len())
                .ok(),
            Some(6)
        );
        let e = parse_device_specs(r#"[{"name":"a","output":"b"}]"#)
            .err()
            .map(|e| e.to_string());
        assert!(e.unwrap_or_default().contains("unknown field `output`"));
        assert!(parse_device_specs("[{").is_err());
    }
}
