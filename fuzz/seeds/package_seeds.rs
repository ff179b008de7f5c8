//! Package seeds: real packages written by `drafter_package::archive`.

use crate::Corpus;

/// A package's devices: (name, content).
type Devices = Vec<(&'static str, Vec<u8>)>;

/// Writes `package_archive` seeds: mode byte 1 + the `.tar.zst` as written,
/// and mode byte 0 + its tar stream (decompressed).
pub fn write(c: &Corpus) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut memory = vec![0u8; 3 * 4096];
    memory[4096..4200].copy_from_slice(&[0xab; 104]);
    let sets: [(&str, Devices); 3] = [
        (
            "two-devices",
            vec![("memory", memory), ("state", b"state bytes".to_vec())],
        ),
        ("empty-device", vec![("config", Vec::new())]),
        ("odd-size", vec![("disk", vec![7u8; 4097])]),
    ];
    for (name, devices) in sets {
        let mut files = Vec::new();
        for (dev, content) in &devices {
            let path = dir.path().join(format!("{name}-{dev}"));
            std::fs::write(&path, content).expect("write device");
            files.push((dev.to_string(), path));
        }
        let package = dir.path().join(format!("{name}.pkg"));
        drafter_package::archive(&package, &files, &mut drafter_package::no_progress)
            .expect("archive");
        let file = std::fs::read(&package).expect("read package");
        let tar = zstd::decode_all(&file[..]).expect("decompress package");
        c.put(
            "package_archive",
            &format!("{name}-zst"),
            &[&[1u8][..], &file].concat(),
        );
        c.put(
            "package_archive",
            &format!("{name}-tar"),
            &[&[0u8][..], &tar].concat(),
        );
    }
}
