//! Keeps the VMM process's heap mapped while vCPUs run.
//!
//! glibc returns freed memory to the kernel eagerly: blocks of 128 KiB and
//! more are `mmap`ed and `munmap`ed one by one, and arena tops are trimmed
//! with `madvise(MADV_DONTNEED)`. Each of those unmaps pages of the process's
//! address space, so the kernel sends a TLB-shootdown IPI to every CPU running
//! one of its threads — including the CPUs running vCPU threads in guest
//! mode, each IPI a forced VM exit. A migration that moves blocks through the
//! heap in the VMM's own process did that continually; with these settings a
//! whole migration makes a few dozen such calls (counted with strace in the
//! lab).
//!
//! This was first tried against busy guests resetting during migration in
//! the lab (issue #9, defect 0). It is not the fix for that: the resets and
//! hangs still happen with it (see `repro_fast_writer_migrates_with_memory_intact`
//! in `crates/drafter/tests/lab_migration.rs`). It stays because it removes
//! needless VM exits.
//!
//! There is no crate for glibc's `mallopt`; `libc` exposes it directly.

use std::sync::Once;

/// Allocations below this size come from the heap, never from their own
/// mapping (glibc's largest allowed threshold on 64-bit).
const MMAP_THRESHOLD: libc::c_int = 32 << 20;
/// Free memory at the top of a heap or arena that glibc keeps instead of
/// handing back to the kernel.
const TRIM_THRESHOLD: libc::c_int = 1 << 30;

/// Tells glibc to keep freed memory mapped in this process (once per
/// process; later calls do nothing). [`crate::Vmm::boot`] and
/// [`crate::Vmm::restore`] call it before any vCPU runs.
pub fn keep_heap_mapped() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: mallopt only changes allocator parameters; it is safe to
        // call at any time from any thread, and the values are within the
        // ranges glibc documents (it returns 0 and changes nothing otherwise).
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        };
        if !ok {
            tracing::warn!(
                "glibc refused the heap settings; freed memory may be unmapped while vCPUs run"
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped_block_bytes() -> usize {
        // SAFETY: mallinfo2 only reads allocator statistics.
        unsafe { libc::mallinfo2() }.hblkhd
    }

    #[test]
    fn large_blocks_come_from_the_heap_not_their_own_mapping() {
        keep_heap_mapped();
        let before = mapped_block_bytes();
        let block = vec![1u8; 4 << 20];
        let after = mapped_block_bytes();
        assert_eq!(block.len(), 4 << 20);
        // glibc's default would mmap a 4 MiB block (hblkhd grows by 4 MiB).
        assert!(
            after < before + (4 << 20),
            "a 4 MiB block got its own mapping: {before} -> {after} bytes mmapped"
        );
    }
}
