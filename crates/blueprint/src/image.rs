//! Reading images: OCI image layouts and `docker save` archives, resolved to
//! an image config plus the layer blobs on disk, in order.

use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{BlueprintError, IoContext, Result};
use crate::layer::Compression;

/// Media types of image indexes / manifest lists.
pub const INDEX_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
/// Media types of image manifests.
pub const MANIFEST_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type.
    #[serde(default)]
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    #[serde(default)]
    pub size: u64,
    /// Platform, in indexes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// An image platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture (`amd64`).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Media type, if stated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The image config blob.
    pub config: Descriptor,
    /// Layers, bottom first.
    pub layers: Vec<Descriptor>,
}

/// An image index (OCI) or manifest list (Docker).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Media type, if stated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Entries.
    pub manifests: Vec<Descriptor>,
}

/// The parts of an image config the bundle needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImageConfig {
    /// Architecture the image was built for.
    #[serde(default)]
    pub architecture: String,
    /// Process defaults.
    #[serde(default)]
    pub config: Option<ContainerConfig>,
}

/// Process defaults from the image config.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContainerConfig {
    /// `Entrypoint`.
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    /// `Cmd`.
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    /// `Env` (`KEY=value`).
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    /// `WorkingDir`.
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    /// `User` (`uid`, `uid:gid`, `name`, `name:group`).
    #[serde(rename = "User", default)]
    pub user: Option<String>,
}

/// One layer blob on disk.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    /// Digest or archive path, for messages.
    pub name: String,
    /// Blob file.
    pub path: PathBuf,
    /// Declared compression (`None`: sniff).
    pub compression: Option<Compression>,
}

/// An image resolved to its config and layer files.
#[derive(Debug)]
pub struct ResolvedImage {
    /// The image config.
    pub config: ImageConfig,
    /// Layers, bottom first.
    pub layers: Vec<LayerBlob>,
}

/// Validates a digest and returns the blob path under `blobs/`.
pub fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf> {
    let (alg, hex) = digest
        .split_once(':')
        .ok_or_else(|| BlueprintError::InvalidImage(format!("malformed digest {digest:?}")))?;
    let valid = alg == "sha256" && hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    if !valid {
        return Err(BlueprintError::InvalidImage(format!(
            "unsupported or malformed digest {digest:?}"
        )));
    }
    Ok(layout.join("blobs").join(alg).join(hex))
}

/// Hashes `path` and checks it against `digest`.
pub fn verify_blob(path: &Path, digest: &str) -> Result<()> {
    let mut file = fs::File::open(path).ctx("opening blob", path)?;
    let actual = sha256_reader(&mut file).ctx("reading blob", path)?;
    if actual != digest {
        return Err(BlueprintError::DigestMismatch {
            digest: digest.to_owned(),
            actual,
        });
    }
    Ok(())
}

/// `sha256:<hex>` of everything `r` yields.
pub fn sha256_reader(r: &mut dyn Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let bytes = fs::read(path).ctx("reading", path)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| BlueprintError::InvalidImage(format!("{what} {}: {e}", path.display())))
}

/// Reads an OCI image layout directory, picking the linux/`arch` manifest
/// when the layout holds an index of several.
pub fn from_layout(layout: &Path, arch: &str) -> Result<ResolvedImage> {
    if !layout.join("oci-layout").is_file() {
        return Err(BlueprintError::InvalidImage(format!(
            "{} is not an OCI image layout (no oci-layout file)",
            layout.display()
        )));
    }
    let index: Index = read_json(&layout.join("index.json"), "image index")?;
    let manifest_desc = pick_manifest(layout, &index, arch, 0)?;
    let path = blob_path(layout, &manifest_desc.digest)?;
    verify_blob(&path, &manifest_desc.digest)?;
    let manifest: Manifest = read_json(&path, "image manifest")?;
    resolve_manifest(layout, &manifest)
}

