//! Persistent tap devices (created with the tun driver's ioctls, in the calling thread's
//! network namespace).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;

use crate::error::{NetworkError, Result};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Attaches to the existing tap `name` (in the calling thread's namespace) like a VMM does:
/// `IFF_TAP | IFF_NO_PI`, plus `IFF_VNET_HDR` if asked. Frames are read/written on the file.
pub fn open_tap(name: &str, vnet_hdr: bool) -> Result<File> {
    let flags = IFF_TAP | IFF_NO_PI | if vnet_hdr { IFF_VNET_HDR } else { 0 };
    set_iff(name, flags).map(|(file, _)| file)
}

fn set_iff(name: &str, flags: libc::c_short) -> Result<(File, String)> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(NetworkError::InvalidConfig(format!(
            "tap name {name:?} must be 1..{} bytes",
            libc::IFNAMSIZ - 1
        )));
    }
    let op = format!("tap {name}");
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| NetworkError::io(format!("{op}: open /dev/net/tun"), e))?;
    // SAFETY: ifreq is a plain C struct/union of integers and byte arrays; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags;
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is a valid, initialised
    // ifreq that lives for the duration of the call, and `tun` is an open tun fd.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req as *mut libc::ifreq) };
    if rc < 0 {
        return Err(NetworkError::io(
            format!("{op}: TUNSETIFF"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok((tun, op))
}

/// Creates a persistent, single-queue tap device called `name` (`IFF_TAP | IFF_NO_PI`).
///
/// The VMM later attaches to it with `TUNSETIFF` (and may add `IFF_VNET_HDR`); it must not
/// ask for `IFF_MULTI_QUEUE`. Must be called on a thread inside the target namespace.
pub fn create_persistent_tap(name: &str) -> Result<()> {
    let (tun, op) = set_iff(name, IFF_TAP | IFF_NO_PI)?;
    // SAFETY: TUNSETPERSIST takes an integer argument by value; `tun` is attached to the tap.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) };
    if rc < 0 {
        return Err(NetworkError::io(
            format!("{op}: TUNSETPERSIST"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}
