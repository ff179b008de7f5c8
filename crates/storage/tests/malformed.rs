//! Malformed input from either peer ends the connection with an error, never
//! a panic or an attacker-sized allocation: random garbage, truncated frames,
//! oversized lengths, unknown types, out-of-range indices, bad block data.

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use drafter_storage::auth::{handshake, Role};
use drafter_storage::protocol::{read_frame, DeviceInfo, Event, Message, Payload, VERSION};
use drafter_storage::{MigrationConfig, MigrationDestination, Secret};
use proptest::prelude::*;

const BLOCKS: u64 = 64;

fn cfg() -> MigrationConfig {
    MigrationConfig {
        handshake_timeout: Duration::from_secs(5),
        ..MigrationConfig::default()
    }
}

/// A malicious frame (or byte string) sent after a valid start.
#[derive(Debug, Clone)]
enum Bad {
    Garbage(Vec<u8>),
    Oversized {
        ty: u8,
        len: u32,
    },
    UnknownType(u8),
    Truncated {
        frame: usize,
        keep: usize,
    },
    BlockIndex(u64),
    BlockLength(usize),
    ZeroRun {
        start: u64,
        count: u64,
    },
    DirtyIndex(u64),
    DeviceId(u32),
    CompressedGarbage(Vec<u8>),
    Bomb,
    AlreadyHaveWithoutBase,
    AllSentBeforeAuthority,
    DoubleAuthority,
    /// Commit without the destination's ReadyToRun.
    CommitUnasked,
    DeviceInfoAgain,
}

fn bad() -> impl Strategy<Value = Bad> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 1..512).prop_map(Bad::Garbage),
        (1u8..17, 0x0200_0000u32..=u32::MAX).prop_map(|(ty, len)| Bad::Oversized { ty, len }),
        (17u8..=255).prop_map(Bad::UnknownType),
        (0usize..4, 0usize..64).prop_map(|(frame, keep)| Bad::Truncated { frame, keep }),
        (BLOCKS..u64::MAX).prop_map(Bad::BlockIndex),
        prop_oneof![1usize..4096, 4097usize..70_000].prop_map(Bad::BlockLength),
        (0u64..u64::MAX, 1u64..u64::MAX)
            .prop_filter("past the end", |(s, c)| s
                .checked_add(*c)
                .is_none_or(|e| e > BLOCKS))
            .prop_map(|(start, count)| Bad::ZeroRun { start, count }),
        (BLOCKS..u64::MAX).prop_map(Bad::DirtyIndex),
        (1u32..u32::MAX).prop_map(Bad::DeviceId),
        prop::collection::vec(any::<u8>(), 1..256).prop_map(Bad::CompressedGarbage),
        Just(Bad::Bomb),
        Just(Bad::AlreadyHaveWithoutBase),
        Just(Bad::AllSentBeforeAuthority),
        Just(Bad::DoubleAuthority),
        Just(Bad::CommitUnasked),
        Just(Bad::DeviceInfoAgain),
    ]
}

fn block(device: u32, index: u64, len: usize) -> Vec<u8> {
    Message::BlockData {
        device,
        index,
        compressed: false,
        data: Payload::new(vec![1; len]),
    }
    .to_frame()
}

fn compressed(data: Vec<u8>) -> Vec<u8> {
    Message::BlockData {
        device: 0,
        index: 1,
        compressed: true,
        data: Payload::new(data),
    }
    .to_frame()
}

fn bad_bytes(b: &Bad) -> Vec<u8> {
    match b {
        Bad::Garbage(g) => g.clone(),
        Bad::Oversized { ty, len } => {
            let mut v = vec![*ty];
            v.extend_from_slice(&len.to_le_bytes());
            v
        }
        Bad::UnknownType(t) => vec![*t, 0, 0, 0, 0],
        Bad::Truncated { frame, keep } => {
            let f = match frame {
                0 => block(0, 1, 4096),
                1 => Message::Dirty {
                    device: 0,
                    blocks: vec![1, 2, 3],
                }
                .to_frame(),
                2 => Message::ZeroBlocks {
                    device: 0,
                    start: 0,
                    count: 3,
                }
                .to_frame(),
                _ => Message::Event(Event::HandoverOffered).to_frame(),
            };
            f[..(*keep).min(f.len() - 1)].to_vec()
        }
        Bad::BlockIndex(i) => block(0, *i, 4096),
        Bad::BlockLength(n) => block(0, 2, *n),
        Bad::ZeroRun { start, count } => Message::ZeroBlocks {
            device: 0,
            start: *start,
            count: *count,
        }
        .to_frame(),
        Bad::DirtyIndex(i) => Message::Dirty {
            device: 0,
            blocks: vec![0, *i],
        }
        .to_frame(),
        Bad::DeviceId(d) => block(*d, 0, 4096),
        Bad::CompressedGarbage(g) => compressed(g.clone()),
        Bad::Bomb => compressed(zstd::bulk::compress(&vec![0u8; 1 << 20], 3).unwrap()),
        Bad::AlreadyHaveWithoutBase => Message::AlreadyHave {
            device: 0,
            start: 0,
            count: 1,
        }
        .to_frame(),
        Bad::AllSentBeforeAuthority => Message::Event(Event::AllSent).to_frame(),
        Bad::DoubleAuthority => {
            let mut v = Message::Event(Event::HandoverOffered).to_frame();
            v.extend(Message::Event(Event::HandoverOffered).to_frame());
            v
        }
        Bad::CommitUnasked => Message::Event(Event::Commit).to_frame(),
        Bad::DeviceInfoAgain => Message::DeviceInfo(DeviceInfo {
            id: 1,
            name: "x".into(),
            size: 4096,
            block_size: 4096,
        })
        .to_frame(),
    }
}

