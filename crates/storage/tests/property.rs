//! Property: whatever the writers do during a migration, after completion the
//! destination equals the source, and reads on the destination during the
//! post-copy tail always return the source's final data.
//!
//! 1000 cases by default (CI); `DRAFTER_SOAK=1` runs 100000, or set
//! `DRAFTER_SOAK=<cases>`.

mod common;

use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use drafter_storage::{
    BlockDevice, DeviceConfig, MigrationConfig, MigrationDestination, MigrationSource, Mode,
    SourceDevice,
};
use proptest::prelude::*;

fn cases() -> u32 {
    match std::env::var("DRAFTER_SOAK") {
        Ok(v) => v.parse().ok().filter(|&n| n > 1).unwrap_or(100_000),
        Err(_) => 1000,
    }
}

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    blocks: Vec<u64>,
    writers: usize,
    post_copy: bool,
    budget_ms: u64,
    min_cycles: u32,
    max_cycles: u32,
    max_dirty: u64,
    compression: bool,
    tail_reads: u64,
    final_data_first: bool,
}

fn case() -> impl Strategy<Value = Case> {
    let shape = (
        any::<u64>(),
        prop::collection::vec(64u64..=256, 1..=3),
        1usize..=3,
        prop::bool::weighted(0.2),
        prop_oneof![Just(0u64), Just(20)],
    );
    let knobs = (
        0u32..3,
        1u32..6,
        1u64..40,
        prop::bool::weighted(0.2),
        0u64..24,
        prop::bool::weighted(0.25),
    );
    (shape, knobs).prop_map(
        |(
            (seed, blocks, writers, post_copy, budget_ms),
            (min_cycles, max_cycles, max_dirty, compression, tail_reads, final_data_first),
        )| Case {
            seed,
            blocks,
            writers,
            post_copy,
            budget_ms,
            min_cycles,
            max_cycles,
            max_dirty,
            compression,
            tail_reads,
            final_data_first,
        },
    )
}

fn run_case(c: &Case) -> Result<(), TestCaseError> {
    let devs: Vec<_> = c
        .blocks
        .iter()
        .enumerate()
        .map(|(i, &n)| seeded_device(n, 4096, c.seed.wrapping_add(i as u64)))
        .collect();
    let dcfg = DeviceConfig {
        block_size: 4096,
        cycle_throttle: Duration::ZERO,
        min_cycles: c.min_cycles,
        max_cycles: c.max_cycles,
        max_dirty_blocks: c.max_dirty,
        ..DeviceConfig::default()
    };
    let src = MigrationSource::new(
        devs.iter()
            .enumerate()
            .map(|(i, d)| SourceDevice::tracked(format!("d{i}"), d.clone(), dcfg.clone()))
            .collect(),
        MigrationConfig {
            mode: if c.post_copy {
                Mode::PostCopy
            } else {
                Mode::PreCopy
            },
            max_downtime: Duration::from_millis(c.budget_ms),
            compression: c.compression,
            final_data_before_authority: c.final_data_first,
            ..MigrationConfig::default()
        },
    );
    let mut writers = Writers::start(&devs, c.writers, c.seed);
    let (a, b) = UnixStream::pair().unwrap();
    let devs2 = devs.clone();
    let (seed, tail_reads) = (c.seed, c.tail_reads);
    // Destination side: once authority arrives, read random blocks while the
    // tail is still streaming and compare with the (now frozen) source.
    let dest = std::thread::spawn(move || -> Result<(), String> {
        let session = MigrationDestination::accept(b, &MigrationConfig::default(), memory_factory)
            .map_err(|e| e.to_string())?;
        session.wait_authority().map_err(|e| e.to_string())?;
        let lazies: Vec<_> = session.devices().iter().map(|(_, d)| d.clone()).collect();
        let mut rng = Rng(seed ^ 0x5555 | 1);
        let (mut got, mut want) = (vec![0u8; 4096], vec![0u8; 4096]);
        for _ in 0..tail_reads {
            let i = rng.below(lazies.len() as u64) as usize;
            let blk = rng.below(lazies[i].block_count());
            lazies[i]
                .read_at(&mut got, blk * 4096)
                .map_err(|e| e.to_string())?;
            devs2[i]
                .read_at(&mut want, blk * 4096)
                .map_err(|e| e.to_string())?;
            if got != want {
                return Err(format!(
                    "tail read of device {i} block {blk} returned stale data"
                ));
            }
        }
        session.wait_complete().map_err(|e| e.to_string())?;
        for (i, l) in lazies.iter().enumerate() {
            if read_all(&**l) != read_all(&*devs2[i]) {
                return Err(format!("device {i} differs after completion"));
            }
        }
        Ok(())
    });
    let r = src.migrate(a, || {
        writers.stop();
        Ok(())
    });
    writers.stop();
    let d = dest
        .join()
        .map_err(|_| TestCaseError::fail("destination panicked"))?;
    prop_assert!(
        r.is_ok() && d.is_ok(),
        "source: {:?}, destination: {:?}",
        r.err(),
        d.err()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn destination_equals_source_after_migration_with_concurrent_writers(c in case()) {
        run_case(&c)?;
    }
}
