//! Jailed VMs on the host (issue 12 item 1): `drafter-vmm` and
//! `drafter-runner` run a counting guest with `--uid 1000 --gid 1000
//! --chroot-base-dir <tmp>`; seen from outside, the VM process has uid/gid
//! 1000, no capabilities, `NoNewPrivs: 1`, a vCPU thread with `Seccomp: 2`,
//! a root holding only its files and `/dev/kvm`, and its own cgroup with the
//! memory limit; the guest counts, snapshots and suspends in place (outputs
//! at their usual paths, owned by 1000); the jail and the cgroup are gone
//! once the command exits, and a jail left by a `kill -9` is removed by the
//! next start while a live one is kept.
//!
//! The cgroup version is the one this host can limit memory with: v2 when
//! its unified hierarchy has the memory controller, else v1.

mod common;

#[path = "../../vmm/tests/counting_guest/mod.rs"]
mod counting_guest;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ok, s, scratch};
use drafter_vmm::config::VsockConfig;
use drafter_vmm::{BuildOptions, VmConfig, Vmm};

const UID: u32 = 1000;
const GUEST_MIB: u64 = 32;

/// `1` or `2`: the cgroup version this host limits memory with.
fn cgroup_version() -> &'static str {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let v2 = info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        post.starts_with("cgroup2 ")
            .then(|| PathBuf::from(pre.split(' ').nth(4).unwrap_or_default()))
    });
    match v2.and_then(|m| std::fs::read_to_string(m.join("cgroup.controllers")).ok()) {
        Some(c) if c.split_whitespace().any(|x| x == "memory") => "2",
        _ => "1",
    }
}

fn jail_args(base: &Path) -> Vec<String> {
    vec![
        "--uid".into(),
        UID.to_string(),
        "--gid".into(),
        UID.to_string(),
        "--chroot-base-dir".into(),
        s(base).into(),
        "--cgroup-version".into(),
        cgroup_version().into(),
    ]
}

/// A snapshot of the counting guest in `dir` (state, mem), with a vsock
/// device when `vsock` (a package's VM has one).
fn counting_snapshot(dir: &Path, vsock: bool) -> (PathBuf, PathBuf) {
    let mut c = VmConfig::new("/nonexistent-flat-program");
    c.memory_mib = GUEST_MIB;
    c.serial.stdout = false;
    if vsock {
        c.vsock = Some(VsockConfig {
            cid: 3,
            uds_path: dir.join("snapshot-vsock.sock"),
        });
    }
    let (out, rx) = counting_guest::console();
    let mut vmm = ok(Vmm::boot(
        c,
        BuildOptions {
            console: Some(out),
            flat_program: Some(counting_guest::COUNT.to_vec()),
            ..Default::default()
        },
    ));
    assert_eq!(rx.recv_timeout(Duration::from_secs(20)).ok(), Some(b'R'));
    counting_guest::wait_counter_past(&vmm, 1000);
    ok(vmm.pause());
    let (state, mem) = (dir.join("state.bin"), dir.join("memory.bin"));
    ok(vmm.snapshot(&state, &mem));
    vmm.stop();
    (state, mem)
}

/// The guest's counter as stored in its memory file.
fn counter_in(mem: &Path) -> u64 {
    let mut f = ok(std::fs::File::open(mem));
    let mut b = [0u8; 8];
    ok(std::io::Seek::seek(
        &mut f,
        std::io::SeekFrom::Start(counting_guest::COUNTER),
    ));
    ok(f.read_exact(&mut b));
    u64::from_le_bytes(b)
}

/// Waits (bounded) until `f` holds.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The VM process: the supervisor's only child.
fn vm_pid(supervisor: u32) -> u32 {
    let path = format!("/proc/{supervisor}/task/{supervisor}/children");
    let mut pid = 0;
    wait_for("the VM process", || {
        pid = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        pid != 0
    });
    pid
}

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {key} in status"))
}

