//! Reading a package: the manifest (first entry), and extraction of any
//! subset of its devices in one pass over the stream, verified before
//! anything on disk is replaced.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::PackageError;
use crate::fsutil::{partial_path, Cleanup};
use crate::manifest::{
    validate_names, DeviceEntry, Manifest, DEVICE_PREFIX, MANIFEST_ENTRY, MAX_MANIFEST_LEN,
};
use crate::progress::{Phase, Progress};
use crate::sparse::SparseWriter;

/// Size of the decompression buffer (a multiple of the sparse block size).
const BUF: usize = 8 << 20;

/// After the last requested device, the rest of the stream is still read
/// and verified when the devices that follow hold at most this many bytes.
const DRAIN_LIMIT: u64 = 64 << 20;

/// What [`extract`] wrote.
#[derive(Clone, Debug)]
pub struct ExtractReport {
    /// The package's manifest.
    pub manifest: Manifest,
    /// The extracted devices, in the order they were requested.
    pub devices: Vec<DeviceEntry>,
    /// Device bytes written (uncompressed).
    pub bytes: u64,
    /// Size of the package file.
    pub compressed_bytes: u64,
}

type Stream = tar::Archive<zstd::Decoder<'static, BufReader<File>>>;

fn open(package: &Path) -> Result<(Stream, u64), PackageError> {
    let err = |source| PackageError::OpenPackage {
        path: package.to_path_buf(),
        source,
    };
    let file = File::open(package).map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if meta.is_dir() {
        return Err(err(io::Error::other("it is a directory")));
    }
    let dec = zstd::Decoder::with_buffer(BufReader::with_capacity(1 << 20, file))
        .map_err(|e| PackageError::reading(package, None, e))?;
    Ok((tar::Archive::new(dec), meta.len()))
}

/// Reads the manifest of the package at `package_path` (its first entry
/// only; the devices are not read).
pub fn read_manifest(package_path: impl AsRef<Path>) -> Result<Manifest, PackageError> {
    let package = package_path.as_ref();
    let (mut stream, _) = open(package)?;
    let mut entries = stream
        .entries()
        .map_err(|e| PackageError::reading(package, None, e))?;
    first_manifest(&mut entries, package)
}

