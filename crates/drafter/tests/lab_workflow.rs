//! Lab test of the Drafter workflow (issue 10, done-when 1 to 4): the real
//! `drafter-snapshotter` turns the `os` blueprint plus a Redis OCI disk into
//! a package; `drafter-packager` archives it and extracts it elsewhere;
//! `drafter-runner` resumes the extracted package, a key is written into Redis, SIGINT suspends the VM into the package,
//! a second runner resumes it and the key is still there. The agent hooks'
//! output (BeforeSuspend writes a file, AfterResume prints what it found)
//! shows up in the tools' reports, and each hook increments a Redis key, so
//! the tests see that they ran after every migration and runner restart.
//! The chain test runs registry → peer A → peer B → peer C → terminator →
//! runner while a client keeps writing keys through `drafter-forwarder`.
//!
//! `prepare_lab_workflow` runs on the host first (`cargo xtask lab-test
//! lab_workflow`): it builds the binaries, the shared `os` blueprint
//! (`target/blueprint/lab-os`, the same one `lab_os` uses) and the Redis disk.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use drafter_blueprint::oci::{convert, ImageSource, OciOptions};
use drafter_blueprint::testing;
use serde_json::{json, Value};

/// Nested TCG is slow: boots and resumes take minutes.
const SLOW: Duration = Duration::from_secs(600);
const SLOW_GO: &str = "10m";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where the workspace's binaries are (`target/debug`, next to `deps/`).
fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join(name))
        .unwrap_or_else(|| panic!("no target dir above {}", exe.display()))
}

/// The Redis OCI disk the prepare step leaves for the lab.
fn redis_disk() -> PathBuf {
    repo_root().join("target/blueprint/lab-workflow/oci.ext4")
}

fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

