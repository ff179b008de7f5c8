//! A package's "in use" mark while a runner's VM runs from it.
//!
//! The runner maps the package's memory shared and opens its disks
//! read-write: while the VM runs they move ahead of the package's `state`,
//! which catches up only when the runner suspends. A run that ends without
//! a suspend (the runner killed, the host down, the guest powered off)
//! leaves memory and disks that no longer match the state, and resuming
//! that state would run the guest on data that is not its own.
//!
//! `<state>.in-use` marks a run: written and flushed before the VM is
//! restored, removed only once a suspend has put state, memory and disks
//! back in step, and `flock`ed while the run lasts, so two runners never
//! share a package. A mark without a lock holder is a run that ended
//! without a suspend: the package is refused.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Why a package cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum InUseError {
    /// Another process runs the package now.
    #[error("the package is in use by another run ({holder}; lock file {path})")]
    Busy {
        /// The mark.
        path: PathBuf,
        /// Who holds it, as it wrote.
        holder: String,
    },
    /// A run ended without a suspend: memory and disks are newer than the
    /// state.
    #[error(
        "the package's last run ({holder}) ended without a suspend (killed, or the VM stopped on its own): \
         its memory and disks no longer match its state, so it cannot be resumed; \
         restore the package from its archive or a backup ({path} marks it)"
    )]
    Unclean {
        /// The mark.
        path: PathBuf,
        /// Who wrote it.
        holder: String,
    },
    /// The mark cannot be read, written or removed.
    #[error("in-use mark {path}: {source}")]
    Io {
        /// The mark.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// The mark of a run, held (locked) until [`Self::release`] or drop. A
/// dropped mark stays on disk: only a completed suspend releases it.
pub struct InUse {
    path: PathBuf,
    _lock: Flock<File>,
}

/// `<state>.in-use`.
pub fn mark_path(state: &Path) -> PathBuf {
    let mut s = state.as_os_str().to_owned();
    s.push(".in-use");
    PathBuf::from(s)
}

impl InUse {
    /// Marks the package whose state is `state` as in use by this process,
    /// unless another process runs it or a run ended without a suspend.
    pub fn acquire(state: &Path) -> Result<Self, InUseError> {
        let path = mark_path(state);
        let io = |source| InUseError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        let mut lock = lock_or_busy(file, FlockArg::LockExclusiveNonblock, path.clone())?;
        let holder = holder_of(&mut lock);
        if !holder.is_empty() {
            return Err(InUseError::Unclean { path, holder });
        }
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        write!(lock, "pid {} since unix time {since}", std::process::id()).map_err(io)?;
        lock.sync_all().map_err(io)?;
        crate::files::fsync_dir_of(&path).map_err(io)?;
        Ok(InUse { path, _lock: lock })
    }

    /// Checks, without marking it, that nobody runs the package and that
    /// its last run ended with a suspend (for readers that never write the
    /// package, such as a peer starting from copies of it).
    pub fn check(state: &Path) -> Result<(), InUseError> {
        let path = mark_path(state);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(InUseError::Io { path, source }),
        };
        let mut lock = lock_or_busy(file, FlockArg::LockSharedNonblock, path.clone())?;
        let holder = holder_of(&mut lock);
        if holder.is_empty() {
            Ok(())
        } else {
            Err(InUseError::Unclean { path, holder })
        }
    }

    /// For a writer about to replace a package's state with its memory and
    /// disks (snapshotter, terminator, packager extract): refuses while a
    /// runner runs the package. A mark a finished run left is no obstacle:
    /// see [`Self::clear_stale`].
    pub fn ensure_not_running(state: &Path) -> Result<(), InUseError> {
        match Self::check(state) {
            Err(InUseError::Unclean { .. }) => Ok(()),
            other => other,
        }
    }

    /// After a writer put a complete new state, with its memory and disks,
    /// in place: removes the mark of a run that ended without a suspend,
    /// since the package is in step again. Refuses (and keeps the mark)
    /// while a runner runs the package.
    pub fn clear_stale(state: &Path) -> Result<(), InUseError> {
        let path = mark_path(state);
        let io = |source| InUseError::Io {
            path: path.clone(),
            source,
        };
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(e)),
        };
        let _lock = lock_or_busy(file, FlockArg::LockExclusiveNonblock, path.clone())?;
        std::fs::remove_file(&path).map_err(io)?;
        crate::files::fsync_dir_of(&path).map_err(io)?;
        Ok(())
    }

    /// Removes the mark: the package's state, memory and disks are in step
    /// (a suspend completed, or the guest never ran).
    pub fn release(self) -> Result<(), InUseError> {
        let io = |source| InUseError::Io {
            path: self.path.clone(),
            source,
        };
        std::fs::remove_file(&self.path).map_err(io)?;
        crate::files::fsync_dir_of(&self.path).map_err(io)?;
        Ok(())
    }
}

/// Locks the mark at `path` without waiting; held by another process, it
/// is busy (the error names who wrote it).
fn lock_or_busy(file: File, arg: FlockArg, path: PathBuf) -> Result<Flock<File>, InUseError> {
    Flock::lock(file, arg).map_err(|(mut file, _)| InUseError::Busy {
        holder: holder_of(&mut file),
        path,
    })
}

/// What a mark says (who wrote it), trimmed; empty if nothing.
fn holder_of(file: &mut File) -> String {
    let mut s = String::new();
    let _ = file.rewind();
    let _ = file.take(256).read_to_string(&mut s);
    s.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_marks_the_package_and_only_a_release_clears_it() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let state = dir.path().join("state.bin");
        InUse::check(&state).unwrap_or_else(|e| panic!("{e}"));
        let run = InUse::acquire(&state).unwrap_or_else(|e| panic!("{e}"));
        assert!(InUse::check(&state).is_err_and(|e| matches!(e, InUseError::Busy { .. })));
        // A second run while the first holds it: busy, naming the holder.
        let e = InUse::acquire(&state)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("in use by another run")
                && e.contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        // The first run ends without a release (killed): the mark stays
        // and the package is refused.
        drop(run);
        let e = InUse::acquire(&state)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("ended without a suspend") && !e.contains('\n'),
            "{e}"
        );
        assert!(InUse::check(&state).is_err_and(|e| matches!(e, InUseError::Unclean { .. })));
        assert!(mark_path(&state).exists());
        // A writer may replace the package now, and its new state clears
        // the mark; while a run holds it, neither.
        InUse::ensure_not_running(&state).unwrap_or_else(|e| panic!("{e}"));
        InUse::clear_stale(&state).unwrap_or_else(|e| panic!("{e}"));
        assert!(!mark_path(&state).exists());
        InUse::clear_stale(&state).unwrap_or_else(|e| panic!("{e}"));
        let run = InUse::acquire(&state).unwrap_or_else(|e| panic!("{e}"));
        assert!(InUse::ensure_not_running(&state).is_err());
        assert!(InUse::clear_stale(&state).is_err());
        assert!(mark_path(&state).exists());
        drop(run);
        // A run that released its mark leaves the package free.
        std::fs::remove_file(mark_path(&state)).unwrap_or_else(|e| panic!("{e}"));
        let run = InUse::acquire(&state).unwrap_or_else(|e| panic!("{e}"));
        run.release().unwrap_or_else(|e| panic!("{e}"));
        assert!(!mark_path(&state).exists());
        InUse::acquire(&state)
            .unwrap_or_else(|e| panic!("{e}"))
            .release()
            .unwrap_or_else(|e| panic!("{e}"));
    }
}
