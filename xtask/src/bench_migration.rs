//! `cargo xtask bench-migration`: QEMU's live migration and drafter's side by
//! side, in one lab boot, on the same guest kernel, initramfs and guest
//! program (`crates/drafter/tests/guest/memwriter.c`: rewrites a working set
//! at a set rate and prints a heartbeat line every 20 ms).
//!
//! For each workload and run it migrates a QEMU guest (`-M microvm`, KVM,
//! `-incoming tcp:`, `migrate` over QMP) and then a drafter guest (two
//! release `drafter-peer` processes over loopback), and prints for both the
//! heartbeat blackout (the longest gap between heartbeat lines, as the host
//! saw them arrive on either side's serial output, from a second before the
//! migration starts until the destination printed ten lines after it ended),
//! the reported downtime, the total time, the bytes sent, and the ratios
//! drafter/QEMU. It measures and prints; it asserts nothing. A migration that
//! fails or hangs is reported as failed with its reason, and the bench goes on.

use crate::guest;
use crate::lab::{self, LabOptions};
use crate::paths::{lab_dir, workspace_root};
use crate::qmp::Qmp;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// Bound on one migration, from its start to the destination's report.
const MIGRATION_WAIT: Duration = Duration::from_secs(300);
/// Bound on a guest booting and its writer getting ready.
const BOOT_WAIT: Duration = Duration::from_secs(180);
/// Bound on the destination printing [`AFTER_BEATS`] heartbeats once the migration ended.
const RESUME_WAIT: Duration = Duration::from_secs(60);
/// The blackout window opens this long before the migration starts.
const LEAD: Duration = Duration::from_secs(1);
/// Heartbeats the destination must print after the migration ended; the
/// blackout window closes at the last of them.
const AFTER_BEATS: usize = 10;
/// The guest kernel's command line, for both VMMs.
const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet";
/// QEMU's `max-bandwidth` for the bench (bytes/s): its default, 128 MiB/s,
/// would cap the transfer; nothing else of QEMU's is tuned.
const QEMU_MAX_BANDWIDTH: u64 = 10_000_000_000;
/// Printed by the memory writer once its working set is filled.
const WRITER_READY: &str = "WRITER-READY";
/// The secret the two peers share.
const SECRET: &str = "bench-migration-secret";

/// One guest configuration the bench migrates.
#[derive(Clone, Copy, Debug)]
struct Workload {
    /// Name for `--workload`.
    name: &'static str,
    /// Guest RAM in MiB.
    memory_mib: u64,
    /// Working set the writer rewrites, MiB.
    working_set_mib: u64,
    /// Rewrite rate, MiB/s (0: idle, heartbeat only).
    rate_mib: u64,
}

impl Workload {
    fn describe(&self) -> String {
        if self.rate_mib == 0 {
            format!("{} MiB guest, idle (heartbeat only)", self.memory_mib)
        } else {
            format!(
                "{} MiB guest, {} MiB working set rewritten at {} MiB/s",
                self.memory_mib, self.working_set_mib, self.rate_mib
            )
        }
    }
}

/// The workloads of issue #11, in the order they run: the 1 GiB writer
/// last, since drafter's migration of it has crashed the lab's kernel (a
/// stack overflow in the vCPU thread) and the others' figures come first.
const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "writer-256m",
        memory_mib: 256,
        working_set_mib: 64,
        rate_mib: 16,
    },
    Workload {
        name: "idle-1g",
        memory_mib: 1024,
        working_set_mib: 1,
        rate_mib: 0,
    },
    Workload {
        name: "writer-1g",
        memory_mib: 1024,
        working_set_mib: 256,
        rate_mib: 64,
    },
];

/// The workloads `--workload` picks (all when `None`); an unknown name is an error.
fn pick(workload: Option<&str>) -> Result<Vec<Workload>> {
    match workload {
        None => Ok(WORKLOADS.to_vec()),
        Some(n) => match WORKLOADS.iter().find(|w| w.name == n) {
            Some(w) => Ok(vec![*w]),
            None => bail!(
                "unknown workload {n:?}: one of {}",
                WORKLOADS.map(|w| w.name).join(", ")
            ),
        },
    }
}