fn first_manifest<R: Read>(
    entries: &mut tar::Entries<'_, R>,
    package: &Path,
) -> Result<Manifest, PackageError> {
    let reading = |e| PackageError::reading(package, None, e);
    let mut first = match entries.next() {
        None => {
            return Err(PackageError::MissingManifest {
                path: package.to_path_buf(),
                detail: "the archive is empty".into(),
            })
        }
        Some(r) => r.map_err(reading)?,
    };
    let name = String::from_utf8_lossy(&first.path_bytes()).into_owned();
    if name != MANIFEST_ENTRY {
        drop(first);
        // Only to tell the two mistakes apart: is it there at all?
        let later = entries.any(|e| {
            e.map(|e| e.path_bytes().as_ref() == MANIFEST_ENTRY.as_bytes())
                .unwrap_or(false)
        });
        return Err(if later {
            PackageError::ManifestNotFirst {
                path: package.to_path_buf(),
                first: name,
            }
        } else {
            PackageError::MissingManifest {
                path: package.to_path_buf(),
                detail: format!("its first entry is {name:?}"),
            }
        });
    }
    let size = first.header().entry_size().map_err(reading)?;
    if size > MAX_MANIFEST_LEN {
        return Err(PackageError::MalformedManifest {
            path: package.to_path_buf(),
            detail: format!("it is {size} bytes, more than the {MAX_MANIFEST_LEN} accepted"),
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    first.read_to_end(&mut bytes).map_err(reading)?;
    if bytes.len() as u64 != size {
        return Err(PackageError::Truncated {
            path: package.to_path_buf(),
            device: None,
        });
    }
    Manifest::parse(&bytes, package)
}

struct Wanted {
    entry: DeviceEntry,
    path: PathBuf,
    partial: PathBuf,
    done: bool,
}

/// Extracts `devices` (name, output file) from the package at
/// `package_path`, in one pass over its stream.
///
/// Any subset of the package's devices can be requested, in any order; a
/// name the package lacks is an error listing what it has. Nothing is
/// written unless every output is absent or `force` is given. Each device
/// is written sparsely (4 KiB zero blocks become holes) to `<output>.partial`
/// while it is hashed; its size and blake3 are checked against the manifest
/// at the entry's end, and only once every requested device verified are
/// the `.partial` files renamed into place. The rest of the stream is then
/// read to its end (zstd checksum, truncation) unless the devices after the
/// last requested one hold more than 64 MiB. On any failure (truncated or
/// corrupt package, …) no existing file is changed and no `.partial` (nor
/// a directory this call created) is left behind.
pub fn extract<N: AsRef<str>, P: AsRef<Path>>(
    package_path: impl AsRef<Path>,
    devices: &[(N, P)],
    force: bool,
    progress: &mut dyn FnMut(Progress),
) -> Result<ExtractReport, PackageError> {
    let package = package_path.as_ref();
    validate_names(devices.iter().map(|(n, _)| n.as_ref()))?;
    let mut outputs: HashMap<&Path, &str> = HashMap::new();
    for (n, p) in devices {
        if let Some(first) = outputs.insert(p.as_ref(), n.as_ref()) {
            return Err(PackageError::DuplicateOutput {
                first: first.to_owned(),
                second: n.as_ref().to_owned(),
                path: p.as_ref().to_path_buf(),
            });
        }
    }

    let (mut stream, compressed_bytes) = open(package)?;
    let mut entries = stream
        .entries()
        .map_err(|e| PackageError::reading(package, None, e))?;
    let manifest = first_manifest(&mut entries, package)?;

    let mut wanted = Vec::with_capacity(devices.len());
    for (n, p) in devices {
        let (name, path) = (n.as_ref(), p.as_ref());
        let Some(entry) = manifest.device(name) else {
            return Err(PackageError::MissingDevice {
                path: package.to_path_buf(),
                name: name.to_owned(),
                available: manifest.names(),
            });
        };
        let out_err = |source| PackageError::WriteOutput {
            name: name.to_owned(),
            path: path.to_path_buf(),
            source,
        };
        match path.symlink_metadata() {
            Ok(m) if m.is_dir() => return Err(out_err(io::Error::other("it is a directory"))),
            Ok(_) if !force => {
                return Err(PackageError::OutputExists {
                    name: name.to_owned(),
                    path: path.to_path_buf(),
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(out_err(e)),
        }
        wanted.push(Wanted {
            entry: entry.clone(),
            path: path.to_path_buf(),
            partial: partial_path(path),
            done: false,
        });
    }

    let mut cleanup = Cleanup::default();
    for w in &wanted {
        if let Some(parent) = w.path.parent() {
            cleanup
                .create_dirs(parent)
                .map_err(|source| PackageError::WriteOutput {
                    name: w.entry.name.clone(),
                    path: w.path.clone(),
                    source,
                })?;
        }
    }

    let total: u64 = wanted.iter().map(|w| w.entry.size).sum();
    let mut done = 0;
    progress(Progress {
        phase: Phase::Extracting,
        done,
        total,
    });
    let mut buf = vec![0u8; BUF];
    let mut remaining = wanted.len();
    while remaining > 0 {
        let Some(entry) = entries.next() else {
            break;
        };
        let mut entry = entry.map_err(|e| PackageError::reading(package, None, e))?;
        let index = {
            let path = entry.path_bytes();
            let Some(name) = path.strip_prefix(DEVICE_PREFIX.as_bytes()) else {
                continue;
            };
            wanted
                .iter()
                .position(|w| !w.done && w.entry.name.as_bytes() == name)
        };
        let Some(index) = index else {
            continue;
        };
        let w = &mut wanted[index];
        cleanup.file(w.partial.clone());
        done = extract_one(package, &mut entry, w, &mut buf, done, total, progress)?;
        w.done = true;
        remaining -= 1;
    }
    if let Some(w) = wanted.iter().find(|w| !w.done) {
        return Err(PackageError::Corrupt {
            path: package.to_path_buf(),
            device: Some(w.entry.name.clone()),
            detail: "the archive ends without this device, which its manifest lists".into(),
        });
    }
    // Verify the rest of the stream too (tar end, zstd checksum, no
    // truncation) unless that means decompressing many more devices.
    let last = wanted
        .iter()
        .filter_map(|w| manifest.devices.iter().position(|d| d.name == w.entry.name))
        .max()
        .unwrap_or(0);
    let after: u64 = manifest.devices.iter().skip(last + 1).map(|d| d.size).sum();
    if after <= DRAIN_LIMIT {
        for e in entries.by_ref() {
            e.map_err(|e| PackageError::reading(package, None, e))?;
        }
        io::copy(&mut stream.into_inner(), &mut io::sink())
            .map_err(|e| PackageError::reading(package, None, e))?;
    }

    for w in &wanted {
        std::fs::rename(&w.partial, &w.path).map_err(|source| PackageError::WriteOutput {
            name: w.entry.name.clone(),
            path: w.path.clone(),
            source,
        })?;
    }
    cleanup.disarm();
    Ok(ExtractReport {
        manifest,
        devices: wanted.into_iter().map(|w| w.entry).collect(),
        bytes: total,
        compressed_bytes,
    })
}

/// Writes one entry's data to `w.partial`, sparsely, verifying size and
/// hash. Returns the new count of bytes done.
fn extract_one<R: Read>(
    package: &Path,
    entry: &mut tar::Entry<'_, R>,
    w: &Wanted,
    buf: &mut [u8],
    mut done: u64,
    total: u64,
    progress: &mut dyn FnMut(Progress),
) -> Result<u64, PackageError> {
    let name = w.entry.name.as_str();
    let corrupt = |detail: String| PackageError::Corrupt {
        path: package.to_path_buf(),
        device: Some(name.to_owned()),
        detail,
    };
    if !entry.header().entry_type().is_file() {
        return Err(corrupt("its entry is not a regular file".into()));
    }
    let size = entry
        .header()
        .entry_size()
        .map_err(|e| corrupt(e.to_string()))?;
    if size != w.entry.size {
        return Err(PackageError::SizeMismatch {
            path: package.to_path_buf(),
            name: name.to_owned(),
            expected: w.entry.size,
            actual: size,
        });
    }
    let out_err = |source| PackageError::WriteOutput {
        name: name.to_owned(),
        path: w.path.clone(),
        source,
    };
    let file = File::create(&w.partial).map_err(out_err)?;
    let mut out = SparseWriter::new(file);
    let mut hasher = blake3::Hasher::new();
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        let chunk = &mut buf[..n];
        let got =
            read_full(entry, chunk).map_err(|e| PackageError::reading(package, Some(name), e))?;
        if got < n {
            return Err(PackageError::Truncated {
                path: package.to_path_buf(),
                device: Some(name.to_owned()),
            });
        }
        hasher.update_rayon(chunk);
        out.write(chunk).map_err(out_err)?;
        left -= n as u64;
        done += n as u64;
        progress(Progress {
            phase: Phase::Extracting,
            done,
            total,
        });
    }
    out.finish().map_err(out_err)?;
    let actual = hasher.finalize().to_hex().to_string();
    if actual != w.entry.blake3 {
        return Err(PackageError::HashMismatch {
            path: package.to_path_buf(),
            name: name.to_owned(),
            expected: w.entry.blake3.clone(),
            actual,
        });
    }
    Ok(done)
}

/// Fills `buf` as far as the reader goes; returns how much was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}
