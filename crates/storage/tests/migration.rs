//! End-to-end migrations over real sockets.

mod common;

use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use common::*;
use drafter_storage::{
    BlockDevice, MigrationConfig, MigrationDestination, MigrationSource, Mode, Phase, Progress,
    SourceDevice,
};

#[test]
fn pre_copy_over_unix_socket_with_live_writers_converges() {
    let devs = vec![seeded_device(128, 4096, 1), seeded_device(64, 8192, 2)];
    let mut writers = Writers::start(&devs, 2, 9);
    let cycles = Arc::new(Mutex::new(0u32));
    let c2 = cycles.clone();
    let src = source_of(
        &devs,
        MigrationConfig {
            max_downtime: std::time::Duration::ZERO,
            ..Default::default()
        },
    )
    .with_observer(Arc::new(move |p| {
        if let Progress::Cycle { .. } = p {
            *c2.lock().unwrap() += 1;
        }
    }));
    let (r, dest) = run_pair(&src, MigrationConfig::default(), || {
        writers.stop();
        Ok(())
    });
    let report = r.unwrap();
    let dest = dest.unwrap();
    dest.wait_authority().unwrap();
    let lazies: Vec<_> = dest.devices().iter().map(|(_, d)| d.clone()).collect();
    let dreport = dest.wait_complete().unwrap();
    for (s, d) in devs.iter().zip(&lazies) {
        assert_eq!(d.missing_blocks(), 0);
        assert!(
            read_all(&**s) == read_all(&**d),
            "destination differs from source"
        );
    }
    assert!(*cycles.lock().unwrap() >= 2, "dirty cycles ran");
    assert_eq!(report.devices.len(), 2);
    assert!(report
        .devices
        .iter()
        .all(|d| d.cycles >= 1 && !d.ready_reason.is_empty()));
    assert!(report.zero_blocks > 0 && report.data_blocks > 0);
    assert_eq!(dreport.role, "destination");
    let json = report.to_json();
    assert!(json.contains("\"dirtyPerCycle\""), "{json}");
}

#[test]
fn pure_post_copy_over_tcp_serves_reads_before_the_stream_finishes() {
    // Large enough that the background stream, which goes in index order,
    // cannot reach the last blocks before they are read.
    const BLOCKS: u64 = 16384;
    let dev = seeded_device(BLOCKS, 4096, 5);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let src = MigrationSource::new(
        vec![SourceDevice::fixed(
            "disk",
            dev.clone(),
            fast_device_config(),
        )],
        MigrationConfig {
            mode: Mode::PostCopy,
            verify: true,
            ..Default::default()
        },
    );
    let server = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        src.migrate(sock, || Ok(()))
    });
    let sock = TcpStream::connect(addr).unwrap();
    let session =
        MigrationDestination::accept(sock, &MigrationConfig::default(), memory_factory).unwrap();
    session.wait_authority().unwrap();
    let lazy = session.device("disk").unwrap();
    // Read the last blocks first: the stream goes in index order, so these
    // are fetched on demand.
    let mut b = vec![0u8; 4096];
    let mut want = vec![0u8; 4096];
    for idx in (BLOCKS - 56..BLOCKS).rev() {
        lazy.read_at(&mut b, idx * 4096).unwrap();
        dev.read_at(&mut want, idx * 4096).unwrap();
        assert_eq!(b, want, "block {idx}");
    }
    // Local writes win over late stream data.
    lazy.write_at(&[0xee; 4096], (BLOCKS - 1) * 4096).unwrap();
    let report = server.join().unwrap().unwrap();
    let dreport = session.wait_complete().unwrap();
    let mut b = vec![0u8; 4096];
    lazy.read_at(&mut b, (BLOCKS - 1) * 4096).unwrap();
    assert_eq!(b, vec![0xee; 4096]);
    let mut expect = read_all(&*dev);
    expect[(BLOCKS as usize - 1) * 4096..].fill(0xee);
    assert!(read_all(&*lazy) == expect);
    assert_eq!(report.mode, "post-copy");
    assert_eq!(
        report.devices[0].mismatched_blocks,
        Some(0),
        "locally written block is not a mismatch"
    );
    assert!(report.need_block_requests > 0);
    assert!(dreport.need_block_requests > 0);
    assert!(report.phases.iter().any(|p| p.phase == Phase::Tail));
}

