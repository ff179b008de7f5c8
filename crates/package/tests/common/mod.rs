//! Helpers shared by the package tests: fixtures, crafted archives, and
//! snapshots of a directory to prove a failed call changed nothing.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
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

/// Panics with the error's text: tests only.
pub fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// A 64 MiB sparse file: zeros with a few random islands (one unaligned)
/// and a last non-zero byte.
pub fn sparse_memory(path: &Path) {
    let f = ok(File::create(path));
    ok(f.set_len(64 << 20));
    ok(f.write_all_at(&random_bytes(1, 300_000), 1 << 20));
    ok(f.write_all_at(&random_bytes(2, 5000), (33 << 20) + 123));
    ok(f.write_all_at(&[9], (64 << 20) - 1));
}

/// Device files for a package in `dir`: state (random, odd size), memory
/// (sparse 64 MiB), config (empty) and disk (random 3 MiB + 1).
pub fn fixture(dir: &Path) -> Vec<(String, PathBuf)> {
    ok(std::fs::create_dir_all(dir));
    let state = dir.join("state.bin");
    ok(std::fs::write(&state, random_bytes(3, 100_003)));
    let memory = dir.join("memory.bin");
    sparse_memory(&memory);
    let config = dir.join("config.json");
    ok(std::fs::write(&config, b""));
    let disk = dir.join("rootfs.ext4");
    ok(std::fs::write(&disk, random_bytes(4, (3 << 20) + 1)));
    vec![
        ("state".into(), state),
        ("memory".into(), memory),
        ("config".into(), config),
        ("disk".into(), disk),
    ]
}

/// Every file under `dir` with its content.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.insert(p.clone(), b"<dir>".to_vec());
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    out
}

/// Asserts `dir` holds no `.partial` file.
pub fn assert_no_partials(dir: &Path) {
    for p in snapshot(dir).keys() {
        assert!(
            !p.to_string_lossy().ends_with(".partial"),
            "left behind: {}",
            p.display()
        );
    }
}

/// Writes a tar + zstd archive of `entries` (path, data) as given.
pub fn craft(package: &Path, entries: &[(&str, &[u8])]) {
    let f = ok(File::create(package));
    let enc = ok(zstd::Encoder::new(f, 3));
    let mut b = tar::Builder::new(enc);
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        ok(b.append_data(&mut h, path, *data));
    }
    let enc = ok(b.into_inner());
    let mut f = ok(enc.finish());
    ok(f.flush());
}

/// A valid manifest for one device `disk` holding `data`.
pub fn manifest_for(data: &[u8], version: u32) -> String {
    format!(
        r#"{{"formatVersion":{version},"devices":[{{"name":"disk","size":{},"blake3":"{}"}}]}}"#,
        data.len(),
        blake3::hash(data).to_hex()
    )
}
