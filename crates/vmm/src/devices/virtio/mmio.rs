//! The virtio-mmio transport (virtio 1.x, register layout version 2, modern only).
//!
//! A [`MmioTransport`] is a plain register file: the VMM's MMIO bus forwards guest
//! reads and writes inside the device's 4 KiB window to [`MmioTransport::read`] /
//! [`MmioTransport::write`] with the offset relative to the window base.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::state::duplicate_queue;
use super::{
    DeviceError, DeviceState, IrqTrigger, QueueSnapshot, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_CONFIG,
};
use crate::memory::GuestMemory;

/// Size of each device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register: register each queue EventFd as an
/// ioeventfd at `base + QUEUE_NOTIFY_OFFSET` with datamatch = queue index (u32).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// Device status bits (virtio 1.x §2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready; the device is live.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation finished.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Transport state saved in a snapshot, including the device's own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// Virtio device type (checked on restore).
    pub device_type: u32,
    /// Device status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features written by the driver (accepted once FEATURES_OK is set).
    pub driver_features: u64,
    /// QueueSel.
    pub queue_select: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Every queue, with the ring positions the device reached.
    pub queues: Vec<QueueSnapshot>,
    /// Device-specific state.
    pub device: DeviceState,
}

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    irq: IrqTrigger,
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_select: u32,
    config_generation: u32,
    /// Restored from a snapshot of a live device that has not been activated
    /// yet: [`MmioTransport::resume`] activates it on the restored queues.
    activate_on_resume: bool,
    /// Restored with a non-zero InterruptStatus: [`MmioTransport::resume`]
    /// signals the interrupt again (the saved one never reached this VM's irqchip).
    raise_on_resume: bool,
}

