//! A package file as a user (or a registry) hands it over: its manifest is
//! read and every device it lists is extracted (sparse, hashed, verified)
//! into a scratch directory. The first input byte picks whether the rest is
//! the `.tar.zst` file itself (odd) or a tar stream this target compresses
//! (even), so mutations reach the tar and manifest parsers, not only zstd's
//! frame checks.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use drafter_package::{extract, no_progress, read_manifest};
use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("scratch dir").keep())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let dir = scratch();
    let package = dir.join("fuzz.pkg");
    let bytes = if mode & 1 == 1 {
        rest.to_vec()
    } else {
        zstd::bulk::compress(rest, 1).expect("zstd compress")
    };
    std::fs::write(&package, bytes).expect("write package");
    let out = dir.join("out");
    let _ = std::fs::remove_dir_all(&out);
    let mut names: Vec<String> = match read_manifest(&package) {
        Ok(m) => m.devices.iter().map(|d| d.name.clone()).collect(),
        Err(_) => vec!["memory".into()],
    };
    names.truncate(8);
    let devices: Vec<(String, PathBuf)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), out.join(format!("dev{i}"))))
        .collect();
    let _ = extract(&package, &devices, false, &mut no_progress);
});
