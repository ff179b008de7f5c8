//! The reference Drafter's `--devices` JSON for `drafter-snapshotter`
//! (`[{"name","input","output"}]`), `drafter-runner` (`[{"name","path"}]`),
//! `drafter-registry` (`[{"name","input","blockSize"}]`) and
//! `drafter-terminator` (`[{"name","output"}]`).
//!
//! A package is a set of named devices. Four names are special: `state` (the
//! VM's snapshot state), `memory` (guest RAM), `config` (the package's
//! `config.json`, see [`crate::package_config`]) and `kernel`, plus the
//! optional `initramfs`. Every other name (`disk`, `oci`, ...) is a virtio-blk
//! drive; drives appear in the guest in the order given to the snapshotter
//! (the first is `/dev/vda`).

use std::collections::HashSet;
use std::path::PathBuf;

use serde::Deserialize;

/// Name of the device holding the VM's snapshot state.
pub const STATE: &str = "state";
/// Name of the device holding guest memory.
pub const MEMORY: &str = "memory";
/// Name of the device holding the package's `config.json`.
pub const CONFIG: &str = "config";
/// Name of the device holding the kernel image.
pub const KERNEL: &str = "kernel";
/// Name of the device holding the optional initramfs.
pub const INITRAMFS: &str = "initramfs";
/// Name of the root disk in the reference's layout.
pub const DISK: &str = "disk";

/// Devices the snapshotter writes itself: they take an `output` but no `input`.
pub const GENERATED: [&str; 3] = [STATE, MEMORY, CONFIG];

/// A `--devices` value that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DevicesError {
    /// Not JSON of the expected shape.
    #[error("invalid --devices JSON: {0}")]
    Json(String),
    /// A device without a name.
    #[error("invalid --devices: device #{0} has an empty name")]
    EmptyName(usize),
    /// A name that is not usable as a device name.
    #[error(
        "invalid --devices: device name {0:?} may only hold letters, digits, '-', '_' and '.'"
    )]
    BadName(String),
    /// The same name twice.
    #[error("invalid --devices: device {0:?} is given more than once")]
    Duplicate(String),
    /// Required devices are absent.
    #[error("invalid --devices: missing required device(s) {}", .0.join(", "))]
    Missing(Vec<String>),
    /// A device lacks a field it needs, or has one it must not have.
    #[error("invalid --devices: device {name:?} {problem}")]
    Field {
        /// The device.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// Names the command does not know.
    #[error("invalid --devices: unknown device(s) {} ({hint})", .names.join(", "))]
    Unknown {
        /// The unknown names.
        names: Vec<String>,
        /// What would be known.
        hint: String,
    },
    /// Two devices share a path.
    #[error("invalid --devices: devices {0:?} and {1:?} use the same file {2}")]
    SamePath(String, String, PathBuf),
}

/// One entry of the snapshotter's `--devices`, as given.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSnapshotDevice {
    name: String,
    #[serde(default)]
    input: String,
    #[serde(default)]
    output: String,
}

/// One device of the snapshotter: where it comes from and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotDevice {
    /// Device name.
    pub name: String,
    /// File copied into the package (`None` for `state`, `memory`, `config`).
    pub input: Option<PathBuf>,
    /// Where the package's copy is written.
    pub output: PathBuf,
}

/// The snapshotter's devices, checked: names unique and valid, `state`,
/// `memory`, `config`, `kernel` and `disk` present, inputs exactly where
/// needed, every output distinct and no output equal to an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotDevices {
    /// In the order given.
    pub devices: Vec<SnapshotDevice>,
}

fn check_name(index: usize, name: &str, seen: &mut HashSet<String>) -> Result<(), DevicesError> {
    if name.is_empty() {
        return Err(DevicesError::EmptyName(index));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(DevicesError::BadName(name.to_owned()));
    }
    if !seen.insert(name.to_owned()) {
        return Err(DevicesError::Duplicate(name.to_owned()));
    }
    Ok(())
}

