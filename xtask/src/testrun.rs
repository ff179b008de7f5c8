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
    let _ = std::fs::remove_file(lab_dir().join(RETRIED_FILE));
    let all: Vec<usize> = (0..bins.len()).collect();
    let (mut failed, unfinished) = match lab_attempt(opts, &bins, &all, show_output)? {
        Attempt::Done(f) => (f, Vec::new()),
        Attempt::KernelFailed {
            failed,
            unfinished,
            why,
        } => {
            eprintln!(
                "xtask: {why}; running the {} unfinished lab test binaries again in a fresh lab boot",
                unfinished.len()
            );
            (failed, unfinished)
        }
    };
    if !unfinished.is_empty() {
        match lab_attempt(opts, &bins, &unfinished, show_output)? {
            Attempt::Done(f) => failed += f,
            Attempt::KernelFailed { why, .. } => bail!("{why} again, in the retry"),
        }
    }
    report_retried(&std::fs::read_to_string(lab_dir().join(RETRIED_FILE)).unwrap_or_default());
    Ok(failed)
}

/// Shell for the lab script: `reap_strays TEST` kills every user process
/// that was not there when the script began (a VM, peer or NAT a failed or
/// hung test left behind keeps a lab CPU busy and slows every later test
/// into its timeout), naming them. Kernel threads have no command line and
/// are skipped.
const REAP_STRAYS: &str = r#"KEEP=" $(ls /proc | grep -E '^[0-9]+$' | tr '\n' ' ') "
reap_strays() {
  left=''
  for p in $(ls /proc | grep -E '^[0-9]+$'); do
    case "$KEEP" in *" $p "*) continue ;; esac
    [ "$p" = "$$" ] && continue
    name=$({ tr '\0' ' ' < "/proc/$p/cmdline"; } 2>/dev/null | cut -c1-80)
    [ -n "$name" ] || continue
    case "$name" in "sh "*lab-tests.sh*|ls*|grep*|tr*|cut*) continue ;; esac
    kill -9 "$p" 2>/dev/null && left="$left [$p $name]"
  done
  [ -n "$left" ] && echo "xtask: killed processes $1 left behind:$left" >&2
  return 0
}
"#;

/// Where the lab script lists the tests it ran a second time.
const RETRIED_FILE: &str = "lab-tests.retried";

/// `kind rc test` lines of [`RETRIED_FILE`]: tests that hung or failed once
/// and were run again, with the second run's exit status.
fn parse_retried(text: &str) -> Vec<(&str, i32, &str)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ' ');
            Some((it.next()?, it.next()?.parse().ok()?, it.next()?))
        })
        .collect()
}

/// Names every lab test that needed a second run, at the end of the output
/// where it cannot be missed: an intermittent failure passes the suite but
/// is never silent.
fn report_retried(text: &str) {
    for (kind, rc, test) in parse_retried(text) {
        let outcome = if rc == 0 {
            "passed on the second run: INTERMITTENT"
        } else {
            "failed again"
        };
        eprintln!("xtask: lab test {test} {kind} on its first run and {outcome}");
    }
}

/// How long one lab test may run before it counts as hung (the slowest,
/// the registry chain, took 7–11 min in CI labs on QEMU 7.2 and about
/// 2 min on QEMU 10), so one hang does not hold every later test up to the
/// lab's timeout.
const LAB_TEST_TIMEOUT_SECS: u64 = 900;

/// The outcome of one lab boot running some lab test binaries.
enum Attempt {
    /// Every binary ran; this many failed.
    Done(i32),
    /// The lab's own kernel failed before every binary had finished.
    KernelFailed {
        /// Binaries that finished and failed.
        failed: i32,
        /// Binaries that had not finished (indices into the list).
        unfinished: Vec<usize>,
        /// What the lab's console showed.
        why: String,
    },
}

