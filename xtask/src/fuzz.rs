//! `cargo xtask fuzz`: builds the libFuzzer targets of `fuzz/` on stable
//! Rust (the coverage instrumentation cargo-fuzz would add, without its
//! sanitizer, so no nightly `-Z` flag is needed; see `fuzz/README.md`) and
//! runs one or all of them for a while, one process at a time, printing
//! executions and coverage per target. Seeds are read from `fuzz/corpus/`;
//! what the fuzzer finds goes to `fuzz/target/corpus/` (not committed) and
//! crashing inputs to `fuzz/target/artifacts/<target>/`.

use crate::paths::workspace_root;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

/// The fuzz targets, in the order `cargo xtask fuzz` runs them.
pub const TARGETS: &[&str] = &[
    "storage_frames",
    "storage_handshake",
    "guest_rpc",
    "package_archive",
    "config_json",
    "vmm_state",
    "virtio_queues",
    "oci_image",
    "oci_layer",
];

/// Extra libFuzzer options of a target (inputs larger than the default
/// 4 KiB for the archives and guest memory images).
fn target_options(target: &str) -> &'static [&'static str] {
    match target {
        "package_archive" | "oci_layer" | "oci_image" | "virtio_queues" | "vmm_state" => {
            &["-max_len=65536"]
        }
        _ => &[],
    }
}

