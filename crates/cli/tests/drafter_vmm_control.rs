//! `drafter-vmm`'s control socket on the host: created mode 0600 before the
//! VM runs, and the paths a `snapshot` command names are resolved inside
//! the VM's directory — `..`, absolute paths elsewhere and a symbolic link
//! out are refused with nothing written outside, while paths inside work.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drafter_vmm::{BuildOptions, VmConfig, Vmm};

/// A guest that spins (`jmp .`).
const SPIN: &[u8] = &[0xeb, 0xfe];

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("drafter-vmm-ctl-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// A snapshot of the spinning guest: (state, memory).
fn snapshot(dir: &Path) -> (PathBuf, PathBuf) {
    let mut c = VmConfig::new("/flat");
    c.memory_mib = 32;
    c.serial.stdout = false;
    let mut vmm = Vmm::boot(
        c,
        BuildOptions {
            flat_program: Some(SPIN.to_vec()),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    vmm.pause().unwrap_or_else(|e| panic!("{e}"));
    let (state, mem) = (dir.join("state"), dir.join("mem"));
    vmm.snapshot(&state, &mem).unwrap_or_else(|e| panic!("{e}"));
    vmm.stop();
    (state, mem)
}

struct Control {
    out: UnixStream,
    replies: BufReader<UnixStream>,
}

impl Control {
    fn connect(path: &Path, child: &mut std::process::Child) -> Control {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(c) = UnixStream::connect(path) {
                let replies = BufReader::new(c.try_clone().unwrap_or_else(|e| panic!("{e}")));
                return Control { out: c, replies };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("drafter-vmm exited early: {status}");
            }
            assert!(Instant::now() < deadline, "no control socket");
            std::thread::yield_now();
        }
    }

    fn ask(&mut self, line: &str) -> String {
        writeln!(self.out, "{line}").unwrap_or_else(|e| panic!("{e}"));
        let mut reply = String::new();
        self.replies
            .read_line(&mut reply)
            .unwrap_or_else(|e| panic!("{e}"));
        reply.trim().to_string()
    }
}

#[test]
fn the_control_socket_is_private_and_snapshot_paths_stay_in_the_vm_directory() {
    let d = scratch("paths");
    let (state, mem) = snapshot(&d);
    let vm_dir = d.join("vm");
    let outside = d.join("outside");
    std::fs::create_dir_all(&vm_dir).unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir_all(&outside).unwrap_or_else(|e| panic!("{e}"));
    std::os::unix::fs::symlink(&outside, vm_dir.join("out")).unwrap_or_else(|e| panic!("{e}"));
    let sock = vm_dir.join("control.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_drafter-vmm"))
        .args(["--restore-state", s(&state), "--restore-memory", s(&mem)])
        .args(["--no-serial-stdout", "--control-socket", s(&sock)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut ctl = Control::connect(&sock, &mut child);

    let meta = std::fs::symlink_metadata(&sock).unwrap_or_else(|e| panic!("{e}"));
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    assert_eq!(ctl.ask("pause"), "ok");
    let abs_elsewhere = outside.join("abs-state");
    for (cmd, why) in [
        ("snapshot ../escape-state escape-mem".to_string(), "'..'"),
        (
            format!("snapshot {} mem2", s(&abs_elsewhere)),
            "outside the VM directory",
        ),
        (
            "snapshot out/state out/mem".to_string(),
            "outside the VM directory",
        ),
        ("snapshot nodir/state mem2".to_string(), "nodir"),
    ] {
        let r = ctl.ask(&cmd);
        assert!(r.starts_with("error ") && r.contains(why), "{cmd}: {r}");
    }
    let names = |p: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert!(names(&outside).is_empty(), "{:?}", names(&outside));
    assert!(!d.join("escape-state").exists() && !d.join("escape-mem").exists());

    // Inside the directory: relative and absolute paths work.
    assert_eq!(ctl.ask("snapshot snap-state snap-mem"), "ok");
    let abs_inside = vm_dir.join("abs-state");
    let r = ctl.ask(&format!(
        "snapshot {} {}",
        s(&abs_inside),
        s(&vm_dir.join("abs-mem"))
    ));
    assert_eq!(r, "ok");
    for f in ["snap-state", "snap-mem", "abs-state", "abs-mem"] {
        let len = std::fs::metadata(vm_dir.join(f))
            .map(|m| m.len())
            .unwrap_or_default();
        assert!(len > 0, "{f} missing or empty");
    }
    assert_eq!(ctl.ask("stop"), "ok");
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_control_socket_path_holding_another_file_is_refused_and_kept() {
    let d = scratch("occupied");
    let taken = d.join("control.sock");
    std::fs::write(&taken, b"precious").unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(env!("CARGO_BIN_EXE_drafter-vmm"))
        .args(["--kernel", "/nonexistent", "--control-socket", s(&taken)])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&taken).unwrap_or_default(), b"precious");
    let _ = std::fs::remove_dir_all(&d);
}
