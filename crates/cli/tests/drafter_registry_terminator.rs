//! `drafter-registry` and `drafter-terminator` end to end on the host, and
//! their refusals of bad input (exit 1, one stderr line naming the problem,
//! nothing on disk changed): malformed `--devices`, a missing device or
//! device file, an unusable state, an address that cannot be listened on, a
//! registry that is not listening, a wrong secret.
//!
//! The package is a real snapshot: a tiny flat program booted on /dev/kvm
//! (the counting guest of `crates/vmm/tests/counting_guest`), paused and
//! snapshotted.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{assert_refused, ok, scratch, snapshot};
use drafter::package_config::{PackageConfig, PackageDrive, PACKAGE_FORMAT_VERSION};
use drafter_vmm::config::DriveConfig;
use drafter_vmm::{BuildOptions, VmConfig, Vmm};
use serde_json::{json, Value};

const REGISTRY: &str = env!("CARGO_BIN_EXE_drafter-registry");
const TERMINATOR: &str = env!("CARGO_BIN_EXE_drafter-terminator");
const SECRET: &str = "cli-registry-secret";

/// `out 0x3f8, 'R'`, then `loop { inc qword [0x200000] }` (the counting
/// guest of the VMM's host tests).
const COUNT: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0xb0, b'R', 0xee, 0x48, 0xc7, 0xc7, 0x00, 0x00, 0x20, 0x00, 0x48, 0xff,
    0x07, 0xeb, 0xfb,
];

/// Runs `bin` in `dir` with `args` (secret in the environment).
fn run_in(bin: &str, dir: &Path, args: &[&str], secret: &str) -> Output {
    ok(Command::new(bin)
        .args(args)
        .current_dir(dir)
        .env("DRAFTER_SECRET", secret)
        .env_remove("RUST_LOG")
        .output())
}

/// Asserts that `bin` refuses `args` with every `want` in one line and
/// leaves everything under `dir` as it was.
fn refuses(bin: &str, dir: &Path, args: &[&str], want: &[&str]) {
    let before = snapshot(dir);
    let out = run_in(bin, dir, args, SECRET);
    assert_refused(&out, args, want);
    assert!(
        snapshot(dir) == before,
        "{args:?} changed files under {}",
        dir.display()
    );
}

