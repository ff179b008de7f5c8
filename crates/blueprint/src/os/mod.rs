//! `os`: the guest OS blueprint — `vmlinux` (the Debian cloud kernel),
//! `initramfs` (busybox + virtio/vsock modules, switching root to
//! `/dev/vda`) and `rootfs.ext4` (Debian minbase with crun, booted by
//! busybox init, which starts the agent, the liveness signal, static
//! networking and the bundle on the `oci` disk; no systemd, so it boots fast).

pub mod files;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use tracing::info;

use crate::error::{BlueprintError, IoContext, Result};
use crate::ext4::{run, Ext4Image};
use crate::progress::Progress;
use drafter_cpio::CpioWriter;

/// Packages installed on top of the minbase variant.
pub const EXTRA_PACKAGES: &[&str] = &["crun", "iproute2", "util-linux"];

/// Options of [`build`].
#[derive(Debug, Clone)]
pub struct OsOptions {
    /// Output directory (gets `vmlinux`, `initramfs`, `rootfs.ext4`).
    pub out_dir: PathBuf,
    /// Guest artifact folder (`vmlinuz`, `busybox`, `modules/order`); found
    /// or fetched with `cargo xtask guest-kernel` when `None`.
    pub guest_dir: Option<PathBuf>,
    /// Where the debootstrap result is cached between runs.
    pub cache_dir: PathBuf,
    /// `drafter-agent` binary to install (static).
    pub agent_bin: PathBuf,
    /// `drafter-liveness` binary to install (static).
    pub liveness_bin: PathBuf,
    /// Debian mirror URL.
    pub mirror: String,
    /// Debian suite.
    pub suite: String,
    /// Agent's `BeforeSuspend` command.
    pub before_suspend_cmd: String,
    /// Agent's `AfterResume` command.
    pub after_resume_cmd: String,
    /// Free space left in the root file system, in bytes.
    pub headroom: u64,
}

/// Builds all three artifacts.
pub fn build(opts: &OsOptions) -> Result<()> {
    for bin in [&opts.agent_bin, &opts.liveness_bin] {
        if !bin.is_file() {
            return Err(BlueprintError::Invalid(format!(
                "guest binary {} not found; build it with `RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release --target x86_64-unknown-linux-gnu -p drafter-guest`",
                bin.display()
            )));
        }
        if !is_static_elf(bin)? {
            return Err(BlueprintError::Invalid(format!(
                "guest binary {} is not a static executable; the guest's libc is not the host's (build with `-C target-feature=+crt-static`)",
                bin.display()
            )));
        }
    }
    let guest = match &opts.guest_dir {
        Some(d) => d.clone(),
        None => find_guest_dir()?,
    };
    for needed in ["vmlinuz", "busybox", "modules/order"] {
        if !guest.join(needed).is_file() {
            return Err(BlueprintError::Invalid(format!(
                "guest artifact folder {} lacks {needed}",
                guest.display()
            )));
        }
    }
    fs::create_dir_all(&opts.out_dir).ctx("creating", &opts.out_dir)?;
    let vmlinux = opts.out_dir.join("vmlinux");
    fs::copy(guest.join("vmlinuz"), &vmlinux).ctx("writing", &vmlinux)?;
    write_initramfs(&guest, &opts.out_dir.join("initramfs"))?;
    build_rootfs(opts, &guest)?;
    Ok(())
}

/// Whether `path` is a statically linked ELF executable: 64-bit ELF with no
/// `PT_INTERP` program header (static-pie included).
pub fn is_static_elf(path: &Path) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    let bytes = fs::read(path).ctx("reading", path)?;
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if bytes.get(..5) != Some(b"\x7fELF\x02") {
        return Ok(false);
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Ok(false);
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return Ok(false);
    };
    for i in 0..usize::from(phnum) {
        match u32_at(phoff + i * usize::from(phentsize)) {
            Some(PT_INTERP) => return Ok(false),
            Some(_) => {}
            None => return Ok(false),
        }
    }
    Ok(true)
}