/// Checks the VM process `pid` from outside: identity, capabilities,
/// no_new_privs, a filtered vCPU thread; returns its cgroup memory limit.
fn check_confined(pid: u32) -> u64 {
    let status = ok(std::fs::read_to_string(format!("/proc/{pid}/status")));
    let ids = format!("{UID}\t{UID}\t{UID}\t{UID}");
    assert_eq!(status_field(&status, "Uid:"), ids, "{status}");
    assert_eq!(status_field(&status, "Gid:"), ids, "{status}");
    assert_eq!(status_field(&status, "Groups:"), "", "{status}");
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(status_field(&status, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status_field(&status, "NoNewPrivs:"), "1");
    let mut vcpu_modes = Vec::new();
    for t in ok(std::fs::read_dir(format!("/proc/{pid}/task"))).flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim().starts_with("vcpu") {
            let st = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            vcpu_modes.push(status_field(&st, "Seccomp:"));
        }
    }
    assert!(
        !vcpu_modes.is_empty() && vcpu_modes.iter().all(|m| m == "2"),
        "vCPU threads' seccomp modes: {vcpu_modes:?}"
    );
    let cgroups = ok(std::fs::read_to_string(format!("/proc/{pid}/cgroup")));
    let (rel, file) = match cgroup_version() {
        "2" => (
            cgroups
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(str::to_string),
            "memory.max",
        ),
        _ => (
            cgroups.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
                ctrls
                    .split(',')
                    .any(|c| c == "memory")
                    .then(|| path.to_string())
            }),
            "memory.limit_in_bytes",
        ),
    };
    let rel = rel.unwrap_or_else(|| panic!("no memory cgroup in {cgroups}"));
    assert!(rel.starts_with("/drafter/"), "{rel}");
    let mount = if cgroup_version() == "2" {
        cgroup2_mount()
    } else {
        PathBuf::from("/sys/fs/cgroup/memory")
    };
    let limit = ok(std::fs::read_to_string(
        mount.join(rel.trim_start_matches('/')).join(file),
    ));
    ok(limit.trim().parse::<u64>())
}

fn cgroup2_mount() -> PathBuf {
    let info = ok(std::fs::read_to_string("/proc/self/mountinfo"));
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            post.starts_with("cgroup2 ")
                .then(|| PathBuf::from(pre.split(' ').nth(4).unwrap_or_default()))
        })
        .unwrap_or_else(|| panic!("no cgroup2 mount"))
}

/// Every path under the VM process's root that is not a directory.
fn jail_contents(pid: u32) -> BTreeSet<PathBuf> {
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut out = BTreeSet::new();
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for e in ok(std::fs::read_dir(&d)).flatten() {
            let p = e.path();
            let ft = ok(e.file_type());
            if ft.is_dir() {
                stack.push(p);
            } else {
                out.insert(Path::new("/").join(ok(p.strip_prefix(&root))));
            }
        }
    }
    out
}

struct Control {
    out: UnixStream,
    replies: BufReader<UnixStream>,
}

impl Control {
    fn connect(path: &Path, child: &mut Child) -> Control {
        wait_for("the control socket", || {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(e) = child.stderr.as_mut() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("drafter-vmm exited early: {status}: {err}");
            }
            UnixStream::connect(path).is_ok()
        });
        let c = ok(UnixStream::connect(path));
        let replies = BufReader::new(ok(c.try_clone()));
        Control { out: c, replies }
    }

    fn ask(&mut self, line: &str) -> String {
        ok(writeln!(self.out, "{line}"));
        let mut reply = String::new();
        ok(self.replies.read_line(&mut reply));
        reply.trim().to_string()
    }
}