/// A package in `dir/pkg`: state, memory, a writable disk, config, kernel.
fn package(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let pkg = dir.join("pkg");
    ok(std::fs::create_dir_all(&pkg));
    let disk = pkg.join("rootfs.ext4");
    let data: Vec<u8> = (0..600_000u32).map(|i| (i * 13 % 251) as u8).collect();
    ok(std::fs::write(&disk, data));
    let mut c = VmConfig::new("/nonexistent-flat-program");
    c.memory_mib = 32;
    c.drives = vec![DriveConfig {
        name: "disk".into(),
        path: disk.clone(),
        read_only: false,
    }];
    let (tx, rx) = std::sync::mpsc::channel::<u8>();
    struct Chan(std::sync::mpsc::Sender<u8>);
    impl std::io::Write for Chan {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            for b in buf {
                let _ = self.0.send(*b);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut vmm = ok(Vmm::boot(
        c,
        BuildOptions {
            console: Some(Box::new(Chan(tx))),
            shared_memory_file: None,
            flat_program: Some(COUNT.to_vec()),
        },
    ));
    assert_eq!(rx.recv_timeout(Duration::from_secs(20)).ok(), Some(b'R'));
    ok(vmm.pause());
    let (state, memory) = (pkg.join("state.bin"), pkg.join("memory.bin"));
    ok(vmm.snapshot(&state, &memory));
    vmm.stop();
    let config = pkg.join("config.json");
    let pc = PackageConfig {
        format_version: PACKAGE_FORMAT_VERSION,
        agent_vsock_port: 26,
        liveness_vsock_port: 25,
        cpu_count: 1,
        memory_size: 32,
        boot_args: String::new(),
        initramfs: false,
        drives: vec![PackageDrive {
            name: "disk".into(),
            read_only: false,
        }],
        vsock_cid: 3,
        network: None,
        cpu_template: "None".into(),
    };
    ok(std::fs::write(&config, pc.to_json()));
    let kernel = pkg.join("vmlinux");
    ok(std::fs::write(&kernel, vec![0x5a; 123_457]));
    vec![
        ("state", state),
        ("memory", memory),
        ("kernel", kernel),
        ("disk", disk),
        ("config", config),
    ]
}

fn registry_json(devs: &[(&str, PathBuf)]) -> String {
    let list: Vec<Value> = devs
        .iter()
        .map(|(n, p)| json!({"name": n, "input": p, "blockSize": 65536}))
        .collect();
    Value::Array(list).to_string()
}

fn terminator_json(out: &Path, names: &[&str]) -> String {
    let list: Vec<Value> = names
        .iter()
        .map(|n| json!({"name": n, "output": out.join(n)}))
        .collect();
    Value::Array(list).to_string()
}

/// A running `drafter-registry --json`, killed when dropped.
struct RegistryProcess {
    child: Child,
    addr: String,
    lines: std::sync::mpsc::Receiver<Value>,
}

impl RegistryProcess {
    fn start(dir: &Path, devices: &str) -> Self {
        let mut child = ok(Command::new(REGISTRY)
            .args(["--json", "--laddr", "127.0.0.1:0", "--devices", devices])
            .current_dir(dir)
            .env("DRAFTER_SECRET", SECRET)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .spawn());
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v: Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let listening = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("drafter-registry did not start: {e}"));
        assert_eq!(listening["event"], "listening", "{listening}");
        let wire: Vec<&str> = listening["devices"]
            .as_array()
            .map(|a| a.iter().filter_map(|d| d["wireName"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(
            wire,
            [
                "state",
                "drive/disk",
                "memory",
                "file/kernel",
                "file/config"
            ]
        );
        let addr = listening["addr"].as_str().unwrap_or_default().to_owned();
        RegistryProcess { child, addr, lines }
    }

    fn next(&self) -> Value {
        self.lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("no report from drafter-registry: {e}"))
    }
}

impl Drop for RegistryProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_terminator_pulls_a_package_from_a_registry_byte_for_byte_and_a_wrong_secret_is_refused() {
    let dir = scratch("drafter-registry", "e2e");
    let devs = package(&dir);
    let registry = RegistryProcess::start(&dir, &registry_json(&devs));
    let out = dir.join("out");
    let names = ["state", "memory", "kernel", "disk", "config"];
    let tj = terminator_json(&out, &names);

    // A wrong secret: one line, nothing written, the registry serves on.
    refuses(
        TERMINATOR,
        &dir,
        &[
            "--raddr",
            &registry.addr,
            "--devices",
            &tj,
            "--secret",
            "wrong",
        ],
        &["authentication failed"],
    );
    let failed = registry.next();
    assert_eq!(failed["event"], "failed", "{failed}");

    let got = run_in(
        TERMINATOR,
        &dir,
        &["--json", "--raddr", &registry.addr, "--devices", &tj],
        SECRET,
    );
    let stdout = String::from_utf8_lossy(&got.stdout);
    assert!(
        got.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&got.stderr)
    );
    let report: Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{stdout}: {e}"));
    let written: Vec<&str> = report["devices"]
        .as_array()
        .map(|a| a.iter().filter_map(|d| d["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(written, names);
    assert!(
        report["bytesReceived"].as_u64().unwrap_or(0) > 600_000,
        "{report}"
    );
    assert!(report["totalMs"].as_f64().is_some(), "{report}");
    for (name, path) in &devs {
        assert!(
            std::fs::read(out.join(name)).ok() == std::fs::read(path).ok(),
            "{name} is not byte-identical"
        );
    }
    let served = registry.next();
    assert_eq!(served["event"], "served", "{served}");
    assert!(
        served["bytesSent"].as_u64().unwrap_or(0) > 600_000,
        "{served}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_registry_refuses_bad_input() {
    let dir = scratch("drafter-registry", "bad");
    let devs = package(&dir);
    let good = registry_json(&devs);
    let with = |f: &dyn Fn(&mut Vec<Value>)| {
        let mut v: Vec<Value> = serde_json::from_str(&good).unwrap_or_default();
        f(&mut v);
        Value::Array(v).to_string()
    };
    let laddr = ["--laddr", "127.0.0.1:0"];
    let r = |devices: &str, want: &[&str]| {
        let mut args = vec!["--devices", devices];
        args.extend(laddr);
        refuses(REGISTRY, &dir, &args, want);
    };
    r("[{\"name\":", &["invalid --devices JSON"]);
    r(
        &with(&|v| v.retain(|d| d["name"] != "memory")),
        &["missing required device(s) memory"],
    );
    // The state names the drive "disk": it must be served.
    r(
        &with(&|v| v.retain(|d| d["name"] != "disk")),
        &["missing required device(s) disk"],
    );
    r(
        &with(&|v| v[3]["input"] = json!(dir.join("nope.ext4"))),
        &["device \"disk\"", "nope.ext4", "No such file"],
    );
    r(
        &with(&|v| v[0]["blockSize"] = json!(1000)),
        &["\"state\" has an invalid block size 1000"],
    );
    r(
        &with(&|v| v[0]["input"] = v[2]["input"].clone()),
        &["devices \"state\" and \"kernel\" use the same file"],
    );
    let junk = dir.join("junk-state.bin");
    ok(std::fs::write(&junk, b"not a state file"));
    r(
        &with(&|v| v[0]["input"] = json!(junk)),
        &["device \"state\"", "junk-state.bin"],
    );
    let short = dir.join("short.bin");
    ok(std::fs::write(&short, vec![0u8; 4096]));
    r(
        &with(&|v| v[1]["input"] = json!(short)),
        &["memory file", "short.bin", "holds 4096 bytes"],
    );
    // The reference's defaults point at out/package/: not there.
    refuses(
        REGISTRY,
        &dir,
        &laddr,
        &["device \"state\"", "out/package/state.bin"],
    );
    let busy = ok(std::net::TcpListener::bind("127.0.0.1:0"));
    let busy_addr = ok(busy.local_addr()).to_string();
    refuses(
        REGISTRY,
        &dir,
        &["--devices", &good, "--laddr", &busy_addr],
        &["cannot listen on", &busy_addr],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_terminator_refuses_bad_input() {
    let dir = scratch("drafter-terminator", "bad");
    let out = dir.join("out");
    let tj = terminator_json(&out, &["state", "memory", "disk"]);
    let port = ok(std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port()));
    let closed = format!("127.0.0.1:{port}");
    refuses(
        TERMINATOR,
        &dir,
        &["--raddr", &closed, "--devices", &tj],
        &["cannot connect to", &closed, "refused"],
    );
    refuses(
        TERMINATOR,
        &dir,
        &["--raddr", &closed, "--devices", "[{\"name\":"],
        &["invalid --devices JSON"],
    );
    refuses(
        TERMINATOR,
        &dir,
        &[
            "--raddr",
            &closed,
            "--devices",
            &terminator_json(&out, &["state", "disk"]),
        ],
        &["missing required device(s) memory"],
    );
    refuses(
        TERMINATOR,
        &dir,
        &[
            "--raddr",
            &closed,
            "--devices",
            r#"[{"name":"state","output":"a"},{"name":"memory","output":"a"}]"#,
        ],
        &["use the same file a"],
    );
    // The default --raddr (localhost:1337) with nobody there.
    let listening = std::net::TcpStream::connect("localhost:1337").is_ok();
    if !listening {
        refuses(TERMINATOR, &dir, &[], &["cannot connect to localhost:1337"]);
    }
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
