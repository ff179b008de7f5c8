//! `drafter-snapshotter` and `drafter-runner` refuse bad input with one line
//! naming the problem and exit status 1, before any VM starts, and leave
//! every file (and the folder holding them) exactly as it was. Their
//! `--help` lists the reference Drafter's flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("drafter-sr-bad-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
    d
}

/// Every file under `dir` with its content and modification time.
fn tree(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, SystemTime)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{e}")) {
            let p = e.unwrap_or_else(|e| panic!("{e}")).path();
            if p.is_dir() {
                out.insert(p.clone(), (Vec::new(), SystemTime::UNIX_EPOCH));
                todo.push(p);
            } else {
                let m = std::fs::metadata(&p)
                    .and_then(|m| m.modified())
                    .unwrap_or_else(|e| panic!("{e}"));
                out.insert(p.clone(), (std::fs::read(&p).unwrap_or_default(), m));
            }
        }
    }
    out
}

/// Runs `bin` with `args`; asserts exit 1, a single stderr line containing
/// every `want`, and no change under `dir`.
fn refuses(bin: &str, dir: &Path, args: &[&str], want: &[&str]) {
    let before = tree(dir);
    let out = Command::new(bin)
        .args(args)
        .env_remove("RUST_LOG")
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    for w in want {
        assert!(err.contains(w), "{args:?}: expected {w:?} in {err:?}");
    }
    assert!(
        tree(dir) == before,
        "{args:?} changed files under {}",
        dir.display()
    );
}

const SNAPSHOTTER: &str = env!("CARGO_BIN_EXE_drafter-snapshotter");
const RUNNER: &str = env!("CARGO_BIN_EXE_drafter-runner");

/// A blueprint (junk content: nothing gets far enough to boot it) and the
/// snapshotter's `--devices` for it, with `out/` as the package folder.
fn blueprint(d: &Path) -> serde_json::Value {
    for f in ["vmlinux", "rootfs.ext4", "oci.ext4"] {
        std::fs::write(d.join(f), f).unwrap_or_else(|e| panic!("{e}"));
    }
    let o = |n: &str| d.join("out").join(n);
    serde_json::json!([
        {"name": "state", "output": o("state.bin")},
        {"name": "memory", "output": o("memory.bin")},
        {"name": "kernel", "input": d.join("vmlinux"), "output": o("vmlinux")},
        {"name": "disk", "input": d.join("rootfs.ext4"), "output": o("rootfs.ext4")},
        {"name": "config", "output": o("config.json")},
        {"name": "oci", "input": d.join("oci.ext4"), "output": o("oci.ext4")},
    ])
}

#[test]
fn snapshotter_refuses_bad_devices_and_missing_inputs() {
    let d = scratch("snap");
    let good = blueprint(&d);
    refuses(
        SNAPSHOTTER,
        &d,
        &["--devices", "[{\"name\":\"state\","],
        &["invalid --devices JSON"],
    );
    refuses(
        SNAPSHOTTER,
        &d,
        &["--devices", "[{\"name\":\"state\",\"path\":\"x\"}]"],
        &["unknown field `path`"],
    );
    let mut missing = good.clone();
    if let Some(a) = missing.as_array_mut() {
        a.retain(|e| e["name"] != "memory" && e["name"] != "disk");
    }
    refuses(
        SNAPSHOTTER,
        &d,
        &["--devices", &missing.to_string()],
        &["missing required device(s) memory, disk"],
    );
    let mut dup = good.clone();
    if let Some(a) = dup.as_array_mut() {
        a.push(serde_json::json!({"name": "oci", "input": "x", "output": "y"}));
    }
    refuses(
        SNAPSHOTTER,
        &d,
        &["--devices", &dup.to_string()],
        &["device \"oci\" is given more than once"],
    );
    std::fs::remove_file(d.join("rootfs.ext4")).unwrap_or_else(|e| panic!("{e}"));
    refuses(
        SNAPSHOTTER,
        &d,
        &["--devices", &good.to_string()],
        &["device \"disk\": cannot read input", "rootfs.ext4"],
    );
    std::fs::write(d.join("rootfs.ext4"), "disk").unwrap_or_else(|e| panic!("{e}"));
    refuses(
        SNAPSHOTTER,
        &d,
        &["--devices", &good.to_string(), "--cpu-template", "T2"],
        &["--cpu-template: unknown CPU template \"T2\" (valid: None, X86_64_V2, X86_64_V3)"],
    );
    // A bad duration is a usage error (clap: exit status 2).
    let out = Command::new(SNAPSHOTTER)
        .args(["--devices", &good.to_string(), "--resume-timeout", "5"])
        .current_dir(&d)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid duration \"5\""));
    assert!(!d.join("out").exists());
    let _ = std::fs::remove_dir_all(&d);
}