/// Where the bench keeps what it builds (the memory writer, initramfs).
fn bench_dir() -> PathBuf {
    lab_dir().join("bench-migration")
}

fn initrd_path(dir: &Path, w: &Workload) -> PathBuf {
    dir.join(format!("initramfs-{}.cpio", w.name))
}

/// Builds the guest program, the initramfs of each workload and a release
/// `drafter-peer`, then runs the measuring side in the lab.
pub fn run(opts: &LabOptions, runs: u32, workload: Option<&str>) -> Result<i32> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let workloads = pick(workload)?;
    if opts.mem_mib < 4096 {
        bail!(
            "--mem {} is too small: two 1 GiB guests run at once in the lab (give it 4096 MiB or more)",
            opts.mem_mib
        );
    }
    let guest_dir = guest::ensure()?;
    let dir = bench_dir();
    std::fs::create_dir_all(&dir)?;
    let writer = build_memwriter(&dir)?;
    let busybox = std::fs::read(guest_dir.join("busybox")).context("reading the guest busybox")?;
    for w in &workloads {
        let image = initramfs(&busybox, &writer, w);
        std::fs::write(initrd_path(&dir, w), image)?;
    }
    let peer = build_peer()?;
    let exe = std::env::current_exe()?;
    let mut cmd = vec![
        exe.to_string_lossy().into_owned(),
        "bench-migration-inner".into(),
        "--kernel".into(),
        guest_dir.join("vmlinuz").to_string_lossy().into_owned(),
        "--dir".into(),
        dir.to_string_lossy().into_owned(),
        "--peer".into(),
        peer.to_string_lossy().into_owned(),
        "--runs".into(),
        runs.to_string(),
    ];
    if let Some(w) = workload {
        cmd.extend(["--workload".into(), w.to_string()]);
    }
    lab::run(opts, &cmd)
}

/// `cargo build --release` of the `drafter-peer` binary; returns its path.
fn build_peer() -> Result<PathBuf> {
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "-p",
            "drafter-cli",
            "--bin",
            "drafter-peer",
        ])
        .current_dir(workspace_root())
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building drafter-peer (release) failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let peer = target.join("release").join("drafter-peer");
    if !peer.exists() {
        bail!("{} is missing after the build", peer.display());
    }
    Ok(peer)
}