fn require(present: &HashSet<String>, names: &[&str]) -> Result<(), DevicesError> {
    let missing: Vec<String> = names
        .iter()
        .filter(|n| !present.contains(**n))
        .map(|n| (*n).to_owned())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DevicesError::Missing(missing))
    }
}

fn json_error(e: serde_json::Error) -> DevicesError {
    DevicesError::Json(e.to_string())
}

impl SnapshotDevices {
    /// Parses and checks the snapshotter's `--devices` JSON.
    pub fn parse(json: &str) -> Result<Self, DevicesError> {
        let raw: Vec<RawSnapshotDevice> = serde_json::from_str(json).map_err(json_error)?;
        let mut seen = HashSet::new();
        let mut devices = Vec::with_capacity(raw.len());
        for (i, d) in raw.into_iter().enumerate() {
            check_name(i, &d.name, &mut seen)?;
            let field = |problem: &str| DevicesError::Field {
                name: d.name.clone(),
                problem: problem.to_owned(),
            };
            if d.output.is_empty() {
                return Err(field("has no \"output\""));
            }
            let generated = GENERATED.contains(&d.name.as_str());
            if generated && !d.input.is_empty() {
                return Err(field(
                    "is written by the snapshotter and takes no \"input\"",
                ));
            }
            if !generated && d.input.is_empty() {
                return Err(field(
                    "has no \"input\" (only state, memory and config are written by the snapshotter)",
                ));
            }
            devices.push(SnapshotDevice {
                input: (!d.input.is_empty()).then(|| PathBuf::from(&d.input)),
                output: PathBuf::from(&d.output),
                name: d.name,
            });
        }
        require(&seen, &[STATE, MEMORY, KERNEL, DISK, CONFIG])?;
        for (i, a) in devices.iter().enumerate() {
            for b in &devices[i + 1..] {
                if a.output == b.output {
                    return Err(DevicesError::SamePath(
                        a.name.clone(),
                        b.name.clone(),
                        a.output.clone(),
                    ));
                }
            }
            for b in &devices {
                if b.input.as_ref() == Some(&a.output) {
                    return Err(DevicesError::SamePath(
                        a.name.clone(),
                        b.name.clone(),
                        a.output.clone(),
                    ));
                }
            }
        }
        Ok(Self { devices })
    }

    /// The device called `name`.
    pub fn get(&self, name: &str) -> Option<&SnapshotDevice> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// The output of a device that [`Self::parse`] made sure exists.
    pub fn output(&self, name: &str) -> PathBuf {
        self.get(name).map(|d| d.output.clone()).unwrap_or_default()
    }

    /// The drives, in guest order: every device but `state`, `memory`,
    /// `config`, `kernel` and `initramfs`.
    pub fn drives(&self) -> impl Iterator<Item = &SnapshotDevice> {
        self.devices.iter().filter(|d| is_drive(&d.name))
    }
}

/// Whether a device called `name` is a virtio-blk drive.
pub fn is_drive(name: &str) -> bool {
    !GENERATED.contains(&name) && name != KERNEL && name != INITRAMFS
}

/// One entry of the runner's `--devices`, as given.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPackageDevice {
    name: String,
    #[serde(default)]
    path: String,
}

/// One device of a package on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageDevice {
    /// Device name.
    pub name: String,
    /// Its file.
    pub path: PathBuf,
}

/// The devices of a package on disk (the runner's `--devices`): names unique
/// and valid, `state`, `memory` and `config` present, paths distinct. Which
/// drives must be present is known only from the package's config: see
/// [`PackageDevices::check_drives`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageDevices {
    /// In the order given.
    pub devices: Vec<PackageDevice>,
}

