//! Writing a new file sparsely: 4 KiB blocks of zeros (aligned to the file
//! offset) are skipped, leaving holes, and the file is sized at the end.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Granularity of hole detection.
pub(crate) const BLOCK: usize = 4096;

/// Writes consecutive chunks to a fresh (empty) file, leaving zero blocks
/// as holes.
pub(crate) struct SparseWriter {
    file: File,
    pos: u64,
}

impl SparseWriter {
    /// Wraps a newly created, empty file.
    pub(crate) fn new(file: File) -> Self {
        SparseWriter { file, pos: 0 }
    }

    /// Appends `chunk`. Chunks other than the last should be a multiple of
    /// [`BLOCK`] long so that hole detection stays block-aligned.
    pub(crate) fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        let mut i = 0;
        while i < chunk.len() {
            while i < chunk.len() && is_zero(block(chunk, i)) {
                i += BLOCK;
            }
            let start = i;
            while i < chunk.len() && !is_zero(block(chunk, i)) {
                i += BLOCK;
            }
            if i > start {
                let end = i.min(chunk.len());
                self.file
                    .write_all_at(&chunk[start..end], self.pos + start as u64)?;
            }
        }
        self.pos += chunk.len() as u64;
        Ok(())
    }

    /// Sizes the file to everything appended (covering trailing holes).
    pub(crate) fn finish(self) -> io::Result<File> {
        self.file.set_len(self.pos)?;
        Ok(self.file)
    }
}

fn block(chunk: &[u8], at: usize) -> &[u8] {
    &chunk[at..(at + BLOCK).min(chunk.len())]
}

/// Whether `b` is all zeros (vectorises well: no early exit per byte).
pub(crate) fn is_zero(b: &[u8]) -> bool {
    let (words, rest) = b.as_chunks::<16>();
    words
        .iter()
        .fold(0u128, |acc, w| acc | u128::from_ne_bytes(*w))
        == 0
        && rest.iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn zeros_become_holes_and_content_is_kept() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = dir.path().join("f");
        let f = File::create(&p).unwrap_or_else(|e| panic!("{e}"));
        let mut w = SparseWriter::new(f);
        let mut data = vec![0u8; 8 << 20];
        data[5000] = 1;
        data[(4 << 20) + 17] = 2;
        w.write(&data[..4 << 20]).unwrap_or_else(|e| panic!("{e}"));
        w.write(&data[4 << 20..]).unwrap_or_else(|e| panic!("{e}"));
        w.write(&[0, 0, 3]).unwrap_or_else(|e| panic!("{e}"));
        w.finish().unwrap_or_else(|e| panic!("{e}"));
        let mut want = data.clone();
        want.extend_from_slice(&[0, 0, 3]);
        assert!(std::fs::read(&p).unwrap_or_default() == want);
        let blocks = std::fs::metadata(&p)
            .map(|m| m.blocks())
            .unwrap_or(u64::MAX);
        assert!(blocks * 512 < 1 << 20, "not sparse: {blocks} blocks");
        assert!(
            is_zero(&[0; 33]) && !is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
        );
    }
}