fn package(d: &Path) -> serde_json::Value {
    let config = serde_json::json!({
        "formatVersion": 1, "agentVSockPort": 26, "livenessVSockPort": 25,
        "cpuCount": 1, "memorySize": 64, "bootArgs": "console=ttyS0",
        "initramfs": false,
        "drives": [{"name": "disk", "readOnly": false}, {"name": "oci", "readOnly": false}],
        "vsockCid": 3, "network": null, "cpuTemplate": "None",
    });
    std::fs::write(d.join("config.json"), config.to_string()).unwrap_or_else(|e| panic!("{e}"));
    for f in ["state.bin", "memory.bin", "rootfs.ext4", "oci.ext4"] {
        std::fs::write(d.join(f), f).unwrap_or_else(|e| panic!("{e}"));
    }
    serde_json::json!([
        {"name": "state", "path": d.join("state.bin")},
        {"name": "memory", "path": d.join("memory.bin")},
        {"name": "disk", "path": d.join("rootfs.ext4")},
        {"name": "config", "path": d.join("config.json")},
        {"name": "oci", "path": d.join("oci.ext4")},
    ])
}

#[test]
fn runner_refuses_bad_devices_and_packages_and_leaves_them_alone() {
    let d = scratch("run");
    let good = package(&d);
    refuses(
        RUNNER,
        &d,
        &["--devices", "not json"],
        &["invalid --devices JSON"],
    );
    let mut missing = good.clone();
    if let Some(a) = missing.as_array_mut() {
        a.retain(|e| e["name"] != "state");
    }
    refuses(
        RUNNER,
        &d,
        &["--devices", &missing.to_string()],
        &["missing required device(s) state"],
    );
    let mut no_oci = good.clone();
    if let Some(a) = no_oci.as_array_mut() {
        a.retain(|e| e["name"] != "oci");
    }
    refuses(
        RUNNER,
        &d,
        &["--devices", &no_oci.to_string()],
        &["missing required device(s) oci"],
    );
    let mut extra = good.clone();
    if let Some(a) = extra.as_array_mut() {
        a.push(serde_json::json!({"name": "data", "path": d.join("data.ext4")}));
    }
    refuses(
        RUNNER,
        &d,
        &["--devices", &extra.to_string()],
        &["unknown device(s) data", "disk, oci"],
    );
    // A state file that is not one: refused before anything runs.
    refuses(
        RUNNER,
        &d,
        &["--devices", &good.to_string()],
        &["cannot read the package's state", "state.bin"],
    );
    let mut gone = good.clone();
    if let Some(a) = gone.as_array_mut() {
        for e in a.iter_mut() {
            if e["name"] == "oci" {
                e["path"] = serde_json::json!(d.join("missing.ext4"));
            }
        }
    }
    refuses(
        RUNNER,
        &d,
        &["--devices", &gone.to_string()],
        &["device \"oci\"", "missing.ext4"],
    );
    let config = std::fs::read_to_string(d.join("config.json")).unwrap_or_default();
    std::fs::write(
        d.join("config.json"),
        config.replace("\"formatVersion\":1", "\"formatVersion\":7"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    refuses(
        RUNNER,
        &d,
        &["--devices", &good.to_string()],
        &["format version 7", "config.json"],
    );
    std::fs::write(
        d.join("config.json"),
        config.replace("\"cpuTemplate\":\"None\"", "\"cpuTemplate\":\"T2\""),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    refuses(
        RUNNER,
        &d,
        &["--devices", &good.to_string()],
        &[
            "config.json",
            "cpuTemplate: unknown CPU template \"T2\" (valid: None, X86_64_V2, X86_64_V3)",
        ],
    );
    let _ = std::fs::remove_dir_all(&d);
}