impl PackageDevices {
    /// Parses and checks the runner's `--devices` JSON.
    pub fn parse(json: &str) -> Result<Self, DevicesError> {
        let raw: Vec<RawPackageDevice> = serde_json::from_str(json).map_err(json_error)?;
        let mut seen = HashSet::new();
        let mut devices = Vec::with_capacity(raw.len());
        for (i, d) in raw.into_iter().enumerate() {
            check_name(i, &d.name, &mut seen)?;
            if d.path.is_empty() {
                return Err(DevicesError::Field {
                    name: d.name,
                    problem: "has no \"path\"".into(),
                });
            }
            devices.push(PackageDevice {
                path: PathBuf::from(&d.path),
                name: d.name,
            });
        }
        require(&seen, &[STATE, MEMORY, CONFIG])?;
        for (i, a) in devices.iter().enumerate() {
            if let Some(b) = devices[i + 1..].iter().find(|b| b.path == a.path) {
                return Err(DevicesError::SamePath(
                    a.name.clone(),
                    b.name.clone(),
                    a.path.clone(),
                ));
            }
        }
        Ok(Self { devices })
    }

    /// The device called `name`.
    pub fn get(&self, name: &str) -> Option<&PackageDevice> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// The path of a device that [`Self::parse`] made sure exists.
    pub fn path(&self, name: &str) -> PathBuf {
        self.get(name).map(|d| d.path.clone()).unwrap_or_default()
    }

    /// Checks the drives against the package's drive names: each must be
    /// given, and no other drive may be.
    pub fn check_drives<'a>(
        &self,
        drives: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), DevicesError> {
        let expected: Vec<&str> = drives.into_iter().collect();
        let missing: Vec<String> = expected
            .iter()
            .filter(|n| self.get(n).is_none())
            .map(|n| (*n).to_owned())
            .collect();
        if !missing.is_empty() {
            return Err(DevicesError::Missing(missing));
        }
        let unknown: Vec<String> = self
            .devices
            .iter()
            .filter(|d| is_drive(&d.name) && !expected.contains(&d.name.as_str()))
            .map(|d| d.name.clone())
            .collect();
        if !unknown.is_empty() {
            return Err(DevicesError::Unknown {
                names: unknown,
                hint: format!(
                    "the package's drives are {}",
                    if expected.is_empty() {
                        "none".to_owned()
                    } else {
                        expected.join(", ")
                    }
                ),
            });
        }
        Ok(())
    }
}

/// The package a peer starts from when its `--devices` (the reference's
/// peer format) gives `base` files and no `--raddr`: the package's devices
/// at their `base` paths, and where the VM's copies of its memory and
/// drives go (`overlay`). The package itself is never written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPackage {
    /// The package's devices, read only (at their `base` paths).
    pub devices: PackageDevices,
    /// Device name → the file the VM runs on instead of its base (memory
    /// and drives only; it must not exist yet).
    pub overlays: Vec<(String, PathBuf)>,
}

impl PeerPackage {
    /// Reads the package part of a peer's `--devices` JSON: `None` when no
    /// entry has a `base` (the VM comes from elsewhere). Each entry's `base`
    /// and `overlay` are used; its migration settings (`blockSize`,
    /// `expiry`, ...) are read elsewhere, and `state` (the reference's
    /// overlay bitmap) is not needed: an overlay here is a whole copy.
    pub fn parse(json: &str) -> Result<Option<Self>, DevicesError> {
        let entries: Vec<serde_json::Value> = serde_json::from_str(json).map_err(json_error)?;
        let text = |e: &serde_json::Value, key: &str| -> Result<Option<String>, DevicesError> {
            match e.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) if s.is_empty() => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(DevicesError::Field {
                    name: e
                        .get("name")
                        .and_then(|n| n.as_str())
                        .unwrap_or_default()
                        .to_owned(),
                    problem: format!("has a {key:?} that is not a string"),
                }),
            }
        };
        let mut raw = Vec::new();
        let mut overlays = Vec::new();
        for e in &entries {
            let name = text(e, "name")?.unwrap_or_default();
            let (base, overlay) = (text(e, "base")?, text(e, "overlay")?);
            if let Some(base) = base {
                raw.push(serde_json::json!({ "name": name, "path": base }));
                if let Some(o) = overlay.filter(|_| name == MEMORY || is_drive(&name)) {
                    overlays.push((name, PathBuf::from(o)));
                }
            }
        }
        if raw.is_empty() {
            return Ok(None);
        }
        if raw.len() != entries.len() {
            return Err(DevicesError::Field {
                name: entries
                    .iter()
                    .find(|e| text(e, "base").ok().flatten().is_none())
                    .and_then(|e| e.get("name").and_then(|n| n.as_str()))
                    .unwrap_or_default()
                    .to_owned(),
                problem: "has no \"base\" while other devices have one".into(),
            });
        }
        let devices = PackageDevices::parse(&serde_json::Value::Array(raw).to_string())?;
        check_paths(
            devices
                .devices
                .iter()
                .map(|d| (d.name.as_str(), &d.path))
                .chain(overlays.iter().map(|(n, p)| (n.as_str(), p))),
        )?;
        Ok(Some(PeerPackage { devices, overlays }))
    }

    /// Where the VM's copy of device `name` goes, if `--devices` said.
    pub fn overlay(&self, name: &str) -> Option<&PathBuf> {
        self.overlays
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
    }
}

