//! `drafter-packager` refuses bad input — malformed `--devices`, a missing
//! input, a truncated or corrupt package, an unsupported format version, an
//! existing output without `--force` — with exit 1 and one stderr line
//! naming the problem, and changes nothing on disk.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use common::{assert_refused, ok, run, s, scratch, snapshot};

const BIN: &str = env!("CARGO_BIN_EXE_drafter-packager");

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Input devices in `dir/in` and their `--devices` JSON.
fn inputs(dir: &Path) -> (Vec<(&'static str, PathBuf)>, String) {
    let d = dir.join("in");
    ok(std::fs::create_dir_all(&d));
    let state = d.join("state.bin");
    ok(std::fs::write(&state, random_bytes(1, 65_537)));
    let disk = d.join("rootfs.ext4");
    let mut data = random_bytes(2, 1 << 20);
    data.resize(2 << 20, 0);
    ok(std::fs::write(&disk, data));
    let devs = vec![("state", state), ("disk", disk)];
    let json = devices_json(&devs);
    (devs, json)
}

fn devices_json(devs: &[(&str, PathBuf)]) -> String {
    let v: Vec<serde_json::Value> = devs
        .iter()
        .map(|(n, p)| serde_json::json!({ "name": n, "path": p }))
        .collect();
    serde_json::Value::Array(v).to_string()
}

/// Archives the inputs into `dir/app.tar.zst` with the real binary.
fn package(dir: &Path) -> (PathBuf, Vec<(&'static str, PathBuf)>) {
    let (devs, json) = inputs(dir);
    let pkg = dir.join("app.tar.zst");
    let out = run(BIN, &["--package-path", s(&pkg), "--devices", &json]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (pkg, devs)
}

/// Existing output files in `dir/out` (so a bad extract with --force would
/// have something to destroy) and their `--devices` JSON.
fn existing_outputs(dir: &Path) -> String {
    let d = dir.join("out");
    ok(std::fs::create_dir_all(&d));
    ok(std::fs::write(d.join("state"), b"old state"));
    ok(std::fs::write(d.join("disk"), b"old disk"));
    devices_json(&[("disk", d.join("disk")), ("state", d.join("state"))])
}

/// Runs an extract of `pkg` that must be refused, and checks that nothing
/// under `dir` changed.
fn extract_refused(dir: &Path, pkg: &Path, devices: &str, extra: &[&str], want: &[&str]) {
    let before = snapshot(dir);
    let mut args = vec!["--package-path", s(pkg), "--devices", devices, "--extract"];
    args.extend_from_slice(extra);
    let out = run(BIN, &args);
    assert_refused(&out, &args, want);
    assert!(snapshot(dir) == before, "{args:?} changed files on disk");
}

#[test]
fn malformed_devices_json_is_refused() {
    let d = scratch("drafter-packager", "json");
    let pkg = d.join("app.tar.zst");
    for (devices, want) in [
        (r#"[{"name":"#, vec!["invalid devices configuration", "EOF"]),
        (
            r#"[{"name":"disk","output":"x"}]"#,
            vec!["invalid devices configuration", "unknown field `output`"],
        ),
        (r#"{"name":"disk"}"#, vec!["invalid devices configuration"]),
        (
            r#"[{"name":"a/b","path":"x"}]"#,
            vec!["invalid device name", "a/b"],
        ),
        (
            r#"[{"name":"manifest.json","path":"x"}]"#,
            vec!["invalid device name", "reserved"],
        ),
        (
            r#"[{"name":"disk","path":"x"},{"name":"disk","path":"y"}]"#,
            vec!["\"disk\" is given twice"],
        ),
        ("[]", vec!["no devices given"]),
    ] {
        for extract in [false, true] {
            let mut args = vec!["--package-path", s(&pkg), "--devices", devices];
            if extract {
                args.push("--extract");
            }
            let before = snapshot(&d);
            assert_refused(&run(BIN, &args), &args, &want);
            assert!(snapshot(&d) == before);
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_missing_input_file_is_refused_and_the_old_package_kept() {
    let d = scratch("drafter-packager", "missing");
    let (pkg, mut devs) = package(&d);
    devs.push(("memory", d.join("in").join("missing-memory.bin")));
    let before = snapshot(&d);
    let json = devices_json(&devs);
    let args = ["--package-path", s(&pkg), "--devices", &json];
    assert_refused(
        &run(BIN, &args),
        &args,
        &["cannot read device \"memory\"", "missing-memory.bin"],
    );
    assert!(snapshot(&d) == before, "old package or inputs changed");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_truncated_package_is_refused_and_nothing_is_written() {
    let d = scratch("drafter-packager", "truncated");
    let (pkg, _) = package(&d);
    let bytes = ok(std::fs::read(&pkg));
    let outs = existing_outputs(&d);
    for cut in [bytes.len() / 2, bytes.len() - 1, 100] {
        ok(std::fs::write(&pkg, &bytes[..cut]));
        extract_refused(&d, &pkg, &outs, &["--force"], &["truncated", "app.tar.zst"]);
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_flipped_byte_is_refused_and_nothing_is_written() {
    let d = scratch("drafter-packager", "flipped");
    let (pkg, _) = package(&d);
    let mut bytes = ok(std::fs::read(&pkg));
    // The middle of the package is the disk's random (stored) data.
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    ok(std::fs::write(&pkg, &bytes));
    let outs = existing_outputs(&d);
    extract_refused(&d, &pkg, &outs, &["--force"], &["corrupt", "\"disk\""]);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn an_existing_output_needs_force() {
    let d = scratch("drafter-packager", "force");
    let (pkg, devs) = package(&d);
    let outs = existing_outputs(&d);
    extract_refused(&d, &pkg, &outs, &[], &["already exists", "--force", "disk"]);

    let args = [
        "--package-path",
        s(&pkg),
        "--devices",
        &outs,
        "--extract",
        "--force",
        "--json",
    ];
    let out = run(BIN, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = ok(serde_json::from_slice(&out.stdout));
    assert_eq!(report["operation"], "extract");
    assert_eq!(report["bytes"], 65_537 + (2 << 20));
    assert_eq!(report["devices"][0]["name"], "disk");
    for (name, input) in &devs {
        let output = d.join("out").join(name);
        assert!(
            ok(std::fs::read(input)) == ok(std::fs::read(&output)),
            "{name}"
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn an_unsupported_format_version_is_refused() {
    let d = scratch("drafter-packager", "version");
    let (pkg, _) = package(&d);
    let mut tar = Vec::new();
    ok(ok(zstd::Decoder::new(ok(std::fs::File::open(&pkg)))).read_to_end(&mut tar));
    let (from, to) = (b"\"formatVersion\":1", b"\"formatVersion\":2");
    let at = tar.windows(from.len()).position(|w| w == from);
    let at = at.unwrap_or_else(|| panic!("no formatVersion in the manifest"));
    tar[at..at + to.len()].copy_from_slice(to);
    let mut enc = ok(zstd::Encoder::new(ok(std::fs::File::create(&pkg)), 3));
    ok(enc.write_all(&tar));
    ok(ok(enc.finish()).flush());
    let outs = existing_outputs(&d);
    extract_refused(
        &d,
        &pkg,
        &outs,
        &["--force"],
        &["unsupported formatVersion 2", "app.tar.zst"],
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_package_whose_last_run_ended_without_a_suspend_is_not_archived() {
    let d = scratch("drafter-packager", "in-use");
    let (pkg, devs) = package(&d);
    // The mark a runner leaves when it is killed mid-run.
    let state = &devs[0].1;
    ok(std::fs::write(
        drafter::in_use::mark_path(state),
        "pid 4242 since unix time 1",
    ));
    let before = snapshot(&d);
    let json = devices_json(&devs);
    let args = ["--package-path", s(&pkg), "--devices", &json];
    assert_refused(
        &run(BIN, &args),
        &args,
        &[
            "cannot read device \"state\"",
            "ended without a suspend",
            "pid 4242",
        ],
    );
    assert!(snapshot(&d) == before, "the old archive or inputs changed");

    // The remedy: extract the archive over the package. Refused while a
    // runner runs it; afterwards the package is in step and the mark gone.
    ok(std::fs::remove_file(drafter::in_use::mark_path(state)));
    let held = ok(drafter::in_use::InUse::acquire(state));
    let args = [
        "--package-path",
        s(&pkg),
        "--devices",
        &json,
        "--extract",
        "--force",
    ];
    assert_refused(&run(BIN, &args), &args, &["in use by another run"]);
    // The runner killed: its mark stays, and the extract replaces it.
    drop(held);
    assert!(drafter::in_use::mark_path(state).exists());
    let out = run(BIN, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !drafter::in_use::mark_path(state).exists(),
        "the stale mark stayed"
    );
    let _ = std::fs::remove_dir_all(&d);
}
