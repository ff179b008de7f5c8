//! What the lab migration tests share: `drafter-peer` processes (guest
//! serial from stdout, JSON events from stderr, signals, network
//! namespaces), the Linux guest's configuration, and the guest programs
//! they run (a counter, a writer of numbered, checksummed, fsynced disk
//! records) with the parsers of their output. Included by `#[path]`-less
//! `mod lab_peers;` from `tests/lab_*.rs`, next to `mod support;` (the VMM's
//! lab support: initramfs, guest kernel, scratch directories).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use drafter_vmm::VmConfig;

use crate::support::{guest_dir, MARKER};

/// Budget for each wait (nested KVM under TCG is slow, and the lab may be busy).
pub const WAIT: Duration = Duration::from_secs(300);

/// The secret the lab peers share.
pub const SECRET: &str = "lab-migration-secret";

/// Prints `COUNT <n> <uptime>` twice a second (serial is slow in the lab).
pub const COUNTER: &str = "i=0; while true; do i=$((i+1)); \
     echo COUNT $i $(cut -d' ' -f1 /proc/uptime); sleep 0.5; done";

/// The `drafter-peer` binary next to this test executable's directory, or
/// the one `DRAFTER_PEER_BIN` names (e.g. a release build: a debug peer
/// migrates a busy guest several times slower in the lab).
pub fn peer_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("DRAFTER_PEER_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("drafter-peer"))
        .unwrap_or_default();
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p drafter-cli` (cargo xtask lab-test does)",
        bin.display()
    );
    bin
}

/// When the test process started (the time column of echoed peer lines).
pub fn started() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn lines(name: String, out: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            eprintln!("{name}|{:8.3}| {line}", started().elapsed().as_secs_f64());
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// A `drafter-peer` process: guest serial lines from stdout, JSON events
/// (and errors) from stderr. Killed when dropped.
pub struct PeerProcess {
    /// Its name in the echoed lines and in failures.
    pub name: String,
    /// True if it was started with `--raddr` (the guest must never boot
    /// again there).
    pub migrated_in: bool,
    child: Child,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
}

impl PeerProcess {
    /// Starts `drafter-peer` with `args`.
    pub fn spawn(name: &str, args: &[&str]) -> PeerProcess {
        Self::spawn_in(name, None, args, &[])
    }

    /// Starts `drafter-peer` with `args` in network namespace `netns` (if
    /// given, through `ip netns exec`, which execs it: the child's pid is
    /// the peer's) with `env` added to its environment.
    pub fn spawn_in(
        name: &str,
        netns: Option<&str>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> PeerProcess {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(peer_binary());
                c
            }
            None => Command::new(peer_binary()),
        };
        let mut child = cmd
            .args(args)
            .env_remove("DRAFTER_PEER_STOP_AT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn drafter-peer ({name}): {e}"));
        let out = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let err = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
        PeerProcess {
            name: name.to_string(),
            migrated_in: args.contains(&"--raddr"),
            child,
            stdout: lines(name.to_string(), out),
            stderr: lines(name.to_string(), err),
        }
    }

    /// The process id.
    pub fn pid(&self) -> libc::pid_t {
        libc::pid_t::try_from(self.child.id()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits for the JSON event `event` on stderr.
    pub fn event(&self, event: &str) -> serde_json::Value {
        match self.next_event(&[event]) {
            Some(v) => v,
            None => panic!("{}: exited without a {event:?} event", self.name),
        }
    }

    /// Waits for the next JSON event named one of `events`, skipping
    /// others; `None` once the process closed stderr (it exited).
    pub fn next_event(&self, events: &[&str]) -> Option<serde_json::Value> {
        match self.next_event_within(events, WAIT) {
            Ok(v) => v,
            Err(()) => panic!(
                "{}: no event of {events:?} within {WAIT:?} ({})",
                self.name,
                self.activity()
            ),
        }
    }

    /// [`Self::next_event`] within `wait`; `Err` if none came in time.
    pub fn next_event_within(
        &self,
        events: &[&str],
        wait: Duration,
    ) -> Result<Option<serde_json::Value>, ()> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(l) => {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
                        if events.iter().any(|e| v["event"] == *e) {
                            return Ok(Some(v));
                        }
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
                Err(RecvTimeoutError::Timeout) => return Err(()),
            }
        }
    }

    /// Waits for the next counter line; returns (count, uptime). A peer that
    /// migrated the VM in must never show the boot marker.
    pub fn next_count(&self) -> (u64, f64) {
        let migrated = self.migrated_in;
        let name = self.name.clone();
        self.next_line(
            |l| {
                assert!(
                    !(migrated && l.contains(MARKER)),
                    "{name}: the guest booted again"
                )
            },
            parse_count,
        )
    }

    /// Waits for the process to end (its stderr closes), returning the exit
    /// code and the remaining serial lines.
    pub fn wait_exit(mut self) -> (Option<i32>, Vec<String>) {
        let code = self.exit_code();
        // Ends once the stdout reader saw the pipe close.
        let rest = self.stdout.iter().collect();
        (code, rest)
    }

    /// Waits (bounded) for the process to end; its exit code (`None`:
    /// killed by a signal).
    pub fn exit_code(&mut self) -> Option<i32> {
        loop {
            match self.stderr.recv_timeout(WAIT) {
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => break,
                Err(e) => panic!("{}: still running after {WAIT:?}: {e}", self.name),
            }
        }
        let status = self.child.wait().unwrap_or_else(|e| panic!("{e}"));
        // The stdout reader ends with the process (or its pipe).
        status.code()
    }

    /// Waits for the next serial line that `pick` accepts; every line seen
    /// on the way is passed to `seen` first.
    pub fn next_line<T>(&self, mut seen: impl FnMut(&str), pick: impl Fn(&str) -> Option<T>) -> T {
        let mut last = None;
        loop {
            match self.stdout.recv_timeout(WAIT) {
                Ok(l) => {
                    seen(&l);
                    if let Some(v) = pick(&l) {
                        return v;
                    }
                    last = Some(l);
                }
                Err(e) => panic!(
                    "{}: no expected serial line within {WAIT:?} (last other line: {last:?}): {e}\n{}",
                    self.name,
                    self.activity()
                ),
            }
        }
    }

    /// The next serial line within `wait`, or `None` if the guest stayed
    /// silent that long (or the process ended).
    pub fn next_line_within(&self, wait: Duration) -> Option<String> {
        self.stdout.recv_timeout(wait).ok()
    }

    /// The serial lines that arrived so far and were not read yet.
    pub fn serial_so_far(&self) -> Vec<String> {
        self.stdout.try_iter().collect()
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill only sends a signal to our own child process.
        let r = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(
            r,
            0,
            "{}: kill({sig}): {}",
            self.name,
            std::io::Error::last_os_error()
        );
    }

    /// Waits (bounded) until the process is stopped (`T` in its stat).
    pub fn wait_stopped(&self) {
        let path = format!("/proc/{}/stat", self.pid());
        let deadline = Instant::now() + WAIT;
        loop {
            let stat = std::fs::read_to_string(&path).unwrap_or_default();
            // The state follows the parenthesised command name.
            if stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next()) == Some('T') {
                return;
            }
            assert!(Instant::now() < deadline, "{} never stopped", self.name);
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// What the process is doing, for failure messages: its state and
    /// kernel wait channel (or that it is gone).
    pub fn describe(&self) -> String {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()));
        let wchan =
            std::fs::read_to_string(format!("/proc/{}/wchan", self.pid())).unwrap_or_default();
        match stat {
            Ok(stat) => {
                let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
                format!(
                    "{} pid {} state {state:?} wchan {wchan:?}",
                    self.name,
                    self.pid()
                )
            }
            Err(_) => format!("{} pid {} gone", self.name, self.pid()),
        }
    }

    /// What a silent process is busy with, for failure messages: each
    /// thread's state, wait channel and CPU time over one second (user,
    /// system, and time in the guest), and the KVM counters of its VM that
    /// moved in that second (exits, faults, injections; from debugfs).
    /// Tells a vCPU running guest code that makes no progress from one
    /// looping in KVM or one blocked.
    pub fn activity(&self) -> String {
        let pid = self.pid();
        mount_if_missing("debugfs", "/sys/kernel/debug/kvm");
        let before = (threads(pid), kvm_counters(pid));
        std::thread::sleep(Duration::from_secs(1));
        let after = (threads(pid), kvm_counters(pid));
        let mut out = format!("{}:", self.describe());
        for t in &after.0 {
            let was = before
                .0
                .iter()
                .find(|b| b.tid == t.tid)
                .map_or([0; 3], |b| b.ticks);
            let [user, system, guest] = [0, 1, 2].map(|i| t.ticks[i].saturating_sub(was[i]));
            out.push_str(&format!(
                "\n  thread {} {} {} wchan {:?} in 1 s: user {user} system {system} guest {guest} ticks",
                t.tid, t.name, t.state, t.wchan
            ));
        }
        let moved: Vec<String> = after
            .1
            .iter()
            .filter_map(|(k, v)| {
                let was = before.1.iter().find(|b| b.0 == *k).map_or(0, |b| b.1);
                (*v != was).then(|| format!("{k}+{}", v.wrapping_sub(was)))
            })
            .collect();
        out.push_str(&format!(
            "\n  KVM counters that moved in 1 s: {}",
            moved.join(" ")
        ));
        for line in kvm_trace_sample() {
            out.push_str(&format!("\n  trace: {line}"));
        }
        out
    }

    /// Kills the process and reaps it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One thread of a process, as its stat and wchan show it.
struct ThreadSample {
    tid: String,
    name: String,
    state: char,
    wchan: String,
    /// User, system and guest CPU ticks (stat fields 14, 15 and 43).
    ticks: [u64; 3],
}

/// Each thread of `pid`, by thread id.
fn threads(pid: libc::pid_t) -> Vec<ThreadSample> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let base = e.path();
        let stat = std::fs::read_to_string(base.join("stat")).unwrap_or_default();
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        // `rest` starts at field 3 (state).
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |field: usize| f.get(field - 3).and_then(|v| v.parse().ok()).unwrap_or(0);
        out.push(ThreadSample {
            tid: e.file_name().to_string_lossy().to_string(),
            name: head.split_once('(').map_or("", |(_, n)| n).to_string(),
            state: f.first().and_then(|s| s.chars().next()).unwrap_or('?'),
            wchan: std::fs::read_to_string(base.join("wchan")).unwrap_or_default(),
            ticks: [num(14), num(15), num(43)],
        });
    }
    out.sort_by(|a, b| a.tid.cmp(&b.tid));
    out
}

/// Mounts a `fstype` file system at its usual place unless `probe` (a
/// path inside it) is already there; the lab mounts neither debugfs nor
/// tracefs.
fn mount_if_missing(fstype: &str, probe: &str) {
    let Some(at) = ["/sys/kernel/debug", "/sys/kernel/tracing"]
        .into_iter()
        .find(|at| probe.starts_with(at))
    else {
        return;
    };
    if !Path::new(probe).exists() {
        let _ = Command::new("mount")
            .args(["-t", fstype, fstype, at])
            .stderr(Stdio::null())
            .status();
    }
}

/// The first lines of a 50 ms ftrace of KVM's exits, emulated
/// instructions, injected exceptions and page faults (all VMs; a test runs
/// one busy VM at a time): where a vCPU that makes no progress loops, and
/// why (the instruction bytes KVM emulates, the fault it injects).
fn kvm_trace_sample() -> Vec<String> {
    mount_if_missing("tracefs", "/sys/kernel/tracing/trace");
    let t = Path::new("/sys/kernel/tracing");
    let events = [
        "kvm/kvm_exit",
        "kvm/kvm_emulate_insn",
        "kvm/kvm_inj_exception",
        "kvm/kvm_page_fault",
        "kvm/kvm_mmio",
    ];
    let set = |file: &str, v: &str| std::fs::write(t.join(file), v).is_ok();
    if !set("tracing_on", "0") {
        return vec!["(no tracefs)".to_string()];
    }
    set("trace", "");
    for e in events {
        set(&format!("events/{e}/enable"), "1");
    }
    set("tracing_on", "1");
    std::thread::sleep(Duration::from_millis(50));
    set("tracing_on", "0");
    for e in events {
        set(&format!("events/{e}/enable"), "0");
    }
    let text = std::fs::read_to_string(t.join("trace")).unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .take(24)
        .map(|l| l.trim().to_string())
        .collect()
}

/// KVM's debugfs counters of the VMs `pid` owns (`/sys/kernel/debug/kvm/<pid>-<fd>/`,
/// per VM and per vCPU), as `vm/counter` or `vm/vcpuN/counter`.
fn kvm_counters(pid: libc::pid_t) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let Ok(vms) = std::fs::read_dir("/sys/kernel/debug/kvm") else {
        return out;
    };
    let read = |dir: &Path, prefix: &str, out: &mut Vec<(String, u64)>| {
        for f in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = f.file_name().to_string_lossy().to_string();
            if let Ok(v) = std::fs::read_to_string(f.path()) {
                if let Ok(v) = v.trim().parse::<u64>() {
                    out.push((format!("{prefix}{name}"), v));
                }
            }
        }
    };
    for vm in vms.flatten() {
        let name = vm.file_name().to_string_lossy().to_string();
        if !name.starts_with(&format!("{pid}-")) {
            continue;
        }
        read(&vm.path(), "", &mut out);
        for sub in std::fs::read_dir(vm.path()).into_iter().flatten().flatten() {
            let sub_name = sub.file_name().to_string_lossy().to_string();
            if sub_name.starts_with("vcpu") {
                read(&sub.path(), &format!("{sub_name}/"), &mut out);
            }
        }
    }
    out
}

/// `COUNT <n> <uptime>`: the counter guest's line.
pub fn parse_count(line: &str) -> Option<(u64, f64)> {
    let mut w = line
        .split_whitespace()
        .skip_while(|w| *w != "COUNT")
        .skip(1);
    let n = w.next()?.parse().ok()?;
    let up = w.next()?.parse().ok()?;
    Some((n, up))
}

/// Writes `vm.json` in `dir`: the lab guest kernel with `init` as its
/// initramfs, one vCPU, `memory_mib` of RAM.
pub fn write_config_with(dir: &Path, init: PathBuf, memory_mib: u64) -> PathBuf {
    let mut c = VmConfig::new(guest_dir().join("vmlinuz"));
    c.initramfs = Some(init);
    c.vcpus = 1;
    c.memory_mib = memory_mib;
    c.boot_args = "console=ttyS0 reboot=k panic=1 pci=off quiet".into();
    let p = dir.join("vm.json");
    std::fs::write(&p, serde_json::to_vec(&c).unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}"));
    p
}

/// Adds a writable drive called `disk` backed by `disk` to the config at `cfg`.
pub fn add_writable_disk(cfg: &Path, disk: &Path) {
    let mut c: VmConfig =
        serde_json::from_slice(&std::fs::read(cfg).unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));
    c.drives.push(drafter_vmm::config::DriveConfig {
        name: "disk".into(),
        path: disk.to_path_buf(),
        read_only: false,
    });
    std::fs::write(cfg, serde_json::to_vec(&c).unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}"));
}

/// A path as `&str` for an argument list.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Size of the lab guest's writable disk.
pub const DISK_BYTES: u64 = 16 << 20;

/// The checksum a record carries: the record number scrambled (Knuth's
/// multiplicative hash), so a torn, stale or misplaced sector shows.
pub fn record_checksum(i: u64) -> u64 {
    i.wrapping_mul(2_654_435_761) & 0xffff_ffff
}

/// The record the disk writer puts in sector `i`.
pub fn record(i: u64) -> String {
    format!("REC{i:08} {:08x}\n", record_checksum(i))
}

/// Writes record `i` ([`record`]: number and checksum, in sector `i`) to
/// /dev/vda, fsyncs it (and syncs), then prints `W <i> ok`: a line the host
/// sees only after the guest saw the write complete. The line doubles as
/// the guest's counter; its last word tells a whole line from one cut off
/// when the VM moved in the middle of it.
pub const DISK_WRITER: &str = "i=0; while true; do i=$((i+1)); \
     if printf 'REC%08d %08x\\n' $i $(( (i * 2654435761) & 0xffffffff )) \
     | dd of=/dev/vda bs=512 seek=$i conv=notrunc,fsync 2>/dev/null \
     && sync; then echo W $i ok; else echo WFAIL $i; fi; sleep 0.2; done";

/// `W <i> ok`: record `i` is on the guest's disk.
pub fn parse_written(line: &str) -> Option<u64> {
    assert!(
        !line.contains("WFAIL"),
        "the guest's disk write failed: {line}"
    );
    let mut w = line.split_whitespace().skip_while(|w| *w != "W").skip(1);
    let i = w.next()?.parse().ok()?;
    (w.next() == Some("ok")).then_some(i)
}

/// Reads serial lines of `peer` until it reported `count` more records
/// written after `after`; adds each record it reports to `written`.
pub fn wait_records(peer: &PeerProcess, written: &mut Vec<u64>, after: u64, count: usize) -> u64 {
    let mut last = after;
    let migrated = peer.migrated_in;
    for _ in 0..count {
        let i = peer.next_line(
            |l| {
                assert!(
                    !(migrated && l.contains(MARKER)),
                    "{}: the guest booted again",
                    peer.name
                )
            },
            parse_written,
        );
        assert!(
            i > last,
            "{}: record {i} after {last}: the guest went back",
            peer.name
        );
        written.push(i);
        last = i;
    }
    last
}

/// Every record in `lines` (serial output of a peer); returns the last.
pub fn records_in(lines: &[String], written: &mut Vec<u64>) -> u64 {
    let mut last = 0;
    for l in lines {
        if let Some(i) = parse_written(l) {
            written.push(i);
            last = last.max(i);
        }
    }
    last
}

/// The records of `written` that the disk image at `disk` does not hold
/// intact (number and checksum in their sector).
pub fn missing_records(disk: &Path, written: &[u64]) -> Vec<u64> {
    let image = std::fs::read(disk).unwrap_or_else(|e| panic!("{}: {e}", disk.display()));
    assert_eq!(image.len() as u64, DISK_BYTES, "{}", disk.display());
    let mut lost: Vec<u64> = written
        .iter()
        .copied()
        .filter(|&i| {
            let at = (i * 512) as usize;
            let want = record(i);
            image.get(at..at + want.len()) != Some(want.as_bytes())
        })
        .collect();
    lost.sort_unstable();
    lost.dedup();
    lost
}
