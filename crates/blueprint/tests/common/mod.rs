//! A small busybox image built by the tests themselves, written as an OCI
//! layout, a `docker save` archive, or pushed to a registry.

#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};

pub const GZ_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const BUSYBOX: &str = "/bin/busybox";

pub struct TestImage {
    /// (gzip-compressed tar, media type)
    pub layers: Vec<(Vec<u8>, String)>,
    pub config: Vec<u8>,
}

pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn header(kind: tar::EntryType, mode: u32, uid: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h
}

fn gz(tar_bytes: Vec<u8>) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(&tar_bytes).unwrap();
    e.finish().unwrap()
}

impl TestImage {
    /// Layer 1: busybox (+ a hard link and a symlink), passwd/group, a home
    /// owned by uid 1000 with an xattr'd file, /dev/null, a file to delete.
    /// Layer 2: whiteouts that file and adds a marker.
    pub fn busybox() -> Self {
        let bb = fs::read(BUSYBOX).expect("busybox-static must be installed");
        let mut l1 = tar::Builder::new(Vec::new());
        let add = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, uid: u64, data: &[u8]| {
            let mut h = header(tar::EntryType::Regular, mode, uid, data.len() as u64);
            b.append_data(&mut h, path, data).unwrap();
        };
        for d in ["bin/", "etc/", "home/", "tmp/", "dev/"] {
            let mut h = header(
                tar::EntryType::Directory,
                if d == "tmp/" { 0o1777 } else { 0o755 },
                0,
                0,
            );
            l1.append_data(&mut h, d, &[][..]).unwrap();
        }
        add(&mut l1, "bin/busybox", 0o755, 0, &bb);
        let mut h = header(tar::EntryType::Link, 0o755, 0, 0);
        l1.append_link(&mut h, "bin/sh", "bin/busybox").unwrap();
        let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0);
        l1.append_link(&mut h, "bin/echo", "busybox").unwrap();
        add(
            &mut l1,
            "etc/passwd",
            0o644,
            0,
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        );
        add(
            &mut l1,
            "etc/group",
            0o644,
            0,
            b"root:x:0:\napp:x:1000:\nstaff:x:50:\n",
        );
        let mut h = header(tar::EntryType::Directory, 0o750, 1000, 0);
        l1.append_data(&mut h, "home/app/", &[][..]).unwrap();
        l1.append_pax_extensions([("SCHILY.xattr.user.origin", &b"drafter-test"[..])])
            .unwrap();
        add(
            &mut l1,
            "home/app/data",
            0o640,
            1000,
            b"hello from the image\n",
        );
        add(&mut l1, "tmp/gone", 0o644, 0, b"deleted by layer 2\n");
        let mut h = header(tar::EntryType::Char, 0o666, 0, 0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        l1.append_data(&mut h, "dev/null", &[][..]).unwrap();

        let mut l2 = tar::Builder::new(Vec::new());
        add(&mut l2, "tmp/.wh.gone", 0o644, 0, b"");
        add(&mut l2, "etc/layer2", 0o600, 0, b"second layer\n");

        let layers: Vec<(Vec<u8>, String)> = [l1, l2]
            .into_iter()
            .map(|b| (gz(b.into_inner().unwrap()), GZ_LAYER.to_owned()))
            .collect();
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Entrypoint": ["/bin/sh", "-c"],
                "Cmd": ["echo hi; sleep 1000"],
                "Env": ["PATH=/bin", "GREETING=hello"],
                "WorkingDir": "/home/app",
                "User": "app:staff",
            },
            "rootfs": { "type": "layers", "diff_ids": [] },
        });
        Self {
            layers,
            config: serde_json::to_vec(&config).unwrap(),
        }
    }

    pub fn manifest(&self) -> Vec<u8> {
        let layers: Vec<_> = self
            .layers
            .iter()
            .map(|(d, mt)| json!({"mediaType": mt, "digest": digest(d), "size": d.len()}))
            .collect();
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest(&self.config),
                "size": self.config.len(),
            },
            "layers": layers,
        }))
        .unwrap()
    }

    /// Writes an OCI image layout.
    pub fn write_layout(&self, dir: &Path) {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        let put = |data: &[u8]| {
            let d = digest(data);
            fs::write(blobs.join(&d[7..]), data).unwrap();
            d
        };
        for (l, _) in &self.layers {
            put(l);
        }
        put(&self.config);
        let manifest = self.manifest();
        let md = put(&manifest);
        let index = json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": md,
                "size": manifest.len(),
                "platform": {"architecture": "amd64", "os": "linux"},
            }],
        });
        fs::write(dir.join("index.json"), index.to_string()).unwrap();
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    }

    /// Writes a `docker save`-style archive (uncompressed layer.tar files).
    pub fn write_docker_archive(&self, path: &Path) {
        let mut b = tar::Builder::new(fs::File::create(path).unwrap());
        let put = |b: &mut tar::Builder<fs::File>, name: &str, data: &[u8]| {
            let mut h = header(tar::EntryType::Regular, 0o644, 0, data.len() as u64);
            b.append_data(&mut h, name, data).unwrap();
        };
        let mut names = Vec::new();
        for (i, (l, _)) in self.layers.iter().enumerate() {
            let mut plain = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&l[..]), &mut plain)
                .unwrap();
            let name = format!("layer{i}/layer.tar");
            put(&mut b, &name, &plain);
            names.push(name);
        }
        let config_name = format!("{}.json", &digest(&self.config)[7..]);
        put(&mut b, &config_name, &self.config);
        let manifest =
            json!([{ "Config": config_name, "RepoTags": ["test:latest"], "Layers": names }]);
        put(&mut b, "manifest.json", manifest.to_string().as_bytes());
        b.finish().unwrap();
    }
}

/// Runs `debugfs -R <request>` on `image` and returns stdout.
pub fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (uid, gid, mode) of `path` inside `image`, from `debugfs stat`.
pub fn owner_mode(image: &Path, path: &str) -> (u32, u32, u32) {
    let stat = debugfs(image, &format!("stat \"{path}\""));
    let field = |name: &str| -> String {
        let at = stat
            .find(name)
            .unwrap_or_else(|| panic!("no {name} for {path}: {stat}"));
        stat[at + name.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    let mode = u32::from_str_radix(&field("Mode:"), 8).unwrap();
    (
        field("User:").parse().unwrap(),
        field("Group:").parse().unwrap(),
        mode,
    )
}
