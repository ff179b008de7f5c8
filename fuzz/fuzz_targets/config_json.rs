//! The JSON a user hands to the command-line tools: the first input byte
//! picks the parser, the rest is the text. Covered: the snapshotter's,
//! runner's, registry's and terminator's `--devices`, the package's
//! `config.json`, the peer's Go-style `--devices` settings, `drafter-vmm`'s
//! `--config` file and the packager's device list.
#![no_main]

use drafter::devices::{PackageDevices, RegistryDevices, SnapshotDevices, TerminatorDevices};
use drafter::migration::SourceOptions;
use drafter::package_config::PackageConfig;
use drafter_vmm::config::parse_mac;
use drafter_vmm::VmConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, text)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    match which % 8 {
        0 => {
            if let Ok(d) = SnapshotDevices::parse(text) {
                for dev in &d.devices {
                    let _ = d.output(&dev.name);
                }
                let _ = d.drives().count();
            }
        }
        1 => {
            if let Ok(d) = PackageDevices::parse(text) {
                for dev in &d.devices {
                    let _ = d.path(&dev.name);
                }
            }
        }
        2 => drop(RegistryDevices::parse(text)),
        3 => drop(TerminatorDevices::parse(text)),
        4 => {
            if let Ok(c) = PackageConfig::from_json(text, "config.json") {
                // What was accepted is written back and read again unchanged.
                let again = PackageConfig::from_json(&c.to_json(), "config.json");
                assert!(
                    matches!(&again, Ok(a) if *a == c),
                    "{c:?} re-read as {again:?}"
                );
            }
        }
        5 => drop(drafter::peer::apply_devices_json(
            &mut SourceOptions::default(),
            text,
        )),
        6 => {
            if let Ok(c) = serde_json::from_str::<VmConfig>(text) {
                if let Some(mac) = c.net.as_ref().and_then(|n| n.mac.as_deref()) {
                    let _ = parse_mac(mac);
                }
            }
        }
        _ => drop(drafter_package::parse_device_specs(text)),
    }
});
