//! The one layer of the VMM that talks to KVM: every KVM ioctl lives in [`vm`]
//! (VM-wide state) or [`vcpu`] (per-vCPU state and the run loop).

pub mod vcpu;
pub mod vm;

pub use vcpu::{Vcpu, VcpuError, VcpuState};
pub use vm::{Vm, VmError, VmState};
