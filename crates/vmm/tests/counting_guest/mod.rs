//! A tiny hand-assembled long-mode guest that prints `R` on COM1 and then
//! counts in memory forever, with helpers to watch its counter. Shared by the
//! VMM's host tests and the migration host tests (`#[path]`-included).

#![allow(dead_code)]

use std::io::Write;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

use drafter_vmm::Vmm;
use vm_memory::{Bytes, GuestAddress};

/// Guest-physical address of the counter.
pub const COUNTER: u64 = 0x20_0000;

/// `out 0x3f8, 'R'`, then `loop { inc qword [0x200000] }`.
pub const COUNT: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'R', // mov al, 'R'
    0xee, // out dx, al
    0x48, 0xc7, 0xc7, 0x00, 0x00, 0x20, 0x00, // mov rdi, 0x200000
    0x48, 0xff, 0x07, // inc qword [rdi]
    0xeb, 0xfb, // jmp -5
];

/// A console that forwards every byte to a channel.
pub struct ChanWriter(pub Sender<u8>);

impl Write for ChanWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for b in buf {
            let _ = self.0.send(*b);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A console for a VM and the receiving end of its bytes.
pub fn console() -> (Box<dyn Write + Send>, Receiver<u8>) {
    let (tx, rx) = channel();
    (Box::new(ChanWriter(tx)), rx)
}

/// The guest's counter now.
pub fn counter(vmm: &Vmm) -> u64 {
    vmm.guest_memory()
        .read_obj::<u64>(GuestAddress(COUNTER))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Waits (bounded) until the guest's counter passes `past`; returns it.
pub fn wait_counter_past(vmm: &Vmm, past: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = counter(vmm);
        if c > past {
            return c;
        }
        assert!(Instant::now() < deadline, "counter stuck at {c}");
        std::thread::yield_now();
    }
}

/// Boots `config` running [`COUNT`], waits until it has counted past 1000,
/// pauses it and snapshots it into `dir`; returns (state file, memory file).
pub fn snapshot_counting_vm(
    config: drafter_vmm::VmConfig,
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (out, rx) = console();
    let mut vmm = Vmm::boot(
        config,
        drafter_vmm::BuildOptions {
            console: Some(out),
            flat_program: Some(COUNT.to_vec()),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("boot: {e}"));
    let r = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("no serial output: {e}"));
    assert_eq!(r, b'R');
    wait_counter_past(&vmm, 1000);
    vmm.pause().unwrap_or_else(|e| panic!("{e}"));
    let state = dir.join("state");
    let mem = dir.join("mem");
    vmm.snapshot(&state, &mem).unwrap_or_else(|e| panic!("{e}"));
    vmm.stop();
    (state, mem)
}
