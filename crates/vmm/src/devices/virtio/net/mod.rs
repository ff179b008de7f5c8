//! virtio-net over a tap device.

mod engine;
mod tap;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::engine::EngineSlot;
use super::{
    read_config_bytes, DeviceError, DeviceState, IrqTrigger, VirtioDevice, TYPE_NET,
    VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemory;
use engine::NetEngine;
pub use tap::{Tap, TapError, VNET_HDR_LEN};

/// Size of the RX and TX queues.
pub const QUEUE_SIZE: u16 = 256;

/// Snapshot state of a virtio-net device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// Guest MAC address.
    pub mac: [u8; 6],
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// A virtio-net device bridged to a tap.
pub struct Net {
    mac: [u8; 6],
    tap: Option<Tap>,
    tap_name: String,
    acked_features: u64,
    slot: EngineSlot<NetEngine>,
}

impl Net {
    /// A NIC with address `mac` on tap `tap_name`, opened in network namespace
    /// `netns` when given.
    pub fn new(tap_name: &str, netns: Option<&str>, mac: [u8; 6]) -> Result<Self, TapError> {
        let tap = Tap::open(tap_name, netns)?;
        Ok(Self::with_tap(tap, mac))
    }

    /// A NIC on an already opened tap.
    pub fn with_tap(tap: Tap, mac: [u8; 6]) -> Self {
        Self {
            mac,
            tap_name: tap.name().to_string(),
            tap: Some(tap),
            acked_features: 0,
            slot: EngineSlot::new("net"),
        }
    }

    /// Guest MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Tap interface name.
    pub fn tap_name(&self) -> &str {
        &self.tap_name
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | (1 << VIRTIO_NET_F_MAC)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 8];
        cfg[..6].copy_from_slice(&self.mac);
        read_config_bytes(&cfg, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(offset, "virtio-net: config write ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        irq: IrqTrigger,
    ) -> Result<(), DeviceError> {
        if self.slot.is_active() {
            return Err(DeviceError::AlreadyActive);
        }
        if queues.len() != 2 || queue_evts.len() != 2 {
            return Err(DeviceError::QueueCount {
                expected: 2,
                got: queues.len(),
            });
        }
        let tap = self.tap.take().ok_or(DeviceError::NoBackend)?;
        let engine = NetEngine::new(mem, queues, queue_evts, irq, tap);
        self.slot.start(engine).map_err(DeviceError::Io)
    }

    fn is_activated(&self) -> bool {
        self.slot.is_active()
    }

    fn quiesce(&mut self) -> Option<Vec<Queue>> {
        self.slot.pause()
    }

    fn resume(&mut self) -> Result<(), DeviceError> {
        self.slot.resume().map_err(DeviceError::Io)
    }

    fn reset(&mut self) {
        if let Some(engine) = self.slot.take() {
            self.tap = Some(engine.tap);
        }
        self.acked_features = 0;
    }

    fn save(&self) -> DeviceState {
        DeviceState::Net(NetState {
            mac: self.mac,
            acked_features: self.acked_features,
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        let DeviceState::Net(s) = state else {
            return Err(DeviceError::BadState("not a net device state".into()));
        };
        if s.mac != self.mac {
            tracing::warn!("virtio-net: restoring with another MAC than the snapshot's");
        }
        self.acked_features = s.acked_features;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
