//! Lab test of the Drafter workflow (issue 10, done-when 1 and 4): the real
//! `drafter-snapshotter` turns the `os` blueprint plus a Redis OCI disk into
//! a package; `drafter-packager` archives it and extracts it elsewhere;
//! `drafter-runner` resumes the extracted package, a key is written into Redis, SIGINT suspends the VM into the package,
//! a second runner resumes it and the key is still there. The agent hooks'
//! output (BeforeSuspend writes a file, AfterResume prints what it found)
//! shows up in the tools' reports.
//!
//! `prepare_lab_workflow` runs on the host first (`cargo xtask lab-test
//! lab_workflow`): it builds the binaries, the shared `os` blueprint
//! (`target/blueprint/lab-os`, the same one `lab_os` uses) and the Redis disk.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
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
        .args(["--netns", ns, "--memory-size", "512", "--json"])
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
        snap["boot_to_liveness_ms"],
        snap["before_suspend_ms"],
        snap["snapshot_ms"],
        snap["total_ms"]
    );
    assert_eq!(
        snap["before_suspend_output"].as_str().map(str::trim),
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
        resumed["total_ms"],
        resumed["restore_ms"],
        resumed["resume_ms"],
        resumed["after_resume_ms"]
    );
    assert_eq!(
        resumed["after_resume_output"].as_str().map(str::trim),
        Some("resumed-after-suspend-drafterhost"),
        "{resumed}"
    );
    redis(ns, "PING", "+PONG");
    redis(ns, "SET drafter-key written-in-run-1", "+OK");
    let state_before = mtime(&p("state.bin"));
    std::thread::sleep(Duration::from_millis(20));
    let suspended = first.interrupt();
    eprintln!(
        "runner 1: suspended in {} ms (BeforeSuspend {} ms, state+memory+disks {} ms)",
        suspended["total_ms"], suspended["before_suspend_ms"], suspended["suspend_ms"]
    );
    assert_eq!(
        suspended["before_suspend_output"].as_str().map(str::trim),
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
        resumed["total_ms"],
        resumed["restore_ms"],
        resumed["resume_ms"],
        resumed["after_resume_ms"]
    );
    assert_eq!(
        resumed["after_resume_output"].as_str().map(str::trim),
        Some("resumed-after-suspend-drafterhost"),
        "{resumed}"
    );
    redis(ns, "GET drafter-key", "written-in-run-1");
    second.interrupt();
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
    // Two namespaces: peers A and B run the VM at the same moment during
    // their handover, and two VMs cannot share a tap.
    let id = std::process::id();
    let (ns1, ns2) = (format!("drafter-c1-{id}"), format!("drafter-c2-{id}"));
    let ok = |cmd: &str| assert!(sh(cmd).status.success(), "{cmd}");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for ns in [&ns1, &ns2] {
            ok(&format!("ip netns add {ns}"));
            ok(&format!(
                "ip -n {ns} tuntap add dev tap0 mode tap && ip -n {ns} addr add 172.16.0.1/30 dev tap0 && ip -n {ns} link set tap0 up && ip -n {ns} link set lo up"
            ));
        }
        chain(&bp, &dir, &ns1, &ns2);
    }));
    for ns in [&ns1, &ns2] {
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
    let _ = fs::remove_dir_all(&dir);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn chain(bp: &Path, dir: &Path, ns1: &str, ns2: &str) {
    let start = Instant::now();
    let pkg = dir.join("package");
    let snap = snapshot_package(bp, &pkg, ns1);
    eprintln!("chain: snapshot in {} ms", snap["total_ms"]);
    // A key written before the package's last snapshot: the runner's
    // suspend into the package.
    let mut runner = RunnerProcess::start(&runner_args(ns1, &pkg));
    runner.event("resumed");
    redis(ns1, "SET key-1 before-the-snapshot", "+OK");
    runner.interrupt();

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

    let peer = |name: &str, raddr: &str, ns: &str| {
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
                "--work-dir",
                &dir.join(name).to_string_lossy(),
            ]),
        )
    };
    // Peer A pulls the package from the registry and resumes it.
    let mut a = peer("peer-a", &registry_addr, ns1);
    let arrived = a.event("migrated-in");
    let served = registry.event("served");
    eprintln!(
        "chain: registry -> A: {} bytes in {} ms, restore {} ms",
        served["bytesSent"], served["totalMs"], arrived["report"]["restoreMillis"]
    );
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
    redis(ns1, "GET key-1", "before-the-snapshot");
    redis(ns1, "SET key-2 on-peer-a", "+OK");

    // A -> B, live.
    let mut b = peer("peer-b", &a_addr, ns2);
    let arrived = b.event("migrated-in");
    let left = a.event("migrated-out");
    eprintln!(
        "chain: A -> B: downtime {} ms (source window {} ms), {} bytes, total {} ms",
        arrived["report"]["vmDowntimeMillis"],
        left["report"]["storage"]["downtimeMillis"],
        left["report"]["storage"]["bytesSent"],
        left["report"]["storage"]["totalMillis"]
    );
    a.exits_cleanly();
    let _ = fs::remove_dir_all(dir.join("peer-a"));
    let b_addr = b.event("listening")["addr"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    redis(ns2, "GET key-1", "before-the-snapshot");
    redis(ns2, "GET key-2", "on-peer-a");
    redis(ns2, "SET key-3 on-peer-b", "+OK");

    // B -> terminator: the VM ends in a package.
    let backup = dir.join("backup");
    let out = Command::new(bin("drafter-terminator"))
        .args(["--json", "--raddr", &b_addr, "--link-timeout", "120"])
        .args(["--devices", &package_json(&backup, "output")])
        .env("DRAFTER_SECRET", CHAIN_SECRET)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("drafter-terminator: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "drafter-terminator failed: {stdout}");
    let report: Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{stdout}: {e}"));
    let left = b.event("migrated-out");
    eprintln!(
        "chain: B -> terminator: {} bytes in {} ms (flush {} ms); B paused for {} ms",
        report["bytesReceived"],
        report["totalMs"],
        report["syncMs"],
        left["report"]["storage"]["downtimeMillis"]
    );
    b.exits_cleanly();
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

    // The runner resumes the backup with every key.
    let mut runner = RunnerProcess::start(&runner_args(ns1, &backup));
    let resumed = runner.event("resumed");
    eprintln!(
        "chain: runner resumed the backup in {} ms",
        resumed["total_ms"]
    );
    redis(ns1, "GET key-1", "before-the-snapshot");
    redis(ns1, "GET key-2", "on-peer-a");
    redis(ns1, "GET key-3", "on-peer-b");
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
    let ns = format!("drafter-jl-{}", std::process::id());
    let ok = |cmd: &str| assert!(sh(cmd).status.success(), "{cmd}");
    ok(&format!("ip netns add {ns}"));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ok(&format!(
            "ip -n {ns} tuntap add dev tap0 mode tap && ip -n {ns} addr add 172.16.0.1/30 dev tap0 && ip -n {ns} link set tap0 up && ip -n {ns} link set lo up"
        ));
        jailed_workflow(&bp, &dir, &ns);
    }));
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    let _ = fs::remove_dir_all(&dir);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// Snapshotter and runner jailed (uid/gid 1000): the guest boots and is
/// snapshotted, resumed (checked from outside while it runs), suspended in
/// place with a Redis key written, and resumed again with the key there.
fn jailed_workflow(bp: &Path, dir: &Path, ns: &str) {
    use std::os::unix::fs::MetadataExt;
    let pkg = dir.join("package");
    let base = dir.join("vms");
    let started = Instant::now();
    let snap = snapshot_package_with(bp, &pkg, ns, &jail_args(&base));
    eprintln!(
        "jailed snapshotter: boot to liveness {} ms, total {} ms",
        snap["boot_to_liveness_ms"], snap["total_ms"]
    );
    assert_eq!(
        snap["before_suspend_output"].as_str().map(str::trim),
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
    eprintln!("jailed workflow took {} s", started.elapsed().as_secs());
}
