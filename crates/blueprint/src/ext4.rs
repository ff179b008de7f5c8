//! Building an ext4 image from a staged tree without mounting anything:
//! `mkfs.ext4 -d`, then `debugfs -w` applies ownership, modes, xattrs and
//! device nodes, then `e2fsck -n` checks the result.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use tracing::{debug, warn};

use crate::error::{BlueprintError, IoContext, Result};
use crate::tree::{Kind, Meta};

const BLOCK: u64 = 4096;
const MIB: u64 = 1024 * 1024;

/// What to build.
#[derive(Debug)]
pub struct Ext4Image<'a> {
    /// Directory whose content becomes the file system root.
    pub staging: &'a Path,
    /// Volume label.
    pub label: &'a str,
    /// Output image file (replaced atomically on success).
    pub output: &'a Path,
    /// Metadata to apply, keyed by path relative to the file system root.
    pub fixups: Vec<(PathBuf, Meta)>,
    /// Free space to leave in the file system, in bytes.
    pub headroom: u64,
}

/// Size of a staged tree.
#[derive(Debug, Default, Clone, Copy)]
pub struct TreeSize {
    /// Data blocks needed (4 KiB).
    pub blocks: u64,
    /// Inodes needed.
    pub inodes: u64,
}

/// Measures `dir` (hard links counted once).
pub fn measure(dir: &Path) -> Result<TreeSize> {
    let mut size = TreeSize {
        blocks: 1,
        inodes: 1,
    };
    let mut seen = HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).ctx("listing", &d)? {
            let entry = entry.ctx("listing", &d)?;
            let m = entry.metadata().ctx("inspecting", entry.path())?;
            if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            size.inodes += 1;
            if m.is_dir() {
                size.blocks += 1 + m.size().div_ceil(BLOCK);
                stack.push(entry.path());
            } else if m.file_type().is_symlink() {
                size.blocks += u64::from(m.size() >= 60);
            } else {
                // Data plus extent/indirect overhead for large files.
                let data = m.size().div_ceil(BLOCK);
                size.blocks += data + data / 256;
            }
        }
    }
    Ok(size)
}

impl Ext4Image<'_> {
    /// Builds the image; returns its size in bytes.
    pub fn build(&self) -> Result<u64> {
        let tree = measure(self.staging)?;
        let inodes = tree.inodes + tree.inodes / 5 + 1024;
        let content = tree.blocks * BLOCK + inodes * 256;
        // Journal, group descriptors, bitmaps and slack.
        let bytes = (content + content / 4 + self.headroom + 16 * MIB).div_ceil(MIB) * MIB;
        let out_dir = match self.output.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&out_dir).ctx("creating", &out_dir)?;
        check_space(&out_dir, content)?;

        let mut partial = self.output.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let result = self.build_into(&partial, bytes, inodes);
        if result.is_err() {
            let _ = fs::remove_file(&partial);
        }
        result?;
        fs::rename(&partial, self.output).ctx("renaming into place", self.output)?;
        Ok(bytes)
    }

    fn build_into(&self, image: &Path, bytes: u64, inodes: u64) -> Result<()> {
        let file = fs::File::create(image).ctx("creating", image)?;
        file.set_len(bytes).ctx("sizing", image)?;
        drop(file);
        let mkfs = run(Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                "4096",
                "-m",
                "0",
                "-E",
                "root_owner=0:0",
            ])
            .arg("-L")
            .arg(self.label)
            .arg("-N")
            .arg(inodes.to_string())
            .arg("-d")
            .arg(self.staging)
            .arg(image));
        if let Err(BlueprintError::Tool { message, .. }) = &mkfs {
            if message.contains("No space") || message.contains("Could not allocate") {
                return Err(BlueprintError::NoSpace {
                    dir: image.to_path_buf(),
                    need: bytes,
                    have: 0,
                });
            }
        }
        mkfs?;

        let work = tempfile::tempdir().ctx("creating temporary directory", std::env::temp_dir())?;
        let script = debugfs_script(&self.fixups, work.path())?;
        let script_path = work.path().join("fixups.debugfs");
        fs::write(&script_path, script).ctx("writing", &script_path)?;
        let out = Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&script_path)
            .arg(image)
            .output()
            .map_err(|e| tool_missing("debugfs", e))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
            .collect();
        if !out.status.success() || !errors.is_empty() {
            return Err(BlueprintError::Tool {
                tool: "debugfs".into(),
                message: errors.join("; "),
            });
        }
        run(Command::new("e2fsck").args(["-f", "-n"]).arg(image))?;
        Ok(())
    }
}

