//! `cargo xtask test`: the whole suite. Formatting, clippy, the host tests, a
//! short smoke run of every fuzz target, and
//! then every `lab_` test (marked `#[ignore = "lab"]`) run inside one lab boot.
//! A test binary's `prepare_lab_` tests (also ignored) run on the host just
//! before, to build what its lab tests need: the lab has no network.

use crate::lab::{self, LabOptions};
use crate::paths::{lab_dir, workspace_root};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Which parts of the suite to run.
#[derive(Clone, Copy, Debug)]
pub struct Parts {
    /// fmt + clippy.
    pub lint: bool,
    /// Host tests (`cargo test --workspace`).
    pub host: bool,
    /// Fuzz smoke: every fuzz target over its seeds, then a few seconds.
    pub fuzz: bool,
    /// Lab tests.
    pub lab: bool,
}

fn cargo(args: &[&str]) -> Result<()> {
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(workspace_root())
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed", args.join(" "));
    }
    Ok(())
}

/// A test binary that holds lab tests, and where cargo would run it from.
struct LabBinary {
    exe: PathBuf,
    dir: PathBuf,
    tests: Vec<String>,
    /// Its `prepare_lab_*` tests: run on the host before the lab boots, to
    /// build what its lab tests need (the lab has no network).
    prepare: Vec<String>,
}

/// Last path segment of a test name (`module::name` → `name`).
fn short_name(name: &str) -> &str {
    name.rsplit("::").next().unwrap_or(name)
}

/// Builds all test targets and lists the binaries holding `lab_` tests.
fn lab_binaries(filters: &[&str]) -> Result<Vec<LabBinary>> {
    let out = Command::new(env!("CARGO"))
        .args(["test", "--workspace", "--no-run", "--message-format=json"])
        .current_dir(workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test binaries failed");
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = msg["profile"]["test"].as_bool() == Some(true);
        let (Some(exe), Some(manifest)) =
            (msg["executable"].as_str(), msg["manifest_path"].as_str())
        else {
            continue;
        };
        if !is_test {
            continue;
        }
        let list = Command::new(exe)
            .args(["--list", "--ignored", "--format", "terse"])
            .output()
            .with_context(|| format!("listing tests of {exe}"))?;
        let listed = String::from_utf8_lossy(&list.stdout);
        let names: Vec<&str> = listed
            .lines()
            .filter_map(|l| l.strip_suffix(": test"))
            .collect();
        let tests: Vec<String> = names
            .iter()
            .filter(|name| short_name(name).starts_with("lab_"))
            .filter(|name| filters.is_empty() || filters.iter().any(|f| name.contains(f)))
            .map(|name| name.to_string())
            .collect();
        let prepare = names
            .iter()
            .filter(|name| short_name(name).starts_with("prepare_lab_"))
            .map(|name| name.to_string())
            .collect();
        if !tests.is_empty() {
            let dir = PathBuf::from(manifest)
                .parent()
                .map(PathBuf::from)
                .context("manifest without folder")?;
            found.push(LabBinary {
                exe: exe.into(),
                dir,
                tests,
                prepare,
            });
        }
    }
    Ok(found)
}

/// Runs the `lab_` tests (all, or those whose name contains one of `filters`)
/// in one lab boot, one test at a time: several nested guests at once have
/// crashed the lab kernel (a stack overflow in its page-fault path under
/// QEMU's SVM emulation). Returns the number of failed binaries.
pub fn run_lab_tests(opts: &LabOptions, filters: &[&str]) -> Result<i32> {
    run_lab_tests_with(opts, filters, false)
}

/// [`run_lab_tests`], optionally showing the tests' own output as they run
/// (the demo does, so its measurements are visible).
pub fn run_lab_tests_with(opts: &LabOptions, filters: &[&str], show_output: bool) -> Result<i32> {
    // Lab tests boot the guest kernel; fetch it on the host (the lab's view of
    // the host is read-only outside the workspace and has no network).
    eprintln!(
        "xtask: guest artifacts in {}",
        crate::guest::ensure()?.display()
    );
    let bins = lab_binaries(filters)?;
    let count: usize = bins.iter().map(|b| b.tests.len()).sum();
    if count == 0 {
        bail!("no lab tests found");
    }
    eprintln!("xtask: {count} lab tests in {} binaries", bins.len());
    for b in bins.iter().filter(|b| !b.prepare.is_empty()) {
        eprintln!("xtask: preparing on the host: {}", b.prepare.join(" "));
        let status = Command::new(&b.exe)
            .args(["--ignored", "--test-threads=1", "--exact"])
            .args(&b.prepare)
            .current_dir(&b.dir)
            .status()
            .with_context(|| format!("running {}", b.exe.display()))?;
        if !status.success() {
            bail!("preparing the lab tests of {} failed", b.exe.display());
        }
    }
    let mut script = String::from("failed=0\n");
    for b in &bins {
        script.push_str(&format!(
            "cd '{}' && '{}' --ignored --test-threads=1 {}--exact {} || failed=$((failed+1))\n",
            b.dir.display(),
            b.exe.display(),
            if show_output { "--nocapture " } else { "" },
            b.tests
                .iter()
                .map(|t| format!("'{t}'"))
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    script.push_str("exit $failed\n");
    let path = lab_dir().join("lab-tests.sh");
    std::fs::create_dir_all(lab_dir())?;
    std::fs::write(&path, script)?;
    lab::run(opts, &["sh".into(), path.to_string_lossy().into_owned()])
}

/// Seconds each fuzz target runs in the suite's smoke run (after its seeds).
const FUZZ_SMOKE_SECONDS: u64 = 5;

/// Runs the chosen parts of the suite; fails on the first failing part.
pub fn run(parts: Parts, opts: &LabOptions) -> Result<i32> {
    if parts.lint {
        cargo(&["fmt", "--all", "--check"])?;
        cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])?;
    }
    if parts.host {
        cargo(&["test", "--workspace"])?;
    }
    if parts.fuzz {
        crate::fuzz::run(crate::fuzz::Build::Quick, None, FUZZ_SMOKE_SECONDS)?;
    }
    if parts.lab {
        let failed = run_lab_tests(opts, &[])?;
        if failed != 0 {
            bail!("{failed} lab test binaries failed");
        }
    }
    Ok(0)
}
