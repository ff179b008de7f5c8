//! Convergence under load (issue 11): a guest that dirties faster than a
//! slow link drains. With `throttle` the engine slows the (fake) guest step
//! by step until the predicted downtime fits; with `give-up` the migration
//! fails before suspend and the source keeps authority; with `stop` the
//! cycles end at maxCycles. A quiet device ends by the time rule.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use drafter_storage::migrator::Authority;
use drafter_storage::{
    BlockDevice, DeviceConfig, Link, MigrationConfig, MigrationReport, MigrationSource,
    OnNoConvergence, Phase, SourceDevice, ThrottleHook, TrackedDevice,
};

/// Bytes per second the slow link carries.
const LINK_RATE: u64 = 4 << 20;
const BS: u32 = 4096;
/// Blocks the fake guest keeps rewriting.
const WORKING_SET: u64 = 256;

/// A Unix socket whose writes are paced to [`LINK_RATE`].
struct SlowLink(UnixStream);

impl Read for SlowLink {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for SlowLink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(&buf[..buf.len().min(16 * 1024)])?;
        // Pacing, not synchronisation: the link's rate.
        std::thread::sleep(Duration::from_secs_f64(n as f64 / LINK_RATE as f64));
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl Link for SlowLink {
    fn try_clone_link(&self) -> std::io::Result<Box<dyn Link>> {
        Ok(Box::new(SlowLink(self.0.try_clone()?)))
    }
    fn shutdown_link(&self) {
        self.0.shutdown_link();
    }
    fn set_link_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.0.set_link_read_timeout(t)
    }
    fn set_link_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.0.set_link_write_timeout(t)
    }
}

