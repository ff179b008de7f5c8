//! CPUID normalisation per vCPU (APIC IDs, topology leaves, hypervisor bit) and
//! the feature-compatibility check used when restoring a snapshot.

use kvm_bindings::kvm_cpuid_entry2;

const HYPERVISOR_BIT: u32 = 1 << 31;
const TSC_DEADLINE_BIT: u32 = 1 << 24;
const HTT_BIT: u32 = 1 << 28;
/// Leaf 7.0 ECX: 5-level paging.
const LA57_BIT: u32 = 1 << 16;

fn bits_for(count: u32) -> u32 {
    32 - count.saturating_sub(1).leading_zeros()
}

/// Rewrites `entries` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `index` of
/// `count`: one socket, one thread per core, APIC ID = index.
pub fn normalize(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8, tsc_deadline: bool) {
    let apic_id = u32::from(index);
    let count = u32::from(count.max(1));
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (count << 16);
                e.ecx |= HYPERVISOR_BIT;
                if tsc_deadline {
                    e.ecx |= TSC_DEADLINE_BIT;
                }
                if count > 1 {
                    e.edx |= HTT_BIT;
                } else {
                    e.edx &= !HTT_BIT;
                }
            }
            0x4 => {
                // Cores per package, and how many vCPUs share each cache level.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
            }
            0x6 => {
                // No power management leaves for the guest.
                e.eax = 0;
                e.ecx &= !0x8; // performance-energy bias
            }
            0x7 if e.index == 0 => {
                // 4-level paging only: a guest that turned on 5-level
                // paging can never move to a host without it, and a
                // microVM has no use for 128 PiB of virtual address space.
                // (Nested under QEMU/TCG, a 5-level guest was also seen
                // stuck in KVM's instruction emulation after a migration
                // started: #PF injected at a driver's MMIO access, forever.)
                e.ecx &= !LA57_BIT;
            }
            0xa => {
                // No virtual PMU.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        e.eax = bits_for(count);
                        e.ebx = count;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xff) | (count - 1);
            }
            0x8000_001e => {
                e.eax = apic_id;
                e.ebx &= !0xff00; // one thread per core
            }
            _ => {}
        }
    }
}

/// CPUID feature bits that are not the host's to grant: dynamic bits KVM
/// derives from guest state (OSXSAVE in leaf 1 ECX, OSPKE in leaf 7 ECX).
const OSXSAVE_BIT: u32 = 1 << 27;
const OSPKE_BIT: u32 = 1 << 4;

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Reg {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Reg::Eax => "eax",
            Reg::Ebx => "ebx",
            Reg::Ecx => "ecx",
            Reg::Edx => "edx",
        }
    }

    pub(crate) fn get(self, e: &kvm_cpuid_entry2) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }

    pub(crate) fn set(self, e: &mut kvm_cpuid_entry2, value: u32) {
        match self {
            Reg::Eax => e.eax = value,
            Reg::Ebx => e.ebx = value,
            Reg::Ecx => e.ecx = value,
            Reg::Edx => e.edx = value,
        }
    }
}

/// One CPUID register made only of feature flags (or supported-state masks),
/// compared bit by bit on restore.
struct FeatureReg {
    leaf: u32,
    /// The subleaf, for leaves whose ECX input selects one; `None` for leaves
    /// that ignore ECX.
    subleaf: Option<u32>,
    reg: Reg,
    /// Bits of the register that are not host features: dynamic, or set by
    /// the VMM itself.
    not_features: u32,
}

const fn fr(leaf: u32, subleaf: Option<u32>, reg: Reg, not_features: u32) -> FeatureReg {
    FeatureReg {
        leaf,
        subleaf,
        reg,
        not_features,
    }
}

