//! The VM state a snapshot file or a migration source hands over. The first
//! input byte picks the layer the rest enters at:
//! 0: the migrated "state" device (`StateFrame`), whose payload is then read
//!    as a state file, as the destination peer does;
//! 1: a state file (`state.bin` of a package);
//! 2+: the bincode payload alone, given a valid state-file header and
//!    checksum here, so mutations reach the decoder behind the checksum.
#![no_main]

use std::path::Path;

use drafter::migration::StateFrame;
use drafter_vmm::persist::{self, FORMAT_VERSION, MAGIC};
use drafter_vmm::Snapshot;
use libfuzzer_sys::fuzz_target;

fn decode(bytes: &[u8]) {
    let _ = persist::decode::<Snapshot>(Path::new("state.bin"), bytes);
}

fuzz_target!(|data: &[u8]| {
    let Some((&layer, rest)) = data.split_first() else {
        return;
    };
    match layer {
        0 => {
            if let Ok(frame) = StateFrame::decode(rest) {
                let _ = frame.paused();
                decode(&frame.state);
            }
        }
        1 => decode(rest),
        _ => {
            let mut file = Vec::with_capacity(52 + rest.len());
            file.extend_from_slice(&MAGIC);
            file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            file.extend_from_slice(&(rest.len() as u64).to_le_bytes());
            file.extend_from_slice(blake3::hash(rest).as_bytes());
            file.extend_from_slice(rest);
            decode(&file);
        }
    }
});
