//! VM state seeds: a real snapshot of a flat-program VM (one drive, vsock)
//! on this host's /dev/kvm, in the three layers `vmm_state` reads. Without
//! /dev/kvm the seeds already committed are kept.

use drafter::migration::StateFrame;
use drafter_vmm::config::{DriveConfig, VsockConfig};
use drafter_vmm::{BuildOptions, VmConfig, Vmm};

use crate::Corpus;

/// `jmp $`: the guest spins until it is paused.
const SPIN: &[u8] = &[0xeb, 0xfe];

/// Writes the `vmm_state` seeds (first byte: the layer).
pub fn write(c: &Corpus) {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let mut config = VmConfig::new("/nonexistent-flat-program");
    config.vcpus = 2;
    config.memory_mib = 16;
    config.drives.push(DriveConfig {
        name: "disk".into(),
        path: disk,
        read_only: false,
    });
    config.vsock = Some(VsockConfig {
        cid: 3,
        uds_path: dir.path().join("vsock.sock"),
    });
    let options = BuildOptions {
        flat_program: Some(SPIN.to_vec()),
        ..Default::default()
    };
    let mut vmm = match Vmm::boot(config, options) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vmm_state seeds skipped (no VM here: {e})");
            return;
        }
    };
    let state = dir.path().join("state.bin");
    vmm.pause().expect("pause");
    vmm.snapshot_state(&state).expect("snapshot");
    vmm.stop();
    let file = std::fs::read(&state).expect("state file");
    let payload = &file[52..];
    c.put("vmm_state", "state-file", &[&[1u8][..], &file].concat());
    c.put("vmm_state", "payload", &[&[2u8][..], payload].concat());
    let frame = StateFrame {
        paused_at: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
        state: file,
    }
    .encode();
    c.put("vmm_state", "state-frame", &[&[0u8][..], &frame].concat());
}
