//! The drafter package format: manifest and archive of a VM's devices.
//!
//! A package is a zstd-compressed tar archive whose first entry is
//! `manifest.json` (`{"formatVersion":1,"devices":[{"name","size","blake3"}]}`)
//! followed by one entry per device, `devices/<name>`. [`archive`] writes
//! one from device files, [`extract`] verifies and writes any subset of its
//! devices back, [`read_manifest`] reads just the manifest.

mod archive;
mod devices;
mod error;
mod extract;
mod fsutil;
mod manifest;
mod progress;
mod sparse;

pub use archive::{archive, archive_with, ArchiveOptions, ArchiveReport, DEFAULT_LEVEL};
pub use devices::{parse_device_specs, DeviceSpec, DEFAULT_DEVICES_JSON};
pub use error::PackageError;
pub use extract::{extract, read_manifest, ExtractReport};
pub use manifest::{
    validate_name, DeviceEntry, Manifest, DEVICE_PREFIX, FORMAT_VERSION, MANIFEST_ENTRY,
    MAX_NAME_LEN,
};
pub use progress::{no_progress, Phase, Progress};
