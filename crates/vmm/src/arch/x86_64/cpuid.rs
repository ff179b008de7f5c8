//! CPUID normalisation per vCPU (APIC IDs, topology leaves, hypervisor bit) and
//! the feature-compatibility check used when restoring a snapshot.

use kvm_bindings::kvm_cpuid_entry2;

const HYPERVISOR_BIT: u32 = 1 << 31;
const TSC_DEADLINE_BIT: u32 = 1 << 24;
const HTT_BIT: u32 = 1 << 28;

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

/// Feature registers compared on restore: (leaf, subleaf, register name).
const FEATURE_LEAVES: &[(u32, u32)] = &[(0x1, 0), (0x7, 0), (0xd, 1), (0x8000_0001, 0)];

/// Returns a description of the first CPU feature the snapshot's CPUID uses but the
/// host does not support, or `None` when the host can run the snapshot.
pub fn missing_features(
    snapshot: &[kvm_cpuid_entry2],
    host: &[kvm_cpuid_entry2],
) -> Option<String> {
    let find = |set: &[kvm_cpuid_entry2], f, i| {
        set.iter()
            .find(|e| e.function == f && (e.index == i || f == 0x1 || f == 0x8000_0001))
            .copied()
    };
    for &(leaf, sub) in FEATURE_LEAVES {
        let Some(s) = find(snapshot, leaf, sub) else {
            continue;
        };
        let h = find(host, leaf, sub).unwrap_or_default();
        let regs = [
            ("ebx", s.ebx, h.ebx),
            ("ecx", s.ecx, h.ecx),
            ("edx", s.edx, h.edx),
        ];
        for (name, want, have) in regs {
            // Leaf 1 EBX holds APIC ID and counts, not features.
            if leaf == 0x1 && name == "ebx" {
                continue;
            }
            // The hypervisor and TSC-deadline bits are ours to set.
            let ours = if leaf == 0x1 && name == "ecx" {
                HYPERVISOR_BIT | TSC_DEADLINE_BIT
            } else if leaf == 0x1 && name == "edx" {
                HTT_BIT
            } else {
                0
            };
            let missing = want & !have & !ours;
            if missing != 0 {
                return Some(format!(
                    "CPUID leaf {leaf:#x}.{sub} {name} bits {missing:#x}"
                ));
            }
        }
    }
    None
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
}
