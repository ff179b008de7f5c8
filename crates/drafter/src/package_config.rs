//! What a package's `config` device (`config.json`) holds: the reference
//! Drafter's agent vsock port (`agentVSockPort`) plus the VM configuration
//! the snapshot was taken with, so that a runner can check the package
//! before resuming it.
//!
//! ```json
//! {
//!   "formatVersion": 1,
//!   "agentVSockPort": 26,
//!   "livenessVSockPort": 25,
//!   "cpuCount": 1,
//!   "memorySize": 512,
//!   "bootArgs": "console=ttyS0 ...",
//!   "initramfs": true,
//!   "drives": [{"name": "disk", "readOnly": false}, {"name": "oci", "readOnly": false}],
//!   "vsockCid": 3,
//!   "network": {"interface": "tap0", "mac": "02:0e:d9:fd:68:3d"},
//!   "cpuTemplate": "None"
//! }
//! ```

use std::path::Path;

use drafter_vmm::{CpuTemplate, CpuTemplateError};
use serde::{Deserialize, Serialize};

/// The `config.json` format this build writes and reads.
pub const PACKAGE_FORMAT_VERSION: u32 = 1;

/// The CPU template that masks nothing: the host's CPUID as KVM offers it.
/// The others are [`CpuTemplate`]'s names (`X86_64_V2`, `X86_64_V3`).
pub const CPU_TEMPLATE_NONE: &str = "None";

/// A package's `config.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PackageConfig {
    /// Format version ([`PACKAGE_FORMAT_VERSION`]).
    pub format_version: u32,
    /// Guest vsock port the agent connects to (the reference's field).
    #[serde(rename = "agentVSockPort")]
    pub agent_vsock_port: u32,
    /// Guest vsock port of the liveness signal.
    #[serde(rename = "livenessVSockPort")]
    pub liveness_vsock_port: u32,
    /// vCPUs.
    pub cpu_count: u8,
    /// Guest memory in MiB.
    pub memory_size: u64,
    /// Kernel command line the VM booted with.
    pub boot_args: String,
    /// Whether the VM booted with an initramfs.
    pub initramfs: bool,
    /// virtio-blk drives in guest order (the first is `/dev/vda`).
    pub drives: Vec<PackageDrive>,
    /// Guest vsock CID.
    pub vsock_cid: u32,
    /// The network interface, if the VM has one.
    pub network: Option<PackageNetwork>,
    /// CPU template the snapshot was taken with, by [`CpuTemplate`] name
    /// ([`CPU_TEMPLATE_NONE`]: the host's CPUID).
    pub cpu_template: String,
}

/// One drive of a package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PackageDrive {
    /// Device name (also the name in `--devices`).
    pub name: String,
    /// Whether the guest may not write it.
    pub read_only: bool,
}

/// The VM's network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PackageNetwork {
    /// Tap device name inside the network namespace.
    pub interface: String,
    /// Guest MAC address.
    pub mac: String,
}

/// A `config.json` that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PackageConfigError {
    /// The file cannot be read or written.
    #[error("package config {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Not JSON, or not of the expected shape.
    #[error("package config {path} is invalid: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Written by another format version.
    #[error("package config {path} has format version {found}; this drafter reads version {PACKAGE_FORMAT_VERSION}")]
    Version {
        /// The file.
        path: String,
        /// The version found.
        found: u64,
    },
}

impl PackageConfig {
    /// Parses `config.json` text; `path` only names the file in errors.
    pub fn from_json(text: &str, path: &str) -> Result<Self, PackageConfigError> {
        let invalid = |reason: String| PackageConfigError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        match value.get("formatVersion").and_then(|v| v.as_u64()) {
            Some(v) if v == u64::from(PACKAGE_FORMAT_VERSION) => {}
            Some(found) => {
                return Err(PackageConfigError::Version {
                    path: path.to_owned(),
                    found,
                })
            }
            None => {
                return Err(invalid(
                    "no numeric \"formatVersion\" (not written by drafter-snapshotter?)".into(),
                ))
            }
        }
        let config: PackageConfig =
            serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
        config.validate().map_err(invalid)?;
        Ok(config)
    }

    /// Reads and checks a `config.json`.
    pub fn read(path: &Path) -> Result<Self, PackageConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| PackageConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// The CPU template the package records (a config read by
    /// [`PackageConfig::from_json`] always has a valid one).
    pub fn template(&self) -> Result<CpuTemplate, CpuTemplateError> {
        self.cpu_template.parse()
    }

