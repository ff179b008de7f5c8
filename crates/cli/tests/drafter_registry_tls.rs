//! `drafter-registry`, `drafter-terminator` and a `drafter-peer` pulling
//! from a registry, over TLS, end to end on the host:
//!
//! * a registry with `--tls-dir` serves a terminator with a certificate of
//!   the same CA a package whose every device is byte-identical;
//! * a terminator whose certificate another CA issued, and a plain-TCP
//!   terminator, are refused with one line naming TLS, the registry reports
//!   each as one failed pull and serves the next client;
//! * a TLS terminator against a plain registry fails with one line (the
//!   registry's plain Hello is not TLS), it does not wait;
//! * a `drafter-peer --raddr` with TLS flags pulls the VM from a TLS
//!   registry and runs it;
//! * unusable TLS flags are refused before anything listens or dials.
//!
//! The package is a snapshot of the counting flat guest of the VMM's tests
//! with one writable drive; certificates are made at test time (rcgen).

#[path = "../../storage/tests/support/certs.rs"]
mod certs;
mod common;
#[path = "../../vmm/tests/counting_guest/mod.rs"]
mod counting_guest;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use certs::Pki;
use common::{assert_refused, ok, s, scratch};
use drafter_vmm::config::DriveConfig;
use drafter_vmm::VmConfig;
use serde_json::{json, Value};

const REGISTRY: &str = env!("CARGO_BIN_EXE_drafter-registry");
const TERMINATOR: &str = env!("CARGO_BIN_EXE_drafter-terminator");
const PEER: &str = env!("CARGO_BIN_EXE_drafter-peer");
const SECRET: &str = "registry-tls-secret";

/// A package in `dir/pkg`: state, memory and a writable drive `disk`.
fn package(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let pkg = dir.join("pkg");
    ok(std::fs::create_dir_all(&pkg));
    let disk = pkg.join("disk.img");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
    ok(std::fs::write(&disk, data));
    let mut c = VmConfig::new("/nonexistent-flat-program");
    c.memory_mib = 16;
    c.serial.stdout = false;
    c.drives = vec![DriveConfig {
        name: "disk".into(),
        path: disk.clone(),
        read_only: false,
    }];
    let (state, memory) = counting_guest::snapshot_counting_vm(c, &pkg);
    vec![("state", state), ("memory", memory), ("disk", disk)]
}

fn registry_devices(devs: &[(&str, PathBuf)]) -> String {
    let list: Vec<Value> = devs
        .iter()
        .map(|(n, p)| json!({"name": n, "input": p, "blockSize": 65536}))
        .collect();
    Value::Array(list).to_string()
}

fn terminator_devices(out: &Path) -> String {
    let list: Vec<Value> = ["state", "memory", "disk"]
        .iter()
        .map(|n| json!({"name": n, "output": out.join(n)}))
        .collect();
    Value::Array(list).to_string()
}

