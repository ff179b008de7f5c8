//! Fault injection: the link is cut (or the destination dies) in every phase.
//! Before authority moves, the source keeps it and a retry succeeds; after,
//! the destination holds every write and the source is told not to resume.

mod common;

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use drafter_storage::{
    BlockDevice, Cause, DeviceConfig, MemoryDevice, MigrationConfig, MigrationDestination,
    MigrationSource, Mode, Phase, Progress, SourceDevice, StorageError, TrackedDevice,
};

/// Both ends of a connection, so a test can cut it from outside.
#[derive(Clone)]
struct Cutter {
    ends: Arc<Mutex<Vec<UnixStream>>>,
    cut: Arc<AtomicBool>,
}

impl Cutter {
    fn new(a: &UnixStream, b: &UnixStream) -> Self {
        Cutter {
            ends: Arc::new(Mutex::new(vec![
                a.try_clone().unwrap(),
                b.try_clone().unwrap(),
            ])),
            cut: Arc::new(AtomicBool::new(false)),
        }
    }
    /// Cuts the link: both directions, both ends.
    fn cut_link(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for e in self.ends.lock().unwrap().iter() {
            let _ = e.shutdown(std::net::Shutdown::Both);
        }
    }
    /// The destination dies: its end closes, the source sees EOF/EPIPE.
    fn kill_destination(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let _ = self.ends.lock().unwrap()[1].shutdown(std::net::Shutdown::Both);
    }
    fn was_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum When {
    BeforeDeviceInfo,
    InFullPass,
    InDirtyCycle,
    AfterSuspendBeforeAuthority,
    AfterAuthority,
}

fn device_config() -> DeviceConfig {
    // max_dirty_blocks 0: no cycle counts as quiet, so exactly max_cycles
    // cycles run even without writers.
    DeviceConfig {
        cycle_throttle: Duration::ZERO,
        min_cycles: 1,
        max_cycles: 3,
        max_dirty_blocks: 0,
        ..DeviceConfig::default()
    }
}

struct Outcome {
    source: Result<drafter_storage::MigrationReport, drafter_storage::MigrationError>,
    dest_authority: bool,
    dest_devices: Vec<Arc<drafter_storage::LazyDevice>>,
    dest_complete: Result<drafter_storage::MigrationReport, drafter_storage::MigrationError>,
}

fn migrate_with_fault(
    dev: &Arc<TrackedDevice>,
    mode: Mode,
    when: Option<When>,
    kill: bool,
) -> Outcome {
    let (a, b) = UnixStream::pair().unwrap();
    let cutter = Cutter::new(&a, &b);
    let c = cutter.clone();
    let fire = move || {
        if kill {
            c.kill_destination()
        } else {
            c.cut_link()
        }
    };
    let fire = Arc::new(fire);
    let f2 = fire.clone();
    let observer = Arc::new(move |p: &Progress| {
        let hit = match (when, p) {
            (Some(When::BeforeDeviceInfo), Progress::Phase(Phase::DeviceInfo)) => true,
            (Some(When::InFullPass), Progress::Blocks { done, .. }) => *done >= 128,
            (Some(When::InDirtyCycle), Progress::Cycle { cycle: 1, .. }) => true,
            (Some(When::AfterAuthority), Progress::Phase(Phase::AuthorityAccepted)) => true,
            _ => false,
        };
        if hit {
            f2();
        }
    });
    let src = MigrationSource::new(
        vec![SourceDevice::tracked("disk", dev.clone(), device_config())],
        MigrationConfig {
            mode,
            max_downtime: Duration::ZERO,
            ..MigrationConfig::default()
        },
    )
    .with_observer(observer);
    let dest = std::thread::spawn(move || {
        let s = MigrationDestination::accept(b, &MigrationConfig::default(), memory_factory)?;
        let auth = s.wait_authority().is_ok();
        let devs: Vec<_> = s.devices().iter().map(|(_, d)| d.clone()).collect();
        // Post-authority cut: the destination's own writes keep working.
        Ok::<_, drafter_storage::MigrationError>((auth, devs, s.wait_complete()))
    });
    let dev2 = dev.clone();
    let source = src.migrate(a, || {
        if when == Some(When::AfterSuspendBeforeAuthority) {
            fire();
        }
        if when == Some(When::AfterAuthority) && mode == Mode::PreCopy {
            // The VM's last writes: a final dirty set large enough that the
            // tail is still running when the link is cut.
            for b in 0..dev2.block_count() {
                dev2.write_at(&[0xa5; 4096], b * 4096).unwrap();
            }
        }
        Ok(())
    });
    assert_eq!(
        cutter.was_cut(),
        when.is_some(),
        "fault injected exactly when asked"
    );
    match dest.join().unwrap() {
        Ok((dest_authority, dest_devices, dest_complete)) => Outcome {
            source,
            dest_authority,
            dest_devices,
            dest_complete,
        },
        Err(e) => Outcome {
            source,
            dest_authority: false,
            dest_devices: Vec::new(),
            dest_complete: Err(e),
        },
    }
}

fn check_before_authority(when: When, kill: bool) {
    let dev = seeded_device(1024, 4096, when as u64 + 17);
    let before = read_all(&*dev);
    let out = migrate_with_fault(&dev, Mode::PreCopy, Some(when), kill);
    let err = out.source.expect_err("source must fail");
    assert!(
        err.source_keeps_authority(),
        "{when:?}: source keeps authority ({err})"
    );
    // The failure is seen at the next use of the link: a cut during an idle
    // dirty cycle may only show when the final dirty list is sent.
    let allowed: &[Phase] = match when {
        When::BeforeDeviceInfo => &[Phase::DeviceInfo],
        When::InFullPass => &[Phase::FullPass],
        // (or in the tail, which follows the handover offer: authority
        // stays here until the destination acknowledges Commit).
        When::InDirtyCycle => &[
            Phase::DirtyCycles,
            Phase::Suspend,
            Phase::FinalDirty,
            Phase::Tail,
        ],
        _ => &[Phase::Suspend, Phase::FinalDirty, Phase::Tail],
    };
    assert!(
        allowed.contains(&err.phase),
        "{when:?}: failed in {:?}: {err}",
        err.phase
    );
    assert!(
        !out.dest_authority,
        "{when:?}: destination must not get authority"
    );
    assert!(out.dest_complete.is_err());
    for d in &out.dest_devices {
        assert!(matches!(
            d.write_at(&[1; 4096], 0),
            Err(StorageError::NotAuthoritative)
        ));
    }
    assert!(read_all(&*dev) == before, "{when:?}: source data unchanged");
    // Retry: the caller resumes and migrates again, successfully.
    let again = migrate_with_fault(&dev, Mode::PreCopy, None, false);
    again.source.expect("retry succeeds");
    assert!(again.dest_authority);
    again.dest_complete.expect("retry completes");
    assert!(
        read_all(&*again.dest_devices[0]) == before,
        "{when:?}: retried copy equals source"
    );
}

#[test]
fn link_cut_before_device_info() {
    check_before_authority(When::BeforeDeviceInfo, false);
}

#[test]
fn link_cut_in_full_pass() {
    check_before_authority(When::InFullPass, false);
}

#[test]
fn destination_killed_in_full_pass() {
    check_before_authority(When::InFullPass, true);
}

#[test]
fn link_cut_in_dirty_cycle() {
    check_before_authority(When::InDirtyCycle, false);
}

#[test]
fn destination_killed_in_dirty_cycle() {
    check_before_authority(When::InDirtyCycle, true);
}

#[test]
fn link_cut_after_suspend_before_authority() {
    check_before_authority(When::AfterSuspendBeforeAuthority, false);
}

fn check_after_authority(mode: Mode, kill: bool) {
    let dev = seeded_device(4096, 4096, 99);
    let out = migrate_with_fault(&dev, mode, Some(When::AfterAuthority), kill);
    let err = out.source.expect_err("source must fail: the tail was cut");
    assert!(
        !err.source_keeps_authority(),
        "source must not resume after authority moved ({err})"
    );
    assert!(out.dest_authority, "destination holds authority");
    assert!(out.dest_complete.is_err());
    let lazy = &out.dest_devices[0];
    let final_src = read_all(&*dev);
    assert!(lazy.missing_blocks() > 0, "the cut left blocks behind");
    assert!(
        matches!(
            lazy.wait_all_present(),
            Err(StorageError::Unavailable { .. })
        ),
        "no hang after the cut"
    );
    let mut buf = vec![0u8; 4096];
    let mut stale = 0;
    for b in 0..lazy.block_count() {
        match lazy.read_at(&mut buf, b * 4096) {
            Ok(()) => stale += usize::from(buf[..] != final_src[(b * 4096) as usize..][..4096]),
            Err(StorageError::Unavailable { .. }) => assert!(!lazy.is_present(b)),
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(stale, 0, "present blocks hold the source's final data");
    // Every write on the destination is kept, including to blocks that never arrived.
    for b in 0..lazy.block_count() {
        lazy.write_at(&[b as u8; 4096], b * 4096).unwrap();
    }
    for b in 0..lazy.block_count() {
        lazy.read_at(&mut buf, b * 4096).unwrap();
        assert!(buf.iter().all(|&x| x == b as u8));
    }
    assert_eq!(lazy.missing_blocks(), 0);
}

#[test]
fn link_cut_after_authority_in_pre_copy_tail() {
    check_after_authority(Mode::PreCopy, false);
}

#[test]
fn destination_killed_after_authority_in_post_copy() {
    check_after_authority(Mode::PostCopy, true);
}

#[test]
fn cancel_during_full_pass_keeps_authority_on_the_source() {
    let dev = seeded_device(2048, 4096, 3);
    let cancel_slot: Arc<Mutex<Option<drafter_storage::CancelHandle>>> = Arc::default();
    let slot = cancel_slot.clone();
    let src = MigrationSource::new(
        vec![SourceDevice::tracked("disk", dev.clone(), device_config())],
        MigrationConfig::default(),
    )
    .with_observer(Arc::new(move |p| {
        if matches!(p, Progress::Blocks { done, .. } if *done >= 256) {
            if let Some(c) = &*slot.lock().unwrap() {
                c.cancel();
            }
        }
    }));
    *cancel_slot.lock().unwrap() = Some(src.cancel_handle());
    let (r, dest) = run_pair(&src, MigrationConfig::default(), || {
        panic!("suspend must not be called")
    });
    let err = r.expect_err("cancelled");
    assert!(matches!(err.cause, Cause::Cancelled), "{err}");
    assert!(err.source_keeps_authority());
    if let Ok(d) = dest {
        assert!(d.wait_authority().is_err());
    }
}

#[test]
fn failing_suspend_hook_aborts_before_authority() {
    let dev = Arc::new(TrackedDevice::new(
        Arc::new(MemoryDevice::new(64 * 4096, 4096).unwrap()),
        Duration::from_secs(1),
    ));
    let src = MigrationSource::new(
        vec![SourceDevice::tracked("d", dev, device_config())],
        MigrationConfig::default(),
    );
    let (r, dest) = run_pair(&src, MigrationConfig::default(), || {
        Err("vm would not pause".into())
    });
    let err = r.expect_err("hook failed");
    assert!(
        err.source_keeps_authority() && err.phase == Phase::Suspend,
        "{err}"
    );
    assert!(err.to_string().contains("vm would not pause"));
    assert!(dest.unwrap().wait_authority().is_err());
}
