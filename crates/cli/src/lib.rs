//! Thin command-line binaries over the drafter libraries.
//!
//! The library part holds what the binaries share and their tests reach:
//! [`resolve_inside`] (paths named over a control socket) and
//! [`bind_private_socket`] (control sockets only the owner may use), and
//! [`tls`] (the `--tls-*` flags of the commands that talk over the network).

pub mod commands;
pub mod tls;

use std::os::unix::net::UnixListener;
use std::path::{Component, Path, PathBuf};

use clap::parser::ValueSource;
use drafter_jail::{CgroupVersion, JailOptions, Role, Supervisor};

/// The reference's jailer flags, shared by every command that runs a VM.
/// Giving any of them on the command line runs the VM in a jail (see
/// `drafter_jail`); the others then take these defaults.
#[derive(clap::Args, Debug, Clone)]
pub struct JailArgs {
    /// User ID for the VM process. Any of --uid, --gid, --chroot-base-dir,
    /// --cgroup-version or --numa-node runs the VM in a jail: its own mount
    /// namespace and root under --chroot-base-dir, its own cgroup, no
    /// capabilities, this uid/gid; files it writes are handed to them
    #[arg(long, default_value_t = 0)]
    pub uid: u32,
    /// Group ID for the VM process (see --uid)
    #[arg(long, default_value_t = 0)]
    pub gid: u32,
    /// chroot base directory: the jail is <dir>/<vm-id>/root (see --uid)
    #[arg(long, default_value = "out/vms")]
    pub chroot_base_dir: PathBuf,
    /// Cgroup version to use for the jail (1 or 2; see --uid)
    #[arg(long, default_value_t = 2)]
    pub cgroup_version: u32,
    /// NUMA node to run the VM in: its CPUs and memory (see --uid)
    #[arg(long, default_value_t = 0)]
    pub numa_node: u32,
}

impl JailArgs {
    /// Whether any jailer flag was given on the command line.
    pub fn requested(matches: &clap::ArgMatches) -> bool {
        [
            "uid",
            "gid",
            "chroot_base_dir",
            "cgroup_version",
            "numa_node",
        ]
        .iter()
        .any(|id| matches.value_source(id) == Some(ValueSource::CommandLine))
    }

    /// The jail options for command `name` (no paths yet).
    pub fn options(&self, name: &str) -> Result<JailOptions, String> {
        let mut o = JailOptions::new(name, &self.chroot_base_dir, self.uid, self.gid);
        o.cgroup_version =
            CgroupVersion::from_number(self.cgroup_version).map_err(|e| e.to_string())?;
        o.numa_node = self.numa_node;
        if self.uid == 0 || self.gid == 0 {
            tracing::warn!(
                uid = self.uid,
                gid = self.gid,
                "the jailed VM process keeps uid or gid 0 (without capabilities); give --uid and --gid"
            );
        }
        Ok(o)
    }
}

/// Enters the jail `options` describe. In the supervisor, returns it: run it
/// and exit with its status. In the VM process, runs `prepare` (what needs
/// privileges: opening taps ahead), locks the process down and returns
/// `None`: go on running the command.
pub fn enter_jail(
    options: JailOptions,
    prepare: impl FnOnce() -> Result<(), String>,
) -> Result<Option<Supervisor>, String> {
    match drafter_jail::enter(options).map_err(|e| e.to_string())? {
        Role::Supervisor(s) => Ok(Some(s)),
        Role::Vm(c) => {
            tracing::info!(vm_id = c.vm_id(), jail = %c.jail_dir().display(), "entering the jail");
            prepare()?;
            c.lock_down().map_err(|e| e.to_string())?;
            Ok(None)
        }
    }
}

/// Resolves `given`, a path a control client named, inside `dir` (the VM's
/// directory): a relative path is taken from `dir`, an absolute one must
/// lie inside it. Refused, with one line saying why: an empty path, any
/// `..` component, a path whose directory (symbolic links resolved) is not
/// `dir` or below it, a directory that does not exist, and a final
/// component that is a symbolic link (it could point anywhere).
pub fn resolve_inside(dir: &Path, given: &str) -> Result<PathBuf, String> {
    if given.is_empty() {
        return Err("empty path".into());
    }
    let p = Path::new(given);
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(format!("path {given:?} contains '..'"));
    }
    let root = dir
        .canonicalize()
        .map_err(|e| format!("VM directory {}: {e}", dir.display()))?;
    let full = if p.is_absolute() {
        p.to_path_buf()
    } else {
        root.join(p)
    };
    let (Some(parent), Some(name)) = (full.parent(), full.file_name()) else {
        return Err(format!("path {given:?} names no file"));
    };
    let parent = parent
        .canonicalize()
        .map_err(|e| format!("path {given:?}: directory {}: {e}", parent.display()))?;
    if !parent.starts_with(&root) {
        return Err(format!(
            "path {given:?} is outside the VM directory {}",
            root.display()
        ));
    }
    let resolved = parent.join(name);
    if resolved
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink())
    {
        return Err(format!("path {given:?} is a symbolic link"));
    }
    Ok(resolved)
}

/// Binds a Unix socket at `path` that only the owner may connect to (mode
/// 0600 from its creation: the umask is narrowed around the bind, so call
/// this before other threads create files). A stale socket at `path` is
/// replaced; any other file there is left alone and refused.
pub fn bind_private_socket(path: &Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| format!("cannot replace socket {}: {e}", path.display()))?,
        Ok(_) => {
            return Err(format!(
                "{} exists and is not a socket; not replacing it",
                path.display()
            ))
        }
        Err(_) => {}
    }
    // SAFETY: umask only swaps the process's file mode mask; it cannot fail.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let l = bound.map_err(|e| format!("cannot bind control socket {}: {e}", path.display()))?;
    // Belt and braces: the mode does not depend on the umask honoured above.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict control socket {}: {e}", path.display()))?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_inside_the_directory_only() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let root = d.path().canonicalize().unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir(root.join("sub")).unwrap_or_else(|e| panic!("{e}"));
        let ok = |g: &str| resolve_inside(d.path(), g).unwrap_or_else(|e| panic!("{g}: {e}"));
        assert_eq!(ok("state"), root.join("state"));
        assert_eq!(ok("./sub/state"), root.join("sub/state"));
        assert_eq!(
            ok(root.join("sub/mem").to_str().unwrap_or_default()),
            root.join("sub/mem")
        );
        std::os::unix::fs::symlink("/tmp", root.join("out")).unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink("/etc/passwd", root.join("link"))
            .unwrap_or_else(|e| panic!("{e}"));
        for (bad, why) in [
            ("", "empty"),
            ("../state", "'..'"),
            ("sub/../../state", "'..'"),
            ("/tmp/state", "outside"),
            ("out/state", "outside"),
            ("link", "symbolic link"),
            ("missing/state", "missing"),
        ] {
            let e = resolve_inside(d.path(), bad).err().unwrap_or_default();
            assert!(e.contains(why) && !e.contains('\n'), "{bad:?}: {e}");
        }
    }
}
