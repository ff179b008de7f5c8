//! Issue 10, done-when 6: every seed CLI's `--help` lists the flags of the Go
//! Drafter's CLI of the same name (taken from the `--help` listings in its
//! README), so its users find the interface they know.

use std::path::PathBuf;
use std::process::Command;

/// The Go Drafter's flags, per binary (its README, "--help" listings).
const REFERENCE: &[(&str, &[&str])] = &[
    (
        "drafter-nat",
        &[
            "allow-incoming-traffic",
            "blocked-subnet-cidr",
            "host-interface",
            "host-veth-cidr",
            "namespace-interface",
            "namespace-interface-gateway",
            "namespace-interface-ip",
            "namespace-interface-mac",
            "namespace-interface-netmask",
            "namespace-prefix",
            "namespace-veth-cidr",
        ],
    ),
    ("drafter-forwarder", &["host-veth-cidr", "port-forwards"]),
    (
        "drafter-agent",
        &[
            "after-resume-cmd",
            "before-suspend-cmd",
            "shell-cmd",
            "vsock-port",
            "vsock-timeout",
        ],
    ),
    ("drafter-liveness", &["vsock-port", "vsock-timeout"]),
    ("drafter-packager", &["devices", "extract", "package-path"]),
    (
        "drafter-snapshotter",
        &[
            "agent-vsock-port",
            "boot-args",
            "cgroup-version",
            "chroot-base-dir",
            "cpu-count",
            "cpu-template",
            "devices",
            "enable-input",
            "enable-output",
            "firecracker-bin",
            "gid",
            "interface",
            "jailer-bin",
            "liveness-vsock-port",
            "mac",
            "memory-size",
            "netns",
            "numa-node",
            "resume-timeout",
            "uid",
        ],
    ),
    (
        "drafter-runner",
        &[
            "cgroup-version",
            "chroot-base-dir",
            "devices",
            "enable-input",
            "enable-output",
            "firecracker-bin",
            "gid",
            "jailer-bin",
            "netns",
            "numa-node",
            "rescue-timeout",
            "resume-timeout",
            "uid",
        ],
    ),
    ("drafter-registry", &["concurrency", "devices", "laddr"]),
    ("drafter-terminator", &["devices", "raddr"]),
    (
        "drafter-peer",
        &[
            "cgroup-version",
            "chroot-base-dir",
            "concurrency",
            "devices",
            "enable-input",
            "enable-output",
            "firecracker-bin",
            "gid",
            "jailer-bin",
            "laddr",
            "netns",
            "numa-node",
            "raddr",
            "rescue-timeout",
            "resume-timeout",
            "uid",
        ],
    ),
];

/// Where cargo put this workspace's binaries (next to `drafter-peer`, which
/// this package builds; the guest binaries come from `drafter-guest`).
fn binary(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_drafter-peer"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace (`cargo build --workspace`)",
        path.display()
    );
    path
}

fn help(name: &str) -> String {
    let out = Command::new(binary(name))
        .arg("--help")
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(out.status.success(), "{name} --help failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_seed_cli_lists_the_reference_flags() {
    let mut missing = Vec::new();
    for (name, flags) in REFERENCE {
        let text = help(name);
        for flag in *flags {
            if !text.contains(&format!("--{flag}")) {
                missing.push(format!("{name} --{flag}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "reference flags not accepted: {missing:?}"
    );
}
