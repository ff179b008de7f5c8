//! Migrations over TLS 1.3 with mutual certificate authentication, on real
//! loopback TCP sockets and certificates made at test time. The source
//! listens and the destination dials, as with `drafter-peer`.
//!
//! * A migration over TLS (a guest writing during it) delivers identical
//!   bytes, and none of them are readable on the wire (the same capture of
//!   a plain migration shows them, so the check can fail).
//! * A peer with a certificate from another CA (either side), a plain-TCP
//!   peer and a peer replaying a recorded handshake are refused with
//!   one-line errors; the source keeps its data and authority and then
//!   migrates to a proper peer.

#[path = "support/certs.rs"]
mod certs;
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use certs::Pki;
use common::*;
use drafter_storage::{
    BlockDevice, Link, MemoryDevice, MigrationConfig, MigrationDestination, MigrationError,
    MigrationSource, Secret, SourceDevice, TlsConfig, TrackedDevice,
};

const MARKER: &[u8] = b"<<drafter guest secret 0123456789>>";

fn config() -> MigrationConfig {
    MigrationConfig {
        secret: Secret::new("s3cret"),
        handshake_timeout: Duration::from_secs(5),
        link_timeout: Duration::from_secs(5),
        ..MigrationConfig::default()
    }
}

/// A device whose every block is the marker repeated (never written during
/// the test), and one the writers change during the migration.
fn devices() -> (Arc<TrackedDevice>, Arc<TrackedDevice>) {
    let bs = 4096u32;
    let marked = Arc::new(MemoryDevice::new(64 * u64::from(bs), bs).unwrap());
    let block: Vec<u8> = MARKER.iter().copied().cycle().take(bs as usize).collect();
    for b in 0..64 {
        marked.write_at(&block, b * u64::from(bs)).unwrap();
    }
    (
        Arc::new(TrackedDevice::new(marked, Duration::from_secs(1))),
        seeded_device(256, bs, 7),
    )
}

fn source_of_two(a: &Arc<TrackedDevice>, b: &Arc<TrackedDevice>) -> MigrationSource {
    MigrationSource::new(
        vec![
            SourceDevice::tracked("marked", a.clone(), fast_device_config()),
            SourceDevice::tracked("busy", b.clone(), fast_device_config()),
        ],
        config(),
    )
}

/// A destination over `link` that receives everything and returns the
/// bytes of each device, or its error as text.
fn receive<L: Link>(link: L) -> Result<Vec<Vec<u8>>, String> {
    let session = MigrationDestination::accept(link, &config(), memory_factory)
        .map_err(|e: MigrationError| e.to_string())?;
    let _ = session.wait_authority();
    let devices: Vec<_> = session.devices().iter().map(|(_, d)| d.clone()).collect();
    session.wait_complete().map_err(|e| e.to_string())?;
    Ok(devices.iter().map(|d| read_all(d.as_ref())).collect())
}