/// Host side: the binaries, the shared blueprint and the Redis disk.
#[test]
#[ignore = "prepares the lab: cargo build, debootstrap (root, network, minutes)"]
fn prepare_lab_workflow() {
    let root = repo_root();
    let status = Command::new(env!("CARGO"))
        .current_dir(&root)
        .args([
            "build",
            "-p",
            "drafter-cli",
            "-p",
            "drafter-blueprint",
            "--bin",
            "drafter-snapshotter",
            "--bin",
            "drafter-runner",
            "--bin",
            "drafter-packager",
            "--bin",
            "drafter-registry",
            "--bin",
            "drafter-peer",
            "--bin",
            "drafter-terminator",
            "--bin",
            "drafter-nat",
            "--bin",
            "drafter-forwarder",
            "--bin",
            "drafter-blueprint",
        ])
        .status()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "building the binaries failed");
    let out = testing::lab_os_dir(&root);
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    if !testing::lab_os_is_fresh(&out, &exe) {
        testing::build_lab_os(&bin("drafter-blueprint"), &root, &out)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let disk = redis_disk();
    let scratch = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let layout = scratch.path().join("redis-layout");
    testing::write_redis_layout(&layout).unwrap_or_else(|e| panic!("{e}"));
    fs::create_dir_all(disk.parent().unwrap_or(Path::new("."))).unwrap_or_else(|e| panic!("{e}"));
    convert(&OciOptions {
        source: ImageSource::Layout(layout),
        output: disk.clone(),
        arch: "amd64".into(),
        plain_http: false,
        headroom: 16 << 20,
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Kills a child process that is still running when dropped.
struct Reaped(Option<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running `drafter-runner --json`, its stdout lines on a channel.
struct RunnerProcess {
    child: Reaped,
    lines: Receiver<String>,
}

impl RunnerProcess {
    fn start(args: &[String]) -> Self {
        let mut child = Command::new(bin("drafter-runner"))
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("drafter-runner: {e}"));
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("runner| {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child: Reaped(Some(child)),
            lines,
        }
    }

    /// The next JSON event, which must be `event`.
    fn event(&mut self, event: &str) -> Value {
        let line = self.lines.recv_timeout(SLOW).unwrap_or_else(|e| {
            let status = self.child.0.as_mut().and_then(|c| c.try_wait().ok());
            panic!("no {event} event from drafter-runner ({e}); exit status {status:?}")
        });
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(v["event"], event, "{line}");
        v
    }

    /// SIGINT, then the `suspended` event and exit status 0.
    fn interrupt(mut self) -> Value {
        let pid = self.child.0.as_ref().map(|c| c.id()).unwrap_or_default();
        assert!(sh(&format!("kill -INT {pid}")).status.success());
        let suspended = self.event("suspended");
        let mut child = self.child.0.take().unwrap_or_else(|| panic!("no child"));
        let deadline = Instant::now() + SLOW;
        loop {
            if let Some(status) = child.try_wait().unwrap_or_else(|e| panic!("{e}")) {
                assert!(status.success(), "drafter-runner exited with {status}");
                break;
            }
            assert!(Instant::now() < deadline, "drafter-runner did not exit");
            std::thread::sleep(Duration::from_millis(100));
        }
        suspended
    }
}

/// Sends one Redis command through the namespace, retrying until the reply
/// contains `want`.
fn redis(ns: &str, command: &str, want: &str) -> String {
    let deadline = Instant::now() + SLOW;
    loop {
        let out = sh(&format!(
            "printf '{command}\\r\\n' | ip netns exec {ns} timeout 5 busybox nc 172.16.0.2 6379"
        ));
        let reply = String::from_utf8_lossy(&out.stdout).into_owned();
        if reply.contains(want) {
            return reply;
        }
        assert!(
            Instant::now() < deadline,
            "redis never answered {command:?} with {want:?}: {reply:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn mtime(p: &Path) -> SystemTime {
    fs::metadata(p)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
#[ignore = "lab"]
fn lab_workflow_snapshot_run_suspend_resume_keeps_redis_keys() {
    let bp = testing::lab_os_dir(&repo_root());
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        testing::lab_os_is_fresh(&bp, &exe) && redis_disk().is_file(),
        "no fresh blueprint in {}: run `cargo xtask lab-test lab_workflow` (it prepares one on the host)",
        bp.display()
    );
    // /tmp is a tmpfs in the lab: far faster for the package than 9p.
    let dir = std::env::temp_dir().join(format!("lab-workflow-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let pkg = dir.join("package");
    let ns = format!("drafter-wf-{}", std::process::id());
    let ok = |cmd: &str| assert!(sh(cmd).status.success(), "{cmd}");
    ok(&format!("ip netns add {ns}"));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ok(&format!(
            "ip -n {ns} tuntap add dev tap0 mode tap && ip -n {ns} addr add 172.16.0.1/30 dev tap0 && ip -n {ns} link set tap0 up && ip -n {ns} link set lo up"
        ));
        workflow(&bp, &pkg, &ns);
    }));
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    let _ = fs::remove_dir_all(&dir);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// Runs `drafter-snapshotter` on the blueprint into `pkg` in `ns`; returns
/// its JSON report.
fn snapshot_package(bp: &Path, pkg: &Path, ns: &str) -> Value {
    snapshot_package_with(bp, pkg, ns, &[])
}

/// [`snapshot_package`] with `extra` arguments (the jail's).
fn snapshot_package_with(bp: &Path, pkg: &Path, ns: &str, extra: &[String]) -> Value {
    snapshot_package_sized(bp, pkg, ns, 512, extra)
}

/// [`snapshot_package_with`] for a guest of `memory_mib`.
fn snapshot_package_sized(
    bp: &Path,
    pkg: &Path,
    ns: &str,
    memory_mib: u32,
    extra: &[String],
) -> Value {
    let p = |n: &str| pkg.join(n);
    let devices = json!([
        {"name": "state", "output": p("state.bin")},
        {"name": "memory", "output": p("memory.bin")},
        {"name": "kernel", "input": bp.join("vmlinux"), "output": p("vmlinux")},
        {"name": "initramfs", "input": bp.join("initramfs"), "output": p("initramfs")},
        {"name": "disk", "input": bp.join("rootfs.ext4"), "output": p("rootfs.ext4")},
        {"name": "config", "output": p("config.json")},
        {"name": "oci", "input": redis_disk(), "output": p("oci.ext4")},
    ]);
    let boot_args = format!("{} quiet", drafter::snapshotter::DEFAULT_BOOT_ARGS);
    let out = Command::new(bin("drafter-snapshotter"))
        .args(["--netns", ns, "--json"])
        .args(["--memory-size", &memory_mib.to_string()])
        .args(["--boot-args", &boot_args, "--resume-timeout", SLOW_GO])
        .args(["--devices", &devices.to_string()])
        .args(extra)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("drafter-snapshotter: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "drafter-snapshotter failed: {stdout}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{stdout}: {e}"))
}

fn workflow(bp: &Path, pkg: &Path, ns: &str) {
    let p = |n: &str| pkg.join(n);
    let snap = snapshot_package(bp, pkg, ns);
    eprintln!(
        "snapshotter: boot to liveness {} ms, BeforeSuspend {} ms, snapshot {} ms, total {} ms",
        snap["bootToLivenessMs"], snap["beforeSuspendMs"], snap["snapshotMs"], snap["totalMs"]
    );
    assert_eq!(
        snap["beforeSuspendOutput"].as_str().map(str::trim),
        Some("suspend-drafterhost"),
        "{snap}"
    );
    // Every output is there, nothing half-written, and the package's disks
    // are copies of the blueprint's, not the same files.
    for name in [
        "state.bin",
        "memory.bin",
        "vmlinux",
        "initramfs",
        "rootfs.ext4",
        "config.json",
        "oci.ext4",
    ] {
        assert!(p(name).is_file(), "{name} missing");
    }
    let leftovers: Vec<_> = fs::read_dir(pkg)
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial") || n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(
        fs::metadata(p("memory.bin")).map(|m| m.len()).ok(),
        Some(512 << 20)
    );
    {
        use std::os::unix::fs::MetadataExt;
        let ino = |f: &Path| fs::metadata(f).map(|m| m.ino()).unwrap_or_default();
        assert_ne!(ino(&p("rootfs.ext4")), ino(&bp.join("rootfs.ext4")));
    }
    let config = drafter::package_config::PackageConfig::read(&p("config.json"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.agent_vsock_port, 26);
    assert_eq!(config.memory_size, 512);
    assert!(config.initramfs);
    let drives: Vec<&str> = config.drives.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(drives, ["disk", "oci"]);
    assert_eq!(config.cpu_template, "None");

    // Archive the package and unpack it elsewhere: the runner resumes the
    // extracted copy, which the packager verified device by device.
    let names = [
        ("state", "state.bin"),
        ("memory", "memory.bin"),
        ("kernel", "vmlinux"),
        ("initramfs", "initramfs"),
        ("disk", "rootfs.ext4"),
        ("config", "config.json"),
        ("oci", "oci.ext4"),
    ];
    let archive = pkg.with_file_name("app.tar.zst");
    let packaged = pkg.with_file_name("extracted");
    let packager = |dir: &Path, extract: bool| {
        let list: Vec<Value> = names
            .iter()
            .map(|(n, f)| json!({"name": n, "path": dir.join(f)}))
            .collect();
        let mut cmd = Command::new(bin("drafter-packager"));
        cmd.args(["--json", "--package-path", &archive.to_string_lossy()])
            .args(["--devices", &Value::Array(list).to_string()]);
        if extract {
            cmd.arg("--extract");
        }
        let out = cmd
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("drafter-packager: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "drafter-packager failed: {stdout}");
        eprintln!("packager (extract: {extract}): {}", stdout.trim());
    };
    packager(pkg, false);
    packager(&packaged, true);
    for (_, f) in names {
        assert_eq!(
            fs::metadata(packaged.join(f)).map(|m| m.len()).ok(),
            fs::metadata(p(f)).map(|m| m.len()).ok(),
            "{f} differs in size after extraction"
        );
    }
    let p = |n: &str| packaged.join(n);

    let runner_devices = json!([
        {"name": "state", "path": p("state.bin")},
        {"name": "memory", "path": p("memory.bin")},
        {"name": "kernel", "path": p("vmlinux")},
        {"name": "initramfs", "path": p("initramfs")},
        {"name": "disk", "path": p("rootfs.ext4")},
        {"name": "config", "path": p("config.json")},
        {"name": "oci", "path": p("oci.ext4")},
    ])
    .to_string();
    let args: Vec<String> = [
        "--netns",
        ns,
        "--json",
        "--enable-output=false",
        "--resume-timeout",
        SLOW_GO,
        "--rescue-timeout",
        "1m",
        "--devices",
        &runner_devices,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();

    // First run: resume, write a key, suspend into the package.
    let mut first = RunnerProcess::start(&args);
    let resumed = first.event("resumed");
    eprintln!(
        "runner 1: resumed in {} ms (restore {} ms, vCPUs running at {} ms, AfterResume {} ms)",
        resumed["totalMs"], resumed["restoreMs"], resumed["resumeMs"], resumed["afterResumeMs"]
    );
    assert_eq!(
        resumed["afterResumeOutput"].as_str().map(str::trim),
        Some("resumed-after-suspend-drafterhost"),
        "{resumed}"
    );
    redis(ns, "PING", "+PONG");
    // Redis may come up only after this run's AfterResume (the snapshot
    // is taken at liveness): the counters now are the baseline.
    let first_counts = hook_counts_in(ns);
    redis(ns, "SET drafter-key written-in-run-1", "+OK");
    let state_before = mtime(&p("state.bin"));
    std::thread::sleep(Duration::from_millis(20));
    let suspended = first.interrupt();
    eprintln!(
        "runner 1: suspended in {} ms (BeforeSuspend {} ms, state+memory+disks {} ms)",
        suspended["totalMs"], suspended["beforeSuspendMs"], suspended["suspendMs"]
    );
    assert_eq!(
        suspended["beforeSuspendOutput"].as_str().map(str::trim),
        Some("suspend-drafterhost"),
        "{suspended}"
    );
    assert!(
        mtime(&p("state.bin")) > state_before,
        "state.bin was not rewritten"
    );
    assert!(!p("state.bin.partial").exists());

    // Second run: the key written during the first run is still there.
    let mut second = RunnerProcess::start(&args);
    let resumed = second.event("resumed");
    eprintln!(
        "runner 2: resumed in {} ms (restore {} ms, vCPUs running at {} ms, AfterResume {} ms)",
        resumed["totalMs"], resumed["restoreMs"], resumed["resumeMs"], resumed["afterResumeMs"]
    );
    assert_eq!(
        resumed["afterResumeOutput"].as_str().map(str::trim),
        Some("resumed-after-suspend-drafterhost"),
        "{resumed}"
    );
    redis(ns, "GET drafter-key", "written-in-run-1");
    // The hooks' traces: the first run's BeforeSuspend (SIGINT) and the
    // second run's AfterResume each incremented their key.
    let counts = hook_counts_in(ns);
    eprintln!("runner: hook counters (BeforeSuspend, AfterResume) {first_counts:?} in run 1, {counts:?} in run 2");
    assert!(
        counts.0 > first_counts.0 && counts.1 > first_counts.1,
        "the hooks left no new trace across the restart: {first_counts:?} -> {counts:?}"
    );
    second.interrupt();

    // A peer starts from the same package files, as the reference's peer
    // does with `--raddr ''` and base/overlay devices: the key is there,
    // the VM runs on the overlays, and the package is not written. (The
    // lab's /tmp is in its RAM: the original package and archive go first.)
    let _ = fs::remove_dir_all(pkg);
    let _ = fs::remove_file(&archive);
    let overlay = packaged.with_file_name("overlay");
    let peer_devices = json!([
        {"name": "state", "base": p("state.bin"), "overlay": overlay.join("state.bin"),
         "state": overlay.join("state.bits"), "blockSize": 65536},
        {"name": "memory", "base": p("memory.bin"), "overlay": overlay.join("memory.bin")},
        {"name": "kernel", "base": p("vmlinux")},
        {"name": "initramfs", "base": p("initramfs")},
        {"name": "disk", "base": p("rootfs.ext4"), "overlay": overlay.join("rootfs.ext4")},
        {"name": "config", "base": p("config.json")},
        {"name": "oci", "base": p("oci.ext4"), "overlay": overlay.join("oci.ext4")},
    ])
    .to_string();
    let stamps: Vec<SystemTime> = names.iter().map(|(_, f)| mtime(&p(f))).collect();
    let mut peer = Tool::start(
        "drafter-peer",
        &strings(&[
            "--raddr",
            "",
            "--netns",
            ns,
            "--resume-timeout",
            SLOW_GO,
            "--enable-output=false",
            "--work-dir",
            &overlay.join("work").to_string_lossy(),
            "--devices",
            &peer_devices,
        ]),
    );
    let running = peer.event("running");
    assert_eq!(
        running["afterResume"]["output"].as_str().map(str::trim),
        Some("resumed-after-suspend-drafterhost"),
        "{running}"
    );
    redis(ns, "GET drafter-key", "written-in-run-1");
    redis(ns, "SET drafter-key written-in-the-peer", "+OK");
    drop(peer);
    for ((_, f), was) in names.iter().zip(&stamps) {
        assert_eq!(mtime(&p(f)), *was, "the peer wrote the package's {f}");
    }
    assert!(overlay.join("memory.bin").is_file() && overlay.join("oci.ext4").is_file());
    eprintln!("peer from the package files: the key was there, the package untouched");

    // A runner killed while its VM runs leaves the package's memory and
    // disks ahead of its state: the next run is refused in one line, and
    // so is a peer starting from it.
    let mut third = RunnerProcess::start(&args);
    third.event("resumed");
    drop(third); // SIGKILL
    let out = Command::new(bin("drafter-runner"))
        .args(&args)
        .output()
        .unwrap_or_else(|e| panic!("drafter-runner: {e}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a killed run's package was resumed");
    assert!(
        err.contains("ended without a suspend") && err.trim().lines().count() == 1,
        "{err}"
    );
    let _ = fs::remove_dir_all(&overlay);
    let out = Command::new(bin("drafter-peer"))
        .args(["--raddr", "", "--netns", ns, "--devices", &peer_devices])
        .arg("--work-dir")
        .arg(overlay.join("work"))
        .env("DRAFTER_SECRET", CHAIN_SECRET)
        .output()
        .unwrap_or_else(|e| panic!("drafter-peer: {e}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("ended without a suspend"),
        "{err}"
    );
    let _ = fs::remove_dir_all(&overlay);
}

/// The lab hooks' counters (BeforeSuspend, AfterResume) in the Redis of the
/// VM in `ns`.
fn hook_counts_in(ns: &str) -> (i64, i64) {
    let get = |key: &str| {
        let reply = redis(ns, &format!("GET {key}"), "$");
        let mut lines = reply.lines();
        match lines.next().map(str::trim) {
            Some("$-1") => 0,
            _ => lines
                .next()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("GET {key}: {reply:?}")),
        }
    };
    (
        get(testing::LAB_BEFORE_SUSPEND_KEY),
        get(testing::LAB_AFTER_RESUME_KEY),
    )
}

const CHAIN_SECRET: &str = "lab-workflow-chain";

/// A background tool (`drafter-registry`, `drafter-peer`): its JSON event
/// lines (from either stream) on a channel, other lines echoed; killed on
/// drop if still running.
struct Tool {
    name: &'static str,
    child: Reaped,
    events: Receiver<Value>,
}

impl Tool {
    fn start(name: &'static str, args: &[String]) -> Self {
        let mut child = Command::new(bin(name))
            .args(args)
            .env("DRAFTER_SECRET", CHAIN_SECRET)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (tx, events) = channel();
        let streams: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap_or_else(|| panic!("no stdout"))),
            Box::new(child.stderr.take().unwrap_or_else(|| panic!("no stderr"))),
        ];
        for stream in streams {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    match serde_json::from_str::<Value>(&line) {
                        Ok(v) if v.get("event").is_some() => {
                            eprintln!("{name}| {line}");
                            let _ = tx.send(v);
                        }
                        _ => eprintln!("{name}> {line}"),
                    }
                }
            });
        }
        Tool {
            name,
            child: Reaped(Some(child)),
            events,
        }
    }

    /// The next event called `event` (failures end the test).
    fn event(&mut self, event: &str) -> Value {
        loop {
            let v = self.events.recv_timeout(SLOW).unwrap_or_else(|e| {
                let status = self.child.0.as_mut().and_then(|c| c.try_wait().ok());
                panic!(
                    "no {event} event from {} ({e}); exit status {status:?}",
                    self.name
                )
            });
            assert!(
                !matches!(v["event"].as_str(), Some("migration-failed" | "failed")),
                "{}: {v}",
                self.name
            );
            if v["event"] == event {
                return v;
            }
        }
    }

    /// Waits for the tool to exit with status 0.
    fn exits_cleanly(mut self) {
        let mut child = self.child.0.take().unwrap_or_else(|| panic!("no child"));
        let deadline = Instant::now() + SLOW;
        loop {
            if let Some(status) = child.try_wait().unwrap_or_else(|e| panic!("{e}")) {
                assert!(status.success(), "{} exited with {status}", self.name);
                return;
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.name);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Device names and file names of the workflow's packages.
const PACKAGE_FILES: [(&str, &str); 7] = [
    ("state", "state.bin"),
    ("memory", "memory.bin"),
    ("kernel", "vmlinux"),
    ("initramfs", "initramfs"),
    ("disk", "rootfs.ext4"),
    ("config", "config.json"),
    ("oci", "oci.ext4"),
];

fn package_json(dir: &Path, field: &str) -> String {
    let list: Vec<Value> = PACKAGE_FILES
        .iter()
        .map(|(n, f)| json!({"name": n, field: dir.join(f)}))
        .collect();
    Value::Array(list).to_string()
}

fn runner_args(ns: &str, pkg: &Path) -> Vec<String> {
    strings(&[
        "--netns",
        ns,
        "--json",
        "--enable-output=false",
        "--resume-timeout",
        SLOW_GO,
        "--rescue-timeout",
        "1m",
        "--devices",
        &package_json(pkg, "path"),
    ])
}

#[test]
#[ignore = "lab"]
fn lab_workflow_registry_to_peers_to_terminator_keeps_redis_keys() {
    let bp = testing::lab_os_dir(&repo_root());
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        testing::lab_os_is_fresh(&bp, &exe) && redis_disk().is_file(),
        "no fresh blueprint in {}: run `cargo xtask lab-test lab_workflow` (it prepares one on the host)",
        bp.display()
    );
    let dir = std::env::temp_dir().join(format!("lab-chain-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    // Two namespaces from drafter-nat (peers A and C use the first, B and
    // the final runner the second: source and destination run the VM at
    // the same moment during a handover, and two VMs cannot share a tap),
    // each with its Redis port forwarded to the host by drafter-forwarder.
    // The uplink is a dummy: nothing here leaves the lab.
    let id = std::process::id() % 100_000;
    let (uplink, prefix) = (format!("dwu{id}"), format!("dw{id}"));
    let ns = [format!("{prefix}0"), format!("{prefix}1")];
    let ports = [free_port(), free_port()];
    let ok = |cmd: &str| assert!(sh(cmd).status.success(), "{cmd}");
    ok(&format!(
        "ip link add {uplink} type dummy && ip link set {uplink} up"
    ));
    let mut nat = Service::start(
        "drafter-nat",
        &strings(&[
            "--host-interface",
            &uplink,
            "--namespace-prefix",
            &prefix,
            "--namespace-count",
            "2",
            "--disable-ipv6",
            // The os blueprint's guest network: 172.16.0.2/30 via .1.
            "--namespace-interface-ip",
            "172.16.0.2",
            "--namespace-interface-gateway",
            "172.16.0.1",
        ]),
    );
    nat.wait_for("NAT running");
    let forwards: Vec<Value> = ns
        .iter()
        .zip(ports)
        .map(|(n, p)| {
            json!({"netns": n, "internalPort": "6379", "protocol": "tcp",
                   "externalAddr": format!("127.0.0.1:{p}")})
        })
        .collect();
    let mut forwarder = Service::start(
        "drafter-forwarder",
        &strings(&["--port-forwards", &Value::Array(forwards).to_string()]),
    );
    forwarder.wait_for("forwarding");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        chain(&bp, &dir, [&ns[0], &ns[1]], ports);
    }));
    let stopped = [forwarder.stop(), nat.stop()];
    let _ = Command::new("ip").args(["link", "del", &uplink]).status();
    let _ = fs::remove_dir_all(&dir);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert_eq!(stopped, [true, true], "drafter-forwarder, drafter-nat");
}

/// A free TCP port on 127.0.0.1.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A helper service (`drafter-nat`, `drafter-forwarder`): its output lines
/// on a channel (and echoed); [`Service::stop`] sends SIGTERM so it removes
/// what it made.
struct Service {
    name: &'static str,
    child: Reaped,
    lines: Receiver<String>,
}

impl Service {
    fn start(name: &'static str, args: &[String]) -> Self {
        let mut child = Command::new(bin(name))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (tx, lines) = channel();
        let streams: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap_or_else(|| panic!("no stdout"))),
            Box::new(child.stderr.take().unwrap_or_else(|| panic!("no stderr"))),
        ];
        for stream in streams {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("{name}> {line}");
                    let _ = tx.send(line);
                }
            });
        }
        Service {
            name,
            child: Reaped(Some(child)),
            lines,
        }
    }

    /// Waits for an output line containing `needle`.
    fn wait_for(&mut self, needle: &str) {
        loop {
            let line = self.lines.recv_timeout(SLOW).unwrap_or_else(|e| {
                let status = self.child.0.as_mut().and_then(|c| c.try_wait().ok());
                panic!("{}: no {needle:?} ({e}); exit status {status:?}", self.name)
            });
            if line.contains(needle) {
                return;
            }
        }
    }

    /// SIGTERM; true if it then exited with status 0.
    fn stop(mut self) -> bool {
        let Some(mut child) = self.child.0.take() else {
            return false;
        };
        let _ = sh(&format!("kill -TERM {}", child.id()));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return false;
                }
            }
        }
    }
}