/// Plays a malicious source against a real destination.
fn attack_destination(b: &Bad, valid_before: u64) -> Result<(), String> {
    let (mut peer, sock) = UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || -> Result<(), String> {
        let s = MigrationDestination::accept(sock, &cfg(), memory_factory)
            .map_err(|e| e.to_string())?;
        s.wait_complete().map(|_| ()).map_err(|e| e.to_string())
    });
    handshake(&mut peer, Role::Source, &Secret::default()).unwrap();
    let info = DeviceInfo {
        id: 0,
        name: "d".into(),
        size: BLOCKS * 4096,
        block_size: 4096,
    };
    peer.write_all(&Message::DeviceInfo(info).to_frame())
        .unwrap();
    peer.write_all(&Message::DevicesListed { count: 1 }.to_frame())
        .unwrap();
    let ack = read_frame(&mut peer).unwrap();
    assert_eq!(
        ack,
        Message::DeviceAck {
            device: 0,
            has_base: false
        }
    );
    for i in 0..valid_before {
        peer.write_all(&block(0, i % BLOCKS, 4096)).unwrap();
    }
    // The destination may already have hung up; that is fine.
    let _ = peer.write_all(&bad_bytes(b));
    let _ = peer.shutdown(Shutdown::Write);
    let r = dest
        .join()
        .map_err(|_| "destination panicked".to_string())?;
    match r {
        Ok(()) => Err("destination accepted a malicious stream".into()),
        Err(e) => {
            // It reports an error to the peer before closing, except when the
            // stream simply ended.
            let mut got_error_frame = false;
            while let Ok(m) = read_frame(&mut peer) {
                got_error_frame |= matches!(m, Message::Error { .. });
            }
            if !got_error_frame && !e.contains("closed") && !e.contains("truncated") {
                return Err(format!("no Error frame sent for: {e}"));
            }
            Ok(())
        }
    }
}

/// Plays a malicious destination against a real source.
fn attack_source(bytes: &[u8], after_list: bool) -> Result<(), String> {
    let dev = seeded_device(BLOCKS, 4096, 5);
    let src = source_of(&[dev], cfg());
    let (sock, mut peer) = UnixStream::pair().unwrap();
    let bytes = bytes.to_vec();
    let p = std::thread::spawn(move || {
        if handshake(&mut peer, Role::Destination, &Secret::default()).is_err() {
            return;
        }
        if after_list {
            while let Ok(m) = read_frame(&mut peer) {
                if matches!(m, Message::DevicesListed { .. }) {
                    break;
                }
            }
        }
        let _ = peer.write_all(&bytes);
        let _ = peer.shutdown(Shutdown::Write);
        while read_frame(&mut peer).is_ok() {}
    });
    let r = src.migrate(sock, || Ok(()));
    p.join().map_err(|_| "peer panicked".to_string())?;
    match r {
        Ok(_) => Err("source completed against a malicious destination".into()),
        Err(e) if e.source_keeps_authority() => Ok(()),
        Err(e) => Err(format!("authority moved: {e}")),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn destination_rejects_malicious_frames(b in bad(), valid in 0u64..8) {
        let r = attack_destination(&b, valid);
        prop_assert!(r.is_ok(), "{:?}: {:?}", b, r);
    }

    #[test]
    fn destination_rejects_garbage_instead_of_a_handshake(g in prop::collection::vec(any::<u8>(), 0..600)) {
        let (mut peer, sock) = UnixStream::pair().unwrap();
        let _ = peer.write_all(&g);
        let _ = peer.shutdown(Shutdown::Write);
        prop_assert!(MigrationDestination::accept(sock, &cfg(), memory_factory).is_err());
    }

    #[test]
    fn source_rejects_malicious_destinations(
        frames in prop::collection::vec(prop_oneof![
            (0u32..3, 0u64..u64::MAX).prop_map(|(device, index)| Message::NeedBlock { device, index: index | BLOCKS }.to_frame()),
            (1u32..9).prop_map(|device| Message::DeviceAck { device, has_base: false }.to_frame()),
            Just(Message::DeviceAck { device: 0, has_base: true }.to_frame()),
            (0u64..u64::MAX).prop_map(|start| Message::BaseHashes { device: 0, start, hashes: vec![[0; 32]; 3] }.to_frame()),
            Just(Message::Event(Event::Completed).to_frame()),
            Just(Message::Event(Event::Running).to_frame()),
            Just(Message::Event(Event::ReadyToRun).to_frame()),
            Just(Message::Hello { version: VERSION, nonce: [1; 32] }.to_frame()),
            prop::collection::vec(any::<u8>(), 1..64),
        ], 1..4),
        after_list in any::<bool>(),
    ) {
        let bytes: Vec<u8> = frames.concat();
        let r = attack_source(&bytes, after_list);
        prop_assert!(r.is_ok(), "{:?}", r);
    }

    #[test]
    fn decoding_any_payload_never_panics_and_valid_ones_round_trip(ty in any::<u8>(), payload in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(m) = Message::decode(ty, payload) {
            let f = m.to_frame();
            prop_assert_eq!(read_frame(&mut &f[..]).unwrap(), m);
        }
    }
}

#[test]
fn wrong_protocol_version_is_refused_by_the_destination() {
    let (mut peer, sock) = UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || {
        MigrationDestination::accept(sock, &cfg(), memory_factory).map(|_| ())
    });
    peer.write_all(
        &Message::Hello {
            version: VERSION + 1,
            nonce: [3; 32],
        }
        .to_frame(),
    )
    .unwrap();
    let err = dest.join().unwrap().expect_err("refused");
    assert!(err.to_string().contains("version"), "{err}");
}
