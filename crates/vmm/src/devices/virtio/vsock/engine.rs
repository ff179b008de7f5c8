//! The vsock I/O thread: moves packets between the guest's virtqueues and host
//! Unix sockets (Firecracker's hybrid vsock).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::conn::{Conn, ConnKey, ConnState, TxOutcome, BUF_ALLOC};
use super::packet::*;
use crate::devices::virtio::engine::Engine;
use crate::devices::virtio::{IrqTrigger, VIRTIO_MMIO_INT_VRING};
use crate::memory::GuestMemory;

/// Queue indices.
pub(super) const RXQ: usize = 0;
pub(super) const TXQ: usize = 1;
pub(super) const EVQ: usize = 2;

const TOKEN_STOP: u64 = 0;
const TOKEN_QUEUE_BASE: u64 = 1; // 1..=3: rx, tx, event queues
const TOKEN_LISTENER: u64 = 8;
const TOKEN_DYNAMIC: u64 = 16;
/// Largest payload we accept from or send to the guest in one packet.
const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 64;
/// First host-side port handed out to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Most connections the device tracks at once, guest- and host-initiated
/// together (Firecracker's limit too): a guest request beyond it is answered
/// with RST, a host client beyond it is closed. Also bounds host clients still
/// in their `CONNECT` handshake.
pub(super) const MAX_CONNECTIONS: usize = 1024;
/// Bound on control packets (RST, RESPONSE, credit, ...) waiting for guest RX
/// buffers. Guest TX packets are only taken while one more cannot overflow it:
/// a guest that sends without taking its replies is held back (its packets
/// stay in the TX queue) instead of growing host memory.
pub(super) const MAX_CONTROL_QUEUE: usize = 256;
/// Most control packets handling one guest TX packet can queue.
const CONTROL_PER_TX_PACKET: usize = 2;

/// A host client that connected to the UDS and has not finished its CONNECT line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

enum Target {
    Conn(ConnKey),
    Handshake,
}

/// A packet waiting for a guest RX buffer that carries no data.
#[derive(Clone, Copy)]
struct Control {
    key: ConnKey,
    op: u16,
    flags: u32,
}

/// The host side of the device: guest CID and the Unix socket clients connect to.
pub(super) struct Endpoint {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
    pub listener: UnixListener,
}

/// Everything the vsock I/O thread owns.
pub(super) struct VsockEngine {
    pub mem: GuestMemory,
    pub queues: Vec<Queue>,
    pub queue_evts: Vec<EventFd>,
    pub irq: IrqTrigger,
    pub guest_cid: u64,
    pub uds_path: PathBuf,
    pub listener: UnixListener,
    /// Send TRANSPORT_RESET on the event queue as soon as it has a buffer.
    pub reset_pending: bool,
    epoll: Epoll,
    conns: BTreeMap<ConnKey, Conn>,
    handshakes: HashMap<u64, Handshake>,
    tokens: HashMap<u64, Target>,
    control: VecDeque<Control>,
    next_token: u64,
    next_local_port: u32,
    scratch: Vec<u8>,
    interrupt: bool,
}

