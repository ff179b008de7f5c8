//! Liveness: a peer that silently stops (simulated here as a frozen process:
//! it neither reads nor writes, but its connection stays open and its kernel
//! keeps accepting data until the buffers fill) fails the migration within
//! about the link timeout, naming the phase, with authority where it was;
//! an idle but alive peer (a long throttle pause) does not.
//!
//! Every wait here is bounded, so a regression fails instead of hanging.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use drafter_storage::auth::{handshake, Role};
use drafter_storage::protocol::{read_frame, DeviceInfo, Message, Payload};
use drafter_storage::transport::{LinkTimeout, Silence};
use drafter_storage::{
    BlockDevice, Cause, DeviceConfig, MigrationConfig, MigrationDestination, MigrationError,
    MigrationReport, MigrationSource, Phase, Progress, Secret, SourceDevice, TrackedDevice,
};

/// The link timeout of these tests.
const LINK_TIMEOUT: Duration = Duration::from_secs(1);
/// How long after the freeze a side may take to give up: twice the link
/// timeout, plus slack for a loaded test machine.
const BOUND: Duration = Duration::from_millis(2 * 1000 + 700);
/// What a test waits for at most before declaring a hang.
const HANG: Duration = Duration::from_secs(30);

fn config() -> MigrationConfig {
    MigrationConfig {
        link_timeout: LINK_TIMEOUT,
        // See `dirtying`.
        max_downtime: Duration::ZERO,
        ..MigrationConfig::default()
    }
}

/// Wraps `observer` so one block of `dev` is written before every dirty
/// cycle: each cycle finds work, so (with a zero downtime budget and
/// maxDirtyBlocks 0) only maxCycles ends the dirty phase.
fn dirtying(
    dev: Arc<TrackedDevice>,
    observer: impl Fn(&Progress) + Send + Sync + 'static,
) -> Arc<dyn Fn(&Progress) + Send + Sync> {
    let n = AtomicU64::new(0);
    Arc::new(move |p| {
        if matches!(
            p,
            Progress::Phase(Phase::DirtyCycles) | Progress::Cycle { .. }
        ) {
            let i = n.fetch_add(1, Ordering::SeqCst);
            dev.write_at(&[(i as u8) | 1; 4096], (i % dev.block_count()) * 4096)
                .unwrap();
        }
        observer(p);
    })
}

/// Runs `f` in a thread and returns its result, or fails the test if it
/// has not finished within `limit`.
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {limit:?}: it hangs"),
    }
}

/// A TCP proxy between a source and a destination that can freeze: it then
/// stops reading and forwarding in both directions but keeps every socket
/// open, like a SIGSTOPped peer whose kernel still holds the connection.
struct Proxy {
    frozen: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    sockets: Vec<TcpStream>,
    threads: Vec<JoinHandle<()>>,
}