#[test]
fn compression_and_verification_report_savings_and_no_mismatch() {
    let mem = Arc::new(drafter_storage::MemoryDevice::new(64 * 4096, 4096).unwrap());
    for b in 0..64u64 {
        let pattern: Vec<u8> = (0..4096)
            .map(|i| ((i / 64) as u8).wrapping_add(b as u8))
            .collect();
        mem.write_at(&pattern, b * 4096).unwrap();
    }
    let src = MigrationSource::new(
        vec![SourceDevice::fixed("m", mem.clone(), fast_device_config())],
        MigrationConfig {
            compression: true,
            verify: true,
            ..Default::default()
        },
    );
    let (r, dest) = run_pair(&src, MigrationConfig::default(), || Ok(()));
    let r = r.unwrap();
    let dest = dest.unwrap();
    let lazy = dest.device("m").unwrap();
    dest.wait_complete().unwrap();
    assert!(read_all(&*mem) == read_all(&*lazy));
    assert!(
        r.compression_saved_bytes > 32 * 4096,
        "saved {}",
        r.compression_saved_bytes
    );
    assert!(r.bytes_sent < 16 * 4096, "sent {}", r.bytes_sent);
    assert_eq!(r.devices[0].mismatched_blocks, Some(0));
}

#[test]
fn full_pass_sends_the_hottest_blocks_last() {
    use drafter_storage::auth::{handshake, Role};
    use drafter_storage::protocol::{read_frame, Event, Message};
    use drafter_storage::Secret;
    use std::io::Write;

    // A long expiry, so a slow machine cannot age the writes out.
    let dev = Arc::new(drafter_storage::TrackedDevice::new(
        Arc::new(drafter_storage::MemoryDevice::new(32 * 4096, 4096).unwrap()),
        std::time::Duration::from_secs(600),
    ));
    // Fill every block with data so each is sent as BlockData.
    for b in 0..32u64 {
        dev.write_at(&[b as u8 + 1; 4096], b * 4096).unwrap();
    }
    // Block 7 is written most, block 3 next; the rest once.
    for _ in 0..20 {
        dev.write_at(&[0xaa; 16], 7 * 4096).unwrap();
    }
    for _ in 0..5 {
        dev.write_at(&[0xbb; 16], 3 * 4096).unwrap();
    }
    let src = source_of(std::slice::from_ref(&dev), MigrationConfig::default());
    let (a, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let p = std::thread::spawn(move || {
        handshake(&mut peer, Role::Destination, &Secret::default()).unwrap();
        let mut order = Vec::new();
        let (mut running, mut all_sent) = (false, false);
        loop {
            if running && all_sent {
                peer.write_all(&Message::Event(Event::Completed).to_frame())
                    .unwrap();
                return order;
            }
            match read_frame(&mut peer).unwrap() {
                Message::DevicesListed { .. } => peer
                    .write_all(
                        &Message::DeviceAck {
                            device: 0,
                            has_base: false,
                        }
                        .to_frame(),
                    )
                    .unwrap(),
                Message::BlockData { index, .. } => order.push(index),
                Message::Event(Event::HandoverOffered) => peer
                    .write_all(&Message::Event(Event::ReadyToRun).to_frame())
                    .unwrap(),
                Message::Event(Event::Commit) => {
                    peer.write_all(&Message::Event(Event::Running).to_frame())
                        .unwrap();
                    running = true;
                }
                Message::Event(Event::AllSent) => all_sent = true,
                _ => {}
            }
        }
    });
    src.migrate(a, || Ok(())).unwrap();
    let order = p.join().unwrap();
    let first_pass = &order[..32];
    assert_eq!(&first_pass[30..], &[3, 7], "hottest last: {first_pass:?}");
    assert_eq!(
        &first_pass[..30],
        &(0..32).filter(|b| *b != 3 && *b != 7).collect::<Vec<_>>()[..]
    );
}

#[test]
fn a_destination_can_wait_for_one_device_while_others_stay_lazy() {
    let mem = seeded_device(512, 4096, 21);
    let disk = seeded_device(64, 4096, 22);
    let src = MigrationSource::new(
        vec![
            SourceDevice::fixed("memory", mem.clone(), fast_device_config()),
            SourceDevice::fixed("disk", disk.clone(), fast_device_config()),
        ],
        MigrationConfig {
            mode: Mode::PostCopy,
            ..Default::default()
        },
    );
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || {
        let s =
            MigrationDestination::accept(b, &MigrationConfig::default(), memory_factory).unwrap();
        s.wait_authority().unwrap();
        let m = s.device("memory").unwrap();
        m.wait_all_present().unwrap();
        assert_eq!(m.missing_blocks(), 0);
        let snapshot = read_all(&*m);
        s.wait_complete().unwrap();
        snapshot
    });
    src.migrate(a, || Ok(())).unwrap();
    assert!(dest.join().unwrap() == read_all(&*mem));
}