/// The feature-flag registers compared on restore. Deliberately absent:
/// leaf 1 EAX/EBX (signature, APIC ID, counts), leaf 7.0 EAX (max subleaf),
/// leaf 0xD.0 EBX/ECX and 0xD.1 EBX (XSAVE area sizes), leaves 4, 0xB, 0x1F
/// and 0x8000_001E (topology and caches, rewritten per vCPU), 0x8000_0008
/// EAX/ECX/EDX (address sizes, core count, RDPRU/INVLPGB limits), and every
/// max-leaf value. The hypervisor and TSC-deadline bits of leaf 1 ECX and the
/// HTT bit of leaf 1 EDX are set by [`normalize`]; OSXSAVE and OSPKE mirror
/// guest CR4.
const FEATURE_REGS: &[FeatureReg] = &[
    fr(
        0x1,
        None,
        Reg::Ecx,
        HYPERVISOR_BIT | TSC_DEADLINE_BIT | OSXSAVE_BIT,
    ),
    fr(0x1, None, Reg::Edx, HTT_BIT),
    fr(0x7, Some(0), Reg::Ebx, 0),
    fr(0x7, Some(0), Reg::Ecx, OSPKE_BIT),
    fr(0x7, Some(0), Reg::Edx, 0),
    fr(0x7, Some(1), Reg::Eax, 0),
    fr(0x7, Some(1), Reg::Ebx, 0),
    fr(0x7, Some(1), Reg::Ecx, 0),
    fr(0x7, Some(1), Reg::Edx, 0),
    fr(0x7, Some(2), Reg::Edx, 0),
    // Supported XCR0 bits (low and high halves).
    fr(0xd, Some(0), Reg::Eax, 0),
    fr(0xd, Some(0), Reg::Edx, 0),
    // XSAVE instruction variants, then supported IA32_XSS bits.
    fr(0xd, Some(1), Reg::Eax, 0),
    fr(0xd, Some(1), Reg::Ecx, 0),
    fr(0xd, Some(1), Reg::Edx, 0),
    // KVM paravirtual features (kvmclock, steal time, PV EOI...).
    fr(0x4000_0001, None, Reg::Eax, 0),
    fr(0x8000_0001, None, Reg::Ecx, 0),
    fr(0x8000_0001, None, Reg::Edx, 0),
    // Invariant TSC.
    fr(0x8000_0007, None, Reg::Edx, 0),
    fr(0x8000_0008, None, Reg::Ebx, 0),
    fr(0x8000_0021, None, Reg::Eax, 0),
];

