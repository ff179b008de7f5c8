//! Shared helpers for the integration tests: real devices, real sockets.
#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use drafter_storage::{
    BlockDevice, DestinationDevice, DestinationSession, DeviceConfig, Initial, MemoryDevice,
    MigrationConfig, MigrationDestination, MigrationError, MigrationReport, MigrationSource,
    SourceDevice, TrackedDevice,
};

/// Tiny deterministic PRNG (xorshift64*), so tests need no RNG crate.
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// A tracked in-memory device with some random, some zero blocks.
pub fn seeded_device(blocks: u64, bs: u32, seed: u64) -> Arc<TrackedDevice> {
    let mem = Arc::new(MemoryDevice::new(blocks * u64::from(bs), bs).unwrap());
    let mut rng = Rng(seed | 1);
    let mut buf = vec![0u8; bs as usize];
    for b in 0..blocks {
        if rng.below(3) != 0 {
            rng.fill(&mut buf);
            mem.write_at(&buf, b * u64::from(bs)).unwrap();
        }
    }
    Arc::new(TrackedDevice::new(mem, Duration::from_secs(1)))
}

pub fn read_all(d: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

/// Config for fast tests: no throttle.
pub fn fast_device_config() -> DeviceConfig {
    DeviceConfig {
        cycle_throttle: Duration::ZERO,
        min_cycles: 1,
        max_cycles: 4,
        max_dirty_blocks: 8,
        ..DeviceConfig::default()
    }
}

/// Writers that hammer random blocks of the devices until stopped.
pub struct Writers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<u64>>,
}

impl Writers {
    pub fn start(devices: &[Arc<TrackedDevice>], threads: usize, seed: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..threads)
            .map(|t| {
                let devs: Vec<_> = devices.to_vec();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut rng = Rng(seed.wrapping_mul(31).wrapping_add(t as u64 * 7919) | 1);
                    let mut writes = 0;
                    let mut buf = vec![0u8; 1 << 16];
                    while !stop.load(Ordering::SeqCst) {
                        let d = &devs[rng.below(devs.len() as u64) as usize];
                        let size = d.size();
                        let len =
                            1 + rng.below(2 * u64::from(d.block_size())).min(size - 1) as usize;
                        let off = rng.below(size - len as u64 + 1);
                        let buf = &mut buf[..len.min(1 << 16)];
                        if rng.below(4) == 0 {
                            buf.fill(0);
                        } else {
                            rng.fill(buf);
                        }
                        d.write_at(buf, off).unwrap();
                        writes += 1;
                        if writes % 16 == 0 {
                            std::thread::yield_now();
                        }
                    }
                    writes
                })
            })
            .collect();
        Writers { stop, handles }
    }

    /// Stops the writers and waits for them; returns the number of writes.
    pub fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.handles.drain(..).map(|h| h.join().unwrap()).sum()
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A destination that stores every device in fresh memory.
pub fn memory_factory(
    info: &drafter_storage::protocol::DeviceInfo,
) -> Result<DestinationDevice, String> {
    Ok(DestinationDevice {
        backing: Arc::new(
            MemoryDevice::new(info.size, info.block_size).map_err(|e| e.to_string())?,
        ),
        initial: Initial::Zeroed,
    })
}

/// Starts a destination on the other end of `link` in a thread.
pub fn spawn_destination(
    link: UnixStream,
    config: MigrationConfig,
) -> JoinHandle<Result<DestinationSession, MigrationError>> {
    std::thread::spawn(move || MigrationDestination::accept(link, &config, memory_factory))
}

/// Starts a destination that takes authority as soon as the source offers
/// it (what a post-copy reader or a VM resumed at authority does); the
/// session is returned either way.
pub fn spawn_taking_destination(
    link: UnixStream,
    config: MigrationConfig,
) -> JoinHandle<Result<DestinationSession, MigrationError>> {
    std::thread::spawn(move || {
        let s = MigrationDestination::accept(link, &config, memory_factory)?;
        // A failure shows in the session's later calls.
        let _ = s.wait_authority();
        Ok(s)
    })
}

/// Runs a source over a Unix socket pair against a memory destination that
/// takes authority when offered.
pub fn run_pair(
    source: &MigrationSource,
    dest_config: MigrationConfig,
    suspend: impl FnOnce() -> Result<(), String>,
) -> (
    Result<MigrationReport, MigrationError>,
    Result<DestinationSession, MigrationError>,
) {
    let (a, b) = UnixStream::pair().unwrap();
    let dest = spawn_taking_destination(b, dest_config);
    let r = source.migrate(a, suspend);
    (r, dest.join().unwrap())
}

pub fn source_of(devs: &[Arc<TrackedDevice>], config: MigrationConfig) -> MigrationSource {
    MigrationSource::new(
        devs.iter()
            .enumerate()
            .map(|(i, d)| SourceDevice::tracked(format!("dev{i}"), d.clone(), fast_device_config()))
            .collect(),
        config,
    )
}
