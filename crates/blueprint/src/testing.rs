//! Fixtures the lab tests of several crates share: the `os` blueprint they
//! boot (built once on the host, in `target/blueprint/lab-os`, with hooks
//! whose output the tests check) and a Redis OCI image made from the host's
//! `redis-server`.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};

/// The lab blueprint's `BeforeSuspend` hook: remembers that it ran (in
/// `/run/hook-state`), increments [`LAB_BEFORE_SUSPEND_KEY`] in the guest's
/// Redis if one listens on 127.0.0.1:6379 (a trace a test reads through the
/// network), and prints `suspend-<hostname>`.
pub const LAB_BEFORE_SUSPEND: &str = "echo suspend-$(hostname) > /run/hook-state; \
     printf 'INCR drafter:before-suspend\\r\\nQUIT\\r\\n' | /usr/lib/drafter/busybox nc -w 5 127.0.0.1 6379 >/dev/null 2>&1; \
     cat /run/hook-state";

/// The lab blueprint's `AfterResume` hook: increments
/// [`LAB_AFTER_RESUME_KEY`] in the guest's Redis (if one listens) and prints
/// `resumed-after-<what BeforeSuspend left>`, so its output proves both ran.
pub const LAB_AFTER_RESUME: &str = "printf 'INCR drafter:after-resume\\r\\nQUIT\\r\\n' | /usr/lib/drafter/busybox nc -w 5 127.0.0.1 6379 >/dev/null 2>&1; \
     echo resumed-after-$(cat /run/hook-state)";

/// The Redis key [`LAB_BEFORE_SUSPEND`] increments.
pub const LAB_BEFORE_SUSPEND_KEY: &str = "drafter:before-suspend";

/// The Redis key [`LAB_AFTER_RESUME`] increments.
pub const LAB_AFTER_RESUME_KEY: &str = "drafter:after-resume";

/// Where the lab tests' `os` blueprint lives: `target/blueprint/lab-os`.
pub fn lab_os_dir(workspace_root: &Path) -> PathBuf {
    workspace_root.join("target/blueprint/lab-os")
}

/// True when the blueprint in `out` exists and is newer than `exe` (the
/// test binary: a rebuilt workspace may mean new guest binaries).
pub fn lab_os_is_fresh(out: &Path, exe: &Path) -> bool {
    let built = fs::metadata(out.join("rootfs.ext4"))
        .and_then(|m| m.modified())
        .ok();
    let exe = fs::metadata(exe).and_then(|m| m.modified()).ok();
    built.is_some() && built >= exe
}

/// Builds the lab blueprint into `out` with the `drafter-blueprint` binary
/// at `blueprint_bin`, exactly as a user would (guest binaries and kernel
/// found or fetched by the tool), with the lab hooks and 64 MiB headroom.
pub fn build_lab_os(blueprint_bin: &Path, workspace_root: &Path, out: &Path) -> io::Result<()> {
    let status = Command::new(blueprint_bin)
        .current_dir(workspace_root)
        .arg("os")
        .arg("--out-dir")
        .arg(out)
        .args(["--before-suspend-cmd", LAB_BEFORE_SUSPEND])
        .args(["--after-resume-cmd", LAB_AFTER_RESUME])
        .args(["--headroom-mib", "64"])
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{} os failed: {status}",
            blueprint_bin.display()
        )))
    }
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn gnu_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h
}

/// Writes an OCI image layout in `dir`: one layer with the host's Debian
/// `redis-server` and its libraries, running as `redis` on 0.0.0.0:6379 with
/// protected mode and persistence off.
pub fn write_redis_layout(dir: &Path) -> io::Result<()> {
    let server = fs::canonicalize("/usr/bin/redis-server")
        .map_err(|e| io::Error::new(e.kind(), format!("redis-server must be installed: {e}")))?;
    let ldd = Command::new("ldd").arg(&server).output()?;
    let mut files: Vec<(String, PathBuf)> = vec![("usr/bin/redis-server".into(), server)];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line
            .split("=>")
            .last()
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or("");
        if path.starts_with('/') {
            let name = Path::new(path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            files.push((
                format!("lib/x86_64-linux-gnu/{name}"),
                fs::canonicalize(path)?,
            ));
        }
    }
    files.push((
        "lib64/ld-linux-x86-64.so.2".into(),
        fs::canonicalize("/lib64/ld-linux-x86-64.so.2")?,
    ));
    let mut b = tar::Builder::new(Vec::new());
    for d in ["tmp/", "data/", "etc/"] {
        let mut h = gnu_header(tar::EntryType::Directory, 0o1777, 0);
        b.append_data(&mut h, d, &[][..])?;
    }
    let mut add = |path: &str, data: &[u8], mode: u32| {
        let mut h = gnu_header(tar::EntryType::Regular, mode, data.len() as u64);
        b.append_data(&mut h, path, data)
    };
    for (path, src) in &files {
        add(path, &fs::read(src)?, 0o755)?;
    }
    add(
        "etc/passwd",
        b"root:x:0:0:root:/:/bin/false\nredis:x:999:999::/data:/bin/false\n",
        0o644,
    )?;
    add("etc/group", b"root:x:0:\nredis:x:999:\n", 0o644)?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&b.into_inner()?)?;
    let layer = gz.finish()?;
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {
            "Entrypoint": ["/usr/bin/redis-server"],
            "Cmd": ["--protected-mode", "no", "--bind", "0.0.0.0", "--save", "", "--dir", "/data"],
            "User": "redis",
            "WorkingDir": "/data",
        },
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest(&layer),
            "size": layer.len(),
        }],
    }))?;
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    for blob in [&layer, &config, &manifest] {
        fs::write(blobs.join(&digest(blob)[7..]), blob)?;
    }
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(&manifest),
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
        }],
    });
    fs::write(dir.join("index.json"), index.to_string())?;
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
}
