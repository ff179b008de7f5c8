//! Where things live: the workspace root and the lab's cache under `target/lab`.

use std::path::{Path, PathBuf};

/// The workspace root (parent of the `xtask` crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The lab cache: downloaded packages, unpacked kernels, initramfs, run folders.
/// Always `<workspace>/target/lab`, whatever `CARGO_TARGET_DIR` says, so every
/// tool and test finds the same guest kernels.
pub fn lab_dir() -> PathBuf {
    workspace_root().join("target").join("lab")
}

/// Holds the lab cache's lock: while it lives, no other xtask process
/// downloads, unpacks or builds into the cache (readers of finished files
/// need no lock, since everything is complete before its stamp or rename).
pub struct CacheLock(#[allow(dead_code)] std::fs::File);

/// Waits for and takes the exclusive lock on the lab cache.
pub fn lock_cache() -> anyhow::Result<CacheLock> {
    let dir = lab_dir();
    std::fs::create_dir_all(&dir)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".cache.lock"))?;
    file.lock()?;
    Ok(CacheLock(file))
}
