//! A small real OCI image (one gzip layer with `/etc/passwd`, `/etc/group`,
//! a directory, a file and a symlink), shared by the `oci_image` target and
//! the seed writer.
#![allow(dead_code)]

use std::io::Write;

/// Content of `oci-layout`.
pub const OCI_LAYOUT: &str = r#"{"imageLayoutVersion":"1.0.0"}"#;

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h
}

fn add(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, mode: u32, data: &[u8]) {
    let mut h = header(kind, mode, data.len() as u64);
    b.append_data(&mut h, path, data).expect("tar entry");
}

/// The layer as an uncompressed tar.
pub fn layer_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    add(&mut b, tar::EntryType::Directory, "etc/", 0o755, b"");
    add(&mut b, tar::EntryType::Directory, "app/", 0o755, b"");
    add(
        &mut b,
        tar::EntryType::Regular,
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nfuzz:x:1000:1000::/app:/bin/sh\n",
    );
    add(
        &mut b,
        tar::EntryType::Regular,
        "etc/group",
        0o644,
        b"root:x:0:\nfuzz:x:1000:\n",
    );
    add(
        &mut b,
        tar::EntryType::Regular,
        "app/run.sh",
        0o755,
        b"#!/bin/sh\necho up\n",
    );
    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
    b.append_link(&mut h, "app/current", "run.sh")
        .expect("symlink");
    let mut h = header(tar::EntryType::Link, 0o755, 0);
    b.append_link(&mut h, "app/again.sh", "app/run.sh")
        .expect("hard link");
    add(&mut b, tar::EntryType::Regular, "app/.wh.gone", 0o644, b"");
    b.into_inner().expect("tar")
}

/// The layer as stored (gzip).
pub fn layer() -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer_tar()).expect("gzip");
    gz.finish().expect("gzip")
}

/// The image config.
pub fn config() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {
            "Entrypoint": ["/app/run.sh"],
            "Cmd": ["--verbose"],
            "Env": ["PATH=/usr/bin:/bin", "MODE=fuzz"],
            "WorkingDir": "/app",
            "User": "fuzz:fuzz",
        },
    }))
    .expect("config")
}

/// A manifest naming `config` and one gzip layer.
pub fn manifest(config: &str, config_len: usize, layer: &str, layer_len: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config, "size": config_len,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer, "size": layer_len,
        }],
    }))
    .expect("manifest")
}

/// An index naming one linux/amd64 manifest.
pub fn index(manifest: &str, manifest_len: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest, "size": manifest_len,
            "platform": {"architecture": "amd64", "os": "linux"},
        }],
    }))
    .expect("index")
}
