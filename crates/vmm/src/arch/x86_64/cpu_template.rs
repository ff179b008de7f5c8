//! CPU templates: named CPUID feature baselines that make a guest's CPU the
//! same on every host that can offer it, so a snapshot taken on one host
//! resumes on another whose CPU has more (or other) features.
//!
//! A template fixes the feature flags of leaves 0x1 (ECX/EDX), 0x7 (all
//! subleaves), 0xD (XSAVE state components and sizes), 0x8000_0001
//! (ECX/EDX), 0x8000_0008 EBX and 0x8000_0021 EAX: the template's features
//! are required of the host (a host whose KVM lacks one is refused, naming
//! it) and every other flag is cleared. The only host-dependent flags left
//! in those registers are speculation controls (kept when the host has them,
//! so the guest can use its mitigations) and the bits the VMM sets itself
//! (hypervisor, TSC-deadline, HTT) or that mirror guest control registers
//! (OSXSAVE). Vendor, family/model, caches, topology, address widths,
//! invariant TSC (0x8000_0007) and the KVM paravirtual leaf stay the host's
//! (and are still compared on restore, see [`super::cpuid::missing_features`]).

use std::fmt;
use std::str::FromStr;

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

use super::cpuid::{feature_name, find_entry, Reg};

/// A CPUID feature baseline for the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum CpuTemplate {
    /// The host's CPUID as KVM offers it (normalised, nothing masked): a
    /// snapshot resumes only on hosts with at least the same features.
    #[default]
    None,
    /// The x86-64-v2 psABI level (SSE3, SSSE3, SSE4.1, SSE4.2, POPCNT,
    /// CMPXCHG16B, LAHF/SAHF) plus the system features of every Intel
    /// Haswell and AMD Zen host (NX, 1 GiB pages, RDTSCP, x2APIC,
    /// FSGSBASE, SMEP); no AVX and no XSAVE.
    X86_64V2,
    /// [`CpuTemplate::X86_64V2`] plus the x86-64-v3 level: AVX, AVX2,
    /// BMI1, BMI2, FMA, F16C, MOVBE, LZCNT, and XSAVE (with XSAVEOPT) of
    /// the x87, SSE and AVX state only. No AVX-512, AMX, TSX, PKU, LA57.
    X86_64V3,
}

impl CpuTemplate {
    /// Every template, in the order `--help` and errors list them.
    pub const ALL: [CpuTemplate; 3] = [
        CpuTemplate::None,
        CpuTemplate::X86_64V2,
        CpuTemplate::X86_64V3,
    ];

