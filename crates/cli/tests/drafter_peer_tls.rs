//! `drafter-peer` over TLS, end to end on the host: peer A runs a counting
//! guest restored from a snapshot and listens with `--tls-dir`; a plain-TCP
//! peer and a peer whose certificate another CA issued are refused (A
//! reports `migration-failed` with `sourceKeepsVm`, the refused peers exit 1
//! with one line); then peer B with a certificate of the same CA receives
//! the VM (`migrated-out` on A, `migrated-in` on B). Bad TLS files are
//! refused before any VM starts. Certificates are made at test time.

#[path = "../../storage/tests/support/certs.rs"]
mod certs;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use certs::Pki;
use drafter_vmm::{BuildOptions, VmConfig, Vmm};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("drafter-peer-tls-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// The counting guest of the VMM tests: a snapshot of it, running.
#[path = "../../vmm/tests/counting_guest/mod.rs"]
mod counting_guest;

fn snapshot(dir: &Path) -> (PathBuf, PathBuf) {
    let mut c = VmConfig::new("/nonexistent-flat-program");
    c.memory_mib = 32;
    c.serial.stdout = false;
    let (out, rx) = counting_guest::console();
    let mut vmm = Vmm::boot(
        c,
        BuildOptions {
            console: Some(out),
            flat_program: Some(counting_guest::COUNT.to_vec()),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rx.recv_timeout(Duration::from_secs(20)).ok(), Some(b'R'));
    counting_guest::wait_counter_past(&vmm, 1000);
    vmm.pause().unwrap_or_else(|e| panic!("{e}"));
    let (state, mem) = (dir.join("state"), dir.join("mem"));
    vmm.snapshot(&state, &mem).unwrap_or_else(|e| panic!("{e}"));
    vmm.stop();
    (state, mem)
}

/// A drafter-peer process whose stderr lines arrive on a channel.
struct Peer {
    child: Child,
    lines: Receiver<String>,
}

impl Peer {
    fn start(args: &[&str]) -> Peer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_drafter-peer"))
            .args(args)
            .args(["--secret", "s3cret", "--link-timeout", "5"])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        let err = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Peer { child, lines }
    }

    /// The next stderr line with `event` (a JSON event), skipping others.
    fn event(&self, event: &str) -> serde_json::Value {
        loop {
            let l = self
                .lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("no {event} event: {e}"));
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
                if v["event"] == event {
                    return v;
                }
            }
        }
    }

    /// Waits for the exit; returns the status code and all stderr lines.
    fn finish(mut self) -> (Option<i32>, Vec<String>) {
        let status = self.child.wait().unwrap_or_else(|e| panic!("{e}"));
        (status.code(), self.lines.iter().collect())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A refused dialler: exit 1, one line naming the problem.
fn refused_dialler(args: &[&str]) -> String {
    let (code, lines) = Peer::start(args).finish();
    let errors: Vec<&String> = lines.iter().filter(|l| !l.starts_with('{')).collect();
    assert_eq!(code, Some(1), "{lines:?}");
    assert_eq!(errors.len(), 1, "not one line: {lines:?}");
    errors[0].clone()
}

#[test]
fn peers_migrate_over_tls_and_refuse_plain_and_foreign_peers() {
    let d = scratch("e2e");
    let (state, mem) = snapshot(&d);
    let pki = Pki::new("peers CA");
    let other = Pki::new("other CA");
    let (a_tls, b_tls, rogue_tls) = (d.join("a-tls"), d.join("b-tls"), d.join("rogue-tls"));
    pki.issue(&["127.0.0.1"]).write_dir(&a_tls);
    pki.issue(&["127.0.0.1"]).write_dir(&b_tls);
    other
        .issue(&["127.0.0.1"])
        .trusting(&pki.ca_pem())
        .write_dir(&rogue_tls);

    let a = Peer::start(&[
        "--state",
        s(&state),
        "--memory",
        s(&mem),
        "--laddr",
        "127.0.0.1:0",
        "--work-dir",
        s(&d.join("a")),
        "--tls-dir",
        s(&a_tls),
    ]);
    a.event("running");
    let addr = a.event("listening")["addr"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    // A plain-TCP peer.
    let err = refused_dialler(&["--raddr", &addr, "--work-dir", s(&d.join("plain"))]);
    assert!(err.contains("the peer speaks TLS"), "{err}");
    let failed = a.event("migration-failed");
    assert_eq!(failed["sourceKeepsVm"], true, "{failed}");
    let why = failed["error"].as_str().unwrap_or_default();
    assert!(why.contains("does not speak TLS"), "{why}");
    eprintln!("plain peer: {err}\n  source: {why}");

    // A peer whose certificate another CA issued.
    let err = refused_dialler(&[
        "--raddr",
        &addr,
        "--work-dir",
        s(&d.join("rogue")),
        "--tls-dir",
        s(&rogue_tls),
    ]);
    assert!(err.contains("TLS"), "{err}");
    let failed = a.event("migration-failed");
    assert_eq!(failed["sourceKeepsVm"], true, "{failed}");
    let why = failed["error"].as_str().unwrap_or_default();
    assert!(why.contains("peer certificate refused"), "{why}");
    eprintln!("foreign CA: {err}\n  source: {why}");

    // A proper peer receives the VM.
    let b = Peer::start(&[
        "--raddr",
        &addr,
        "--work-dir",
        s(&d.join("b")),
        "--tls-dir",
        s(&b_tls),
    ]);
    let arrived = b.event("migrated-in");
    assert!(arrived["report"].is_object(), "{arrived}");
    a.event("migrated-out");
    let (code, _) = a.finish();
    assert_eq!(code, Some(0));
    drop(b);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn unusable_tls_files_are_refused_before_any_vm_starts() {
    let d = scratch("files");
    let pki = Pki::new("peers CA");
    let dir = d.join("tls");
    pki.issue(&["127.0.0.1"]).write_dir(&dir);
    std::fs::remove_file(dir.join("ca.pem")).unwrap_or_else(|e| panic!("{e}"));
    let err = refused_dialler(&[
        "--raddr",
        "127.0.0.1:1",
        "--work-dir",
        s(&d.join("w")),
        "--tls-dir",
        s(&dir),
    ]);
    assert!(err.contains("TLS CA") && err.contains("ca.pem"), "{err}");

    std::fs::write(dir.join("ca.pem"), pki.ca_pem()).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.join("key.pem"), pki.issue(&["x"]).key).unwrap_or_else(|e| panic!("{e}"));
    let err = refused_dialler(&[
        "--raddr",
        "127.0.0.1:1",
        "--work-dir",
        s(&d.join("w")),
        "--tls-dir",
        s(&dir),
    ]);
    assert!(err.contains("TLS configuration"), "{err}");

    let err = refused_dialler(&[
        "--raddr",
        "127.0.0.1:1",
        "--work-dir",
        s(&d.join("w")),
        "--tls-server-name",
        "peer",
    ]);
    assert!(err.contains("--tls-server-name needs"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}