/// A Redis reply (RESP2).
#[derive(Debug, Clone, PartialEq)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<String>),
    Array(Vec<Reply>),
}

fn read_reply(r: &mut impl BufRead) -> std::io::Result<Reply> {
    use std::io::{Error, ErrorKind};
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(Error::from(ErrorKind::UnexpectedEof));
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let bad = || Error::new(ErrorKind::InvalidData, format!("not RESP: {line:?}"));
    let rest = line.get(1..).ok_or_else(bad)?;
    let num = || rest.parse::<i64>().map_err(|_| bad());
    Ok(match line.as_bytes().first() {
        Some(b'+') => Reply::Simple(rest.to_string()),
        Some(b'-') => Reply::Error(rest.to_string()),
        Some(b':') => Reply::Int(num()?),
        Some(b'$') => match usize::try_from(num()?) {
            Err(_) => Reply::Bulk(None),
            Ok(n) => {
                let mut buf = vec![0u8; n + 2];
                r.read_exact(&mut buf)?;
                Reply::Bulk(Some(String::from_utf8_lossy(&buf[..n]).into_owned()))
            }
        },
        Some(b'*') => match usize::try_from(num()?) {
            Err(_) => Reply::Array(Vec::new()),
            Ok(n) => Reply::Array((0..n).map(|_| read_reply(r)).collect::<Result<_, _>>()?),
        },
        _ => return Err(bad()),
    })
}

