//! The lab: a QEMU/TCG VM with nested SVM in which `/dev/kvm` is real KVM.
//!
//! The host's `/` is exported read-only over 9p and chrooted into, and the
//! workspace is exported read-write at the same path, so host binaries (cargo's
//! test binaries, qemu) run unchanged. The command's stdout and stderr travel
//! over two virtio-serial ports straight to ours; the kernel console goes to a
//! log file; the exit status comes back through a file in the run folder.

use crate::debs::{self, DebCache, KernelFlavour};
use crate::paths::{lab_dir, workspace_root};
use anyhow::{bail, Context, Result};
use drafter_cpio::CpioWriter;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Modules the lab's initramfs loads before it can reach the host's files.
/// `kvm_amd`, `tun` and `veth` ride along so no test waits for them; anything
/// else is loaded on demand through the host's modprobe (see [`MODPROBE`]).
const INITRAMFS_MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "virtio_console",
    "kvm_amd",
    "tun",
    "veth",
];
/// Printed by the lab's init once the command is about to run.
const UP_MARKER: &str = "DRAFTER-LAB-UP";

/// How to size and bound a lab run.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Time allowed from QEMU start to the command starting.
    pub boot_timeout: Duration,
    /// Time allowed for the whole run.
    pub timeout: Duration,
    /// Echo the lab's kernel console to stderr.
    pub console: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            mem_mib: 4096,
            cpus: 2,
            boot_timeout: Duration::from_secs(120),
            timeout: Duration::from_secs(3600),
            console: false,
        }
    }
}

/// The lab kernel and initramfs, cached.
struct LabImage {
    kernel: PathBuf,
    initramfs: PathBuf,
    /// Unpacked kernel package: `<root>/lib/modules/<release>`.
    root: PathBuf,
}

fn ensure_image() -> Result<LabImage> {
    let _lock = crate::paths::lock_cache()?;
    let lab = lab_dir();
    let cache = DebCache::new(lab.join("debs"))?;
    let (pkg, deb) = cache.kernel(KernelFlavour::Generic)?;
    let release = debs::kernel_release(&pkg).to_string();
    let root = lab.join("unpacked").join(&pkg);
    debs::extract(&deb, &root)?;
    let kernel = root.join("boot").join(format!("vmlinuz-{release}"));
    // The name carries a hash of the init script so edits rebuild it.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&(init_script(), MODPROBE, INITRAMFS_MODULES), &mut h);
    let hash = std::hash::Hasher::finish(&h);
    let initramfs = lab.join(format!("initramfs-{release}-{hash:016x}.cpio"));
    if initramfs.exists() {
        eprintln!("lab: cache hit {}", initramfs.display());
    } else {
        let bb = lab.join("unpacked").join("busybox-static");
        debs::extract(&cache.get("busybox-static")?, &bb)?;
        build_initramfs(&root, &release, &bb.join("bin/busybox"), &initramfs)?;
    }
    Ok(LabImage {
        kernel,
        initramfs,
        root,
    })
}

fn build_initramfs(root: &Path, release: &str, busybox: &Path, out: &Path) -> Result<()> {
    let mut w = CpioWriter::new();
    for d in ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
        w.dir(d);
    }
    w.file("bin/busybox", 0o755, &std::fs::read(busybox)?);
    w.symlink("bin/sh", "busybox");
    let mut order = String::new();
    for path in debs::module_load_order(root, release, INITRAMFS_MODULES)? {
        let name = path
            .file_name()
            .context("module without name")?
            .to_string_lossy()
            .to_string();
        w.file(
            &format!("lib/modules/{name}"),
            0o644,
            &std::fs::read(&path)?,
        );
        order.push_str(&name);
        order.push('\n');
    }
    w.file("lib/modules/order", 0o644, order.as_bytes());
    w.file("init", 0o755, init_script().as_bytes());
    w.file("bin/lab-modprobe", 0o755, MODPROBE.as_bytes());
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    w.finish(&mut f)?;
    f.flush()?;
    std::fs::rename(&tmp, out)?;
    eprintln!("lab: built {}", out.display());
    Ok(())
}

/// The kernel's module loader inside the lab: the host's modprobe, run in the
/// host's root, against the unpacked lab kernel's modules.
const MODPROBE: &str = r#"#!/bin/sh
exec /bin/chroot /newroot /sbin/modprobe -d "$(cat /kroot)" "$@"
"#;

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "lab: $*"; sync; reboot -f; }
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m || fail "insmod $m failed"; done
for kv in $(cat /proc/cmdline); do
  case "$kv" in
    drafter.run=*) RUN="${kv#*=}" ;;
    drafter.work=*) WORK="${kv#*=}" ;;
    drafter.kroot=*) KROOT="${kv#*=}" ;;
  esac