/// Compiles the memory writer (static) into `dir`; returns its bytes.
fn build_memwriter(dir: &Path) -> Result<Vec<u8>> {
    let src = workspace_root().join("crates/drafter/tests/guest/memwriter.c");
    let out = dir.join("memwriter");
    let status = Command::new("cc")
        .args(["-O2", "-static", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .context("running cc (install gcc and libc6-dev)")?;
    if !status.success() {
        bail!("compiling {} failed", src.display());
    }
    Ok(std::fs::read(&out)?)
}

/// A busybox initramfs whose `/init` mounts the basics and runs the writer
/// for workload `w` as the guest's only program (its output on the serial
/// console). No modules: the guest needs nothing but its serial port.
fn initramfs(busybox: &[u8], writer: &[u8], w: &Workload) -> Vec<u8> {
    let mut c = drafter_cpio::CpioWriter::new();
    for d in ["bin", "dev", "proc", "sys", "tmp"] {
        c.dir(d);
    }
    c.chardev("dev/console", 5, 1);
    c.chardev("dev/null", 1, 3);
    c.file("bin/busybox", 0o755, busybox);
    c.symlink("bin/sh", "busybox");
    c.file("bin/memwriter", 0o755, writer);
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev 2>/dev/null\n\
         echo BENCH-GUEST-UP\n\
         /bin/memwriter {} {}\n\
         echo WRITER-EXITED\n\
         poweroff -f\n",
        w.working_set_mib, w.rate_mib
    );
    c.file("init", 0o755, init.as_bytes());
    c.into_bytes()
}

/// What one side's migration measured.
#[derive(Clone, Debug)]
struct Measure {
    /// Longest heartbeat gap across the migration, ms.
    blackout_ms: f64,
    /// The VMM's own downtime figure, ms.
    downtime_ms: f64,
    /// Migration start to end (QEMU: `completed`; drafter: `migrated-in`), s.
    total_s: f64,
    /// Bytes sent (QEMU: RAM transferred; drafter: storage bytes sent).
    bytes: u64,
    /// Longest heartbeat gap in the second before the migration, ms (the noise floor).
    before_ms: f64,
    /// A few more figures of the VMM's own report.
    notes: String,
}

/// One side's result: figures, or why the run failed.
type Outcome = std::result::Result<Measure, String>;

/// The measuring side, inside the lab.
pub fn inner(
    kernel: &Path,
    dir: &Path,
    peer: &Path,
    runs: u32,
    workload: Option<&str>,
) -> Result<i32> {
    let workloads = pick(workload)?;
    if !Path::new("/dev/kvm").exists() {
        bail!("no /dev/kvm: run through `cargo xtask bench-migration` (the lab)");
    }
    let mut summaries = Vec::new();
    for w in &workloads {
        let initrd = initrd_path(dir, w);
        let mut results = Vec::new();
        for i in 1..=runs {
            let scratch = std::env::temp_dir().join(format!(
                "bench-migration-{}-{}-{i}",
                std::process::id(),
                w.name
            ));
            std::fs::create_dir_all(&scratch)?;
            println!("== {} run {i}/{runs}: {}", w.name, w.describe());
            let q = qemu_migration(kernel, &initrd, w, &scratch).map_err(|e| format!("{e:#}"));
            print_run("qemu", &q);
            let d =
                drafter_migration(kernel, &initrd, peer, w, &scratch).map_err(|e| format!("{e:#}"));
            print_run("drafter", &d);
            let _ = std::fs::remove_dir_all(&scratch);
            results.push((q, d));
        }
        let s = summary(w, &results);
        println!("{s}");
        summaries.push(s);
    }
    println!("==== bench-migration summary (medians over {runs} run(s) per workload)");
    println!(
        "QEMU {}: -M microvm -enable-kvm -cpu host, defaults (downtime-limit 300 ms) except max-bandwidth {} GB/s \
         (its default 128 MiB/s would cap it); drafter: release drafter-peer, defaults. 1 vCPU each; \
         both over loopback TCP. Total time: host clock from `migrate` (QEMU, destination already started) / \
         destination peer spawn (drafter) to `completed` / `migrated-in`.",
        qemu_version(),
        QEMU_MAX_BANDWIDTH / 1_000_000_000
    );
    for s in summaries {
        println!("{s}");
    }
    Ok(0)
}

fn qemu_version() -> String {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        })
        .unwrap_or_else(|| "?".into())
}

