//! File-system helpers: `.partial` names and a guard that removes what a
//! failed operation created.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

/// `<path>.partial`: where a file is written before it is renamed into place.
pub(crate) fn partial_path(path: &Path) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(".partial");
    PathBuf::from(s)
}

/// Removes, when dropped without [`Cleanup::disarm`], the files and the
/// (then empty) directories registered with it.
#[derive(Default)]
pub(crate) struct Cleanup {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

impl Cleanup {
    /// Registers a file to remove on failure.
    pub(crate) fn file(&mut self, path: PathBuf) {
        self.files.push(path);
    }

    /// Creates `dir` and its missing ancestors, registering the ones it
    /// created for removal on failure.
    pub(crate) fn create_dirs(&mut self, dir: &Path) -> io::Result<()> {
        let mut missing = Vec::new();
        let mut d = Some(dir);
        while let Some(p) = d {
            if p.as_os_str().is_empty() || p.exists() {
                break;
            }
            missing.push(p.to_path_buf());
            d = p.parent();
        }
        std::fs::create_dir_all(dir)?;
        self.dirs.extend(missing);
        Ok(())
    }

    /// Keeps everything: the operation succeeded.
    pub(crate) fn disarm(&mut self) {
        self.files.clear();
        self.dirs.clear();
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        // Deepest first, so each is empty by the time it is removed.
        self.dirs
            .sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}