done
R=/newroot
O=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $O,ro,cache=loose host $R || fail "cannot mount the host's /"
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs shm $R/dev/shm
for d in /tmp /run /var/tmp; do mount -t tmpfs -o mode=1777 tmp "$R$d"; done
# After the tmpfs mounts, so that a workspace under /tmp stays visible.
mkdir -p "$R$WORK" 2>/dev/null
mount -t 9p -o $O,cache=mmap work "$R$WORK" || fail "cannot mount the workspace"
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup 2>/dev/null
echo "$KROOT" > /kroot
echo /bin/lab-modprobe > /proc/sys/kernel/modprobe
ip link set lo up
hostname lab
OUT=/dev/null; ERR=/dev/null
for p in /sys/class/virtio-ports/*; do
  case "$(cat $p/name)" in
    stdout) OUT=/dev/${p##*/} ;;
    stderr) ERR=/dev/${p##*/} ;;
  esac
done
echo __UP_MARKER__
chroot $R /bin/sh "$RUN/cmd.sh" >"$OUT" 2>"$ERR" </dev/null
echo $? > "$R$RUN/status"
sync
reboot -f
"#;

/// The oldest QEMU whose SVM emulation kept the lab's kernel and nested
/// guests alive in our migration tests.
const GOOD_QEMU_MAJOR: u32 = 10;

/// Says so when the QEMU found is older than [`GOOD_QEMU_MAJOR`]: 7.2
/// (Debian 12's) delivers interrupts inside KVM's VMRUN window under TCG,
/// which crashed the lab kernel (recursive page faults from
/// `sysvec_reschedule_ipi` at `__svm_vcpu_run`) during migrations.
fn warn_old_qemu() {
    let out = Command::new("qemu-system-x86_64").arg("--version").output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    if let Some(major) = qemu_major(&text) {
        if major < GOOD_QEMU_MAJOR {
            eprintln!(
                "lab: QEMU {major} found; its nested SVM under TCG has crashed lab kernels and reset \
                 nested guests; `bash .ci/setup` installs QEMU {GOOD_QEMU_MAJOR} from bookworm-backports"
            );
        }
    }
}

/// The major version in `qemu-system-x86_64 --version` output.
fn qemu_major(version: &str) -> Option<u32> {
    let rest = version.split("version ").nth(1)?;
    rest.split('.').next()?.trim().parse().ok()
}

/// Shell-quotes one word.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Writes the script the lab runs: same cwd, same environment, then `cmd`.
fn write_script(run: &Path, cmd: &[String]) -> Result<()> {
    let cwd = std::env::current_dir()?;
    let mut s = String::from("#!/bin/sh\n");
    s.push_str(&format!(
        "cd {} || exit 127\n",
        quote(&cwd.to_string_lossy())
    ));
    for (k, v) in std::env::vars() {
        let skip = matches!(k.as_str(), "PWD" | "OLDPWD" | "SHLVL" | "_" | "TMPDIR")
            || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !skip {
            s.push_str(&format!("export {k}={}\n", quote(&v)));
        }
    }
    s.push_str("export DRAFTER_IN_LAB=1\nexec");
    for word in cmd {
        s.push(' ');
        s.push_str(&quote(word));
    }
    s.push('\n');
    std::fs::write(run.join("cmd.sh"), s)?;
    Ok(())
}

/// QEMU's option syntax doubles commas inside values.
fn qemu_path(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// Copies everything one QEMU connection sends to `sink` (our stdout or stderr).
fn relay<W: Write + 'static>(
    listener: UnixListener,
    sink: fn() -> W,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = listener.accept() {
            let mut out = sink();
            let mut buf = [0u8; 16384];
            while let Ok(n) = std::io::Read::read(&mut conn, &mut buf) {
                if n == 0 || out.write_all(&buf[..n]).is_err() {
                    break;
                }
                let _ = out.flush();
            }
        }
    })
}

enum Event {
    Line(String),
    Eof,
}

/// The lab's own kernel failed (locked up or panicked), so the command's
/// result is unknown through no fault of the command. Callers may retry in
/// a fresh lab boot.
#[derive(Debug)]
pub struct LabKernelFailed(pub String);