impl VsockEngine {
    /// Sets up the engine and its epoll set (queue events, listener).
    pub fn new(
        mem: GuestMemory,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        irq: IrqTrigger,
        endpoint: Endpoint,
        reset_pending: bool,
    ) -> io::Result<Self> {
        let Endpoint {
            guest_cid,
            uds_path,
            listener,
        } = endpoint;
        let epoll = Epoll::new()?;
        for (i, evt) in queue_evts.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_QUEUE_BASE + i as u64),
            )?;
        }
        listener.set_nonblocking(true)?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )?;
        Ok(Self {
            mem,
            queues,
            queue_evts,
            irq,
            guest_cid,
            uds_path,
            listener,
            reset_pending,
            epoll,
            conns: BTreeMap::new(),
            handshakes: HashMap::new(),
            tokens: HashMap::new(),
            control: VecDeque::new(),
            next_token: TOKEN_DYNAMIC,
            next_local_port: FIRST_LOCAL_PORT,
            scratch: vec![0u8; MAX_PKT_PAYLOAD],
            interrupt: false,
        })
    }

    /// Live connections as `(host port, guest port, established)`.
    pub fn connections(&self) -> Vec<(u32, u32, bool)> {
        self.conns
            .iter()
            .map(|(k, c)| (k.local_port, k.peer_port, c.state == ConnState::Established))
            .collect()
    }

    fn process_all(&mut self) {
        self.send_transport_reset();
        loop {
            let held_back = self.process_tx();
            self.process_rx();
            // Replies went out and made room: take the TX packets held back.
            if !held_back || self.control_full() {
                break;
            }
        }
        if self.interrupt {
            self.interrupt = false;
            if let Err(e) = self.irq.trigger(VIRTIO_MMIO_INT_VRING) {
                tracing::error!("vsock: cannot interrupt guest: {e}");
            }
        }
    }

    fn send_transport_reset(&mut self) {
        if !self.reset_pending {
            return;
        }
        let Some(chain) = self.queues[EVQ].pop_descriptor_chain(&self.mem) else {
            return;
        };
        let head = chain.head_index();
        let len = match chain.writer(&self.mem) {
            Ok(mut w) => match w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()) {
                Ok(()) => 4,
                Err(_) => 0,
            },
            Err(_) => 0,
        };
        self.add_used(EVQ, head, len);
        if len == 4 {
            self.reset_pending = false;
        }
    }

    fn add_used(&mut self, q: usize, head: u16, len: u32) {
        if let Err(e) = self.queues[q].add_used(&self.mem, head, len) {
            tracing::error!("vsock: cannot return buffer on queue {q}: {e}");
        }
        self.interrupt = true;
    }

    /// Whether the control queue has no room for what one more guest TX packet
    /// may queue.
    fn control_full(&self) -> bool {
        self.control.len() + CONTROL_PER_TX_PACKET > MAX_CONTROL_QUEUE
    }

    /// Guest → host packets, until the TX queue is empty (false) or the control
    /// queue is too full to take more (true: back-pressure).
    fn process_tx(&mut self) -> bool {
        loop {
            if self.control_full() {
                return true;
            }
            let Some(chain) = self.queues[TXQ].pop_descriptor_chain(&self.mem) else {
                return false;
            };
            let head = chain.head_index();
            let packet = read_packet(&self.mem, chain);
            self.add_used(TXQ, head, 0);
            match packet {
                Ok((hdr, payload)) => self.handle_guest_packet(hdr, payload),
                Err(e) => tracing::warn!("vsock: dropping malformed TX packet: {e}"),
            }
        }
    }

    fn handle_guest_packet(&mut self, hdr: Header, payload: Vec<u8>) {
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            tracing::debug!(?hdr, "vsock: packet with wrong CIDs dropped");
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            self.push_control(key, OP_RST, 0);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                OP_REQUEST => self.connect_to_host(key, &hdr),
                OP_RST => {}
                _ => self.push_control(key, OP_RST, 0),
            }
            return;
        };
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = std::num::Wrapping(hdr.fwd_cnt);
        let outcome = match hdr.op {
            OP_RESPONSE if conn.state == ConnState::LocalInit => {
                let reply = format!("OK {}\n", key.local_port);
                conn.queue_handshake_reply(reply.as_bytes())
            }
            OP_RW if conn.state == ConnState::Established => conn.send_to_stream(&payload),
            OP_SHUTDOWN => {
                conn.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                conn.flush()
            }
            OP_CREDIT_UPDATE => {
                conn.credit_requested = false;
                TxOutcome::Ok
            }
            OP_CREDIT_REQUEST => {
                self.push_control(key, OP_CREDIT_UPDATE, 0);
                TxOutcome::Ok
            }
            OP_RST => {
                self.remove_conn(key);
                return;
            }
            _ => TxOutcome::Reset,
        };
        self.after_conn_change(key, outcome);
    }

    /// Applies the consequences of a change on `key`: reset, teardown or credit update.
    fn after_conn_change(&mut self, key: ConnKey, outcome: TxOutcome) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        if outcome == TxOutcome::Reset || conn.finished() {
            self.reset_conn(key);
        } else if conn.needs_credit_update() {
            self.push_control(key, OP_CREDIT_UPDATE, 0);
        }
    }

    fn push_control(&mut self, key: ConnKey, op: u16, flags: u32) {
        if op == OP_CREDIT_UPDATE {
            if let Some(conn) = self.conns.get_mut(&key) {
                // The update goes out with at least this count: do not queue
                // another one for the same bytes while it waits.
                conn.last_fwd_cnt_sent = conn.fwd_cnt;
            }
        }
        self.control.push_back(Control { key, op, flags });
    }

    /// Guest-initiated connection to host port P: connect to `<uds_path>_<P>`.
    fn connect_to_host(&mut self, key: ConnKey, hdr: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::debug!(
                "vsock: guest connection to port {} refused: {MAX_CONNECTIONS} connections open",
                key.local_port
            );
            self.push_control(key, OP_RST, 0);
            return;
        }
        let path = port_path(&self.uds_path, key.local_port);
        let stream = match UnixStream::connect(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("vsock: guest connect to {} refused: {e}", path.display());
                self.push_control(key, OP_RST, 0);
                return;
            }
        };
        match self.add_conn(key, stream, ConnState::Established) {
            Ok(conn) => {
                conn.peer_buf_alloc = hdr.buf_alloc;
                conn.peer_fwd_cnt = std::num::Wrapping(hdr.fwd_cnt);
                self.push_control(key, OP_RESPONSE, 0);
            }
            Err(e) => {
                tracing::warn!("vsock: cannot track connection: {e}");
                self.push_control(key, OP_RST, 0);
            }
        }
    }

    fn add_conn(
        &mut self,
        key: ConnKey,
        stream: UnixStream,
        state: ConnState,
    ) -> io::Result<&mut Conn> {
        stream.set_nonblocking(true)?;
        let token = self.alloc_token();
        self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(
                EventSet::IN
                    | EventSet::OUT
                    | EventSet::READ_HANG_UP
                    | EventSet::HANG_UP
                    | EventSet::EDGE_TRIGGERED,
                token,
            ),
        )?;
        self.tokens.insert(token, Target::Conn(key));
        Ok(self
            .conns
            .entry(key)
            .or_insert_with(|| Conn::new(stream, token, state)))
    }

    /// Sends RST to the guest and drops the connection.
    fn reset_conn(&mut self, key: ConnKey) {
        self.push_control(key, OP_RST, 0);
        self.remove_conn(key);
    }

    fn remove_conn(&mut self, key: ConnKey) {
        if let Some(mut conn) = self.conns.remove(&key) {
            let _ = conn.flush();
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            self.tokens.remove(&conn.token);
        }
    }

    fn alloc_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    /// Host → guest: control packets first, then stream data, while the guest
    /// has RX buffers.
    fn process_rx(&mut self) {
        loop {
            while let Some(ctl) = self.control.front().copied() {
                let hdr = self.header_for(ctl.key, ctl.op, ctl.flags, 0);
                if self.deliver_data(&hdr, &[]).is_none() {
                    return;
                }
                self.control.pop_front();
            }
            let Some(key) = self.next_ready_conn() else {
                if self.control.is_empty() {
                    return;
                }
                // Credit requests or resets were queued: send them.
                continue;
            };
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            if conn.to_guest.is_empty() {
                // End of file with everything delivered: tell the guest once.
                conn.eof_announced = true;
                self.push_control(key, OP_SHUTDOWN, SHUTDOWN_SEND);
                self.after_conn_change(key, TxOutcome::Ok);
                continue;
            }
            let n = conn.to_guest.len().min(conn.peer_credit() as usize);
            let data: Vec<u8> = conn.to_guest[..n].to_vec();
            let hdr = self.header_for(key, OP_RW, 0, n as u32);
            let Some(sent) = self.deliver_data(&hdr, &data) else {
                return;
            };
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.to_guest.drain(..sent);
                conn.tx_cnt += sent as u32;
            }
        }
    }

    /// Finds a connection with data (or an unannounced end of file) to deliver
    /// and credit to do so, reading from its stream as needed. Queues a credit
    /// request for a connection that has data but no credit.
    fn next_ready_conn(&mut self) -> Option<ConnKey> {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        let mut failed = Vec::new();
        let mut found = None;
        for key in keys {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            if conn.state != ConnState::Established || conn.peer_shutdown & SHUTDOWN_RCV != 0 {
                continue;
            }
            if let Err(e) = conn.fill_from_stream(&mut self.scratch) {
                tracing::debug!("vsock: host stream error: {e}");
                failed.push(key);
                continue;
            }
            if !conn.to_guest.is_empty() {
                if conn.peer_credit() > 0 {
                    found = Some(key);
                    break;
                }
                if !conn.credit_requested {
                    conn.credit_requested = true;
                    self.control.push_back(Control {
                        key,
                        op: OP_CREDIT_REQUEST,
                        flags: 0,
                    });
                }
            } else if conn.local_eof && !conn.eof_announced {
                found = Some(key);
                break;
            }
        }
        for key in failed {
            self.reset_conn(key);
        }
        found
    }

    fn header_for(&mut self, key: ConnKey, op: u16, flags: u32, len: u32) -> Header {
        let fwd_cnt = match self.conns.get_mut(&key) {
            Some(c) => {
                c.last_fwd_cnt_sent = c.fwd_cnt;
                c.fwd_cnt.0
            }
            None => 0,
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }

    /// Puts `hdr` + as much of `payload` as fits in the next RX buffer; returns
    /// how many payload bytes went, or None if the guest has no RX buffer.
    fn deliver_data(&mut self, hdr: &Header, payload: &[u8]) -> Option<usize> {
        loop {
            let chain = self.queues[RXQ].pop_descriptor_chain(&self.mem)?;
            let head = chain.head_index();
            let mut w = match chain.writer(&self.mem) {
                Ok(w) if w.available_bytes() >= HDR_LEN => w,
                _ => {
                    tracing::warn!("vsock: unusable RX buffer skipped");
                    self.add_used(RXQ, head, 0);
                    continue;
                }
            };
            let n = payload.len().min(w.available_bytes() - HDR_LEN);
            let mut h = *hdr;
            h.len = n as u32;
            let ok = w.write_all(&h.to_bytes()).is_ok() && w.write_all(&payload[..n]).is_ok();
            if !ok {
                self.add_used(RXQ, head, 0);
                continue;
            }
            self.add_used(RXQ, head, (HDR_LEN + n) as u32);
            return Some(n);
        }
    }

    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.handshakes.len() >= MAX_CONNECTIONS {
                        tracing::warn!(
                            "vsock: host client dropped: {MAX_CONNECTIONS} handshakes pending"
                        );
                        continue;
                    }
                    if let Err(e) = self.add_handshake(stream) {
                        tracing::warn!("vsock: cannot accept host client: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("vsock: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn add_handshake(&mut self, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(true)?;
        let token = self.alloc_token();
        self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        )?;
        self.tokens.insert(token, Target::Handshake);
        self.handshakes.insert(
            token,
            Handshake {
                stream,
                line: Vec::new(),
            },
        );
        Ok(())
    }

    /// Reads the `CONNECT <port>\n` line; on success starts a host-initiated
    /// connection (REQUEST to the guest).
    fn read_handshake(&mut self, token: u64) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let verdict = loop {
            match hs.stream.read(&mut buf) {
                Ok(0) => break Err("client closed before CONNECT"),
                Ok(n) => {
                    hs.line.extend_from_slice(&buf[..n]);
                    if hs.line.contains(&b'\n') {
                        break Ok(());
                    }
                    if hs.line.len() > MAX_CONNECT_LINE {
                        break Err("CONNECT line too long");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Err("client read error"),
            }
        };
        let Some(hs) = self.handshakes.remove(&token) else {
            return;
        };
        self.tokens.remove(&token);
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            hs.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        if let Err(why) = verdict {
            tracing::debug!("vsock: host client dropped: {why}");
            return;
        }
        let Some(nl) = hs.line.iter().position(|&b| b == b'\n') else {
            return;
        };
        let Some(port) = parse_connect(&hs.line[..nl]) else {
            tracing::debug!("vsock: bad CONNECT line from host client");
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!("vsock: host client dropped: {MAX_CONNECTIONS} connections open");
            return;
        }
        let early_data = hs.line[nl + 1..].to_vec();
        let key = ConnKey {
            local_port: self.alloc_local_port(),
            peer_port: port,
        };
        match self.add_conn(key, hs.stream, ConnState::LocalInit) {
            Ok(conn) => {
                conn.to_guest = early_data;
                self.push_control(key, OP_REQUEST, 0);
            }
            Err(e) => tracing::warn!("vsock: cannot track connection: {e}"),
        }
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.local_port == p) {
                return p;
            }
        }
    }

    fn on_stream_event(&mut self, key: ConnKey, events: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            conn.readable = true;
        }
        let mut outcome = TxOutcome::Ok;
        if events.contains(EventSet::OUT) && !conn.tx_buf.is_empty() {
            outcome = conn.flush();
        }
        self.after_conn_change(key, outcome);
    }
}

