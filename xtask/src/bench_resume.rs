//! `cargo xtask bench-resume`: resume from a package with our runner against
//! QEMU resuming from a migration file (`-incoming`), in one lab run, on the
//! same kernel, initramfs, boot arguments, vCPU count and memory size.
//!
//! The guest (a busybox initramfs) fills half its memory with non-zero data,
//! starts the agent and the heartbeat (`BENCH-HB <n>` on the serial console
//! every 20 ms) and signals liveness. Ours: `drafter-snapshotter` (release
//! build) snapshots it into a package; each run copies the package (the runner
//! resumes in place, so every run starts from the same files) and times
//! `drafter-runner` from spawn to the first heartbeat line, keeping the
//! runner's own `resumeMs`/`totalMs`. QEMU: the guest boots under
//! `qemu-system-x86_64 -M microvm`, is migrated while running into a file
//! over QMP (`migrate exec:cat > FILE`, QEMU 7.2 has no `file:` URI), and each
//! run times `qemu-system-x86_64 ... -incoming "exec:cat FILE"` (autostart: the
//! source was running) from spawn to the first heartbeat line. Every file lives
//! on the lab's tmpfs (`/tmp`), so no page cache is dropped for either side.
//! Prints figures and ratios; asserts nothing.

use crate::guest;
use crate::lab::{self, LabOptions};
use crate::paths::workspace_root;
use crate::qmp::Qmp;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Heartbeat line prefix the guest prints every 20 ms once it is ready.
const HEARTBEAT: &str = "BENCH-HB";
/// Printed once the guest filled its memory, before agent and heartbeat.
const READY: &str = "BENCH-READY";
/// Boot arguments both sides use (our snapshotter's default plus `quiet`
/// and the fill size, appended per memory size).
const BOOT_ARGS: &str = "console=ttyS0 panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd reboot=k quiet";
/// Longest wait for a guest to boot and fill its memory (the lab is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
/// Longest wait for one resume to show a heartbeat.
const RESUME_TIMEOUT: Duration = Duration::from_secs(180);

/// What `bench-resume` measures.
pub struct BenchResumeArgs {
    /// Timed resumes per side and memory size.
    pub runs: u32,
    /// Guest memory sizes in MiB.
    pub sizes: Vec<u32>,
}

/// The guest's `/init`: modules, memory fill (`drafter.fill=` MiB), agent,
/// heartbeat, liveness.
fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m" 2>/dev/null; done
fill=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in drafter.fill=*) fill="${{arg#drafter.fill=}}" ;; esac
done
line=drafter-bench-resume-fill-0123456789abcdefghijklmnopqrstuvwxyz-ABCDEFGHIJKLMNOPQRSTUVWXYZ
line="$line$line$line$line$line$line$line$line"
yes "$line" | head -c 1048576 > /chunk
for n in 1 2 3 4; do cat /chunk /chunk > /chunk2; mv /chunk2 /chunk; done
i=0
while [ $((i * 16)) -lt "$fill" ]; do cat /chunk; i=$((i + 1)); done > /fill
rm /chunk
echo "{READY} filled ${{fill}} MiB"
(while :; do /bin/drafter-agent --vsock-port 26 >/dev/null 2>&1; sleep 1; done) &
(i=0; while :; do i=$((i + 1)); echo "{HEARTBEAT} $i"; sleep 0.02; done) &
/bin/drafter-liveness --vsock-port 25 >/dev/null 2>&1
while :; do sleep 3600; done
"#
    )
}

