//! Guest artifacts: the Debian cloud kernel, its virtio/vsock modules and a
//! static busybox, cached in one folder that tests and the blueprint builder share.

use crate::debs::{self, DebCache, KernelFlavour};
use crate::paths::lab_dir;
use anyhow::{Context, Result};
use std::path::PathBuf;

/// Modules a drafter guest loads from its initramfs (dependencies added).
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport",
];

/// Line the marker initramfs prints on the serial console once it runs.
pub const BOOT_MARKER: &str = "DRAFTER-BOOT-MARKER";
/// File name (in the guest folder) of a busybox initramfs that prints
/// [`BOOT_MARKER`] and powers off: the common yardstick for boot benchmarks.
pub const MARKER_INITRAMFS: &str = "marker-initramfs.cpio";

/// Fetches (once) and lays out the guest artifacts; returns their folder:
/// `vmlinuz`, `config`, `busybox`, `release`, `modules/*.ko`,
/// `modules/order` (file names in load order) and [`MARKER_INITRAMFS`]. `<lab>/guest/current` links to it.
pub fn ensure() -> Result<PathBuf> {
    let _lock = crate::paths::lock_cache()?;
    let lab = lab_dir();
    let cache = DebCache::new(lab.join("debs"))?;
    let (pkg, deb) = cache.kernel(KernelFlavour::Cloud)?;
    let release = debs::kernel_release(&pkg).to_string();
    let out = lab.join("guest").join(&release);
    let stamp = out.join(".complete");
    if !stamp.exists() {
        let root = lab.join("unpacked").join(&pkg);
        debs::extract(&deb, &root)?;
        let bb = lab.join("unpacked").join("busybox-static");
        debs::extract(&cache.get("busybox-static")?, &bb)?;

        let modules = out.join("modules");
        std::fs::create_dir_all(&modules)?;
        let boot = root.join("boot");
        std::fs::copy(boot.join(format!("vmlinuz-{release}")), out.join("vmlinuz"))
            .context("copying vmlinuz")?;
        std::fs::copy(boot.join(format!("config-{release}")), out.join("config"))?;
        std::fs::copy(bb.join("bin/busybox"), out.join("busybox"))?;
        let mut order = String::new();
        for path in debs::module_load_order(&root, &release, GUEST_MODULES)? {
            let name = path.file_name().context("module without a name")?;
            std::fs::copy(&path, modules.join(name))?;
            order.push_str(&name.to_string_lossy());
            order.push('\n');
        }
        std::fs::write(modules.join("order"), order)?;
        let mut w = drafter_cpio::CpioWriter::new();
        for d in ["bin", "dev", "proc"] {
            w.dir(d);
        }
        w.file("bin/busybox", 0o755, &std::fs::read(out.join("busybox"))?);
        let init = format!("#!/bin/busybox sh\necho {BOOT_MARKER}\n/bin/busybox poweroff -f\n");
        w.file("init", 0o755, init.as_bytes());
        w.finish(&mut std::fs::File::create(out.join(MARKER_INITRAMFS))?)?;
        std::fs::write(out.join("release"), &release)?;
        std::fs::write(&stamp, b"")?;
    }
    let current = lab.join("guest").join("current");
    if std::fs::read_link(&current).ok() != Some(PathBuf::from(&release)) {
        let _ = std::fs::remove_file(&current);
        std::os::unix::fs::symlink(&release, &current).context("linking guest/current")?;
    }
    Ok(out)
}
