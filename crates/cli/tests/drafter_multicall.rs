//! `drafter <name>` is `drafter-<name>`: the same help and long flags, the
//! same one-line errors and exit codes, and real work through the
//! multi-call binary; `drafter` without a known subcommand is a usage error.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};

use common::{ok, s, scratch};

const DRAFTER: &str = env!("CARGO_BIN_EXE_drafter");

/// Every host-side command; `drafter blueprint` also has subcommands.
const COMMANDS: &[&str] = &[
    "blueprint",
    "nat",
    "forwarder",
    "snapshotter",
    "packager",
    "runner",
    "registry",
    "peer",
    "terminator",
    "vmm",
];

/// `drafter-<name>`, next to `drafter` (drafter-blueprint comes from its own
/// package: `cargo test --workspace` builds it).
fn single(name: &str) -> PathBuf {
    let dir = PathBuf::from(DRAFTER)
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let path = dir.join(format!("drafter-{name}"));
    assert!(
        path.is_file(),
        "{} is missing: build the workspace (`cargo build --workspace`)",
        path.display()
    );
    path
}

fn output(bin: &PathBuf, args: &[&str]) -> Output {
    ok(Command::new(bin)
        .args(args)
        .env_remove("RUST_LOG")
        .env("DRAFTER_SECRET", "test-secret")
        .output())
}

