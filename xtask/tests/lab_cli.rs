//! `cargo xtask lab` as a user sees it: output, exit status, cache, timeouts.
//! These boot the lab on the host (QEMU/TCG), so they run in the host suite.

use std::process::{Command, Output};
use std::time::Instant;

fn lab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("lab")
        .args(args)
        .output()
        .expect("running xtask")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One test, run in sequence, so that only one lab VM runs at a time.
#[test]
fn xtask_lab_runs_commands_and_returns_their_status() {
    // Warm the cache (may download on a fresh machine).
    let out = lab(&["--", "uname", "-r"]);
    let release = text(&out.stdout).trim().to_string();
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(
        release.starts_with("6.") && release.ends_with("-amd64") && !release.contains("cloud"),
        "uname -r in the lab printed {release:?}"
    );
    let host = text(&Command::new("uname").arg("-r").output().unwrap().stdout);
    assert_ne!(
        release,
        host.trim(),
        "uname ran on the host, not in the lab"
    );

    let out = lab(&["--", "false"]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", text(&out.stderr));

    let out = lab(&["--", "sh", "-c", "echo to-out; echo to-err >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "to-out\n");
    assert!(text(&out.stderr).contains("to-err\n"));

    // The working directory is the caller's, and the workspace is writable.
    let marker = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("lab-write-test-{}", std::process::id()));
    let script = format!("pwd; echo hi > '{}'", marker.display());
    let out = lab(&["--", "sh", "-c", &script]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(text(&out.stdout).trim(), cwd.to_string_lossy());
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "hi\n");
    std::fs::remove_file(&marker).unwrap();

    // A lab whose own kernel reports a long soft lockup is stopped at once
    // (the command would otherwise sleep for 10 minutes and exit 0).
    let fake = "echo '<0>watchdog: BUG: soft lockup - CPU#1 stuck for 999s! [lab-cli-test]' \
                > /dev/kmsg; sleep 600";
    let out = lab(&["--", "sh", "-c", fake]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "stderr: {err}");
    assert!(
        err.contains("the lab's own kernel failed") && err.contains("stuck for 999s"),
        "stderr: {err}"
    );

    // A second run downloads nothing: every artifact is a cache hit.
    let t = Instant::now();
    let out = lab(&["--", "true"]);
    let secs = t.elapsed().as_secs_f64();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {err}");
    assert!(err.contains("lab: cache hit"), "stderr: {err}");
    assert!(!err.contains("downloading"), "stderr: {err}");
    eprintln!("cached `cargo xtask lab -- true` took {secs:.1} s");
}

#[test]
fn xtask_lab_that_does_not_come_up_in_time_fails_clearly() {
    let out = lab(&["--boot-timeout", "0", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(err.contains("did not come up within"), "stderr: {err}");
}

#[test]
fn xtask_lab_without_a_command_is_a_usage_error() {
    let out = lab(&[]);
    assert_ne!(out.status.code(), Some(0));
}