/// Finds `target/lab/guest/current` above the working directory, or runs
/// `cargo xtask guest-kernel` (which fetches it) and uses the folder it prints.
pub fn find_guest_dir() -> Result<PathBuf> {
    let cwd = std::env::current_dir().ctx("reading", ".")?;
    for dir in cwd.ancestors() {
        let candidate = dir.join("target/lab/guest/current");
        if candidate.join("vmlinuz").is_file() && candidate.join("modules/order").is_file() {
            return Ok(candidate);
        }
    }
    let out = Command::new("cargo")
        .args(["xtask", "guest-kernel"])
        .output()
        .map_err(|e| BlueprintError::Tool {
            tool: "cargo xtask guest-kernel".into(),
            message: e.to_string(),
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().last() {
        Some(line) if out.status.success() && Path::new(line.trim()).is_dir() => {
            Ok(PathBuf::from(line.trim()))
        }
        _ => Err(BlueprintError::Tool {
            tool: "cargo xtask guest-kernel".into(),
            message: format!(
                "no guest kernel folder; pass --guest-dir ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }),
    }
}

/// Builds `drafter-agent` and `drafter-liveness` statically with cargo (run
/// inside the drafter workspace) and returns their paths.
pub fn build_guest_binaries() -> Result<(PathBuf, PathBuf)> {
    let tool = || "cargo build -p drafter-guest".to_owned();
    let spinner = Progress::spinner("building static drafter-agent and drafter-liveness");
    let out = Command::new("cargo")
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-linux-gnu",
            "-p",
            "drafter-guest",
            "--bins",
            "--message-format=json-render-diagnostics",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .output()
        .map_err(|e| BlueprintError::Tool {
            tool: tool(),
            message: e.to_string(),
        });
    spinner.finish();
    let out = out?;
    if !out.status.success() {
        return Err(BlueprintError::Tool {
            tool: tool(),
            message: format!(
                "{}; pass --agent-bin and --liveness-bin instead",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    let mut agent = None;
    let mut liveness = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = msg["target"]["name"].as_str().unwrap_or_default();
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        match name {
            "drafter-agent" => agent = Some(PathBuf::from(exe)),
            "drafter-liveness" => liveness = Some(PathBuf::from(exe)),
            _ => {}
        }
    }
    match (agent, liveness) {
        (Some(a), Some(l)) => Ok((a, l)),
        _ => Err(BlueprintError::Tool {
            tool: tool(),
            message: "cargo did not report both binaries".into(),
        }),
    }
}

/// Writes the initramfs: busybox, the modules in load order, and `/init`.
pub fn write_initramfs(guest: &Path, output: &Path) -> Result<()> {
    let mut w = CpioWriter::new();
    for d in ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
        w.dir(d);
    }
    let busybox = guest.join("busybox");
    w.file(
        "bin/busybox",
        0o755,
        &fs::read(&busybox).ctx("reading", &busybox)?,
    );
    let order_path = guest.join("modules/order");
    let order = fs::read_to_string(&order_path).ctx("reading", &order_path)?;
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if name.contains('/') {
            return Err(BlueprintError::Invalid(format!(
                "bad module name {name:?} in {}",
                order_path.display()
            )));
        }
        let ko = guest.join("modules").join(name);
        w.file(
            &format!("lib/modules/{name}"),
            0o644,
            &fs::read(&ko).ctx("reading", &ko)?,
        );
    }
    w.file("lib/modules/order", 0o644, order.as_bytes());
    w.file("init", 0o755, files::INIT.as_bytes());
    let mut bytes = Vec::new();
    w.finish(&mut bytes).ctx("assembling", output)?;
    fs::write(output, bytes).ctx("writing", output)
}

/// Runs debootstrap once per (suite, mirror, package set) and caches it.
fn debootstrap(opts: &OsOptions) -> Result<PathBuf> {
    let key = format!(
        "{}-{}-{}",
        opts.suite,
        opts.mirror,
        EXTRA_PACKAGES.join(",")
    );
    let digest = crate::image::sha256_reader(&mut key.as_bytes()).ctx("hashing", "cache key")?;
    let dir = opts
        .cache_dir
        .join(format!("debootstrap-{}-{}", opts.suite, &digest[7..19]));
    let stamp = dir.join(".drafter-complete");
    if stamp.exists() {
        info!(cache = %dir.display(), "reusing debootstrap result");
        return Ok(dir);
    }
    if dir.exists() {
        fs::remove_dir_all(&dir).ctx("clearing incomplete", &dir)?;
    }
    fs::create_dir_all(&opts.cache_dir).ctx("creating", &opts.cache_dir)?;
    let spinner = Progress::spinner("debootstrap (minbase)");
    let result = run(Command::new("debootstrap")
        .arg("--variant=minbase")
        .arg(format!("--include={}", EXTRA_PACKAGES.join(",")))
        .arg(&opts.suite)
        .arg(&dir)
        .arg(&opts.mirror));
    spinner.finish();
    result?;
    // Trim what a VM image does not need.
    for sub in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let p = dir.join(sub);
        if let Ok(entries) = fs::read_dir(&p) {
            for e in entries.flatten() {
                if e.path().is_file() {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
    fs::write(&stamp, b"").ctx("writing", &stamp)?;
    Ok(dir)
}

fn write_file(root: &Path, rel: &str, content: &[u8], mode: u32) -> Result<()> {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).ctx("creating", parent)?;
    }
    if fs::symlink_metadata(&path).is_ok() {
        fs::remove_file(&path).ctx("replacing", &path)?;
    }
    fs::write(&path, content).ctx("writing", &path)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).ctx("setting mode of", &path)
}

/// Quotes `s` for a POSIX shell (single quotes; `'` becomes `'\\''`).
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Stages the cached debootstrap tree plus drafter's files and writes
/// `rootfs.ext4` (label `rootfs`).
fn build_rootfs(opts: &OsOptions, guest: &Path) -> Result<()> {
    let base = debootstrap(opts)?;
    let work = tempfile::Builder::new()
        .prefix(".os-build-")
        .tempdir_in(&opts.out_dir)
        .ctx("creating a work directory in", &opts.out_dir)?;
    let root = work.path().join("rootfs");
    let spinner = Progress::spinner("staging rootfs");
    let copied = run(Command::new("cp").arg("-a").arg(&base).arg(&root));
    spinner.finish();
    copied?;
    let _ = fs::remove_file(root.join(".drafter-complete"));

    let agent = fs::read(&opts.agent_bin).ctx("reading", &opts.agent_bin)?;
    let liveness = fs::read(&opts.liveness_bin).ctx("reading", &opts.liveness_bin)?;
    write_file(&root, "usr/local/bin/drafter-agent", &agent, 0o755)?;
    write_file(&root, "usr/local/bin/drafter-liveness", &liveness, 0o755)?;
    write_file(
        &root,
        "usr/local/sbin/drafter-network",
        files::NETWORK_SCRIPT.as_bytes(),
        0o755,
    )?;
    write_file(
        &root,
        "usr/local/sbin/drafter-oci",
        files::OCI_SCRIPT.as_bytes(),
        0o755,
    )?;
    let busybox = guest.join("busybox");
    let busybox = fs::read(&busybox).ctx("reading", &busybox)?;
    write_file(&root, "usr/lib/drafter/busybox", &busybox, 0o755)?;
    for applet in [
        "sbin/init",
        "usr/local/sbin/poweroff",
        "usr/local/sbin/reboot",
        "usr/local/sbin/halt",
    ] {
        let link = root.join(applet);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink("/usr/lib/drafter/busybox", &link).ctx("linking", &link)?;
    }
    write_file(&root, "etc/inittab", files::INITTAB.as_bytes(), 0o644)?;
    write_file(
        &root,
        "etc/drafter/rc.sysinit",
        files::RC_SYSINIT.as_bytes(),
        0o755,
    )?;
    write_file(
        &root,
        "etc/drafter/rc.shutdown",
        files::RC_SHUTDOWN.as_bytes(),
        0o755,
    )?;
    write_file(
        &root,
        "usr/local/sbin/drafter-agent-run",
        files::AGENT_RUN.as_bytes(),
        0o755,
    )?;
    let env = format!(
        "BEFORE_SUSPEND_CMD={}\nAFTER_RESUME_CMD={}\n",
        shell_quote(&opts.before_suspend_cmd),
        shell_quote(&opts.after_resume_cmd)
    );
    write_file(&root, "etc/drafter/agent.env", env.as_bytes(), 0o644)?;
    write_file(&root, "etc/hostname", b"drafterhost\n", 0o644)?;
    write_file(
        &root,
        "etc/hosts",
        b"127.0.0.1 localhost\n127.0.1.1 drafterhost\n",
        0o644,
    )?;
    write_file(
        &root,
        "etc/issue",
        b"Welcome to Drafter OS (Debian)\n\n",
        0o644,
    )?;
    write_file(
        &root,
        "etc/fstab",
        b"/dev/vda / ext4 rw,noatime 0 0\n",
        0o644,
    )?;
    write_file(&root, "etc/resolv.conf", b"nameserver 1.1.1.1\n", 0o644)?;
    // Passwordless root login on the serial console.
    let shadow_path = root.join("etc/shadow");
    let shadow = fs::read_to_string(&shadow_path).ctx("reading", &shadow_path)?;
    let shadow: String = shadow
        .lines()
        .map(|line| {
            let mut fields: Vec<&str> = line.split(':').collect();
            if fields.first() == Some(&"root") && fields.len() > 1 {
                fields[1] = "";
            }
            format!("{}\n", fields.join(":"))
        })
        .collect();
    write_file(&root, "etc/shadow", shadow.as_bytes(), 0o640)?;
    let output = opts.out_dir.join("rootfs.ext4");
    let spinner = Progress::spinner("writing rootfs.ext4");
    let size = Ext4Image {
        staging: &root,
        label: "rootfs",
        output: &output,
        // debootstrap ran as root, so the staged ownership is already right.
        fixups: Vec::new(),
        headroom: opts.headroom,
    }
    .build();
    spinner.finish();
    info!(output = %output.display(), size = size?, "rootfs written");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_executables_are_told_from_dynamic_ones() {
        // Debian's busybox-static is static; this test program is not.
        assert!(is_static_elf(Path::new("/bin/busybox")).unwrap());
        let me = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&me).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("script");
        fs::write(&text, "#!/bin/sh\n").unwrap();
        assert!(!is_static_elf(&text).unwrap());
        // A truncated ELF header is "not static", not a panic.
        let stub = dir.path().join("stub");
        fs::write(&stub, b"\x7fELF\x02\x01\x01").unwrap();
        assert!(!is_static_elf(&stub).unwrap());
        assert!(is_static_elf(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn shell_quoting_survives_the_shell() {
        let cmd = r#"echo "it's $HOME" `date` \n"#;
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("X={}; printf %s \"$X\"", shell_quote(cmd)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), cmd);
    }

    #[test]
    fn dynamic_guest_binaries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::env::current_exe().unwrap();
        let err = build(&OsOptions {
            out_dir: dir.path().join("out"),
            guest_dir: Some(dir.path().to_path_buf()),
            cache_dir: dir.path().join("cache"),
            agent_bin: me.clone(),
            liveness_bin: me,
            mirror: String::new(),
            suite: String::new(),
            before_suspend_cmd: String::new(),
            after_resume_cmd: String::new(),
            headroom: 0,
        })
        .unwrap_err();
        assert!(err.to_string().contains("not a static executable"), "{err}");
        assert!(!dir.path().join("out").exists());
    }
}
