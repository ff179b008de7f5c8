//! KVM microVM: boot, virtio devices, snapshot/restore and dirty memory.
//!
//! One VM per process. Every KVM ioctl lives in [`vstate`]; device models in
//! [`devices`] know nothing of KVM. The public API is [`Vmm`]: build from a
//! [`VmConfig`] or restore from a snapshot, pause, resume, snapshot, report
//! dirty pages, msync, stop, wait for the guest's end.

pub mod arch;
pub mod boot;
pub mod bus;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod dirty;
pub mod heap;
pub mod memory;
pub mod persist;
pub mod seccomp;
mod seccomp_names;
pub mod throttle;
pub mod uffd;
pub mod vcpu_thread;
pub mod vmm;
pub mod vstate;

pub use arch::x86_64::cpu_template::{CpuTemplate, CpuTemplateError};
pub use config::VmConfig;
pub use dirty::{DirtyPages, DirtyRange};
pub use vcpu_thread::ExitStatus;
pub use vmm::{BuildOptions, Error, ExitWaiter, RestoreMemory, Snapshot, Vmm};
