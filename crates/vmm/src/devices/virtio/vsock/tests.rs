//! Device-level vsock tests: a test "guest" speaks virtio-vsock through real
//! virtqueues in guest memory; the host side uses real Unix sockets.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use vm_memory::{Bytes, GuestAddress};

use super::conn::BUF_ALLOC;
use super::engine::{port_path, EVQ, MAX_CONNECTIONS, MAX_CONTROL_QUEUE, RXQ, TXQ};
use super::packet::*;
use super::*;
use crate::devices::virtio::testing::{page_dirty, temp_path, Buf, TestDriver, DATA_START};

const GUEST_CID: u64 = 7;
const RX_POOL: u64 = DATA_START;
const TX_POOL: u64 = DATA_START + 0x40_0000;
const EV_POOL: u64 = DATA_START + 0x80_0000;

/// A minimal guest vsock driver.
struct Guest {
    d: TestDriver,
    rx_bufs: HashMap<u16, u64>,
    rx_slot: u64,
    tx_slot: u64,
}

impl Guest {
    fn new(uds: &std::path::Path) -> Self {
        let dev = Vsock::new(GUEST_CID, uds).unwrap();
        Self::from_driver(TestDriver::new(Box::new(dev), 256))
    }

    fn from_driver(d: TestDriver) -> Self {
        let mut g = Self {
            d,
            rx_bufs: HashMap::new(),
            rx_slot: 0,
            tx_slot: 0,
        };
        for _ in 0..32 {
            g.post_rx();
        }
        g.d.kick(RXQ);
        g
    }

    fn post_rx(&mut self) {
        let addr = RX_POOL + (self.rx_slot % 64) * 0x2000;
        self.rx_slot += 1;
        let head = self.d.add_chain(
            RXQ,
            &[Buf::w(addr, HDR_LEN as u32), Buf::w(addr + 0x100, 4096)],
        );
        self.rx_bufs.insert(head, addr);
    }

    fn post_event_buffer(&mut self) {
        self.d.add_chain(EVQ, &[Buf::w(EV_POOL, 8)]);
        self.d.kick(EVQ);
    }

    /// Sends a packet and waits until the device consumed it.
    fn send(&mut self, mut hdr: Header, payload: &[u8]) {
        hdr.len = payload.len() as u32;
        let addr = TX_POOL + (self.tx_slot % 16) * 0x1_1000;
        self.tx_slot += 1;
        self.d
            .mem
            .write_slice(&hdr.to_bytes(), GuestAddress(addr))
            .unwrap();
        self.d
            .mem
            .write_slice(payload, GuestAddress(addr + 0x100))
            .unwrap();
        let mut bufs = vec![Buf::r(addr, HDR_LEN as u32)];
        if !payload.is_empty() {
            bufs.push(Buf::r(addr + 0x100, payload.len() as u32));
        }
        let head = self.d.add_chain(TXQ, &bufs);
        self.d.kick(TXQ);
        let (id, _) = self.d.wait_used(TXQ);
        assert_eq!(id, u32::from(head));
    }

    /// Receives the next packet from the device and reposts the buffer.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        let (id, len) = self.d.wait_used(RXQ);
        let addr = self
            .rx_bufs
            .remove(&(id as u16))
            .expect("unknown rx buffer");
        let mut raw = [0u8; HDR_LEN];
        self.d.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
        let hdr = Header::from_bytes(&raw);
        assert_eq!(len as usize, HDR_LEN + hdr.len as usize);
        let mut payload = vec![0u8; hdr.len as usize];
        self.d
            .mem
            .read_slice(&mut payload, GuestAddress(addr + 0x100))
            .unwrap();
        assert_eq!(
            (hdr.src_cid, hdr.dst_cid, hdr.type_),
            (HOST_CID, GUEST_CID, TYPE_STREAM)
        );
        self.post_rx();
        self.d.kick(RXQ);
        (hdr, payload)
    }

    fn hdr(&self, guest_port: u32, host_port: u32, op: u16, fwd_cnt: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: guest_port,
            dst_port: host_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt,
        }
    }
}