    /// The JSON text written to the `config` device.
    pub fn to_json(&self) -> String {
        // Serialising plain strings, numbers and vectors cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }

    /// Consistency checks beyond the JSON shape.
    fn validate(&self) -> Result<(), String> {
        if self.cpu_count == 0 {
            return Err("cpuCount must be at least 1".into());
        }
        if self.memory_size == 0 {
            return Err("memorySize must be at least 1".into());
        }
        if self.agent_vsock_port == self.liveness_vsock_port {
            return Err(format!(
                "agentVSockPort and livenessVSockPort are both {}",
                self.agent_vsock_port
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for d in &self.drives {
            if !crate::devices::is_drive(&d.name) || d.name.is_empty() {
                return Err(format!("{:?} cannot be a drive name", d.name));
            }
            if !seen.insert(d.name.as_str()) {
                return Err(format!("drive {:?} is listed twice", d.name));
            }
        }
        if let Some(n) = &self.network {
            if drafter_vmm::config::parse_mac(&n.mac).is_none() {
                return Err(format!("network mac {:?} is not aa:bb:cc:dd:ee:ff", n.mac));
            }
        }
        if let Err(e) = self.template() {
            return Err(format!("cpuTemplate: {e}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PackageConfig {
        PackageConfig {
            format_version: PACKAGE_FORMAT_VERSION,
            agent_vsock_port: 26,
            liveness_vsock_port: 25,
            cpu_count: 2,
            memory_size: 512,
            boot_args: "console=ttyS0 quiet".into(),
            initramfs: true,
            drives: vec![
                PackageDrive {
                    name: "disk".into(),
                    read_only: false,
                },
                PackageDrive {
                    name: "oci".into(),
                    read_only: true,
                },
            ],
            vsock_cid: 3,
            network: Some(PackageNetwork {
                interface: "tap0".into(),
                mac: "02:0e:d9:fd:68:3d".into(),
            }),
            cpu_template: CPU_TEMPLATE_NONE.into(),
        }
    }

    #[test]
    fn round_trips_and_uses_the_reference_field_name() {
        let c = sample();
        let json = c.to_json();
        assert!(json.contains("\"agentVSockPort\": 26"), "{json}");
        assert!(json.contains("\"formatVersion\": 1"), "{json}");
        let back = PackageConfig::from_json(&json, "c.json").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, c);
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = dir.path().join("config.json");
        std::fs::write(&p, &json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(PackageConfig::read(&p).unwrap_or_else(|e| panic!("{e}")), c);
    }

    #[test]
    fn a_recorded_cpu_template_round_trips_by_name() {
        for (name, template) in [
            ("X86_64_V3", CpuTemplate::X86_64V3),
            ("x86-64-v2", CpuTemplate::X86_64V2),
            ("None", CpuTemplate::None),
        ] {
            let c = PackageConfig {
                cpu_template: name.into(),
                ..sample()
            };
            let json = c.to_json();
            assert!(
                json.contains(&format!("\"cpuTemplate\": \"{name}\"")),
                "{json}"
            );
            let back = PackageConfig::from_json(&json, "c.json").unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(back.template().ok(), Some(template));
        }
    }

    #[test]
    fn bad_configs_are_refused_in_one_line() {
        let check = |text: &str, want: &str| {
            let e = PackageConfig::from_json(text, "pkg/config.json")
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                e.contains(want) && e.contains("pkg/config.json") && !e.contains('\n'),
                "{text}: {e}"
            );
        };
        let good = serde_json::to_value(sample()).unwrap_or_default();
        let with = |key: &str, v: serde_json::Value| {
            let mut g = good.clone();
            g[key] = v;
            g.to_string()
        };
        check("{\"formatVersion\": 1,", "is invalid");
        check("{\"agentVSockPort\": 26}", "no numeric \"formatVersion\"");
        check(
            &with("formatVersion", 2.into()),
            "has format version 2; this drafter reads version 1",
        );
        check(&with("cpuCount", 0.into()), "cpuCount must be at least 1");
        check(&with("cpuCount", 300.into()), "is invalid");
        check(&with("bogus", 1.into()), "unknown field `bogus`");
        check(
            &with("cpuTemplate", "T2".into()),
            "cpuTemplate: unknown CPU template \"T2\" (valid: None, X86_64_V2, X86_64_V3)",
        );
        check(
            &with("livenessVSockPort", 26.into()),
            "agentVSockPort and livenessVSockPort are both 26",
        );
        check(
            &with(
                "drives",
                serde_json::json!([{"name":"disk","readOnly":false},{"name":"disk","readOnly":true}]),
            ),
            "drive \"disk\" is listed twice",
        );
        check(
            &with(
                "drives",
                serde_json::json!([{"name":"memory","readOnly":false}]),
            ),
            "\"memory\" cannot be a drive name",
        );
        check(
            &with(
                "network",
                serde_json::json!({"interface":"tap0","mac":"nope"}),
            ),
            "network mac \"nope\"",
        );
        let missing = PackageConfig::read(Path::new("/nonexistent/config.json"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(missing.contains("/nonexistent/config.json"), "{missing}");
    }
}
