//! Guest memory types shared by the VMM core and the device models.

use vm_memory::bitmap::AtomicBitmap;

/// Guest memory as every part of the VMM sees it. The [`AtomicBitmap`] records
/// every page the VMM itself writes (virtio-blk reads, net RX, vsock RX), which is
/// OR'd with KVM's dirty log to report dirty memory.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;