impl std::fmt::Display for LabKernelFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the lab's own kernel failed: {}", self.0)
    }
}

impl std::error::Error for LabKernelFailed {}

/// A soft lockup this long is not coming back: QEMU's nested SVM under TCG
/// has left lab CPUs stuck for 700 s and more with the guest idle.
const FATAL_LOCKUP_SECS: u64 = 60;

/// What a lab console line says about the lab's own kernel.
#[derive(Debug, PartialEq)]
enum KernelSign {
    /// Nothing wrong.
    Fine,
    /// It is stuck: stop the lab now.
    Stuck,
    /// It is going down (QEMU exits by itself: `panic=-1`, `-no-reboot`).
    Dying,
}

fn kernel_sign(line: &str) -> KernelSign {
    if let Some(rest) = line.split("soft lockup - CPU#").nth(1) {
        let secs = rest
            .split("stuck for ")
            .nth(1)
            .and_then(|r| r.split('s').next())
            .and_then(|n| n.trim().parse::<u64>().ok());
        return match secs {
            Some(s) if s >= FATAL_LOCKUP_SECS => KernelSign::Stuck,
            _ => KernelSign::Fine,
        };
    }
    if line.contains("Kernel panic - not syncing") || line.contains("stack guard page was hit") {
        return KernelSign::Dying;
    }
    KernelSign::Fine
}

/// Runs `cmd` inside the lab and returns its exit status.
pub fn run(opts: &LabOptions, cmd: &[String]) -> Result<i32> {
    if cmd.is_empty() {
        bail!("usage: cargo xtask lab -- COMMAND [ARGS]");
    }
    let started = Instant::now();
    let image = ensure_image()?;
    let ws = workspace_root().canonicalize()?;
    let runs = lab_dir().join("runs");
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let run = runs.join(format!("{}-{stamp}", std::process::id()));
    std::fs::create_dir_all(&run)?;
    let run = run.canonicalize()?;
    write_script(&run, cmd)?;

    // The command's stdout/stderr arrive on two Unix sockets QEMU connects to;
    // we copy them to ours (sharing our fds with QEMU would mix file offsets).
    let sock_dir = std::env::temp_dir().join(format!("drafter-lab-{}-{stamp}", std::process::id()));
    std::fs::create_dir_all(&sock_dir)?;
    let out_sock = sock_dir.join("out");
    let err_sock = sock_dir.join("err");
    let relays = [
        relay(UnixListener::bind(&out_sock)?, std::io::stdout),
        relay(UnixListener::bind(&err_sock)?, std::io::stderr),
    ];
    let append = format!(
        "console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off drafter.run={} drafter.work={} drafter.kroot={}",
        run.display(),
        ws.display(),
        image.root.canonicalize()?.display()
    )
    .replace(UP_MARKER, "");
    warn_old_qemu();
    let mut qemu = Command::new("qemu-system-x86_64");
    // Overridable to chase emulation bugs (e.g. `tcg,thread=single`).
    let accel = std::env::var("DRAFTER_LAB_ACCEL").unwrap_or_else(|_| "tcg,thread=multi".into());
    // No 5-level paging in the lab: with it the lab kernel's KVM builds
    // 5-level nested page tables, and TCG's walk of those went wrong for
    // nested guests (QEMU 10: a post-copy guest looped forever on a page
    // walk through a GPA with bit 32 set, KVM injecting #PF 30,000 times a
    // second; QEMU 7.2: resets and emulation loops during migrations). With
    // `la57=off` (or a CPU model without it) the same tests pass.
    let cpu = std::env::var("DRAFTER_LAB_CPU").unwrap_or_else(|_| "max,la57=off".into());
    qemu.args(["-accel", &accel, "-cpu", &cpu, "-M", "q35"])
        .args([
            "-smp",
            &opts.cpus.to_string(),
            "-m",
            &opts.mem_mib.to_string(),
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initramfs)
        .args(["-append", &append, "-serial", "stdio"])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=host,security_model=passthrough,readonly=on,multidevs=remap",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=work,security_model=passthrough,multidevs=remap",
            qemu_path(&ws)
        ))
        .args(["-device", "virtio-serial-pci"])
        .arg("-chardev")
        .arg(format!("socket,id=out,path={}", qemu_path(&out_sock)))
        .arg("-chardev")
        .arg(format!("socket,id=err,path={}", qemu_path(&err_sock)))
        .args(["-device", "virtserialport,chardev=out,name=stdout"])
        .args(["-device", "virtserialport,chardev=err,name=stderr"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = qemu
        .spawn()
        .context("cannot start qemu-system-x86_64 (install the qemu-system-x86 package)")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(Event::Line(line)).is_err() {
                return;
            }
        }
        let _ = tx.send(Event::Eof);
    });

    let console_path = run.join("console.log");
    let mut console = std::fs::File::create(&console_path)?;
    let mut up = None;
    let mut dying: Option<String> = None;
    let result = loop {
        let deadline = match up {
            None => started + opts.boot_timeout,
            Some(_) => started + opts.timeout,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Event::Line(line)) => {
                writeln!(console, "{line}")?;
                if opts.console {
                    eprintln!("lab console: {line}");
                }
                if up.is_none() && line.trim() == UP_MARKER {
                    up = Some(Instant::now());
                    eprintln!("lab: up in {:.1?}", started.elapsed());
                }
                match kernel_sign(&line) {
                    KernelSign::Fine => {}
                    KernelSign::Stuck => {
                        eprintln!("lab console: {line}");
                        let _ = child.kill();
                        break Err(anyhow::Error::new(LabKernelFailed(line.trim().into())));
                    }
                    KernelSign::Dying => {
                        eprintln!("lab console: {line}");
                        dying.get_or_insert_with(|| line.trim().into());
                    }
                }
            }
            Ok(Event::Eof) | Err(mpsc::RecvTimeoutError::Disconnected) => break Ok(()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                break Err(match up {
                    None => anyhow::anyhow!(
                        "the lab did not come up within {:?} (console log: {})",
                        opts.boot_timeout,
                        console_path.display()
                    ),
                    Some(_) => anyhow::anyhow!(
                        "the command did not finish within {:?} in the lab",
                        opts.timeout
                    ),
                });
            }
        }
    };
    let qemu_status = child.wait()?;
    // If QEMU died before connecting, wake the relays up so they can end.
    let _ = std::os::unix::net::UnixStream::connect(&out_sock);
    let _ = std::os::unix::net::UnixStream::connect(&err_sock);
    for r in relays {
        let _ = r.join();
    }
    let _ = std::fs::remove_dir_all(&sock_dir);
    let status = std::fs::read_to_string(run.join("status"));
    let outcome = match (result, status) {
        (Err(e), _) => Err(e),
        (Ok(()), Ok(s)) => s
            .trim()
            .parse::<i32>()
            .with_context(|| format!("bad status file in {}", run.display())),
        (Ok(()), Err(_)) if dying.is_some() => Err(anyhow::Error::new(LabKernelFailed(
            dying.unwrap_or_default(),
        ))),
        (Ok(()), Err(_)) => {
            let log = std::fs::read_to_string(&console_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(anyhow::anyhow!(
                "the lab stopped before the command finished (qemu: {qemu_status}); console:\n{}",
                tail.join("\n")
            ))
        }
    };
    eprintln!("lab: finished in {:.1?}", started.elapsed());
    if outcome.is_ok() {
        let _ = std::fs::remove_dir_all(&run);
    }
    outcome
}