/// Builds the release CLIs, the static guest binaries and the initramfs,
/// then runs the measuring side in the lab.
pub fn run(opts: &LabOptions, args: &BenchResumeArgs) -> Result<i32> {
    if args.runs == 0 || args.sizes.is_empty() {
        bail!("--runs must be at least 1 and --sizes must name a size");
    }
    let guest_dir = guest::ensure()?;
    let ws = workspace_root();
    let status = Command::new(env!("CARGO"))
        .current_dir(&ws)
        .args(["build", "--release", "-p", "drafter-cli"])
        .args(["--bin", "drafter-snapshotter", "--bin", "drafter-runner"])
        .status()?;
    if !status.success() {
        bail!("building drafter-snapshotter and drafter-runner failed: {status}");
    }
    // The static guest binaries, as the blueprint builds them.
    let status = Command::new(env!("CARGO"))
        .current_dir(&ws)
        .args(["build", "--release", "--target", "x86_64-unknown-linux-gnu"])
        .args(["-p", "drafter-guest", "--bins"])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .status()?;
    if !status.success() {
        bail!("building the static drafter-agent and drafter-liveness failed: {status}");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| ws.join("target"));
    let guest_bins = target.join("x86_64-unknown-linux-gnu/release");
    let out = target.join("bench-resume");
    std::fs::create_dir_all(&out)?;
    let initramfs = out.join("initramfs.cpio");
    write_initramfs(&guest_dir, &guest_bins, &initramfs)?;
    let release = target.join("release");
    let exe = std::env::current_exe()?;
    let mut cmd = vec![
        exe.to_string_lossy().into_owned(),
        "bench-resume-inner".into(),
        "--kernel".into(),
        guest_dir.join("vmlinuz").to_string_lossy().into_owned(),
        "--initrd".into(),
        initramfs.to_string_lossy().into_owned(),
        "--bin-dir".into(),
        release.to_string_lossy().into_owned(),
        "--runs".into(),
        args.runs.to_string(),
    ];
    for s in &args.sizes {
        cmd.push("--sizes".into());
        cmd.push(s.to_string());
    }
    lab::run(opts, &cmd)
}

fn write_initramfs(guest_dir: &Path, bins: &Path, out: &Path) -> Result<()> {
    let mut w = drafter_cpio::CpioWriter::new();
    for d in ["bin", "dev", "proc", "sys", "lib", "lib/modules"] {
        w.dir(d);
    }
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    w.file("bin/busybox", 0o755, &read(&guest_dir.join("busybox"))?);
    // Stripped: the initramfs stays in guest memory, next to the fill.
    for name in ["drafter-agent", "drafter-liveness"] {
        let stripped = out.with_file_name(name);
        let status = Command::new("strip")
            .arg("-o")
            .arg(&stripped)
            .arg(bins.join(name))
            .status()
            .context("running strip")?;
        if !status.success() {
            bail!("strip {name} failed: {status}");
        }
        w.file(&format!("bin/{name}"), 0o755, &read(&stripped)?);
    }
    let order = std::fs::read_to_string(guest_dir.join("modules/order"))?;
    for name in order.lines().filter(|l| !l.trim().is_empty()) {
        w.file(
            &format!("lib/modules/{name}"),
            0o644,
            &read(&guest_dir.join("modules").join(name))?,
        );
    }
    w.file("lib/modules/order", 0o644, order.as_bytes());
    w.file("init", 0o755, init_script().as_bytes());
    w.finish(&mut std::fs::File::create(out)?)?;
    Ok(())
}

/// Where a child's line came from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stream {
    Out,
    Err,
}

/// A spawned process whose stdout and stderr lines arrive, timestamped, on
/// one channel; killed when dropped.
struct Watched {
    child: Child,
    lines: mpsc::Receiver<(Instant, Stream, String)>,
    /// Every line so far, for failure reports.
    log: Vec<String>,
}

impl Watched {
    fn spawn(cmd: &mut Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().context("no stdout")?;
        let err = child.stderr.take().context("no stderr")?;
        for (pipe, which) in [
            (Box::new(out) as Box<dyn std::io::Read + Send>, Stream::Out),
            (Box::new(err), Stream::Err),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((Instant::now(), which, line)).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Self {
            child,
            lines,
            log: Vec::new(),
        })
    }

