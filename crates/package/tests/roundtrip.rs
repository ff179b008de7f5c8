//! Archive then extract: every byte comes back, sparse files stay sparse,
//! any subset can be extracted in any order, and `force` is honoured.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use common::{assert_no_partials, fixture, ok, snapshot};
use drafter_package::{archive, extract, no_progress, read_manifest, Phase, Progress};

#[test]
fn roundtrip_restores_every_device_and_keeps_memory_sparse() {
    let dir = ok(tempfile::tempdir());
    let devices = fixture(&dir.path().join("in"));
    let package = dir.path().join("pkg").join("app.tar.zst");
    let mut events: Vec<Progress> = Vec::new();
    let report = ok(archive(&package, &devices, &mut |p| events.push(p)));

    let total: u64 = (100_003 + (64 << 20)) + (3 << 20) + 1;
    assert_eq!(report.bytes, total);
    assert!(
        report.compressed_bytes < 4 << 20,
        "{}",
        report.compressed_bytes
    );
    assert_eq!(
        std::fs::metadata(&package).map(|m| m.len()).ok(),
        Some(report.compressed_bytes)
    );
    for phase in [Phase::Hashing, Phase::Compressing] {
        let last = events.iter().rev().find(|p| p.phase == phase);
        assert_eq!(last.map(|p| (p.done, p.total)), Some((total, total)));
    }

    let manifest = ok(read_manifest(&package));
    assert_eq!(manifest, report.manifest);
    assert_eq!(manifest.format_version, 1);
    for ((name, path), entry) in devices.iter().zip(&manifest.devices) {
        let data = ok(std::fs::read(path));
        assert_eq!(&entry.name, name);
        assert_eq!(entry.size, data.len() as u64);
        assert_eq!(entry.blake3, blake3::hash(&data).to_hex().to_string());
    }

    let out = dir.path().join("out").join("nested");
    let outputs: Vec<(String, PathBuf)> = devices
        .iter()
        .map(|(n, _)| (n.clone(), out.join(format!("{n}.out"))))
        .collect();
    let mut events: Vec<Progress> = Vec::new();
    let r = ok(extract(&package, &outputs, false, &mut |p| events.push(p)));
    assert_eq!(r.bytes, total);
    assert_eq!(
        events.last().map(|p| (p.done, p.total)),
        Some((total, total))
    );
    for ((_, input), (_, output)) in devices.iter().zip(&outputs) {
        assert!(
            ok(std::fs::read(input)) == ok(std::fs::read(output)),
            "{} differs",
            output.display()
        );
    }
    let config = ok(std::fs::metadata(out.join("config.out")));
    assert_eq!(config.len(), 0);
    let memory = ok(std::fs::metadata(out.join("memory.out")));
    assert_eq!(memory.len(), 64 << 20);
    assert!(
        memory.blocks() * 512 < 4 << 20,
        "memory not written sparsely: {} blocks",
        memory.blocks()
    );
    assert_no_partials(dir.path());
}

#[test]
fn a_subset_extracts_in_reverse_order_and_nothing_else_is_written() {
    let dir = ok(tempfile::tempdir());
    let devices = fixture(&dir.path().join("in"));
    let package = dir.path().join("app.tar.zst");
    ok(archive(&package, &devices, &mut no_progress));
    let out = dir.path().join("out");
    let want = [("disk", out.join("disk")), ("state", out.join("state"))];
    let r = ok(extract(&package, &want, false, &mut no_progress));
    let names: Vec<&str> = r.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["disk", "state"]);
    assert!(ok(std::fs::read(out.join("disk"))) == ok(std::fs::read(&devices[3].1)));
    assert!(ok(std::fs::read(out.join("state"))) == ok(std::fs::read(&devices[0].1)));
    let written: Vec<PathBuf> = snapshot(&out).into_keys().collect();
    assert_eq!(written, [out.join("disk"), out.join("state")]);
}

#[test]
fn existing_outputs_need_force() {
    let dir = ok(tempfile::tempdir());
    let devices = fixture(&dir.path().join("in"));
    let package = dir.path().join("app.tar.zst");
    ok(archive(&package, &devices, &mut no_progress));
    let out = dir.path().join("out");
    ok(std::fs::create_dir_all(&out));
    ok(std::fs::write(out.join("disk"), b"keep me"));
    let want = [("state", out.join("state")), ("disk", out.join("disk"))];
    let e = extract(&package, &want, false, &mut no_progress)
        .err()
        .map(|e| e.to_string());
    let e = e.unwrap_or_default();
    assert!(
        e.contains("already exists") && e.contains("force") && e.contains("disk"),
        "{e}"
    );
    // Refused before anything was written: not even the state device.
    assert!(!out.join("state").exists());
    assert_eq!(ok(std::fs::read(out.join("disk"))), b"keep me");

    ok(extract(&package, &want, true, &mut no_progress));
    assert!(ok(std::fs::read(out.join("disk"))) == ok(std::fs::read(&devices[3].1)));
    assert_no_partials(dir.path());
}

#[test]
fn archiving_replaces_an_existing_package() {
    let dir = ok(tempfile::tempdir());
    let devices = fixture(&dir.path().join("in"));
    let package = dir.path().join("app.tar.zst");
    ok(std::fs::write(&package, b"old package"));
    ok(archive(&package, &devices[..1], &mut no_progress));
    let m = ok(read_manifest(&package));
    assert_eq!(m.names(), "state");
    assert_no_partials(dir.path());
}
