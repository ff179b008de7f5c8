//! The jail's root: a tmpfs on `<jail>/root` in the VM process's own mount
//! namespace with its device nodes, `/tmp` and bind mounts of the paths the
//! VM needs at their original absolute paths; then `pivot_root` into it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{mknod, Mode, SFlag};

use crate::{absolute, io_err, sys_err, Access, JailError, JailOptions, PathKind};

/// Size cap of the jail's tmpfs (`/` and `/tmp`): they only hold device
/// nodes, mount points, sockets and small state files.
const TMPFS_SIZE: &str = "size=64m";

/// One path as the jail will show it.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Absolute (lexical) path, the same inside and outside.
    pub path: PathBuf,
    pub kind: PathKind,
    pub access: Access,
}

/// What the jail will hold, checked before anything is changed.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub entries: Vec<Entry>,
    uid: u32,
    gid: u32,
    /// Directories to create for the VM (missing written directories).
    to_create: Vec<PathBuf>,
}

fn readable(meta: &std::fs::Metadata, uid: u32, gid: u32, need: u32) -> bool {
    let mode = meta.mode();
    let class = if meta.uid() == uid {
        (mode >> 6) & 7
    } else if meta.gid() == gid {
        (mode >> 3) & 7
    } else {
        mode & 7
    };
    class & need == need
}

impl Plan {
    /// Checks every path of `options` (taken from `cwd`).
    pub(crate) fn new(cwd: &Path, options: &JailOptions) -> Result<Plan, JailError> {
        let (uid, gid) = (options.uid, options.gid);
        let mut entries = Vec::new();
        let mut to_create = Vec::new();
        for p in &options.paths {
            let path = absolute(cwd, &p.path);
            if path == Path::new("/") {
                return Err(JailError::Invalid(format!(
                    "{} would show the whole file system",
                    p.path.display()
                )));
            }
            let meta = std::fs::metadata(&path);
            match (p.kind, p.access, &meta) {
                (PathKind::Dir, Access::Write, Err(e))
                    if e.kind() == std::io::ErrorKind::NotFound =>
                {
                    // Created for the VM, outermost first.
                    let mut missing = Vec::new();
                    let mut d = path.clone();
                    while !d.exists() {
                        missing.push(d.clone());
                        if !d.pop() {
                            break;
                        }
                    }
                    missing.reverse();
                    for m in missing {
                        if !to_create.contains(&m) {
                            to_create.push(m);
                        }
                    }
                }
                (_, _, Err(e)) => {
                    return Err(JailError::Invalid(format!("{}: {e}", p.path.display())))
                }
                (PathKind::Dir, _, Ok(m)) if !m.is_dir() => {
                    return Err(JailError::Invalid(format!(
                        "{} is not a directory",
                        p.path.display()
                    )))
                }
                (PathKind::File, _, Ok(m)) if m.is_dir() => {
                    return Err(JailError::Invalid(format!(
                        "{} is a directory",
                        p.path.display()
                    )))
                }
                (kind, Access::Read, Ok(m)) => {
                    let need = if kind == PathKind::Dir { 5 } else { 4 };
                    if !readable(m, uid, gid, need) {
                        return Err(JailError::Invalid(format!(
                            "uid {uid}/gid {gid} cannot read {} (owner {}, mode {:o}): \
                             make it readable for them",
                            p.path.display(),
                            m.uid(),
                            m.mode() & 0o7777
                        )));
                    }
                }
                (_, Access::Write, Ok(_)) => {}
            }
            entries.push(Entry {
                path,
                kind: p.kind,
                access: p.access,
            });
        }
        // Directories before files, outer before inner.
        entries.sort_by_key(|e| (e.kind == PathKind::File, e.path.components().count()));
        Ok(Plan {
            entries,
            uid,
            gid,
            to_create,
        })
    }

    /// Creates the missing written directories and hands every written path
    /// to the uid/gid. Returns the directories created (outermost first).
    pub(crate) fn apply(&self) -> Result<Vec<PathBuf>, JailError> {
        let mut created = Vec::new();
        let result = (|| {
            for d in &self.to_create {
                std::fs::create_dir(d).map_err(io_err(format!("creating {}", d.display())))?;
                created.push(d.clone());
            }
            for e in self.entries.iter().filter(|e| e.access == Access::Write) {
                std::os::unix::fs::chown(&e.path, Some(self.uid), Some(self.gid)).map_err(
                    io_err(format!(
                        "handing {} to uid {}/gid {}",
                        e.path.display(),
                        self.uid,
                        self.gid
                    )),
                )?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            remove_empty_dirs(&created);
            return Err(e);
        }
        Ok(created)
    }
}

/// Removes `dirs` (outermost first) from the innermost on, where empty.
pub(crate) fn remove_empty_dirs(dirs: &[PathBuf]) {
    for d in dirs.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
}

fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn make_dir(path: &Path, mode: u32) -> Result<(), JailError> {
    match std::fs::create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(io_err(format!("creating {}", path.display()))(e)),
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("chmod {}", path.display())))
}

/// Creates `path`'s missing directories below `root`, mode 0755, owned by
/// root. Never called for a path under a bind-mounted directory.
fn make_dirs(root: &Path, path: &Path) -> Result<(), JailError> {
    let mut d = root.to_path_buf();
    for c in path.strip_prefix("/").unwrap_or(path).components() {
        d.push(c);
        make_dir(&d, 0o755)?;
    }
    Ok(())
}

