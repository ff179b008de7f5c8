//! A writer for the `newc` cpio format that Linux unpacks as an initramfs:
//! directories, regular files, symlinks and character devices, built in
//! memory. Used by the blueprint builder, the lab tooling and the VMM tests.

use std::io::{self, Write};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Builds a `newc` archive in memory; [`CpioWriter::finish`] writes it out.
#[derive(Debug)]
pub struct CpioWriter {
    out: Vec<u8>,
    next_ino: u32,
}

impl Default for CpioWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl CpioWriter {
    /// An empty archive.
    pub fn new() -> Self {
        Self {
            out: Vec::new(),
            next_ino: 1,
        }
    }

    /// Adds a directory (mode 0755).
    pub fn dir(&mut self, path: &str) {
        self.entry(path, S_IFDIR | 0o755, (0, 0), &[]);
    }

    /// Adds a regular file with permission bits `perm`.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.entry(path, S_IFREG | (perm & 0o7777), (0, 0), data);
    }

    /// Adds a symbolic link pointing at `target`.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes());
    }

    /// Adds a character device node (mode 0600).
    pub fn chardev(&mut self, path: &str, major: u32, minor: u32) {
        self.entry(path, S_IFCHR | 0o600, (major, minor), &[]);
    }

    /// Appends the trailer and writes the archive, padded to 512 bytes.
    pub fn finish(mut self, w: &mut dyn Write) -> io::Result<()> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.pad_to(512);
        w.write_all(&self.out)
    }

    /// Like [`CpioWriter::finish`], returning the bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = self.finish(&mut out);
        out
    }

    fn entry(&mut self, path: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let name = path.trim_start_matches('/');
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & 0o170_000 == S_IFDIR { 2 } else { 1 };
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
        // devminor, rdevmajor, rdevminor, namesize, check.
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad_to(4);
        self.out.extend_from_slice(data);
        self.pad_to(4);
    }

    fn pad_to(&mut self, align: usize) {
        while !self.out.len().is_multiple_of(align) {
            self.out.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new();
        w.dir("bin");
        w.file("/bin/tool", 0o755, b"#!/bin/sh\necho hi\n");
        w.symlink("bin/alias", "tool");
        w.file("odd", 0o600, b"x");
        w.chardev("console", 5, 1);
        w.into_bytes()
    }

    #[test]
    fn archive_is_aligned_and_ends_with_the_trailer() {
        let bytes = sample();
        assert_eq!(bytes.len() % 512, 0);
        assert!(bytes.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("TRAILER!!!"));
        // Leading slashes are stripped: the kernel wants relative names.
        assert!(!text.contains("/bin/tool"));
    }

    /// GNU cpio, the reference reader, lists what we wrote.
    #[test]
    fn gnu_cpio_lists_the_entries() {
        let mut child = Command::new("cpio")
            .args(["-itv", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cpio must be installed");
        child.stdin.take().unwrap().write_all(&sample()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 5, "{listing}");
        assert!(lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" bin"));
        assert!(lines[1].starts_with("-rwxr-xr-x") && lines[1].ends_with(" bin/tool"));
        assert!(lines[2].starts_with("lrwxrwxrwx") && lines[2].ends_with("bin/alias -> tool"));
        assert!(lines[3].starts_with("-rw-------") && lines[3].ends_with(" odd"));
        assert!(lines[4].starts_with("crw-------") && lines[4].contains("5,"));
    }

    /// GNU cpio extracts file contents, modes and link targets intact.
    #[test]
    fn gnu_cpio_extracts_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = CpioWriter::new();
        w.dir("bin");
        w.file("bin/tool", 0o755, b"#!/bin/sh\necho hi\n");
        w.symlink("bin/alias", "tool");
        let mut child = Command::new("cpio")
            .args(["-idm", "--quiet", "--no-absolute-filenames"])
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .spawn()
            .expect("cpio must be installed");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&w.into_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
        let tool = dir.path().join("bin/tool");
        assert_eq!(std::fs::read(&tool).unwrap(), b"#!/bin/sh\necho hi\n");
        let mode = std::fs::metadata(&tool).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read_link(dir.path().join("bin/alias")).unwrap(),
            std::path::Path::new("tool")
        );
    }
}
