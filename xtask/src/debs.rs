//! Debian packages as a cache: download once with `apt-get download`, unpack
//! with `dpkg-deb -x`, and reuse on every later run without touching the network.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The flavour of Debian kernel a caller wants.
#[derive(Clone, Copy, Debug)]
pub enum KernelFlavour {
    /// `linux-image-*-amd64`: the lab's kernel (has 9p, kvm-amd).
    Generic,
    /// `linux-image-*-cloud-amd64`: the guest kernel our VMM boots.
    Cloud,
}

impl KernelFlavour {
    fn meta(self) -> &'static str {
        match self {
            KernelFlavour::Generic => "linux-image-amd64",
            KernelFlavour::Cloud => "linux-image-cloud-amd64",
        }
    }

    fn is_flavour(self, pkg: &str) -> bool {
        let cloud = pkg.ends_with("-cloud-amd64");
        pkg.starts_with("linux-image-6")
            && pkg.ends_with("-amd64")
            && !pkg.contains("-dbg")
            && !pkg.contains("-rt-")
            && match self {
                KernelFlavour::Generic => !cloud,
                KernelFlavour::Cloud => cloud,
            }
    }
}

/// A folder of cached `.deb` files.
pub struct DebCache {
    dir: PathBuf,
}

impl DebCache {
    /// Opens (creating) the cache folder.
    pub fn new(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { dir })
    }

    /// Cached `.deb` whose package name satisfies `pred`, if any.
    fn find(&self, pred: impl Fn(&str) -> bool) -> Result<Option<(String, PathBuf)>> {
        let mut hits = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if let Some(pkg) = name.strip_suffix(".deb").and_then(|n| n.split('_').next()) {
                if pred(pkg) {
                    hits.push((pkg.to_string(), path.clone()));
                }
            }
        }
        hits.sort();
        Ok(hits.pop())
    }

    /// The `.deb` of `package`, downloaded only when it is not cached yet.
    pub fn get(&self, package: &str) -> Result<PathBuf> {
        if let Some((_, path)) = self.find(|p| p == package)? {
            eprintln!("lab: cache hit {}", path.display());
            return Ok(path);
        }
        eprintln!("lab: downloading {package}");
        // Download into a private folder, then rename into the cache, so that
        // concurrent runs never see (or clobber) each other's partial files.
        let tmp = self
            .dir
            .join(format!(".dl-{}-{package}", std::process::id()));
        std::fs::create_dir_all(&tmp)?;
        let out = Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(&tmp)
            .output()
            .context("running apt-get (is this a Debian machine?)")?;
        for entry in std::fs::read_dir(&tmp)? {
            let path = entry?.path();
            if let Some(name) = path.file_name() {
                std::fs::rename(&path, self.dir.join(name))?;
            }
        }
        let _ = std::fs::remove_dir_all(&tmp);
        if !out.status.success() {
            bail!(
                "cannot fetch Debian package {package}: {} (run `apt-get update` first?)",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        match self.find(|p| p == package)? {
            Some((_, path)) => Ok(path),
            None => bail!("apt-get download {package} produced no .deb"),
        }
    }

    /// The versioned kernel image package for `flavour` (cached one first).
    pub fn kernel(&self, flavour: KernelFlavour) -> Result<(String, PathBuf)> {
        if let Some(hit) = self.find(|p| flavour.is_flavour(p))? {
            eprintln!("lab: cache hit {}", hit.1.display());
            return Ok(hit);
        }
        let out = Command::new("apt-cache")
            .args(["depends", flavour.meta()])
            .output()
            .context("running apt-cache")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let pkg = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| flavour.is_flavour(p))
            .map(str::to_string);
        let Some(pkg) = pkg else {
            bail!(
                "cannot resolve {} to a kernel package (run `apt-get update` first?)",
                flavour.meta()
            );
        };
        let path = self.get(&pkg)?;
        Ok((pkg, path))
    }
}

/// Unpacks `deb` into `dest` unless `dest` already holds it.
pub fn extract(deb: &Path, dest: &Path) -> Result<()> {
    let stamp = dest.join(".extracted");
    if stamp.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dest)?;
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(dest)
        .status()
        .context("running dpkg-deb")?;
    if !status.success() {
        bail!("cannot unpack {} (corrupt download?)", deb.display());
    }
    std::fs::write(&stamp, b"")?;
    Ok(())
}

/// Kernel release (`6.1.0-56-amd64`) from a `linux-image-<release>` package name.
pub fn kernel_release(pkg: &str) -> &str {
    pkg.trim_start_matches("linux-image-")
}

/// Modules (paths) needed to load `wanted`, in load order, deduplicated.
/// Uses `modprobe --show-depends` against the unpacked tree (after `depmod`).
pub fn module_load_order(root: &Path, release: &str, wanted: &[&str]) -> Result<Vec<PathBuf>> {
    let moddir = root.join("lib/modules").join(release);
    if !moddir.join("modules.dep").exists() || !moddir.join("modules.dep.bin").exists() {
        let status = Command::new("depmod")
            .arg("-b")
            .arg(root)
            .arg(release)
            .status()
            .context("running depmod (install the kmod package)")?;
        if !status.success() {
            bail!("depmod failed for {}", moddir.display());
        }
    }
    let mut order: Vec<PathBuf> = Vec::new();
    for module in wanted {
        let out = Command::new("modprobe")
            .arg("-d")
            .arg(root)
            .args(["-S", release, "--show-depends", module])
            .output()
            .context("running modprobe (install the kmod package)")?;
        if !out.status.success() {
            bail!(
                "module {module} not found for {release}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "insmod /path/x.ko [params]"; "builtin x" needs nothing.
            if let Some(path) = line.strip_prefix("insmod ") {
                let path = PathBuf::from(path.split_whitespace().next().unwrap_or_default());
                if !order.contains(&path) {
                    order.push(path);
                }
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_package_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("debcache-test-{}", std::process::id()));
        let cache = DebCache::new(dir.clone()).unwrap();
        let err = cache
            .get("drafter-no-such-package")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot fetch Debian package drafter-no-such-package"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn kernel_flavours_are_told_apart() {
        assert!(KernelFlavour::Generic.is_flavour("linux-image-6.1.0-56-amd64"));
        assert!(!KernelFlavour::Generic.is_flavour("linux-image-6.1.0-56-cloud-amd64"));
        assert!(KernelFlavour::Cloud.is_flavour("linux-image-6.1.0-56-cloud-amd64"));
        assert!(!KernelFlavour::Cloud.is_flavour("linux-image-6.1.0-56-amd64-dbg"));
        assert_eq!(
            kernel_release("linux-image-6.1.0-56-amd64"),
            "6.1.0-56-amd64"
        );
    }
}