/// A fake guest rewriting its working set at 12.5 MiB/s (three times the
/// link), slowed by the throttle it is given.
struct Guest {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Guest {
    fn start(dev: Arc<TrackedDevice>, throttle: Arc<AtomicU8>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut rng = Rng(7);
            let mut buf = vec![0u8; BS as usize];
            // Blocks owed, in hundredths, so small throttled rates add up.
            let mut owed = 0u64;
            while !s.load(Ordering::SeqCst) {
                owed += 16 * u64::from(100 - throttle.load(Ordering::SeqCst).min(100));
                while owed >= 100 {
                    owed -= 100;
                    rng.fill(&mut buf);
                    let idx = rng.below(WORKING_SET);
                    dev.write_at(&buf, idx * u64::from(BS)).unwrap();
                }
                // Pacing: 16 blocks per 5 ms when unthrottled.
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Guest {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop();
    }
}

fn device_config(max_cycles: u32) -> DeviceConfig {
    DeviceConfig {
        block_size: BS,
        cycle_throttle: Duration::from_millis(20),
        min_cycles: 1,
        max_cycles,
        // Never quiet: only the time rule or maxCycles end the cycles.
        max_dirty_blocks: 0,
        ..DeviceConfig::default()
    }
}

fn config(remedy: OnNoConvergence) -> MigrationConfig {
    MigrationConfig {
        on_no_convergence: remedy,
        stop_allowance: Duration::ZERO,
        ..MigrationConfig::default()
    }
}

/// Migrates a busy device over the slow link; returns the source's result,
/// whether suspend ran, and whether the destination ended equal.
fn migrate_busy(
    remedy: OnNoConvergence,
    max_cycles: u32,
    hook: Option<ThrottleHook>,
    throttle: Arc<AtomicU8>,
) -> (
    Result<MigrationReport, drafter_storage::MigrationError>,
    bool,
) {
    let dev = seeded_device(1024, BS, 11);
    let mut src = MigrationSource::new(
        vec![SourceDevice::tracked(
            "memory",
            dev.clone(),
            device_config(max_cycles),
        )],
        config(remedy),
    );
    if let Some(h) = hook {
        src = src.with_throttle(h);
    }
    let guest = Arc::new(Mutex::new(Guest::start(dev.clone(), throttle)));
    let (a, b) = UnixStream::pair().unwrap();
    let dest = spawn_taking_destination(b, MigrationConfig::default());
    let suspended = AtomicBool::new(false);
    let r = src.migrate(SlowLink(a), || {
        suspended.store(true, Ordering::SeqCst);
        guest.lock().unwrap().stop();
        Ok(())
    });
    guest.lock().unwrap().stop();
    let session = dest.join().unwrap();
    if r.is_ok() {
        let session = session.unwrap();
        let lazy = session.devices()[0].1.clone();
        session.wait_complete().unwrap();
        assert!(
            read_all(&*lazy) == read_all(&*dev),
            "destination differs from source"
        );
    }
    (r, suspended.load(Ordering::SeqCst))
}

#[test]
fn throttle_steps_up_until_the_predicted_downtime_fits() {
    let throttle = Arc::new(AtomicU8::new(0));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let (t, c) = (throttle.clone(), calls.clone());
    let hook: ThrottleHook = Arc::new(move |p| {
        c.lock().unwrap().push(p);
        t.store(p, Ordering::SeqCst);
    });
    let (r, suspended) = migrate_busy(OnNoConvergence::Throttle, 200, Some(hook), throttle);
    let report = r.unwrap_or_else(|e| panic!("{e}"));
    assert!(suspended);
    let calls = calls.lock().unwrap().clone();
    eprintln!("throttle calls {calls:?}; {}", report.ready_reason);
    assert_eq!(calls.last(), Some(&0), "throttle removed at the end");
    let steps = &calls[..calls.len() - 1];
    assert!(steps.first().is_some_and(|s| *s >= 20), "{steps:?}");
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    assert!(
        report.ready_reason.starts_with("throttled to ") && report.ready_reason.contains("fits"),
        "{}",
        report.ready_reason
    );
    assert_eq!(report.throttle_percent, *steps.last().unwrap());
    assert!(report.bandwidth_bytes_per_sec > 0.0);
    assert!(report.predicted_downtime_millis.is_some());
}

#[test]
fn give_up_fails_before_suspend_and_names_both_rates() {
    let (r, suspended) = migrate_busy(
        OnNoConvergence::GiveUp,
        200,
        None,
        Arc::new(AtomicU8::new(0)),
    );
    let e = r.expect_err("must give up");
    assert!(!suspended, "gave up after suspending");
    assert_eq!(e.authority, Authority::Source);
    assert_eq!(e.phase, Phase::DirtyCycles);
    let msg = e.to_string();
    assert!(
        msg.contains("gave up: dirty rate") && msg.matches("MB/s").count() == 2,
        "{msg}"
    );
}

#[test]
fn stop_ends_at_max_cycles() {
    let (r, suspended) = migrate_busy(OnNoConvergence::Stop, 4, None, Arc::new(AtomicU8::new(0)));
    let report = r.unwrap_or_else(|e| panic!("{e}"));
    assert!(suspended);
    assert_eq!(report.ready_reason, "maxCycles reached");
    assert_eq!(report.devices[0].cycles, 4);
    assert_eq!(report.throttle_percent, 0);
}

#[test]
fn a_quiet_device_ends_by_the_time_rule_and_the_report_says_so() {
    let devs = [seeded_device(256, BS, 3)];
    let src = MigrationSource::new(
        vec![SourceDevice::tracked(
            "memory",
            devs[0].clone(),
            device_config(20),
        )],
        MigrationConfig::default(),
    );
    let (r, dest) = run_pair(&src, MigrationConfig::default(), || Ok(()));
    let report = r.unwrap_or_else(|e| panic!("{e}"));
    dest.unwrap().wait_complete().unwrap();
    assert!(
        report.ready_reason.starts_with("predicted downtime ")
            && report.ready_reason.ends_with("fits the 100 ms budget"),
        "{}",
        report.ready_reason
    );
    assert_eq!(report.devices[0].ready_reason, report.ready_reason);
    assert!(report.bandwidth_bytes_per_sec > 0.0);
    assert_eq!(report.max_downtime_millis, 100.0);
    assert!(report.predicted_downtime_millis.is_some());
    let json = report.to_json();
    for key in [
        "bandwidthBytesPerSec",
        "dirtyRateBytesPerSec",
        "predictedDowntimeMillis",
        "downtimeMillis",
        "throttlePercent",
        "readyReason",
    ] {
        assert!(json.contains(key), "{key} missing from {json}");
    }
}