/// Names of common features: (leaf, subleaf, register, bit, name).
const FEATURE_NAMES: &[(u32, u32, Reg, u8, &str)] = &[
    (0x1, 0, Reg::Ecx, 0, "SSE3"),
    (0x1, 0, Reg::Ecx, 1, "PCLMULQDQ"),
    (0x1, 0, Reg::Ecx, 3, "MONITOR"),
    (0x1, 0, Reg::Ecx, 5, "VMX"),
    (0x1, 0, Reg::Ecx, 9, "SSSE3"),
    (0x1, 0, Reg::Ecx, 12, "FMA"),
    (0x1, 0, Reg::Ecx, 13, "CX16"),
    (0x1, 0, Reg::Ecx, 17, "PCID"),
    (0x1, 0, Reg::Ecx, 19, "SSE4_1"),
    (0x1, 0, Reg::Ecx, 20, "SSE4_2"),
    (0x1, 0, Reg::Ecx, 21, "X2APIC"),
    (0x1, 0, Reg::Ecx, 22, "MOVBE"),
    (0x1, 0, Reg::Ecx, 23, "POPCNT"),
    (0x1, 0, Reg::Ecx, 25, "AES"),
    (0x1, 0, Reg::Ecx, 26, "XSAVE"),
    (0x1, 0, Reg::Ecx, 28, "AVX"),
    (0x1, 0, Reg::Ecx, 29, "F16C"),
    (0x1, 0, Reg::Ecx, 30, "RDRAND"),
    (0x1, 0, Reg::Edx, 0, "FPU"),
    (0x1, 0, Reg::Edx, 1, "VME"),
    (0x1, 0, Reg::Edx, 2, "DE"),
    (0x1, 0, Reg::Edx, 3, "PSE"),
    (0x1, 0, Reg::Edx, 4, "TSC"),
    (0x1, 0, Reg::Edx, 5, "MSR"),
    (0x1, 0, Reg::Edx, 6, "PAE"),
    (0x1, 0, Reg::Edx, 7, "MCE"),
    (0x1, 0, Reg::Edx, 8, "CX8"),
    (0x1, 0, Reg::Edx, 9, "APIC"),
    (0x1, 0, Reg::Edx, 11, "SEP"),
    (0x1, 0, Reg::Edx, 12, "MTRR"),
    (0x1, 0, Reg::Edx, 13, "PGE"),
    (0x1, 0, Reg::Edx, 14, "MCA"),
    (0x1, 0, Reg::Edx, 15, "CMOV"),
    (0x1, 0, Reg::Edx, 16, "PAT"),
    (0x1, 0, Reg::Edx, 17, "PSE36"),
    (0x1, 0, Reg::Edx, 19, "CLFLUSH"),
    (0x1, 0, Reg::Edx, 23, "MMX"),
    (0x1, 0, Reg::Edx, 24, "FXSR"),
    (0x1, 0, Reg::Edx, 25, "SSE"),
    (0x1, 0, Reg::Edx, 26, "SSE2"),
    (0x7, 0, Reg::Ebx, 0, "FSGSBASE"),
    (0x7, 0, Reg::Ebx, 2, "SGX"),
    (0x7, 0, Reg::Ebx, 3, "BMI1"),
    (0x7, 0, Reg::Ebx, 4, "HLE"),
    (0x7, 0, Reg::Ebx, 5, "AVX2"),
    (0x7, 0, Reg::Ebx, 7, "SMEP"),
    (0x7, 0, Reg::Ebx, 8, "BMI2"),
    (0x7, 0, Reg::Ebx, 9, "ERMS"),
    (0x7, 0, Reg::Ebx, 10, "INVPCID"),
    (0x7, 0, Reg::Ebx, 11, "RTM"),
    (0x7, 0, Reg::Ebx, 14, "MPX"),
    (0x7, 0, Reg::Ebx, 16, "AVX512F"),
    (0x7, 0, Reg::Ebx, 17, "AVX512DQ"),
    (0x7, 0, Reg::Ebx, 18, "RDSEED"),
    (0x7, 0, Reg::Ebx, 19, "ADX"),
    (0x7, 0, Reg::Ebx, 20, "SMAP"),
    (0x7, 0, Reg::Ebx, 21, "AVX512_IFMA"),
    (0x7, 0, Reg::Ebx, 23, "CLFLUSHOPT"),
    (0x7, 0, Reg::Ebx, 24, "CLWB"),
    (0x7, 0, Reg::Ebx, 28, "AVX512CD"),
    (0x7, 0, Reg::Ebx, 29, "SHA"),
    (0x7, 0, Reg::Ebx, 30, "AVX512BW"),
    (0x7, 0, Reg::Ebx, 31, "AVX512VL"),
    (0x7, 0, Reg::Ecx, 1, "AVX512_VBMI"),
    (0x7, 0, Reg::Ecx, 2, "UMIP"),
    (0x7, 0, Reg::Ecx, 3, "PKU"),
    (0x7, 0, Reg::Ecx, 5, "WAITPKG"),
    (0x7, 0, Reg::Ecx, 6, "AVX512_VBMI2"),
    (0x7, 0, Reg::Ecx, 7, "CET_SS"),
    (0x7, 0, Reg::Ecx, 8, "GFNI"),
    (0x7, 0, Reg::Ecx, 9, "VAES"),
    (0x7, 0, Reg::Ecx, 10, "VPCLMULQDQ"),
    (0x7, 0, Reg::Ecx, 11, "AVX512_VNNI"),
    (0x7, 0, Reg::Ecx, 12, "AVX512_BITALG"),
    (0x7, 0, Reg::Ecx, 14, "AVX512_VPOPCNTDQ"),
    (0x7, 0, Reg::Ecx, 16, "LA57"),
    (0x7, 0, Reg::Ecx, 22, "RDPID"),
    (0x7, 0, Reg::Ecx, 25, "CLDEMOTE"),
    (0x7, 0, Reg::Ecx, 27, "MOVDIRI"),
    (0x7, 0, Reg::Ecx, 28, "MOVDIR64B"),
    (0x7, 0, Reg::Ecx, 29, "ENQCMD"),
    (0x7, 0, Reg::Ecx, 31, "PKS"),
    (0x7, 0, Reg::Edx, 4, "FSRM"),
    (0x7, 0, Reg::Edx, 8, "AVX512_VP2INTERSECT"),
    (0x7, 0, Reg::Edx, 10, "MD_CLEAR"),
    (0x7, 0, Reg::Edx, 14, "SERIALIZE"),
    (0x7, 0, Reg::Edx, 16, "TSXLDTRK"),
    (0x7, 0, Reg::Edx, 19, "ARCH_LBR"),
    (0x7, 0, Reg::Edx, 20, "CET_IBT"),
    (0x7, 0, Reg::Edx, 22, "AMX_BF16"),
    (0x7, 0, Reg::Edx, 23, "AVX512_FP16"),
    (0x7, 0, Reg::Edx, 24, "AMX_TILE"),
    (0x7, 0, Reg::Edx, 25, "AMX_INT8"),
    (0x7, 0, Reg::Edx, 26, "SPEC_CTRL"),
    (0x7, 0, Reg::Edx, 27, "STIBP"),
    (0x7, 0, Reg::Edx, 28, "FLUSH_L1D"),
    (0x7, 0, Reg::Edx, 29, "ARCH_CAPABILITIES"),
    (0x7, 0, Reg::Edx, 30, "CORE_CAPABILITIES"),
    (0x7, 0, Reg::Edx, 31, "SPEC_CTRL_SSBD"),
    (0x7, 1, Reg::Eax, 0, "SHA512"),
    (0x7, 1, Reg::Eax, 1, "SM3"),
    (0x7, 1, Reg::Eax, 2, "SM4"),
    (0x7, 1, Reg::Eax, 4, "AVX_VNNI"),
    (0x7, 1, Reg::Eax, 5, "AVX512_BF16"),
    (0x7, 1, Reg::Eax, 7, "CMPCCXADD"),
    (0x7, 1, Reg::Eax, 10, "FZRM"),
    (0x7, 1, Reg::Eax, 11, "FSRS"),
    (0x7, 1, Reg::Eax, 12, "FSRC"),
    (0x7, 1, Reg::Eax, 17, "FRED"),
    (0x7, 1, Reg::Eax, 18, "LKGS"),
    (0x7, 1, Reg::Eax, 19, "WRMSRNS"),
    (0x7, 1, Reg::Eax, 21, "AMX_FP16"),
    (0x7, 1, Reg::Eax, 23, "AVX_IFMA"),
    (0x7, 1, Reg::Eax, 26, "LAM"),
    (0x7, 1, Reg::Edx, 4, "AVX_VNNI_INT8"),
    (0x7, 1, Reg::Edx, 5, "AVX_NE_CONVERT"),
    (0x7, 1, Reg::Edx, 8, "AMX_COMPLEX"),
    (0x7, 1, Reg::Edx, 10, "AVX_VNNI_INT16"),
    (0x7, 1, Reg::Edx, 14, "PREFETCHITI"),
    (0x7, 1, Reg::Edx, 19, "AVX10"),
    (0xd, 0, Reg::Eax, 0, "XCR0 x87"),
    (0xd, 0, Reg::Eax, 1, "XCR0 SSE"),
    (0xd, 0, Reg::Eax, 2, "XCR0 AVX"),
    (0xd, 0, Reg::Eax, 3, "XCR0 MPX BNDREGS"),
    (0xd, 0, Reg::Eax, 4, "XCR0 MPX BNDCSR"),
    (0xd, 0, Reg::Eax, 5, "XCR0 AVX-512 opmask"),
    (0xd, 0, Reg::Eax, 6, "XCR0 AVX-512 ZMM_Hi256"),
    (0xd, 0, Reg::Eax, 7, "XCR0 AVX-512 Hi16_ZMM"),
    (0xd, 0, Reg::Eax, 9, "XCR0 PKRU"),
    (0xd, 0, Reg::Eax, 17, "XCR0 AMX TILECFG"),
    (0xd, 0, Reg::Eax, 18, "XCR0 AMX TILEDATA"),
    (0xd, 0, Reg::Eax, 19, "XCR0 APX"),
    (0xd, 1, Reg::Eax, 0, "XSAVEOPT"),
    (0xd, 1, Reg::Eax, 1, "XSAVEC"),
    (0xd, 1, Reg::Eax, 2, "XGETBV_ECX1"),
    (0xd, 1, Reg::Eax, 3, "XSAVES"),
    (0xd, 1, Reg::Eax, 4, "XFD"),
    (0xd, 1, Reg::Ecx, 8, "XSS PT"),
    (0xd, 1, Reg::Ecx, 10, "XSS PASID"),
    (0xd, 1, Reg::Ecx, 11, "XSS CET_U"),
    (0xd, 1, Reg::Ecx, 12, "XSS CET_S"),
    (0xd, 1, Reg::Ecx, 14, "XSS UINTR"),
    (0xd, 1, Reg::Ecx, 15, "XSS LBR"),
    (0x4000_0001, 0, Reg::Eax, 0, "KVM_FEATURE_CLOCKSOURCE"),
    (0x4000_0001, 0, Reg::Eax, 3, "KVM_FEATURE_CLOCKSOURCE2"),
    (0x4000_0001, 0, Reg::Eax, 4, "KVM_FEATURE_ASYNC_PF"),
    (0x4000_0001, 0, Reg::Eax, 5, "KVM_FEATURE_STEAL_TIME"),
    (0x4000_0001, 0, Reg::Eax, 6, "KVM_FEATURE_PV_EOI"),
    (0x4000_0001, 0, Reg::Eax, 7, "KVM_FEATURE_PV_UNHALT"),
    (0x4000_0001, 0, Reg::Eax, 9, "KVM_FEATURE_PV_TLB_FLUSH"),
    (0x4000_0001, 0, Reg::Eax, 11, "KVM_FEATURE_PV_SEND_IPI"),
    (0x4000_0001, 0, Reg::Eax, 13, "KVM_FEATURE_PV_SCHED_YIELD"),
    (
        0x4000_0001,
        0,
        Reg::Eax,
        24,
        "KVM_FEATURE_CLOCKSOURCE_STABLE_BIT",
    ),
    (0x8000_0001, 0, Reg::Ecx, 0, "LAHF_LM"),
    (0x8000_0001, 0, Reg::Ecx, 2, "SVM"),
    (0x8000_0001, 0, Reg::Ecx, 5, "LZCNT"),
    (0x8000_0001, 0, Reg::Ecx, 6, "SSE4A"),
    (0x8000_0001, 0, Reg::Ecx, 7, "MISALIGNSSE"),
    (0x8000_0001, 0, Reg::Ecx, 8, "PREFETCHW"),
    (0x8000_0001, 0, Reg::Ecx, 11, "XOP"),
    (0x8000_0001, 0, Reg::Ecx, 16, "FMA4"),
    (0x8000_0001, 0, Reg::Ecx, 21, "TBM"),
    (0x8000_0001, 0, Reg::Ecx, 22, "TOPOEXT"),
    (0x8000_0001, 0, Reg::Ecx, 29, "MWAITX"),
    (0x8000_0001, 0, Reg::Edx, 11, "SYSCALL"),
    (0x8000_0001, 0, Reg::Edx, 20, "NX"),
    (0x8000_0001, 0, Reg::Edx, 22, "MMXEXT"),
    (0x8000_0001, 0, Reg::Edx, 25, "FFXSR"),
    (0x8000_0001, 0, Reg::Edx, 26, "PDPE1GB"),
    (0x8000_0001, 0, Reg::Edx, 27, "RDTSCP"),
    (0x8000_0001, 0, Reg::Edx, 29, "LM"),
    (0x8000_0007, 0, Reg::Edx, 8, "INVARIANT_TSC"),
    (0x8000_0008, 0, Reg::Ebx, 0, "CLZERO"),
    (0x8000_0008, 0, Reg::Ebx, 1, "IRPERF"),
    (0x8000_0008, 0, Reg::Ebx, 2, "XSAVEERPTR"),
    (0x8000_0008, 0, Reg::Ebx, 4, "RDPRU"),
    (0x8000_0008, 0, Reg::Ebx, 9, "WBNOINVD"),
    (0x8000_0008, 0, Reg::Ebx, 12, "AMD_IBPB"),
    (0x8000_0008, 0, Reg::Ebx, 14, "AMD_IBRS"),
    (0x8000_0008, 0, Reg::Ebx, 15, "AMD_STIBP"),
    (0x8000_0008, 0, Reg::Ebx, 17, "AMD_STIBP_ALWAYS_ON"),
    (0x8000_0008, 0, Reg::Ebx, 23, "AMD_PPIN"),
    (0x8000_0008, 0, Reg::Ebx, 24, "AMD_SSBD"),
    (0x8000_0008, 0, Reg::Ebx, 25, "VIRT_SSBD"),
    (0x8000_0008, 0, Reg::Ebx, 26, "AMD_SSB_NO"),
    (0x8000_0008, 0, Reg::Ebx, 28, "AMD_PSFD"),
    (0x8000_0021, 0, Reg::Eax, 0, "NO_NESTED_DATA_BP"),
    (0x8000_0021, 0, Reg::Eax, 2, "LFENCE_RDTSC"),
    (0x8000_0021, 0, Reg::Eax, 6, "NULL_SEL_CLR_BASE"),
    (0x8000_0021, 0, Reg::Eax, 8, "AUTOIBRS"),
];