/// Runs the binaries `which` (indices into `bins`) in one lab boot, one
/// test per process, each bounded by [`LAB_TEST_TIMEOUT_SECS`] and run
/// once more if it hung or failed (listed in [`RETRIED_FILE`]); records
/// each binary's outcome in a results file, so a lab kernel failure tells
/// which ones finished.
fn lab_attempt(
    opts: &LabOptions,
    bins: &[LabBinary],
    which: &[usize],
    show_output: bool,
) -> Result<Attempt> {
    std::fs::create_dir_all(lab_dir())?;
    let results = lab_dir().join("lab-tests.results");
    let _ = std::fs::remove_file(&results);
    let retried = lab_dir().join(RETRIED_FILE);
    let mut script = String::from(REAP_STRAYS);
    script.push_str("failed=0\n");
    for &i in which {
        let b = &bins[i];
        script.push_str("brc=0\n");
        for t in &b.tests {
            // One process per test (a VMM process runs one VM), bounded; a
            // test that hangs is named and run once more, so one
            // intermittent hang neither holds the suite nor hides.
            let run = format!(
                "cd '{}' && timeout -k 10 {LAB_TEST_TIMEOUT_SECS} '{}' --ignored --test-threads=1 {}--exact '{t}'; rc=$?\n",
                b.dir.display(),
                b.exe.display(),
                if show_output { "--nocapture " } else { "" },
            );
            let run = format!("{run}reap_strays '{t}'\n");
            script.push_str(&run);
            script.push_str(&format!(
                "kind=''\n\
                 if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then \
                 kind=hung; echo 'xtask: LAB TEST HUNG: {t} gave no result in {LAB_TEST_TIMEOUT_SECS} s; running it once more' >&2\n\
                 elif [ $rc -ne 0 ]; then \
                 kind=failed; echo \"xtask: LAB TEST FAILED: {t} (exit $rc); running it once more\" >&2\n\
                 fi\n\
                 if [ -n \"$kind\" ]; then\n\
                 {run}\
                 echo \"$kind $rc {t}\" >> '{retried}'\n\
                 fi\n\
                 [ $rc -ne 0 ] && brc=1\n",
                retried = retried.display(),
            ));
        }
        script.push_str(&format!(
            "[ $brc -ne 0 ] && failed=$((failed+1))\n\
             echo \"{i} $brc\" >> '{}'\n",
            results.display(),
        ));
    }
    script.push_str("exit $failed\n");
    let path = lab_dir().join("lab-tests.sh");
    std::fs::write(&path, script)?;
    match lab::run(opts, &["sh".into(), path.to_string_lossy().into_owned()]) {
        Ok(failed) => Ok(Attempt::Done(failed)),
        Err(e) => {
            let Some(k) = e.downcast_ref::<lab::LabKernelFailed>() else {
                return Err(e);
            };
            let done = parse_results(&std::fs::read_to_string(&results).unwrap_or_default());
            let failed = done.iter().filter(|(_, rc)| *rc != 0).count() as i32;
            let unfinished = which
                .iter()
                .copied()
                .filter(|i| !done.iter().any(|(d, _)| d == i))
                .collect();
            Ok(Attempt::KernelFailed {
                failed,
                unfinished,
                why: k.to_string(),
            })
        }
    }
}

/// `index status` lines written by the lab script; torn lines are skipped.
fn parse_results(text: &str) -> Vec<(usize, i32)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retried_lines_carry_kind_second_status_and_name() {
        assert_eq!(
            parse_retried("hung 0 lab_a\nfailed 101 lab_b\nfailed x lab_c\nhung"),
            vec![("hung", 0, "lab_a"), ("failed", 101, "lab_b")]
        );
    }

    #[test]
    fn reap_strays_kills_what_a_test_left_and_keeps_what_was_there() {
        let script = format!(
            "{REAP_STRAYS}sleep 300 & stray=$!\n\
             reap_strays demo\n\
             wait $stray; echo \"stray $?\"\n\
             kill -0 $$ && echo script alive\n"
        );
        // In a PID namespace of its own (with its own /proc), as the lab's
        // script is alone in the lab: on the host, reaping would reach
        // whatever else started meanwhile.
        let out = Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "sh", "-c", &script])
            .output()
            .unwrap_or_else(|e| panic!("sh: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Killed by SIGKILL: the shell reports 128 + 9.
        assert!(stdout.contains("stray 137"), "{stdout} / {stderr}");
        assert!(stdout.contains("script alive"), "{stdout} / {stderr}");
        assert!(
            stderr.contains("killed processes demo left behind:") && stderr.contains("sleep 300"),
            "{stderr}"
        );
    }

    #[test]
    fn results_name_the_finished_binaries_and_skip_torn_lines() {
        assert_eq!(parse_results("0 0\n2 101\n3"), vec![(0, 0), (2, 101)]);
        assert!(parse_results("").is_empty());
    }
}
