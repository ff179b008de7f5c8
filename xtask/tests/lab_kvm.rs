//! Proves the lab gives real (nested SVM) KVM: the CPU advertises `svm`, and a
//! VM created with `kvm-ioctls` runs a long-mode program to a known result.

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};
use std::alloc::{alloc_zeroed, dealloc, Layout};

const MEM_SIZE: usize = 2 << 20;
const GDT: usize = 0x1000;
const PML4: usize = 0x2000;
const PDPT: usize = 0x3000;
const PD: usize = 0x4000;
const CODE: usize = 0x8000;
const PORT: u16 = 0x10;

/// `mov eax,7; imul eax,eax,6; shl rax,32; shr rax,32; out 0x10,al; hlt`.
/// In long mode this outputs 42; decoded as 32-bit code (0x48 = `dec eax`)
/// it would output 40, so the value proves the CPU ran 64-bit code.
const PROGRAM: &[u8] = &[
    0xb8, 0x07, 0x00, 0x00, 0x00, // mov eax, 7
    0x6b, 0xc0, 0x06, // imul eax, eax, 6
    0x48, 0xc1, 0xe0, 0x20, // shl rax, 32
    0x48, 0xc1, 0xe8, 0x20, // shr rax, 32
    0xe6, 0x10, // out 0x10, al
    0xf4, // hlt
];

struct GuestRam {
    ptr: *mut u8,
    layout: Layout,
}

impl GuestRam {
    fn new() -> Self {
        let layout = Layout::from_size_align(MEM_SIZE, 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Self { ptr, layout }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to MEM_SIZE bytes we own for our whole lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, MEM_SIZE) }
    }

    fn put_u64(&mut self, at: usize, v: u64) {
        self.bytes()[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

fn segment(selector: u16, type_: u8, long: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(long == 0),
        s: 1,
        l: long,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

#[test]
#[ignore = "lab"]
fn lab_long_mode_guest_on_real_kvm() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    assert!(
        cpuinfo.split_whitespace().any(|w| w == "svm"),
        "no svm flag: not in the lab"
    );

    let mut ram = GuestRam::new();
    // GDT: null, 64-bit code, data.
    ram.put_u64(GDT + 8, 0x00af_9b00_0000_ffff);
    ram.put_u64(GDT + 16, 0x00cf_9300_0000_ffff);
    // Identity map of the first 2 MiB with one large page.
    ram.put_u64(PML4, PDPT as u64 | 0x3);
    ram.put_u64(PDPT, PD as u64 | 0x3);
    ram.put_u64(PD, 0x83);
    ram.bytes()[CODE..CODE + PROGRAM.len()].copy_from_slice(PROGRAM);

    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: ram.ptr as u64,
        flags: 0,
    };
    // SAFETY: the region is our live allocation of MEM_SIZE bytes, which
    // outlives the VM (dropped after it at the end of the test).
    unsafe { vm.set_user_memory_region(region).unwrap() };
    let mut vcpu = vm.create_vcpu(0).unwrap();

    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.gdt.base = GDT as u64;
    sregs.gdt.limit = 23;
    sregs.cs = segment(8, 11, 1);
    let data = segment(16, 3, 0);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.cr3 = PML4 as u64;
    sregs.cr4 |= 1 << 5; // PAE
    sregs.cr0 |= (1 << 0) | (1 << 31); // PE, PG
    sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = CODE as u64;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs).unwrap();

    let mut seen = None;
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(port, data) => {
                assert_eq!(port, PORT);
                seen = Some(data[0]);
            }
            VcpuExit::Hlt => break,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    assert_eq!(seen, Some(42), "long-mode program gave the wrong result");
}