fn check_paths<'a>(
    devices: impl Iterator<Item = (&'a str, &'a PathBuf)> + Clone,
) -> Result<(), DevicesError> {
    for (i, (a, pa)) in devices.clone().enumerate() {
        if let Some((b, _)) = devices.clone().skip(i + 1).find(|(_, pb)| *pb == pa) {
            return Err(DevicesError::SamePath(
                a.to_owned(),
                b.to_owned(),
                pa.clone(),
            ));
        }
    }
    Ok(())
}

/// One entry of the registry's `--devices`, as given.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRegistryDevice {
    name: String,
    #[serde(default)]
    input: String,
    #[serde(default = "default_block_size")]
    block_size: u32,
}

fn default_block_size() -> u32 {
    drafter_storage::DEFAULT_BLOCK_SIZE
}

/// One device a registry serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryDevice {
    /// Device name.
    pub name: String,
    /// The package file it is read from.
    pub input: PathBuf,
    /// Block size it is sent in (`blockSize`, default 64 KiB).
    pub block_size: u32,
}

/// The registry's devices (`--devices`): names unique and valid, `state`
/// and `memory` present, every input given and distinct, block sizes valid.
/// Which drives must be present is known from the package's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryDevices {
    /// In the order given.
    pub devices: Vec<RegistryDevice>,
}

impl RegistryDevices {
    /// Parses and checks the registry's `--devices` JSON.
    pub fn parse(json: &str) -> Result<Self, DevicesError> {
        let raw: Vec<RawRegistryDevice> = serde_json::from_str(json).map_err(json_error)?;
        let mut seen = HashSet::new();
        let mut devices = Vec::with_capacity(raw.len());
        for (i, d) in raw.into_iter().enumerate() {
            check_name(i, &d.name, &mut seen)?;
            let field = |problem: String| DevicesError::Field {
                name: d.name.clone(),
                problem,
            };
            if d.input.is_empty() {
                return Err(field("has no \"input\"".into()));
            }
            drafter_storage::device::validate_block_size(d.block_size)
                .map_err(|e| field(format!("has an {e}")))?;
            devices.push(RegistryDevice {
                input: PathBuf::from(&d.input),
                name: d.name,
                block_size: d.block_size,
            });
        }
        require(&seen, &[STATE, MEMORY])?;
        check_paths(devices.iter().map(|d| (d.name.as_str(), &d.input)))?;
        Ok(Self { devices })
    }

    /// The device called `name`.
    pub fn get(&self, name: &str) -> Option<&RegistryDevice> {
        self.devices.iter().find(|d| d.name == name)
    }
}

/// One entry of the terminator's `--devices`, as given.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTerminatorDevice {
    name: String,
    #[serde(default)]
    output: String,
}

