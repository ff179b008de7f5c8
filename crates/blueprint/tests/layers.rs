//! Layer application: whiteouts, opaque directories, hard links, symlinks,
//! modes, ownership and xattrs, compared against the expected tree.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use drafter_blueprint::layer::{apply_layer, open_layer, Compression};
use drafter_blueprint::tree::{Kind, Tree};
use drafter_blueprint::BlueprintError;

/// Builds an uncompressed tar layer in memory.
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }
    fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        h
    }
    fn dir(mut self, path: &str, mode: u32, uid: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, uid, uid);
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }
    fn file(mut self, path: &str, mode: u32, uid: u64, data: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, uid, uid);
        h.set_size(data.len() as u64);
        self.0.append_data(&mut h, path, data.as_bytes()).unwrap();
        self
    }
    /// A file whose name is written verbatim (the builder rejects `..`).
    fn raw_file(mut self, path: &str, data: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, 0, 0);
        h.set_size(data.len() as u64);
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        self.0.append(&h, data.as_bytes()).unwrap();
        self
    }
    fn file_with_xattr(
        mut self,
        path: &str,
        uid: u64,
        data: &str,
        name: &str,
        value: &[u8],
    ) -> Self {
        let key = format!("SCHILY.xattr.{name}");
        self.0
            .append_pax_extensions([(key.as_str(), value)])
            .unwrap();
        self.file(path, 0o600, uid, data)
    }
    fn link(mut self, kind: tar::EntryType, path: &str, target: &str) -> Self {
        let mut h = Self::header(kind, 0o777, 0, 0);
        // Literal: the builder's normalisation turns "/" into "//".
        h.set_link_name_literal(target).unwrap();
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }
    fn special(mut self, kind: tar::EntryType, path: &str, dev: (u32, u32)) -> Self {
        let mut h = Self::header(kind, 0o666, 0, 0);
        h.set_device_major(dev.0).unwrap();
        h.set_device_minor(dev.1).unwrap();
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }
    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn apply(tree: &mut Tree, name: &str, bytes: Vec<u8>) -> Result<(), BlueprintError> {
    apply_layer(tree, name, &mut || {
        Ok(Box::new(std::io::Cursor::new(bytes.clone())) as Box<dyn Read>)
    })
    .map(|_| ())
}

/// One line per entry: kind, mode, owner, and content or link target.
fn listing(tree: &Tree) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (rel, meta) in tree.entries() {
        let abs = tree.root().join(rel);
        let what = match meta.kind {
            Kind::File => format!("file {:?}", fs::read_to_string(&abs).unwrap()),
            Kind::Dir => "dir".to_owned(),
            Kind::Symlink => format!("-> {}", fs::read_link(&abs).unwrap().display()),
            Kind::CharDevice(a, b) => format!("chr {a}:{b}"),
            Kind::BlockDevice(a, b) => format!("blk {a}:{b}"),
            Kind::Fifo => "fifo".to_owned(),
        };
        let key = if rel.as_os_str().is_empty() {
            "/".to_owned()
        } else {
            rel.display().to_string()
        };
        out.insert(
            key,
            format!("{what} {:o} {}:{}", meta.mode, meta.uid, meta.gid),
        );
    }
    // Everything on disk must be tracked, and vice versa.
    let mut on_disk = Vec::new();
    walk(tree.root(), Path::new(""), &mut on_disk);
    let tracked: Vec<PathBuf> = tree
        .entries()
        .keys()
        .filter(|p| !p.as_os_str().is_empty())
        .cloned()
        .collect();
    assert_eq!(on_disk, tracked, "disk and metadata disagree");
    out
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    let mut names: Vec<_> = fs::read_dir(root.join(rel))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for name in names {
        let child = rel.join(name);
        out.push(child.clone());
        if fs::symlink_metadata(root.join(&child)).unwrap().is_dir() {
            walk(root, &child, out);
        }
    }
    out.sort();
}

fn base_layer() -> Vec<u8> {
    Layer::new()
        .dir("etc/", 0o755, 0)
        .file("etc/passwd", 0o644, 0, "root:x:0:0\n")
        .dir("home/", 0o755, 0)
        .dir("home/user/", 0o750, 1000)
        .file_with_xattr("home/user/notes", 1000, "hi", "user.tag", b"blue")
        .file("opt/app/a", 0o644, 0, "a")
        .file("opt/app/sub/b", 0o644, 0, "b")
        .file("bin/busybox", 0o4755, 0, "BB")
        .link(tar::EntryType::Link, "bin/sh", "bin/busybox")
        .link(tar::EntryType::Symlink, "bin/ls", "busybox")
        .file("var/gone", 0o644, 0, "x")
        .file("tmp/keep", 0o644, 0, "old")
        .dir("usr/lib/", 0o755, 0)
        .link(tar::EntryType::Symlink, "lib", "usr/lib")
        .link(tar::EntryType::Symlink, "evil", "/")
        .special(tar::EntryType::Char, "dev/null", (1, 3))
        .special(tar::EntryType::Fifo, "run/pipe", (0, 0))
        .bytes()
}