fn multi(sub: &str, args: &[&str]) -> Output {
    let mut all = vec![sub];
    all.extend_from_slice(args);
    output(&PathBuf::from(DRAFTER), &all)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The long flags an option list in `help` names (`--help` included).
fn long_flags(help: &str) -> BTreeSet<String> {
    help.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| {
            let at = l.find("--")?;
            let flag: String = l[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            Some(flag)
        })
        .collect()
}

#[test]
fn every_subcommand_has_the_help_and_long_flags_of_its_binary() {
    let mut cases: Vec<(String, Vec<&str>)> = COMMANDS
        .iter()
        .map(|c| (c.to_string(), vec!["--help"]))
        .collect();
    cases.push(("blueprint".into(), vec!["os", "--help"]));
    cases.push(("blueprint".into(), vec!["oci", "--help"]));
    for (name, args) in cases {
        let one = output(&single(&name), &args);
        let via = multi(&name, &args);
        assert!(one.status.success(), "drafter-{name} {args:?}");
        assert!(via.status.success(), "drafter {name} {args:?}");
        let (one, via) = (text(&one.stdout), text(&via.stdout));
        let flags = long_flags(&one);
        assert!(
            flags.contains("--help") && flags.len() > 1,
            "drafter-{name} {args:?}: {flags:?}"
        );
        assert_eq!(long_flags(&via), flags, "drafter {name} {args:?}");
        // Only the usage line names the command differently.
        let usage = |t: &str, prog: &str| t.replace(&format!("Usage: {prog}"), "Usage: PROG");
        assert_eq!(
            usage(&via, &format!("drafter {name}")),
            usage(&one, &format!("drafter-{name}")),
            "drafter {name} {args:?}"
        );
    }
    // The reference's peer flags, to be sure the sets compared are real.
    let peer = long_flags(&text(&multi("peer", &["--help"]).stdout));
    for f in [
        "--raddr",
        "--laddr",
        "--devices",
        "--resume-timeout",
        "--uid",
    ] {
        assert!(peer.contains(f), "drafter peer --help lacks {f}");
    }
}

#[test]
fn bad_input_fails_the_same_way() {
    let d = scratch("drafter-multicall", "bad");
    let cfg = d.join("vm.json");
    ok(std::fs::write(&cfg, r#"{"kernel":"/nonexistent"}"#));
    let work = d.join("work");
    let devices_args = [
        "--config",
        s(&cfg),
        "--devices",
        "[{\"name\":",
        "--work-dir",
        s(&work),
    ];
    let cases: [(&str, &[&str], &str); 3] = [
        ("peer", &devices_args, "invalid devices configuration"),
        ("peer", &["--work-dir", s(&work)], "nothing to run"),
        ("packager", &["--devices", "{not json"], "devices"),
    ];
    for (name, args, want) in cases {
        let one = output(&single(name), args);
        let via = multi(name, args);
        let err = text(&one.stderr);
        assert_eq!(one.status.code(), Some(1), "drafter-{name} {args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
        assert!(err.contains(want), "drafter-{name} {args:?}: {err}");
        assert_eq!(
            via.status.code(),
            one.status.code(),
            "drafter {name} {args:?}"
        );
        assert_eq!(text(&via.stderr), err, "drafter {name} {args:?}");
        assert_eq!(
            text(&via.stdout),
            text(&one.stdout),
            "drafter {name} {args:?}"
        );
    }
    // A flag the command does not know: clap's usage error, status 2, both ways.
    for name in ["peer", "nat"] {
        let one = output(&single(name), &["--no-such-flag"]);
        let via = multi(name, &["--no-such-flag"]);
        assert_eq!(one.status.code(), Some(2), "drafter-{name}");
        assert_eq!(via.status.code(), Some(2), "drafter {name}");
        let first = |o: &Output| {
            text(&o.stderr)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(first(&via), first(&one), "drafter {name}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn no_or_unknown_subcommand_is_a_usage_error() {
    let drafter = PathBuf::from(DRAFTER);
    for args in [&[][..], &["bogus"], &["agent"], &["--no-such-flag"]] {
        let out = output(&drafter, args);
        assert_eq!(out.status.code(), Some(2), "drafter {args:?}");
        let err = text(&out.stderr);
        assert!(err.contains("Usage: drafter"), "drafter {args:?}: {err}");
        assert!(out.stdout.is_empty(), "drafter {args:?}");
    }
    let help = output(&drafter, &["--help"]);
    assert!(help.status.success());
    let help = text(&help.stdout);
    for c in COMMANDS {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(c)),
            "drafter --help lacks {c}: {help}"
        );
    }
}

#[test]
fn packager_archives_and_extracts_through_drafter() {
    let d = scratch("drafter-multicall", "packager");
    let inp = d.join("in");
    ok(std::fs::create_dir_all(&inp));
    let state = inp.join("state.bin");
    let disk = inp.join("disk.ext4");
    let state_bytes: Vec<u8> = (0..70_001u32).map(|i| (i * 7 % 251) as u8).collect();
    let disk_bytes: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 13 % 241) as u8).collect();
    ok(std::fs::write(&state, &state_bytes));
    ok(std::fs::write(&disk, &disk_bytes));
    let pkg = d.join("app.tar.zst");
    let json = |st: &std::path::Path, dk: &std::path::Path| {
        serde_json::json!([{ "name": "state", "path": st }, { "name": "disk", "path": dk }])
            .to_string()
    };
    let out = multi(
        "packager",
        &["--package-path", s(&pkg), "--devices", &json(&state, &disk)],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(pkg.is_file());
    let outd = d.join("out");
    ok(std::fs::create_dir_all(&outd));
    let (st2, dk2) = (outd.join("state"), outd.join("disk"));
    let out = multi(
        "packager",
        &[
            "--package-path",
            s(&pkg),
            "--devices",
            &json(&st2, &dk2),
            "--extract",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(ok(std::fs::read(&st2)) == state_bytes, "state differs");
    assert!(ok(std::fs::read(&dk2)) == disk_bytes, "disk differs");
    // Extracting again without --force is refused, as by drafter-packager.
    let args = [
        "--package-path",
        s(&pkg),
        "--devices",
        &json(&st2, &dk2),
        "--extract",
    ];
    let via = multi("packager", &args);
    let one = output(&single("packager"), &args);
    assert_eq!(via.status.code(), Some(1));
    assert_eq!(text(&via.stderr), text(&one.stderr));
    let _ = std::fs::remove_dir_all(&d);
}
