//! Dialling a migration peer (a source peer, a registry) with a bound.
//!
//! `TcpStream::connect` waits for the kernel's SYN retries (about two
//! minutes by default) when the far side drops packets: a firewalled or
//! vanished host. A peer or terminator started against one must fail
//! within its handshake bound instead, with the address named.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Connects to `addr` (`host:port`), trying each address it resolves to
/// for at most `within` each; `Duration::ZERO` waits as long as the kernel
/// does.
pub fn connect(addr: &str, within: Duration) -> io::Result<TcpStream> {
    if within.is_zero() {
        return TcpStream::connect(addr);
    }
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, within) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::fd::AsRawFd;
    use std::time::Instant;

    #[test]
    fn a_peer_that_drops_the_connection_request_fails_within_the_bound() {
        // A listener whose accept queue holds one connection: once it is
        // full the kernel drops further SYNs, as a firewall would.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: `listen` on a socket this test owns; it only changes its
        // backlog.
        let r = unsafe { libc::listen(listener.as_raw_fd(), 0) };
        assert_eq!(r, 0, "listen: {}", io::Error::last_os_error());
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("{e}"))
            .to_string();
        let mut queued = Vec::new();
        // Fill the accept queue (its size is the backlog plus one).
        let err = loop {
            match connect(&addr, Duration::from_millis(500)) {
                Ok(s) => queued.push(s),
                Err(e) => break e,
            }
            assert!(queued.len() < 8, "the accept queue never filled");
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        // The same dial with a longer bound also ends, with the same error.
        let t = Instant::now();
        let err = connect(&addr, Duration::from_secs(1)).map(|_| ());
        assert!(
            matches!(&err, Err(e) if e.kind() == io::ErrorKind::TimedOut),
            "{err:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(60));
    }

    #[test]
    fn an_address_that_does_not_resolve_is_an_error() {
        assert!(connect("no-such-host.invalid:1", Duration::from_secs(1)).is_err());
        assert!(connect("not an address", Duration::from_secs(1)).is_err());
    }
}
