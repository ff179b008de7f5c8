//! Named network namespaces, compatible with iproute2 (`/run/netns/<name>` bind mounts),
//! created and entered from Rust: `unshare(CLONE_NEWNET)` on a helper thread, bind-mount
//! its namespace file, and `setns` on helper threads to work inside.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use crate::error::{NetworkError, Result};
use crate::netlink::RouteSocket;

/// Directory holding the named namespaces (as iproute2).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// An open handle on a named network namespace.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    fd: OwnedFd,
}

impl NetNs {
    /// Creates the named namespace `name`; fails if it already exists.
    pub fn create(name: &str) -> Result<Self> {
        validate_name(name)?;
        prepare_run_dir()?;
        let path = path_of(name);
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| NetworkError::io(format!("create {}", path.display()), e))?;
        let bind_target = path.clone();
        let made = std::thread::scope(|s| {
            s.spawn(move || -> Result<()> {
                unshare(CloneFlags::CLONE_NEWNET)
                    .map_err(|e| NetworkError::io("unshare(CLONE_NEWNET)", e))?;
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &bind_target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| NetworkError::io(format!("bind {}", bind_target.display()), e))
            })
            .join()
            .unwrap_or_else(|_| {
                Err(NetworkError::InvalidConfig(
                    "namespace thread panicked".into(),
                ))
            })
        });
        if let Err(e) = made {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Self::open(name)
    }

    /// Opens an existing named namespace.
    pub fn open(name: &str) -> Result<Self> {
        validate_name(name)?;
        let path = path_of(name);
        let file = File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                NetworkError::NamespaceNotFound(name.to_string())
            } else {
                NetworkError::io(format!("open {}", path.display()), e)
            }
        })?;
        // A plain file that is not a namespace bind mount would make setns fail later;
        // check now so the error names the problem.
        let fd = OwnedFd::from(file);
        Ok(Self {
            name: name.to_string(),
            fd,
        })
    }

    /// Namespace name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// File descriptor of the namespace (usable with `setns` or `IFLA_NET_NS_FD`).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Runs `f` on a helper thread that has entered this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let fd = self.fd.as_fd();
        let name = self.name.clone();
        std::thread::scope(|s| {
            s.spawn(move || -> Result<T> {
                setns(fd, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| NetworkError::io(format!("enter namespace {name}"), e))?;
                f()
            })
            .join()
            .unwrap_or_else(|_| {
                Err(NetworkError::InvalidConfig(
                    "namespace thread panicked".into(),
                ))
            })
        })
    }

    /// Opens a route socket that talks to this namespace.
    pub fn route_socket(&self) -> Result<RouteSocket> {
        self.run(RouteSocket::open)
    }

    /// Writes a sysctl (path below `/proc/sys`) inside this namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run(|| write_sysctl(key, value))
    }
}

/// Writes `value` to `/proc/sys/<key>` in the calling thread's namespaces.
pub fn write_sysctl(key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key);
    let mut f = OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| NetworkError::io(format!("open {}", path.display()), e))?;
    f.write_all(value.as_bytes())
        .map_err(|e| NetworkError::io(format!("write {}", path.display()), e))
}

/// Removes the named namespace `name` (unmount + unlink). Missing namespaces are not an error.
pub fn delete(name: &str) -> Result<()> {
    validate_name(name)?;
    let path = path_of(name);
    match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(NetworkError::io(format!("unmount {}", path.display()), e)),
    }
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NetworkError::io(format!("remove {}", path.display()), e)),
    }
}

/// Names of all named namespaces.
pub fn list() -> Result<Vec<String>> {
    let entries = match fs::read_dir(NETNS_RUN_DIR) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(NetworkError::io(format!("list {NETNS_RUN_DIR}"), e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(NetworkError::InvalidConfig(format!(
            "invalid namespace name {name:?}"
        )));
    }
    Ok(())
}

/// Makes `/run/netns` a shared mount point, as iproute2 does, so bind mounts propagate.
fn prepare_run_dir() -> Result<()> {
    static PREPARED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut prepared = PREPARED.lock().unwrap_or_else(|p| p.into_inner());
    if *prepared {
        return Ok(());
    }
    prepare_run_dir_once()?;
    *prepared = true;
    Ok(())
}

fn prepare_run_dir_once() -> Result<()> {
    fs::create_dir_all(NETNS_RUN_DIR)
        .map_err(|e| NetworkError::io(format!("create {NETNS_RUN_DIR}"), e))?;
    let make_shared = || {
        mount(
            None::<&str>,
            NETNS_RUN_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match make_shared() {
        Ok(()) => Ok(()),
        Err(Errno::EINVAL) => {
            mount(
                Some(NETNS_RUN_DIR),
                NETNS_RUN_DIR,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| NetworkError::io(format!("bind {NETNS_RUN_DIR}"), e))?;
            make_shared().map_err(|e| NetworkError::io(format!("share {NETNS_RUN_DIR}"), e))
        }
        Err(e) => Err(NetworkError::io(format!("share {NETNS_RUN_DIR}"), e)),
    }
}