/// Waits for `child` with a deadline far above any handshake timeout (a
/// hang fails the test instead of stalling it); returns its output.
fn wait_bounded(mut child: Child, what: &str) -> Output {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if ok(child.try_wait()).is_some() {
            return ok(child.wait_with_output());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not end");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `drafter-terminator` (secret in the environment) to its end.
fn terminator(args: &[&str]) -> Output {
    let child = ok(Command::new(TERMINATOR)
        .args(args)
        .args(["--link-timeout", "5"])
        .env("DRAFTER_SECRET", SECRET)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn());
    wait_bounded(child, "drafter-terminator")
}

/// A running `drafter-registry --json`, killed when dropped.
struct RegistryProcess {
    child: Child,
    addr: String,
    events: Receiver<Value>,
}

impl RegistryProcess {
    fn start(devices: &str, extra: &[&str]) -> Self {
        let mut child = ok(Command::new(REGISTRY)
            .args(["--json", "--laddr", "127.0.0.1:0", "--devices", devices])
            .args(["--link-timeout", "5"])
            .args(extra)
            .env("DRAFTER_SECRET", SECRET)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn());
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let (tx, events) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v: Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let mut r = RegistryProcess {
            child,
            addr: String::new(),
            events,
        };
        let listening = r.next();
        assert_eq!(listening["event"], "listening", "{listening}");
        r.addr = listening["addr"].as_str().unwrap_or_default().to_owned();
        r
    }

    /// The next event; panics if none comes within a minute.
    fn next(&self) -> Value {
        self.events
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("no event from drafter-registry: {e}"))
    }

    /// The registry has not exited.
    fn assert_running(&mut self) {
        assert!(
            ok(self.child.try_wait()).is_none(),
            "drafter-registry exited"
        );
    }
}

impl Drop for RegistryProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The one error line of a refused command (exit 1).
fn refusal(out: &Output, args: &[&str], want: &[&str]) -> String {
    assert_refused(out, args, want);
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

/// Every package device written under `out` equals its original.
fn assert_identical(devs: &[(&str, PathBuf)], out: &Path) {
    for (name, path) in devs {
        let (got, want) = (std::fs::read(out.join(name)).ok(), std::fs::read(path).ok());
        assert!(want.is_some(), "{name}: the original is unreadable");
        assert!(got == want, "{name} is not byte-identical");
    }
}

#[test]
fn a_tls_registry_serves_its_ca_and_refuses_foreign_and_plain_clients() {
    let dir = scratch("drafter-registry-tls", "e2e");
    let devs = package(&dir);
    let pki = Pki::new("registry CA");
    let other = Pki::new("other CA");
    let (reg_tls, term_tls, rogue_tls) = (dir.join("reg"), dir.join("term"), dir.join("rogue"));
    pki.issue(&["127.0.0.1"]).write_dir(&reg_tls);
    pki.issue(&["terminator"]).write_dir(&term_tls);
    other
        .issue(&["127.0.0.1"])
        .trusting(&pki.ca_pem())
        .write_dir(&rogue_tls);
    let mut registry =
        RegistryProcess::start(&registry_devices(&devs), &["--tls-dir", s(&reg_tls)]);
    let addr = registry.addr.clone();

    // (b) A terminator whose certificate another CA issued.
    let rogue_out = dir.join("rogue-out");
    let args = [
        "--raddr",
        &addr,
        "--devices",
        &terminator_devices(&rogue_out),
        "--tls-dir",
        s(&rogue_tls),
    ];
    let err = refusal(&terminator(&args), &args, &["TLS"]);
    eprintln!("foreign CA: {err}");
    let failed = registry.next();
    assert_eq!(failed["event"], "failed", "{failed}");
    let why = failed["error"].as_str().unwrap_or_default();
    assert!(why.contains("peer certificate refused"), "{why}");
    assert!(!why.contains('\n'), "{why}");
    assert!(!rogue_out.exists(), "a refused pull wrote files");
    registry.assert_running();

    // (c) A plain-TCP terminator.
    let plain_out = dir.join("plain-out");
    let args = [
        "--raddr",
        &addr,
        "--devices",
        &terminator_devices(&plain_out),
    ];
    let err = refusal(&terminator(&args), &args, &["the peer speaks TLS"]);
    eprintln!("plain client: {err}");
    let failed = registry.next();
    assert_eq!(failed["event"], "failed", "{failed}");
    let why = failed["error"].as_str().unwrap_or_default();
    assert!(why.contains("does not speak TLS"), "{why}");
    assert!(!plain_out.exists(), "a refused pull wrote files");
    registry.assert_running();

    // (a) A terminator of the same CA gets the package, byte for byte.
    let out = dir.join("out");
    let args = [
        "--json",
        "--raddr",
        &addr,
        "--devices",
        &terminator_devices(&out),
        "--tls-dir",
        s(&term_tls),
    ];
    let got = terminator(&args);
    let stdout = String::from_utf8_lossy(&got.stdout);
    assert!(
        got.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&got.stderr)
    );
    let report: Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{stdout}: {e}"));
    assert!(
        report["bytesReceived"].as_u64().unwrap_or(0) > 300_000,
        "{report}"
    );
    assert_identical(&devs, &out);
    let served = registry.next();
    assert_eq!(served["event"], "served", "{served}");

    // The same with the three file flags and an explicit server name.
    let out2 = dir.join("out2");
    let (cert, key, ca) = (
        term_tls.join("cert.pem"),
        term_tls.join("key.pem"),
        term_tls.join("ca.pem"),
    );
    let args = [
        "--raddr",
        &addr,
        "--devices",
        &terminator_devices(&out2),
        "--tls-cert",
        s(&cert),
        "--tls-key",
        s(&key),
        "--tls-ca",
        s(&ca),
        "--tls-server-name",
        "127.0.0.1",
    ];
    let got = terminator(&args);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert_identical(&devs, &out2);
    assert_eq!(registry.next()["event"], "served");

    // A server name the registry's certificate does not carry.
    let out3 = dir.join("out3");
    let args = [
        "--raddr",
        &addr,
        "--devices",
        &terminator_devices(&out3),
        "--tls-dir",
        s(&term_tls),
        "--tls-server-name",
        "registry.example",
    ];
    let err = refusal(&terminator(&args), &args, &["TLS", "certificate"]);
    eprintln!("wrong server name: {err}");
    assert_eq!(registry.next()["event"], "failed");
    registry.assert_running();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_tls_terminator_against_a_plain_registry_fails_at_once() {
    let dir = scratch("drafter-registry-tls", "plain");
    let devs = package(&dir);
    let pki = Pki::new("registry CA");
    let term_tls = dir.join("term");
    pki.issue(&["127.0.0.1"]).write_dir(&term_tls);
    let mut registry = RegistryProcess::start(&registry_devices(&devs), &[]);
    let out = dir.join("out");
    let args = [
        "--raddr",
        &registry.addr.clone(),
        "--devices",
        &terminator_devices(&out),
        "--tls-dir",
        s(&term_tls),
    ];
    let err = refusal(&terminator(&args), &args, &["TLS"]);
    eprintln!("TLS client, plain registry: {err}");
    assert!(err.contains("does not speak TLS"), "{err}");
    let failed = registry.next();
    assert_eq!(failed["event"], "failed", "{failed}");
    let why = failed["error"].as_str().unwrap_or_default();
    assert!(why.contains("the peer speaks TLS"), "{why}");
    assert!(!out.exists());
    registry.assert_running();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_peer_pulls_from_a_tls_registry() {
    let dir = scratch("drafter-registry-tls", "peer");
    let devs = package(&dir);
    let pki = Pki::new("registry CA");
    let (reg_tls, peer_tls) = (dir.join("reg"), dir.join("peer-tls"));
    pki.issue(&["127.0.0.1"]).write_dir(&reg_tls);
    pki.issue(&["peer"]).write_dir(&peer_tls);
    let registry = RegistryProcess::start(&registry_devices(&devs), &["--tls-dir", s(&reg_tls)]);

    let mut peer = ok(Command::new(PEER)
        .args(["--raddr", &registry.addr, "--link-timeout", "5"])
        .args(["--work-dir", s(&dir.join("work"))])
        .args(["--tls-dir", s(&peer_tls), "--enable-output=false"])
        .env("DRAFTER_SECRET", SECRET)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn());
    let err = peer.stderr.take().unwrap_or_else(|| panic!("no stderr"));
    let (tx, lines) = channel::<String>();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let arrived = loop {
        let l = lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("no migrated-in event: {e}"));
        if let Ok(v) = serde_json::from_str::<Value>(&l) {
            if v["event"] == "migrated-in" {
                break v;
            }
        }
        assert!(!l.contains("drafter-peer:"), "the peer failed: {l}");
    };
    assert!(arrived["report"].is_object(), "{arrived}");
    // The peer runs the VM it pulled: it has not exited.
    assert!(ok(peer.try_wait()).is_none(), "the peer exited");
    let served = registry.next();
    assert_eq!(served["event"], "served", "{served}");
    let _ = peer.kill();
    let _ = peer.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unusable_tls_flags_are_refused_before_anything_starts() {
    let dir = scratch("drafter-registry-tls", "flags");
    let devs = package(&dir);
    let pki = Pki::new("registry CA");
    let tls = dir.join("tls");
    pki.issue(&["127.0.0.1"]).write_dir(&tls);
    ok(std::fs::remove_file(tls.join("ca.pem")));
    let devices = registry_devices(&devs);
    let args = [
        "--laddr",
        "127.0.0.1:0",
        "--devices",
        &devices,
        "--tls-dir",
        s(&tls),
    ];
    let out = ok(Command::new(REGISTRY)
        .args(args)
        .env_remove("RUST_LOG")
        .output());
    assert_refused(&out, &args, &["TLS CA", "ca.pem"]);
    // Half the file flags: clap refuses (exit 2).
    let out = ok(Command::new(REGISTRY)
        .args(["--devices", &devices, "--tls-cert", "c.pem"])
        .output());
    assert_eq!(out.status.code(), Some(2));

    let to = terminator_devices(&dir.join("out"));
    let args = [
        "--raddr",
        "127.0.0.1:1",
        "--devices",
        &to,
        "--tls-dir",
        s(&tls),
    ];
    assert_refused(&terminator(&args), &args, &["TLS CA", "ca.pem"]);
    let args = [
        "--raddr",
        "127.0.0.1:1",
        "--devices",
        &to,
        "--tls-server-name",
        "registry",
    ];
    assert_refused(&terminator(&args), &args, &["--tls-server-name needs"]);
    assert!(!dir.join("out").exists());

    // --help lists the flags.
    for (bin, flags) in [
        (
            REGISTRY,
            &["--tls-cert", "--tls-key", "--tls-ca", "--tls-dir"][..],
        ),
        (
            TERMINATOR,
            &[
                "--tls-cert",
                "--tls-key",
                "--tls-ca",
                "--tls-dir",
                "--tls-server-name",
            ][..],
        ),
    ] {
        let help = ok(Command::new(bin).arg("--help").output());
        let text = String::from_utf8_lossy(&help.stdout);
        for f in flags {
            assert!(text.contains(f), "{bin} --help lacks {f}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
