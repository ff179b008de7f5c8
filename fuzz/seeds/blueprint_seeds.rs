//! OCI seeds: the documents and layer of a small real image (see
//! `oci_sample.rs`), and a `docker save` archive of it.

#[path = "../fuzz_targets/oci_sample.rs"]
mod sample;

use drafter_blueprint::image::sha256_reader;

use crate::Corpus;

fn digest(bytes: &[u8]) -> String {
    sha256_reader(&mut &bytes[..]).expect("hash")
}

fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, *data).expect("tar entry");
    }
    b.into_inner().expect("tar")
}

/// Writes the `oci_image` and `oci_layer` seeds.
pub fn write(c: &Corpus) {
    let layer = sample::layer();
    let config = sample::config();
    let manifest = sample::manifest(&digest(&config), config.len(), &digest(&layer), layer.len());
    let index = sample::index(&digest(&manifest), manifest.len());
    c.put("oci_image", "index", &[&[0u8][..], &index].concat());
    c.put("oci_image", "manifest", &[&[1u8][..], &manifest].concat());
    c.put("oci_image", "config", &[&[2u8][..], &config].concat());

    let tar = sample::layer_tar();
    c.put("oci_layer", "tar", &[&[0u8][..], &tar].concat());
    c.put("oci_layer", "tar-gzip", &[&[1u8][..], &tar].concat());
    c.put("oci_layer", "tar-zstd", &[&[2u8][..], &tar].concat());
    c.put("oci_layer", "layer-gz", &[&[3u8][..], &layer].concat());
    // A second layer: opaque directory and whiteouts over the first.
    let upper = tar_of(&[
        ("app/.wh..wh..opq", b""),
        ("etc/.wh.group", b""),
        ("app/new.txt", b"upper layer\n"),
    ]);
    c.put("oci_layer", "whiteouts", &[&[0u8][..], &upper].concat());
    let docker_manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": "config.json",
        "RepoTags": ["fuzz:latest"],
        "Layers": ["layer/layer.tar"],
    }]))
    .expect("docker manifest");
    let docker = tar_of(&[
        ("manifest.json", &docker_manifest),
        ("config.json", &config),
        ("layer/layer.tar", &tar),
    ]);
    c.put("oci_layer", "docker-save", &[&[4u8][..], &docker].concat());
}