const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// The flags cargo-fuzz passes for `cargo fuzz build -O -a --sanitizer none`,
/// in its order (so both build the same artifacts).
fn rustflags(codegen_units: u32) -> String {
    [
        "-Cpasses=sancov-module",
        "-Cllvm-args=-sanitizer-coverage-level=4",
        "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
        "-Cllvm-args=-sanitizer-coverage-pc-table",
        "-Cllvm-args=-sanitizer-coverage-trace-compares",
        "--cfg fuzzing",
        "-Cllvm-args=-simplifycfg-branch-fold-threshold=0",
        "-Cllvm-args=-sanitizer-coverage-stack-depth",
        "-Cdebug-assertions",
        &format!("-Ccodegen-units={codegen_units}"),
    ]
    .iter()
    .map(|f| format!(" {f}"))
    .collect()
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

/// How the fuzz crate is built.
#[derive(Clone, Copy, Debug)]
pub enum Build {
    /// As cargo-fuzz builds it (one codegen unit: slow to build, fastest to run).
    Full,
    /// Sixteen codegen units, `opt-level=1`, no debug info: builds in a
    /// fraction of the time, runs slower; for the smoke run of `cargo xtask
    /// test`. Artifacts go to `fuzz/target/quick` so they never replace the
    /// full build's.
    Quick,
}

impl Build {
    fn target_dir(self) -> PathBuf {
        match self {
            Build::Full => fuzz_dir().join("target"),
            Build::Quick => fuzz_dir().join("target").join("quick"),
        }
    }

    fn bin_dir(self) -> PathBuf {
        self.target_dir().join(TRIPLE).join("release")
    }
}

/// Builds every target (and the seed writer).
pub fn build(how: Build) -> Result<()> {
    let (cgu, profile): (u32, &[&str]) = match how {
        Build::Full => (1, &["profile.release.debug=\"line-tables-only\""]),
        Build::Quick => (
            16,
            &["profile.release.debug=false", "profile.release.opt-level=1"],
        ),
    };
    let started = Instant::now();
    eprintln!("xtask: building the fuzz targets ({how:?})");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--manifest-path"])
        .arg(fuzz_dir().join("Cargo.toml"))
        .args(["--target", TRIPLE, "--release", "--bins"])
        .args(profile.iter().flat_map(|p| ["--config", p]))
        .arg("--target-dir")
        .arg(how.target_dir())
        .env("RUSTFLAGS", rustflags(cgu))
        .status()
        .context("running cargo build for fuzz/")?;
    if !status.success() {
        bail!("building the fuzz targets failed");
    }
    eprintln!(
        "xtask: fuzz targets built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What one run of a target showed.
#[derive(Debug, Default)]
pub struct RunReport {
    /// Target name.
    pub target: String,
    /// Wall-clock seconds.
    pub seconds: u64,
    /// Inputs executed.
    pub executions: u64,
    /// libFuzzer's `cov:` (coverage points hit).
    pub cov: u64,
    /// libFuzzer's `ft:` (features).
    pub ft: u64,
    /// Inputs in the corpus at the end.
    pub corpus: u64,
    /// The crash (or timeout, out-of-memory) input written, if any.
    pub crash: Option<PathBuf>,
}

/// The number after `key` in `line` (`cov: 123` → 123).
fn field(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

fn parse_log(target: &str, log: &str, seconds: u64) -> RunReport {
    let mut r = RunReport {
        target: target.to_owned(),
        seconds,
        ..Default::default()
    };
    for line in log.lines() {
        if line.starts_with('#') && line.contains("cov:") {
            r.cov = field(line, "cov:").unwrap_or(r.cov);
            r.ft = field(line, "ft:").unwrap_or(r.ft);
            r.corpus = field(line, "corp:").unwrap_or(r.corpus);
            r.executions = field(line, "#").unwrap_or(r.executions);
        }
        if let Some(n) = field(line, "stat::number_of_executed_units:") {
            r.executions = n;
        }
        if let Some(path) = line
            .split("Test unit written to ")
            .nth(1)
            .map(|p| PathBuf::from(p.trim()))
        {
            r.crash = Some(path);
        }
    }
    r
}

/// Runs `target` over its committed corpus once, then fuzzes it for
/// `seconds` (0: only the corpus run).
pub fn run_target(how: Build, target: &str, seconds: u64) -> Result<RunReport> {
    let exe = how.bin_dir().join(target);
    if !exe.is_file() {
        bail!("no fuzz target {target} at {} (built?)", exe.display());
    }
    let seeds = fuzz_dir().join("corpus").join(target);
    let work = how.target_dir().join("corpus").join(target);
    let artifacts = how.target_dir().join("artifacts").join(target);
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&artifacts)?;
    let started = Instant::now();
    let mut cmd = Command::new(&exe);
    cmd.arg(format!("-artifact_prefix={}/", artifacts.display()))
        .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"])
        .args(target_options(target));
    if seconds == 0 {
        cmd.arg("-runs=0").arg(&seeds);
    } else {
        cmd.arg(format!("-max_total_time={seconds}"))
            .arg(&work)
            .arg(&seeds);
    }
    let out = cmd
        .current_dir(fuzz_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    let log = String::from_utf8_lossy(&out.stderr);
    let report = parse_log(target, &log, started.elapsed().as_secs());
    if !out.status.success() && report.crash.is_none() {
        eprintln!("{log}");
        bail!("fuzz target {target} failed ({})", out.status);
    }
    if report.crash.is_some() {
        // The panic message and the input's path, for the regression test.
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        for line in tail.iter().rev() {
            eprintln!("  {line}");
        }
    }
    Ok(report)
}

fn print_table(reports: &[RunReport]) {
    println!(
        "{:<18} {:>7} {:>12} {:>7} {:>7} {:>7}  crash",
        "target", "seconds", "executions", "cov", "ft", "corpus"
    );
    for r in reports {
        println!(
            "{:<18} {:>7} {:>12} {:>7} {:>7} {:>7}  {}",
            r.target,
            r.seconds,
            r.executions,
            r.cov,
            r.ft,
            r.corpus,
            r.crash
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "none".into())
        );
    }
}

/// `cargo xtask fuzz [TARGET] [--seconds N]`: builds, then runs `target` (or
/// every target) over its seeds and for `seconds` each. Fails if any crashed.
pub fn run(how: Build, target: Option<&str>, seconds: u64) -> Result<i32> {
    let targets: Vec<&str> = match target {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!(
            "unknown fuzz target {t:?} (targets: {})",
            TARGETS.join(", ")
        ),
        None => TARGETS.to_vec(),
    };
    build(how)?;
    let mut reports = Vec::new();
    for t in targets {
        eprintln!("xtask: fuzzing {t} for {seconds} s");
        let mut r = run_target(how, t, 0)?;
        if r.crash.is_none() && seconds > 0 {
            r = run_target(how, t, seconds)?;
        }
        reports.push(r);
    }
    print_table(&reports);
    let crashed = reports.iter().filter(|r| r.crash.is_some()).count();
    if crashed > 0 {
        bail!("{crashed} fuzz targets crashed; see the inputs above");
    }
    Ok(0)
}

/// `cargo xtask fuzz --seeds`: rewrites `fuzz/corpus/` from the real
/// encoders (the seed writer also needs /dev/kvm for the VM state seeds).
pub fn write_seeds() -> Result<i32> {
    build(Build::Full)?;
    let status = Command::new(Build::Full.bin_dir().join("seeds"))
        .arg(fuzz_dir().join("corpus"))
        .status()
        .context("running the seed writer")?;
    if !status.success() {
        bail!("the seed writer failed");
    }
    Ok(0)
}
