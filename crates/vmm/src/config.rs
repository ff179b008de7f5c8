//! The VM configuration: what `drafter-vmm` reads from JSON or flags.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::cpu_template::CpuTemplate;

/// Default kernel command line: serial console, reboot through the keyboard
/// controller, reboot one second after a panic, no PCI probing.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

fn default_boot_args() -> String {
    DEFAULT_BOOT_ARGS.to_string()
}
fn default_vcpus() -> u8 {
    1
}
fn default_memory() -> u64 {
    128
}
fn default_cid() -> u32 {
    3
}
fn yes() -> bool {
    true
}

/// A whole VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel image: bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// Optional initramfs (cpio, optionally compressed).
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line; virtio-mmio device announcements are appended.
    #[serde(default = "default_boot_args")]
    pub boot_args: String,
    /// Number of vCPUs (1..=254).
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest RAM in MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Drives in guest order: the first is `/dev/vda`.
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// Network interface over a tap device.
    #[serde(default)]
    pub net: Option<NetConfig>,
    /// virtio-vsock device (Firecracker hybrid UDS form).
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Serial console.
    #[serde(default)]
    pub serial: SerialConfig,
    /// CPUID feature baseline given to the guest (by name, e.g.
    /// `"X86_64_V3"`; default `"None"`: the host's features).
    #[serde(default)]
    pub cpu_template: CpuTemplate,
}

/// One virtio-blk drive backed by a raw file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Name (for the user; the guest sees drives by order).
    pub name: String,
    /// Backing raw file.
    pub path: PathBuf,
    /// Refuse guest writes.
    #[serde(default)]
    pub read_only: bool,
}

/// A virtio-net interface.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Host tap device name.
    pub tap: String,
    /// Guest MAC address, `aa:bb:cc:dd:ee:ff`.
    #[serde(default)]
    pub mac: Option<String>,
    /// Network namespace (name under /var/run/netns) holding the tap.
    #[serde(default)]
    pub netns: Option<String>,
}

/// A virtio-vsock device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Guest CID.
    #[serde(default = "default_cid")]
    pub cid: u32,
    /// Host Unix socket path (guest→host connections go to `<uds_path>_<port>`).
    pub uds_path: PathBuf,
}

/// The COM1 console.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Copy guest output to stdout.
    #[serde(default = "yes")]
    pub stdout: bool,
    /// Feed stdin to the guest.
    #[serde(default)]
    pub stdin: bool,
}

impl Default for SerialConfig {
    fn default() -> Self {
        SerialConfig {
            stdout: true,
            stdin: false,
        }
    }
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initramfs: None,
            boot_args: default_boot_args(),
            vcpus: 1,
            memory_mib: default_memory(),
            drives: Vec::new(),
            net: None,
            vsock: None,
            serial: SerialConfig::default(),
            cpu_template: CpuTemplate::None,
        }
    }
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_defaults_and_unknown_fields() {
        let c: VmConfig =
            serde_json::from_str(r#"{"kernel":"/k","drives":[{"name":"root","path":"/d"}]}"#)
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.memory_mib, 128);
        assert!(!c.drives[0].read_only);
        assert!(c.serial.stdout);
        assert!(serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","cpus":2}"#).is_err());
    }

    #[test]
    fn cpu_templates_are_named_and_unknown_names_list_the_valid() {
        let c: VmConfig = serde_json::from_str(r#"{"kernel":"/k","cpu_template":"x86-64-v3"}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.cpu_template, CpuTemplate::X86_64V3);
        let json = serde_json::to_string(&c).unwrap_or_default();
        assert!(json.contains(r#""cpu_template":"X86_64_V3""#), "{json}");
        let default: VmConfig =
            serde_json::from_str(r#"{"kernel":"/k"}"#).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(default.cpu_template, CpuTemplate::None);
        let e = serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","cpu_template":"T2"}"#)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains(r#"unknown CPU template "T2" (valid: None, X86_64_V2, X86_64_V3)"#),
            "{e}"
        );
    }

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(parse_mac("02:00:00:00:00:0a"), Some([2, 0, 0, 0, 0, 10]));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:0a:01"), None);
        assert_eq!(parse_mac("zz:00:00:00:00:0a"), None);
    }
}
