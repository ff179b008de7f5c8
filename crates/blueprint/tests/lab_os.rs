//! Lab test (issue 5, "Done when" 4): the `os` blueprint plus an `oci` disk
//! holding a Redis image boot under our VMM; liveness arrives, the agent's
//! hooks run, a login prompt shows on the serial console, and Redis answers
//! PING from the host through the tap.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

use drafter_blueprint::oci::{convert, ImageSource, OciOptions};
use drafter_blueprint::os::is_static_elf;
use drafter_blueprint::testing;
use drafter_guest::{AgentServer, LivenessServer};
use drafter_vmm::config::{DriveConfig, NetConfig, VsockConfig};
use drafter_vmm::{BuildOptions, VmConfig, Vmm};

const SLOW: Duration = Duration::from_secs(600);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Lines(Sender<String>, Vec<u8>);

impl Write for Lines {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        for &b in data {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.1).trim_end().to_owned();
                eprintln!("guest| {line}");
                let _ = self.0.send(line);
                self.1.clear();
            } else {
                self.1.push(b);
            }
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh").arg("-c").arg(cmd).output().unwrap()
}

/// Where [`prepare_lab_os_blueprint`] leaves the blueprint for the lab test.
fn blueprint_dir() -> PathBuf {
    testing::lab_os_dir(&repo_root())
}

/// True when the blueprint exists and is newer than this test binary.
fn blueprint_is_fresh(out: &Path) -> bool {
    testing::lab_os_is_fresh(out, &std::env::current_exe().unwrap())
}

/// Host side of the lab test (run by `cargo xtask test` before the lab
/// boots, since the lab has no network): builds the `os` blueprint with
/// static guest binaries and checks what went into its root disk.
#[test]
#[ignore = "prepares the lab: debootstrap (root, network, minutes)"]
fn prepare_lab_os_blueprint() {
    let out = blueprint_dir();
    if !blueprint_is_fresh(&out) {
        // Exactly what a user runs (issue 5, done-when 5): no guest binaries
        // or kernel given, so the tool finds or fetches and builds them.
        testing::build_lab_os(
            Path::new(env!("CARGO_BIN_EXE_drafter-blueprint")),
            &repo_root(),
            &out,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let rootfs = out.join("rootfs.ext4");
    assert!(common::debugfs(&rootfs, "stat /usr/sbin/init").contains("Type: symlink"));
    let inittab = common::debugfs(&rootfs, "cat /etc/inittab");
    for needed in [
        "drafter-agent-run",
        "drafter-oci",
        "drafter-liveness --vsock-port 25",
        "agetty",
    ] {
        assert!(
            inittab.contains(needed),
            "inittab lacks {needed}: {inittab}"
        );
    }
    let env = common::debugfs(&rootfs, "cat /etc/drafter/agent.env");
    assert!(env.contains("suspend-$(hostname)"), "{env}");
    // The guest's libc is not the host's: the guest binaries must be static.
    let scratch = tempfile::tempdir().unwrap();
    for bin in ["drafter-agent", "drafter-liveness"] {
        let copy = scratch.path().join(bin);
        common::debugfs(
            &rootfs,
            &format!("dump /usr/local/bin/{bin} {}", copy.display()),
        );
        assert!(is_static_elf(&copy).unwrap(), "{bin} is not static");
    }
    assert!(common::debugfs(&rootfs, "stat /usr/bin/crun").contains("Type: regular"));
    assert!(!common::debugfs(&rootfs, "stat /usr/lib/systemd/systemd").contains("Type: regular"));
}

#[test]
#[ignore = "lab"]
fn lab_os_blueprint_runs_redis_oci_with_agent_and_liveness() {
    // /tmp is a tmpfs in the lab: far faster for the VM's disks than 9p.
    let dir = std::env::temp_dir().join(format!("lab-os-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let bp = blueprint_dir();
    assert!(
        blueprint_is_fresh(&bp),
        "no fresh os blueprint in {}: run `cargo xtask lab-test lab_os` (it prepares one on the host)",
        bp.display()
    );
    // The guest writes to its root disk: give it a private copy.
    let rootfs = dir.join("rootfs.ext4");
    let copied = Command::new("cp")
        .arg("--sparse=always")
        .arg(bp.join("rootfs.ext4"))
        .arg(&rootfs)
        .status()
        .unwrap();
    assert!(copied.success());
    testing::write_redis_layout(&dir.join("redis-layout")).unwrap();
    convert(&OciOptions {
        source: ImageSource::Layout(dir.join("redis-layout")),
        output: dir.join("oci.ext4"),
        arch: "amd64".into(),
        plain_http: false,
        headroom: 16 << 20,
    })
    .unwrap();

    let ns = format!("drafter-os-{}", std::process::id());
    let ok = |cmd: &str| assert!(sh(cmd).status.success(), "{cmd}");
    ok(&format!("ip netns add {ns}"));
    ok(&format!(
        "ip -n {ns} tuntap add dev tap0 mode tap && ip -n {ns} addr add 172.16.0.1/30 dev tap0 && ip -n {ns} link set tap0 up && ip -n {ns} link set lo up"
    ));

    let uds = dir.join("vsock.sock");
    let liveness = LivenessServer::listen(&uds, 25).unwrap();
    let mut agent = AgentServer::listen(&uds, 26).unwrap();
    let mut config = VmConfig::new(bp.join("vmlinux"));
    config.initramfs = Some(bp.join("initramfs"));
    config.memory_mib = 512;
    config.vcpus = 2;
    config.boot_args = "console=ttyS0 reboot=k panic=1 pci=off quiet".into();
    config.drives = vec![
        DriveConfig {
            name: "disk".into(),
            path: rootfs.clone(),
            read_only: false,
        },
        DriveConfig {
            name: "oci".into(),
            path: dir.join("oci.ext4"),
            read_only: false,
        },
    ];
    config.net = Some(NetConfig {
        tap: "tap0".into(),
        mac: Some("02:0e:d9:fd:68:3d".into()),
        netns: Some(ns.clone()),
    });
    config.vsock = Some(VsockConfig {
        cid: 3,
        uds_path: uds.clone(),
    });
    let (tx, console): (Sender<String>, Receiver<String>) = channel();
    let mut vmm = Vmm::boot(
        config,
        BuildOptions {
            console: Some(Box::new(Lines(tx, Vec::new()))),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("boot: {e}"));

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        liveness.wait(SLOW).unwrap();
        // A login prompt on the serial console (agetty prints /etc/issue).
        let deadline = Instant::now() + SLOW;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match console.recv_timeout(left) {
                Ok(line) if line.contains("Welcome to Drafter OS") => break,
                Ok(_) => {}
                Err(e) => panic!("no login prompt on the serial console: {e}"),
            }
        }
        let before = agent.before_suspend(SLOW).unwrap();
        assert_eq!(before.stdout.trim(), "suspend-drafterhost");
        vmm.pause().unwrap();
        vmm.resume().unwrap();
        let after = agent.after_resume(SLOW).unwrap();
        assert_eq!(after.stdout.trim(), "resumed-after-suspend-drafterhost");

        let deadline = Instant::now() + SLOW;
        loop {
            let out = sh(&format!(
                "printf 'PING\\r\\n' | ip netns exec {ns} timeout 5 busybox nc 172.16.0.2 6379"
            ));
            let reply = String::from_utf8_lossy(&out.stdout).into_owned();
            if reply.contains("+PONG") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "redis never answered PING: {reply:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }));
    vmm.stop();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    let _ = fs::remove_dir_all(&dir);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