fn print_run(side: &str, o: &Outcome) {
    match o {
        Ok(m) => println!(
            "  {side:8} blackout {:8.1} ms  downtime {:8.1} ms  total {:7.2} s  bytes {:>14}  (gap before {:.1} ms) {}",
            m.blackout_ms, m.downtime_ms, m.total_s, m.bytes, m.before_ms, m.notes
        ),
        Err(e) => println!("  {side:8} FAILED: {e}"),
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// A row of the summary: label, the figure of a run, the unit it is divided by.
type Row = (&'static str, fn(&Measure) -> f64, f64);

/// The medians of both sides and their ratios, as a small table.
fn summary(w: &Workload, results: &[(Outcome, Outcome)]) -> String {
    let ok = |pick: fn(&(Outcome, Outcome)) -> &Outcome| -> Vec<Measure> {
        results
            .iter()
            .filter_map(|r| pick(r).clone().ok())
            .collect()
    };
    let q = ok(|r| &r.0);
    let d = ok(|r| &r.1);
    let mut s = format!(
        "-- {}: {} — QEMU {}/{} ok, drafter {}/{} ok\n",
        w.name,
        w.describe(),
        q.len(),
        results.len(),
        d.len(),
        results.len()
    );
    let failures: Vec<String> = results
        .iter()
        .enumerate()
        .flat_map(|(i, (a, b))| {
            [("QEMU", a), ("drafter", b)]
                .into_iter()
                .filter_map(move |(side, o)| {
                    o.as_ref()
                        .err()
                        .map(|e| format!("   run {} {side} failed: {e}\n", i + 1))
                })
        })
        .collect();
    s.push_str(&format!(
        "   {:<22} {:>12} {:>12} {:>14}\n",
        "", "QEMU", "drafter", "drafter/QEMU"
    ));
    let rows: [Row; 4] = [
        ("blackout (ms)", |m| m.blackout_ms, 1.0),
        ("reported downtime (ms)", |m| m.downtime_ms, 1.0),
        ("total time (s)", |m| m.total_s, 1.0),
        ("bytes sent (MB)", |m| m.bytes as f64, 1e6),
    ];
    for (label, f, scale) in rows {
        let mq = median(q.iter().map(f).collect()).map(|v| v / scale);
        let md = median(d.iter().map(f).collect()).map(|v| v / scale);
        let cell = |v: Option<f64>| v.map_or("failed".to_string(), |v| format!("{v:.1}"));
        let ratio = match (mq, md) {
            (Some(a), Some(b)) if a > 0.0 => format!("{:.2}", b / a),
            _ => "-".into(),
        };
        s.push_str(&format!(
            "   {label:<22} {:>12} {:>12} {ratio:>14}\n",
            cell(mq),
            cell(md)
        ));
    }
    for f in failures {
        s.push_str(&f);
    }
    s
}

/// Which output of a process a line came from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stream {
    Out,
    Err,
}

/// A line (or the end, `None`) read from one process, stamped on arrival.
struct Msg {
    who: usize,
    stream: Stream,
    at: Instant,
    line: Option<String>,
}

/// What the bench saw of one process.
struct Proc {
    name: String,
    child: Child,
    /// When each heartbeat line arrived.
    beats: Vec<Instant>,
    /// When the writer said it was ready.
    ready: Option<Instant>,
    /// JSON lines of stderr (drafter-peer's events), with their arrival.
    events: Vec<(Instant, Value)>,
    /// The last other lines (serial and stderr), for failure messages.
    tail: VecDeque<String>,
    out_closed: bool,
    err_closed: bool,
}

impl Proc {
    fn event(&self, name: &str) -> Option<&(Instant, Value)> {
        self.events.iter().find(|(_, v)| v["event"] == name)
    }

    fn beats_after(&self, t: Instant) -> usize {
        self.beats.iter().filter(|b| **b > t).count()
    }

    /// The last lines, the last phase event and whether it still runs.
    fn describe(&mut self) -> String {
        let phase = self
            .events
            .iter()
            .rev()
            .find(|(_, v)| v["event"] == "phase")
            .map(|(_, v)| format!(" last phase {};", v["phase"]))
            .unwrap_or_default();
        let alive = match self.child.try_wait() {
            Ok(Some(s)) => format!("exited {s}"),
            _ => "running".into(),
        };
        let tail: Vec<&str> = self.tail.iter().rev().take(4).map(String::as_str).collect();
        format!(
            "{} {alive};{phase} {} heartbeats; last lines (newest first): {tail:?}",
            self.name,
            self.beats.len()
        )
    }
}

/// The processes of one migration and their output, read by one thread per
/// stream into one channel. Kills every process when dropped.
struct Hub {
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
    procs: Vec<Proc>,
}

fn is_heartbeat(line: &str) -> bool {
    let l = line.trim();
    l.len() == 1 && l.as_bytes()[0].is_ascii_lowercase()
}

fn reader(who: usize, stream: Stream, from: impl Read + Send + 'static, tx: Sender<Msg>) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(from);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                    let at = Instant::now();
                    if tx
                        .send(Msg {
                            who,
                            stream,
                            at,
                            line: Some(line),
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(Msg {
            who,
            stream,
            at: Instant::now(),
            line: None,
        });
    });
}

impl Hub {
    fn new() -> Self {
        let (tx, rx) = channel();
        Self {
            tx,
            rx,
            procs: Vec::new(),
        }
    }

    /// Starts `cmd` with its stdout and stderr read into the hub; its index.
    fn spawn(&mut self, name: &str, mut cmd: Command) -> Result<usize> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let who = self.procs.len();
        let out = child.stdout.take().context("no stdout")?;
        let err = child.stderr.take().context("no stderr")?;
        reader(who, Stream::Out, out, self.tx.clone());
        reader(who, Stream::Err, err, self.tx.clone());
        self.procs.push(Proc {
            name: name.to_string(),
            child,
            beats: Vec::new(),
            ready: None,
            events: Vec::new(),
            tail: VecDeque::new(),
            out_closed: false,
            err_closed: false,
        });
        Ok(who)
    }

    fn record(&mut self, m: Msg) {
        let Some(p) = self.procs.get_mut(m.who) else {
            return;
        };
        let Some(line) = m.line else {
            match m.stream {
                Stream::Out => p.out_closed = true,
                Stream::Err => p.err_closed = true,
            }
            return;
        };
        if m.stream == Stream::Out && is_heartbeat(&line) {
            p.beats.push(m.at);
            return;
        }
        if m.stream == Stream::Out && line.contains(WRITER_READY) && p.ready.is_none() {
            p.ready = Some(m.at);
        }
        if m.stream == Stream::Err {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v.get("event").is_some() {
                    p.events.push((m.at, v));
                    return;
                }
            }
        }
        p.tail.push_back(line);
        if p.tail.len() > 30 {
            p.tail.pop_front();
        }
    }

    /// Takes in every line that arrived so far.
    fn drain(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            self.record(m);
        }
    }

    /// Takes in lines until `done` holds (true) or `deadline` passes (false).
    fn wait_until(&mut self, deadline: Instant, mut done: impl FnMut(&Hub) -> bool) -> bool {
        self.drain();
        loop {
            if done(self) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.rx.recv_timeout(left) {
                Ok(m) => self.record(m),
                Err(RecvTimeoutError::Timeout) => return done(self),
                Err(RecvTimeoutError::Disconnected) => return done(self),
            }
        }
    }

    /// Waits until process `who` printed a full second of heartbeats after its writer was ready.
    fn wait_ready(&mut self, who: usize) -> Result<()> {
        let ok = self.wait_until(Instant::now() + BOOT_WAIT, |h| {
            let p = &h.procs[who];
            p.out_closed || p.ready.is_some_and(|r| p.beats_after(r) >= 50)
        });
        let p = &mut self.procs[who];
        if !ok || p.ready.is_none_or(|r| p.beats_after(r) < 50) {
            bail!(
                "the guest did not get ready within {BOOT_WAIT:?}: {}",
                p.describe()
            );
        }
        Ok(())
    }

    /// Waits for `AFTER_BEATS` heartbeats of `dst` after `end`; the blackout
    /// (longest gap between heartbeats of `src` and `dst` from [`LEAD`]
    /// before `start` to the last of those) and the longest gap in the
    /// second before `start`, both in ms.
    fn blackout(
        &mut self,
        src: usize,
        dst: usize,
        start: Instant,
        end: Instant,
        what: &str,
    ) -> Result<(f64, f64)> {
        let ok = self.wait_until(Instant::now() + RESUME_WAIT, |h| {
            h.procs[dst].beats_after(end) >= AFTER_BEATS || h.procs[dst].out_closed
        });
        if !ok || self.procs[dst].beats_after(end) < AFTER_BEATS {
            bail!(
                "destination guest silent after {what} ({} heartbeats in {RESUME_WAIT:?}): {}; source: {}",
                self.procs[dst].beats_after(end),
                self.procs[dst].describe(),
                self.procs[src].describe()
            );
        }
        let close = self.procs[dst]
            .beats
            .iter()
            .filter(|b| **b > end)
            .nth(AFTER_BEATS - 1)
            .copied()
            .unwrap_or(end);
        let open = start.checked_sub(LEAD).unwrap_or(start);
        let mut all: Vec<Instant> = self.procs[src]
            .beats
            .iter()
            .chain(self.procs[dst].beats.iter())
            .copied()
            .filter(|b| *b >= open && *b <= close)
            .collect();
        all.sort();
        let gap = |v: &[Instant]| {
            v.windows(2)
                .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
                .fold(0.0, f64::max)
        };
        let before: Vec<Instant> = all.iter().copied().filter(|b| *b <= start).collect();
        Ok((gap(&all), gap(&before)))
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

/// A port on 127.0.0.1 nothing listens on right now.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn qemu_command(kernel: &Path, initrd: &Path, w: &Workload, qmp: &Path) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", "microvm", "-enable-kvm", "-cpu", "host"])
        .args(["-m", &w.memory_mib.to_string(), "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", BOOT_ARGS])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    c
}