impl MmioTransport {
    /// Wraps `device`, creating one queue EventFd per queue and an interrupt EventFd.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory) -> Result<Self, DeviceError> {
        Self::with_irq(device, mem, IrqTrigger::new()?)
    }

    /// Wraps `device`, interrupting through `irq`.
    pub fn with_irq(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irq: IrqTrigger,
    ) -> Result<Self, DeviceError> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(
                Queue::new(max)
                    .map_err(|e| DeviceError::BadState(format!("queue size {max}: {e}")))?,
            );
            queue_evts.push(EventFd::new(EFD_NONBLOCK)?);
        }
        Ok(Self {
            device,
            mem,
            irq,
            queue_evts,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_select: 0,
            config_generation: 0,
            activate_on_resume: false,
            raise_on_resume: false,
        })
    }

    /// Rebuilds a transport from a snapshot around a freshly built `device` (same
    /// configuration as when saved), without side effects: no I/O thread starts,
    /// guest memory is not touched and no interrupt is signalled. A device that
    /// was live is activated on the restored queues, and an interrupt pending at
    /// snapshot time is signalled again, by the first [`MmioTransport::resume`]
    /// — call it once the VM's interrupt controllers and vCPUs are restored.
    /// Until then [`MmioTransport::save`] returns the restored state.
    pub fn restore(
        mut device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irq: IrqTrigger,
        state: &MmioState,
    ) -> Result<Self, DeviceError> {
        if state.device_type != device.device_type() {
            return Err(DeviceError::BadState(format!(
                "saved device type {} but device is type {}",
                state.device_type,
                device.device_type()
            )));
        }
        if state.queues.len() != device.queue_max_sizes().len() {
            return Err(DeviceError::QueueCount {
                expected: device.queue_max_sizes().len(),
                got: state.queues.len(),
            });
        }
        device.restore(&state.device)?;
        let mut t = Self::with_irq(device, mem, irq)?;
        t.queues = state
            .queues
            .iter()
            .map(QueueSnapshot::to_queue)
            .collect::<Result<_, _>>()?;
        t.status = state.status;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.driver_features = state.driver_features;
        t.queue_select = state.queue_select;
        t.config_generation = state.config_generation;
        t.irq.set_status(state.interrupt_status);
        t.raise_on_resume = state.interrupt_status != 0;
        if t.status & status::FEATURES_OK != 0 {
            t.device.set_acked_features(t.driver_features);
        }
        t.activate_on_resume = t.status & status::DRIVER_OK != 0 && t.status & status::FAILED == 0;
        Ok(t)
    }

    /// One EventFd per queue: register each as an ioeventfd on
    /// `base + QUEUE_NOTIFY_OFFSET`, 4 bytes, datamatch = its index.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's interrupt; register `interrupt().eventfd()` as an irqfd.
    pub fn interrupt(&self) -> &IrqTrigger {
        &self.irq
    }

    /// The device model.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Stops the device's I/O so its state can be saved. Idempotent. A restored
    /// device not yet activated has no I/O; its restored queues stay as they are.
    pub fn pause(&mut self) {
        if let Some(queues) = self.device.quiesce() {
            self.queues = queues;
        }
    }

    /// Restarts the device's I/O after [`MmioTransport::pause`]. After
    /// [`MmioTransport::restore`], the first call signals the saved pending
    /// interrupt again and activates a device that was live on the restored
    /// queues; if activation fails the error is returned and the next call
    /// tries again.
    pub fn resume(&mut self) -> Result<(), DeviceError> {
        if self.raise_on_resume {
            if self.irq.status() != 0 {
                self.irq.eventfd().write(1)?;
            }
            self.raise_on_resume = false;
        }
        if self.activate_on_resume {
            self.activate()?;
            self.activate_on_resume = false;
        } else if self.device.is_activated() {
            self.device.resume()?;
        }
        Ok(())
    }

    /// Pauses the device and returns the whole transport + device state. The
    /// device stays paused; call [`MmioTransport::resume`] to continue.
    pub fn save(&mut self) -> MmioState {
        self.pause();
        MmioState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            interrupt_status: self.irq.status(),
            config_generation: self.config_generation,
            queues: self.queues.iter().map(QueueSnapshot::from).collect(),
            device: self.device.save(),
        }
    }

    /// Guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 {
            tracing::warn!(
                offset,
                len = data.len(),
                "virtio-mmio: non-32-bit register read"
            );
            data.fill(0);
            return;
        }
        let features = self.device.avail_features() | VIRTIO_F_VERSION_1;
        let v: u32 = match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.irq.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(offset, "virtio-mmio: read of unknown register");
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// Guest write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if self.status & status::DRIVER != 0 {
                self.device.write_config(offset - CONFIG_SPACE, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::warn!(
                offset,
                len = data.len(),
                "virtio-mmio: non-32-bit register write"
            );
            return;
        };
        let v = u32::from_le_bytes(bytes);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES if self.in_setup(status::DRIVER, status::FEATURES_OK) => match self
                .driver_features_sel
            {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            REG_QUEUE_SEL => self.queue_select = v,
            REG_QUEUE_NUM => self.update_queue(|q| q.set_size(v as u16)),
            REG_QUEUE_READY => self.update_queue(|q| q.set_ready(v == 1)),
            REG_QUEUE_DESC_LOW => self.update_queue(|q| q.set_desc_table_address(Some(v), None)),
            REG_QUEUE_DESC_HIGH => self.update_queue(|q| q.set_desc_table_address(None, Some(v))),
            REG_QUEUE_DRIVER_LOW => self.update_queue(|q| q.set_avail_ring_address(Some(v), None)),
            REG_QUEUE_DRIVER_HIGH => self.update_queue(|q| q.set_avail_ring_address(None, Some(v))),
            REG_QUEUE_DEVICE_LOW => self.update_queue(|q| q.set_used_ring_address(Some(v), None)),
            REG_QUEUE_DEVICE_HIGH => self.update_queue(|q| q.set_used_ring_address(None, Some(v))),
            QUEUE_NOTIFY_OFFSET => self.notify(v),
            REG_INTERRUPT_ACK => self.irq.ack(v),
            REG_STATUS => self.set_status(v),
            _ => tracing::debug!(
                offset,
                "virtio-mmio: write to read-only or unknown register"
            ),
        }
    }

    /// True while the driver has set every bit of `need` and none of `before`.
    fn in_setup(&self, need: u32, before: u32) -> bool {
        self.status & need == need && self.status & before == 0 && self.status & status::FAILED == 0
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_select as usize)
    }

    fn update_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        // Queue registers may only change after FEATURES_OK and before DRIVER_OK.
        if !self.in_setup(status::FEATURES_OK, status::DRIVER_OK) {
            tracing::debug!(
                status = self.status,
                "virtio-mmio: queue write outside setup ignored"
            );
            return;
        }
        if let Some(q) = self.queues.get_mut(self.queue_select as usize) {
            f(q);
        }
    }

    /// A QueueNotify that reached us (no ioeventfd registered): wake the device.
    fn notify(&self, index: u32) {
        if let Some(evt) = self.queue_evts.get(index as usize) {
            if let Err(e) = evt.write(1) {
                tracing::error!("virtio-mmio: cannot signal queue {index}: {e}");
            }
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if v & old != old {
            tracing::warn!(
                old,
                new = v,
                "virtio-mmio: driver cleared status bits without reset"
            );
            return;
        }
        let added = v & !old;
        let prerequisite_ok = |bit: u32, need: u32| added & bit == 0 || v & need == need;
        if !(prerequisite_ok(status::DRIVER, status::ACKNOWLEDGE)
            && prerequisite_ok(status::FEATURES_OK, status::DRIVER)
            && prerequisite_ok(status::DRIVER_OK, status::FEATURES_OK))
        {
            tracing::warn!(
                old,
                new = v,
                "virtio-mmio: invalid status transition ignored"
            );
            return;
        }
        let mut new = v;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.avail_features() | VIRTIO_F_VERSION_1;
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                // Leave FEATURES_OK clear: the driver reads it back and gives up.
                tracing::warn!(
                    driver = self.driver_features,
                    offered,
                    "virtio-mmio: feature negotiation refused"
                );
                new &= !status::FEATURES_OK;
            } else {
                self.device.set_acked_features(self.driver_features);
            }
        }
        self.status = new;
        if added & status::DRIVER_OK != 0 && new & status::FAILED == 0 {
            if let Err(e) = self.activate() {
                tracing::error!("virtio-mmio: device activation failed: {e}");
                self.status |= status::DEVICE_NEEDS_RESET;
                if let Err(e) = self.irq.trigger(VIRTIO_MMIO_INT_CONFIG) {
                    tracing::error!("virtio-mmio: cannot raise config interrupt: {e}");
                }
            }
        }
    }

    fn activate(&mut self) -> Result<(), DeviceError> {
        let mut evts = Vec::with_capacity(self.queue_evts.len());
        for e in &self.queue_evts {
            evts.push(e.try_clone()?);
        }
        self.device.activate(
            self.mem.clone(),
            self.queues.iter().map(duplicate_queue).collect(),
            evts,
            self.irq.clone(),
        )
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.activate_on_resume = false;
        self.raise_on_resume = false;
        self.irq.set_status(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::Block;
    use crate::devices::virtio::testing::{
        clear_dirty, guest_memory, page_dirty, temp_path, Buf, TestDriver, DATA_START,
    };
    use crate::devices::virtio::vsock::Vsock;
    use vm_memory::{Bytes, GuestAddress};

    fn block(name: &str) -> (Box<Block>, std::path::PathBuf) {
        let path = temp_path(name);
        std::fs::write(&path, vec![0x5au8; 64 * 1024]).unwrap();
        (Box::new(Block::new("d", &path, false).unwrap()), path)
    }

    fn reg(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn set(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    #[test]
    fn feature_negotiation_refuses_unoffered_or_legacy_features() {
        let (dev, path) = block("feat");
        let mut t = MmioTransport::new(dev, guest_memory()).unwrap();
        assert_eq!(reg(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(reg(&mut t, REG_VERSION), 2);
        set(&mut t, REG_STATUS, status::ACKNOWLEDGE);
        set(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        // Without VERSION_1 the device refuses.
        set(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        set(&mut t, REG_DRIVER_FEATURES, 0);
        let s = status::ACKNOWLEDGE | status::DRIVER;
        set(&mut t, REG_STATUS, s | status::FEATURES_OK);
        assert_eq!(reg(&mut t, REG_STATUS), s);
        // A feature the device does not offer (bit 40) is refused too.
        set(&mut t, REG_DRIVER_FEATURES, 1 | (1 << 8));
        set(&mut t, REG_STATUS, s | status::FEATURES_OK);
        assert_eq!(reg(&mut t, REG_STATUS), s);
        // VERSION_1 alone is accepted.
        set(&mut t, REG_DRIVER_FEATURES, 1);
        set(&mut t, REG_STATUS, s | status::FEATURES_OK);
        assert_eq!(reg(&mut t, REG_STATUS), s | status::FEATURES_OK);
        // Features are frozen after FEATURES_OK.
        set(&mut t, REG_DRIVER_FEATURES, 3);
        assert_eq!(t.driver_features, VIRTIO_F_VERSION_1);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn status_machine_rejects_skipped_steps_and_cleared_bits() {
        let (dev, path) = block("status");
        let mut t = MmioTransport::new(dev, guest_memory()).unwrap();
        set(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER_OK);
        assert_eq!(reg(&mut t, REG_STATUS), 0);
        set(&mut t, REG_STATUS, status::ACKNOWLEDGE);
        set(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::FEATURES_OK,
        );
        assert_eq!(reg(&mut t, REG_STATUS), status::ACKNOWLEDGE);
        set(&mut t, REG_STATUS, status::DRIVER);
        assert_eq!(reg(&mut t, REG_STATUS), status::ACKNOWLEDGE);
        // Queue registers are ignored before FEATURES_OK.
        set(&mut t, REG_QUEUE_NUM, 16);
        assert_eq!(t.queues[0].size(), 256);
        assert!(!t.device().is_activated());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn registers_window_and_odd_accesses() {
        let (dev, path) = block("regs");
        let mut d = TestDriver::new(dev, 16);
        assert_eq!(d.reg(REG_DEVICE_ID), 2);
        assert_eq!(d.reg(REG_VENDOR_ID), 0);
        d.set_reg(REG_QUEUE_SEL, 0);
        assert_eq!(d.reg(REG_QUEUE_NUM_MAX), 256);
        assert_eq!(d.reg(REG_QUEUE_READY), 1);
        // A queue that does not exist reads 0.
        d.set_reg(REG_QUEUE_SEL, 5);
        assert_eq!(d.reg(REG_QUEUE_NUM_MAX), 0);
        // Narrow register reads return zeros; config reads past the end too.
        let mut two = [0xffu8; 2];
        d.transport.read(REG_MAGIC, &mut two);
        assert_eq!(two, [0, 0]);
        let mut cfg = [0xffu8; 4];
        d.transport.read(CONFIG_SPACE + 0x200, &mut cfg);
        assert_eq!(cfg, [0; 4]);
        // Queue setup is frozen after DRIVER_OK.
        d.set_reg(REG_QUEUE_SEL, 0);
        d.set_reg(REG_QUEUE_DESC_LOW, 0x8000);
        assert_eq!(d.transport.queues[0].desc_table(), 0x1000);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn interrupt_status_and_ack() {
        let (dev, path) = block("irq");
        let mut d = TestDriver::new(dev, 16);
        let mut hdr = [0u8; 16];
        hdr[0] = 8; // GET_ID
        d.mem.write_slice(&hdr, GuestAddress(DATA_START)).unwrap();
        d.add_chain(
            0,
            &[
                Buf::r(DATA_START, 16),
                Buf::w(DATA_START + 0x100, 20),
                Buf::w(DATA_START + 0x200, 1),
            ],
        );
        d.kick(0);
        // Wait for the used entry without acking, then inspect the register.
        while d.try_used(0).is_none() {
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(d.transport.interrupt().eventfd()),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: valid pollfd for the duration of the call.
            assert_eq!(unsafe { libc::poll(&mut pfd, 1, 10_000) }, 1);
        }
        assert_eq!(d.reg(REG_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING_BIT);
        d.set_reg(REG_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING_BIT);
        assert_eq!(d.reg(REG_INTERRUPT_STATUS), 0);
        std::fs::remove_file(path).unwrap();
    }

    const VIRTIO_MMIO_INT_VRING_BIT: u32 = super::super::VIRTIO_MMIO_INT_VRING;

    /// Whether a thread of this process is named `name`.
    fn thread_named(name: &str) -> bool {
        std::fs::read_dir("/proc/self/task").unwrap().any(|t| {
            std::fs::read_to_string(t.unwrap().path().join("comm"))
                .is_ok_and(|c| c.trim_end() == name)
        })
    }

    /// Waits (10 s limit) for a thread named `name`: a new thread names itself.
    fn wait_thread_named(name: &str) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !thread_named(name) {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }

    /// Used-ring index of queue 0 as the device left it in guest memory.
    fn used_idx(mem: &GuestMemory, state: &MmioState) -> u16 {
        mem.read_obj(GuestAddress(state.queues[0].used_ring + 2))
            .unwrap()
    }

    /// Polls `evt` until it is readable (10 s limit).
    fn wait_readable(evt: &EventFd) {
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(evt),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert_eq!(n, 1, "no interrupt");
    }

    /// A GET_ID request on queue 0, made available but not processed.
    fn queue_get_id(d: &mut TestDriver) {
        let mut hdr = [0u8; 16];
        hdr[0] = 8; // GET_ID
        d.mem.write_slice(&hdr, GuestAddress(DATA_START)).unwrap();
        d.mem
            .write_obj(0xffu8, GuestAddress(DATA_START + 0x200))
            .unwrap();
        d.add_chain(
            0,
            &[
                Buf::r(DATA_START, 16),
                Buf::w(DATA_START + 0x100, 20),
                Buf::w(DATA_START + 0x200, 1),
            ],
        );
    }

    #[test]
    fn restoring_a_live_device_starts_nothing_until_resume() {
        let path = temp_path("rord");
        std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
        let mut d = TestDriver::new(Box::new(Block::new("rord", &path, false).unwrap()), 16);
        assert!(wait_thread_named("blk-rord"));
        let state = d.transport.save();
        // The guest queued a request the device never saw before the snapshot.
        queue_get_id(&mut d);
        let mem = d.mem.clone();
        drop(d);
        assert!(!thread_named("blk-rord"));
        clear_dirty(&mem);

        let irq_evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = IrqTrigger::from_eventfd(irq_evt.try_clone().unwrap());
        let dev = Block::new("rord", &path, false).unwrap();
        let mut t = MmioTransport::restore(Box::new(dev), mem.clone(), irq, &state).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!t.device().is_activated(), "activated before resume");
        assert!(
            !thread_named("blk-rord"),
            "I/O thread started before resume"
        );
        assert_eq!(used_idx(&mem, &state), 0, "request served before resume");
        for addr in [state.queues[0].used_ring, DATA_START] {
            assert!(!page_dirty(&mem, addr), "guest memory written at {addr:#x}");
        }
        assert!(irq_evt.read().is_err(), "interrupt before resume");
        assert_eq!(t.status() & status::DRIVER_OK, status::DRIVER_OK);
        // A snapshot of the restored, never resumed device is the restored state.
        assert_eq!(t.save(), state);

        t.resume().unwrap();
        assert!(t.device().is_activated());
        assert!(wait_thread_named("blk-rord"));
        wait_readable(&irq_evt);
        assert!(irq_evt.read().unwrap() > 0);
        assert_eq!(used_idx(&mem, &state), 1);
        let mut id = [0u8; 4];
        mem.read_slice(&mut id, GuestAddress(DATA_START + 0x100))
            .unwrap();
        assert_eq!(&id, b"rord");
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(DATA_START + 0x200))
                .unwrap(),
            0
        );
        drop(t);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_pending_interrupt_is_raised_again_on_resume() {
        let (dev, path) = block("irqagain");
        let mut d = TestDriver::new(dev, 16);
        queue_get_id(&mut d);
        d.kick(0);
        // Served, interrupt not acknowledged by the guest when the snapshot is taken.
        while d.try_used(0).is_none() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let state = d.transport.save();
        assert_eq!(state.interrupt_status, VIRTIO_MMIO_INT_VRING_BIT);
        let mem = d.mem.clone();
        drop(d);

        let irq_evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = IrqTrigger::from_eventfd(irq_evt.try_clone().unwrap());
        let dev = Box::new(Block::new("d", &path, false).unwrap());
        let mut t = MmioTransport::restore(dev, mem, irq, &state).unwrap();
        assert!(irq_evt.read().is_err(), "interrupt before resume");
        t.resume().unwrap();
        assert!(irq_evt.read().unwrap() > 0, "pending interrupt not raised");
        assert_eq!(reg(&mut t, REG_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING_BIT);
        // Only once: a later pause/resume has nothing new to signal.
        t.pause();
        t.resume().unwrap();
        assert!(irq_evt.read().is_err(), "interrupt raised twice");
        assert_eq!(reg(&mut t, REG_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING_BIT);
        set(&mut t, REG_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING_BIT);
        assert_eq!(reg(&mut t, REG_INTERRUPT_STATUS), 0);
        drop(t);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn reset_stops_the_device_and_it_can_be_set_up_again() {
        let (dev, path) = block("reset");
        let mut d = TestDriver::new(dev, 16);
        assert!(d.transport.device().is_activated());
        d.set_reg(REG_STATUS, 0);
        assert_eq!(d.reg(REG_STATUS), 0);
        assert!(!d.transport.device().is_activated());
        assert_eq!(d.transport.queues[0].desc_table(), 0);
        // The backend came back: a second driver init activates the device again.
        let mem = d.mem.clone();
        let t = std::mem::replace(
            &mut d.transport,
            MmioTransport::new(block("reset2").0, mem.clone()).unwrap(),
        );
        drop(d);
        let dev_back: Box<dyn VirtioDevice> = t.device;
        let mut d2 = TestDriver::with_memory(dev_back, 16, mem);
        assert!(d2.transport.device().is_activated());
        assert_eq!(d2.reg(REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn restore_rejects_another_device_type() {
        let (dev, path) = block("type");
        let mut d = TestDriver::new(dev, 16);
        let state = d.transport.save();
        let vsock = Vsock::new(3, &temp_path("type.sock")).unwrap();
        let err = MmioTransport::restore(
            Box::new(vsock),
            d.mem.clone(),
            IrqTrigger::new().unwrap(),
            &state,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("device type"), "{err}");
        d.transport.resume().unwrap();
        std::fs::remove_file(path).unwrap();
    }
}