impl Proxy {
    /// Returns the source's end, the destination's end and the proxy.
    fn new() -> (TcpStream, TcpStream, Proxy) {
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let source_end = TcpStream::connect(l1.local_addr().unwrap()).unwrap();
        let (p1, _) = l1.accept().unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
        let p2 = TcpStream::connect(l2.local_addr().unwrap()).unwrap();
        let (dest_end, _) = l2.accept().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = [(&p1, &p2), (&p2, &p1)]
            .into_iter()
            .map(|(from, to)| {
                let (from, to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                let (frozen, stop) = (frozen.clone(), stop.clone());
                std::thread::spawn(move || forward(from, to, &frozen, &stop))
            })
            .collect();
        let proxy = Proxy {
            frozen,
            stop,
            sockets: vec![p1, p2],
            threads,
        };
        (source_end, dest_end, proxy)
    }

    fn freezer(&self) -> Arc<AtomicBool> {
        self.frozen.clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in &self.sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn forward(mut from: TcpStream, mut to: TcpStream, frozen: &AtomicBool, stop: &AtomicBool) {
    let hold = || {
        while frozen.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        !stop.load(Ordering::SeqCst)
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !hold() {
            return;
        }
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
        };
        // Frozen while reading: keep what was read, forward nothing.
        if !hold() || to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

fn assert_link_timeout(e: &MigrationError, silence: Option<Silence>) {
    match &e.cause {
        Cause::LinkTimeout(LinkTimeout { silence: s, waited }) => {
            assert_eq!(*waited, LINK_TIMEOUT, "{e}");
            if let Some(want) = silence {
                assert_eq!(*s, want, "{e}");
            }
        }
        other => panic!("expected a link timeout, got {other:?} ({e})"),
    }
    let text = e.to_string();
    assert!(
        text.contains(&format!("during {}", e.phase)) && text.contains("link timeout"),
        "the error names the phase and the timeout: {text}"
    );
}

/// When the freeze happened, once it did.
type Frozen = Arc<Mutex<Option<Instant>>>;

fn freeze_on(flag: Arc<AtomicBool>, at: Frozen) -> impl Fn() + Send + Sync {
    move || {
        let mut g = at.lock().unwrap();
        if g.is_none() {
            *g = Some(Instant::now());
            flag.store(true, Ordering::SeqCst);
        }
    }
}

fn slow_cycles() -> DeviceConfig {
    // Never quiet, many throttled cycles: the dirty phase outlasts the link
    // timeout, so a frozen destination is noticed before the source could
    // reach suspend and hand authority over.
    DeviceConfig {
        cycle_throttle: Duration::from_millis(100),
        min_cycles: 1,
        max_cycles: 100,
        max_dirty_blocks: 0,
        ..DeviceConfig::default()
    }
}

struct Run {
    source: Result<MigrationReport, MigrationError>,
    source_done: Instant,
    suspended: bool,
    dest: Result<(), MigrationError>,
    dest_done: Instant,
    frozen_at: Option<Instant>,
}

/// Migrates `blocks` blocks through a proxy that freezes when `freeze_when`
/// says so.
fn migrate_through_freezing_proxy(
    blocks: u64,
    freeze_when: impl Fn(&Progress) -> bool + Send + Sync + 'static,
) -> Run {
    let dev = seeded_device(blocks, 4096, 7);
    let (source_end, dest_end, proxy) = Proxy::new();
    let frozen_at: Frozen = Arc::default();
    let freeze = freeze_on(proxy.freezer(), frozen_at.clone());
    let src = MigrationSource::new(
        vec![SourceDevice::tracked("disk", dev.clone(), slow_cycles())],
        config(),
    )
    .with_observer(dirtying(dev, move |p| {
        if freeze_when(p) {
            freeze();
        }
    }));
    let dest = std::thread::spawn(move || {
        let r = (|| {
            let s = MigrationDestination::accept(dest_end, &config(), memory_factory)?;
            s.wait_authority()?;
            s.wait_complete().map(|_| ())
        })();
        (r, Instant::now())
    });
    let (source, source_done, suspended) = within(HANG, "the source", move || {
        let mut suspended = false;
        let r = src.migrate(source_end, || {
            suspended = true;
            Ok(())
        });
        (r, Instant::now(), suspended)
    });
    let (dest, dest_done) = within(HANG, "the destination", move || dest.join().unwrap());
    drop(proxy);
    let frozen_at = *frozen_at.lock().unwrap();
    Run {
        source,
        source_done,
        suspended,
        dest,
        dest_done,
        frozen_at,
    }
}

/// Checks that the source of `run` failed in `phase` within [`BOUND`] of the
/// freeze (which happened `when`), keeping authority and never pausing the
/// VM; returns the freeze time and the source's error.
fn source_gave_up<'a>(run: &'a Run, when: &str, phase: Phase) -> (Instant, &'a MigrationError) {
    let frozen = run
        .frozen_at
        .unwrap_or_else(|| panic!("did not freeze {when}"));
    let err = run.source.as_ref().expect_err("the source must fail");
    assert!(
        run.source_done - frozen <= BOUND,
        "the source gave up {:?} after the freeze: {err}",
        run.source_done - frozen
    );
    assert!(err.source_keeps_authority(), "{err}");
    assert!(!run.suspended, "the VM was never paused");
    assert_eq!(err.phase, phase, "{err}");
    (frozen, err)
}

#[test]
fn frozen_destination_in_full_pass_fails_the_source_within_the_link_timeout() {
    // 32 MiB, mostly random: far more than every socket buffer on the way,
    // so the source's writer blocks once the destination stops reading.
    let run = migrate_through_freezing_proxy(
        8192,
        |p| matches!(p, Progress::Blocks { done, .. } if *done >= 128),
    );
    let (frozen, err) = source_gave_up(&run, "during the full pass", Phase::FullPass);
    assert_link_timeout(err, None);
    // The destination, cut off from the source's keepalives, gives up too.
    let derr = run.dest.expect_err("the destination must fail");
    assert!(run.dest_done - frozen <= BOUND, "{derr}");
    assert!(derr.source_keeps_authority(), "{derr}");
    assert_link_timeout(&derr, Some(Silence::Receiving));
}

#[test]
fn frozen_destination_in_dirty_cycles_fails_the_source_within_the_link_timeout() {
    // Small device: everything fits in the socket buffers, so only the
    // silence of the destination (no keepalives) can reveal the freeze.
    let run =
        migrate_through_freezing_proxy(256, |p| matches!(p, Progress::Cycle { cycle: 2, .. }));
    let (_, err) = source_gave_up(&run, "during the dirty cycles", Phase::DirtyCycles);
    assert_link_timeout(err, Some(Silence::Receiving));
}

#[test]
fn frozen_source_after_the_full_pass_fails_the_destination_within_the_link_timeout() {
    let run =
        migrate_through_freezing_proxy(512, |p| matches!(p, Progress::Phase(Phase::DirtyCycles)));
    let frozen = run.frozen_at.expect("froze after the full pass");
    let derr = run.dest.expect_err("the destination must fail");
    assert!(
        run.dest_done - frozen <= BOUND,
        "the destination gave up {:?} after the freeze: {derr}",
        run.dest_done - frozen
    );
    assert!(derr.source_keeps_authority(), "{derr}");
    assert_link_timeout(&derr, Some(Silence::Receiving));
    assert!(
        derr.to_string().contains("nothing received from the peer"),
        "{derr}"
    );
    // The source (which sees the proxy frozen as well) keeps authority.
    let err = run.source.expect_err("the source fails too");
    assert!(err.source_keeps_authority() && !run.suspended, "{err}");
}

#[test]
fn idle_throttle_pauses_longer_than_the_link_timeout_do_not_fail_the_migration() {
    // Nothing but keepalives crosses the link for 4x the link timeout at a
    // time, in both directions, over TCP (kernel keepalive options set too).
    let link_timeout = Duration::from_millis(300);
    let cfg = move || MigrationConfig {
        link_timeout,
        ..MigrationConfig::default()
    };
    let dev = seeded_device(128, 4096, 11);
    let src = MigrationSource::new(
        vec![SourceDevice::tracked(
            "disk",
            dev.clone(),
            DeviceConfig {
                cycle_throttle: 4 * link_timeout,
                min_cycles: 1,
                max_cycles: 3,
                max_dirty_blocks: 0,
                ..DeviceConfig::default()
            },
        )],
        MigrationConfig {
            max_downtime: Duration::ZERO,
            ..cfg()
        },
    )
    .with_observer(dirtying(dev.clone(), |_| {}));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let s = MigrationDestination::accept(sock, &cfg(), memory_factory)?;
        let d = s.device("disk").expect("announced");
        s.wait_complete()?;
        Ok::<_, MigrationError>(read_all(&*d))
    });
    let start = Instant::now();
    let report = within(HANG, "the migration", move || {
        src.migrate(TcpStream::connect(addr).unwrap(), || Ok(()))
    })
    .expect("an idle but alive peer is not a dead one");
    assert!(
        start.elapsed() >= 2 * 4 * link_timeout,
        "two throttle pauses ran"
    );
    assert_eq!(report.devices[0].cycles, 3);
    let got = within(HANG, "the destination", move || dest.join().unwrap())
        .expect("destination completes");
    assert!(got == read_all(&*dev), "destination equals source");
}

/// A destination that acknowledges the devices, reads `frames` frames, then
/// freezes: it never reads or writes again but keeps its socket open.
fn freezing_fake_destination(mut sock: UnixStream, frames: usize, release: mpsc::Receiver<()>) {
    handshake(&mut sock, Role::Destination, &Secret::default()).unwrap();
    let mut devices = 0;
    loop {
        match read_frame(&mut sock).unwrap() {
            Message::DeviceInfo(_) => devices += 1,
            Message::DevicesListed { .. } => break,
            _ => {}
        }
    }
    for device in 0..devices {
        sock.write_all(
            &Message::DeviceAck {
                device,
                has_base: false,
            }
            .to_frame(),
        )
        .unwrap();
    }
    for _ in 0..frames {
        if read_frame(&mut sock).is_err() {
            return;
        }
    }
    let _ = release.recv_timeout(HANG);
}

#[test]
fn frozen_destination_over_a_unix_socket_fails_the_source_within_the_link_timeout() {
    let dev = seeded_device(8192, 4096, 13);
    let src = MigrationSource::new(
        vec![SourceDevice::tracked("disk", dev, slow_cycles())],
        config(),
    );
    let (a, b) = UnixStream::pair().unwrap();
    let (release, released) = mpsc::channel();
    let fake = std::thread::spawn(move || freezing_fake_destination(b, 200, released));
    let start = Instant::now();
    let err = within(HANG, "the source", move || src.migrate(a, || Ok(())))
        .expect_err("the source must fail");
    // The fake froze within milliseconds of the start.
    assert!(
        start.elapsed() <= BOUND,
        "took {:?}: {err}",
        start.elapsed()
    );
    assert!(err.source_keeps_authority(), "{err}");
    assert_eq!(err.phase, Phase::FullPass, "{err}");
    assert_link_timeout(&err, None);
    let _ = release.send(());
    fake.join().unwrap();
}

#[test]
fn frozen_source_over_a_unix_socket_fails_the_destination_within_the_link_timeout() {
    let (mut src, b) = UnixStream::pair().unwrap();
    let (release, released) = mpsc::channel::<()>();
    // A source that lists one device, sends a few blocks, then freezes.
    let fake = std::thread::spawn(move || {
        handshake(&mut src, Role::Source, &Secret::default()).unwrap();
        let info = DeviceInfo {
            id: 0,
            name: "disk".into(),
            size: 64 * 4096,
            block_size: 4096,
        };
        src.write_all(&Message::DeviceInfo(info).to_frame())
            .unwrap();
        src.write_all(&Message::DevicesListed { count: 1 }.to_frame())
            .unwrap();
        for index in 0..8 {
            src.write_all(
                &Message::BlockData {
                    device: 0,
                    index,
                    compressed: false,
                    data: Payload::new(vec![index as u8 + 1; 4096]),
                }
                .to_frame(),
            )
            .unwrap();
        }
        let _ = released.recv_timeout(HANG);
    });
    let start = Instant::now();
    let derr = within(HANG, "the destination", move || {
        let s = MigrationDestination::accept(b, &config(), memory_factory)?;
        let disk = s.device("disk").expect("announced");
        // A read of a block that never comes fails instead of hanging.
        let mut buf = vec![0u8; 4096];
        let read = disk.read_at(&mut buf, 40 * 4096);
        assert!(read.is_err(), "a block the frozen source never sends");
        s.wait_authority()
    })
    .expect_err("the destination must fail");
    assert!(
        start.elapsed() <= BOUND,
        "took {:?}: {derr}",
        start.elapsed()
    );
    assert!(derr.source_keeps_authority(), "{derr}");
    assert_eq!(derr.phase, Phase::FullPass, "{derr}");
    assert_link_timeout(&derr, Some(Silence::Receiving));
    let _ = release.send(());
    fake.join().unwrap();
}

#[test]
fn zero_link_timeout_disables_keepalives() {
    // A plain migration with liveness off still works (and sends none).
    let dev = seeded_device(64, 4096, 17);
    let cfg = MigrationConfig {
        link_timeout: Duration::ZERO,
        ..MigrationConfig::default()
    };
    let src = source_of(&[dev], cfg.clone());
    let (r, d) = within(HANG, "the migration", move || {
        run_pair(&src, cfg, || Ok(()))
    });
    r.expect("source");
    d.expect("destination").wait_complete().expect("complete");
}
