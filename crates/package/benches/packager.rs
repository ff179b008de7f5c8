//! Packager benchmark: archive and extract a ~1 GiB package (a 1 GiB memory
//! file with ~25% random data in scattered 2 MiB runs and zeros elsewhere,
//! plus a 64 MiB disk of random and zero data) with drafter-package and
//! with `tar` + `zstd -T0 -3`, median of 3 runs each. Prints figures and
//! asserts nothing. The scratch directory is `$DRAFTER_BENCH_DIR` or the
//! system temp dir.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use drafter_package::{archive, extract, no_progress, Phase, Progress};

const MIB: u64 = 1 << 20;
const RUNS: usize = 3;

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

fn fail<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| {
        eprintln!("packager bench: {e}");
        std::process::exit(1)
    })
}

/// 1 GiB memory: a quarter of its 2 MiB runs random, chosen pseudo-randomly.
fn write_memory(path: &Path) {
    let f = fail(File::create(path));
    fail(f.set_len(1024 * MIB));
    let runs = 512u64;
    let picks = random_bytes(7, runs as usize);
    for (i, p) in picks.iter().enumerate() {
        if p % 4 == 0 {
            let data = random_bytes(100 + i as u64, (2 * MIB) as usize);
            fail(f.write_all_at(&data, i as u64 * 2 * MIB));
        }
    }
}

/// 64 MiB disk: 1 MiB random, 1 MiB zeros, alternating.
fn write_disk(path: &Path) {
    let f = fail(File::create(path));
    fail(f.set_len(64 * MIB));
    for i in (0..64).step_by(2) {
        fail(f.write_all_at(&random_bytes(1000 + i, MIB as usize), i * MIB));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(mut f: impl FnMut()) -> f64 {
    let mut secs = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let t = Instant::now();
        f();
        secs.push(t.elapsed().as_secs_f64());
    }
    median(secs)
}

fn sh(script: &str) {
    let st = fail(Command::new("sh").arg("-c").arg(script).status());
    if !st.success() {
        eprintln!("packager bench: `{script}` failed: {st}");
        std::process::exit(1);
    }
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn main() {
    let base = std::env::var_os("DRAFTER_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = fail(tempfile::tempdir_in(base));
    let input = dir.path().join("in");
    fail(std::fs::create_dir_all(&input));
    let memory = input.join("memory.bin");
    let disk = input.join("disk.img");
    write_memory(&memory);
    write_disk(&disk);
    let devices = [("memory", memory.clone()), ("disk", disk.clone())];
    let bytes = size(&memory) + size(&disk);
    let mb = bytes as f64 / 1e6;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "packager bench: {:.0} MB of devices (1 GiB memory, 25% random in 2 MiB runs; 64 MiB disk), {cores} core(s), median of {RUNS}",
        mb
    );

    let ours = dir.path().join("ours.tar.zst");
    let out = dir.path().join("out-ours");
    let mut hashing = Vec::new();
    let ours_archive = time(|| {
        let t = Instant::now();
        let mut hashed = 0.0;
        fail(archive(&ours, &devices, &mut |p: Progress| {
            if p.phase == Phase::Hashing && p.done == p.total {
                hashed = t.elapsed().as_secs_f64();
            }
        }));
        hashing.push(hashed);
    });
    let hashing = median(hashing);
    let outputs = [
        ("memory", out.join("memory.bin")),
        ("disk", out.join("disk.img")),
    ];
    let ours_extract = time(|| {
        let _ = std::fs::remove_dir_all(&out);
        fail(extract(&ours, &outputs, false, &mut no_progress));
    });
    let ours_size = size(&ours);
    println!(
        "  drafter-package archive: {ours_archive:.3} s ({:.0} MB/s; hashing pass {hashing:.3} s), {} bytes (ratio {:.2}x)",
        mb / ours_archive,
        ours_size,
        bytes as f64 / ours_size as f64
    );
    println!(
        "  drafter-package extract: {ours_extract:.3} s ({:.0} MB/s), verified, sparse",
        mb / ours_extract
    );

    if !(have("tar") && have("zstd")) {
        println!("  tar + zstd: skipped (tar or zstd not installed)");
        return;
    }
    let theirs = dir.path().join("theirs.tar.zst");
    let tout = dir.path().join("out-tar");
    let (i, t, o) = (input.display(), theirs.display(), tout.display());
    let tar_archive = time(|| {
        sh(&format!(
            "tar -cf - -C '{i}' memory.bin disk.img | zstd -T0 -3 -q -f -o '{t}'"
        ))
    });
    let tar_extract = time(|| {
        sh(&format!(
            "rm -rf '{o}' && mkdir -p '{o}' && zstd -d -T0 -q -c '{t}' | tar -xf - -C '{o}'"
        ))
    });
    let tar_size = size(&theirs);
    println!(
        "  tar | zstd -T0 -3:       {tar_archive:.3} s ({:.0} MB/s), {} bytes (ratio {:.2}x)",
        mb / tar_archive,
        tar_size,
        bytes as f64 / tar_size as f64
    );
    println!(
        "  zstd -d -T0 | tar -x:    {tar_extract:.3} s ({:.0} MB/s)",
        mb / tar_extract
    );
    println!(
        "  ours/theirs: archive time {:.2}, extract time {:.2}, compressed size {:.3}",
        ours_archive / tar_archive,
        ours_extract / tar_extract,
        ours_size as f64 / tar_size as f64
    );
}
