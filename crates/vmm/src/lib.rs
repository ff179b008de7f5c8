//! KVM microVM: boot, virtio devices, snapshot/restore and dirty memory.
//!
//! One VM per process. Every KVM ioctl lives in [`vstate`]-style layers of this
//! crate; device models in [`devices`] know nothing of KVM.

pub mod devices;
pub mod memory;