/// A jailed `drafter-vmm` running the counting guest from `vm/` (memory
/// mapped shared from `vm/memory.bin`), with its control socket there.
fn start_jailed_vmm(vm: &Path, base: &Path) -> (Child, Control) {
    let sock = vm.join("control.sock");
    let mut child = ok(Command::new(env!("CARGO_BIN_EXE_drafter-vmm"))
        .args(["--restore-state", s(&vm.join("state.bin"))])
        .args(["--restore-memory", s(&vm.join("memory.bin"))])
        .args(["--memory-mode", "shared", "--no-serial-stdout"])
        .args(["--control-socket", s(&sock)])
        .args(jail_args(base))
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn());
    let mut ctl = Control::connect(&sock, &mut child);
    // Answered once the VM runs (the socket exists before).
    assert_eq!(ctl.ask("msync"), "ok");
    (child, ctl)
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn a_jailed_vmm_is_confined_counts_snapshots_and_leaves_nothing_behind() {
    let d = scratch("jail", "vmm");
    let vm = d.join("vm");
    ok(std::fs::create_dir_all(&vm));
    counting_snapshot(&vm, false);
    let base = d.join("vms");
    let (mut child, mut ctl) = start_jailed_vmm(&vm, &base);
    let pid = vm_pid(child.id());

    let limit = check_confined(pid);
    assert_eq!(limit, drafter_jail::memory_limit(GUEST_MIB << 20));

    // The jail on disk: <base>/<vm-id>/root, and the record.
    let jails = entries(&base);
    assert_eq!(jails.len(), 1, "{jails:?}");
    let vm_id = jails[0].file_name().and_then(|n| n.to_str()).unwrap_or("");
    assert!(vm_id.starts_with("drafter-vmm-"), "{vm_id}");
    assert!(jails[0].join("root").is_dir() && jails[0].join("jail.json").is_file());

    // Its root: /dev/kvm and the VM's directory, nothing else.
    let seen = jail_contents(pid);
    let vm_abs = vm.to_path_buf();
    let expected: BTreeSet<PathBuf> = [
        PathBuf::from("/dev/kvm"),
        vm_abs.join("state.bin"),
        vm_abs.join("memory.bin"),
        vm_abs.join("control.sock"),
    ]
    .into();
    assert_eq!(seen, expected);
    let kvm = ok(std::fs::metadata(format!("/proc/{pid}/root/dev/kvm")));
    assert!(kvm.file_type().is_char_device());
    assert_eq!((kvm.uid(), kvm.gid()), (UID, UID));
    assert!(!Path::new(&format!("/proc/{pid}/root/etc")).exists());
    assert!(!Path::new(&format!("/proc/{pid}/root{}", s(&base))).exists());

    // The guest counts into the package's memory file.
    let sock = ok(std::fs::metadata(vm.join("control.sock")));
    assert_eq!(sock.uid(), UID);
    assert_eq!(ctl.ask("msync"), "ok");
    let first = counter_in(&vm.join("memory.bin"));
    wait_for("the guest to count", || {
        ctl.ask("msync") == "ok" && counter_in(&vm.join("memory.bin")) > first
    });

    // A snapshot into the VM's directory lands at the usual path, owned by
    // the VM's uid; one outside it is refused.
    assert_eq!(ctl.ask("pause"), "ok");
    assert_eq!(ctl.ask("snapshot s2 m2"), "ok");
    for f in ["s2", "m2"] {
        let m = ok(std::fs::metadata(vm.join(f)));
        assert_eq!((m.uid(), m.gid()), (UID, UID), "{f}");
        assert!(m.len() > 0);
    }
    assert_eq!(ok(std::fs::metadata(vm.join("m2"))).len(), GUEST_MIB << 20);
    assert_eq!(ctl.ask("resume"), "ok");
    assert_eq!(ctl.ask("stop"), "ok");
    let status = ok(child.wait());
    assert_eq!(status.code(), Some(0));

    // Nothing left: the jail directory and the cgroup are gone.
    assert!(entries(&base).is_empty(), "{:?}", entries(&base));
    let cg = if cgroup_version() == "2" {
        cgroup2_mount().join("drafter").join(vm_id)
    } else {
        PathBuf::from("/sys/fs/cgroup/memory/drafter").join(vm_id)
    };
    assert!(!cg.exists(), "{} still exists", cg.display());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_jail_left_by_kill_9_is_removed_on_the_next_start_and_a_live_one_is_kept() {
    let d = scratch("jail", "kill9");
    let base = d.join("vms");
    let mut vms = Vec::new();
    for name in ["a", "b", "c"] {
        let vm = d.join(name);
        ok(std::fs::create_dir_all(&vm));
        counting_snapshot(&vm, false);
        vms.push(vm);
    }
    let (mut a, _ctl_a) = start_jailed_vmm(&vms[0], &base);
    let a_vm = vm_pid(a.id());
    let (mut b, mut ctl_b) = start_jailed_vmm(&vms[1], &base);
    let b_vm = vm_pid(b.id());
    assert_eq!(entries(&base).len(), 2);
    let jail_of = |vm_pid: u32| {
        entries(&base)
            .into_iter()
            .find(|j| {
                std::fs::read_to_string(j.join("jail.json"))
                    .unwrap_or_default()
                    .contains(&format!("\"vm\":{{\"pid\":{vm_pid},"))
            })
            .unwrap_or_else(|| panic!("no jail records VM pid {vm_pid}"))
    };
    let (jail_a, jail_b) = (jail_of(a_vm), jail_of(b_vm));

    // kill -9 of A's supervisor: its VM process dies with it, the jail stays.
    ok(a.kill());
    ok(a.wait());
    wait_for("A's VM process to die", || {
        !Path::new(&format!("/proc/{a_vm}")).exists()
            || std::fs::read_to_string(format!("/proc/{a_vm}/stat"))
                .is_ok_and(|s| s.contains(") Z"))
    });
    assert!(jail_a.exists());

    // The next start removes A's jail and keeps B's (its VM runs).
    let (mut c, mut ctl_c) = start_jailed_vmm(&vms[2], &base);
    let c_vm = vm_pid(c.id());
    assert!(!jail_a.exists(), "the dead VM's jail is still there");
    assert!(jail_b.exists(), "the live VM's jail was removed");
    let jail_c = jail_of(c_vm);
    assert_eq!(entries(&base).len(), 2);
    assert_eq!(ctl_b.ask("msync"), "ok");

    for (child, ctl) in [(&mut b, &mut ctl_b), (&mut c, &mut ctl_c)] {
        assert_eq!(ctl.ask("stop"), "ok");
        assert_eq!(ok(child.wait()).code(), Some(0));
    }
    assert!(!jail_b.exists() && !jail_c.exists());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_jailed_runner_suspends_in_place_into_the_package() {
    let d = scratch("jail", "runner");
    let pkg = d.join("pkg");
    ok(std::fs::create_dir_all(&pkg));
    let (state, memory) = counting_snapshot(&pkg, true);
    let config = pkg.join("config.json");
    let pc = drafter::package_config::PackageConfig {
        format_version: drafter::package_config::PACKAGE_FORMAT_VERSION,
        agent_vsock_port: 26,
        liveness_vsock_port: 25,
        cpu_count: 1,
        memory_size: GUEST_MIB,
        boot_args: String::new(),
        initramfs: false,
        drives: Vec::new(),
        vsock_cid: 3,
        network: None,
        cpu_template: "None".into(),
    };
    ok(std::fs::write(&config, pc.to_json()));
    let before = counter_in(&memory);
    let old_state = ok(std::fs::metadata(&state)).ino();
    let devices = serde_json::json!([
        {"name": "state", "path": state},
        {"name": "memory", "path": memory},
        {"name": "config", "path": config},
    ])
    .to_string();
    let base = d.join("vms");
    // The counting guest has no agent: AfterResume times out and the runner
    // suspends the VM back into the package (its rescue), jailed.
    let out = ok(Command::new(env!("CARGO_BIN_EXE_drafter-runner"))
        .args([
            "--devices",
            &devices,
            "--netns",
            "",
            "--enable-output=false",
        ])
        .args(["--resume-timeout", "300ms", "--rescue-timeout", "300ms"])
        .args(jail_args(&base))
        .env_remove("RUST_LOG")
        .output());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the VM was suspended back into the package"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let new_state = ok(std::fs::metadata(&state));
    assert_ne!(new_state.ino(), old_state, "the state was not replaced");
    assert_eq!((new_state.uid(), new_state.gid()), (UID, UID));
    assert!(counter_in(&memory) > before, "the guest did not run");
    assert!(!pkg.join("state.bin.partial").exists());
    assert!(entries(&base).is_empty(), "{:?}", entries(&base));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn jail_flags_that_cannot_work_are_refused_in_one_line() {
    let d = scratch("jail", "refused");
    let vm = d.join("vm");
    ok(std::fs::create_dir_all(&vm));
    ok(std::fs::write(vm.join("state.bin"), b"junk"));
    let base = d.join("vms");
    let bin = env!("CARGO_BIN_EXE_drafter-vmm");
    for (extra, want) in [
        (["--cgroup-version", "3"], "cgroup version 3"),
        (["--numa-node", "4095"], "NUMA node 4095 does not exist"),
        (["--cgroup-version", "1"], "/nonexistent"),
    ] {
        let mut args = vec!["--kernel", "/nonexistent", "--chroot-base-dir", s(&base)];
        args.extend(["--uid", "1000", "--gid", "1000"]);
        args.extend_from_slice(&extra);
        let out = common::run(bin, &args);
        common::assert_refused(&out, &args, &[want]);
    }
    if cgroup_version() == "1" {
        // This host's controllers are bound to cgroup v1: v2 cannot limit.
        let kernel = d.join("kernel");
        ok(std::fs::write(&kernel, b"not a kernel"));
        let mut args = vec!["--kernel", s(&kernel), "--chroot-base-dir", s(&base)];
        args.extend(["--uid", "1000", "--gid", "1000", "--cgroup-version", "2"]);
        let out = common::run(bin, &args);
        common::assert_refused(
            &out,
            &args,
            &["has no memory controller", "--cgroup-version 1"],
        );
    }
    assert!(entries(&base).is_empty(), "{:?}", entries(&base));
    let _ = std::fs::remove_dir_all(&d);
}

/// A drafter-peer process whose stderr lines arrive on a channel.
struct Peer {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Peer {
    fn start(args: &[&str], base: &Path) -> Peer {
        let mut child = ok(Command::new(env!("CARGO_BIN_EXE_drafter-peer"))
            .args(args)
            .args(["--secret", "s3cret", "--link-timeout", "5"])
            .args(jail_args(base))
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn());
        let err = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
        let (tx, lines) = std::sync::mpsc::channel();
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
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn jailed_peers_migrate_a_vm_from_one_jail_to_another() {
    let d = scratch("jail", "peers");
    let snap = d.join("snap");
    ok(std::fs::create_dir_all(&snap));
    let (state, mem) = counting_snapshot(&snap, false);
    let (base_a, base_b) = (d.join("vms-a"), d.join("vms-b"));
    let (work_a, work_b) = (d.join("work-a"), d.join("work-b"));
    let a = Peer::start(
        &[
            "--state",
            s(&state),
            "--memory",
            s(&mem),
            "--work-dir",
            s(&work_a),
            "--laddr",
            "127.0.0.1:0",
        ],
        &base_a,
    );
    a.event("running");
    let a_vm = vm_pid(a.child.id());
    check_confined(a_vm);
    let addr = a.event("listening")["addr"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut b = Peer::start(&["--raddr", &addr, "--work-dir", s(&work_b)], &base_b);
    b.event("migrated-in");
    a.event("migrated-out");
    let b_vm = vm_pid(b.child.id());
    assert_eq!(
        check_confined(b_vm),
        drafter_jail::memory_limit(GUEST_MIB << 20)
    );
    // The migrated guest counts in B's work directory (its memory file is
    // mapped shared, so the page cache shows its writes).
    let b_mem = work_b.join("memory.bin");
    let m = ok(std::fs::metadata(&b_mem));
    assert_eq!((m.uid(), m.gid()), (UID, UID));
    let first = counter_in(&b_mem);
    wait_for("the migrated guest to count", || counter_in(&b_mem) > first);
    let mut a = a;
    assert_eq!(ok(a.child.wait()).code(), Some(0));
    assert!(entries(&base_a).is_empty(), "{:?}", entries(&base_a));
    // SIGTERM to B's supervisor reaches its VM process; the jail goes.
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(b.child.id() as i32, libc::SIGTERM) }, 0);
    assert_eq!(ok(b.child.wait()).code(), Some(128 + libc::SIGTERM));
    assert!(entries(&base_b).is_empty(), "{:?}", entries(&base_b));
    let _ = std::fs::remove_dir_all(&d);
}
