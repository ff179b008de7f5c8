//! Writing a package: hash every device (first pass, multithreaded blake3),
//! then stream `manifest.json` and the devices through tar and
//! multithreaded zstd into `<package>.partial`, renamed over the target
//! only once complete.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::PackageError;
use crate::fsutil::{partial_path, Cleanup};
use crate::manifest::{
    entry_path, validate_names, DeviceEntry, Manifest, FORMAT_VERSION, MANIFEST_ENTRY,
};
use crate::progress::{Phase, Progress};

/// Read size of the hashing pass (large: blake3 splits it across cores).
const BUF: usize = 8 << 20;

/// Read size of the compressing pass (small enough to stay in cache between
/// the read and zstd's copy into its job buffers).
const COPY_BUF: usize = 1 << 20;

/// zstd level used unless told otherwise: the fastest, since device images
/// are mostly zeros or incompressible data where higher levels gain little.
pub const DEFAULT_LEVEL: i32 = 1;

/// How a package is compressed.
#[derive(Clone, Debug)]
pub struct ArchiveOptions {
    /// zstd compression level (1-22; 1-3 are fast).
    pub level: i32,
    /// zstd worker threads; 0 compresses on the calling thread.
    pub workers: u32,
}

impl Default for ArchiveOptions {
    fn default() -> Self {
        ArchiveOptions {
            level: DEFAULT_LEVEL,
            workers: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
        }
    }
}

/// What [`archive`] wrote.
#[derive(Clone, Debug)]
pub struct ArchiveReport {
    /// The manifest written as the first entry.
    pub manifest: Manifest,
    /// Device bytes archived (uncompressed).
    pub bytes: u64,
    /// Size of the package file.
    pub compressed_bytes: u64,
}

struct Input {
    name: String,
    path: PathBuf,
    file: File,
    size: u64,
    mtime: u64,
}

impl Input {
    fn open(name: &str, path: &Path) -> Result<Self, PackageError> {
        let err = |source| PackageError::Input {
            name: name.to_owned(),
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        if !meta.is_file() {
            return Err(err(io::Error::other("not a regular file")));
        }
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        Ok(Input {
            name: name.to_owned(),
            path: path.to_path_buf(),
            file,
            size: meta.len(),
            mtime,
        })
    }

    /// Reads `buf.len()` bytes at `offset`; a file that got shorter since it
    /// was opened is reported as changed.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), PackageError> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                PackageError::InputChanged {
                    name: self.name.clone(),
                    path: self.path.clone(),
                    detail: format!("it is now shorter than {} bytes", self.size),
                }
            } else {
                PackageError::Input {
                    name: self.name.clone(),
                    path: self.path.clone(),
                    source: e,
                }
            }
        })
    }
}

/// Archives `devices` (name, file) into the package at `package_path` with
/// the default [`ArchiveOptions`]. See [`archive_with`].
pub fn archive<N: AsRef<str>, P: AsRef<Path>>(
    package_path: impl AsRef<Path>,
    devices: &[(N, P)],
    progress: &mut dyn FnMut(Progress),
) -> Result<ArchiveReport, PackageError> {
    archive_with(package_path, devices, &ArchiveOptions::default(), progress)
}