fn uds() -> PathBuf {
    temp_path("v.sock")
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Host connects with CONNECT; the guest accepts. Returns (stream, host port).
fn host_connect(g: &mut Guest, path: &std::path::Path, guest_port: u32) -> (UnixStream, u32) {
    let mut s = UnixStream::connect(path).unwrap();
    s.write_all(format!("CONNECT {guest_port}\n").as_bytes())
        .unwrap();
    let (req, _) = g.recv();
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!(req.dst_port, guest_port);
    assert!(req.src_port >= 1 << 30);
    assert_eq!(req.buf_alloc, BUF_ALLOC);
    let resp = g.hdr(guest_port, req.src_port, OP_RESPONSE, 0);
    g.send(resp, &[]);
    assert_eq!(read_line(&mut s), format!("OK {}", req.src_port));
    (s, req.src_port)
}

#[test]
fn config_space_holds_the_guest_cid() {
    let path = uds();
    let mut g = Guest::new(&path);
    assert_eq!(g.d.reg(0x008), TYPE_VSOCK);
    assert_eq!(
        u64::from(g.d.reg(0x100)) | (u64::from(g.d.reg(0x104)) << 32),
        GUEST_CID
    );
    assert!(Vsock::new(2, &temp_path("bad.sock")).is_err());
}

#[test]
fn host_to_guest_connect_handshake_and_data() {
    let path = uds();
    let mut g = Guest::new(&path);
    let (mut s, host_port) = host_connect(&mut g, &path, 52);

    s.write_all(b"hello guest").unwrap();
    let (h, data) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, host_port, 52));
    assert_eq!(data, b"hello guest");
    assert!(
        page_dirty(&g.d.mem, RX_POOL),
        "RX writes must be in the dirty bitmap"
    );

    g.send(g.hdr(52, host_port, OP_RW, 11), b"hello host");
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");

    // Host closes: the guest hears SHUTDOWN(SEND), answers with a full
    // shutdown and gets the final RST.
    drop(s);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    let mut sd = g.hdr(52, host_port, OP_SHUTDOWN, 11);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(sd, &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst_port), (OP_RST, 52));
}

#[test]
fn host_connect_to_a_closed_guest_port_closes_the_client() {
    let path = uds();
    let mut g = Guest::new(&path);
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"CONNECT 99\n").unwrap();
    let (req, _) = g.recv();
    g.send(g.hdr(99, req.src_port, OP_RST, 0), &[]);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "no OK line expected, got {rest:?}");

    // A garbage handshake is dropped without disturbing the device.
    let mut bad = UnixStream::connect(&path).unwrap();
    bad.write_all(b"HELLO\n").unwrap();
    let mut rest = Vec::new();
    bad.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    host_connect(&mut g, &path, 53);
}

#[test]
fn guest_to_host_connects_to_uds_port_path() {
    let path = uds();
    let listener = UnixListener::bind(port_path(&path, 1024)).unwrap();
    let mut g = Guest::new(&path);
    g.send(g.hdr(5000, 1024, OP_REQUEST, 0), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RESPONSE, 1024, 5000));
    let (mut s, _) = listener.accept().unwrap();
    g.send(g.hdr(5000, 1024, OP_RW, 0), b"ping");
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    s.write_all(b"pong").unwrap();
    let (h, data) = g.recv();
    assert_eq!((h.op, data.as_slice()), (OP_RW, &b"pong"[..]));

    // Nobody listens on port 1025: reset.
    g.send(g.hdr(5001, 1025, OP_REQUEST, 0), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst_port), (OP_RST, 5001));
    // Packets claiming another source CID are ignored, data on an unknown
    // connection is reset.
    let mut spoof = g.hdr(5002, 1024, OP_REQUEST, 0);
    spoof.src_cid = 99;
    g.send(spoof, &[]);
    g.send(g.hdr(5003, 1024, OP_RW, 0), b"x");
    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst_port), (OP_RST, 5003));
    std::fs::remove_file(port_path(&path, 1024)).unwrap();
}