/// Relays one connection to `upstream`, recording what each side sent.
struct Relay {
    addr: SocketAddr,
    to_server: Arc<Mutex<Vec<u8>>>,
    to_client: Arc<Mutex<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

fn pump(mut from: TcpStream, mut to: TcpStream, log: Arc<Mutex<Vec<u8>>>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                log.lock().unwrap().extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

impl Relay {
    fn to(upstream: SocketAddr) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let to_server = Arc::new(Mutex::new(Vec::new()));
        let to_client = Arc::new(Mutex::new(Vec::new()));
        let (ts, tc) = (to_server.clone(), to_client.clone());
        let thread = std::thread::spawn(move || {
            let (client, _) = l.accept().unwrap();
            let server = TcpStream::connect(upstream).unwrap();
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let up = std::thread::spawn(move || pump(client, server, ts));
            pump(s2, c2, tc);
            up.join().unwrap();
        });
        Relay {
            addr,
            to_server,
            to_client,
            thread: Some(thread),
        }
    }

    /// Waits for both directions to end; returns (to server, to client).
    fn finish(mut self) -> (Vec<u8>, Vec<u8>) {
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let s = std::mem::take(&mut *self.to_server.lock().unwrap());
        let c = std::mem::take(&mut *self.to_client.lock().unwrap());
        (s, c)
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Accepts one connection on `listener` and migrates `source` over it,
/// wrapped in TLS when `tls` is given.
fn serve_one(
    source: &MigrationSource,
    listener: &TcpListener,
    tls: Option<&TlsConfig>,
    suspend: impl FnOnce() -> Result<(), String>,
) -> Result<drafter_storage::MigrationReport, MigrationError> {
    let (sock, _) = listener.accept().unwrap();
    let link = TlsConfig::maybe_accept(tls, sock).unwrap();
    source.migrate(link, suspend)
}

/// A migration of `source` (devices `a`, `b` with writers on `b`) through
/// a recording relay; returns the bytes the relay saw from the source.
fn migrate_through_relay(
    a: &Arc<TrackedDevice>,
    b: &Arc<TrackedDevice>,
    server: Option<TlsConfig>,
    client: Option<TlsConfig>,
) -> Vec<u8> {
    let source = source_of_two(a, b);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay = Relay::to(listener.local_addr().unwrap());
    let addr = relay.addr;
    let dest = std::thread::spawn(move || {
        let sock = TcpStream::connect(addr).unwrap();
        let link = TlsConfig::maybe_connect(client.as_ref(), sock, "localhost").unwrap();
        receive(link)
    });
    let mut writers = Writers::start(std::slice::from_ref(b), 2, 11);
    let report = serve_one(&source, &listener, server.as_ref(), || {
        writers.stop();
        Ok(())
    })
    .unwrap_or_else(|e| panic!("source: {e}"));
    let got = dest.join().unwrap().unwrap_or_else(|e| panic!("dest: {e}"));
    assert_eq!(got.len(), 2);
    assert!(got[0] == read_all(a.as_ref()), "marked device differs");
    assert!(got[1] == read_all(b.as_ref()), "busy device differs");
    assert!(report.bytes_sent > 64 * 4096, "{}", report.bytes_sent);
    relay.finish().1
}

#[test]
fn a_tls_migration_moves_identical_bytes_that_the_wire_does_not_show() {
    let pki = Pki::new("drafter test CA");
    let (src_id, dst_id) = (pki.issue(&["localhost"]), pki.issue(&["localhost"]));
    let (a, b) = devices();
    let wire = migrate_through_relay(&a, &b, Some(src_id.config()), Some(dst_id.config()));
    assert!(
        !contains(&wire, MARKER),
        "guest bytes readable on a TLS wire"
    );
    // The same capture of a plain migration shows them: the check works.
    let (a, b) = devices();
    let wire = migrate_through_relay(&a, &b, None, None);
    assert!(contains(&wire, MARKER), "plain capture lacks the marker");
}

/// One refused attempt: the source serves one connection made by `dial`;
/// returns the source's error and the dialler's.
fn refused(
    source: &MigrationSource,
    listener: &TcpListener,
    tls: &TlsConfig,
    dial: impl FnOnce(SocketAddr) -> String + Send + 'static,
) -> (String, String) {
    let addr = listener.local_addr().unwrap();
    let peer = std::thread::spawn(move || dial(addr));
    let err = serve_one(source, listener, Some(tls), || {
        panic!("a refused peer reached the suspend step")
    })
    .err()
    .unwrap_or_else(|| panic!("the source migrated to a refused peer"));
    assert!(err.source_keeps_authority(), "{err}");
    let peer_err = peer.join().unwrap();
    let e = err.to_string();
    assert!(!e.contains('\n'), "source error is not one line: {e}");
    assert!(
        !peer_err.contains('\n') && !peer_err.is_empty(),
        "peer error: {peer_err:?}"
    );
    (e, peer_err)
}

/// The dialler as a migration destination over `link`, expecting refusal.
fn refused_destination<L: Link>(link: L) -> String {
    match receive(link) {
        Ok(_) => panic!("a refused peer received the devices"),
        Err(e) => e,
    }
}

#[test]
fn foreign_certificates_plain_tcp_and_a_replayed_handshake_are_refused_and_the_source_keeps_its_data(
) {
    let pki = Pki::new("drafter test CA");
    let other = Pki::new("another CA");
    let src_id = pki.issue(&["localhost"]);
    let src_tls = src_id.config();
    let (a, b) = devices();
    let before = (read_all(a.as_ref()), read_all(b.as_ref()));
    let source = source_of_two(&a, &b);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();

    // A dialler whose certificate another CA issued (it trusts ours).
    let rogue = other.issue(&["localhost"]).trusting(&pki.ca_pem()).config();
    let (src_err, peer_err) = refused(&source, &listener, &src_tls, move |addr| {
        let s = TcpStream::connect(addr).unwrap();
        refused_destination(rogue.connect(s, "localhost").unwrap())
    });
    assert!(
        src_err.contains("peer certificate refused") && src_err.contains("UnknownIssuer"),
        "{src_err}"
    );
    eprintln!("foreign client certificate: source: {src_err}\n  peer: {peer_err}");

    // A dialler that trusts another CA only: it refuses our certificate.
    let rogue = other.issue(&["localhost"]).config();
    let (src_err, peer_err) = refused(&source, &listener, &src_tls, move |addr| {
        let s = TcpStream::connect(addr).unwrap();
        refused_destination(rogue.connect(s, "localhost").unwrap())
    });
    assert!(peer_err.contains("peer certificate refused"), "{peer_err}");
    assert!(src_err.contains("refused the TLS session"), "{src_err}");
    eprintln!("foreign CA on the dialler: source: {src_err}\n  peer: {peer_err}");

    // A dialler with a valid certificate for another name than it dialled.
    let misnamed = pki
        .issue(&["localhost"])
        .config()
        .with_server_name("elsewhere.example");
    let (_, peer_err) = refused(&source, &listener, &src_tls, move |addr| {
        let s = TcpStream::connect(addr).unwrap();
        refused_destination(misnamed.connect(s, "localhost").unwrap())
    });
    assert!(peer_err.contains("NotValidForName"), "{peer_err}");

    // A plain-TCP dialler.
    let (src_err, peer_err) = refused(&source, &listener, &src_tls, |addr| {
        refused_destination(TcpStream::connect(addr).unwrap())
    });
    assert!(src_err.contains("does not speak TLS"), "{src_err}");
    assert!(peer_err.contains("the peer speaks TLS"), "{peer_err}");
    eprintln!("plain TCP: source: {src_err}\n  peer: {peer_err}");

    // A recorded handshake replayed: record what a proper dialler sent in
    // a whole migration from another source with the same identity...
    let recorded = {
        let (a2, b2) = devices();
        let other_source = source_of_two(&a2, &b2);
        let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
        let relay = Relay::to(l2.local_addr().unwrap());
        let (addr, good) = (relay.addr, pki.issue(&["localhost"]).config());
        let dest = std::thread::spawn(move || {
            let s = TcpStream::connect(addr).unwrap();
            receive(good.connect(s, "localhost").unwrap())
        });
        serve_one(&other_source, &l2, Some(&src_tls), || Ok(())).unwrap();
        dest.join().unwrap().unwrap();
        relay.finish().0
    };
    assert!(recorded.len() > 1000, "{}", recorded.len());
    // ... and replay it byte for byte to our source.
    let (src_err, peer_err) = refused(&source, &listener, &src_tls, move |addr| {
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(&recorded);
        let _ = s.shutdown(Shutdown::Write);
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        format!("replayer got {} bytes back", answer.len())
    });
    assert!(src_err.contains("failed to decrypt"), "{src_err}");
    eprintln!("replay: source: {src_err}\n  {peer_err}");

    // The source kept its data and still migrates to a proper peer.
    assert!(read_all(a.as_ref()) == before.0 && read_all(b.as_ref()) == before.1);
    let good = pki.issue(&["localhost"]).config();
    let addr = listener.local_addr().unwrap();
    let dest = std::thread::spawn(move || {
        let s = TcpStream::connect(addr).unwrap();
        receive(good.connect(s, "localhost").unwrap())
    });
    serve_one(&source, &listener, Some(&src_tls), || Ok(()))
        .unwrap_or_else(|e| panic!("source after refusals: {e}"));
    let got = dest.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
    assert!(got[0] == before.0 && got[1] == before.1);
}

#[test]
fn a_tls_peer_without_the_shared_secret_is_refused_inside_tls() {
    let pki = Pki::new("drafter test CA");
    let (src, dst) = (pki.issue(&["localhost"]), pki.issue(&["localhost"]));
    let (a, b) = devices();
    let source = source_of_two(&a, &b);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = dst.config();
    let peer = std::thread::spawn(move || {
        let s = TcpStream::connect(addr).unwrap();
        let wrong = MigrationConfig {
            secret: Secret::new("wrong"),
            ..config()
        };
        MigrationDestination::accept(dst.connect(s, "localhost").unwrap(), &wrong, memory_factory)
            .err()
            .map(|e| e.to_string())
    });
    let err = serve_one(&source, &listener, Some(&src.config()), || Ok(()))
        .err()
        .unwrap_or_else(|| panic!("migrated to a peer without the secret"));
    assert!(err.to_string().contains("authentication failed"), "{err}");
    assert!(err.source_keeps_authority());
    let peer = peer.join().unwrap().unwrap_or_default();
    assert!(peer.contains("authentication failed"), "{peer}");
}

/// The TLS link's reader and writer run at once in both directions on one
/// connection, each writing more than the socket buffers hold before it
/// reads: neither blocks the other.
#[test]
fn a_tls_link_carries_both_directions_at_once_without_deadlock() {
    let pki = Pki::new("drafter test CA");
    let (x, y) = (pki.issue(&["localhost"]), pki.issue(&["localhost"]));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    const N: usize = 16 << 20;
    let run = |link: Box<dyn Link>| {
        let mut reader = link.try_clone_link().unwrap();
        link.set_link_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        link.set_link_write_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut writer = link;
        let w = std::thread::spawn(move || {
            let chunk: Vec<u8> = (0..65_536u32).map(|i| (i % 251) as u8).collect();
            let mut sent = 0;
            while sent < N {
                writer.write_all(&chunk).unwrap();
                sent += chunk.len();
            }
            writer.flush().unwrap();
            writer
        });
        let mut got = 0usize;
        let mut buf = vec![0u8; 40_000];
        while got < N {
            let n = reader
                .read(&mut buf)
                .unwrap_or_else(|e| panic!("read after {got}: {e} ({:?})", e.kind()));
            assert!(n > 0, "EOF after {got} bytes");
            assert!(buf[..n]
                .iter()
                .enumerate()
                .all(|(i, &v)| v == ((got + i) % 65_536 % 251) as u8));
            got += n;
        }
        let writer = w.join().unwrap();
        // Shutting a clone down wakes a reader blocked on the same link.
        let mut blocked = writer.try_clone_link().unwrap();
        let r = std::thread::Builder::new()
            .name("tls-blocked-rd".into())
            .spawn(move || blocked.read(&mut [0u8; 16]).map_err(|e| e.kind()))
            .unwrap();
        wait_until_asleep("tls-blocked-rd", || r.is_finished());
        writer.shutdown_link();
        let woke = r.join().unwrap();
        assert!(matches!(woke, Ok(0) | Err(_)), "{woke:?}");
    };
    let xc = x.config();
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        run(Box::new(xc.accept(s).unwrap()));
    });
    let s = TcpStream::connect(addr).unwrap();
    run(Box::new(y.config().connect(s, "localhost").unwrap()));
    server.join().unwrap();
}

/// Waits until a thread of this process named `name` sleeps in the kernel
/// (blocked in a read) or `done` (it returned already); gives up silently
/// after 5 s.
fn wait_until_asleep(name: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline && !done() {
        let asleep = std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
            .any(|t| {
                let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                comm.trim() == name
                    && stat
                        .rsplit_once(')')
                        .is_some_and(|(_, rest)| rest.trim_start().starts_with('S'))
            });
        if asleep {
            return;
        }
        std::thread::yield_now();
    }
}

#[test]
fn unreadable_or_mismatched_tls_files_are_named() {
    let pki = Pki::new("drafter test CA");
    let id = pki.issue(&["localhost"]);
    let dir = tempfile::tempdir().unwrap();
    id.write_dir(dir.path());
    let files = drafter_storage::TlsFiles::in_dir(dir.path());
    TlsConfig::load(&files).unwrap_or_else(|e| panic!("{e}"));

    let missing = drafter_storage::TlsFiles {
        ca: dir.path().join("nope.pem"),
        ..files.clone()
    };
    let e = TlsConfig::load(&missing).unwrap_err().to_string();
    assert!(e.contains("TLS CA") && e.contains("nope.pem"), "{e}");

    // A key that is not the certificate's.
    let other = pki.issue(&["localhost"]);
    std::fs::write(dir.path().join("key.pem"), &other.key).unwrap();
    let e = TlsConfig::load(&files).unwrap_err().to_string();
    assert!(
        e.starts_with("TLS configuration") && !e.contains('\n'),
        "{e}"
    );

    // A certificate file without a certificate.
    std::fs::write(dir.path().join("cert.pem"), &id.key).unwrap();
    let e = TlsConfig::load(&files).unwrap_err().to_string();
    assert!(
        e.contains("cert.pem") && e.contains("no CERTIFICATE"),
        "{e}"
    );
}
