//! The drafter package format: manifest and archive of a VM's devices.