fn upper_layer() -> Vec<u8> {
    Layer::new()
        .file("tmp/keep", 0o640, 7, "new")
        .file("var/.wh.gone", 0o644, 0, "")
        .file("tmp/.wh.keep", 0o644, 0, "")
        .file("opt/app/c", 0o644, 0, "c")
        .file("opt/app/.wh..wh..opq", 0o644, 0, "")
        .file("lib/libx.so", 0o755, 0, "ELF")
        .file("bin/ls", 0o755, 0, "LS")
        .link(tar::EntryType::Link, "bin/sh2", "bin/sh")
        .file("etc/passwd", 0o644, 0, "root:x:0:0\nuser:x:1000:1000\n")
        .file("evil/etc/hacked", 0o644, 0, "contained")
        .raw_file("../../outside", "clamped")
        .bytes()
}

#[test]
fn layers_apply_to_the_expected_tree() {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::new(dir.path().join("rootfs")).unwrap();
    apply(&mut tree, "base", base_layer()).unwrap();
    apply(&mut tree, "upper", upper_layer()).unwrap();

    let expected: BTreeMap<String, String> = [
        ("bin", "dir 755 0:0"),
        ("bin/busybox", "file \"BB\" 4755 0:0"),
        ("bin/ls", "file \"LS\" 755 0:0"),
        ("bin/sh", "file \"BB\" 4755 0:0"),
        ("bin/sh2", "file \"BB\" 4755 0:0"),
        ("dev", "dir 755 0:0"),
        ("dev/null", "chr 1:3 666 0:0"),
        ("etc", "dir 755 0:0"),
        ("etc/hacked", "file \"contained\" 644 0:0"),
        (
            "etc/passwd",
            "file \"root:x:0:0\\nuser:x:1000:1000\\n\" 644 0:0",
        ),
        ("evil", "-> / 777 0:0"),
        ("home", "dir 755 0:0"),
        ("home/user", "dir 750 1000:1000"),
        ("home/user/notes", "file \"hi\" 600 1000:1000"),
        ("lib", "-> usr/lib 777 0:0"),
        ("opt", "dir 755 0:0"),
        ("opt/app", "dir 755 0:0"),
        ("opt/app/c", "file \"c\" 644 0:0"),
        ("outside", "file \"clamped\" 644 0:0"),
        ("run", "dir 755 0:0"),
        ("run/pipe", "fifo 666 0:0"),
        ("tmp", "dir 755 0:0"),
        ("tmp/keep", "file \"new\" 640 7:7"),
        ("usr", "dir 755 0:0"),
        ("usr/lib", "dir 755 0:0"),
        ("usr/lib/libx.so", "file \"ELF\" 755 0:0"),
        ("var", "dir 755 0:0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(listing(&tree), expected);

    // Hard links share the inode; the xattr is recorded.
    let ino = |p: &str| fs::metadata(tree.root().join(p)).unwrap().ino();
    assert_eq!(ino("bin/busybox"), ino("bin/sh"));
    assert_eq!(ino("bin/busybox"), ino("bin/sh2"));
    let notes = tree.meta(Path::new("home/user/notes")).unwrap();
    assert_eq!(
        notes.xattrs,
        vec![("user.tag".to_owned(), b"blue".to_vec())]
    );
    // Nothing escaped the staging root.
    assert!(!dir.path().join("outside").exists());
}

#[test]
fn opaque_directory_hides_lower_content_but_keeps_its_own_layer() {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::new(dir.path().join("rootfs")).unwrap();
    apply(
        &mut tree,
        "l1",
        Layer::new()
            .file("d/x", 0o644, 0, "1")
            .file("d/sub/y", 0o644, 0, "2")
            .bytes(),
    )
    .unwrap();
    // The marker comes after the new entries: order must not matter.
    apply(
        &mut tree,
        "l2",
        Layer::new()
            .file("d/sub/z", 0o644, 0, "3")
            .file("d/.wh..wh..opq", 0, 0, "")
            .bytes(),
    )
    .unwrap();
    let names: Vec<String> = listing(&tree).into_keys().collect();
    assert_eq!(names, ["d", "d/sub", "d/sub/z"]);
}

#[test]
fn broken_layers_are_reported_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::new(dir.path().join("rootfs")).unwrap();
    let dangling = Layer::new()
        .link(tar::EntryType::Link, "a", "missing")
        .bytes();
    let err = apply(&mut tree, "dangling", dangling).unwrap_err();
    assert!(
        matches!(err, BlueprintError::CorruptLayer { ref reason, .. } if reason.contains("missing")),
        "{err}"
    );

    let mut truncated = Layer::new()
        .file("big", 0o644, 0, &"x".repeat(10_000))
        .bytes();
    truncated.truncate(3000);
    let err = apply(&mut tree, "truncated", truncated).unwrap_err();
    assert!(matches!(err, BlueprintError::CorruptLayer { .. }), "{err}");

    // A gzip layer cut short fails the same way.
    let path = dir.path().join("layer.tar.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(
        &mut gz,
        &Layer::new()
            .file("f", 0o644, 0, &"y".repeat(100_000))
            .bytes(),
    )
    .unwrap();
    let mut gz = gz.finish().unwrap();
    gz.truncate(gz.len() / 2);
    fs::write(&path, gz).unwrap();
    let err = apply_layer(&mut tree, "gz", &mut || {
        open_layer(&path, Some(Compression::Gzip))
    })
    .unwrap_err();
    assert!(matches!(err, BlueprintError::CorruptLayer { .. }), "{err}");
}