/// A Redis connection to a forwarded port, every read and write bounded.
struct Redis {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Redis {
    fn connect(port: u16, timeout: Duration) -> std::io::Result<Redis> {
        let s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        Ok(Redis {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// Connects once the VM's Redis answers PING at `port`.
    fn reach(port: u16) -> Redis {
        let deadline = Instant::now() + SLOW;
        loop {
            let last = match Redis::connect(port, Duration::from_secs(5)) {
                Ok(mut r) => match r.call("PING") {
                    Ok(Reply::Simple(p)) if p == "PONG" => return r,
                    other => format!("{other:?}"),
                },
                Err(e) => e.to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "Redis at 127.0.0.1:{port} never answered: {last}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn call(&mut self, command: &str) -> std::io::Result<Reply> {
        self.writer.write_all(format!("{command}\r\n").as_bytes())?;
        read_reply(&mut self.reader)
    }

    /// The integer value of `key` (0 if unset).
    fn counter(&mut self, key: &str) -> i64 {
        match self.call(&format!("GET {key}")) {
            Ok(Reply::Bulk(None)) => 0,
            Ok(Reply::Bulk(Some(v))) => v.parse().unwrap_or_else(|e| panic!("{key}={v}: {e}")),
            other => panic!("GET {key}: {other:?}"),
        }
    }

    /// The hooks' traces: how often BeforeSuspend and AfterResume ran with
    /// Redis up (each increments its key).
    fn hook_counts(&mut self) -> (i64, i64) {
        (
            self.counter(testing::LAB_BEFORE_SUSPEND_KEY),
            self.counter(testing::LAB_AFTER_RESUME_KEY),
        )
    }

    /// Every acknowledged key `w:<n>` holds `<n>`; returns how many there are.
    fn check_acked(&mut self, acked: &[(u64, Instant)], hop: &str) -> usize {
        for chunk in acked.chunks(200) {
            let keys: Vec<String> = chunk.iter().map(|(n, _)| format!("w:{n}")).collect();
            let reply = self
                .call(&format!("MGET {}", keys.join(" ")))
                .unwrap_or_else(|e| panic!("{hop}: MGET: {e}"));
            let Reply::Array(values) = reply else {
                panic!("{hop}: MGET answered {reply:?}")
            };
            assert_eq!(values.len(), chunk.len(), "{hop}");
            for ((n, _), v) in chunk.iter().zip(values) {
                assert_eq!(
                    v,
                    Reply::Bulk(Some(n.to_string())),
                    "{hop}: key w:{n} was acknowledged but is not there"
                );
            }
        }
        acked.len()
    }
}

/// Pause between two writes of the [`KeyWriter`].
const WRITE_PACE: Duration = Duration::from_millis(20);

/// Keeps writing `SET w:<n> <n>` (a new n for every attempt) through the
/// forwarded ports, following the VM from port to port (a write without an
/// answer in time, or a refused connection, moves on to the next port);
/// remembers every acknowledged n and when its `+OK` came.
struct KeyWriter {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(u64, Instant)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KeyWriter {
    fn start(ports: [u16; 2]) -> KeyWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), acked.clone());
        let thread = std::thread::spawn(move || {
            let (mut n, mut target, mut conn) = (0u64, 0usize, None::<Redis>);
            while !s.load(Ordering::SeqCst) {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => match Redis::connect(ports[target], Duration::from_secs(2)) {
                        Ok(c) => conn.insert(c),
                        Err(_) => {
                            target = (target + 1) % ports.len();
                            continue;
                        }
                    },
                };
                n += 1;
                match c.call(&format!("SET w:{n} {n}")) {
                    Ok(Reply::Simple(r)) if r == "OK" => a
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((n, Instant::now())),
                    _ => {
                        conn = None;
                        target = (target + 1) % ports.len();
                    }
                }
                std::thread::sleep(WRITE_PACE);
            }
        });
        KeyWriter {
            stop,
            acked,
            thread: Some(thread),
        }
    }

    fn acked(&self) -> Vec<(u64, Instant)> {
        self.acked.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until `more` further keys are acknowledged (the VM takes
    /// writes where it runs now).
    fn wait_for_more(&self, more: usize) {
        let want = self.acked().len() + more;
        let deadline = Instant::now() + SLOW;
        while self.acked().len() < want {
            assert!(Instant::now() < deadline, "the writer got no answers");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Longest time without an acknowledgement since `since` (to the last
    /// acknowledgement), and how many keys were acknowledged since then.
    fn longest_gap_since(&self, since: Instant) -> (Duration, usize) {
        let acked = self.acked();
        let times: Vec<Instant> = acked
            .iter()
            .map(|(_, t)| *t)
            .filter(|t| *t >= since)
            .collect();
        let mut prev = since;
        let mut gap = Duration::ZERO;
        for t in &times {
            gap = gap.max(t.saturating_duration_since(prev));
            prev = *t;
        }
        (gap, times.len())
    }

    /// Stops writing; returns every acknowledged key.
    fn stop(&mut self) -> Vec<(u64, Instant)> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.acked()
    }
}

impl Drop for KeyWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What the hops of the chain share.
struct Chain<'a> {
    dir: &'a Path,
    writer: KeyWriter,
    /// Hook counters last seen (BeforeSuspend, AfterResume).
    counts: (i64, i64),
}

/// The AfterResume hook of the lab blueprint ran (its output in `event`'s report).
fn check_after_resume(report: &Value, who: &str) {
    assert_eq!(
        report["afterResume"]["output"].as_str().map(str::trim),
        Some("resumed-after-suspend-drafterhost"),
        "{who}: {report}"
    );
    assert!(report["afterResume"]["error"].is_null(), "{who}: {report}");
}

/// The BeforeSuspend hook of the lab blueprint ran before the final stop.
fn check_before_suspend(report: &Value, who: &str) {
    assert_eq!(
        report["beforeSuspend"]["output"].as_str().map(str::trim),
        Some("suspend-drafterhost"),
        "{who}: {report}"
    );
    assert!(
        report["beforeSuspend"]["error"].is_null(),
        "{who}: {report}"
    );
}

impl Chain<'_> {
    fn peer(&self, name: &str, raddr: &str, ns: &str) -> Tool {
        Tool::start(
            "drafter-peer",
            &strings(&[
                "--raddr",
                raddr,
                "--laddr",
                "127.0.0.1:0",
                "--netns",
                ns,
                "--link-timeout",
                "120",
                "--resume-timeout",
                SLOW_GO,
                "--rescue-timeout",
                "1m",
                "--enable-output=false",
                "--concurrency",
                "16",
                "--work-dir",
                &self.dir.join(name).to_string_lossy(),
            ]),
        )
    }

    /// Checks, at the VM's Redis behind `port`, every key acknowledged so
    /// far and that both hooks left a new trace since the last check.
    fn check(&mut self, port: u16, hop: &str) -> usize {
        let mut redis = Redis::reach(port);
        let keys = redis.check_acked(&self.writer.acked(), hop);
        let counts = redis.hook_counts();
        assert!(
            counts.0 > self.counts.0 && counts.1 > self.counts.1,
            "{hop}: the hooks left no new trace: (BeforeSuspend, AfterResume) ran {:?} times before, {counts:?} now",
            self.counts
        );
        self.counts = counts;
        keys
    }

    /// Migrates the VM live from `from` (listening at `from_addr`) to a new
    /// peer `name` in `ns` (Redis at `port`) while the writer writes; checks
    /// the keys and hooks there. Returns the new peer and its address.
    fn hop(
        &mut self,
        from: &mut Tool,
        from_addr: &str,
        name: &str,
        ns: &str,
        port: u16,
        hop: &str,
    ) -> (Tool, String) {
        let started = Instant::now();
        let mut to = self.peer(name, from_addr, ns);
        let arrived = to.event("migrated-in");
        let left = from.event("migrated-out");
        check_after_resume(&arrived["report"], hop);
        check_before_suspend(&left["report"], hop);
        let keys = self.check(port, hop);
        let (gap, during) = self.writer.longest_gap_since(started);
        eprintln!(
            "chain: {hop}: downtime {} ms (source window {} ms; the writer saw no answer for {} ms), \
             BeforeSuspend {} ms, AfterResume {} ms, {} bytes in {} ms; {keys} acknowledged keys all \
             there ({during} acknowledged during the hop); hook counters {:?}",
            arrived["report"]["vmDowntimeMillis"],
            left["report"]["storage"]["downtimeMillis"],
            gap.as_millis(),
            left["report"]["beforeSuspend"]["millis"],
            arrived["report"]["afterResume"]["millis"],
            left["report"]["storage"]["bytesSent"],
            left["report"]["storage"]["totalMillis"],
            self.counts,
        );
        // The VM takes writes where it landed before it moves on.
        self.writer.wait_for_more(5);
        let addr = to.event("listening")["addr"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        (to, addr)
    }
}

fn chain(bp: &Path, dir: &Path, ns: [&str; 2], ports: [u16; 2]) {
    let start = Instant::now();
    let pkg = dir.join("package");
    // A small guest: every hop moves all of its memory.
    let snap = snapshot_package_sized(bp, &pkg, ns[0], 256, &[]);
    eprintln!("chain: snapshot in {} ms", snap["totalMs"]);

    let mut registry = Tool::start(
        "drafter-registry",
        &strings(&[
            "--json",
            "--laddr",
            "127.0.0.1:0",
            "--link-timeout",
            "120",
            "--devices",
            &package_json(&pkg, "input"),
        ]),
    );
    let listening = registry.event("listening");
    let registry_addr = listening["addr"].as_str().unwrap_or_default().to_owned();
    let mut chain = Chain {
        dir,
        writer: KeyWriter::start(ports),
        counts: (0, 0),
    };

    // Peer A pulls the package from the registry and resumes it.
    let mut a = chain.peer("peer-a", &registry_addr, ns[0]);
    let arrived = a.event("migrated-in");
    let served = registry.event("served");
    check_after_resume(&arrived["report"], "registry -> A");
    let a_addr = a.event("listening")["addr"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // The lab's /tmp is a tmpfs in its RAM: the package goes once A has it
    // (its small files are kept to compare with the terminator's output).
    drop(registry);
    let travelling: Vec<(&str, Option<Vec<u8>>)> = ["vmlinux", "initramfs", "config.json"]
        .iter()
        .map(|f| (*f, fs::read(pkg.join(f)).ok()))
        .collect();
    let _ = fs::remove_dir_all(&pkg);
    // The baseline of the hooks' counters (Redis may have come up only
    // after A's AfterResume: the snapshot is taken at liveness).
    chain.counts = Redis::reach(ports[0]).hook_counts();
    chain.writer.wait_for_more(5);
    eprintln!(
        "chain: registry -> A: {} bytes in {} ms, restore {} ms, AfterResume {} ms; hook counters {:?}",
        served["bytesSent"],
        served["totalMs"],
        arrived["report"]["restoreMillis"],
        arrived["report"]["afterResume"]["millis"],
        chain.counts
    );

    // A -> B -> C, live, while the writer writes.
    let (mut b, b_addr) = chain.hop(&mut a, &a_addr, "peer-b", ns[1], ports[1], "A -> B");
    a.exits_cleanly();
    let _ = fs::remove_dir_all(dir.join("peer-a"));
    let (mut c, c_addr) = chain.hop(&mut b, &b_addr, "peer-c", ns[0], ports[0], "B -> C");
    b.exits_cleanly();
    let _ = fs::remove_dir_all(dir.join("peer-b"));

    // C -> terminator: the VM ends in a package.
    let backup = dir.join("backup");
    let out = Command::new(bin("drafter-terminator"))
        .args(["--json", "--raddr", &c_addr, "--link-timeout", "120"])
        .args(["--devices", &package_json(&backup, "output")])
        .env("DRAFTER_SECRET", CHAIN_SECRET)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("drafter-terminator: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "drafter-terminator failed: {stdout}");
    let report: Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{stdout}: {e}"));
    let left = c.event("migrated-out");
    check_before_suspend(&left["report"], "C -> terminator");
    eprintln!(
        "chain: C -> terminator: {} bytes in {} ms (flush {} ms); C paused for {} ms after BeforeSuspend {} ms",
        report["bytesReceived"],
        report["totalMs"],
        report["syncMs"],
        left["report"]["storage"]["downtimeMillis"],
        left["report"]["beforeSuspend"]["millis"]
    );
    c.exits_cleanly();
    let _ = fs::remove_dir_all(dir.join("peer-c"));
    let sources: Vec<(&str, &str)> = report["devices"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| {
                    (
                        d["name"].as_str().unwrap_or_default(),
                        d["source"].as_str().unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(sources.len(), PACKAGE_FILES.len(), "{report}");
    assert!(sources.iter().all(|(_, s)| *s == "received"), "{report}");
    // The package's files travelled with the VM, unchanged.
    for (f, content) in &travelling {
        assert!(
            content.is_some() && fs::read(backup.join(f)).ok() == *content,
            "{f} changed on the way"
        );
    }

    // The runner resumes the backup with every key, and its AfterResume
    // (after C's BeforeSuspend) leaves its trace too.
    let mut runner = RunnerProcess::start(&runner_args(ns[1], &backup));
    let resumed = runner.event("resumed");
    assert_eq!(
        resumed["afterResumeOutput"].as_str().map(str::trim),
        Some("resumed-after-suspend-drafterhost"),
        "{resumed}"
    );
    let keys = chain.check(ports[1], "terminator -> runner");
    chain.writer.wait_for_more(5);
    let acked = chain.writer.stop();
    let all = Redis::reach(ports[1]).check_acked(&acked, "runner");
    eprintln!(
        "chain: runner resumed the backup in {} ms (AfterResume {} ms): {keys} keys acknowledged before \
         were there, {all} in all; hook counters {:?}",
        resumed["totalMs"], resumed["afterResumeMs"], chain.counts
    );
    runner.interrupt();
    eprintln!("chain: {} s in all", start.elapsed().as_secs());
}

/// `1` or `2`: the cgroup version this machine limits memory with.
fn cgroup_version() -> &'static str {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let v2 = info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        post.starts_with("cgroup2 ")
            .then(|| PathBuf::from(pre.split(' ').nth(4).unwrap_or_default()))
    });
    match v2.and_then(|m| fs::read_to_string(m.join("cgroup.controllers")).ok()) {
        Some(c) if c.split_whitespace().any(|x| x == "memory") => "2",
        _ => "1",
    }
}

/// The jailer flags of the jailed workflow: uid/gid 1000, jails in `base`.
fn jail_args(base: &Path) -> Vec<String> {
    strings(&[
        "--uid",
        "1000",
        "--gid",
        "1000",
        "--chroot-base-dir",
        base.to_str().unwrap_or_default(),
        "--cgroup-version",
        cgroup_version(),
    ])
}

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {key} in {status}"))
}

/// The jailed VM process of supervisor `pid` (its only child), checked from
/// outside: uid/gid 1000, no capabilities, no_new_privs, filtered vCPU
/// threads, a root holding only `/dev/kvm`, its `/tmp` and the package, and
/// a cgroup memory limit for a VM of `guest_bytes`.
fn check_jailed_vm(supervisor: u32, pkg: &Path, guest_bytes: u64) {
    let children = fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"))
        .unwrap_or_default();
    let pid: u32 = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("supervisor {supervisor} has no VM process"));
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    eprintln!("jailed VM process {pid}:\n{status}");
    assert_eq!(status_field(&status, "Uid:"), "1000\t1000\t1000\t1000");
    assert_eq!(status_field(&status, "Gid:"), "1000\t1000\t1000\t1000");
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(status_field(&status, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status_field(&status, "NoNewPrivs:"), "1");
    let mut vcpus = 0;
    for t in fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
    {
        let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim().starts_with("vcpu") {
            let st = fs::read_to_string(t.path().join("status")).unwrap_or_default();
            assert_eq!(status_field(&st, "Seccomp:"), "2", "{}", comm.trim());
            vcpus += 1;
        }
    }
    assert!(vcpus > 0, "no vCPU thread");
    // Its root: /dev/kvm, /tmp (vsock socket, state copy) and the package.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut stack = vec![root.clone()];
    let mut seen = Vec::new();
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap_or_else(|e| panic!("{e}")).flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            } else {
                let p = Path::new("/").join(e.path().strip_prefix(&root).unwrap_or(Path::new("")));
                seen.push(p);
            }
        }
    }
    eprintln!("the jail holds {seen:?}");
    for p in &seen {
        assert!(
            p == Path::new("/dev/kvm")
                || p.starts_with(pkg)
                || p.to_string_lossy().starts_with("/tmp/drafter-runner-"),
            "{} is in the jail",
            p.display()
        );
    }
    assert!(seen.contains(&pkg.join("memory.bin")));
    for absent in ["etc", "usr", "proc", "sys", "run"] {
        assert!(!root.join(absent).exists(), "/{absent} is in the jail");
    }
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let (mount, rel, file) = if cgroup_version() == "2" {
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mount = info
            .lines()
            .find_map(|l| {
                let (pre, post) = l.split_once(" - ")?;
                post.starts_with("cgroup2 ")
                    .then(|| PathBuf::from(pre.split(' ').nth(4).unwrap_or_default()))
            })
            .unwrap_or_default();
        let rel = cgroups
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or_default();
        (mount, rel.to_string(), "memory.max")
    } else {
        let rel = cgroups
            .lines()
            .find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
                ctrls
                    .split(',')
                    .any(|c| c == "memory")
                    .then(|| path.to_string())
            })
            .unwrap_or_default();
        (
            PathBuf::from("/sys/fs/cgroup/memory"),
            rel,
            "memory.limit_in_bytes",
        )
    };
    assert!(rel.starts_with("/drafter/drafter-runner-"), "{cgroups}");
    let limit =
        fs::read_to_string(mount.join(rel.trim_start_matches('/')).join(file)).unwrap_or_default();
    eprintln!(
        "cgroup v{} {rel}: {file} = {}",
        cgroup_version(),
        limit.trim()
    );
    assert_eq!(
        limit.trim(),
        drafter_jail::memory_limit(guest_bytes).to_string()
    );
}

fn jail_count(base: &Path) -> usize {
    fs::read_dir(base).map(|rd| rd.count()).unwrap_or(0)
}

#[test]
#[ignore = "lab"]
fn lab_workflow_jailed_snapshot_run_suspend_resume() {
    let bp = testing::lab_os_dir(&repo_root());
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        testing::lab_os_is_fresh(&bp, &exe) && redis_disk().is_file(),
        "no fresh blueprint in {}: run `cargo xtask lab-test lab_workflow` (it prepares one on the host)",
        bp.display()
    );
    let dir = std::env::temp_dir().join(format!("lab-jail-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    // Two namespaces: a migration's source and destination run the VM at
    // the same moment, and two VMs cannot share a tap.
    let ns = [
        format!("drafter-jl-{}", std::process::id()),
        format!("drafter-jm-{}", std::process::id()),
    ];
    let ok = |cmd: &str| assert!(sh(cmd).status.success(), "{cmd}");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for ns in &ns {
            ok(&format!("ip netns add {ns}"));
            ok(&format!(
                "ip -n {ns} tuntap add dev tap0 mode tap && ip -n {ns} addr add 172.16.0.1/30 dev tap0 && ip -n {ns} link set tap0 up && ip -n {ns} link set lo up"
            ));
        }
        jailed_workflow(&bp, &dir, [&ns[0], &ns[1]]);
    }));
    for ns in &ns {
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
    let _ = fs::remove_dir_all(&dir);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// Snapshotter and runner jailed (uid/gid 1000): the guest boots and is
/// snapshotted, resumed (checked from outside while it runs), suspended in
/// place with a Redis key written, and resumed again with the key there.
fn jailed_workflow(bp: &Path, dir: &Path, [ns, ns2]: [&str; 2]) {
    use std::os::unix::fs::MetadataExt;
    let pkg = dir.join("package");
    let base = dir.join("vms");
    let started = Instant::now();
    let snap = snapshot_package_with(bp, &pkg, ns, &jail_args(&base));
    eprintln!(
        "jailed snapshotter: boot to liveness {} ms, total {} ms",
        snap["bootToLivenessMs"], snap["totalMs"]
    );
    assert_eq!(
        snap["beforeSuspendOutput"].as_str().map(str::trim),
        Some("suspend-drafterhost"),
        "{snap}"
    );
    for (_, f) in PACKAGE_FILES {
        let m = fs::metadata(pkg.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!((m.uid(), m.gid()), (1000, 1000), "{f}");
    }
    assert_eq!(jail_count(&base), 0, "the snapshotter's jail was left");

    let args = [runner_args(ns, &pkg), jail_args(&base)].concat();
    let mut run = RunnerProcess::start(&args);
    run.event("resumed");
    let supervisor = run.child.0.as_ref().map(|c| c.id()).unwrap_or_default();
    check_jailed_vm(supervisor, &pkg, 512 << 20);
    assert_eq!(jail_count(&base), 1);
    redis(ns, "SET jailkey jailed-value", "+OK");
    let state_before = mtime(&pkg.join("state.bin"));
    run.interrupt();
    assert!(
        mtime(&pkg.join("state.bin")) > state_before,
        "not suspended in place"
    );
    assert_eq!(jail_count(&base), 0, "the runner's jail was left");

    let mut again = RunnerProcess::start(&args);
    again.event("resumed");
    redis(ns, "GET jailkey", "jailed-value");
    again.interrupt();
    assert_eq!(jail_count(&base), 0);

    // Jailed peers: A starts from the package's files, B takes the VM from
    // A live; B's VM process runs as uid 1000 without privileges, and the
    // keys moved with the VM.
    let peer_devices: Vec<Value> = PACKAGE_FILES
        .iter()
        .map(|(n, f)| json!({"name": n, "base": pkg.join(f)}))
        .collect();
    let peer = |name: &str, raddr: &str, ns: &str, extra: &[&str]| {
        let mut args = jail_args(&base);
        args.extend(strings(&[
            "--raddr",
            raddr,
            "--netns",
            ns,
            "--link-timeout",
            "120",
            "--resume-timeout",
            SLOW_GO,
            "--enable-output=false",
            "--work-dir",
            &dir.join(name).to_string_lossy(),
        ]));
        args.extend(strings(extra));
        Tool::start("drafter-peer", &args)
    };
    let devices = Value::Array(peer_devices).to_string();
    let mut a = peer(
        "peer-a",
        "",
        ns,
        &["--laddr", "127.0.0.1:0", "--devices", &devices],
    );
    a.event("running");
    let a_addr = a.event("listening")["addr"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    redis(ns, "SET jailkey2 moved-with-the-vm", "+OK");
    let mut b = peer("peer-b", &a_addr, ns2, &[]);
    let arrived = b.event("migrated-in");
    a.event("migrated-out");
    eprintln!(
        "jailed migration A -> B: VM downtime {} ms",
        arrived["report"]["vmDowntimeMillis"]
    );
    redis(ns2, "GET jailkey2", "moved-with-the-vm");
    redis(ns2, "GET jailkey", "jailed-value");
    let supervisor = b.child.0.as_ref().map(|c| c.id()).unwrap_or_default();
    let children = fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"))
        .unwrap_or_default();
    let vm = children.split_whitespace().next().unwrap_or_default();
    let status = fs::read_to_string(format!("/proc/{vm}/status")).unwrap_or_default();
    assert_eq!(
        status_field(&status, "Uid:"),
        "1000\t1000\t1000\t1000",
        "{status}"
    );
    assert_eq!(status_field(&status, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(&status, "NoNewPrivs:"), "1");
    drop(b);
    drop(a);
    eprintln!("jailed workflow took {} s", started.elapsed().as_secs());
}
