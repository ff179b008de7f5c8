//! Guest-side AF_VSOCK connections to the host.

use std::io;

pub use ::vsock::VsockStream;

/// The host's context id as seen from a guest.
pub const HOST_CID: u32 = 2;

/// Connects from the guest to `port` on the host (CID 2).
pub fn connect_host(port: u32) -> io::Result<VsockStream> {
    VsockStream::connect_with_cid_port(HOST_CID, port)
}
