//! Config JSON seeds: the tools' default `--devices` and real configs
//! serialised by the types that parse them.

use std::path::PathBuf;

use drafter::devices::{
    DEFAULT_PACKAGE_DEVICES, DEFAULT_REGISTRY_DEVICES, DEFAULT_SNAPSHOT_DEVICES,
    DEFAULT_TERMINATOR_DEVICES,
};
use drafter::package_config::{PackageConfig, PackageDrive, PackageNetwork};
use drafter_vmm::config::{DriveConfig, NetConfig, VsockConfig};
use drafter_vmm::VmConfig;

use crate::Corpus;

fn put(c: &Corpus, which: u8, name: &str, text: &str) {
    c.put(
        "config_json",
        name,
        &[&[which][..], text.as_bytes()].concat(),
    );
}

/// Writes the `config_json` seeds (first byte: which parser).
pub fn write(c: &Corpus) {
    put(c, 0, "snapshot-devices", DEFAULT_SNAPSHOT_DEVICES);
    put(c, 1, "package-devices", DEFAULT_PACKAGE_DEVICES);
    put(c, 2, "registry-devices", DEFAULT_REGISTRY_DEVICES);
    put(c, 3, "terminator-devices", DEFAULT_TERMINATOR_DEVICES);
    let config = PackageConfig {
        format_version: drafter::package_config::PACKAGE_FORMAT_VERSION,
        agent_vsock_port: 26,
        liveness_vsock_port: 25,
        cpu_count: 2,
        memory_size: 1024,
        boot_args: "console=ttyS0 panic=-1".into(),
        initramfs: false,
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
            interface: "eth0".into(),
            mac: "02:0e:d9:fd:68:3d".into(),
        }),
        cpu_template: drafter::package_config::CPU_TEMPLATE_NONE.into(),
    };
    put(c, 4, "package-config", &config.to_json());
    // The peer's Go-style settings, as its README documents them.
    let settings = serde_json::json!([
        {"name": "memory", "blockSize": 65536, "expiry": "1s", "maxDirtyBlocks": 200,
         "minCycles": 5, "maxCycles": 20, "cycleThrottle": "500ms"},
        {"name": "state", "blockSize": 65536},
        {"name": "drives", "blockSize": 65536},
        {"name": "kernel", "blockSize": 65536}
    ]);
    put(c, 5, "peer-devices", &settings.to_string());
    let mut vm = VmConfig::new("vmlinux");
    vm.initramfs = Some(PathBuf::from("initramfs.cpio"));
    vm.drives.push(DriveConfig {
        name: "disk".into(),
        path: "rootfs.ext4".into(),
        read_only: false,
    });
    vm.net = Some(NetConfig {
        tap: "tap0".into(),
        mac: Some("02:00:00:00:00:01".into()),
        netns: Some("ark0".into()),
    });
    vm.vsock = Some(VsockConfig {
        cid: 3,
        uds_path: "vsock.sock".into(),
    });
    put(
        c,
        6,
        "vm-config",
        &serde_json::to_string_pretty(&vm).expect("vm config"),
    );
    put(
        c,
        7,
        "packager-devices",
        drafter_package::DEFAULT_DEVICES_JSON,
    );
}
