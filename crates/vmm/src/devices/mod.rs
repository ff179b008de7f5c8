//! Device models (serial, i8042, virtio-mmio transport, virtio-blk/net/vsock).
//! They operate on [`crate::memory::GuestMemory`] and never call KVM.