/// Archives `devices` (name, file) into the package at `package_path`.
///
/// Names are checked first (valid, no duplicates), then every file is opened
/// and hashed, then the archive is written to `<package_path>.partial` and
/// renamed over `package_path` only on success: a failure leaves neither a
/// broken package nor a `.partial` behind, and an existing package intact.
/// Missing parent directories of `package_path` are created.
pub fn archive_with<N: AsRef<str>, P: AsRef<Path>>(
    package_path: impl AsRef<Path>,
    devices: &[(N, P)],
    options: &ArchiveOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<ArchiveReport, PackageError> {
    let package = package_path.as_ref();
    validate_names(devices.iter().map(|(n, _)| n.as_ref()))?;
    let inputs = devices
        .iter()
        .map(|(n, p)| Input::open(n.as_ref(), p.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    let total: u64 = inputs.iter().map(|i| i.size).sum();
    let mut buf = vec![0u8; BUF];

    // First pass: the manifest needs every hash before the archive starts.
    let mut done = 0;
    progress(Progress {
        phase: Phase::Hashing,
        done,
        total,
    });
    let mut entries = Vec::with_capacity(inputs.len());
    for input in &inputs {
        let mut hasher = blake3::Hasher::new();
        let mut offset = 0;
        while offset < input.size {
            let n = (input.size - offset).min(BUF as u64) as usize;
            input.read_at(&mut buf[..n], offset)?;
            hasher.update_rayon(&buf[..n]);
            offset += n as u64;
            done += n as u64;
            progress(Progress {
                phase: Phase::Hashing,
                done,
                total,
            });
        }
        entries.push(DeviceEntry {
            name: input.name.clone(),
            size: input.size,
            blake3: hasher.finalize().to_hex().to_string(),
        });
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        devices: entries,
    };

    // Second pass: write to <package>.partial.
    let wp = |source| PackageError::WritePackage {
        path: package.to_path_buf(),
        source,
    };
    let mut cleanup = Cleanup::default();
    if let Some(parent) = package.parent() {
        cleanup.create_dirs(parent).map_err(wp)?;
    }
    let partial = partial_path(package);
    let file = File::create(&partial).map_err(wp)?;
    cleanup.file(partial.clone());
    let mut enc =
        zstd::Encoder::new(BufWriter::with_capacity(1 << 20, file), options.level).map_err(wp)?;
    enc.include_checksum(true).map_err(wp)?;
    if options.workers > 0 {
        enc.multithread(options.workers).map_err(wp)?;
    }
    let json = serde_json::to_vec(&manifest).map_err(|e| wp(io::Error::other(e)))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    write_entry(&mut enc, MANIFEST_ENTRY, &json, now).map_err(wp)?;

    let mut done = 0;
    progress(Progress {
        phase: Phase::Compressing,
        done,
        total,
    });
    for input in &inputs {
        write_header(&mut enc, &entry_path(&input.name), input.size, input.mtime).map_err(wp)?;
        let mut offset = 0;
        while offset < input.size {
            let n = (input.size - offset).min(COPY_BUF as u64) as usize;
            input.read_at(&mut buf[..n], offset)?;
            enc.write_all(&buf[..n]).map_err(wp)?;
            offset += n as u64;
            done += n as u64;
            progress(Progress {
                phase: Phase::Compressing,
                done,
                total,
            });
        }
        enc.write_all(&ZEROS[..padding(input.size)]).map_err(wp)?;
    }
    // End of archive: two zero blocks.
    enc.write_all(&ZEROS).map_err(wp)?;
    let file = enc
        .finish()
        .map_err(wp)?
        .into_inner()
        .map_err(|e| wp(e.into_error()))?;
    let compressed_bytes = file.metadata().map_err(wp)?.len();
    drop(file);
    std::fs::rename(&partial, package).map_err(wp)?;
    cleanup.disarm();
    Ok(ArchiveReport {
        manifest,
        bytes: total,
        compressed_bytes,
    })
}

static ZEROS: [u8; 1024] = [0; 1024];

/// Zero bytes after an entry of `size` bytes, up to the next 512-byte block.
fn padding(size: u64) -> usize {
    ((512 - size % 512) % 512) as usize
}

fn write_header(w: &mut impl Write, path: &str, size: u64, mtime: u64) -> io::Result<()> {
    // GNU headers carry sizes above 8 GiB (base-256), which memory files reach.
    let mut h = tar::Header::new_gnu();
    h.set_path(path)?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(mtime);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    w.write_all(h.as_bytes())
}

fn write_entry(w: &mut impl Write, path: &str, data: &[u8], mtime: u64) -> io::Result<()> {
    write_header(w, path, data.len() as u64, mtime)?;
    w.write_all(data)?;
    w.write_all(&ZEROS[..padding(data.len() as u64)])
}