/// One device a terminator writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminatorDevice {
    /// Device name.
    pub name: String,
    /// Where it is written.
    pub output: PathBuf,
}

/// The terminator's devices (`--devices`): names unique and valid, `state`
/// and `memory` present, every output given and distinct. Which drives must
/// be present is known once the peer lists its devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminatorDevices {
    /// In the order given.
    pub devices: Vec<TerminatorDevice>,
}

impl TerminatorDevices {
    /// Parses and checks the terminator's `--devices` JSON.
    pub fn parse(json: &str) -> Result<Self, DevicesError> {
        let raw: Vec<RawTerminatorDevice> = serde_json::from_str(json).map_err(json_error)?;
        let mut seen = HashSet::new();
        let mut devices = Vec::with_capacity(raw.len());
        for (i, d) in raw.into_iter().enumerate() {
            check_name(i, &d.name, &mut seen)?;
            if d.output.is_empty() {
                return Err(DevicesError::Field {
                    name: d.name,
                    problem: "has no \"output\"".into(),
                });
            }
            devices.push(TerminatorDevice {
                output: PathBuf::from(&d.output),
                name: d.name,
            });
        }
        require(&seen, &[STATE, MEMORY])?;
        check_paths(devices.iter().map(|d| (d.name.as_str(), &d.output)))?;
        Ok(Self { devices })
    }

    /// The device called `name`.
    pub fn get(&self, name: &str) -> Option<&TerminatorDevice> {
        self.devices.iter().find(|d| d.name == name)
    }
}

/// The reference's default registry `--devices`.
pub const DEFAULT_REGISTRY_DEVICES: &str = r#"[{"name":"state","input":"out/package/state.bin","blockSize":65536},{"name":"memory","input":"out/package/memory.bin","blockSize":65536},{"name":"kernel","input":"out/package/vmlinux","blockSize":65536},{"name":"disk","input":"out/package/rootfs.ext4","blockSize":65536},{"name":"config","input":"out/package/config.json","blockSize":65536},{"name":"oci","input":"out/blueprint/oci.ext4","blockSize":65536}]"#;

/// The reference's default terminator `--devices`.
pub const DEFAULT_TERMINATOR_DEVICES: &str = r#"[{"name":"state","output":"out/package/state.bin"},{"name":"memory","output":"out/package/memory.bin"},{"name":"kernel","output":"out/package/vmlinux"},{"name":"disk","output":"out/package/rootfs.ext4"},{"name":"config","output":"out/package/config.json"},{"name":"oci","output":"out/package/oci.ext4"}]"#;

/// The reference's default snapshotter `--devices`.
pub const DEFAULT_SNAPSHOT_DEVICES: &str = r#"[{"name":"state","input":"","output":"out/package/state.bin"},{"name":"memory","input":"","output":"out/package/memory.bin"},{"name":"kernel","input":"out/blueprint/vmlinux","output":"out/package/vmlinux"},{"name":"disk","input":"out/blueprint/rootfs.ext4","output":"out/package/rootfs.ext4"},{"name":"config","input":"","output":"out/package/config.json"},{"name":"oci","input":"out/blueprint/oci.ext4","output":"out/package/oci.ext4"}]"#;

