//! Migration wire frames as a peer sends them: every frame of the input is
//! read the way the destination reads its stream (zero-copy BlockData headers
//! included), device announcements build a device table, and block ids, runs
//! and (compressed) block data are checked against it.
#![no_main]

use std::io::{Cursor, Read};

use drafter_storage::protocol::{self, DeviceTable, Incoming, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = Cursor::new(data);
    let mut table = DeviceTable::default();
    let mut scratch = Vec::new();
    let mut buf = Vec::new();
    for _ in 0..64 {
        let msg = match protocol::read_frame_or_block(&mut r, std::mem::take(&mut buf)) {
            Ok(Incoming::Message(m)) => m,
            Ok(Incoming::Block { device, index, len }) => {
                let mut block = Vec::new();
                if (&mut r).take(len as u64).read_to_end(&mut block).is_err() {
                    return;
                }
                if let Ok(want) = table.block_len(device, index) {
                    let _ = protocol::block_bytes(device, index, false, &block, want, &mut scratch);
                }
                continue;
            }
            Err(_) => return,
        };
        // Whatever decodes must encode back to a frame that decodes equal
        // (an Error's text is decoded lossily and truncated when re-encoded).
        let again = protocol::read_frame(&mut Cursor::new(msg.to_frame()));
        match (&msg, &again) {
            (Message::Error { .. }, Ok(Message::Error { .. })) => {}
            (m, Ok(back)) if back == m => {}
            _ => panic!("{msg:?} re-read as {again:?}"),
        }
        match msg {
            Message::DeviceInfo(info) => {
                let _ = info.blocks();
                let _ = table.push(info);
            }
            Message::BlockData {
                device,
                index,
                compressed,
                data,
            } => {
                if let Ok(want) = table.block_len(device, index) {
                    let _ =
                        protocol::block_bytes(device, index, compressed, &data, want, &mut scratch);
                }
                buf = data.into_buffer();
            }
            Message::ZeroBlocks {
                device,
                start,
                count,
            }
            | Message::AlreadyHave {
                device,
                start,
                count,
            } => {
                let _ = table.check_run(device, start, count);
            }
            Message::NeedBlock { device, index } => {
                let _ = table.check_block(device, index);
            }
            Message::Dirty { device, blocks } => {
                for b in blocks {
                    let _ = table.check_block(device, b);
                }
            }
            Message::BaseHashes {
                device,
                start,
                hashes,
            }
            | Message::VerifyHashes {
                device,
                start,
                hashes,
            } => {
                let _ = table.check_run(device, start, hashes.len() as u64);
            }
            _ => {}
        }
    }
});