fn pick_manifest(layout: &Path, index: &Index, arch: &str, depth: usize) -> Result<Descriptor> {
    if depth > 4 {
        return Err(BlueprintError::InvalidImage(
            "image indexes nest too deeply".into(),
        ));
    }
    let fits = |d: &Descriptor| {
        d.platform
            .as_ref()
            .is_none_or(|p| p.os == "linux" && p.architecture == arch)
    };
    for desc in index.manifests.iter().filter(|d| fits(d)) {
        if MANIFEST_MEDIA_TYPES.contains(&desc.media_type.as_str()) {
            return Ok(desc.clone());
        }
        if INDEX_MEDIA_TYPES.contains(&desc.media_type.as_str()) {
            let path = blob_path(layout, &desc.digest)?;
            verify_blob(&path, &desc.digest)?;
            let nested: Index = read_json(&path, "image index")?;
            return pick_manifest(layout, &nested, arch, depth + 1);
        }
    }
    Err(BlueprintError::InvalidImage(format!(
        "no image manifest for linux/{arch} in the index"
    )))
}

/// Resolves a manifest's config and layers inside a layout directory.
pub fn resolve_manifest(layout: &Path, manifest: &Manifest) -> Result<ResolvedImage> {
    let config_path = blob_path(layout, &manifest.config.digest)?;
    verify_blob(&config_path, &manifest.config.digest)?;
    let config: ImageConfig = read_json(&config_path, "image config")?;
    let mut layers = Vec::new();
    for desc in &manifest.layers {
        let compression = Compression::from_media_type(&desc.media_type)?;
        let path = blob_path(layout, &desc.digest)?;
        verify_blob(&path, &desc.digest)?;
        layers.push(LayerBlob {
            name: desc.digest.clone(),
            path,
            compression: Some(compression),
        });
    }
    Ok(ResolvedImage { config, layers })
}

#[derive(Deserialize)]
struct DockerManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// Reads a `docker save` archive, unpacking it into `work`.
pub fn from_docker_archive(archive: &Path, work: &Path) -> Result<ResolvedImage> {
    let file = fs::File::open(archive).ctx("opening", archive)?;
    fs::create_dir_all(work).ctx("creating", work)?;
    tar::Archive::new(io::BufReader::new(file))
        .unpack(work)
        .map_err(|e| {
            BlueprintError::InvalidImage(format!(
                "{} is not a readable tar archive: {e}",
                archive.display()
            ))
        })?;
    let entries: Vec<DockerManifestEntry> =
        read_json(&work.join("manifest.json"), "docker manifest").map_err(|e| match e {
            BlueprintError::Io { .. } => BlueprintError::InvalidImage(format!(
                "{} is not a `docker save` archive (no manifest.json)",
                archive.display()
            )),
            other => other,
        })?;
    let entry = match entries.as_slice() {
        [one] => one,
        [] => {
            return Err(BlueprintError::InvalidImage(
                "docker manifest.json lists no image".into(),
            ))
        }
        _ => {
            return Err(BlueprintError::InvalidImage(
                "docker archive holds several images; save just one".into(),
            ))
        }
    };
    let inside = |rel: &str| -> Result<PathBuf> {
        let p = Path::new(rel);
        if p.components().all(|c| matches!(c, Component::Normal(_))) {
            Ok(work.join(p))
        } else {
            Err(BlueprintError::InvalidImage(format!(
                "archive path {rel:?} escapes the archive"
            )))
        }
    };
    let config: ImageConfig = read_json(&inside(&entry.config)?, "image config")?;
    let layers = entry
        .layers
        .iter()
        .map(|l| {
            let path = inside(l)?;
            if !path.is_file() {
                return Err(BlueprintError::InvalidImage(format!(
                    "layer {l} missing from the archive"
                )));
            }
            Ok(LayerBlob {
                name: l.clone(),
                path,
                compression: None,
            })
        })
        .collect::<Result<_>>()?;
    Ok(ResolvedImage { config, layers })
}
