//! Guest pages served from a lazy memory device (post-copy).

use std::sync::Arc;

use drafter_storage::{BlockDevice, LazyDevice};
use drafter_vmm::memory::PageProvider;

/// Serves the VMM's userfaultfd page faults from the incoming "memory"
/// device: a page whose block has not arrived yet is fetched from the source
/// with priority, and the faulting vCPU waits for that block only.
pub struct LazyPageProvider {
    memory: Arc<LazyDevice>,
}

impl LazyPageProvider {
    /// Pages of `memory` (in the memory file layout).
    pub fn new(memory: Arc<LazyDevice>) -> Self {
        LazyPageProvider { memory }
    }
}

impl PageProvider for LazyPageProvider {
    fn fill(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.memory
            .read_at(buf, offset)
            .map_err(|e| std::io::Error::other(format!("guest page at {offset:#x}: {e}")))
    }
}