/// Boots the guest under QEMU, migrates it to a second QEMU over loopback
/// TCP and measures.
fn qemu_migration(kernel: &Path, initrd: &Path, w: &Workload, scratch: &Path) -> Result<Measure> {
    let mut hub = Hub::new();
    let src_qmp = scratch.join("qemu-src.qmp");
    let dst_qmp = scratch.join("qemu-dst.qmp");
    let src = hub.spawn("qemu-src", qemu_command(kernel, initrd, w, &src_qmp))?;
    hub.wait_ready(src)?;
    let port = free_port()?;
    let mut dst_cmd = qemu_command(kernel, initrd, w, &dst_qmp);
    dst_cmd.args(["-incoming", &format!("tcp:127.0.0.1:{port}")]);
    let dst = hub.spawn("qemu-dst", dst_cmd)?;
    let mut dq = Qmp::connect(&dst_qmp, Duration::from_secs(60), Duration::from_secs(30))?;
    let status = dq.execute("query-status", json!({}))?;
    if status["status"] != "inmigrate" {
        bail!("destination QEMU is not waiting for a migration: {status}");
    }
    let mut q = Qmp::connect(&src_qmp, Duration::from_secs(10), Duration::from_secs(30))?;
    q.execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": QEMU_MAX_BANDWIDTH }),
    )?;
    hub.drain();
    let start = Instant::now();
    q.execute("migrate", json!({ "uri": format!("tcp:127.0.0.1:{port}") }))?;
    let deadline = start + MIGRATION_WAIT;
    let (info, end) = loop {
        let info = q.execute("query-migrate", json!({}))?;
        let now = Instant::now();
        match info["status"].as_str().unwrap_or_default() {
            "completed" => break (info, now),
            s @ ("failed" | "cancelled") => bail!(
                "migration {s}: {}; {}",
                info["error-desc"],
                hub.procs[dst].describe()
            ),
            _ => {}
        }
        if now >= deadline {
            let _ = q.execute("migrate_cancel", json!({}));
            bail!(
                "migration not completed within {MIGRATION_WAIT:?}: {info}; {}",
                hub.procs[src].describe()
            );
        }
        // Polls the migration status, as QMP clients do.
        std::thread::sleep(Duration::from_millis(10));
        hub.drain();
    };
    let (blackout_ms, before_ms) = hub.blackout(src, dst, start, end, "migration completed")?;
    let ram = &info["ram"];
    Ok(Measure {
        blackout_ms,
        downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
        total_s: (end - start).as_secs_f64(),
        bytes: ram["transferred"].as_u64().unwrap_or(0),
        before_ms,
        notes: format!(
            "[total-time {} ms, setup {} ms, dirty-sync-count {}, pages {} dup {}]",
            info["total-time"],
            info["setup-time"],
            ram["dirty-sync-count"],
            ram["normal"],
            ram["duplicate"]
        ),
    })
}

