//! A staging directory plus the metadata the builder cannot (or, rootless,
//! may not) put on disk itself: ownership, exact modes, xattrs, device nodes.
//! The metadata is applied to the ext4 image afterwards (see [`crate::ext4`]).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::error::{IoContext, Result};

/// Kind of a tree entry, as far as the ext4 fix-up needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Character device (major, minor); staged as an empty placeholder file.
    CharDevice(u32, u32),
    /// Block device (major, minor); staged as an empty placeholder file.
    BlockDevice(u32, u32),
    /// Named pipe; staged as an empty placeholder file.
    Fifo,
}

impl Kind {
    /// The `S_IFMT` bits of this kind.
    pub fn type_bits(self) -> u32 {
        match self {
            Kind::File => 0o100000,
            Kind::Dir => 0o040000,
            Kind::Symlink => 0o120000,
            Kind::CharDevice(..) => 0o020000,
            Kind::BlockDevice(..) => 0o060000,
            Kind::Fifo => 0o010000,
        }
    }

    /// True for kinds staged as placeholders and created later.
    pub fn is_special(self) -> bool {
        matches!(
            self,
            Kind::CharDevice(..) | Kind::BlockDevice(..) | Kind::Fifo
        )
    }
}

/// The wanted metadata of one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// What it is.
    pub kind: Kind,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Permission bits incl. setuid/setgid/sticky (no type bits).
    pub mode: u32,
    /// Extended attributes (name, value).
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// A staging directory and the metadata of everything in it, keyed by
/// path relative to the staging root.
#[derive(Debug)]
pub struct Tree {
    root: PathBuf,
    entries: BTreeMap<PathBuf, Meta>,
}

const MAX_SYMLINK_HOPS: usize = 40;

impl Tree {
    /// An empty tree staged in `root` (created if missing).
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root).ctx("creating staging directory", &root)?;
        Ok(Self {
            root,
            entries: BTreeMap::new(),
        })
    }

    /// The staging directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// All recorded entries.
    pub fn entries(&self) -> &BTreeMap<PathBuf, Meta> {
        &self.entries
    }

    /// The recorded metadata of `rel`.
    pub fn meta(&self, rel: &Path) -> Option<&Meta> {
        self.entries.get(rel)
    }

    /// Records (or replaces) the metadata of `rel`.
    pub fn record(&mut self, rel: PathBuf, meta: Meta) {
        self.entries.insert(rel, meta);
    }

    /// Forgets `rel` and everything below it.
    pub fn forget(&mut self, rel: &Path) {
        let doomed: Vec<PathBuf> = self
            .entries
            .range(rel.to_path_buf()..)
            .take_while(|(p, _)| p.starts_with(rel))
            .map(|(p, _)| p.clone())
            .collect();
        for p in doomed {
            self.entries.remove(&p);
        }
    }

    /// Removes `rel` (recursively) from disk and from the metadata.
    pub fn remove(&mut self, rel: &Path) -> Result<()> {
        let abs = self.root.join(rel);
        match fs::symlink_metadata(&abs) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&abs).ctx("removing", &abs)?,
            Ok(_) => fs::remove_file(&abs).ctx("removing", &abs)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).ctx("inspecting", &abs),
        }
        self.forget(rel);
        Ok(())
    }

    /// Resolves an archive path to a path relative to the root with every
    /// symlink in its *parent* components followed inside the root (so no
    /// entry can escape it) and `..` clamped at the root. The last component
    /// is not followed. `None` for the root itself.
    pub fn resolve(&self, path: &Path) -> Result<Option<PathBuf>> {
        let mut pending: Vec<PathBuf> = normal_components(path).into_iter().rev().collect();
        let mut resolved = PathBuf::new();
        let mut hops = 0;
        while let Some(comp) = pending.pop() {
            if comp.as_os_str() == ".." {
                resolved.pop();
                continue;
            }
            let candidate = resolved.join(&comp);
            if pending.is_empty() {
                return Ok(Some(candidate));
            }
            let abs = self.root.join(&candidate);
            match fs::symlink_metadata(&abs) {
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(crate::BlueprintError::InvalidImage(format!(
                            "too many symlink levels resolving {}",
                            path.display()
                        )));
                    }
                    let target = fs::read_link(&abs).ctx("reading symlink", &abs)?;
                    if target.is_absolute() {
                        resolved = PathBuf::new();
                    }
                    for c in normal_components(&target).into_iter().rev() {
                        pending.push(c);
                    }
                }
                _ => resolved = candidate,
            }
        }
        Ok((!resolved.as_os_str().is_empty()).then_some(resolved))
    }

    /// Creates the missing directories of `rel`'s parent (owned by root,
    /// mode 0755, as container runtimes do for implied directories).
    pub fn ensure_parent(&mut self, rel: &Path) -> Result<()> {
        let mut cur = PathBuf::new();
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        for comp in parent.components() {
            cur.push(comp);
            let abs = self.root.join(&cur);
            match fs::symlink_metadata(&abs) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(crate::BlueprintError::InvalidImage(format!(
                        "{} is not a directory but has entries below it",
                        cur.display()
                    )))
                }
                Err(_) => {
                    fs::create_dir(&abs).ctx("creating directory", &abs)?;
                    self.entries.insert(
                        cur.clone(),
                        Meta {
                            kind: Kind::Dir,
                            uid: 0,
                            gid: 0,
                            mode: 0o755,
                            xattrs: Vec::new(),
                        },
                    );
                }
            }
        }
        Ok(())
    }
}

/// The normal components of `path`, with `..` kept (to be clamped by the
/// caller) and `/`, `.` dropped.
fn normal_components(path: &Path) -> Vec<PathBuf> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(PathBuf::from(s)),
            Component::ParentDir => Some(PathBuf::from(OsStr::new(".."))),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_follows_parent_symlinks_inside_the_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let tree = Tree::new(dir.path().join("root")).unwrap();
        let root = tree.root().to_owned();
        fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("/usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink("../../../../etc", root.join("usr/escape")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();

        let r = |p: &str| tree.resolve(Path::new(p)).unwrap().unwrap();
        assert_eq!(r("lib/x.so"), PathBuf::from("usr/lib/x.so"));
        assert_eq!(
            r("/lib"),
            PathBuf::from("lib"),
            "last component not followed"
        );
        assert_eq!(r("usr/escape/passwd"), PathBuf::from("etc/passwd"));
        assert_eq!(r("../../etc/shadow"), PathBuf::from("etc/shadow"));
        assert_eq!(tree.resolve(Path::new("./")).unwrap(), None);
        assert!(tree.resolve(Path::new("loop/x")).is_err());
    }
}