/// The debugfs commands that apply `fixups`; xattr values are written to
/// files in `work`.
fn debugfs_script(fixups: &[(PathBuf, Meta)], work: &Path) -> Result<String> {
    let mut script = String::new();
    for (i, (rel, meta)) in fixups.iter().enumerate() {
        let Some(p) = quote(rel) else {
            warn!(path = %rel.display(), "path cannot be expressed to debugfs; ownership left as staged");
            continue;
        };
        // debugfs's mknod links the bare name into the current directory.
        let node = match meta.kind {
            Kind::CharDevice(major, minor) => Some(format!("c {major} {minor}")),
            Kind::BlockDevice(major, minor) => Some(format!("b {major} {minor}")),
            Kind::Fifo => Some("p".to_owned()),
            _ => None,
        };
        if let Some(node) = node {
            let parent = rel
                .parent()
                .and_then(quote)
                .unwrap_or_else(|| "\"/\"".to_owned());
            let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let _ = writeln!(script, "rm {p}\ncd {parent}\nmknod \"{name}\" {node}\ncd /");
        }
        if meta.kind != Kind::Symlink {
            let _ = writeln!(
                script,
                "sif {p} mode 0{:o}",
                meta.kind.type_bits() | meta.mode
            );
        }
        let _ = writeln!(script, "sif {p} uid {}\nsif {p} gid {}", meta.uid, meta.gid);
        for (j, (name, value)) in meta.xattrs.iter().enumerate() {
            if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '"') {
                warn!(path = %rel.display(), name, "skipping xattr with unusable name");
                continue;
            }
            let value_path = work.join(format!("xattr-{i}-{j}"));
            fs::write(&value_path, value).ctx("writing", &value_path)?;
            let _ = writeln!(script, "ea_set -f {} {p} {name}", value_path.display());
        }
    }
    debug!(lines = script.lines().count(), "debugfs script");
    Ok(script)
}

/// `"/<rel>"` quoted for debugfs, or `None` if it cannot be.
fn quote(rel: &Path) -> Option<String> {
    let s = rel.to_str()?;
    if s.chars().any(|c| c == '"' || c == '\\' || c.is_control()) {
        return None;
    }
    Some(format!("\"/{s}\""))
}

fn check_space(dir: &Path, need: u64) -> Result<()> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| BlueprintError::Invalid(format!("bad path {}", dir.display())))?;
    // SAFETY: statvfs is plain old data, so all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out-pointer,
    // both live for the duration of the call.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).ctx("checking free space of", dir);
    }
    let have = st.f_bavail.saturating_mul(st.f_frsize);
    if have < need {
        return Err(BlueprintError::NoSpace {
            dir: dir.to_path_buf(),
            need,
            have,
        });
    }
    Ok(())
}

fn tool_missing(tool: &str, e: std::io::Error) -> BlueprintError {
    BlueprintError::Tool {
        tool: tool.into(),
        message: format!("cannot run it ({e}); install e2fsprogs"),
    }
}

/// Runs a command, turning failure into [`BlueprintError::Tool`].
pub fn run(cmd: &mut Command) -> Result<()> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(|e| BlueprintError::Tool {
        tool: tool.clone(),
        message: format!("cannot run it: {e}"),
    })?;
    if out.status.success() {
        return Ok(());
    }
    let mut message = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if message.is_empty() {
        message = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    }
    Err(BlueprintError::Tool {
        tool,
        message: format!("{} ({})", message, out.status),
    })
}