#[test]
fn one_mib_each_way_with_credit_flow_control() {
    const TOTAL: usize = 1 << 20;
    let pattern = |i: usize| (i * 31 % 253) as u8;
    let path = uds();
    let mut g = Guest::new(&path);
    let (s, host_port) = host_connect(&mut g, &path, 52);
    let guest_buf_alloc = 64 * 1024u32;

    // Host → guest: the device must never have more than the guest's
    // buf_alloc in flight; the guest announces consumption with CREDIT_UPDATE.
    let mut writer = s.try_clone().unwrap();
    let host = std::thread::spawn(move || {
        let data: Vec<u8> = (0..TOTAL).map(pattern).collect();
        writer.write_all(&data).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut got = Vec::with_capacity(TOTAL);
    let mut announced = 0usize;
    let mut credit_requests = 0;
    loop {
        let (h, data) = g.recv();
        match h.op {
            OP_RW => {
                got.extend_from_slice(&data);
                assert!(
                    got.len() - announced <= guest_buf_alloc as usize,
                    "device overran guest credit: {} in flight",
                    got.len() - announced
                );
            }
            OP_CREDIT_REQUEST => credit_requests += 1,
            OP_SHUTDOWN => break,
            op => panic!("unexpected op {op}"),
        }
        if got.len() - announced >= 16 * 1024 || h.op == OP_CREDIT_REQUEST {
            announced = got.len();
            let mut upd = g.hdr(52, host_port, OP_CREDIT_UPDATE, announced as u32);
            upd.buf_alloc = guest_buf_alloc;
            g.send(upd, &[]);
        }
    }
    host.join().unwrap();
    assert_eq!(got.len(), TOTAL);
    assert!(got.iter().enumerate().all(|(i, &b)| b == pattern(i)));
    let _ = credit_requests;

    // Guest → host: the guest sends only while the device grants credit.
    let mut reader = s;
    let host = std::thread::spawn(move || {
        let mut v = vec![0u8; TOTAL];
        reader.read_exact(&mut v).unwrap();
        v
    });
    let mut sent = 0usize;
    let mut dev_fwd = 0u32;
    let mut dev_alloc = BUF_ALLOC;
    while sent < TOTAL {
        let credit = dev_alloc as usize - (sent - dev_fwd as usize);
        if credit == 0 {
            let (h, _) = g.recv();
            if h.op == OP_CREDIT_UPDATE || h.op == OP_RW {
                dev_fwd = h.fwd_cnt;
                dev_alloc = h.buf_alloc;
            }
            continue;
        }
        let n = credit.min(4096).min(TOTAL - sent);
        let chunk: Vec<u8> = (sent..sent + n).map(pattern).collect();
        g.send(g.hdr(52, host_port, OP_RW, announced as u32), &chunk);
        sent += n;
    }
    let echoed = host.join().unwrap();
    assert!(echoed.iter().enumerate().all(|(i, &b)| b == pattern(i)));
}

#[test]
fn restore_resets_connections_but_keeps_listening() {
    let path = uds();
    let mut g = Guest::new(&path);
    g.post_event_buffer();
    let (mut s, host_port) = host_connect(&mut g, &path, 52);
    s.write_all(b"before").unwrap();
    assert_eq!(g.recv().1, b"before");

    let state = g.d.transport.save();
    let crate::devices::virtio::DeviceState::Vsock(vs) = &state.device else {
        panic!("not a vsock state");
    };
    assert_eq!(vs.connections.len(), 1);
    assert_eq!(vs.connections[0].host_port, host_port);

    // The old process goes away; its host client sees the connection end.
    let mem = g.d.mem.clone();
    let queues = g.d.take_queues();
    let rx_bufs = std::mem::take(&mut g.rx_bufs);
    drop(g);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();

    let dev = Vsock::new(GUEST_CID, &path).unwrap();
    let d = TestDriver::restored(Box::new(dev), mem, &state, queues);
    let mut g = Guest {
        d,
        rx_bufs,
        rx_slot: 32,
        tx_slot: 100,
    };
    // TRANSPORT_RESET arrives on the event queue.
    let (_, len) = g.d.wait_used(EVQ);
    assert_eq!(len, 4);
    assert_eq!(
        g.d.mem.read_obj::<u32>(GuestAddress(EV_POOL)).unwrap(),
        EVENT_TRANSPORT_RESET
    );
    // The listener survived: a new host connection works.
    let (mut s2, p2) = host_connect(&mut g, &path, 52);
    g.send(g.hdr(52, p2, OP_RW, 0), b"after");
    let mut buf = [0u8; 5];
    s2.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"after");

    // A restore with another CID is refused.
    let other = Vsock::new(GUEST_CID + 1, &temp_path("other.sock")).unwrap();
    let err = crate::devices::virtio::MmioTransport::restore(
        Box::new(other),
        g.d.mem.clone(),
        crate::devices::virtio::IrqTrigger::new().unwrap(),
        &state,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("CID"), "{err}");
}

#[test]
fn malformed_tx_packets_are_dropped() {
    let path = uds();
    let mut g = Guest::new(&path);
    // Header shorter than 44 bytes.
    g.d.mem
        .write_slice(&[0u8; 10], GuestAddress(TX_POOL))
        .unwrap();
    g.d.add_chain(TXQ, &[Buf::r(TX_POOL, 10)]);
    g.d.kick(TXQ);
    assert_eq!(g.d.wait_used(TXQ).1, 0);
    // Length field larger than the buffer.
    let mut h = g.hdr(1, 1024, OP_RW, 0);
    h.len = 1 << 20;
    g.d.mem
        .write_slice(&h.to_bytes(), GuestAddress(TX_POOL))
        .unwrap();
    g.d.add_chain(TXQ, &[Buf::r(TX_POOL, HDR_LEN as u32)]);
    g.d.kick(TXQ);
    g.d.wait_used(TXQ);
    // Still alive.
    host_connect(&mut g, &path, 60);
}

/// Raises the open-file limit to what a test with `n` descriptors needs.
fn allow_open_files(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit/setrlimit to read and write.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < n {
            lim.rlim_cur = n.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[test]
fn guest_connections_beyond_the_cap_are_reset() {
    allow_open_files(3 * MAX_CONNECTIONS as u64 + 256);
    let path = uds();
    let listener = UnixListener::bind(port_path(&path, 1024)).unwrap();
    // The host accepts every connection and keeps it open, until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let acceptor = std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept() {
            if stop2.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            held.push(s);
        }
        held
    });
    let mut g = Guest::new(&path);
    for i in 0..MAX_CONNECTIONS as u32 {
        g.send(g.hdr(10_000 + i, 1024, OP_REQUEST, 0), &[]);
        let (h, _) = g.recv();
        assert_eq!(
            (h.op, h.dst_port),
            (OP_RESPONSE, 10_000 + i),
            "connection {i}"
        );
    }
    // More: over the cap, whatever the host would say.
    for extra in 0..3 {
        g.send(g.hdr(20_000 + extra, 1024, OP_REQUEST, 0), &[]);
        let (h, _) = g.recv();
        assert_eq!((h.op, h.dst_port), (OP_RST, 20_000 + extra));
    }
    // Host clients are held to the same cap: this one is closed, not forwarded.
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(b"CONNECT 52\n").unwrap();
    let mut rest = Vec::new();
    let end = s.read_to_end(&mut rest);
    assert!(end.is_ok() && rest.is_empty(), "{end:?}, got {rest:?}");
    // Closing one makes room for another.
    g.send(g.hdr(10_000, 1024, OP_RST, 0), &[]);
    g.send(g.hdr(20_000, 1024, OP_REQUEST, 0), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst_port), (OP_RESPONSE, 20_000));
    drop(g);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = UnixStream::connect(port_path(&path, 1024));
    let held = acceptor.join().unwrap();
    assert_eq!(held.len(), MAX_CONNECTIONS + 1);
    let _ = std::fs::remove_file(port_path(&path, 1024));
}

