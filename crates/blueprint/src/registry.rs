//! Pulling an image from a registry into a local OCI image layout.

use std::fs;
use std::path::Path;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::json;

use crate::error::{BlueprintError, IoContext, Result};
use crate::image::{
    blob_path, Descriptor, Index, Manifest, INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES,
};
use crate::progress::Progress;

/// Parses an image reference (`registry/repo:tag`, `…@sha256:…`).
pub fn parse_reference(reference: &str) -> Result<Reference> {
    reference
        .parse()
        .map_err(|e| BlueprintError::Invalid(format!("invalid image reference {reference:?}: {e}")))
}

/// True for registries on the loopback interface, which are spoken to over
/// plain HTTP.
pub fn is_loopback(registry: &str) -> bool {
    let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
    host == "localhost" || host == "[::1]" || host.starts_with("127.")
}

/// Pulls `reference` (the linux/`arch` image of an index) into an OCI image
/// layout at `layout`, anonymously. `plain_http` forces HTTP for every
/// registry (loopback registries always use it).
pub fn pull_to_layout(reference: &str, layout: &Path, arch: &str, plain_http: bool) -> Result<()> {
    let reference = parse_reference(reference)?;
    let protocol = if plain_http || is_loopback(reference.resolve_registry()) {
        ClientProtocol::Http
    } else {
        ClientProtocol::Https
    };
    let client = Client::new(ClientConfig {
        protocol,
        ..Default::default()
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ctx("starting the async runtime for", layout)?;
    runtime.block_on(pull(&client, &reference, layout, arch))
}

fn registry_error(reference: &Reference, e: impl std::fmt::Display) -> BlueprintError {
    BlueprintError::Registry(format!("{reference}: {e}"))
}

async fn pull(client: &Client, reference: &Reference, layout: &Path, arch: &str) -> Result<()> {
    fs::create_dir_all(layout.join("blobs/sha256")).ctx("creating", layout)?;
    let accepted: Vec<&str> = MANIFEST_MEDIA_TYPES
        .iter()
        .chain(INDEX_MEDIA_TYPES)
        .copied()
        .collect();
    let auth = RegistryAuth::Anonymous;
    let (mut raw, mut digest) = client
        .pull_manifest_raw(reference, &auth, &accepted)
        .await
        .map_err(|e| registry_error(reference, e))?;
    let mut media_type = media_type_of(&raw)?;
    if INDEX_MEDIA_TYPES.contains(&media_type.as_str()) || media_type.is_empty() && is_index(&raw) {
        let index: Index = serde_json::from_slice(&raw)
            .map_err(|e| BlueprintError::InvalidImage(format!("image index: {e}")))?;
        let entry = index
            .manifests
            .iter()
            .find(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == arch)
            })
            .ok_or_else(|| {
                BlueprintError::InvalidImage(format!("{reference} has no linux/{arch} image"))
            })?;
        let by_digest = reference.clone_with_digest(entry.digest.clone());
        (raw, digest) = client
            .pull_manifest_raw(&by_digest, &auth, MANIFEST_MEDIA_TYPES)
            .await
            .map_err(|e| registry_error(reference, e))?;
        media_type = media_type_of(&raw)?;
    }
    if media_type.is_empty() {
        media_type = MANIFEST_MEDIA_TYPES[0].to_owned();
    }
    if !MANIFEST_MEDIA_TYPES.contains(&media_type.as_str()) {
        return Err(BlueprintError::UnsupportedMediaType(media_type));
    }
    let manifest: Manifest = serde_json::from_slice(&raw)
        .map_err(|e| BlueprintError::InvalidImage(format!("image manifest: {e}")))?;
    let manifest_path = blob_path(layout, &digest)?;
    fs::write(&manifest_path, &raw).ctx("writing", &manifest_path)?;

    let blobs: Vec<&Descriptor> = std::iter::once(&manifest.config)
        .chain(&manifest.layers)
        .collect();
    let progress = Progress::bar(
        blobs.iter().map(|d| d.size).sum(),
        &format!("pulling {reference}"),
    );
    for desc in blobs {
        let path = blob_path(layout, &desc.digest)?;
        let file = tokio::fs::File::create(&path)
            .await
            .ctx("creating", &path)?;
        client
            .pull_blob(reference, desc.digest.as_str(), file)
            .await
            .map_err(|e| registry_error(reference, e))?;
        progress.inc(desc.size);
    }
    progress.finish();

    let index = json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPES[0],
        "manifests": [{ "mediaType": media_type, "digest": digest, "size": raw.len() }],
    });
    let index_path = layout.join("index.json");
    fs::write(&index_path, index.to_string()).ctx("writing", &index_path)?;
    let marker = layout.join("oci-layout");
    fs::write(&marker, r#"{"imageLayoutVersion":"1.0.0"}"#).ctx("writing", &marker)?;
    Ok(())
}

fn media_type_of(raw: &[u8]) -> Result<String> {
    let v: serde_json::Value = serde_json::from_slice(raw)
        .map_err(|e| BlueprintError::InvalidImage(format!("manifest is not JSON: {e}")))?;
    Ok(v["mediaType"].as_str().unwrap_or_default().to_owned())
}

fn is_index(raw: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(raw).is_ok_and(|v| v.get("manifests").is_some())
}
