//! CPU templates on the host's /dev/kvm with a flat-program guest: a template
//! this host's KVM can give boots with the template's CPUID (and its snapshot
//! restores); one it cannot is refused at boot naming what is missing; a
//! snapshot whose CPUID is not its recorded template's is refused on restore.

use std::path::{Path, PathBuf};

use drafter_vmm::persist::{read_state_file, write_state_file};
use drafter_vmm::{BuildOptions, CpuTemplate, Error, RestoreMemory, Snapshot, VmConfig, Vmm};
use kvm_bindings::{kvm_cpuid_entry2, KVM_MAX_CPUID_ENTRIES};

mod counting_guest;
use counting_guest::{console, snapshot_counting_vm, COUNT};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-cpu-template-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
    d
}

fn config(template: CpuTemplate) -> VmConfig {
    let mut config = VmConfig::new("/nonexistent-flat-program");
    config.memory_mib = 32;
    config.cpu_template = template;
    config
}

fn host_cpuid() -> Vec<kvm_cpuid_entry2> {
    let kvm = kvm_ioctls::Kvm::new().unwrap_or_else(|e| panic!("/dev/kvm: {e}"));
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .unwrap_or_else(|e| panic!("GET_SUPPORTED_CPUID: {e}"))
        .as_slice()
        .to_vec()
}

fn reg(set: &[kvm_cpuid_entry2], leaf: u32, sub: u32, reg: usize) -> u32 {
    set.iter()
        .find(|e| e.function == leaf && e.index == sub)
        .map_or(0, |e| [e.eax, e.ebx, e.ecx, e.edx][reg])
}

fn has(set: &[kvm_cpuid_entry2], leaf: u32, sub: u32, r: usize, bit: u32) -> bool {
    reg(set, leaf, sub, r) & (1 << bit) != 0
}

/// (leaf, subleaf, register, bit, name) of features the checks below look at.
const SSE3: (u32, u32, usize, u32, &str) = (0x1, 0, 2, 0, "SSE3");
const SSE4_2: (u32, u32, usize, u32, &str) = (0x1, 0, 2, 20, "SSE4_2");
const AVX: (u32, u32, usize, u32, &str) = (0x1, 0, 2, 28, "AVX");
const AVX2: (u32, u32, usize, u32, &str) = (0x7, 0, 1, 5, "AVX2");
const AVX512F: (u32, u32, usize, u32, &str) = (0x7, 0, 1, 16, "AVX512F");
const RTM: (u32, u32, usize, u32, &str) = (0x7, 0, 1, 11, "RTM");
const PKU: (u32, u32, usize, u32, &str) = (0x7, 0, 2, 3, "PKU");

fn f(set: &[kvm_cpuid_entry2], feature: (u32, u32, usize, u32, &str)) -> bool {
    has(set, feature.0, feature.1, feature.2, feature.3)
}

/// Boots with `template`: on success returns the snapshot's vCPU CPUID and
/// checks that the snapshot restores; on refusal checks the error names the
/// features `needed` that the host lacks, and returns `None`.
fn boot(
    dir: &Path,
    template: CpuTemplate,
    needed: &[(u32, u32, usize, u32, &str)],
) -> Option<Vec<kvm_cpuid_entry2>> {
    let host = host_cpuid();
    let lacking: Vec<&str> = needed
        .iter()
        .filter(|&&n| !f(&host, n))
        .map(|n| n.4)
        .collect();
    if !lacking.is_empty() {
        let (out, _rx) = console();
        let res = Vmm::boot(
            config(template),
            BuildOptions {
                console: Some(out),
                flat_program: Some(COUNT.to_vec()),
                ..Default::default()
            },
        );
        let e = match res {
            Ok(mut vmm) => {
                vmm.stop();
                panic!("{template} booted on a host without {lacking:?}");
            }
            Err(e) => e,
        };
        assert!(matches!(e, Error::CpuTemplate(_)), "{e:?}");
        let msg = e.to_string();
        eprintln!("{template} refused: {msg}");
        assert!(
            msg.contains(&format!("CPU template {template} needs")),
            "{msg}"
        );
        for name in lacking {
            assert!(msg.contains(name), "{name}: {msg}");
        }
        return None;
    }
    let (state, mem) = snapshot_counting_vm(config(template), dir);
    let snap: Snapshot = read_state_file(&state).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(snap.config.cpu_template, template);
    let (out, _rx) = console();
    let mut vmm = Vmm::restore(&state, RestoreMemory::Private(mem), Some(out))
        .unwrap_or_else(|e| panic!("restore with {template}: {e}"));
    vmm.stop();
    Some(snap.vcpus[0].cpuid.clone())
}

#[test]
fn v2_boots_without_avx_or_is_refused_naming_what_the_host_lacks() {
    let dir = tmpdir("v2");
    if let Some(guest) = boot(&dir, CpuTemplate::X86_64V2, &[SSE3, SSE4_2]) {
        assert!(f(&guest, SSE3) && f(&guest, SSE4_2));
        for masked in [AVX, AVX2, AVX512F, RTM, PKU] {
            assert!(!f(&guest, masked), "{} given", masked.4);
        }
        assert_eq!(reg(&guest, 0xd, 0, 0) & !0x3, 0, "XSAVE state beyond SSE");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn v3_boots_with_avx2_and_without_avx512_or_is_refused_naming_what_the_host_lacks() {
    let dir = tmpdir("v3");
    if let Some(guest) = boot(&dir, CpuTemplate::X86_64V3, &[SSE3, AVX, AVX2]) {
        assert!(f(&guest, AVX) && f(&guest, AVX2));
        for masked in [AVX512F, RTM, PKU] {
            assert!(!f(&guest, masked), "{} given", masked.4);
        }
        assert_eq!(reg(&guest, 0xd, 0, 0), 0x7, "XSAVE state: x87, SSE, AVX");
        assert_eq!(reg(&guest, 0xd, 0, 2), 832, "XSAVE size for x87+SSE+AVX");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_snapshot_whose_cpuid_is_not_its_recorded_template_is_refused() {
    let dir = tmpdir("mismatch");
    let (state, mem) = snapshot_counting_vm(config(CpuTemplate::None), &dir);
    let mut snap: Snapshot = read_state_file(&state).unwrap_or_else(|e| panic!("{e}"));
    // The host's whole CPUID is never exactly a template's: refused either
    // because this host cannot give the template or because the saved CPUID
    // has features outside it.
    snap.config.cpu_template = CpuTemplate::X86_64V2;
    write_state_file(&state, &snap).unwrap_or_else(|e| panic!("{e}"));
    let (out, _rx) = console();
    match Vmm::restore(&state, RestoreMemory::Private(mem), Some(out)) {
        Ok(mut vmm) => {
            vmm.stop();
            panic!("a host-CPUID snapshot restored as X86_64_V2");
        }
        Err(e) => {
            eprintln!("refused: {e}");
            assert!(matches!(e, Error::CpuTemplate(_)), "{e:?}");
            let msg = e.to_string();
            assert!(msg.contains("CPU template X86_64_V2"), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
