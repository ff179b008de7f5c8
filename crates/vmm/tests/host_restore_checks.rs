//! Restore refuses state this host cannot honour, with an error naming what:
//! a saved MSR KVM refuses to write, a CPUID feature the host lacks. Real
//! snapshots of a flat-program VM on the host's /dev/kvm, edited on disk.

use std::path::{Path, PathBuf};

use drafter_vmm::persist::{read_state_file, write_state_file};
use drafter_vmm::{RestoreMemory, Snapshot, VmConfig, Vmm};

mod counting_guest;
use counting_guest::{console, snapshot_counting_vm};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-restore-checks-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
    d
}

/// Snapshots a running two-vCPU counting VM into `dir`; returns (state, memory).
fn snapshot(dir: &Path) -> (PathBuf, PathBuf) {
    let mut config = VmConfig::new("/nonexistent-flat-program");
    config.vcpus = 2;
    config.memory_mib = 32;
    snapshot_counting_vm(config, dir)
}

fn restore_error(state: &Path, mem: &Path) -> String {
    let (out, _rx) = console();
    match Vmm::restore(state, RestoreMemory::Private(mem.to_path_buf()), Some(out)) {
        Ok(mut vmm) => {
            vmm.stop();
            panic!("restore of an edited snapshot succeeded");
        }
        Err(e) => {
            let e = e.to_string();
            eprintln!("restore refused: {e}");
            e
        }
    }
}

#[test]
fn saved_msrs_restore_in_full_and_a_refused_msr_fails_restore_naming_it() {
    let dir = tmpdir("msr");
    let (state, mem) = snapshot(&dir);
    let mut snap: Snapshot = read_state_file(&state).unwrap_or_else(|e| panic!("{e}"));

    // The TSC is saved before anything relative to it.
    for v in &snap.vcpus {
        let pos = |idx| v.msrs.iter().position(|m| m.index == idx);
        assert_eq!(pos(MSR_IA32_TSC), Some(0), "IA32_TSC not saved first");
        if let Some(deadline) = pos(MSR_IA32_TSC_DEADLINE) {
            assert_eq!(deadline, v.msrs.len() - 1, "TSC deadline not saved last");
        }
    }
    // The unedited snapshot restores: every MSR saved can be written back.
    let (out, _rx) = console();
    let mut vmm = Vmm::restore(&state, RestoreMemory::Private(mem.clone()), Some(out))
        .unwrap_or_else(|e| panic!("restore: {e}"));
    vmm.stop();
    drop(vmm);

    // One MSR in the middle of vCPU 1's list becomes one no CPU has.
    let msrs = &mut snap.vcpus[1].msrs;
    assert!(msrs.len() > 4, "only {} MSRs saved", msrs.len());
    let mid = msrs.len() / 2;
    msrs[mid].index = 0xdead_beef;
    let edited = dir.join("edited");
    write_state_file(&edited, &snap).unwrap_or_else(|e| panic!("{e}"));
    let err = restore_error(&edited, &mem);
    assert!(
        err.contains("MSR 0xdeadbeef") && err.contains("vCPU 1"),
        "{err}"
    );
    assert!(err.contains(&format!("{mid} of ")), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_cpuid_feature_the_host_lacks_fails_restore_naming_it() {
    let dir = tmpdir("cpuid");
    let (state, mem) = snapshot(&dir);
    let mut snap: Snapshot = read_state_file(&state).unwrap_or_else(|e| panic!("{e}"));
    // Features one of which this host surely lacks. The guest's CPUID is the
    // host's supported CPUID (these leaves untouched), so a bit clear in the
    // snapshot is one the host does not support.
    // Leaves and registers the check did not always cover come first.
    let candidates: &[(u32, u32, usize, u32, &str)] = &[
        (0xd, 1, 0, 3, "XSAVES"),
        (0x7, 1, 0, 4, "AVX_VNNI"),
        (0x8000_0008, 0, 1, 9, "WBNOINVD"),
        (0x7, 0, 3, 24, "AMX_TILE"),
        (0x7, 0, 1, 16, "AVX512F"),
    ];
    let cpuid = &mut snap.vcpus[0].cpuid;
    let mut chosen = None;
    for &(leaf, sub, reg, bit, name) in candidates {
        let pos = cpuid
            .iter()
            .position(|e| e.function == leaf && e.index == sub);
        let mut e = match pos {
            Some(i) => cpuid[i],
            None => {
                let mut e = cpuid[0];
                e.function = leaf;
                e.index = sub;
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
                e
            }
        };
        let r = match reg {
            0 => &mut e.eax,
            1 => &mut e.ebx,
            2 => &mut e.ecx,
            _ => &mut e.edx,
        };
        if *r & (1 << bit) != 0 {
            continue;
        }
        *r |= 1 << bit;
        match pos {
            Some(i) => cpuid[i] = e,
            None => cpuid.push(e),
        }
        chosen = Some((leaf, sub, bit, name));
        break;
    }
    let Some((leaf, sub, bit, name)) = chosen else {
        panic!("this host has every candidate feature");
    };
    write_state_file(&state, &snap).unwrap_or_else(|e| panic!("{e}"));
    let err = restore_error(&state, &mem);
    let want = format!("CPUID leaf {leaf:#x} subleaf {sub}");
    assert!(err.contains(&want), "{want}: {err}");
    assert!(
        err.contains(&format!("bit {bit} ({name})")),
        "{name}: {err}"
    );
    assert!(err.contains("lacks"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