/// The reference's default runner `--devices`.
pub const DEFAULT_PACKAGE_DEVICES: &str = r#"[{"name":"state","path":"out/package/state.bin"},{"name":"memory","path":"out/package/memory.bin"},{"name":"kernel","path":"out/package/vmlinux"},{"name":"disk","path":"out/package/rootfs.ext4"},{"name":"config","path":"out/package/config.json"},{"name":"oci","path":"out/blueprint/oci.ext4"}]"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn err(r: Result<impl std::fmt::Debug, DevicesError>) -> String {
        match r {
            Ok(v) => panic!("accepted: {v:?}"),
            Err(e) => {
                let s = e.to_string();
                assert!(!s.contains('\n'), "not one line: {s}");
                s
            }
        }
    }

    /// The reference peer's default `--devices`.
    const REFERENCE_PEER_DEVICES: &str = r#"[{"name":"state","base":"out/package/state.bin","overlay":"out/overlay/state.bin","state":"out/state/state.bin","blockSize":65536,"expiry":1000000000,"maxDirtyBlocks":200,"minCycles":5,"maxCycles":20,"cycleThrottle":500000000},{"name":"memory","base":"out/package/memory.bin","overlay":"out/overlay/memory.bin","state":"out/state/memory.bin","blockSize":65536,"expiry":1000000000,"maxDirtyBlocks":200,"minCycles":5,"maxCycles":20,"cycleThrottle":500000000},{"name":"kernel","base":"out/package/vmlinux","overlay":"out/overlay/vmlinux","state":"out/state/vmlinux","blockSize":65536,"expiry":1000000000,"maxDirtyBlocks":200,"minCycles":5,"maxCycles":20,"cycleThrottle":500000000},{"name":"disk","base":"out/package/rootfs.ext4","overlay":"out/overlay/rootfs.ext4","state":"out/state/rootfs.ext4","blockSize":65536,"expiry":1000000000,"maxDirtyBlocks":200,"minCycles":5,"maxCycles":20,"cycleThrottle":500000000},{"name":"config","base":"out/package/config.json","overlay":"out/overlay/config.json","state":"out/state/config.json","blockSize":65536,"expiry":1000000000,"maxDirtyBlocks":200,"minCycles":5,"maxCycles":20,"cycleThrottle":500000000},{"name":"oci","base":"out/package/oci.ext4","overlay":"out/overlay/oci.ext4","state":"out/state/oci.ext4","blockSize":65536,"expiry":1000000000,"maxDirtyBlocks":200,"minCycles":5,"maxCycles":20,"cycleThrottle":500000000}]"#;

    #[test]
    fn a_peer_package_comes_from_base_files_with_overlays_for_memory_and_drives() {
        let p = PeerPackage::parse(REFERENCE_PEER_DEVICES)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no package"));
        assert_eq!(
            p.devices.path(STATE),
            PathBuf::from("out/package/state.bin")
        );
        assert_eq!(p.devices.devices.len(), 6);
        let names: Vec<&str> = p.overlays.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["memory", "disk", "oci"]);
        assert_eq!(
            p.overlay("disk"),
            Some(&PathBuf::from("out/overlay/rootfs.ext4"))
        );
        // Migration settings only (the VM comes from --raddr or elsewhere).
        let settings = r#"[{"name":"memory","blockSize":4096},{"name":"state","base":""}]"#;
        assert_eq!(
            PeerPackage::parse(settings).unwrap_or_else(|e| panic!("{e}")),
            None
        );
        for (bad, want) in [
            (
                r#"[{"name":"memory","base":"m"},{"name":"state"}]"#,
                "\"state\" has no \"base\"",
            ),
            (
                r#"[{"name":"memory","base":"m"},{"name":"state","base":"s"}]"#,
                "missing required device(s) config",
            ),
            (
                r#"[{"name":"memory","base":"m","overlay":"s"},{"name":"state","base":"s"},{"name":"config","base":"c"}]"#,
                "use the same file s",
            ),
            (
                r#"[{"name":"memory","base":5}]"#,
                "\"memory\" has a \"base\" that is not a string",
            ),
            ("[{\"name\":", "invalid --devices JSON"),
        ] {
            let e = err(PeerPackage::parse(bad));
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn reference_defaults_parse() {
        let s = SnapshotDevices::parse(DEFAULT_SNAPSHOT_DEVICES).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.devices.len(), 6);
        assert_eq!(s.get(STATE).and_then(|d| d.input.clone()), None);
        assert_eq!(
            s.get(KERNEL).and_then(|d| d.input.clone()),
            Some(PathBuf::from("out/blueprint/vmlinux"))
        );
        let drives: Vec<&str> = s.drives().map(|d| d.name.as_str()).collect();
        assert_eq!(drives, ["disk", "oci"]);
        let p = PackageDevices::parse(DEFAULT_PACKAGE_DEVICES).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.path(MEMORY), PathBuf::from("out/package/memory.bin"));
        p.check_drives(["disk", "oci"])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn drive_order_follows_the_json_and_extra_drives_are_allowed() {
        let s = SnapshotDevices::parse(
            r#"[{"name":"oci","input":"a","output":"A"},{"name":"state","output":"s"},
                {"name":"memory","output":"m"},{"name":"config","output":"c"},
                {"name":"kernel","input":"k","output":"K"},{"name":"initramfs","input":"i","output":"I"},
                {"name":"disk","input":"d","output":"D"},{"name":"data-1","input":"x","output":"X"}]"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let drives: Vec<&str> = s.drives().map(|d| d.name.as_str()).collect();
        assert_eq!(drives, ["oci", "disk", "data-1"]);
    }

    #[test]
    fn snapshotter_devices_refuse_bad_input_in_one_line() {
        let base = |extra: &str| {
            format!(
                r#"[{{"name":"state","output":"s"}},{{"name":"memory","output":"m"}},{{"name":"config","output":"c"}},
                   {{"name":"kernel","input":"k","output":"K"}},{{"name":"disk","input":"d","output":"D"}}{extra}]"#
            )
        };
        assert!(err(SnapshotDevices::parse("[{\"name\":")).starts_with("invalid --devices JSON"));
        assert!(err(SnapshotDevices::parse("{}")).starts_with("invalid --devices JSON"));
        assert!(err(SnapshotDevices::parse(
            r#"[{"name":"state","output":"s","path":"p"}]"#
        ))
        .contains("unknown field `path`"));
        assert!(err(SnapshotDevices::parse(&base(
            r#",{"name":"disk","input":"e","output":"E"}"#
        )))
        .contains("\"disk\" is given more than once"));
        assert!(err(SnapshotDevices::parse(&base(
            r#",{"name":"","input":"e","output":"E"}"#
        )))
        .contains("device #5 has an empty name"));
        assert!(err(SnapshotDevices::parse(&base(
            r#",{"name":"a/b","input":"e","output":"E"}"#
        )))
        .contains("\"a/b\""));
        assert!(err(SnapshotDevices::parse(&base(
            r#",{"name":"oci","output":"E"}"#
        )))
        .contains("\"oci\" has no \"input\""));
        assert!(err(SnapshotDevices::parse(&base(
            r#",{"name":"oci","input":"o"}"#
        )))
        .contains("\"oci\" has no \"output\""));
        assert!(err(SnapshotDevices::parse(&base(
            r#",{"name":"oci","input":"o","output":"D"}"#
        )))
        .contains("use the same file D"));
        assert!(err(SnapshotDevices::parse(&base(
            r#",{"name":"oci","input":"D","output":"O"}"#
        )))
        .contains("use the same file D"));
        let e = err(SnapshotDevices::parse(
            r#"[{"name":"state","output":"s"},{"name":"kernel","input":"k","output":"K"}]"#,
        ));
        assert!(
            e.contains("missing required device(s) memory, disk, config"),
            "{e}"
        );
        let e = err(SnapshotDevices::parse(
            r#"[{"name":"state","input":"x","output":"s"}]"#,
        ));
        assert!(e.contains("\"state\" is written by the snapshotter"), "{e}");
    }

    #[test]
    fn registry_and_terminator_devices_parse_the_reference_defaults_and_refuse_bad_input() {
        let r = RegistryDevices::parse(DEFAULT_REGISTRY_DEVICES).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.devices.len(), 6);
        assert_eq!(r.get(MEMORY).map(|d| d.block_size), Some(65536));
        let r = RegistryDevices::parse(
            r#"[{"name":"state","input":"s"},{"name":"memory","input":"m","blockSize":4096}]"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.get(STATE).map(|d| d.block_size), Some(65536));
        assert_eq!(r.get(MEMORY).map(|d| d.block_size), Some(4096));
        let t =
            TerminatorDevices::parse(DEFAULT_TERMINATOR_DEVICES).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            t.get(DISK).map(|d| d.output.clone()),
            Some(PathBuf::from("out/package/rootfs.ext4"))
        );
        let sm = |extra: &str, field: &str| {
            format!(
                r#"[{{"name":"state","{field}":"s"}},{{"name":"memory","{field}":"m"}}{extra}]"#
            )
        };
        assert!(err(RegistryDevices::parse("[{")).starts_with("invalid --devices JSON"));
        assert!(err(RegistryDevices::parse(&sm(
            r#",{"name":"x","output":"o"}"#,
            "input"
        )))
        .contains("unknown field `output`"));
        assert!(
            err(RegistryDevices::parse(&sm(r#",{"name":"x"}"#, "input")))
                .contains("\"x\" has no \"input\"")
        );
        assert!(err(RegistryDevices::parse(&sm(
            r#",{"name":"x","input":"i","blockSize":1000}"#,
            "input"
        )))
        .contains("\"x\" has an invalid block size 1000"));
        assert!(err(RegistryDevices::parse(&sm(
            r#",{"name":"x","input":"i","blockSize":-1}"#,
            "input"
        )))
        .starts_with("invalid --devices JSON"));
        assert!(err(RegistryDevices::parse(&sm(
            r#",{"name":"x","input":"s"}"#,
            "input"
        )))
        .contains("use the same file s"));
        assert!(
            err(RegistryDevices::parse(r#"[{"name":"state","input":"s"}]"#))
                .contains("missing required device(s) memory")
        );
        assert!(
            err(TerminatorDevices::parse(&sm(r#",{"name":"x"}"#, "output")))
                .contains("\"x\" has no \"output\"")
        );
        assert!(err(TerminatorDevices::parse(&sm(
            r#",{"name":"x","input":"i","output":"o"}"#,
            "output"
        )))
        .contains("unknown field `input`"));
        assert!(err(TerminatorDevices::parse(&sm(
            r#",{"name":"state","output":"o"}"#,
            "output"
        )))
        .contains("given more than once"));
        assert!(err(TerminatorDevices::parse(&sm(
            r#",{"name":"x","output":"m"}"#,
            "output"
        )))
        .contains("use the same file m"));
        assert!(err(TerminatorDevices::parse(&sm(
            r#",{"name":"../x","output":"o"}"#,
            "output"
        )))
        .contains("\"../x\""));
    }

    #[test]
    fn runner_devices_refuse_bad_input_in_one_line() {
        let ok = r#"[{"name":"state","path":"s"},{"name":"memory","path":"m"},{"name":"config","path":"c"},{"name":"disk","path":"d"}]"#;
        let p = PackageDevices::parse(ok).unwrap_or_else(|e| panic!("{e}"));
        assert!(err(p.check_drives(["disk", "oci"])).contains("missing required device(s) oci"));
        assert!(err(p.check_drives([]))
            .contains("unknown device(s) disk (the package's drives are none)"));
        assert!(err(PackageDevices::parse(r#"[{"name":"state"}]"#)).contains("has no \"path\""));
        assert!(
            err(PackageDevices::parse(r#"[{"name":"state","path":"s"}]"#))
                .contains("missing required device(s) memory, config")
        );
        assert!(err(PackageDevices::parse(
            r#"[{"name":"state","path":"s"},{"name":"memory","path":"s"},{"name":"config","path":"c"}]"#
        ))
        .contains("\"state\" and \"memory\" use the same file s"));
        assert!(err(PackageDevices::parse(
            r#"[{"name":"state","path":"s"},{"name":"state","path":"t"}]"#
        ))
        .contains("given more than once"));
        assert!(err(PackageDevices::parse(
            r#"[{"name":"state","input":"s","output":"t"}]"#
        ))
        .contains("unknown field `input`"));
    }
}