/// The initramfs text with its placeholders filled in (exposed for tests).
pub fn init_script() -> String {
    INIT.replace("__UP_MARKER__", UP_MARKER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_soft_lockups_and_panics_are_the_lab_kernel_failing() {
        let stuck = "[ 1234.5] watchdog: BUG: soft lockup - CPU#0 stuck for 779s! [swapper/0:0]";
        assert_eq!(kernel_sign(stuck), KernelSign::Stuck);
        let brief = "watchdog: BUG: soft lockup - CPU#1 stuck for 23s! [kworker/1:1:55]";
        assert_eq!(kernel_sign(brief), KernelSign::Fine);
        assert_eq!(
            kernel_sign("Kernel panic - not syncing: Fatal exception in interrupt"),
            KernelSign::Dying
        );
        assert_eq!(
            kernel_sign("BUG: TASK stack guard page was hit at 00000000 (stack is ...)"),
            KernelSign::Dying
        );
        assert_eq!(kernel_sign("test lab_nat ... ok"), KernelSign::Fine);
    }

    #[test]
    fn qemu_major_version_is_read_from_its_banner() {
        assert_eq!(
            qemu_major("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n"),
            Some(7)
        );
        assert_eq!(
            qemu_major("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)"),
            Some(10)
        );
        assert_eq!(qemu_major("bash: qemu-system-x86_64: not found"), None);
    }
}
