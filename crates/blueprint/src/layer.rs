//! Applying OCI image layers (tar changesets) onto a [`Tree`].
//!
//! Each layer is read twice: first its whiteouts (`.wh.<name>`) and opaque
//! markers (`.wh..wh..opq`) delete from the lower layers, then its entries
//! are extracted. Deleting first makes whiteouts apply only to lower layers,
//! as the image spec requires, whatever the entry order in the archive.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use filetime::FileTime;

use crate::error::{BlueprintError, IoContext, Result};
use crate::tree::{Kind, Meta, Tree};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Layer compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// The compression a layer media type declares.
    pub fn from_media_type(media_type: &str) -> Result<Self> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd" => Ok(Self::Zstd),
            other => Err(BlueprintError::UnsupportedMediaType(other.to_owned())),
        }
    }

    /// Guesses the compression from a file's first bytes.
    pub fn sniff(head: &[u8]) -> Self {
        if head.starts_with(&[0x1f, 0x8b]) {
            Self::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Self::Zstd
        } else {
            Self::None
        }
    }
}

/// Opens a layer blob as a decompressed tar stream; `None` sniffs.
pub fn open_layer(path: &Path, compression: Option<Compression>) -> Result<Box<dyn Read>> {
    let compression = match compression {
        Some(c) => c,
        None => {
            let mut head = [0u8; 4];
            let mut f = fs::File::open(path).ctx("opening layer", path)?;
            let n = f.read(&mut head).ctx("reading layer", path)?;
            Compression::sniff(&head[..n])
        }
    };
    let file = io::BufReader::new(fs::File::open(path).ctx("opening layer", path)?);
    Ok(match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(file).ctx("opening zstd layer", path)?,
        ),
    })
}

/// Counts from applying one layer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries extracted.
    pub entries: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
}

/// Applies the layer that `open` yields (called twice) onto `tree`.
/// `name` identifies the layer in errors.
pub fn apply_layer(
    tree: &mut Tree,
    name: &str,
    open: &mut dyn FnMut() -> Result<Box<dyn Read>>,
) -> Result<LayerStats> {
    let corrupt = |reason: String| BlueprintError::CorruptLayer {
        layer: name.to_owned(),
        reason,
    };
    let mut stats = LayerStats::default();

    // Pass 1: deletions against the lower layers.
    let mut archive = tar::Archive::new(open()?);
    for entry in archive.entries().map_err(|e| corrupt(e.to_string()))? {
        let entry = entry.map_err(|e| corrupt(e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| corrupt(e.to_string()))?
            .into_owned();
        let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if file_name == OPAQUE_MARKER {
            let dir = path.parent().unwrap_or(Path::new(""));
            let dir_rel = tree.resolve(dir)?.unwrap_or_default();
            let abs = tree.root().join(&dir_rel);
            if abs.is_dir() {
                let children: Vec<PathBuf> = fs::read_dir(&abs)
                    .ctx("listing", &abs)?
                    .map(|e| e.map(|e| dir_rel.join(e.file_name())))
                    .collect::<io::Result<_>>()
                    .ctx("listing", &abs)?;
                for child in children {
                    tree.remove(&child)?;
                }
            }
            stats.whiteouts += 1;
        } else if let Some(hidden) = file_name.strip_prefix(WHITEOUT_PREFIX) {
            let target = path.with_file_name(hidden);
            if let Some(rel) = tree.resolve(&target)? {
                tree.remove(&rel)?;
            }
            stats.whiteouts += 1;
        }
    }

    // Pass 2: this layer's own entries.
    let mut archive = tar::Archive::new(open()?);
    for entry in archive.entries().map_err(|e| corrupt(e.to_string()))? {
        let mut entry = entry.map_err(|e| corrupt(e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| corrupt(e.to_string()))?
            .into_owned();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(WHITEOUT_PREFIX))
        {
            continue;
        }
        if extract_entry(tree, &mut entry, &path).map_err(|e| match e {
            BlueprintError::InvalidImage(reason) => corrupt(reason),
            other => other,
        })? {
            stats.entries += 1;
        }
    }
    Ok(stats)
}

/// Extracts one entry; returns whether anything was extracted.
fn extract_entry<R: Read>(
    tree: &mut Tree,
    entry: &mut tar::Entry<'_, R>,
    path: &Path,
) -> Result<bool> {
    let header = entry.header();
    let entry_type = header.entry_type();
    let bad = |what: &str| BlueprintError::InvalidImage(format!("{}: {what}", path.display()));
    let mode = header.mode().map_err(|_| bad("bad mode field"))? & 0o7777;
    let uid = u32::try_from(header.uid().map_err(|_| bad("bad uid field"))?)
        .map_err(|_| bad("uid out of range"))?;
    let gid = u32::try_from(header.gid().map_err(|_| bad("bad gid field"))?)
        .map_err(|_| bad("gid out of range"))?;
    let mtime = header.mtime().unwrap_or(0);
    let device = || -> Result<(u32, u32)> {
        let major = header.device_major().map_err(|_| bad("bad device major"))?;
        let minor = header.device_minor().map_err(|_| bad("bad device minor"))?;
        Ok((major.unwrap_or(0), minor.unwrap_or(0)))
    };
    let kind = match entry_type {
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
            Kind::File
        }
        tar::EntryType::Directory => Kind::Dir,
        tar::EntryType::Symlink => Kind::Symlink,
        tar::EntryType::Char => {
            let (a, b) = device()?;
            Kind::CharDevice(a, b)
        }
        tar::EntryType::Block => {
            let (a, b) = device()?;
            Kind::BlockDevice(a, b)
        }
        tar::EntryType::Fifo => Kind::Fifo,
        tar::EntryType::Link => {
            link_entry(tree, entry, path)?;
            return Ok(true);
        }
        // Global PAX headers and the like carry no file.
        _ => return Ok(false),
    };
    let xattrs = read_xattrs(entry)?;
    let meta = Meta {
        kind,
        uid,
        gid,
        mode,
        xattrs,
    };

    let Some(rel) = tree.resolve(path)? else {
        // The root directory itself: only its metadata matters.
        if kind == Kind::Dir {
            tree.record(PathBuf::new(), meta);
        }
        return Ok(true);
    };
    tree.ensure_parent(&rel)?;
    let abs = tree.root().join(&rel);
    let existing = fs::symlink_metadata(&abs).ok();
    if kind == Kind::Dir {
        if !existing.as_ref().is_some_and(|m| m.is_dir()) {
            tree.remove(&rel)?;
            fs::create_dir(&abs).ctx("creating directory", &abs)?;
        }
        set_mode(&abs, mode | 0o700)?;
        tree.record(rel, meta);
        return Ok(true);
    }
    if existing.is_some() {
        tree.remove(&rel)?;
    }
    match kind {
        Kind::Symlink => {
            let target = entry
                .link_name()
                .map_err(|_| bad("unreadable symlink target"))?
                .ok_or_else(|| bad("symlink without target"))?
                .into_owned();
            std::os::unix::fs::symlink(&target, &abs).ctx("creating symlink", &abs)?;
            let t = FileTime::from_unix_time(i64::try_from(mtime).unwrap_or(0), 0);
            filetime::set_symlink_file_times(&abs, t, t).ctx("setting times of", &abs)?;
        }
        Kind::File => {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&abs)
                .ctx("creating", &abs)?;
            io::copy(entry, &mut file).map_err(|e| bad(&format!("truncated content: {e}")))?;
            drop(file);
            set_mode(&abs, (mode & 0o777) | 0o600)?;
            let t = FileTime::from_unix_time(i64::try_from(mtime).unwrap_or(0), 0);
            filetime::set_file_times(&abs, t, t).ctx("setting times of", &abs)?;
        }
        _ => {
            // Devices and fifos: an empty placeholder, replaced in the image.
            fs::File::create(&abs).ctx("creating placeholder", &abs)?;
            set_mode(&abs, 0o600)?;
        }
    }
    tree.record(rel, meta);
    Ok(true)
}

