//! Migration bench: prints figures, asserts nothing.
//!
//! * throughput of migrating a device (half zero blocks, half random) over
//!   loopback TCP, next to a plain TCP copy of the same non-zero bytes
//!   measured in the same run;
//! * bytes on the wire for the zero half;
//! * p50/p99 latency of need-block requests issued while the bulk stream runs;
//! * the same migration over TLS 1.3 (mutual certificates made at run time),
//!   its throughput and its ratio to the plain migration.
//!
//! Size: `--size 256M` (or env `DRAFTER_BENCH_SIZE`), default 1G.
//! Run: `cargo bench -p drafter-storage --bench migration -- --size 256M`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drafter_storage::{
    BlockDevice, DestinationDevice, DeviceConfig, Initial, MemoryDevice, MigrationConfig,
    MigrationDestination, MigrationReport, MigrationSource, Mode, SourceDevice, TlsConfig,
};

#[path = "../tests/support/certs.rs"]
mod certs;

/// TLS settings of the source (listener) and destination (dialler).
struct Tls {
    source: TlsConfig,
    destination: TlsConfig,
}

const BS: u32 = 64 * 1024;
/// Zero and random blocks alternate in runs of this many blocks.
const RUN: u64 = 16;

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'G' | 'g' => (&s[..s.len() - 1], 1u64 << 30),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'K' | 'k' => (&s[..s.len() - 1], 1 << 10),
        _ => (s, 1),
    };
    num.parse::<u64>().ok().map(|n| n * mult)
}

fn size_from_args() -> u64 {
    let args: Vec<String> = std::env::args().collect();
    let from_flag = args
        .iter()
        .position(|a| a == "--size")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| parse_size(s));
    let from_env = std::env::var("DRAFTER_BENCH_SIZE")
        .ok()
        .and_then(|s| parse_size(&s));
    let size = from_flag.or(from_env).unwrap_or(1 << 30);
    size.div_ceil(u64::from(BS) * RUN * 2) * u64::from(BS) * RUN * 2
}

struct Rng(u64);
impl Rng {
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            c.copy_from_slice(&self.0.to_le_bytes()[..c.len()]);
        }
    }
}

fn is_data_block(b: u64) -> bool {
    (b / RUN) % 2 == 1
}

/// The device, plus its non-zero bytes as one buffer for the plain copy.
fn make_device(size: u64) -> (Arc<MemoryDevice>, Vec<u8>) {
    let dev = Arc::new(MemoryDevice::new(size, BS).expect("device"));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut nonzero = Vec::with_capacity((size / 2) as usize);
    let mut buf = vec![0u8; BS as usize];
    for b in 0..dev.block_count() {
        if is_data_block(b) {
            rng.fill(&mut buf);
            nonzero.extend_from_slice(&buf);
        } else {
            buf.fill(0);
        }
        // Zero blocks are written too, so all memory is faulted in, as a
        // device file in the page cache would be.
        dev.write_at(&buf, b * u64::from(BS)).expect("write");
    }
    (dev, nonzero)
}

fn plain_tcp_copy(data: &[u8]) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let len = data.len();
    // A pre-faulted sink, like the destination device's memory reused
    // across rounds.
    let mut sink = vec![1u8; len];
    let recv = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.read_exact(&mut sink).expect("read");
        sink.len()
    });
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(data).expect("write");
    let got = recv.join().expect("receiver");
    assert_eq!(got, len);
    start.elapsed()
}

/// A zero-filled destination whose memory is already faulted in, like the
/// plain copy's sink (so both sides of the comparison pay the same).
fn prefaulted_dest(size: u64) -> Arc<MemoryDevice> {
    let dev = MemoryDevice::new(size, BS).expect("device");
    let zeros = vec![0u8; BS as usize];
    for b in 0..dev.block_count() {
        dev.write_at(&zeros, b * u64::from(BS)).expect("write");
    }
    Arc::new(dev)
}

