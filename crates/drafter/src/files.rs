//! File helpers of the snapshotter and runner: sparse copies, `.partial`
//! files that become real only on success, and flushing.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// `<path>.partial`: where a file is written before it is renamed into place.
pub(crate) fn partial_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// Copies `from` to `to` (created or truncated), leaving holes where `from`
/// has blocks of zeroes; `progress(bytes_done, total)` is called as it goes.
pub(crate) fn sparse_copy(
    from: &Path,
    to: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> io::Result<u64> {
    const CHUNK: usize = 1 << 20;
    const BLOCK: usize = 4096;
    let mut src = File::open(from)?;
    let total = src.metadata()?.len();
    let dst = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(to)?;
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    progress(0, total);
    loop {
        let mut filled = 0;
        while filled < CHUNK {
            match src.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            break;
        }
        // Write runs of non-zero blocks; skip zero blocks (holes).
        let mut at = 0;
        while at < filled {
            let end = (at + BLOCK).min(filled);
            if buf[at..end].iter().all(|&b| b == 0) {
                at = end;
                continue;
            }
            let start = at;
            at = end;
            while at < filled {
                let end = (at + BLOCK).min(filled);
                if buf[at..end].iter().all(|&b| b == 0) {
                    break;
                }
                at = end;
            }
            dst.write_all_at(&buf[start..at], offset + start as u64)?;
        }
        offset += filled as u64;
        progress(offset, total);
    }
    dst.set_len(offset)?;
    dst.sync_all()?;
    Ok(offset)
}

/// Flushes a file's data to stable storage (any descriptor of it will do).
pub(crate) fn fsync(path: &Path) -> io::Result<()> {
    OpenOptions::new().write(true).open(path)?.sync_all()
}

/// Flushes the directory holding `path`, so that a rename into it is durable.
pub(crate) fn fsync_dir_of(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Bytes a file occupies on disk (holes excluded).
pub(crate) fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// Whether two paths name the same existing file.
pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Files and directories created on the way to a result: removed on drop
/// unless [`Created::keep`] was called.
#[derive(Default)]
pub(crate) struct Created {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    kept: bool,
}

impl Created {
    /// Creates `dir` and its missing ancestors, remembering the new ones.
    pub(crate) fn create_dir_all(&mut self, dir: &Path) -> io::Result<()> {
        let mut missing = Vec::new();
        let mut d = Some(dir);
        while let Some(p) = d {
            if p.as_os_str().is_empty() || p.exists() {
                break;
            }
            missing.push(p.to_path_buf());
            d = p.parent();
        }
        for p in missing.iter().rev() {
            match fs::create_dir(p) {
                Ok(()) => self.dirs.push(p.clone()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Remembers a file to remove on failure.
    pub(crate) fn file(&mut self, path: PathBuf) {
        self.files.push(path);
    }

    /// Forgets a file (it was renamed away).
    pub(crate) fn forget(&mut self, path: &Path) {
        self.files.retain(|f| f != path);
    }

    /// Keeps everything.
    pub(crate) fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        for f in &self.files {
            let _ = fs::remove_file(f);
        }
        for d in self.dirs.iter().rev() {
            let _ = fs::remove_dir(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_content_and_holes() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let src = dir.path().join("src");
        let f = File::create(&src).unwrap_or_else(|e| panic!("{e}"));
        f.write_all_at(b"head", 0).unwrap_or_else(|e| panic!("{e}"));
        f.write_all_at(b"tail", (8 << 20) + 5)
            .unwrap_or_else(|e| panic!("{e}"));
        drop(f);
        let dst = dir.path().join("dst");
        let mut calls = 0;
        let n = sparse_copy(&src, &dst, &mut |_, _| calls += 1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n, (8 << 20) + 9);
        assert!(calls >= 9);
        assert_eq!(fs::read(&src).ok(), fs::read(&dst).ok());
        assert!(allocated_bytes(&dst) < 1 << 20, "{}", allocated_bytes(&dst));
    }

    #[test]
    fn created_files_and_dirs_go_unless_kept() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let deep = dir.path().join("a/b");
        {
            let mut c = Created::default();
            c.create_dir_all(&deep).unwrap_or_else(|e| panic!("{e}"));
            let f = deep.join("x.partial");
            fs::write(&f, b"x").unwrap_or_else(|e| panic!("{e}"));
            c.file(f);
        }
        assert!(!dir.path().join("a").exists());
        let mut c = Created::default();
        c.create_dir_all(&deep).unwrap_or_else(|e| panic!("{e}"));
        c.keep();
        assert!(deep.is_dir());
    }
}
