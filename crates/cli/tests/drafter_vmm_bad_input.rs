//! `drafter-vmm` refuses bad input with one line naming the problem and a
//! non-zero exit, never a panic (issue 3 "Done when" 9).

use std::path::{Path, PathBuf};
use std::process::Command;

use drafter_vmm::{BuildOptions, VmConfig, Vmm};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("drafter-vmm-bad-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
    d
}

/// Runs drafter-vmm with `args`; asserts exit 1 and a single stderr line
/// containing `want`.
fn refuses(args: &[&str], want: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_drafter-vmm"))
        .args(args)
        .args(["--no-serial-stdout"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(err.contains(want), "{args:?}: expected {want:?} in {err:?}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

#[test]
fn a_non_kernel_file_is_refused() {
    let d = scratch("kernel");
    let k = d.join("notakernel");
    std::fs::write(&k, vec![0x42u8; 64 << 10]).unwrap_or_else(|e| panic!("{e}"));
    refuses(
        &["--kernel", s(&k), "--memory-mib", "32"],
        "is not a Linux kernel",
    );
    refuses(
        &["--kernel", s(&d.join("missing")), "--memory-mib", "32"],
        "cannot read kernel",
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_missing_drive_is_refused() {
    let d = scratch("drive");
    let k = d.join("k");
    std::fs::write(&k, b"x").unwrap_or_else(|e| panic!("{e}"));
    let drive = format!("root:{}", s(&d.join("nope.img")));
    refuses(
        &["--kernel", s(&k), "--memory-mib", "32", "--drive", &drive],
        "drive 'root'",
    );
    refuses(
        &["--kernel", s(&k), "--drive", "no-path"],
        "expected NAME:PATH",
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_malformed_config_is_refused() {
    let d = scratch("config");
    let c = d.join("vm.json");
    std::fs::write(&c, b"{\"kernel\": \"/k\", \"vcpus\": ").unwrap_or_else(|e| panic!("{e}"));
    refuses(&["--config", s(&c)], "invalid config");
    std::fs::write(&c, b"{\"kernel\": \"/k\", \"vcpus\": 0}").unwrap_or_else(|e| panic!("{e}"));
    refuses(&["--config", s(&c)], "vcpus must be");
    let _ = std::fs::remove_dir_all(&d);
}

/// A tiny long-mode guest spinning forever.
const SPIN: &[u8] = &[0xeb, 0xfe];

#[test]
fn damaged_state_files_are_refused() {
    let d = scratch("state");
    let mut c = VmConfig::new("/flat");
    c.memory_mib = 32;
    c.serial.stdout = false;
    let mut vmm = Vmm::boot(
        c,
        BuildOptions {
            flat_program: Some(SPIN.to_vec()),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    vmm.pause().unwrap_or_else(|e| panic!("{e}"));
    let (state, mem) = (d.join("state"), d.join("mem"));
    vmm.snapshot(&state, &mem).unwrap_or_else(|e| panic!("{e}"));
    vmm.stop();
    let good = std::fs::read(&state).unwrap_or_default();
    let restore = |bytes: &[u8], want: &str| {
        let bad = d.join("bad-state");
        std::fs::write(&bad, bytes).unwrap_or_else(|e| panic!("{e}"));
        refuses(
            &["--restore-state", s(&bad), "--restore-memory", s(&mem)],
            want,
        );
    };
    restore(&good[..good.len() / 3], "truncated");
    let mut flipped = good.clone();
    let n = flipped.len() - 200;
    flipped[n] ^= 0x10;
    restore(&flipped, "corrupted");
    let mut other = good.clone();
    other[8] = 7;
    restore(&other, "format version 7");
    restore(b"garbage", "not a drafter VM state file");
    // The memory file is left untouched by all of this.
    assert_eq!(
        std::fs::metadata(&mem).map(|m| m.len()).unwrap_or_default(),
        32 << 20
    );
    let _ = std::fs::remove_dir_all(&d);
}
