//! `oci`: an OCI image converted to an ext4 disk (label `oci`) holding a
//! runtime bundle: `/config.json` and `/rootfs`.

use std::fs;
use std::path::{Path, PathBuf};

use tracing::info;

use crate::bundle::runtime_spec;
use crate::error::{BlueprintError, IoContext, Result};
use crate::ext4::Ext4Image;
use crate::image::{from_docker_archive, from_layout, ResolvedImage};
use crate::layer::{apply_layer, open_layer};
use crate::progress::Progress;
use crate::registry::pull_to_layout;
use crate::tree::{Kind, Meta, Tree};

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// An OCI image layout directory.
    Layout(PathBuf),
    /// A `docker save` tarball.
    DockerArchive(PathBuf),
    /// A registry reference, pulled anonymously.
    Registry(String),
}

impl ImageSource {
    /// Parses `oci:<dir>`, `docker-archive:<file>`, `docker://<ref>`, or a
    /// bare argument: an existing directory is a layout, an existing file a
    /// docker archive, anything else a registry reference.
    pub fn parse(arg: &str) -> Self {
        if let Some(p) = arg.strip_prefix("oci:") {
            Self::Layout(p.into())
        } else if let Some(p) = arg.strip_prefix("docker-archive:") {
            Self::DockerArchive(p.into())
        } else if let Some(r) = arg.strip_prefix("docker://") {
            Self::Registry(r.to_owned())
        } else if Path::new(arg).is_dir() {
            Self::Layout(arg.into())
        } else if Path::new(arg).is_file() {
            Self::DockerArchive(arg.into())
        } else {
            Self::Registry(arg.to_owned())
        }
    }
}

/// Options of [`convert`].
#[derive(Debug, Clone)]
pub struct OciOptions {
    /// The image.
    pub source: ImageSource,
    /// Output image file (`oci.ext4`).
    pub output: PathBuf,
    /// Architecture to pick from multi-platform images (`amd64`).
    pub arch: String,
    /// Use plain HTTP for the registry.
    pub plain_http: bool,
    /// Free space to leave in the file system, in bytes.
    pub headroom: u64,
}

/// Converts the image; returns the size of the written disk.
pub fn convert(opts: &OciOptions) -> Result<u64> {
    let out_dir = match opts.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&out_dir).ctx("creating", &out_dir)?;
    // Stage next to the output: /tmp may be a small tmpfs.
    let work = tempfile::Builder::new()
        .prefix(".oci-build-")
        .tempdir_in(&out_dir)
        .ctx("creating a work directory in", &out_dir)?;

    let image = resolve(opts, work.path())?;
    let bundle = work.path().join("bundle");
    let mut rootfs = Tree::new(bundle.join("rootfs"))?;
    let progress = Progress::bar(image.layers.len() as u64, "applying layers");
    for layer in &image.layers {
        progress.set_message(&format!("applying layer {}", layer.name));
        let stats = apply_layer(&mut rootfs, &layer.name, &mut || {
            open_layer(&layer.path, layer.compression)
        })?;
        info!(layer = %layer.name, entries = stats.entries, whiteouts = stats.whiteouts, "layer applied");
        progress.inc(1);
    }
    progress.finish();

    let spec = runtime_spec(&image.config, &rootfs)?;
    let config_path = bundle.join("config.json");
    let json = serde_json::to_vec_pretty(&spec)
        .map_err(|e| BlueprintError::Invalid(format!("serialising config.json: {e}")))?;
    fs::write(&config_path, json).ctx("writing", &config_path)?;

    let root_meta = |mode| Meta {
        kind: Kind::Dir,
        uid: 0,
        gid: 0,
        mode,
        xattrs: Vec::new(),
    };
    let mut fixups = vec![
        (PathBuf::new(), root_meta(0o755)),
        (
            PathBuf::from("config.json"),
            Meta {
                kind: Kind::File,
                mode: 0o644,
                ..root_meta(0)
            },
        ),
    ];
    let rootfs_meta = rootfs
        .meta(Path::new(""))
        .cloned()
        .unwrap_or_else(|| root_meta(0o755));
    fixups.push((PathBuf::from("rootfs"), rootfs_meta));
    fixups.extend(
        rootfs
            .entries()
            .iter()
            .filter(|(rel, _)| !rel.as_os_str().is_empty())
            .map(|(rel, meta)| (Path::new("rootfs").join(rel), meta.clone())),
    );

    let spinner = Progress::spinner("writing oci.ext4");
    let size = Ext4Image {
        staging: &bundle,
        label: "oci",
        output: &opts.output,
        fixups,
        headroom: opts.headroom,
    }
    .build();
    spinner.finish();
    let size = size?;
    info!(output = %opts.output.display(), size, "oci disk written");
    Ok(size)
}

fn resolve(opts: &OciOptions, work: &Path) -> Result<ResolvedImage> {
    match &opts.source {
        ImageSource::Layout(dir) => from_layout(dir, &opts.arch),
        ImageSource::DockerArchive(file) => from_docker_archive(file, &work.join("archive")),
        ImageSource::Registry(reference) => {
            let layout = work.join("layout");
            pull_to_layout(reference, &layout, &opts.arch, opts.plain_http)?;
            from_layout(&layout, &opts.arch)
        }
    }
}
