//! Every kind of bad input gives a one-line error naming the problem (and
//! the device), changes nothing already on disk and leaves no `.partial`.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use common::{assert_no_partials, craft, fixture, manifest_for, ok, random_bytes, snapshot};
use drafter_package::{archive, extract, no_progress, read_manifest};

/// A package of the fixture in `dir`, plus existing outputs in `dir/out`
/// for every device (so a failed extract with force could destroy them).
/// Device names with their files.
type Devices = Vec<(String, PathBuf)>;

/// Archive entries (path, data) with the words the error must contain.
type Case<'a> = (Vec<(&'a str, &'a [u8])>, Vec<&'a str>);

fn setup(dir: &Path) -> (PathBuf, Devices, Devices) {
    let devices = fixture(&dir.join("in"));
    let package = dir.join("app.tar.zst");
    ok(archive(&package, &devices, &mut no_progress));
    let out = dir.join("out");
    ok(std::fs::create_dir_all(&out));
    let outputs: Vec<(String, PathBuf)> = devices
        .iter()
        .map(|(n, _)| {
            let p = out.join(n);
            ok(std::fs::write(&p, format!("old {n}")));
            (n.clone(), p)
        })
        .collect();
    (package, devices, outputs)
}

/// Extracts `outputs` (with force) from `package`, expecting an error that
/// contains every `want`, a single line, and no change under `dir`.
fn extract_fails(dir: &Path, package: &Path, outputs: &[(String, PathBuf)], want: &[&str]) {
    let before = snapshot(dir);
    let e = extract(package, outputs, true, &mut no_progress)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_else(|| panic!("extract of {} succeeded", package.display()));
    assert_eq!(e.lines().count(), 1, "{e}");
    for w in want {
        assert!(e.contains(w), "expected {w:?} in {e:?}");
    }
    assert!(snapshot(dir) == before, "files changed by: {e}");
    assert_no_partials(dir);
}

fn error_text<T>(r: Result<T, drafter_package::PackageError>) -> String {
    r.err().map(|e| e.to_string()).unwrap_or_default()
}

#[test]
fn invalid_or_duplicate_names_are_refused_before_anything_is_written() {
    let dir = ok(tempfile::tempdir());
    let devices = fixture(&dir.path().join("in"));
    let package = dir.path().join("app.tar.zst");
    ok(std::fs::write(&package, b"existing package"));
    let disk = devices[3].1.clone();
    for (name, want) in [
        ("", "it is empty"),
        ("a/b", "'/'"),
        ("manifest.json", "reserved"),
        ("..", "path component"),
        ("with space", "' '"),
    ] {
        let before = snapshot(dir.path());
        let e = error_text(archive(&package, &[(name, &disk)], &mut no_progress));
        assert!(
            e.contains("invalid device name") && e.contains(want),
            "{name:?}: {e}"
        );
        assert!(snapshot(dir.path()) == before);
        let e = error_text(extract(&package, &[(name, &disk)], true, &mut no_progress));
        assert!(e.contains("invalid device name"), "{name:?}: {e}");
    }
    let e = error_text(archive(
        &package,
        &[("disk", &disk), ("disk", &disk)],
        &mut no_progress,
    ));
    assert!(e.contains("\"disk\" is given twice"), "{e}");
    let none: [(&str, &Path); 0] = [];
    assert!(error_text(archive(&package, &none, &mut no_progress)).contains("no devices"));
    assert_eq!(ok(std::fs::read(&package)), b"existing package");
    assert_no_partials(dir.path());
}

