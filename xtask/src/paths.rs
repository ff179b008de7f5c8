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