pub(crate) fn feature_name(leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> Option<&'static str> {
    FEATURE_NAMES
        .iter()
        .find(|&&(l, s, r, b, _)| l == leaf && s == subleaf && r == reg && b == bit)
        .map(|&(.., name)| name)
}

pub(crate) fn find_entry(
    set: &[kvm_cpuid_entry2],
    leaf: u32,
    subleaf: Option<u32>,
) -> Option<&kvm_cpuid_entry2> {
    set.iter()
        .find(|e| e.function == leaf && subleaf.is_none_or(|s| e.index == s))
}

/// Returns a description of every CPU feature the snapshot's CPUID gives the
/// guest but the host does not support (leaf, subleaf, register, bit and, for
/// common features, a name), or `None` when the host can run the snapshot.
///
/// Only registers made of feature flags or supported-state masks are compared
/// (not topology, sizes, address widths or max-leaf values); a feature
/// leaf the host does not report at all counts as all its bits missing.
pub fn missing_features(
    snapshot: &[kvm_cpuid_entry2],
    host: &[kvm_cpuid_entry2],
) -> Option<String> {
    let mut missing = Vec::new();
    for f in FEATURE_REGS {
        let Some(s) = find_entry(snapshot, f.leaf, f.subleaf) else {
            continue;
        };
        let have = find_entry(host, f.leaf, f.subleaf).map_or(0, |h| f.reg.get(h));
        let lacking = f.reg.get(s) & !have & !f.not_features;
        for bit in (0..32u8).filter(|b| lacking & (1 << b) != 0) {
            let mut m = format!("CPUID leaf {:#x}", f.leaf);
            if let Some(sub) = f.subleaf {
                m.push_str(&format!(" subleaf {sub}"));
            }
            m.push_str(&format!(" {} bit {bit}", f.reg.name()));
            if let Some(name) = feature_name(f.leaf, f.subleaf.unwrap_or(0), f.reg, bit) {
                m.push_str(&format!(" ({name})"));
            }
            missing.push(m);
        }
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn apic_id_and_topology_follow_the_vcpu_index() {
        let mut e = vec![entry(0x1, 0), entry(0xb, 0), entry(0xb, 1)];
        e[0].ebx = 0x0008_0800;
        normalize(&mut e, 2, 4, false);
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800);
        assert_ne!(e[0].ecx & HYPERVISOR_BIT, 0);
        assert_eq!(e[1].edx, 2);
        assert_eq!(e[2].ebx, 4);
        assert_eq!(e[2].eax, 2);
    }

    #[test]
    fn five_level_paging_is_hidden_and_other_leaf_7_bits_kept() {
        let mut e = vec![entry(0x7, 0), entry(0x7, 1)];
        e[0].ecx = LA57_BIT | 1 << 2; // LA57 and UMIP
        e[1].ecx = LA57_BIT; // another subleaf: not a feature bit there
        normalize(&mut e, 0, 1, false);
        assert_eq!(e[0].ecx, 1 << 2);
        assert_eq!(e[1].ecx, LA57_BIT);
    }

    #[test]
    fn restore_refuses_features_the_host_lacks() {
        let mut snap = vec![entry(0x7, 0)];
        snap[0].ebx = 0b1010;
        let mut host = vec![entry(0x7, 0)];
        host[0].ebx = 0b1010;
        assert_eq!(missing_features(&snap, &host), None);
        host[0].ebx = 0b0010;
        let msg = missing_features(&snap, &host).unwrap_or_default();
        assert!(msg.contains("0x7") && msg.contains("ebx"), "{msg}");
    }

    /// A plausible host: feature leaves plus non-feature fields that differ
    /// between machines (sizes, address widths, topology).
    fn host_set() -> Vec<kvm_cpuid_entry2> {
        let mut e = vec![
            entry(0x1, 0),
            entry(0x4, 0),
            entry(0x7, 0),
            entry(0x7, 1),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xd, 0),
            entry(0xd, 1),
            entry(0xd, 2),
            entry(0x8000_0001, 0),
            entry(0x8000_0008, 0),
        ];
        e[0].eax = 0x00a0_0f11;
        e[0].ebx = 0x0010_0800;
        e[0].ecx = 0x7ed8_320b;
        e[0].edx = 0x178b_fbff;
        e[1].eax = 0x0000_0121;
        e[2].eax = 1;
        e[2].ebx = 0x219c_97a9;
        e[2].ecx = 0x0040_069c;
        e[2].edx = 0x0000_0010;
        e[3].eax = 1 << 5; // AVX512_BF16
        e[6].eax = 0x7; // x87, SSE, AVX
        e[6].ebx = 0x340;
        e[6].ecx = 0x340;
        e[7].eax = 0b1011; // XSAVEOPT, XSAVEC, XSAVES
        e[7].ebx = 0x340;
        e[8].eax = 0x100;
        e[8].ebx = 0x240;
        e[9].ecx = 0x75c2_37ff;
        e[9].edx = 0x2fd3_fbff;
        e[10].eax = 0x3030;
        e[10].ebx = 0x0100_d019; // no WBNOINVD (bit 9)
        e[10].ecx = 0x7;
        e
    }

    fn leaf(set: &mut [kvm_cpuid_entry2], f: u32, i: u32) -> &mut kvm_cpuid_entry2 {
        set.iter_mut()
            .find(|e| e.function == f && e.index == i)
            .unwrap_or_else(|| panic!("no leaf {f:#x}.{i}"))
    }

    #[test]
    fn identical_sets_and_vmm_normalised_bits_are_compatible() {
        let host = host_set();
        assert_eq!(missing_features(&host, &host), None);
        // What the VMM gives vCPU 3 of 4 (APIC ID, counts, HTT, hypervisor and
        // TSC-deadline bits) is not a host feature.
        let mut guest = host.clone();
        normalize(&mut guest, 3, 4, true);
        assert_eq!(missing_features(&guest, &host), None);
        // Sizes, address widths, core counts and max-leaf values are not
        // features either, even when the snapshot's are larger.
        leaf(&mut guest, 0xd, 1).ebx = 0x988;
        leaf(&mut guest, 0xd, 0).ebx = 0x988;
        leaf(&mut guest, 0xd, 0).ecx = 0x988;
        leaf(&mut guest, 0xd, 2).ebx = 0xfff;
        leaf(&mut guest, 0x8000_0008, 0).eax = 0x3034;
        leaf(&mut guest, 0x8000_0008, 0).ecx = 0xff;
        leaf(&mut guest, 0x7, 0).eax = 2;
        leaf(&mut guest, 0x1, 0).eax = 0xffff_ffff;
        leaf(&mut guest, 0x1, 0).ecx |= OSXSAVE_BIT;
        assert_eq!(missing_features(&guest, &host), None);
    }

    #[test]
    fn xsaves_in_leaf_0xd_subleaf_1_eax_is_refused_by_name() {
        let mut host = host_set();
        let guest = host.clone();
        leaf(&mut host, 0xd, 1).eax &= !(1 << 3);
        let msg = missing_features(&guest, &host).unwrap_or_default();
        assert_eq!(msg, "CPUID leaf 0xd subleaf 1 eax bit 3 (XSAVES)");
    }

    #[test]
    fn xcr0_state_components_in_leaf_0xd_subleaf_0_are_checked() {
        let host = host_set();
        let mut guest = host.clone();
        leaf(&mut guest, 0xd, 0).eax |= 0xe0 | (1 << 18);
        let msg = missing_features(&guest, &host).unwrap_or_default();
        assert!(msg.contains("leaf 0xd subleaf 0 eax bit 5"), "{msg}");
        assert!(msg.contains("AVX-512 Hi16_ZMM"), "{msg}");
        assert!(msg.contains("bit 18 (XCR0 AMX TILEDATA)"), "{msg}");
    }

    #[test]
    fn leaf_7_subleaf_1_features_are_checked_apart_from_subleaf_0() {
        let host = host_set();
        let mut guest = host.clone();
        leaf(&mut guest, 0x7, 1).eax |= 1 << 4;
        let msg = missing_features(&guest, &host).unwrap_or_default();
        assert_eq!(msg, "CPUID leaf 0x7 subleaf 1 eax bit 4 (AVX_VNNI)");
        // Subleaf 0 lacking a bit is reported as subleaf 0.
        let mut guest = host.clone();
        leaf(&mut guest, 0x7, 0).ebx |= 1 << 16;
        let msg = missing_features(&guest, &host).unwrap_or_default();
        assert_eq!(msg, "CPUID leaf 0x7 subleaf 0 ebx bit 16 (AVX512F)");
    }

    #[test]
    fn leaf_0x8000_0008_ebx_features_are_checked() {
        let host = host_set();
        let mut guest = host.clone();
        leaf(&mut guest, 0x8000_0008, 0).ebx |= 1 << 9;
        let msg = missing_features(&guest, &host).unwrap_or_default();
        assert_eq!(msg, "CPUID leaf 0x80000008 ebx bit 9 (WBNOINVD)");
    }

    #[test]
    fn a_feature_leaf_the_host_lacks_entirely_is_refused_and_every_bit_is_listed() {
        let mut host = host_set();
        host.retain(|e| !(e.function == 0x7 && e.index == 1));
        let mut guest = host_set();
        leaf(&mut guest, 0x7, 1).edx = 1 << 19;
        let msg = missing_features(&guest, &host).unwrap_or_default();
        assert_eq!(
            msg,
            "CPUID leaf 0x7 subleaf 1 eax bit 5 (AVX512_BF16), \
             CPUID leaf 0x7 subleaf 1 edx bit 19 (AVX10)"
        );
    }
}
