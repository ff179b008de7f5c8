//! `drafter-peer`'s `phase` events (issue 9 done-when 1), on the host with
//! the flat counting guest: a pre-copy and a post-copy (resumed at
//! authority) migration report every step on both sides in order, and
//! `DRAFTER_PEER_STOP_AT` stops a peer right at a phase so a fault lands
//! there: the destination killed while the source is held at `final-dirty`
//! (its VM paused) leaves the VM running on the source, which then
//! migrates it to another peer.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use drafter_vmm::{BuildOptions, VmConfig, Vmm};

/// The counting guest of the VMM tests.
#[path = "../../vmm/tests/counting_guest/mod.rs"]
mod counting_guest;

const WAIT: Duration = Duration::from_secs(60);

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("drafter-peer-phases-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// A snapshot of the counting guest, counting.
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

/// The guest's counter in the memory file a peer runs it from.
fn counter_in(memory: &Path) -> u64 {
    let f = std::fs::File::open(memory).unwrap_or_else(|e| panic!("{}: {e}", memory.display()));
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, counting_guest::COUNTER)
        .unwrap_or_else(|e| panic!("{e}"));
    u64::from_le_bytes(b)
}

/// Waits (bounded) until the counter in `memory` moves past `past`.
fn counts_on(memory: &Path, past: u64) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let c = counter_in(memory);
        if c > past {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "the guest in {} does not count (stuck at {c})",
            memory.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A drafter-peer process whose JSON events arrive on a channel.
struct Peer {
    name: &'static str,
    child: Child,
    events: Receiver<serde_json::Value>,
}

impl Peer {
    fn start(name: &'static str, args: &[&str], env: &[(&str, &str)]) -> Peer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_drafter-peer"))
            .args(args)
            .args(["--secret", "s3cret", "--link-timeout", "2"])
            .env_remove("RUST_LOG")
            .env_remove("DRAFTER_PEER_STOP_AT")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        let err = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
        let (tx, events) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("{name}| {l}");
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        Peer {
            name,
            child,
            events,
        }
    }

    /// The next event called `event`; the phases seen on the way are
    /// appended to `phases` as `role:phase`.
    fn event_noting(&self, event: &str, phases: &mut Vec<String>) -> serde_json::Value {
        loop {
            let v = self
                .events
                .recv_timeout(WAIT)
                .unwrap_or_else(|e| panic!("{}: no {event} event: {e}", self.name));
            if v["event"] == "phase" {
                phases.push(format!(
                    "{}:{}",
                    v["role"].as_str().unwrap_or_default(),
                    v["phase"].as_str().unwrap_or_default()
                ));
            }
            if v["event"] == event {
                return v;
            }
        }
    }

    fn event(&self, event: &str) -> serde_json::Value {
        self.event_noting(event, &mut Vec::new())
    }

    /// Waits (bounded) until the process is stopped (state `T`).
    fn wait_stopped(&self) {
        let path = format!("/proc/{}/stat", self.child.id());
        let deadline = Instant::now() + WAIT;
        loop {
            let stat = std::fs::read_to_string(&path).unwrap_or_default();
            // The state follows the parenthesised command name.
            let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next());
            if state == Some(Some('T')) {
                return;
            }
            assert!(Instant::now() < deadline, "{} never stopped", self.name);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: kill only sends a signal to our own child process.
        let r = unsafe { libc::kill(pid, sig) };
        assert_eq!(r, 0, "kill {sig} {}", self.name);
    }

    fn exit_code(mut self) -> Option<i32> {
        let status = self.child.wait().unwrap_or_else(|e| panic!("{e}"));
        status.code()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn listening_addr(p: &Peer) -> String {
    p.event("listening")["addr"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// `role:phase` for each of `phases`.
fn tagged(role: &str, phases: &[&str]) -> Vec<String> {
    phases.iter().map(|p| format!("{role}:{p}")).collect()
}

/// Migrates a counting guest from A to B with `a_extra`/`b_extra` flags;
/// returns the phases each reported.
fn migrate(name: &str, a_extra: &[&str], b_extra: &[&str]) -> (Vec<String>, Vec<String>) {
    let d = scratch(name);
    let (state, mem) = snapshot(&d);
    let mut a_args = vec![
        "--state",
        s(&state),
        "--memory",
        s(&mem),
        "--laddr",
        "127.0.0.1:0",
    ];
    let a_work = d.join("a");
    a_args.extend(["--work-dir", s(&a_work)]);
    a_args.extend_from_slice(a_extra);
    let a = Peer::start("A", &a_args, &[]);
    let addr = listening_addr(&a);
    let b_work = d.join("b");
    let mut b_args = vec!["--raddr", &addr, "--work-dir", s(&b_work)];
    b_args.extend_from_slice(b_extra);
    let b = Peer::start("B", &b_args, &[]);
    let (mut a_phases, mut b_phases) = (Vec::new(), Vec::new());
    a.event_noting("migrated-out", &mut a_phases);
    b.event_noting("migrated-in", &mut b_phases);
    assert_eq!(a.exit_code(), Some(0));
    drop(b);
    let _ = std::fs::remove_dir_all(&d);
    (a_phases, b_phases)
}

/// The destination restores the VM from the handover offer on, while the
/// engine's tail runs: "restore" and "tail" come in either order. Puts
/// them in one order so that the rest can be compared.
fn tail_before_restore(mut phases: Vec<String>) -> Vec<String> {
    let at = |p: &[String], name: &str| p.iter().position(|x| x == name);
    if let (Some(r), Some(t)) = (
        at(&phases, "destination:restore"),
        at(&phases, "destination:tail"),
    ) {
        if r + 1 == t {
            phases.swap(r, t);
        }
    }
    phases
}

#[test]
fn pre_copy_phases_are_reported_in_order_on_both_sides() {
    let (a, b) = migrate("precopy", &[], &[]);
    let b = tail_before_restore(b);
    assert_eq!(
        a,
        tagged(
            "source",
            &[
                "handshake",
                "device-info",
                "full-pass",
                "dirty-cycles",
                "suspend",
                "final-dirty",
                "tail",
                "authority",
                "authority-accepted",
                "complete",
            ]
        )
    );
    assert_eq!(
        b,
        tagged(
            "destination",
            &[
                "handshake",
                "device-info",
                "full-pass",
                "dirty-cycles",
                "tail",
                "restore",
                "ready-to-run",
                "authority",
                "authority-accepted",
                "complete",
            ]
        )
    );
}

#[test]
fn post_copy_phases_are_reported_in_order_on_both_sides() {
    let (a, b) = migrate(
        "postcopy",
        &["--migration-mode", "post-copy"],
        &["--resume-at", "authority"],
    );
    let b = tail_before_restore(b);
    assert_eq!(
        a,
        tagged(
            "source",
            &[
                "handshake",
                "device-info",
                "suspend",
                "tail",
                "authority",
                "authority-accepted",
                "complete",
            ]
        )
    );
    // The rest of memory may all have arrived before the fetch phase is
    // told: its end and "complete" come in either order.
    let (head, rest) = b.split_at(b.len().saturating_sub(2));
    assert_eq!(
        head,
        tagged(
            "destination",
            &[
                "handshake",
                "device-info",
                "full-pass",
                "tail",
                "restore",
                "ready-to-run",
                "authority",
                "authority-accepted",
            ]
        ),
        "{b:?}"
    );
    let mut rest = rest.to_vec();
    rest.sort();
    assert_eq!(
        rest,
        tagged("destination", &["complete", "post-copy-fetch"]),
        "{b:?}"
    );
}

/// A at `final-dirty` has paused its VM and sent everything else; killing
/// B there must leave the VM with A (resumed), which migrates it to C.
#[test]
fn a_source_held_at_final_dirty_keeps_the_vm_when_the_destination_is_killed() {
    let d = scratch("stopat");
    let (state, mem) = snapshot(&d);
    let a_work = d.join("a");
    let a = Peer::start(
        "A",
        &[
            "--state",
            s(&state),
            "--memory",
            s(&mem),
            "--laddr",
            "127.0.0.1:0",
            "--work-dir",
            s(&a_work),
        ],
        &[("DRAFTER_PEER_STOP_AT", "source:final-dirty")],
    );
    let addr = listening_addr(&a);
    let a_memory = a_work.join("memory.bin");
    let before = counts_on(&a_memory, 0);
    let b = Peer::start("B", &["--raddr", &addr, "--work-dir", s(&d.join("b"))], &[]);
    let mut phases = Vec::new();
    loop {
        let v = a.event_noting("phase", &mut phases);
        if v["phase"] == "final-dirty" {
            break;
        }
    }
    a.wait_stopped();
    // Held at final-dirty: paused, so the counter stands still.
    let paused = counter_in(&a_memory);
    assert!(paused > before);
    b.signal(libc::SIGKILL);
    drop(b);
    a.signal(libc::SIGCONT);
    let failed = a.event("migration-failed");
    assert_eq!(failed["authority"], "source", "{failed}");
    assert_eq!(failed["sourceKeepsVm"], true, "{failed}");
    counts_on(&a_memory, paused);

    // The retry: A (not stopped again) migrates the VM to C.
    let c_work = d.join("c");
    let c = Peer::start("C", &["--raddr", &addr, "--work-dir", s(&c_work)], &[]);
    c.event("migrated-in");
    a.event("migrated-out");
    let moved = counter_in(&a_memory);
    assert_eq!(a.exit_code(), Some(0));
    counts_on(&c_work.join("memory.bin"), moved);
    drop(c);
    let _ = std::fs::remove_dir_all(&d);
}