impl Engine for VsockEngine {
    fn run(&mut self, stop: &EventFd) {
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_STOP),
        ) {
            tracing::error!("vsock: epoll setup failed: {e}");
            return;
        }
        self.accept_clients();
        self.process_all();
        let mut events = vec![EpollEvent::default(); 64];
        'outer: loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("vsock: epoll wait failed: {e}");
                    break;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => break 'outer,
                    t if (TOKEN_QUEUE_BASE..TOKEN_QUEUE_BASE + 3).contains(&t) => {
                        let _ = self.queue_evts[(t - TOKEN_QUEUE_BASE) as usize].read();
                    }
                    TOKEN_LISTENER => self.accept_clients(),
                    t => match self.tokens.get(&t) {
                        Some(Target::Conn(key)) => {
                            let key = *key;
                            self.on_stream_event(key, ev.event_set());
                        }
                        Some(Target::Handshake) => self.read_handshake(t),
                        None => {}
                    },
                }
            }
            self.process_all();
        }
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            stop.as_raw_fd(),
            EpollEvent::default(),
        );
    }

    fn queues(&self) -> &[Queue] {
        &self.queues
    }
}

/// `<uds_path>_<port>`.
pub(super) fn port_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = uds.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Parses `CONNECT <port>` (trailing `\r` tolerated).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let (cmd, port) = line.split_once(' ')?;
    if !cmd.eq_ignore_ascii_case("CONNECT") {
        return None;
    }
    port.trim().parse().ok()
}

/// Reads a TX packet: header and payload.
fn read_packet(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
) -> Result<(Header, Vec<u8>), String> {
    let mut r = chain.reader(mem).map_err(|e| e.to_string())?;
    let mut raw = [0u8; HDR_LEN];
    r.read_exact(&mut raw)
        .map_err(|_| "short header".to_string())?;
    let hdr = Header::from_bytes(&raw);
    let len = hdr.len as usize;
    if hdr.op != OP_RW {
        return Ok((hdr, Vec::new()));
    }
    if len > MAX_PKT_PAYLOAD || len > r.available_bytes() {
        return Err(format!("bad payload length {len}"));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|e| e.to_string())?;
    Ok((hdr, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_parse() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"connect 1024\r"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT x"), None);
        assert_eq!(parse_connect(b"HELLO 52"), None);
        assert_eq!(
            port_path(Path::new("/tmp/v.sock"), 52),
            PathBuf::from("/tmp/v.sock_52")
        );
    }
}