/// One post-copy migration over loopback TCP; with `probe`, a thread on the
/// destination reads absent data blocks during the stream and records how
/// long each priority fetch took.
fn migrate(
    dev: &Arc<MemoryDevice>,
    probe: bool,
    tls: Option<&Tls>,
) -> (Duration, MigrationReport, Vec<Duration>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let src = MigrationSource::new(
        vec![SourceDevice::fixed(
            "disk",
            dev.clone(),
            DeviceConfig::default(),
        )],
        MigrationConfig {
            mode: Mode::PostCopy,
            socket_buffer_bytes: socket_buffer(),
            ..MigrationConfig::default()
        },
    );
    let blocks = dev.block_count();
    let backing = prefaulted_dest(dev.size());
    let dest_tls = tls.map(|t| t.destination.clone());
    let dest = std::thread::spawn(move || {
        let (sock, _) = listener.accept().expect("accept");
        sock.set_nodelay(true).expect("nodelay");
        let sock = TlsConfig::maybe_accept(dest_tls.as_ref(), sock).expect("TLS");
        let cfg = MigrationConfig {
            socket_buffer_bytes: socket_buffer(),
            ..MigrationConfig::default()
        };
        let mut backing = Some(backing);
        let session = MigrationDestination::accept(sock, &cfg, |_| {
            let backing = backing.take().ok_or("one device only")?;
            Ok(DestinationDevice {
                backing,
                initial: Initial::Zeroed,
            })
        })
        .expect("accept");
        let lazy = session.device("disk").expect("device");
        let done = Arc::new(AtomicBool::new(false));
        let prober = probe.then(|| {
            let (lazy, done) = (lazy.clone(), done.clone());
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut buf = vec![0u8; BS as usize];
                let mut b = blocks - 1;
                while !done.load(Ordering::Relaxed) && b > blocks / 2 {
                    if is_data_block(b) && !lazy.is_present(b) {
                        let t = Instant::now();
                        lazy.read_at(&mut buf, b * u64::from(BS)).expect("read");
                        lat.push(t.elapsed());
                        // Pace the probes so they sample the whole stream.
                        std::thread::sleep(Duration::from_micros(500));
                    }
                    b -= 7;
                }
                lat
            })
        });
        let r = session.wait_complete().expect("complete");
        done.store(true, Ordering::Relaxed);
        (
            r,
            prober
                .map(|p| p.join().expect("prober"))
                .unwrap_or_default(),
        )
    });
    let start = Instant::now();
    let sock = TcpStream::connect(addr).expect("connect");
    sock.set_nodelay(true).expect("nodelay");
    let sock = TlsConfig::maybe_connect(tls.map(|t| &t.source), sock, "localhost").expect("TLS");
    let report = src.migrate(sock, || Ok(())).expect("migrate");
    let took = start.elapsed();
    let (_dreport, lat) = dest.join().expect("destination");
    (took, report, lat)
}

/// Socket buffer cap: env `DRAFTER_BENCH_SOCKBUF` (bytes, 0 = kernel autotuning).
fn socket_buffer() -> Option<usize> {
    match std::env::var("DRAFTER_BENCH_SOCKBUF")
        .ok()
        .and_then(|s| parse_size(&s))
    {
        Some(0) => None,
        Some(n) => Some(n as usize),
        None => MigrationConfig::default().socket_buffer_bytes,
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let size = size_from_args();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "drafter-storage migration bench: {:.0} MiB device, {} KiB blocks, half zero, socket buffers {:?}",
        mib(size),
        BS / 1024,
        socket_buffer()
    );
    let (dev, nonzero) = make_device(size);
    let nz = nonzero.len() as u64;
    let rounds = 3;
    let pki = certs::Pki::new("bench CA");
    let tls = Tls {
        source: pki.issue(&["localhost"]).config(),
        destination: pki.issue(&["localhost"]).config(),
    };
    let mut ours = Vec::new();
    let mut plain = Vec::new();
    let mut over_tls = Vec::new();
    let mut last = None;
    for _ in 0..rounds {
        plain.push(plain_tcp_copy(&nonzero));
        let (t, r, _) = migrate(&dev, false, None);
        ours.push(t);
        last = Some(r);
        over_tls.push(migrate(&dev, false, Some(&tls)).0);
    }
    ours.sort();
    plain.sort();
    over_tls.sort();
    let (o, p) = (ours[rounds / 2], plain[rounds / 2]);
    let tput = |d: Duration| mib(nz) / d.as_secs_f64();
    println!(
        "plain TCP copy of {:.0} MiB non-zero bytes: median {:.1} ms = {:.0} MiB/s",
        mib(nz),
        p.as_secs_f64() * 1e3,
        tput(p)
    );
    println!(
        "migration of the device over TCP:         median {:.1} ms = {:.0} MiB/s of non-zero data",
        o.as_secs_f64() * 1e3,
        tput(o)
    );
    println!(
        "throughput ratio migration / plain copy:  {:.1} % (goal >= 90 %)",
        100.0 * p.as_secs_f64() / o.as_secs_f64()
    );
    let t = over_tls[rounds / 2];
    println!(
        "migration over TLS 1.3 (mutual certs):   median {:.1} ms = {:.0} MiB/s of non-zero data",
        t.as_secs_f64() * 1e3,
        tput(t)
    );
    println!(
        "throughput ratio TLS / plain migration:  {:.1} %",
        100.0 * o.as_secs_f64() / t.as_secs_f64()
    );
    if let Some(r) = &last {
        println!(
            "wire bytes for the zero half ({:.0} MiB, {} blocks): {} bytes (goal ~0); total wire {:.1} MiB for {:.0} MiB device",
            mib(size - nz),
            r.zero_blocks,
            r.zero_wire_bytes,
            mib(r.bytes_sent),
            mib(size)
        );
    }
    if std::env::var_os("DRAFTER_BENCH_VERBOSE").is_some() {
        if let Some(r) = &last {
            println!("{}", r.to_json());
        }
    }
    let (_, r, mut lat) = migrate(&dev, true, None);
    lat.sort();
    println!(
        "need-block latency during the bulk stream: n={} p50 {:.3} ms p90 {:.3} ms p99 {:.3} ms max {:.3} ms (goal p99 < 2 ms); served {}",
        lat.len(),
        pct(&lat, 0.5).as_secs_f64() * 1e3,
        pct(&lat, 0.9).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        r.need_block_requests
    );
}
