//! Test support for Linux-guest (lab) tests: a busybox
//! initramfs builder, the guest kernel directory and a serial console capture.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

/// The newc archive writer shared with the blueprint builder and xtask.
pub use drafter_cpio::CpioWriter as Cpio;

/// The directory holding the guest kernel (`vmlinuz`), `busybox` and `modules/`.
pub fn guest_dir() -> PathBuf {
    if let Ok(d) = std::env::var("DRAFTER_GUEST_DIR") {
        return PathBuf::from(d);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/lab/guest/current")
}

/// What every test guest prints once its init runs.
pub const MARKER: &str = "DRAFTER-GUEST-UP";

/// Builds a busybox initramfs whose `/init` mounts the basics, loads the virtio
/// and vsock modules, prints [`MARKER`], runs `body`, then powers off.
pub fn initramfs(body: &str) -> Vec<u8> {
    initramfs_with(body, &[])
}

/// Like [`initramfs`], with extra executables (`(path in the guest, bytes)`).
pub fn initramfs_with(body: &str, programs: &[(&str, &[u8])]) -> Vec<u8> {
    let g = guest_dir();
    let busybox = std::fs::read(g.join("busybox")).unwrap_or_else(|e| {
        panic!(
            "busybox in {}: {e} (run `cargo xtask guest-kernel`)",
            g.display()
        )
    });
    let order = std::fs::read_to_string(g.join("modules/order")).unwrap_or_default();
    let mut c = Cpio::new();
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "lib",
        "lib/modules",
        "mnt",
    ] {
        c.dir(d);
    }
    c.chardev("dev/console", 5, 1);
    c.chardev("dev/null", 1, 3);
    c.file("bin/busybox", 0o755, &busybox);
    c.symlink("bin/sh", "busybox");
    for m in order.lines().filter(|l| !l.trim().is_empty()) {
        let bytes = std::fs::read(g.join("modules").join(m)).unwrap_or_else(|e| panic!("{m}: {e}"));
        c.file(&format!("lib/modules/{m}"), 0o644, &bytes);
    }
    for (path, bytes) in programs {
        c.file(path, 0o755, bytes);
    }
    let init = init_script(&order, body);
    c.file("init", 0o755, init.as_bytes());
    c.into_bytes()
}

/// The `/init` script: basics, modules (virtio_mmio with its command-line
/// parameters, which only modprobe would pass), marker, `body`, poweroff.
pub fn init_script(order: &str, body: &str) -> String {
    format!(
        "#!/bin/sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev 2>/dev/null\n\
         for m in {mods}; do a=; if [ $m = virtio_mmio.ko ]; then \
         for w in $(cat /proc/cmdline); do case $w in virtio_mmio.*) a=\"$a ${{w#virtio_mmio.}}\";; esac; done; fi; \
         insmod /lib/modules/$m $a; done\n\
         echo {MARKER}\n\
         {body}\n\
         sleep 1\n\
         poweroff -f\n",
        mods = order.split_whitespace().collect::<Vec<_>>().join(" ")
    )
}

/// Writes an initramfs for `body` into `dir` and returns its path.
pub fn write_initramfs(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("initramfs.cpio");
    std::fs::write(&p, initramfs(body)).unwrap_or_else(|e| panic!("{e}"));
    p
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-lab-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
    d
}

/// Captures the guest console line by line (also echoed to stderr for debugging).
pub struct Console {
    rx: Receiver<String>,
    /// Every line seen so far.
    pub seen: Vec<String>,
}

struct LineWriter {
    tx: Sender<String>,
    buf: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        for b in data {
            if *b == b'\n' {
                let line = String::from_utf8_lossy(&self.buf)
                    .trim_end_matches('\r')
                    .to_string();
                eprintln!("guest| {line}");
                let _ = self.tx.send(line);
                self.buf.clear();
            } else {
                self.buf.push(*b);
            }
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    /// A console and the writer to hand the VMM.
    pub fn new() -> (Console, Box<dyn Write + Send>) {
        let (tx, rx) = channel();
        (
            Console {
                rx,
                seen: Vec::new(),
            },
            Box::new(LineWriter {
                tx,
                buf: Vec::new(),
            }),
        )
    }

    /// Waits for a line containing `needle`, returning it.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no console line with {needle:?} within {timeout:?}; last lines:\n{}",
                    self.seen[self.seen.len().saturating_sub(30)..].join("\n")
                ),
            }
        }
    }
}

/// The `drafter-vmm` binary next to the test executable.
pub fn vmm_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .map(Path::to_path_buf)
        .unwrap_or_default();
    dir.join("drafter-vmm")
}

#[cfg(test)]
mod tests {
    use super::init_script;

    #[test]
    fn init_script_is_valid_shell() {
        let script = init_script("virtio.ko\nvirtio_mmio.ko\n", "echo hi");
        let ok = std::process::Command::new("sh")
            .args(["-n", "-c", &script])
            .status()
            .map(|s| s.success());
        assert_eq!(ok.ok(), Some(true), "{script}");
        assert!(script.contains("${w#virtio_mmio.}"));
    }
}
