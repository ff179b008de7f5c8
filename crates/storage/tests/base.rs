//! CoW overlays across restarts, and destinations that already hold a base.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use drafter_storage::{
    BlockDevice, CowOverlay, DestinationDevice, FileDevice, Initial, MigrationConfig,
    MigrationDestination, MigrationSource, SourceDevice, TrackedDevice,
};

const BS: u32 = 4096;
const BLOCKS: u64 = 256;

fn write_base(path: &std::path::Path, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; (BLOCKS * u64::from(BS)) as usize];
    Rng(seed).fill(&mut bytes);
    std::fs::write(path, &bytes).unwrap();
    bytes
}

#[test]
fn migration_into_a_cow_overlay_fetches_only_changed_blocks_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("rootfs.ext4");
    let base_bytes = write_base(&base_path, 77);
    let open_base = || -> Arc<dyn BlockDevice> {
        Arc::new(FileDevice::open_read_only(&base_path, BS).unwrap())
    };

    // Source: an overlay over the base in which the guest changed 10 blocks.
    let src_cow = CowOverlay::open(
        open_base(),
        dir.path().join("src.ov"),
        dir.path().join("src.st"),
        BS,
    )
    .unwrap();
    let src = Arc::new(TrackedDevice::new(
        Arc::new(src_cow),
        Duration::from_secs(1),
    ));
    let changed: Vec<u64> = vec![0, 3, 17, 64, 65, 100, 128, 200, 254, 255];
    for &b in &changed {
        src.write_at(&[b as u8 ^ 0x5a; 4096], b * u64::from(BS))
            .unwrap();
    }
    let expected = read_all(&*src);

    // Destination: its own overlay over the same base.
    let (dov, dst) = (dir.path().join("dst.ov"), dir.path().join("dst.st"));
    let source = MigrationSource::new(
        vec![SourceDevice::tracked(
            "disk",
            src.clone(),
            fast_device_config(),
        )],
        MigrationConfig::default(),
    );
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let (dov2, dst2, base2) = (dov.clone(), dst.clone(), base_path.clone());
    let dest = std::thread::spawn(move || {
        let s = MigrationDestination::accept(b, &MigrationConfig::default(), |info| {
            let base: Arc<dyn BlockDevice> = Arc::new(
                FileDevice::open_read_only(&base2, info.block_size).map_err(|e| e.to_string())?,
            );
            let cow =
                CowOverlay::open(base, &dov2, &dst2, info.block_size).map_err(|e| e.to_string())?;
            Ok(DestinationDevice {
                backing: Arc::new(cow),
                initial: Initial::Base,
            })
        })
        .unwrap();
        let lazy = s.device("disk").unwrap();
        let r = s.wait_complete().unwrap();
        lazy.flush().unwrap();
        (r, read_all(&*lazy))
    });
    let report = source.migrate(a, || Ok(())).unwrap();
    let (dreport, got) = dest.join().unwrap();
    assert!(got == expected);
    assert_eq!(
        report.data_blocks,
        changed.len() as u64,
        "only changed blocks carry data"
    );
    assert_eq!(dreport.data_blocks, changed.len() as u64);
    assert_eq!(report.already_have_blocks, BLOCKS - changed.len() as u64);
    assert!(
        report.bytes_sent < (changed.len() as u64 + 8) * u64::from(BS),
        "sent {}",
        report.bytes_sent
    );

    // Restart: reopen the destination overlay from its files.
    let reopened = CowOverlay::open(open_base(), &dov, &dst, BS).unwrap();
    assert!(
        read_all(&reopened) == expected,
        "overlay reopened with the same contents"
    );
    assert_eq!(reopened.local_blocks(), changed.len() as u64);
    assert!(
        std::fs::read(&base_path).unwrap() == base_bytes,
        "base untouched"
    );
}

#[test]
fn a_destination_with_a_different_base_gets_every_differing_block() {
    let dir = tempfile::tempdir().unwrap();
    let (src_path, dst_path) = (dir.path().join("a"), dir.path().join("b"));
    let src_bytes = write_base(&src_path, 1);
    let mut dst_bytes = src_bytes.clone();
    // The destination's base differs in blocks 5 and 9.
    dst_bytes[5 * 4096] ^= 1;
    dst_bytes[9 * 4096 + 100] ^= 1;
    std::fs::write(&dst_path, &dst_bytes).unwrap();
    let src = Arc::new(FileDevice::open_read_only(&src_path, BS).unwrap());
    let source = MigrationSource::new(
        vec![SourceDevice::fixed("disk", src, fast_device_config())],
        MigrationConfig {
            verify: true,
            ..MigrationConfig::default()
        },
    );
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let dp = dst_path.clone();
    let dest = std::thread::spawn(move || {
        let s = MigrationDestination::accept(b, &MigrationConfig::default(), |_| {
            Ok(DestinationDevice {
                backing: Arc::new(FileDevice::open(&dp, BS).map_err(|e| e.to_string())?),
                initial: Initial::Base,
            })
        })
        .unwrap();
        s.wait_complete().unwrap()
    });
    let report = source.migrate(a, || Ok(())).unwrap();
    dest.join().unwrap();
    assert_eq!(report.data_blocks, 2);
    assert_eq!(report.devices[0].mismatched_blocks, Some(0));
    assert!(std::fs::read(&dst_path).unwrap() == src_bytes);
}
