//! Helpers shared by the CLI tests: run a binary and assert it failed the
//! way drafter's binaries fail (exit 1, one stderr line, no panic).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Panics with the error's text: tests only.
pub fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// A fresh scratch directory for test `name` of binary `bin`.
pub fn scratch(bin: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("{bin}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    ok(std::fs::create_dir_all(&d));
    d
}

/// Runs `bin` with `args` (no RUST_LOG) and returns its output.
pub fn run(bin: &str, args: &[&str]) -> Output {
    ok(Command::new(bin).args(args).env_remove("RUST_LOG").output())
}

/// Asserts `out` is a refusal: exit 1, no panic, exactly one stderr line
/// containing every `want`.
pub fn assert_refused(out: &Output, args: &[&str], want: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    for w in want {
        assert!(err.contains(w), "{args:?}: expected {w:?} in {err:?}");
    }
}

/// Every file under `dir` with its content (directories as `<dir>`).
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

/// Path as `&str` for command arguments.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}
