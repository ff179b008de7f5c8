//! Wires the device models into the VM: COM1 and i8042 on the port-I/O bus,
//! virtio devices on the MMIO bus (4 KiB windows from `VIRTIO_MMIO_START`, GSIs
//! from 5), their queue EventFds as ioeventfds and interrupts as irqfds; the
//! `(base, gsi)` list goes into the ACPI DSDT (kernels may lack
//! `virtio_mmio.device=` command-line support).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::{SleepControl, PM1_LEN, PM1_PORT};
use crate::arch::x86_64::layout::{FIRST_VIRTIO_GSI, LAST_GSI, VIRTIO_MMIO_START};
use crate::bus::{BusDevice, Buses};
use crate::config::{parse_mac, VmConfig};
use crate::devices::legacy::{
    SerialDevice, SerialSnapshot, COM1_IRQ, COM1_PIO_BASE, COM1_PIO_SIZE, I8042, I8042_PIO_BASE,
    I8042_PIO_SIZE,
};
use crate::devices::virtio::block::{Block, DriveDirtyLog};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{
    IrqTrigger, MmioState, MmioTransport, VirtioDevice, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET,
};
use crate::memory::GuestMemory;
use crate::vcpu_thread::ExitStatus;
use crate::vstate::Vm;

/// Guest console output sink.
pub type ConsoleOut = Box<dyn Write + Send>;

/// MAC address used when the configuration gives none.
pub const DEFAULT_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];

/// A device could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DeviceSetupError(pub String);

fn err(what: impl std::fmt::Display) -> DeviceSetupError {
    DeviceSetupError(what.to_string())
}

/// Device state in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialSnapshot,
    /// virtio transports in configuration order (drives, net, vsock).
    pub virtio: Vec<MmioState>,
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = SerialDevice::read(self, offset as u16);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            SerialDevice::write(self, offset as u16, *b);
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = I8042::read(self, offset as u16);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            I8042::write(self, offset as u16, *b);
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data);
    }
}

/// The VM's devices and the buses that reach them.
pub struct DeviceManager {
    serial: Arc<Mutex<SerialDevice>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    mmio_devices: Vec<(u64, u32)>,
    drive_dirty: Vec<(String, DriveDirtyLog)>,
    reset_wake: EventFd,
    reset_stop: Arc<AtomicBool>,
    reset_thread: Option<JoinHandle<()>>,
}

/// The device models of `config`, with the dirty log of each drive.
type Models = (Vec<Box<dyn VirtioDevice>>, Vec<(String, DriveDirtyLog)>);