/// Polls queue `q` for used entries for up to `ms` after the last one seen;
/// returns how many arrived.
fn drain_used(g: &mut Guest, q: usize, ms: u64) -> usize {
    let mut n = 0;
    let mut last = std::time::Instant::now();
    while last.elapsed() < std::time::Duration::from_millis(ms) {
        if g.d.try_used(q).is_some() {
            n += 1;
            last = std::time::Instant::now();
        } else {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    n
}

#[test]
fn a_guest_flooding_requests_is_held_back_by_the_control_queue_bound() {
    let path = uds();
    // A guest that posts no RX buffers: every reply the device owes it waits.
    let mut g = Guest {
        d: TestDriver::new(Box::new(Vsock::new(GUEST_CID, &path).unwrap()), 256),
        rx_bufs: HashMap::new(),
        rx_slot: 0,
        tx_slot: 0,
    };
    let total = 3 * MAX_CONTROL_QUEUE;
    // Requests to a port nobody listens on: each one owes the guest an RST.
    let post = |g: &mut Guest, i: usize| {
        let hdr = g.hdr(30_000 + i as u32, 7777, OP_REQUEST, 0);
        let addr = TX_POOL + (i % 256) as u64 * 0x100;
        g.d.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(addr))
            .unwrap();
        g.d.add_chain(TXQ, &[Buf::r(addr, HDR_LEN as u32)]);
    };
    let (mut posted, mut consumed) = (0, 0);
    loop {
        while posted < total && posted - consumed < 128 {
            post(&mut g, posted);
            posted += 1;
        }
        g.d.kick(TXQ);
        let n = drain_used(&mut g, TXQ, 1000);
        consumed += n;
        if n == 0 || consumed == total {
            break;
        }
    }
    assert!(
        consumed <= MAX_CONTROL_QUEUE,
        "the device took {consumed} requests it cannot answer (bound {MAX_CONTROL_QUEUE})"
    );
    assert!(
        consumed + 2 >= MAX_CONTROL_QUEUE,
        "stalled early at {consumed}"
    );

    // Once the guest takes its replies, the device takes requests again and
    // answers every one: back-pressure loses nothing.
    for _ in 0..32 {
        g.post_rx();
    }
    g.d.kick(RXQ);
    let mut resets = 0;
    while resets < total {
        let (h, _) = g.recv();
        assert_eq!(h.op, OP_RST);
        resets += 1;
        consumed += std::iter::from_fn(|| g.d.try_used(TXQ)).count();
        while posted < total && posted - consumed < 128 {
            post(&mut g, posted);
            posted += 1;
            g.d.kick(TXQ);
        }
    }
    consumed += drain_used(&mut g, TXQ, 100);
    assert_eq!(consumed, total);
}

#[test]
fn a_guest_ignoring_credit_gets_its_connection_reset() {
    let path = uds();
    let listener = UnixListener::bind(port_path(&path, 1024)).unwrap();
    let mut g = Guest::new(&path);
    g.send(g.hdr(5000, 1024, OP_REQUEST, 0), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.buf_alloc), (OP_RESPONSE, BUF_ALLOC));
    // The host never reads: past the socket buffer, the device can only hold
    // what it granted the guest.
    let (host, _) = listener.accept().unwrap();
    let chunk = vec![0x5au8; 60 * 1024];
    let mut sent = 0usize;
    'flood: loop {
        g.send(g.hdr(5000, 1024, OP_RW, 0), &chunk);
        sent += chunk.len();
        // Credit updates may come; the guest ignores them and looks for a reset.
        while let Some((id, _)) = g.d.try_used(RXQ) {
            let addr = g.rx_bufs.remove(&(id as u16)).unwrap();
            let mut raw = [0u8; HDR_LEN];
            g.d.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            g.post_rx();
            g.d.kick(RXQ);
            let h = Header::from_bytes(&raw);
            if h.op == OP_RST {
                assert_eq!(h.dst_port, 5000);
                break 'flood;
            }
            assert_eq!(h.op, OP_CREDIT_UPDATE);
        }
        assert!(
            sent < 16 << 20,
            "no reset after {sent} bytes, the host read none"
        );
    }
    assert!(
        sent > BUF_ALLOC as usize,
        "reset within credit after {sent} bytes"
    );
    // The connection is gone: more data is answered with RST, and the host
    // sees the end of the stream.
    g.send(g.hdr(5000, 1024, OP_RW, 0), b"more");
    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst_port), (OP_RST, 5000));
    let mut host = host;
    host.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert!(got.len() <= sent);
    let _ = std::fs::remove_file(port_path(&path, 1024));
}