    /// Waits (until `deadline`) for a line matching `want`; returns its
    /// arrival time and text.
    fn wait_for(
        &mut self,
        deadline: Instant,
        what: &str,
        want: impl Fn(Stream, &str) -> bool,
    ) -> Result<(Instant, String)> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, which, line)) => {
                    self.log.push(line.clone());
                    if want(which, &line) {
                        return Ok((at, line));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("timed out waiting for {what}; last lines:\n{}", self.tail())
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self
                        .child
                        .wait()
                        .map_or_else(|e| e.to_string(), |s| s.to_string());
                    bail!("{status} before {what}; last lines:\n{}", self.tail())
                }
            }
        }
    }

    fn tail(&self) -> String {
        let from = self.log.len().saturating_sub(15);
        self.log[from..].join("\n")
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Paths and sizes of one measurement's inputs.
struct Setup {
    work: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    bin_dir: PathBuf,
    mem_mib: u32,
}

impl Setup {
    fn boot_args(&self) -> String {
        format!("{BOOT_ARGS} drafter.fill={}", self.mem_mib / 2)
    }
    fn disk(&self) -> PathBuf {
        self.work.join("disk.img")
    }
    fn package(&self) -> PathBuf {
        self.work.join("package")
    }
    fn migration(&self) -> PathBuf {
        self.work.join("qemu-migration.bin")
    }
}

/// Package device names and their file names.
const PACKAGE: [(&str, &str); 6] = [
    ("state", "state.bin"),
    ("memory", "memory.bin"),
    ("kernel", "vmlinuz"),
    ("initramfs", "initramfs.cpio"),
    ("disk", "disk.img"),
    ("config", "config.json"),
];

/// Boots the guest under our VMM and snapshots it into the package.
fn make_package(s: &Setup) -> Result<Duration> {
    let pkg = s.package();
    let devices: Vec<serde_json::Value> = PACKAGE
        .iter()
        .map(|(name, file)| {
            let input = match *name {
                "kernel" => Some(s.kernel.clone()),
                "initramfs" => Some(s.initrd.clone()),
                "disk" => Some(s.disk()),
                _ => None,
            };
            let mut v = serde_json::json!({"name": name, "output": pkg.join(file)});
            if let Some(i) = input {
                v["input"] = serde_json::json!(i);
            }
            v
        })
        .collect();
    let start = Instant::now();
    let mut p = Watched::spawn(
        Command::new(s.bin_dir.join("drafter-snapshotter"))
            .args([
                "--netns=",
                "--interface=",
                "--json",
                "--enable-output=false",
            ])
            .args(["--memory-size", &s.mem_mib.to_string(), "--cpu-count", "1"])
            .args(["--boot-args", &s.boot_args(), "--resume-timeout", "15m"])
            .args(["--devices", &serde_json::Value::Array(devices).to_string()]),
    )?;
    p.wait_for(start + BOOT_TIMEOUT, "the snapshotter's report", |w, l| {
        w == Stream::Out && l.starts_with('{')
    })
    .context("drafter-snapshotter")?;
    let status = p.child.wait()?;
    if !status.success() {
        bail!("drafter-snapshotter failed ({status}):\n{}", p.tail());
    }
    Ok(start.elapsed())
}

/// One timed resume with our runner from a fresh copy of the package:
/// (spawn to first heartbeat, the runner's `resumeMs`, its `totalMs`).
fn ours_once(s: &Setup, i: u32) -> Result<(Duration, u64, u64)> {
    let copy = s.work.join(format!("package-run-{i}"));
    let _ = std::fs::remove_dir_all(&copy);
    let st = Command::new("cp")
        .args(["-r", "--sparse=always"])
        .arg(s.package())
        .arg(&copy)
        .status()?;
    if !st.success() {
        bail!("copying the package failed: {st}");
    }
    let devices: Vec<serde_json::Value> = PACKAGE
        .iter()
        .map(|(name, file)| serde_json::json!({"name": name, "path": copy.join(file)}))
        .collect();
    let result = (|| {
        let start = Instant::now();
        let mut p = Watched::spawn(
            Command::new(s.bin_dir.join("drafter-runner"))
                .args(["--netns=", "--json", "--enable-output=true"])
                .args(["--resume-timeout", "2m", "--rescue-timeout", "5s"])
                .args(["--devices", &serde_json::Value::Array(devices).to_string()]),
        )?;
        let deadline = start + RESUME_TIMEOUT;
        let mut heartbeat = None;
        let mut report = None;
        while heartbeat.is_none() || report.is_none() {
            let (at, line) =
                p.wait_for(deadline, "a heartbeat and the resumed report", |w, l| {
                    (w == Stream::Err && l.contains(HEARTBEAT))
                        || (w == Stream::Out && l.contains("\"resumed\""))
                })?;
            if line.contains(HEARTBEAT) {
                heartbeat.get_or_insert(at - start);
            } else {
                report = Some(serde_json::from_str::<serde_json::Value>(&line)?);
            }
        }
        let r = report.unwrap_or_default();
        let ms = |k: &str| r[k].as_u64().unwrap_or_default();
        Ok((heartbeat.unwrap_or_default(), ms("resumeMs"), ms("totalMs")))
    })();
    let _ = std::fs::remove_dir_all(&copy);
    result
}

/// `qemu-system-x86_64` with the guest's machine, memory, kernel and disk.
fn qemu(s: &Setup) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", "microvm", "-enable-kvm", "-cpu", "host"])
        .args(["-m", &s.mem_mib.to_string(), "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&s.kernel)
        .arg("-initrd")
        .arg(&s.initrd)
        .args(["-append", &s.boot_args()])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=disk0",
            s.disk().display()
        ))
        .args(["-device", "virtio-blk-device,drive=disk0"]);
    c
}