fn models(config: &VmConfig) -> Result<Models, DeviceSetupError> {
    let mut out: Vec<Box<dyn VirtioDevice>> = Vec::new();
    let mut logs = Vec::new();
    for d in &config.drives {
        let b = Block::new(&d.name, &d.path, d.read_only)
            .map_err(|e| err(format!("drive '{}' ({}): {e}", d.name, d.path.display())))?;
        logs.push((d.name.clone(), b.dirty_log()));
        out.push(Box::new(b));
    }
    if let Some(n) = &config.net {
        let mac = match &n.mac {
            Some(m) => parse_mac(m).ok_or_else(|| err(format!("invalid MAC address '{m}'")))?,
            None => DEFAULT_MAC,
        };
        let net = Net::new(&n.tap, n.netns.as_deref(), mac)
            .map_err(|e| err(format!("tap '{}': {e}", n.tap)))?;
        out.push(Box::new(net));
    }
    if let Some(v) = &config.vsock {
        let vs = Vsock::new(u64::from(v.cid), &v.uds_path)
            .map_err(|e| err(format!("vsock at {}: {e}", v.uds_path.display())))?;
        out.push(Box::new(vs));
    }
    Ok((out, logs))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DeviceManager {
    /// Builds every device of `config` (from `saved` state when restoring),
    /// registers its EventFds with `vm` and maps it on `pio`/`mmio`.
    ///
    /// Restoring has no side effects on the guest: no device I/O starts and no
    /// interrupt is signalled (KVM's interrupt-controller state, restored after
    /// this, would wipe it). [`DeviceManager::resume`] starts restored devices
    /// and signals the interrupts that were pending when the snapshot was taken.
    pub fn build(
        vm: &Vm,
        mem: &GuestMemory,
        config: &VmConfig,
        console: ConsoleOut,
        exits: Sender<ExitStatus>,
        saved: Option<&DevicesState>,
        buses: &mut Buses,
    ) -> Result<DeviceManager, DeviceSetupError> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(err)?;
        vm.register_irqfd(&irq, COM1_IRQ).map_err(err)?;
        let serial = match saved {
            Some(s) => SerialDevice::restore(irq, console, &s.serial).map_err(err)?,
            None => SerialDevice::new(irq, console).map_err(err)?,
        };
        let serial = Arc::new(Mutex::new(serial));
        buses
            .pio
            .insert(
                u64::from(COM1_PIO_BASE),
                u64::from(COM1_PIO_SIZE),
                serial.clone(),
            )
            .map_err(err)?;

        let reset_evt = EventFd::new(0).map_err(err)?;
        let reset_wake = reset_evt.try_clone().map_err(err)?;
        let i8042 = I8042::new(reset_evt.try_clone().map_err(err)?);
        buses
            .pio
            .insert(
                u64::from(I8042_PIO_BASE),
                u64::from(I8042_PIO_SIZE),
                Arc::new(Mutex::new(i8042)),
            )
            .map_err(err)?;
        let reset_stop = Arc::new(AtomicBool::new(false));
        let reset_exits = exits.clone();
        let stop = reset_stop.clone();
        let reset_thread = std::thread::Builder::new()
            .name("i8042-reset".into())
            .spawn(move || {
                // Blocks until the guest pulses reset (or the VMM wakes us to stop).
                if reset_evt.read().is_ok() && !stop.load(Ordering::SeqCst) {
                    let _ = reset_exits.send(ExitStatus::Reboot);
                }
            })
            .map_err(err)?;

        let poweroff = Mutex::new(exits.clone());
        let sleep = SleepControl::new(move || {
            let _ = lock(&poweroff).send(ExitStatus::Poweroff);
        });
        buses
            .pio
            .insert(u64::from(PM1_PORT), PM1_LEN, Arc::new(Mutex::new(sleep)))
            .map_err(err)?;

        let (devices, drive_dirty) = models(config)?;
        if let Some(s) = saved {
            if s.virtio.len() != devices.len() {
                return Err(err(format!(
                    "snapshot has {} virtio devices, the configuration {}",
                    s.virtio.len(),
                    devices.len()
                )));
            }
        }
        let mut virtio = Vec::new();
        let mut mmio_devices = Vec::new();
        for (i, dev) in devices.into_iter().enumerate() {
            let base = VIRTIO_MMIO_START + i as u64 * MMIO_WINDOW_SIZE;
            let gsi = FIRST_VIRTIO_GSI + i as u32;
            if gsi > LAST_GSI {
                return Err(err("too many virtio devices (out of interrupt lines)"));
            }
            let irq = IrqTrigger::new().map_err(err)?;
            let t = match saved {
                Some(s) => MmioTransport::restore(dev, mem.clone(), irq, &s.virtio[i]),
                None => MmioTransport::with_irq(dev, mem.clone(), irq),
            }
            .map_err(|e| err(format!("virtio device {i}: {e}")))?;
            vm.register_irqfd(t.interrupt().eventfd(), gsi)
                .map_err(err)?;
            for (q, evt) in t.queue_events().iter().enumerate() {
                vm.register_mmio_ioevent(evt, base + QUEUE_NOTIFY_OFFSET, Some(q as u32))
                    .map_err(err)?;
            }
            let t = Arc::new(Mutex::new(t));
            buses
                .mmio
                .insert(base, MMIO_WINDOW_SIZE, t.clone())
                .map_err(err)?;
            virtio.push(t);
            mmio_devices.push((base, gsi));
        }
        Ok(DeviceManager {
            serial,
            virtio,
            mmio_devices,
            drive_dirty,
            reset_wake,
            reset_stop,
            reset_thread: Some(reset_thread),
        })
    }

    /// `(MMIO base, GSI)` of every virtio device, in guest order.
    pub fn mmio_devices(&self) -> &[(u64, u32)] {
        &self.mmio_devices
    }

    /// The dirty log of the drive called `name` (see [`DriveDirtyLog`]).
    pub fn drive_dirty_log(&self, name: &str) -> Option<&DriveDirtyLog> {
        self.drive_dirty
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, log)| log)
    }

    /// COM1 (to feed input).
    pub fn serial(&self) -> &Arc<Mutex<SerialDevice>> {
        &self.serial
    }

    /// Stops device I/O (no more writes to guest memory).
    pub fn pause(&self) {
        for t in &self.virtio {
            lock(t).pause();
        }
    }

    /// Restarts device I/O. After a restore, the first call also activates the
    /// virtio devices that were live and re-signals interrupts that were
    /// pending (virtio InterruptStatus, the UART's IIR): call it only once the
    /// VM's interrupt controllers and vCPUs are restored.
    pub fn resume(&self) -> Result<(), DeviceSetupError> {
        lock(&self.serial)
            .resume()
            .map_err(|e| err(format!("serial interrupt: {e}")))?;
        for (i, t) in self.virtio.iter().enumerate() {
            lock(t)
                .resume()
                .map_err(|e| err(format!("virtio device {i}: {e}")))?;
        }
        Ok(())
    }

    /// Saves every device (pausing virtio I/O).
    pub fn save(&self) -> DevicesState {
        DevicesState {
            serial: lock(&self.serial).save(),
            virtio: self.virtio.iter().map(|t| lock(t).save()).collect(),
        }
    }
}

impl Drop for DeviceManager {
    fn drop(&mut self) {
        self.pause();
        self.reset_stop.store(true, Ordering::SeqCst);
        let _ = self.reset_wake.write(1);
        if let Some(t) = self.reset_thread.take() {
            let _ = t.join();
        }
    }
}
