//! OCI layer tars as an image registry serves them: applied (whiteouts,
//! opaque directories, hard and symbolic links, xattrs, modes) onto a staged
//! root file system, whose `/etc/passwd` and `/etc/group` then resolve the
//! image's user, as `drafter-blueprint oci` does; or unpacked as a
//! `docker save` archive. Nothing may be written outside the staging
//! directory. The first input byte picks how the rest is read: 0 a tar,
//! 1 a tar this target gzips, 2 a tar this target zstd-compresses, 3 a
//! compressed layer as is (format sniffed), 4+ a `docker save` archive.
#![no_main]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use drafter_blueprint::bundle::runtime_spec;
use drafter_blueprint::image::{from_docker_archive, ContainerConfig, ImageConfig};
use drafter_blueprint::layer::{apply_layer, open_layer, Compression};
use drafter_blueprint::tree::Tree;
use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("scratch dir").keep())
}

/// Everything under `dir` except `keep`, as relative paths.
fn listing(dir: &Path, keep: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("list scratch").flatten() {
        if e.file_name() != keep {
            out.push(PathBuf::from(e.file_name()));
        }
    }
    out.sort();
    out
}

fn clear(path: &Path) {
    // Root (the fuzzer runs as root) removes whatever modes the layer set.
    let _ = std::fs::remove_dir_all(path);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let dir = scratch();
    let work = dir.join("work");
    clear(&work);
    std::fs::create_dir_all(work.join("outside")).expect("outside dir");
    let blob = work.join("layer");
    let (bytes, compression) = match mode {
        0 => (rest.to_vec(), Some(Compression::None)),
        1 => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(rest).expect("gzip");
            (gz.finish().expect("gzip"), Some(Compression::Gzip))
        }
        2 => (
            zstd::bulk::compress(rest, 1).expect("zstd"),
            Some(Compression::Zstd),
        ),
        _ => (rest.to_vec(), None),
    };
    std::fs::write(&blob, &bytes).expect("write layer");
    let before = listing(&work, "");
    if mode >= 4 {
        let _ = from_docker_archive(&blob, &work.join("docker"));
    } else {
        let mut tree = Tree::new(work.join("rootfs")).expect("tree");
        let applied = apply_layer(&mut tree, "fuzz", &mut || open_layer(&blob, compression));
        if applied.is_ok() {
            for user in ["fuzz", "fuzz:fuzz", "1000:1000", "0"] {
                let config = ImageConfig {
                    architecture: "amd64".into(),
                    config: Some(ContainerConfig {
                        entrypoint: Some(vec!["/bin/sh".into()]),
                        user: Some(user.into()),
                        ..Default::default()
                    }),
                };
                let _ = runtime_spec(&config, &tree);
            }
        }
    }
    // The layer wrote only inside its staging directory.
    let mut after = listing(&work, "");
    after.retain(|p| p != Path::new("rootfs") && p != Path::new("docker"));
    assert_eq!(after, before, "a layer created files beside its root");
    assert!(
        listing(&work.join("outside"), "").is_empty(),
        "a layer wrote outside its root"
    );
    assert!(
        listing(dir, "work").is_empty(),
        "a layer wrote outside its root"
    );
});
