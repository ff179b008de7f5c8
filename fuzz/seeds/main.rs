//! Writes the seed corpus (`fuzz/corpus/<target>/`) from the real encoders:
//! frames and a handshake as the storage crate sends them, agent lines as
//! the guest crate writes them, and so on. Run by `cargo xtask fuzz --seeds`;
//! its output is committed.

// The instrumented dependencies need the coverage hooks libFuzzer defines.
extern crate libfuzzer_sys;

mod blueprint_seeds;
mod config_seeds;
mod package_seeds;
mod virtio_seeds;
mod vmm_seeds;

use std::path::{Path, PathBuf};

use drafter_guest::hook::HookReport;
use drafter_guest::protocol::{to_line, Call, ErrorKind, Hello, Reply, Request};
use drafter_storage::protocol::{
    compress_block_frame, DeviceInfo, Event, Message, Payload, VERSION,
};

/// Where seeds of `target` go.
pub struct Corpus {
    root: PathBuf,
}

impl Corpus {
    /// Writes `bytes` as seed `name` of `target`.
    pub fn put(&self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir).expect("create corpus dir");
        std::fs::write(dir.join(name), bytes).expect("write seed");
    }
}

fn frames(msgs: &[Message]) -> Vec<u8> {
    msgs.iter().flat_map(|m| m.to_frame()).collect()
}

fn storage(c: &Corpus) {
    let disk = DeviceInfo {
        id: 0,
        name: "disk".into(),
        size: 3 * 4096 + 100,
        block_size: 4096,
    };
    let memory = DeviceInfo {
        id: 1,
        name: "memory".into(),
        size: 1 << 20,
        block_size: 65536,
    };
    let block = vec![0x5au8; 4096];
    let mut stream = frames(&[
        Message::DeviceInfo(disk.clone()),
        Message::DeviceInfo(memory),
        Message::DevicesListed { count: 2 },
        Message::DeviceAck {
            device: 0,
            has_base: true,
        },
        Message::BaseHashes {
            device: 0,
            start: 0,
            hashes: vec![[7; 32], [8; 32]],
        },
        Message::BlockData {
            device: 0,
            index: 1,
            compressed: false,
            data: Payload::new(block.clone()),
        },
    ]);
    let raw = Message::BlockData {
        device: 0,
        index: 2,
        compressed: false,
        data: Payload::new(block),
    }
    .to_frame();
    stream.extend(compress_block_frame(raw, 3));
    stream.extend(frames(&[
        Message::ZeroBlocks {
            device: 1,
            start: 0,
            count: 4,
        },
        Message::AlreadyHave {
            device: 0,
            start: 0,
            count: 1,
        },
        Message::NeedBlock {
            device: 0,
            index: 3,
        },
        Message::Dirty {
            device: 0,
            blocks: vec![0, 3],
        },
        Message::Keepalive,
        Message::Event(Event::HandoverOffered),
        Message::Event(Event::ReadyToRun),
        Message::Event(Event::Commit),
        Message::Event(Event::Running),
        Message::Event(Event::AllSent),
        Message::VerifyHashes {
            device: 0,
            start: 0,
            hashes: vec![[1; 32]; 4],
        },
        Message::VerifyResult {
            device: 0,
            mismatched: 1,
            sample: vec![2],
        },
        Message::Event(Event::Completed),
    ]));
    c.put("storage_frames", "session", &stream);
    c.put(
        "storage_frames",
        "error",
        &Message::Error {
            message: "device \"disk\": size mismatch".into(),
        }
        .to_frame(),
    );
    let hello = Message::Hello {
        version: VERSION,
        nonce: [0x11; 32],
    }
    .to_frame();
    c.put("storage_frames", "hello", &hello);
    // The handshake target's first byte picks role and secret.
    let proof = Message::AuthProof { mac: [0x22; 32] }.to_frame();
    for mode in 0u8..4 {
        let mut peer = vec![mode];
        peer.extend_from_slice(&hello);
        peer.extend_from_slice(&proof);
        c.put("storage_handshake", &format!("hello-proof-{mode}"), &peer);
    }
    let mut refused = vec![1u8];
    refused.extend_from_slice(
        &Message::Error {
            message: "authentication failed".into(),
        }
        .to_frame(),
    );
    c.put("storage_handshake", "refused", &refused);
}

fn guest(c: &Corpus) {
    // First byte: the line limit (64 + 64 * byte).
    let mut lines = vec![255u8];
    lines.extend(to_line(&Hello::agent()));
    lines.extend(to_line(&Request {
        v: drafter_guest::PROTOCOL_VERSION,
        id: 1,
        call: Call::BeforeSuspend,
        timeout_ms: 30_000,
    }));
    lines.extend(to_line(&Reply::ok(
        1,
        HookReport {
            exit_code: Some(0),
            signal: None,
            timed_out: false,
            stdout: "flushed\n".into(),
            stderr: String::new(),
        },
    )));
    lines.extend(to_line(&Reply::ok(
        2,
        HookReport {
            exit_code: None,
            signal: Some(9),
            timed_out: true,
            stdout: String::new(),
            stderr: "killed".into(),
        },
    )));
    lines.extend(to_line(&Reply::error(
        None,
        ErrorKind::Malformed,
        "not JSON: expected value at line 1 column 1",
    )));
    c.put("guest_rpc", "session", &lines);
    let mut request = vec![0u8];
    request.extend(to_line(&Request {
        v: drafter_guest::PROTOCOL_VERSION,
        id: 7,
        call: Call::AfterResume,
        timeout_ms: 1000,
    }));
    c.put("guest_rpc", "request", &request);
}

fn main() {
    let root = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"));
    let c = Corpus { root };
    storage(&c);
    guest(&c);
    package_seeds::write(&c);
    config_seeds::write(&c);
    vmm_seeds::write(&c);
    virtio_seeds::write(&c);
    blueprint_seeds::write(&c);
    eprintln!("seeds written under {}", c.root.display());
}