#[test]
fn a_missing_input_keeps_the_existing_package() {
    let dir = ok(tempfile::tempdir());
    let (package, mut devices, _) = setup(dir.path());
    devices.push(("oci".into(), dir.path().join("in").join("nope.ext4")));
    let before = snapshot(dir.path());
    let e = error_text(archive(&package, &devices, &mut no_progress));
    assert!(
        e.contains("cannot read device \"oci\"") && e.contains("nope.ext4"),
        "{e}"
    );
    assert!(snapshot(dir.path()) == before);
    assert_no_partials(dir.path());
    // A directory is not a device file either.
    let e = error_text(archive(&package, &[("disk", dir.path())], &mut no_progress));
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn a_device_the_package_lacks_is_named_with_what_it_has() {
    let dir = ok(tempfile::tempdir());
    let (package, _, _) = setup(dir.path());
    let out = dir.path().join("new").join("kernel");
    let want = [("kernel".to_owned(), out.clone())];
    extract_fails(
        dir.path(),
        &package,
        &want,
        &[
            "has no device \"kernel\"",
            "it has: state, memory, config, disk",
        ],
    );
    assert!(!dir.path().join("new").exists());
}

#[test]
fn truncated_packages_are_refused() {
    let dir = ok(tempfile::tempdir());
    let (package, _, outputs) = setup(dir.path());
    let bytes = ok(std::fs::read(&package));
    let len = bytes.len();
    for cut in [0, 10, 200, len / 4, len / 2, len - 100, len - 1] {
        ok(std::fs::write(&package, &bytes[..cut]));
        let want: &[&str] = &["truncated", "app.tar.zst"];
        extract_fails(dir.path(), &package, &outputs, want);
        // New outputs in a new directory: not even the directory stays.
        let fresh: Vec<(String, PathBuf)> = outputs
            .iter()
            .map(|(n, _)| (n.clone(), dir.path().join("fresh").join(n)))
            .collect();
        extract_fails(dir.path(), &package, &fresh, want);
        assert!(!dir.path().join("fresh").exists());
    }
    // A device cut short names the device.
    ok(std::fs::write(&package, &bytes[..len / 2]));
    let e = error_text(extract(&package, &outputs, true, &mut no_progress));
    assert!(e.contains("(in device \""), "{e}");
}

#[test]
fn flipped_bytes_are_refused() {
    let dir = ok(tempfile::tempdir());
    let (package, _, outputs) = setup(dir.path());
    let bytes = ok(std::fs::read(&package));
    let len = bytes.len();
    for at in [len / 4, len / 2, 3 * len / 4, len - 2] {
        let mut b = bytes.clone();
        b[at] ^= 0x10;
        ok(std::fs::write(&package, &b));
        extract_fails(dir.path(), &package, &outputs, &["corrupt", "app.tar.zst"]);
    }
    // A flipped byte inside the disk's data, in a valid zstd stream: only
    // the blake3 check can see it, and it names the device.
    let mut tar = Vec::new();
    ok(ok(zstd::Decoder::new(&bytes[..])).read_to_end(&mut tar));
    let needle = &random_bytes(4, 64)[..];
    let at = tar.windows(64).position(|w| w == needle);
    let at = at.unwrap_or_else(|| panic!("disk data not found"));
    tar[at + 1000] ^= 1;
    let mut enc = ok(zstd::Encoder::new(ok(std::fs::File::create(&package)), 1));
    ok(enc.write_all(&tar));
    ok(ok(enc.finish()).flush());
    extract_fails(
        dir.path(),
        &package,
        &outputs,
        &["corrupt", "device \"disk\" has blake3", "the manifest says"],
    );
}

#[test]
fn manifest_problems_are_named() {
    let dir = ok(tempfile::tempdir());
    let (package, _, outputs) = setup(dir.path());
    let disk_out = [outputs[3].clone()];
    let data = b"disk data".to_vec();
    let good = manifest_for(&data, 1);
    let v2 = manifest_for(&data, 2);
    let cases: Vec<Case> = vec![
        (
            vec![("devices/disk", &data[..])],
            vec!["no manifest.json", "first entry is \"devices/disk\""],
        ),
        (
            vec![
                ("devices/disk", &data[..]),
                ("manifest.json", good.as_bytes()),
            ],
            vec!["manifest.json is not the first entry", "devices/disk"],
        ),
        (
            vec![
                ("manifest.json", b"{\"formatVersion\": 1, "),
                ("devices/disk", &data[..]),
            ],
            vec!["malformed manifest.json", "EOF"],
        ),
        (
            vec![("manifest.json", b"[1, 2]"), ("devices/disk", &data[..])],
            vec!["malformed manifest.json"],
        ),
        (
            vec![
                ("manifest.json", v2.as_bytes()),
                ("devices/disk", &data[..]),
            ],
            vec!["unsupported formatVersion 2"],
        ),
        (
            vec![("manifest.json", good.as_bytes())],
            vec!["corrupt", "\"disk\"", "ends without this device"],
        ),
        (
            vec![
                ("manifest.json", good.as_bytes()),
                ("devices/disk", b"disk datA"),
            ],
            vec!["corrupt", "device \"disk\" has blake3"],
        ),
        (
            vec![
                ("manifest.json", good.as_bytes()),
                ("devices/disk", b"disk"),
            ],
            vec![
                "corrupt",
                "device \"disk\" holds 4 bytes, the manifest says 9",
            ],
        ),
    ];
    for (entries, want) in cases {
        craft(&package, &entries);
        extract_fails(dir.path(), &package, &disk_out, &want);
    }
    // read_manifest reports the same manifest problems.
    craft(
        &package,
        &[("manifest.json", manifest_for(&data, 2).as_bytes())],
    );
    assert!(error_text(read_manifest(&package)).contains("unsupported formatVersion 2"));
    // Not zstd at all, and not there at all.
    ok(std::fs::write(&package, random_bytes(9, 4096)));
    extract_fails(dir.path(), &package, &disk_out, &["corrupt"]);
    let missing = dir.path().join("missing.tar.zst");
    extract_fails(
        dir.path(),
        &missing,
        &disk_out,
        &["cannot open package", "missing.tar.zst"],
    );
}