    /// The canonical name (what packages record).
    pub fn name(self) -> &'static str {
        match self {
            CpuTemplate::None => "None",
            CpuTemplate::X86_64V2 => "X86_64_V2",
            CpuTemplate::X86_64V3 => "X86_64_V3",
        }
    }

    /// The valid names, comma-separated (for help texts and errors).
    pub fn names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }

    /// The masks of a named template; `None` has none.
    fn masks(self) -> Option<&'static [Mask]> {
        match self {
            CpuTemplate::None => None,
            CpuTemplate::X86_64V2 => Some(V2),
            CpuTemplate::X86_64V3 => Some(V3),
        }
    }

    /// XSAVE state components (XCR0 bits) the template allows, and whether
    /// they (and XSAVE, XSAVEOPT) are required.
    fn xsave(self) -> (u32, bool) {
        match self {
            CpuTemplate::None => (u32::MAX, false),
            CpuTemplate::X86_64V2 => (XCR0_X87 | XCR0_SSE, false),
            CpuTemplate::X86_64V3 => (XCR0_X87 | XCR0_SSE | XCR0_AVX, true),
        }
    }

    /// Rewrites `entries` (the host's supported CPUID, before per-vCPU
    /// normalisation) to the template's features; fails, naming them, when
    /// the host lacks any feature the template includes. `None` leaves the
    /// entries as they are.
    pub fn apply(self, entries: &mut [kvm_cpuid_entry2]) -> Result<(), CpuTemplateError> {
        let Some(masks) = self.masks() else {
            return Ok(());
        };
        let missing = self.missing_on(entries);
        if !missing.is_empty() {
            return Err(CpuTemplateError::HostLacks {
                template: self,
                missing: missing.join(", "),
            });
        }
        let (xcr0_allowed, _) = self.xsave();
        // Offset + size of every state component, read before any is cleared.
        let components: Vec<(u32, u32)> = entries
            .iter()
            .filter(|e| e.function == 0xd && e.index >= 2 && e.index < 32)
            .map(|e| (e.index, e.ebx.saturating_add(e.eax)))
            .collect();
        for e in entries.iter_mut() {
            let (function, index) = (e.function, e.index);
            for m in masks
                .iter()
                .filter(|m| m.leaf == function && m.subleaf == index)
            {
                let kept = m.reg.get(e) & (m.required | m.passthrough | m.vmm);
                m.reg.set(e, kept);
            }
            match (e.function, e.index) {
                // No subleaf of leaf 7 beyond 0.
                (0x7, 0) => e.eax = 0,
                (0x7, _) => clear(e),
                (0xd, 0) => {
                    e.eax &= xcr0_allowed;
                    e.edx = 0;
                    let end = components
                        .iter()
                        .filter(|&&(i, _)| e.eax & (1 << i) != 0)
                        .map(|&(_, end)| end)
                        .fold(XSAVE_LEGACY_AND_HEADER, u32::max);
                    e.ebx = end;
                    e.ecx = end;
                }
                (0xd, 1) => {
                    e.eax &= if self == CpuTemplate::X86_64V3 {
                        XSAVEOPT
                    } else {
                        0
                    };
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0;
                }
                (0xd, i) if i >= 32 || xcr0_allowed & (1 << i) == 0 => clear(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Features of the template that `host` (KVM's supported CPUID) lacks,
    /// by name where one is known.
    fn missing_on(self, host: &[kvm_cpuid_entry2]) -> Vec<String> {
        let mut missing = Vec::new();
        let mut need = |leaf: u32, subleaf: u32, reg: Reg, bits: u32| {
            let have = find_entry(host, leaf, Some(subleaf)).map_or(0, |e| reg.get(e));
            for bit in (0..32u8).filter(|b| bits & !have & (1 << b) != 0) {
                missing.push(describe(leaf, subleaf, reg, bit));
            }
        };
        for m in self.masks().unwrap_or(&[]) {
            need(m.leaf, m.subleaf, m.reg, m.required);
        }
        let (xcr0, required) = self.xsave();
        if required {
            need(0xd, 0, Reg::Eax, xcr0);
            need(0xd, 1, Reg::Eax, XSAVEOPT);
        }
        missing
    }

    /// Checks that a saved vCPU CPUID is this template's: no feature flag
    /// outside it in the registers the template fixes, and none of the
    /// template's missing. A state file whose CPUID does not match its
    /// recorded template is refused rather than given features it never had
    /// (or taken ones it had).
    pub fn check_saved(self, saved: &[kvm_cpuid_entry2]) -> Result<(), CpuTemplateError> {
        let Some(masks) = self.masks() else {
            return Ok(());
        };
        let mut extra = Vec::new();
        let mut lacking = self.missing_on(saved);
        for e in saved {
            for m in masks
                .iter()
                .filter(|m| m.leaf == e.function && m.subleaf == e.index)
            {
                let outside = m.reg.get(e) & !(m.required | m.passthrough | m.vmm);
                for bit in (0..32u8).filter(|b| outside & (1 << b) != 0) {
                    extra.push(describe(m.leaf, m.subleaf, m.reg, bit));
                }
            }
            match (e.function, e.index) {
                (0xd, 0) => {
                    let outside = e.eax & !self.xsave().0;
                    for bit in (0..32u8).filter(|b| outside & (1 << b) != 0) {
                        extra.push(describe(0xd, 0, Reg::Eax, bit));
                    }
                }
                (0x7, i) if i > 0 && (e.eax | e.ebx | e.ecx | e.edx) != 0 => {
                    extra.push(format!("CPUID leaf 0x7 subleaf {i}"));
                }
                _ => {}
            }
        }
        if extra.is_empty() && lacking.is_empty() {
            return Ok(());
        }
        extra.iter_mut().for_each(|x| x.insert(0, '+'));
        lacking.iter_mut().for_each(|x| x.insert(0, '-'));
        extra.append(&mut lacking);
        Err(CpuTemplateError::SavedMismatch {
            template: self,
            differences: extra.join(", "),
        })
    }
}

fn clear(e: &mut kvm_cpuid_entry2) {
    e.eax = 0;
    e.ebx = 0;
    e.ecx = 0;
    e.edx = 0;
}

fn describe(leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> String {
    match feature_name(leaf, subleaf, reg, bit) {
        Some(name) => name.to_owned(),
        None => format!(
            "CPUID leaf {leaf:#x} subleaf {subleaf} {} bit {bit}",
            reg.name()
        ),
    }
}

impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CpuTemplate {
    type Err = CpuTemplateError;

    /// Case-insensitive; `-` and `_` are the same (`x86-64-v3` is
    /// `X86_64_V3`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let want = s.trim().replace('-', "_");
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(&want))
            .ok_or_else(|| CpuTemplateError::Unknown(s.to_owned()))
    }
}

impl TryFrom<String> for CpuTemplate {
    type Error = CpuTemplateError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<CpuTemplate> for String {
    fn from(t: CpuTemplate) -> String {
        t.name().to_owned()
    }
}

/// A CPU template cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CpuTemplateError {
    /// No template has this name.
    #[error("unknown CPU template {0:?} (valid: {names})", names = CpuTemplate::names())]
    Unknown(String),
    /// The host's KVM does not offer features the template includes.
    #[error(
        "CPU template {template} needs CPU features this host's KVM does not offer: {missing}"
    )]
    HostLacks {
        /// The template.
        template: CpuTemplate,
        /// The missing features, comma-separated.
        missing: String,
    },
    /// A saved vCPU CPUID is not the template's.
    #[error("the saved vCPU CPUID is not that of CPU template {template} (+ extra, - lacking): {differences}")]
    SavedMismatch {
        /// The template the state records.
        template: CpuTemplate,
        /// `+feature` for flags outside the template, `-feature` for ones missing.
        differences: String,
    },
}

/// One feature register a template fixes.
struct Mask {
    leaf: u32,
    subleaf: u32,
    reg: Reg,
    /// The template's features: the host must offer all of them.
    required: u32,
    /// Kept when the host has them (speculation controls).
    passthrough: u32,
    /// Set by the VMM or mirroring guest state; left as they are.
    vmm: u32,
}

const fn mask(
    leaf: u32,
    subleaf: u32,
    reg: Reg,
    required: u32,
    passthrough: u32,
    vmm: u32,
) -> Mask {
    Mask {
        leaf,
        subleaf,
        reg,
        required,
        passthrough,
        vmm,
    }
}

const fn bits(list: &[u8]) -> u32 {
    let mut v = 0;
    let mut i = 0;
    while i < list.len() {
        v |= 1 << list[i];
        i += 1;
    }
    v
}

const XCR0_X87: u32 = 1 << 0;
const XCR0_SSE: u32 = 1 << 1;
const XCR0_AVX: u32 = 1 << 2;
/// Leaf 0xD.1 EAX bit 0.
const XSAVEOPT: u32 = 1;
/// The legacy FXSAVE region and the XSAVE header: where component 2 starts.
const XSAVE_LEGACY_AND_HEADER: u32 = 512 + 64;

/// Leaf 1 EDX: FPU DE PSE TSC MSR PAE MCE CX8 APIC SEP MTRR PGE MCA CMOV PAT
/// PSE36 CLFLUSH MMX FXSR SSE SSE2 (the x86-64 baseline). Not VME: a 64-bit
/// guest has no use for virtual-8086 mode, and KVM does not always offer it
/// (QEMU's TCG `-cpu max` lacks it).
const L1_EDX: u32 = bits(&[
    0, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 19, 23, 24, 25, 26,
]);
/// Leaf 1 EDX bits the VMM sets: HTT.
const L1_EDX_VMM: u32 = bits(&[28]);
/// Leaf 1 ECX (v2): SSE3 SSSE3 CX16 SSE4_1 SSE4_2 X2APIC POPCNT.
const L1_ECX_V2: u32 = bits(&[0, 9, 13, 19, 20, 21, 23]);
/// Leaf 1 ECX (v3 adds): FMA MOVBE XSAVE AVX F16C.
const L1_ECX_V3: u32 = L1_ECX_V2 | bits(&[12, 22, 26, 28, 29]);
/// Leaf 1 ECX bits the VMM sets or that mirror CR4: TSC-deadline, OSXSAVE,
/// hypervisor.
const L1_ECX_VMM: u32 = bits(&[24, 27, 31]);
/// Leaf 7.0 EBX (v2): FSGSBASE SMEP.
const L7_EBX_V2: u32 = bits(&[0, 7]);
/// Leaf 7.0 EBX (v3 adds): BMI1 AVX2 BMI2.
const L7_EBX_V3: u32 = L7_EBX_V2 | bits(&[3, 5, 8]);
/// Leaf 7.0 EDX speculation controls kept from the host: MD_CLEAR SPEC_CTRL
/// STIBP FLUSH_L1D ARCH_CAPABILITIES SSBD.
const L7_EDX_SPEC: u32 = bits(&[10, 26, 27, 28, 29, 31]);
/// Leaf 0x8000_0001 ECX (v2): LAHF_LM.
const E1_ECX_V2: u32 = bits(&[0]);
/// Leaf 0x8000_0001 ECX (v3 adds): LZCNT.
const E1_ECX_V3: u32 = E1_ECX_V2 | bits(&[5]);
/// Leaf 0x8000_0001 EDX: SYSCALL NX PDPE1GB RDTSCP LM.
const E1_EDX: u32 = bits(&[11, 20, 26, 27, 29]);
/// Leaf 0x8000_0008 EBX speculation controls kept from the host: IBPB IBRS
/// STIBP STIBP_ALWAYS_ON SSBD VIRT_SSBD SSB_NO PSFD (CLZERO, RDPRU,
/// WBNOINVD and the like are cleared).
const E8_EBX_SPEC: u32 = bits(&[12, 14, 15, 17, 24, 25, 26, 28]);
/// Leaf 0x8000_0021 EAX speculation controls kept from the host:
/// LFENCE_RDTSC AUTOIBRS.
const E21_EAX_SPEC: u32 = bits(&[2, 8]);

const V2: &[Mask] = &[
    mask(0x1, 0, Reg::Ecx, L1_ECX_V2, 0, L1_ECX_VMM),
    mask(0x1, 0, Reg::Edx, L1_EDX, 0, L1_EDX_VMM),
    mask(0x7, 0, Reg::Ebx, L7_EBX_V2, 0, 0),
    mask(0x7, 0, Reg::Ecx, 0, 0, 0),
    mask(0x7, 0, Reg::Edx, 0, L7_EDX_SPEC, 0),
    mask(0x8000_0001, 0, Reg::Ecx, E1_ECX_V2, 0, 0),
    mask(0x8000_0001, 0, Reg::Edx, E1_EDX, 0, 0),
    mask(0x8000_0008, 0, Reg::Ebx, 0, E8_EBX_SPEC, 0),
    mask(0x8000_0021, 0, Reg::Eax, 0, E21_EAX_SPEC, 0),
];

const V3: &[Mask] = &[
    mask(0x1, 0, Reg::Ecx, L1_ECX_V3, 0, L1_ECX_VMM),
    mask(0x1, 0, Reg::Edx, L1_EDX, 0, L1_EDX_VMM),
    mask(0x7, 0, Reg::Ebx, L7_EBX_V3, 0, 0),
    mask(0x7, 0, Reg::Ecx, 0, 0, 0),
    mask(0x7, 0, Reg::Edx, 0, L7_EDX_SPEC, 0),
    mask(0x8000_0001, 0, Reg::Ecx, E1_ECX_V3, 0, 0),
    mask(0x8000_0001, 0, Reg::Edx, E1_EDX, 0, 0),
    mask(0x8000_0008, 0, Reg::Ebx, 0, E8_EBX_SPEC, 0),
    mask(0x8000_0021, 0, Reg::Eax, 0, E21_EAX_SPEC, 0),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::cpuid::{missing_features, normalize};

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn leaf(set: &mut [kvm_cpuid_entry2], f: u32, i: u32) -> &mut kvm_cpuid_entry2 {
        set.iter_mut()
            .find(|e| e.function == f && e.index == i)
            .unwrap_or_else(|| panic!("no leaf {f:#x}.{i}"))
    }

    fn get(set: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *find_entry(set, f, Some(i)).unwrap_or_else(|| panic!("no leaf {f:#x}.{i}"))
    }

    /// A Sapphire-Rapids-like host: everything of v3 plus AVX-512, AMX,
    /// TSX, PKU, LA57, VAES, SHA, XSAVEC/XSAVES and their state components.
    fn big_host() -> Vec<kvm_cpuid_entry2> {
        let mut e = vec![
            entry(0x1, 0),
            entry(0x7, 0),
            entry(0x7, 1),
            entry(0xd, 0),
            entry(0xd, 1),
            entry(0xd, 2),
            entry(0xd, 5),
            entry(0xd, 6),
            entry(0xd, 7),
            entry(0xd, 9),
            entry(0xd, 17),
            entry(0xd, 18),
            entry(0x8000_0001, 0),
            entry(0x8000_0008, 0),
            entry(0x8000_0021, 0),
        ];
        // Leaf 1: everything but the reserved bit 31 of ECX (the VMM's).
        e[0].ecx = 0x7fff_ffff;
        e[0].edx = 0xffff_fbff;
        e[1].eax = 1;
        e[1].ebx = 0xffff_ffff; // AVX-512*, HLE, RTM, SHA, SGX ...
        e[1].ecx = 0xffff_ffff; // PKU, LA57, VAES, GFNI ...
        e[1].edx = 0xffff_ffff; // AMX, AVX512_FP16, speculation controls ...
        e[2].eax = 0xffff_ffff; // AVX_VNNI, AVX512_BF16 ...
        e[3].eax = 0x0006_02e7; // x87 SSE AVX opmask ZMM_Hi256 Hi16_ZMM PKRU TILECFG TILEDATA
        e[3].ebx = 0x2b00;
        e[3].ecx = 0x2b00;
        e[4].eax = 0x1f; // XSAVEOPT XSAVEC XGETBV1 XSAVES XFD
        e[4].ebx = 0x2b00;
        e[4].ecx = 0x1_9900; // XSS bits
        for (i, size, offset) in [
            (5, 256, 576),
            (6, 64, 1088),
            (7, 512, 1152),
            (8, 1024, 1664),
            (9, 8, 2688),
            (10, 64, 2752),
            (11, 8192, 2816),
        ] {
            e[i].eax = size;
            e[i].ebx = offset;
        }
        e[12].ecx = 0xffff_ffff;
        e[12].edx = 0xffff_ffff;
        e[13].eax = 0x3030;
        e[13].ebx = 0xffff_ffff; // WBNOINVD, RDPRU ... and speculation controls
        e[14].eax = 0xffff_ffff;
        e
    }

    #[test]
    fn names_parse_case_insensitively_and_unknown_ones_list_the_valid() {
        for (typed, want) in [
            ("None", CpuTemplate::None),
            ("none", CpuTemplate::None),
            ("X86_64_V2", CpuTemplate::X86_64V2),
            ("x86-64-v2", CpuTemplate::X86_64V2),
            ("x86_64_V3", CpuTemplate::X86_64V3),
        ] {
            assert_eq!(typed.parse::<CpuTemplate>().ok(), Some(want), "{typed}");
        }
        let e = "T2".parse::<CpuTemplate>().err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("unknown CPU template \"T2\" (valid: None, X86_64_V2, X86_64_V3)")
        );
        // Serialised by name, in JSON and bincode alike.
        let json = serde_json::to_string(&CpuTemplate::X86_64V3).unwrap_or_default();
        assert_eq!(json, "\"X86_64_V3\"");
        let back: Result<CpuTemplate, _> = serde_json::from_str("\"x86-64-v3\"");
        assert_eq!(back.ok(), Some(CpuTemplate::X86_64V3));
        let bad = serde_json::from_str::<CpuTemplate>("\"T2\"").err();
        assert!(bad.is_some_and(|e| e.to_string().contains("valid: None")));
        let bin = bincode::serialize(&CpuTemplate::X86_64V2).unwrap_or_default();
        let back: Option<CpuTemplate> = bincode::deserialize(&bin).ok();
        assert_eq!(back, Some(CpuTemplate::X86_64V2));
    }

    #[test]
    fn v3_keeps_avx2_and_masks_avx512_amx_tsx_pku_la57() {
        let mut set = big_host();
        CpuTemplate::X86_64V3
            .apply(&mut set)
            .unwrap_or_else(|e| panic!("{e}"));
        let l1 = get(&set, 0x1, 0);
        assert_eq!(l1.ecx, L1_ECX_V3 | bits(&[24, 27]), "{:#x}", l1.ecx);
        assert_eq!(l1.edx, L1_EDX | L1_EDX_VMM);
        let l7 = get(&set, 0x7, 0);
        assert_eq!(l7.eax, 0, "no subleaf 1");
        assert_eq!(l7.ebx, bits(&[0, 3, 5, 7, 8]), "{:#x}", l7.ebx);
        assert_eq!(l7.ecx, 0, "no PKU, LA57, VAES...");
        assert_eq!(l7.edx, L7_EDX_SPEC, "speculation controls only");
        let l71 = get(&set, 0x7, 1);
        assert_eq!((l71.eax, l71.ebx, l71.ecx, l71.edx), (0, 0, 0, 0));
        let e1 = get(&set, 0x8000_0001, 0);
        assert_eq!(e1.ecx, bits(&[0, 5]));
        assert_eq!(e1.edx, E1_EDX);
        let e8 = get(&set, 0x8000_0008, 0);
        assert_eq!((e8.eax, e8.ebx), (0x3030, E8_EBX_SPEC), "no WBNOINVD");
        assert_eq!(get(&set, 0x8000_0021, 0).eax, E21_EAX_SPEC);
        // XSAVE: x87, SSE and AVX state only, sizes to match.
        let d0 = get(&set, 0xd, 0);
        assert_eq!((d0.eax, d0.edx), (0x7, 0));
        assert_eq!((d0.ebx, d0.ecx), (576 + 256, 576 + 256));
        let d1 = get(&set, 0xd, 1);
        assert_eq!((d1.eax, d1.ebx, d1.ecx, d1.edx), (XSAVEOPT, 0, 0, 0));
        assert_eq!(get(&set, 0xd, 2).eax, 256, "the AVX component stays");
        for i in [5, 6, 7, 9, 17, 18] {
            let c = get(&set, 0xd, i);
            assert_eq!((c.eax, c.ebx, c.ecx, c.edx), (0, 0, 0, 0), "component {i}");
        }
        // Named: the masked features are not there.
        let names = |f, i, r: Reg, v: u32| -> Vec<&str> {
            (0..32u8)
                .filter(|b| v & (1 << b) != 0)
                .filter_map(|b| feature_name(f, i, r, b))
                .collect()
        };
        let ebx = names(0x7, 0, Reg::Ebx, l7.ebx);
        assert_eq!(ebx, ["FSGSBASE", "BMI1", "AVX2", "SMEP", "BMI2"]);
        // A set made by the template is that template's, after the VMM's
        // per-vCPU normalisation too; and not the other template's.
        normalize(&mut set, 1, 2, true);
        assert!(CpuTemplate::X86_64V3.check_saved(&set).is_ok());
        let e = CpuTemplate::X86_64V2
            .check_saved(&set)
            .err()
            .map(|e| e.to_string());
        let e = e.unwrap_or_default();
        assert!(e.contains("+AVX2") && e.contains("+XCR0 AVX"), "{e}");
    }

    #[test]
    fn v2_masks_avx_and_xsave() {
        let mut set = big_host();
        CpuTemplate::X86_64V2
            .apply(&mut set)
            .unwrap_or_else(|e| panic!("{e}"));
        let l1 = get(&set, 0x1, 0);
        for bit in [12, 22, 26, 28, 29] {
            assert_eq!(l1.ecx & (1 << bit), 0, "leaf 1 ecx bit {bit}");
        }
        assert_eq!(l1.ecx & L1_ECX_V2, L1_ECX_V2);
        assert_eq!(get(&set, 0x7, 0).ebx, bits(&[0, 7]), "no AVX2, BMI");
        assert_eq!(get(&set, 0x8000_0001, 0).ecx, 1, "LAHF_LM only");
        let d0 = get(&set, 0xd, 0);
        assert_eq!((d0.eax, d0.ebx, d0.ecx), (0x3, 576, 576));
        assert_eq!(get(&set, 0xd, 1).eax, 0);
        assert_eq!(get(&set, 0xd, 2).eax, 0);
        assert!(CpuTemplate::X86_64V2.check_saved(&set).is_ok());
        let e = CpuTemplate::X86_64V3
            .check_saved(&set)
            .err()
            .map(|e| e.to_string());
        assert!(e.unwrap_or_default().contains("-AVX2"));
    }

    #[test]
    fn v3_on_a_host_without_avx2_fails_naming_it() {
        let mut set = big_host();
        leaf(&mut set, 0x7, 0).ebx &= !(1 << 5);
        leaf(&mut set, 0x8000_0001, 0).ecx &= !(1 << 5);
        let before = set.clone();
        let e = CpuTemplate::X86_64V3
            .apply(&mut set)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some(
                "CPU template X86_64_V3 needs CPU features this host's KVM does not offer: \
                 AVX2, LZCNT"
            )
        );
        assert_eq!(set, before, "nothing changed on failure");
        // V2 does not need them.
        assert!(CpuTemplate::X86_64V2.apply(&mut set).is_ok());
        // A host without the AVX state component cannot give V3 either.
        let mut set = big_host();
        leaf(&mut set, 0xd, 0).eax &= !XCR0_AVX;
        let e = CpuTemplate::X86_64V3
            .apply(&mut set)
            .err()
            .map(|e| e.to_string());
        assert!(e.unwrap_or_default().ends_with(": XCR0 AVX"));
    }

    #[test]
    fn none_changes_nothing() {
        let mut set = big_host();
        CpuTemplate::None
            .apply(&mut set)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(set, big_host());
        assert!(CpuTemplate::None.check_saved(&set).is_ok());
    }

    #[test]
    fn a_v3_guest_from_a_big_host_resumes_on_a_haswell_like_one_and_avx_alone_is_not_v3() {
        let mut guest = big_host();
        CpuTemplate::X86_64V3
            .apply(&mut guest)
            .unwrap_or_else(|e| panic!("{e}"));
        normalize(&mut guest, 0, 1, true);
        // A Haswell-like host: the v3 features and nothing of AVX-512.
        let mut haswell = big_host();
        leaf(&mut haswell, 0x7, 0).ebx = L7_EBX_V3 | bits(&[4, 11]); // + HLE RTM
        leaf(&mut haswell, 0x7, 0).ecx = 0;
        leaf(&mut haswell, 0xd, 0).eax = 0x7;
        leaf(&mut haswell, 0x7, 1).eax = 0;
        leaf(&mut haswell, 0x8000_0008, 0).ebx = E8_EBX_SPEC; // no WBNOINVD, RDPRU
        leaf(&mut haswell, 0x8000_0021, 0).eax = E21_EAX_SPEC;
        leaf(&mut haswell, 0x1, 0).ecx &= !(1 << 17); // no PCID
        assert!(CpuTemplate::X86_64V3.apply(&mut haswell.clone()).is_ok());
        assert_eq!(missing_features(&guest, &haswell), None);
        // A host with AVX but not AVX2 (Sandy Bridge-like) is refused.
        let mut sandy = haswell.clone();
        leaf(&mut sandy, 0x7, 0).ebx = L7_EBX_V2;
        let e = CpuTemplate::X86_64V3
            .apply(&mut sandy)
            .err()
            .map(|e| e.to_string());
        assert!(e.unwrap_or_default().ends_with(": BMI1, AVX2, BMI2"));
    }
}
