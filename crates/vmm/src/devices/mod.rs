//! Device models: COM1 serial, i8042, the virtio-mmio transport and the virtio
//! block, net and vsock devices. They operate on [`crate::memory::GuestMemory`]
//! (every device write to guest memory lands in its dirty bitmap) and never call KVM.
//!
//! # Wiring a virtio device into the VM
//! 1. Build the device model (e.g. [`virtio::block::Block::new`]) and wrap it:
//!    `MmioTransport::new(Box::new(dev), mem.clone())`.
//! 2. Give it a 4 KiB MMIO window ([`virtio::MMIO_WINDOW_SIZE`]) and a GSI; announce
//!    it on the kernel command line as `virtio_mmio.device=4K@0x<base>:<gsi>`.
//! 3. For each `(i, evt)` in `transport.queue_events()`, register `evt` as an
//!    ioeventfd at `base + QUEUE_NOTIFY_OFFSET` (0x50), length 4, datamatch `i as u32`.
//!    (Without it, QueueNotify writes reaching [`virtio::MmioTransport::write`] still work.)
//! 4. Register `transport.interrupt().eventfd()` as an irqfd for the GSI.
//! 5. Forward MMIO exits in the window to `transport.read(offset, data)` /
//!    `transport.write(offset, data)`, `offset` relative to the base.
//!
//! Caveat found in the lab: the Debian 6.1 cloud kernel is built with
//! `# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set` (virtio_mmio logs
//! "unknown parameter 'device' ignored"), so with that kernel the devices must be
//! described another way (ACPI DSDT entries with _HID `LNRO0005`, which
//! virtio_mmio matches); the transport itself does not change.
//!
//! # Snapshot and restore
//! With vCPUs paused, `transport.save()` stops the device's I/O thread and returns
//! a serializable [`virtio::MmioState`]; `transport.resume()` continues. To restore,
//! build the same device from the same configuration and call
//! [`virtio::MmioTransport::restore`] with the guest memory and the saved state. That
//! starts nothing: a live device is activated on the saved queue positions, and an
//! interrupt pending at snapshot time is signalled again, on the first
//! `transport.resume()`, after the VMM restored the irqchip and vCPUs. vsock drops its
//! connections on restore and tells the guest with a TRANSPORT_RESET event.
//!
//! # Legacy devices
//! [`legacy::SerialDevice`] is COM1 (PIO 0x3f8..0x3ff, IRQ 4 through an irqfd
//! EventFd); [`legacy::I8042`] sits at PIO 0x60 and 0x64 and signals the guest's
//! reset request on an EventFd.

pub mod legacy;
pub mod virtio;
