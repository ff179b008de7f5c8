//! Port-I/O and MMIO buses: map guest addresses to device models.
//!
//! Built while the VM is assembled and read-only afterwards, so vCPU threads share
//! it without locking the map; each device sits behind its own mutex.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through port I/O or MMIO. Offsets are relative to the start
/// of the device's range.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// The VM's two address spaces.
#[derive(Default)]
pub struct Buses {
    /// Port I/O.
    pub pio: Bus,
    /// Memory-mapped I/O.
    pub mmio: Bus,
}

/// A device shared between the bus and its owner.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// A range could not be added to the bus.
#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps another device or is empty")]
pub struct BusOverlap {
    /// Start of the refused range.
    pub base: u64,
    /// Its length.
    pub len: u64,
}

struct Entry {
    len: u64,
    device: SharedDevice,
}

/// An address space of devices.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusOverlap> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusOverlap { base, len });
        };
        let prev_overlaps = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(b, e)| b + e.len > base);
        if prev_overlaps {
            return Err(BusOverlap { base, len });
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (base, e) = self.ranges.range(..=addr).next_back()?;
        let off = addr - base;
        (off + size as u64 <= e.len).then_some((off, &e.device))
    }

    /// Dispatches a read; returns false (and leaves `data` as all-ones) when no
    /// device claims the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                lock(dev).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                lock(dev).write(off, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering it if a previous holder panicked: device state is
/// plain registers and stays usable.
pub fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_relative_offsets() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Reg(vec![])));
        bus.insert(0x3f8, 8, a.clone())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(bus.write(0x3ff, &[7]));
        assert!(!bus.write(0x400, &[7]));
        assert!(!bus.read(0x3f7, &mut b));
        assert_eq!(b[0], 0xff);
        // An access straddling the end is refused.
        let mut two = [0u8; 2];
        assert!(!bus.read(0x3ff, &mut two));
        assert_eq!(
            a.lock().map(|r| r.0.clone()).unwrap_or_default(),
            vec![(7, vec![7])]
        );
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::new();
        let d: SharedDevice = Arc::new(Mutex::new(Reg(vec![])));
        assert!(bus.insert(0x1000, 0x1000, d.clone()).is_ok());
        assert!(bus.insert(0x1800, 0x1000, d.clone()).is_err());
        assert!(bus.insert(0x800, 0x1000, d.clone()).is_err());
        assert!(bus.insert(0x2000, 0x1000, d.clone()).is_ok());
        assert!(bus.insert(0x5000, 0, d).is_err());
    }
}
