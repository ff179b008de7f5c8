//! OCI image metadata as a registry or an image layout supplies it: the
//! index (nested indexes, platforms), the manifest (media types, digests,
//! layers) and the image config (entrypoint, command, environment, working
//! directory, user), resolved from an on-disk layout and turned into the
//! container's runtime spec over the image's real layer, as
//! `drafter-blueprint oci` does. The first input byte picks the document the
//! rest replaces: 0 `index.json`, 1 the manifest (stored as a blob under its
//! digest, the index pointing to it), 2 the config (the manifest pointing to
//! it). The other documents and the layer are those of a small real image.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use drafter_blueprint::bundle::runtime_spec;
use drafter_blueprint::image::{from_layout, sha256_reader};
use drafter_blueprint::layer::{apply_layer, open_layer};
use drafter_blueprint::tree::Tree;
use libfuzzer_sys::fuzz_target;

#[path = "oci_sample.rs"]
mod sample;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("scratch dir").keep())
}

fn digest(bytes: &[u8]) -> String {
    sha256_reader(&mut &bytes[..]).expect("hash")
}

/// Writes `bytes` as a blob; returns its digest.
fn blob(layout: &Path, bytes: &[u8]) -> String {
    let d = digest(bytes);
    std::fs::write(layout.join("blobs/sha256").join(&d[7..]), bytes).expect("blob");
    d
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, doc)) = data.split_first() else {
        return;
    };
    let layout = scratch().join("layout");
    let _ = std::fs::remove_dir_all(&layout);
    std::fs::create_dir_all(layout.join("blobs/sha256")).expect("layout");
    std::fs::write(layout.join("oci-layout"), sample::OCI_LAYOUT).expect("oci-layout");
    // The real image's blobs are all there; the fuzzed document replaces one.
    let layer = sample::layer();
    let layer_digest = blob(&layout, &layer);
    let config = sample::config();
    let real = sample::manifest(
        &blob(&layout, &config),
        config.len(),
        &layer_digest,
        layer.len(),
    );
    blob(&layout, &real);
    let index = match which % 3 {
        0 => doc.to_vec(),
        1 => sample::index(&blob(&layout, doc), doc.len()),
        _ => {
            let manifest =
                sample::manifest(&blob(&layout, doc), doc.len(), &layer_digest, layer.len());
            sample::index(&blob(&layout, &manifest), manifest.len())
        }
    };
    std::fs::write(layout.join("index.json"), index).expect("index");
    let Ok(image) = from_layout(&layout, "amd64") else {
        return;
    };
    let rootfs = scratch().join("rootfs");
    let _ = std::fs::remove_dir_all(&rootfs);
    let Ok(mut tree) = Tree::new(&rootfs) else {
        return;
    };
    for l in image.layers.iter().take(4) {
        if apply_layer(&mut tree, &l.name, &mut || {
            open_layer(&l.path, l.compression)
        })
        .is_err()
        {
            return;
        }
    }
    let _ = runtime_spec(&image.config, &tree);
});