/// Boots the guest under one `drafter-peer`, migrates it to a second over
/// loopback TCP and measures.
fn drafter_migration(
    kernel: &Path,
    initrd: &Path,
    peer: &Path,
    w: &Workload,
    scratch: &Path,
) -> Result<Measure> {
    let config = json!({
        "kernel": kernel,
        "initramfs": initrd,
        "boot_args": BOOT_ARGS,
        "vcpus": 1,
        "memory_mib": w.memory_mib,
    });
    let cfg = scratch.join("vm.json");
    std::fs::write(&cfg, config.to_string())?;
    let mut hub = Hub::new();
    let mut a = Command::new(peer);
    a.arg("--config")
        .arg(&cfg)
        .arg("--work-dir")
        .arg(scratch.join("a"))
        .args(["--laddr", "127.0.0.1:0", "--secret", SECRET]);
    let src = hub.spawn("peer-src", a)?;
    let listening = hub.wait_until(Instant::now() + BOOT_WAIT, |h| {
        h.procs[src].event("listening").is_some() || h.procs[src].err_closed
    });
    let addr = hub.procs[src]
        .event("listening")
        .and_then(|(_, v)| v["addr"].as_str().map(str::to_string));
    let Some(addr) = addr.filter(|_| listening) else {
        bail!("source peer never listened: {}", hub.procs[src].describe());
    };
    hub.wait_ready(src)?;
    let mut b = Command::new(peer);
    b.arg("--raddr")
        .arg(&addr)
        .arg("--work-dir")
        .arg(scratch.join("b"))
        .args(["--secret", SECRET]);
    hub.drain();
    let start = Instant::now();
    let dst = hub.spawn("peer-dst", b)?;
    let over = |h: &Hub| {
        let (s, d) = (&h.procs[src], &h.procs[dst]);
        let ended = d.event("migrated-in").is_some() && s.event("migrated-out").is_some();
        let broken = s.event("migration-failed").is_some()
            || s.event("vm-exited").is_some()
            || d.event("vm-exited").is_some()
            || (s.err_closed && s.event("migrated-out").is_none())
            || (d.err_closed && d.event("migrated-in").is_none());
        ended || broken
    };
    let finished = hub.wait_until(start + MIGRATION_WAIT, over);
    let out = hub.procs[src].event("migrated-out").cloned();
    let incoming = hub.procs[dst].event("migrated-in").cloned();
    let (Some((_, out)), Some((end, incoming))) = (out, incoming) else {
        let why = |p: &Proc| {
            ["migration-failed", "vm-exited"]
                .iter()
                .find_map(|e| p.event(e).map(|(_, v)| v.to_string()))
        };
        let reason = match (why(&hub.procs[src]), why(&hub.procs[dst])) {
            (Some(e), _) => format!("source {e}"),
            (None, Some(e)) => format!("destination {e}"),
            _ if !finished => format!("no migrated-in/out within {MIGRATION_WAIT:?}"),
            _ => "a peer exited without its report".into(),
        };
        let (s, d) = (hub.procs[src].describe(), hub.procs[dst].describe());
        bail!("{reason}; {s}; {d}");
    };
    let (blackout_ms, before_ms) = hub.blackout(src, dst, start, end, "migrated-in")?;
    if let Some((_, v)) = hub.procs[dst].event("vm-exited") {
        bail!("destination {v} after migrated-in");
    }
    let src_report = &out["report"];
    let dst_report = &incoming["report"];
    let storage = &src_report["storage"];
    Ok(Measure {
        blackout_ms,
        downtime_ms: dst_report["vmDowntimeMillis"].as_f64().unwrap_or(f64::NAN),
        total_s: (end - start).as_secs_f64(),
        bytes: storage["bytesSent"].as_u64().unwrap_or(0),
        before_ms,
        notes: format!(
            "[source downtime {} ms, restore {} ms, storage total {} ms, state {} B, \
             bandwidth {:.1} MB/s, dirty rate {:.1} MB/s, predicted downtime {} ms, throttle {}%, \
             cycles ended by {}]",
            storage["downtimeMillis"],
            dst_report["restoreMillis"],
            storage["totalMillis"],
            src_report["stateBytes"],
            storage["bandwidthBytesPerSec"].as_f64().unwrap_or(0.0) / 1e6,
            storage["dirtyRateBytesPerSec"].as_f64().unwrap_or(0.0) / 1e6,
            storage["predictedDowntimeMillis"],
            storage["throttlePercent"],
            storage["readyReason"]
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_pick_one_or_all() {
        assert_eq!(pick(None).map(|v| v.len()).ok(), Some(3));
        assert_eq!(pick(Some("idle-1g")).ok().map(|v| v[0].rate_mib), Some(0));
        assert!(pick(Some("nope")).is_err());
    }

    #[test]
    fn heartbeats_are_single_lowercase_letters() {
        assert!(is_heartbeat("q"));
        assert!(is_heartbeat("q\r"));
        assert!(!is_heartbeat("V 10 0"));
        assert!(!is_heartbeat(""));
        assert!(!is_heartbeat("WRITER-READY 4 pages"));
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