fn device(root: &Path, host: &str, uid: u32, gid: u32) -> Result<(), JailError> {
    let meta = std::fs::metadata(host).map_err(io_err(host))?;
    let at = inside(root, Path::new(host));
    if let Some(parent) = Path::new(host).parent() {
        make_dirs(root, parent)?;
    }
    mknod(
        &at,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        meta.rdev(),
    )
    .map_err(sys_err(format!("mknod {}", at.display())))?;
    std::os::unix::fs::chown(&at, Some(uid), Some(gid))
        .map_err(io_err(format!("chown {}", at.display())))
}

/// In the VM process: a new mount namespace whose `root` is a fresh tmpfs
/// holding `/dev/kvm` (and `/dev/userfaultfd`), `/tmp` and the plan's
/// paths, with `cwd` existing in it.
pub(crate) fn build(
    root: &Path,
    plan: &Plan,
    cwd: &Path,
    userfaultfd: bool,
) -> Result<(), JailError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(sys_err("new mount namespace"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys_err("making mounts private"))?;
    let tmpfs = |at: &Path, mode: &str| {
        mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            MsFlags::MS_NOSUID,
            Some(format!("mode={mode},{TMPFS_SIZE}").as_str()),
        )
        .map_err(sys_err(format!("mounting a tmpfs on {}", at.display())))
    };
    tmpfs(root, "755")?;
    device(root, "/dev/kvm", plan.uid, plan.gid)?;
    if userfaultfd && Path::new("/dev/userfaultfd").exists() {
        device(root, "/dev/userfaultfd", plan.uid, plan.gid)?;
    }
    let tmp = root.join("tmp");
    make_dir(&tmp, 0o1777)?;
    tmpfs(&tmp, "1777")?;

    let mut bound: Vec<(PathBuf, Access)> = Vec::new();
    for e in &plan.entries {
        let at = inside(root, &e.path);
        let under = bound
            .iter()
            .filter(|(d, _)| e.path.starts_with(d))
            .max_by_key(|(d, _)| d.components().count())
            .map(|(_, a)| *a);
        match under {
            // Visible through the directory already, with the access it needs.
            Some(a) if a == e.access || a == Access::Write => {
                if e.kind == PathKind::Dir {
                    bound.push((e.path.clone(), e.access));
                }
                continue;
            }
            // Under a read-only directory: mounted over what shows there.
            Some(_) => {}
            None => {
                if let Some(parent) = e.path.parent() {
                    make_dirs(root, parent)?;
                }
                match e.kind {
                    PathKind::Dir => make_dir(&at, 0o755)?,
                    PathKind::File => {
                        std::fs::OpenOptions::new()
                            .write(true)
                            .create(true)
                            .truncate(false)
                            .open(&at)
                            .map_err(io_err(format!("creating {}", at.display())))?;
                    }
                }
            }
        }
        mount(
            Some(&e.path),
            &at,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys_err(format!("bind-mounting {}", e.path.display())))?;
        let mut flags = MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC;
        if e.access == Access::Read {
            flags |= MsFlags::MS_RDONLY;
        }
        mount(None::<&str>, &at, None::<&str>, flags, None::<&str>)
            .map_err(sys_err(format!("restricting {}", e.path.display())))?;
        if e.kind == PathKind::Dir {
            bound.push((e.path.clone(), e.access));
        }
    }
    let cwd_at = inside(root, cwd);
    if !cwd_at.is_dir() {
        make_dirs(root, cwd)?;
    }
    // Nothing else may be created in the jail's root.
    mount(
        None::<&str>,
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
        None::<&str>,
    )
    .map_err(sys_err("making the jail's root read-only"))?;
    Ok(())
}

/// Moves the calling process into `root` (`pivot_root`, the old root
/// detached) and into `cwd` there.
pub(crate) fn pivot(root: &Path, cwd: &Path) -> Result<(), JailError> {
    nix::unistd::chdir(root).map_err(sys_err(format!("chdir {}", root.display())))?;
    nix::unistd::pivot_root(".", ".").map_err(sys_err("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys_err("detaching the old root"))?;
    nix::unistd::chdir("/").map_err(sys_err("chdir /"))?;
    nix::unistd::chdir(cwd).map_err(sys_err(format!("chdir {} in the jail", cwd.display())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_inputs_and_missing_files_are_refused_before_anything_changes() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let secret = d.path().join("secret");
        std::fs::write(&secret, b"x").unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut o = JailOptions::new("t", d.path().join("vms"), 4242, 4242);
        o.read_file(&secret);
        let e = Plan::new(d.path(), &o)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("cannot read") && e.contains("secret"), "{e}");

        let mut o = JailOptions::new("t", d.path().join("vms"), 4242, 4242);
        o.write_dir(d.path().join("new/out"))
            .write_file(d.path().join("missing"));
        let e = Plan::new(d.path(), &o)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("missing"), "{e}");
        assert!(!d.path().join("new").exists());

        let mut o = JailOptions::new("t", d.path().join("vms"), 4242, 4242);
        o.write_dir(d.path().join("new/out")).write_file(&secret);
        let plan = Plan::new(d.path(), &o).unwrap_or_else(|e| panic!("{e}"));
        let created = plan.apply().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            created,
            vec![d.path().join("new"), d.path().join("new/out")]
        );
        let meta = std::fs::metadata(&secret).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((meta.uid(), meta.gid()), (4242, 4242));
        remove_empty_dirs(&created);
        assert!(!d.path().join("new").exists());
    }
}