/// Boots the guest under QEMU and migrates it, running, into the file.
fn make_migration(s: &Setup) -> Result<Duration> {
    let qmp_path = s.work.join("qmp.sock");
    let _ = std::fs::remove_file(&qmp_path);
    let start = Instant::now();
    let mut p = Watched::spawn(
        qemu(s)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display())),
    )?;
    let deadline = start + BOOT_TIMEOUT;
    p.wait_for(deadline, "the guest's fill", |_, l| l.contains(READY))?;
    p.wait_for(deadline, "a heartbeat", |_, l| l.contains(HEARTBEAT))?;
    let mut qmp = Qmp::connect(
        &qmp_path,
        deadline.saturating_duration_since(Instant::now()),
        Duration::from_secs(60),
    )?;
    let file = s.migration();
    let _ = std::fs::remove_file(&file);
    qmp.execute(
        "migrate",
        serde_json::json!({"uri": format!("exec:cat > '{}'", file.display())}),
    )?;
    loop {
        let r = qmp.execute("query-migrate", serde_json::json!({}))?;
        match r["status"].as_str().unwrap_or("") {
            "completed" => break,
            "failed" | "cancelled" => bail!("QEMU migration to file: {r}"),
            _ if Instant::now() >= deadline => bail!("QEMU migration to file timed out: {r}"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let _ = qmp.execute("quit", serde_json::json!({}));
    drop(p);
    Ok(start.elapsed())
}

/// One timed QEMU resume from the migration file: spawn to first heartbeat.
fn qemu_once(s: &Setup) -> Result<Duration> {
    let start = Instant::now();
    let mut p = Watched::spawn(
        qemu(s)
            .arg("-incoming")
            .arg(format!("exec:cat '{}'", s.migration().display())),
    )?;
    let (at, _) = p.wait_for(start + RESUME_TIMEOUT, "a heartbeat", |w, l| {
        w == Stream::Out && l.contains(HEARTBEAT)
    })?;
    Ok(at - start)
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// Medians of one memory size, in milliseconds (missing if every run failed).
struct Row {
    mem_mib: u32,
    ours: Option<f64>,
    ours_resume: Option<f64>,
    ours_total: Option<f64>,
    qemu: Option<f64>,
    ours_ok: usize,
    qemu_ok: usize,
}

fn measure(s: &Setup, runs: u32) -> Row {
    let mib = s.mem_mib;
    let mut row = Row {
        mem_mib: mib,
        ours: None,
        ours_resume: None,
        ours_total: None,
        qemu: None,
        ours_ok: 0,
        qemu_ok: 0,
    };
    let have_package = match make_package(s) {
        Ok(t) => {
            println!(
                "{mib} MiB: package made in {:.1} s (memory.bin {} MiB allocated)",
                t.as_secs_f64(),
                allocated(&s.package().join("memory.bin")) >> 20
            );
            true
        }
        Err(e) => {
            println!("{mib} MiB: our package failed: {e:#}");
            false
        }
    };
    let have_migration = match make_migration(s) {
        Ok(t) => {
            println!(
                "{mib} MiB: QEMU migration file made in {:.1} s ({} MiB)",
                t.as_secs_f64(),
                allocated(&s.migration()) >> 20
            );
            true
        }
        Err(e) => {
            println!("{mib} MiB: QEMU migration to file failed: {e:#}");
            false
        }
    };
    let (mut ours, mut resume, mut total, mut qemu) = (vec![], vec![], vec![], vec![]);
    for i in 1..=runs {
        if have_package {
            match ours_once(s, i) {
                Ok((t, r, tot)) => {
                    println!(
                        "{mib} MiB run {i}: ours {:.1} ms to heartbeat (runner: vCPUs running at {r} ms, AfterResume done at {tot} ms)",
                        t.as_secs_f64() * 1e3
                    );
                    ours.push(t.as_secs_f64() * 1e3);
                    resume.push(r as f64);
                    total.push(tot as f64);
                }
                Err(e) => println!("{mib} MiB run {i}: ours failed: {e:#}"),
            }
        }
        if have_migration {
            match qemu_once(s) {
                Ok(t) => {
                    println!(
                        "{mib} MiB run {i}: QEMU -incoming {:.1} ms to heartbeat",
                        t.as_secs_f64() * 1e3
                    );
                    qemu.push(t.as_secs_f64() * 1e3);
                }
                Err(e) => println!("{mib} MiB run {i}: QEMU failed: {e:#}"),
            }
        }
    }
    row.ours = median(&ours);
    row.ours_resume = median(&resume);
    row.ours_total = median(&total);
    row.qemu = median(&qemu);
    row.ours_ok = ours.len();
    row.qemu_ok = qemu.len();
    row
}

/// The lab side: measures every size and prints the table.
pub fn inner(
    kernel: &Path,
    initrd: &Path,
    bin_dir: &Path,
    runs: u32,
    sizes: &[u32],
) -> Result<i32> {
    let base = std::env::temp_dir().join(format!("drafter-bench-resume-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    // Kernel and initramfs on tmpfs too: QEMU reads them at every start.
    std::fs::copy(kernel, base.join("vmlinuz"))?;
    std::fs::copy(initrd, base.join("initramfs.cpio"))?;
    // A small drive: the snapshotter wants a disk; QEMU gets the same one.
    std::fs::File::create(base.join("disk.img"))?.set_len(1 << 20)?;
    let qemu_version = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default();
    println!(
        "bench-resume: {qemu_version}; 1 vCPU, half the memory filled (a repeated non-zero 16 MiB pattern), heartbeat every 20 ms; \
         files on the lab's tmpfs, page cache not dropped (both sides); median of {runs}"
    );
    let mut rows = Vec::new();
    for &mem_mib in sizes {
        let s = Setup {
            work: base.clone(),
            kernel: base.join("vmlinuz"),
            initrd: base.join("initramfs.cpio"),
            bin_dir: bin_dir.to_path_buf(),
            mem_mib,
        };
        rows.push(measure(&s, runs));
        let _ = std::fs::remove_dir_all(s.package());
        let _ = std::fs::remove_file(s.migration());
    }
    let _ = std::fs::remove_dir_all(&base);
    let f = |v: Option<f64>| v.map_or("failed".to_owned(), |v| format!("{v:.0} ms"));
    println!();
    println!("memory    ours (spawn->heartbeat)  runner vCPUs running  runner AfterResume done  QEMU -incoming (spawn->heartbeat)  ours/QEMU");
    for r in &rows {
        let ratio = match (r.ours, r.qemu) {
            (Some(o), Some(q)) if q > 0.0 => format!("{:.2}", o / q),
            _ => "-".into(),
        };
        println!(
            "{:>4} MiB  {:>23}  {:>20}  {:>23}  {:>33}  {ratio:>9}   ({}/{runs} and {}/{runs} runs ok)",
            r.mem_mib,
            f(r.ours),
            f(r.ours_resume),
            f(r.ours_total),
            f(r.qemu),
            r.ours_ok,
            r.qemu_ok
        );
    }
    Ok(0)
}