fn link_entry<R: Read>(tree: &mut Tree, entry: &tar::Entry<'_, R>, path: &Path) -> Result<()> {
    let bad = |what: String| BlueprintError::InvalidImage(format!("{}: {what}", path.display()));
    let target = entry
        .link_name()
        .map_err(|_| bad("unreadable hard link target".into()))?
        .ok_or_else(|| bad("hard link without target".into()))?
        .into_owned();
    let target_rel = tree
        .resolve(&target)?
        .ok_or_else(|| bad("hard link to the root directory".into()))?;
    let target_abs = tree.root().join(&target_rel);
    match fs::symlink_metadata(&target_abs) {
        Ok(m) if m.is_dir() => {
            return Err(bad(format!("hard link to directory {}", target.display())))
        }
        Ok(_) => {}
        Err(_) => {
            return Err(bad(format!(
                "hard link target {} missing",
                target.display()
            )))
        }
    }
    let rel = tree
        .resolve(path)?
        .ok_or_else(|| bad("hard link named like the root".into()))?;
    if rel == target_rel {
        return Ok(());
    }
    tree.ensure_parent(&rel)?;
    tree.remove(&rel)?;
    let abs = tree.root().join(&rel);
    fs::hard_link(&target_abs, &abs).ctx("creating hard link", &abs)?;
    if let Some(meta) = tree.meta(&target_rel).cloned() {
        tree.record(rel, meta);
    }
    Ok(())
}

fn read_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Vec<(String, Vec<u8>)>> {
    let mut xattrs = Vec::new();
    let Ok(Some(exts)) = entry.pax_extensions() else {
        return Ok(xattrs);
    };
    for ext in exts {
        let Ok(ext) = ext else { continue };
        let Ok(key) = ext.key() else { continue };
        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
            xattrs.push((name.to_owned(), ext.value_bytes().to_vec()));
        }
    }
    Ok(xattrs)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).ctx("setting mode of", path)
}
