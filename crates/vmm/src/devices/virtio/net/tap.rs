//! Opening a tap device by name, optionally inside a named network namespace.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Mutex;

/// Size of the virtio-net header on the tap (`virtio_net_hdr_v1`, used with VIRTIO_F_VERSION_1).
pub const VNET_HDR_LEN: usize = 12;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFNAMSIZ: usize = 16;

/// Why a tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long or contains a NUL.
    #[error("invalid tap name {0:?} (1 to 15 bytes, no NUL)")]
    BadName(String),
    /// The network namespace does not exist or cannot be entered.
    #[error("cannot enter network namespace {name:?} ({path}): {source}")]
    Netns {
        /// Namespace name.
        name: String,
        /// Path tried.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// `/dev/net/tun` or one of its ioctls failed.
    #[error("cannot open tap {name:?}: {what}: {source}")]
    Open {
        /// Interface name.
        name: String,
        /// Step that failed.
        what: &'static str,
        /// OS error.
        source: io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap device (non-blocking, with virtio-net headers).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Taps opened ahead by [`Tap::preopen`]: name, namespace, tap.
static PREOPENED: Mutex<Vec<(String, Option<String>, Tap)>> = Mutex::new(Vec::new());

impl Tap {
    /// Opens tap `name` (in `/run/netns/<netns>` when given) now and keeps
    /// it, so that a later [`Tap::open`] of the same name and namespace gets
    /// a duplicate of it instead of opening anew: a jailed VM process opens
    /// its taps this way before it gives up the privileges (and leaves the
    /// file system) that opening takes.
    pub fn preopen(name: &str, netns: Option<&str>) -> Result<(), TapError> {
        let tap = Self::open(name, netns)?;
        let mut list = PREOPENED.lock().unwrap_or_else(|p| p.into_inner());
        list.push((name.to_owned(), netns.map(str::to_owned), tap));
        Ok(())
    }

    /// Opens ahead ([`Tap::preopen`]) every tap device of network namespace
    /// `netns` that no other process holds, for a VM whose tap name is not
    /// known yet (one that will migrate in); returns their names. Other
    /// interfaces are left alone (attaching by name to an interface that is
    /// not a tap fails).
    pub fn preopen_all(netns: &str) -> Result<Vec<String>, TapError> {
        let ns = netns.to_string();
        let opened = std::thread::Builder::new()
            .name("tap-netns".into())
            .spawn(move || {
                in_netns(&ns, || {
                    let mut taps = Vec::new();
                    for name in interface_names() {
                        if name == "lo" || name.len() >= IFNAMSIZ {
                            continue;
                        }
                        if let Ok(tap) = Self::open_here(&name) {
                            taps.push(tap);
                        }
                    }
                    Ok(taps)
                })
            })
            .map_err(|source| TapError::Open {
                name: String::new(),
                what: "spawn netns thread",
                source,
            })?
            .join()
            .unwrap_or_else(|_| {
                Err(TapError::Open {
                    name: String::new(),
                    what: "netns thread panicked",
                    source: io::Error::other("panic"),
                })
            })?;
        let names: Vec<String> = opened.iter().map(|t| t.name.clone()).collect();
        let mut list = PREOPENED.lock().unwrap_or_else(|p| p.into_inner());
        for tap in opened {
            list.push((tap.name.clone(), Some(netns.to_owned()), tap));
        }
        Ok(names)
    }

    /// Opens (creating if needed) tap `name` in the current network namespace,
    /// or inside `/run/netns/<netns>` when given; a tap opened ahead with
    /// [`Tap::preopen`] is duplicated instead.
    pub fn open(name: &str, netns: Option<&str>) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('\0') {
            return Err(TapError::BadName(name.to_string()));
        }
        {
            let list = PREOPENED.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, _, tap)) = list
                .iter()
                .find(|(n, ns, _)| n == name && ns.as_deref() == netns)
            {
                let file = tap.file.try_clone().map_err(|source| TapError::Open {
                    name: name.to_string(),
                    what: "duplicate the tap opened ahead",
                    source,
                })?;
                return Ok(Self {
                    file,
                    name: name.to_string(),
                });
            }
        }
        match netns {
            None => Self::open_here(name),
            Some(ns) => {
                let (name, ns) = (name.to_string(), ns.to_string());
                // setns() affects only the calling thread: do it on a helper
                // thread so the rest of the VMM stays in its namespace.
                std::thread::Builder::new()
                    .name("tap-netns".into())
                    .spawn(move || in_netns(&ns, || Self::open_here(&name)))
                    .map_err(|source| TapError::Open {
                        name: String::new(),
                        what: "spawn netns thread",
                        source,
                    })?
                    .join()
                    .unwrap_or_else(|_| {
                        Err(TapError::Open {
                            name: String::new(),
                            what: "netns thread panicked",
                            source: io::Error::other("panic"),
                        })
                    })
            }
        }
    }

    fn open_here(name: &str) -> Result<Self, TapError> {
        let err = |what, source| TapError::Open {
            name: name.to_string(),
            what,
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| err("open /dev/net/tun", e))?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an `ifreq`; `req` is a valid,
        // correctly sized `ifreq` layout that outlives the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if r < 0 {
            return Err(err("TUNSETIFF", io::Error::last_os_error()));
        }
        let hdr_len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer, valid for the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) };
        if r < 0 {
            return Err(err("TUNSETVNETHDRSZ", io::Error::last_os_error()));
        }
        // No offloads: we offer no checksum/TSO features to the guest.
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) };
        if r < 0 {
            return Err(err("TUNSETOFFLOAD", io::Error::last_os_error()));
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// For fuzzing only: a "tap" over any non-blocking file or socket
    /// that carries frames with virtio-net headers.
    #[doc(hidden)]
    pub fn from_file(file: File, name: &str) -> Self {
        Self {
            file,
            name: name.to_owned(),
        }
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tap file (reads and writes are whole frames with a virtio-net header).
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// The names of the calling thread's network namespace's interfaces.
fn interface_names() -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns a heap array terminated by an entry with
    // index 0 (or NULL on failure), freed below with if_freenameindex.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return out;
    }
    let mut p = list;
    // SAFETY: `p` walks the array up to its terminating entry; each name is
    // a NUL-terminated string owned by the array.
    unsafe {
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            out.push(
                std::ffi::CStr::from_ptr((*p).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// Runs `f` with the calling thread inside network namespace `ns`, then returns
/// the thread to its original namespace.
fn in_netns<T>(ns: &str, f: impl FnOnce() -> Result<T, TapError>) -> Result<T, TapError> {
    let path = PathBuf::from("/run/netns").join(ns);
    let ns_err = |source| TapError::Netns {
        name: ns.to_string(),
        path: path.clone(),
        source,
    };
    if ns.is_empty() || ns.contains('/') {
        return Err(ns_err(io::Error::from(io::ErrorKind::InvalidInput)));
    }
    let original = File::open("/proc/thread-self/ns/net").map_err(ns_err)?;
    let target = File::open(&path).map_err(ns_err)?;
    // SAFETY: setns on a valid namespace fd; affects only this thread.
    if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(ns_err(io::Error::last_os_error()));
    }
    let out = f();
    // SAFETY: as above, returning to the namespace the thread started in.
    if unsafe { libc::setns(original.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        tracing::error!("cannot return helper thread to its network namespace");
    }
    out
}
