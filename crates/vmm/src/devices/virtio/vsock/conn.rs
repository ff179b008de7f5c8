//! One host-side vsock connection: a Unix stream bridged to a guest port, with
//! virtio-vsock credit accounting in both directions.

use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use super::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND};

/// Receive buffer we advertise to the guest per connection.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Send a credit update once this many bytes were forwarded since the last one.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// Identifies a connection: host-side port and guest-side port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    /// Port on the host side (CID 2).
    pub local_port: u32,
    /// Port on the guest side.
    pub peer_port: u32,
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST sent to the guest, waiting for RESPONSE.
    LocalInit,
    /// Data flows.
    Established,
}

/// What a write from the guest did to the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum TxOutcome {
    /// Fine.
    Ok,
    /// The Unix peer is gone or the guest overran its credit: reset.
    Reset,
}

/// A bridged connection.
pub struct Conn {
    /// The host end.
    pub stream: UnixStream,
    /// Epoll token of `stream`.
    pub token: u64,
    /// State.
    pub state: ConnState,
    /// Guest data not yet written to the stream.
    pub tx_buf: Vec<u8>,
    /// Stream data read but not yet delivered to the guest.
    pub to_guest: Vec<u8>,
    /// Bytes forwarded from the guest to the stream (our fwd_cnt).
    pub fwd_cnt: Wrapping<u32>,
    /// fwd_cnt last announced to the guest.
    pub last_fwd_cnt_sent: Wrapping<u32>,
    /// Bytes delivered to the guest.
    pub tx_cnt: Wrapping<u32>,
    /// Guest's receive buffer size.
    pub peer_buf_alloc: u32,
    /// Bytes the guest consumed.
    pub peer_fwd_cnt: Wrapping<u32>,
    /// The stream may have data (edge-triggered readiness not yet drained).
    pub readable: bool,
    /// The stream reached end of file (host will send no more).
    pub local_eof: bool,
    /// SHUTDOWN flags received from the guest.
    pub peer_shutdown: u32,
    /// A CREDIT_REQUEST is outstanding.
    pub credit_requested: bool,
    /// Write side of the stream was shut down.
    pub stream_write_closed: bool,
    /// The guest was told (SHUTDOWN SEND) that the host side reached end of file.
    pub eof_announced: bool,
    /// Leading bytes of `tx_buf` that are not guest data (the `OK` reply).
    uncounted: usize,
}

impl Conn {
    /// A connection over `stream` in `state`.
    pub fn new(stream: UnixStream, token: u64, state: ConnState) -> Self {
        Self {
            stream,
            token,
            state,
            tx_buf: Vec::new(),
            to_guest: Vec::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            readable: true,
            local_eof: false,
            peer_shutdown: 0,
            credit_requested: false,
            stream_write_closed: false,
            eof_announced: false,
            uncounted: 0,
        }
    }

    /// Bytes we may still send to the guest (its free buffer space).
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether the guest should get a CREDIT_UPDATE now.
    pub fn needs_credit_update(&self) -> bool {
        (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD
    }

    /// Writes guest data to the stream, buffering what does not fit.
    pub fn send_to_stream(&mut self, data: &[u8]) -> TxOutcome {
        if self.peer_shutdown & SHUTDOWN_SEND != 0 || self.stream_write_closed {
            return TxOutcome::Reset;
        }
        // We granted the guest BUF_ALLOC bytes beyond what we forwarded: more
        // than that buffered means it ignores credit. Checked before buffering,
        // so a connection never holds more than it granted.
        if self.tx_buf.len() - self.uncounted + data.len() > BUF_ALLOC as usize {
            tracing::warn!("vsock: guest overran its credit");
            return TxOutcome::Reset;
        }
        self.tx_buf.extend_from_slice(data);
        self.flush()
    }

    /// Writes buffered guest data to the stream until it would block.
    pub fn flush(&mut self) -> TxOutcome {
        let mut written = 0;
        while written < self.tx_buf.len() {
            match self.stream.write(&self.tx_buf[written..]) {
                Ok(0) => return TxOutcome::Reset,
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return TxOutcome::Reset,
            }
        }
        self.tx_buf.drain(..written);
        // The "OK <port>\n" reply is not guest data and does not count as forwarded.
        let reply_bytes = written.min(self.uncounted);
        self.uncounted -= reply_bytes;
        self.fwd_cnt += (written - reply_bytes) as u32;
        if self.tx_buf.is_empty() && self.peer_shutdown & SHUTDOWN_SEND != 0 {
            self.close_stream_write();
        }
        TxOutcome::Ok
    }

    /// Puts the handshake reply ahead of any guest data.
    pub fn queue_handshake_reply(&mut self, reply: &[u8]) -> TxOutcome {
        let mut v = reply.to_vec();
        v.append(&mut self.tx_buf);
        self.tx_buf = v;
        self.uncounted += reply.len();
        self.state = ConnState::Established;
        self.flush()
    }

    fn close_stream_write(&mut self) {
        if !self.stream_write_closed {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.stream_write_closed = true;
        }
    }

    /// Reads from the stream into `to_guest`, at most what the guest can take.
    pub fn fill_from_stream(&mut self, scratch: &mut [u8]) -> io::Result<()> {
        if !self.readable || self.local_eof || !self.to_guest.is_empty() {
            return Ok(());
        }
        let room = (self.peer_credit() as usize).min(scratch.len());
        if room == 0 {
            return Ok(());
        }
        loop {
            match self.stream.read(&mut scratch[..room]) {
                Ok(0) => {
                    self.local_eof = true;
                    self.readable = false;
                    return Ok(());
                }
                Ok(n) => {
                    self.to_guest.extend_from_slice(&scratch[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Both sides are done: the connection can be reset and dropped.
    pub fn finished(&self) -> bool {
        let guest_done = self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND
            || (self.peer_shutdown & SHUTDOWN_SEND != 0
                && self.local_eof
                && self.to_guest.is_empty());
        guest_done && self.tx_buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_ignoring_credit_never_grows_the_buffer_past_what_was_granted() {
        // The host end never reads: past the socket buffer, data stays in tx_buf.
        let (ours, _host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut c = Conn::new(ours, 0, ConnState::Established);
        let chunk = vec![7u8; 48 * 1024];
        let mut outcome = TxOutcome::Ok;
        for _ in 0..1000 {
            outcome = c.send_to_stream(&chunk);
            assert!(
                c.tx_buf.len() <= BUF_ALLOC as usize,
                "{} bytes buffered, {BUF_ALLOC} granted",
                c.tx_buf.len()
            );
            if outcome == TxOutcome::Reset {
                break;
            }
        }
        assert_eq!(outcome, TxOutcome::Reset);
        // Within credit, buffering up to the grant is fine.
        assert!(c.tx_buf.len() + chunk.len() > BUF_ALLOC as usize);
    }
}