#[test]
fn stop_and_copy_tail_sends_the_final_dirty_data_before_authority() {
    let dev = seeded_device(128, 4096, 31);
    let src = MigrationSource::new(
        vec![SourceDevice::tracked(
            "disk",
            dev.clone(),
            fast_device_config(),
        )],
        MigrationConfig {
            final_data_before_authority: true,
            ..Default::default()
        },
    );
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || {
        let s =
            MigrationDestination::accept(b, &MigrationConfig::default(), memory_factory).unwrap();
        s.wait_authority().unwrap();
        let d = s.device("disk").unwrap();
        let missing_at_authority = d.missing_blocks();
        s.wait_complete().unwrap();
        (missing_at_authority, read_all(&*d))
    });
    let dev2 = dev.clone();
    let report = src
        .migrate(a, || {
            // The VM's last writes land after the final cycle.
            for b in (0..128).step_by(3) {
                dev2.write_at(&[0x77; 4096], b * 4096).unwrap();
            }
            Ok(())
        })
        .unwrap();
    let (missing, got) = dest.join().unwrap();
    assert_eq!(report.devices[0].final_dirty, 43);
    assert_eq!(missing, 0, "everything arrived before authority");
    assert!(got == read_all(&*dev));
}

#[test]
fn one_registry_source_serves_several_readers_at_once() {
    let dev = seeded_device(256, 4096, 41);
    let src = Arc::new(MigrationSource::new(
        vec![SourceDevice::fixed(
            "disk",
            dev.clone(),
            fast_device_config(),
        )],
        MigrationConfig {
            mode: Mode::PostCopy,
            ..Default::default()
        },
    ));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = {
        let src = src.clone();
        std::thread::spawn(move || {
            let handles: Vec<_> = (0..3)
                .map(|_| {
                    let (sock, _) = listener.accept().unwrap();
                    let src = src.clone();
                    std::thread::spawn(move || src.migrate(sock, || Ok(())).map(|r| r.data_blocks))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect::<Vec<_>>()
        })
    };
    let readers: Vec<_> = (0..3u64)
        .map(|i| {
            std::thread::spawn(move || {
                let s = MigrationDestination::accept(
                    TcpStream::connect(addr).unwrap(),
                    &MigrationConfig::default(),
                    memory_factory,
                )
                .unwrap();
                s.wait_authority().unwrap();
                let d = s.device("disk").unwrap();
                // Each reader starts reading somewhere else.
                let mut b = vec![0u8; 4096];
                for k in 0..64 {
                    d.read_at(&mut b, ((i * 80 + k * 3) % 256) * 4096).unwrap();
                }
                s.wait_complete().unwrap();
                read_all(&*d)
            })
        })
        .collect();
    let want = read_all(&*dev);
    for r in readers {
        assert!(r.join().unwrap() == want);
    }
    let sent = server.join().unwrap();
    assert_eq!(sent.len(), 3);
}

#[test]
fn what_prepare_writes_travels_before_the_pause() {
    let dev = seeded_device(128, 4096, 32);
    let src = MigrationSource::new(
        vec![SourceDevice::tracked(
            "disk",
            dev.clone(),
            fast_device_config(),
        )],
        MigrationConfig::default(),
    );
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || {
        let s =
            MigrationDestination::accept(b, &MigrationConfig::default(), memory_factory).unwrap();
        let d = s.device("disk").unwrap();
        s.wait_complete().unwrap();
        read_all(&*d)
    });
    let (dev2, dev3) = (dev.clone(), dev.clone());
    let prepared = Arc::new(Mutex::new(false));
    let p2 = prepared.clone();
    let report = src
        .migrate_prepared(
            a,
            Some(Box::new(move || {
                // A before-suspend hook: the guest writes 20 blocks.
                for b in 0..20 {
                    dev2.write_at(&[0x55; 4096], b * 4096).unwrap();
                }
                *p2.lock().unwrap() = true;
            })),
            || {
                assert!(*prepared.lock().unwrap(), "prepare runs before suspend");
                // The pause itself writes one block.
                dev3.write_at(&[0x66; 4096], 100 * 4096).unwrap();
                Ok(())
            },
        )
        .unwrap();
    let got = dest.join().unwrap();
    // Only the block written at the pause is left for the final dirty set:
    // the 20 went out in the cycle after prepare.
    assert_eq!(report.devices[0].final_dirty, 1);
    assert!(got == read_all(&*dev));
}
