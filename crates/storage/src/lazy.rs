//! The destination-side device that exists before its data.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use crate::device::{block_count, block_len, check_range, spans, BlockDevice};
use crate::error::{Result, StorageError};

const STRIPES: usize = 64;

/// Asks the source for a block with priority; returns an error text if the
/// request could not be sent.
pub type Fetcher = Box<dyn Fn(u64) -> std::result::Result<(), String> + Send + Sync>;

/// A fixed set of bits updated atomically.
pub(crate) struct AtomicBits(Vec<AtomicU64>);

impl AtomicBits {
    pub(crate) fn new(n: u64) -> Self {
        AtomicBits((0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }
    fn word(&self, i: u64) -> Option<(&AtomicU64, u64)> {
        self.0.get((i / 64) as usize).map(|w| (w, 1u64 << (i % 64)))
    }
    pub(crate) fn get(&self, i: u64) -> bool {
        self.word(i)
            .is_some_and(|(w, m)| w.load(Ordering::SeqCst) & m != 0)
    }
    /// Sets the bit; returns its previous value.
    pub(crate) fn set(&self, i: u64) -> bool {
        self.word(i)
            .is_some_and(|(w, m)| w.fetch_or(m, Ordering::SeqCst) & m != 0)
    }
    /// Clears the bit; returns its previous value.
    pub(crate) fn clear(&self, i: u64) -> bool {
        self.word(i)
            .is_some_and(|(w, m)| w.fetch_and(!m, Ordering::SeqCst) & m != 0)
    }
}

/// A device whose blocks arrive over a migration.
///
/// Reading an absent block asks the source for it with priority (once) and
/// waits for that block only. A write covering a whole absent block makes it
/// present without fetching; a partial write to an absent block fetches it
/// first. Blocks that arrive after the block became present (e.g. because the
/// guest wrote it locally) are ignored, and blocks the source marks dirty are
/// made absent again, so reads never return stale data.
///
/// Writes are refused until the migration transfers authority.
pub struct LazyDevice {
    backing: Arc<dyn BlockDevice>,
    size: u64,
    block_size: u32,
    present: AtomicBits,
    requested: AtomicBits,
    local: AtomicBits,
    written: AtomicBits,
    missing: AtomicU64,
    backing_zeroed: bool,
    stripes: Vec<Mutex<()>>,
    waiters: AtomicUsize,
    failure: Mutex<Option<String>>,
    arrived: Condvar,
    fetcher: OnceLock<Fetcher>,
    authoritative: AtomicBool,
    fetches: AtomicU64,
}

impl LazyDevice {
    /// A lazy device storing blocks in `backing`, none present yet.
    /// `backing_zeroed` says the backing store reads as zeros, so zero blocks
    /// need not be written to it.
    pub fn new(backing: Arc<dyn BlockDevice>, backing_zeroed: bool) -> Self {
        let (size, block_size) = (backing.size(), backing.block_size());
        let blocks = block_count(size, block_size);
        LazyDevice {
            backing,
            size,
            block_size,
            present: AtomicBits::new(blocks),
            requested: AtomicBits::new(blocks),
            local: AtomicBits::new(blocks),
            written: AtomicBits::new(blocks),
            missing: AtomicU64::new(blocks),
            backing_zeroed,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            waiters: AtomicUsize::new(0),
            failure: Mutex::new(None),
            arrived: Condvar::new(),
            fetcher: OnceLock::new(),
            authoritative: AtomicBool::new(false),
            fetches: AtomicU64::new(0),
        }
    }

    /// The backing device.
    pub fn backing(&self) -> &Arc<dyn BlockDevice> {
        &self.backing
    }

    /// True if block `index` holds current data.
    pub fn is_present(&self, index: u64) -> bool {
        self.present.get(index)
    }

    /// Blocks not yet present.
    pub fn missing_blocks(&self) -> u64 {
        self.missing.load(Ordering::SeqCst)
    }

    /// True if block `index` was written on this side after authority.
    pub fn is_locally_written(&self, index: u64) -> bool {
        self.local.get(index)
    }

    /// True once the migration handed this side authority (writes allowed).
    pub fn is_authoritative(&self) -> bool {
        self.authoritative.load(Ordering::SeqCst)
    }

    /// Number of priority fetches this device issued.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    pub(crate) fn set_fetcher(&self, f: Fetcher) {
        let _ = self.fetcher.set(f);
    }

    pub(crate) fn set_authoritative(&self) {
        self.authoritative.store(true, Ordering::SeqCst);
    }

    /// Wakes every waiter with an error; absent blocks stay unavailable.
    pub(crate) fn fail(&self, reason: &str) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(reason.to_owned());
        }
        self.arrived.notify_all();
    }

    fn stripe(&self, index: u64) -> std::sync::MutexGuard<'_, ()> {
        self.stripes[(index % STRIPES as u64) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn became_present(&self) {
        self.missing.fetch_sub(1, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = self.failure.lock().unwrap_or_else(|p| p.into_inner());
            self.arrived.notify_all();
        }
    }

    fn offset(&self, index: u64) -> u64 {
        index * u64::from(self.block_size)
    }

    /// Stores incoming data for block `index` unless it is already present.
    /// Returns true if the data was used.
    pub(crate) fn fill(&self, index: u64, data: &[u8]) -> Result<bool> {
        let _g = self.stripe(index);
        if self.present.get(index) {
            return Ok(false);
        }
        self.backing.write_at(data, self.offset(index))?;
        self.written.set(index);
        self.present.set(index);
        self.became_present();
        Ok(true)
    }

    /// Like [`Self::fill`], with the bytes produced by `fill` straight into
    /// the backing store; if the block is already present they are read and
    /// dropped.
    pub(crate) fn fill_from(
        &self,
        index: u64,
        fill: &mut dyn FnMut(&mut [u8]) -> std::io::Result<()>,
    ) -> Result<bool> {
        let _g = self.stripe(index);
        if self.present.get(index) {
            let mut sink = vec![0u8; block_len(self.size, self.block_size, index)];
            fill(&mut sink).map_err(|e| StorageError::io("block data source", e))?;
            return Ok(false);
        }
        // Mark first: a failed fill may leave garbage, which must never be
        // mistaken for the zeros of an untouched block.
        self.written.set(index);
        self.backing.write_block_with(index, fill)?;
        self.present.set(index);
        self.became_present();
        Ok(true)
    }

    /// Stores a zero block unless already present.
    pub(crate) fn fill_zero(&self, index: u64) -> Result<bool> {
        let _g = self.stripe(index);
        if self.present.get(index) {
            return Ok(false);
        }
        if !self.backing_zeroed || self.written.get(index) {
            let zeros = vec![0u8; block_len(self.size, self.block_size, index)];
            self.backing.write_at(&zeros, self.offset(index))?;
            self.written.set(index);
        }
        self.present.set(index);
        self.became_present();
        Ok(true)
    }

    /// Marks block `index` present as it is (the backing already matches).
    pub(crate) fn mark_present(&self, index: u64) -> bool {
        let _g = self.stripe(index);
        if self.present.set(index) {
            return false;
        }
        self.became_present();
        true
    }

    /// Makes block `index` absent again (the source changed it).
    pub(crate) fn invalidate(&self, index: u64) {
        let _g = self.stripe(index);
        self.requested.clear(index);
        if self.present.clear(index) {
            self.missing.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Waits until every block is present (e.g. guest memory, before a VMM
    /// maps it), or fails if the migration broke first.
    pub fn wait_all_present(&self) -> Result<()> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let mut g = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        let r = loop {
            if self.missing_blocks() == 0 {
                break Ok(());
            }
            if let Some(f) = &*g {
                break Err(StorageError::Unavailable {
                    block: (0..block_count(self.size, self.block_size))
                        .find(|&b| !self.present.get(b))
                        .unwrap_or(0),
                    reason: f.clone(),
                });
            }
            g = self.arrived.wait(g).unwrap_or_else(|p| p.into_inner());
        };
        drop(g);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        r
    }

    /// Waits until block `index` is present, fetching it with priority.
    pub fn ensure_present(&self, index: u64) -> Result<()> {
        if self.present.get(index) {
            return Ok(());
        }
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let r = self.wait_present(index);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        r
    }

    fn wait_present(&self, index: u64) -> Result<()> {
        let unavailable = |reason: String| StorageError::Unavailable {
            block: index,
            reason,
        };
        let mut g = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if self.present.get(index) {
                return Ok(());
            }
            if let Some(f) = &*g {
                return Err(unavailable(f.clone()));
            }
            if !self.requested.set(index) {
                let Some(fetch) = self.fetcher.get() else {
                    self.requested.clear(index);
                    return Err(unavailable("not connected to a source".into()));
                };
                self.fetches.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = fetch(index) {
                    self.requested.clear(index);
                    return Err(unavailable(e));
                }
            }
            g = self.arrived.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl BlockDevice for LazyDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len(), self.size)?;
        for s in spans(offset, buf.len(), self.block_size) {
            self.ensure_present(s.block)?;
        }
        self.backing.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.is_authoritative() {
            return Err(StorageError::NotAuthoritative);
        }
        check_range(offset, buf.len(), self.size)?;
        for s in spans(offset, buf.len(), self.block_size) {
            let whole = s.len == block_len(self.size, self.block_size, s.block);
            if !whole {
                self.ensure_present(s.block)?;
            }
            let _g = self.stripe(s.block);
            self.backing.write_at(
                &buf[s.buf_start..s.buf_start + s.len],
                self.offset(s.block) + s.in_block as u64,
            )?;
            self.written.set(s.block);
            self.local.set(s.block);
            if !self.present.set(s.block) {
                self.missing.fetch_sub(1, Ordering::SeqCst);
                drop(_g);
                if self.waiters.load(Ordering::SeqCst) > 0 {
                    let _w = self.failure.lock().unwrap_or_else(|p| p.into_inner());
                    self.arrived.notify_all();
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.backing.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemoryDevice;
    use std::sync::mpsc;

    #[test]
    fn read_of_absent_block_fetches_once_and_waits_for_it() {
        let lazy = Arc::new(LazyDevice::new(
            Arc::new(MemoryDevice::new(4 * 4096, 4096).unwrap()),
            true,
        ));
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        lazy.set_fetcher(Box::new(move |i| {
            tx.lock().unwrap().send(i).map_err(|e| e.to_string())
        }));
        let l2 = lazy.clone();
        let reader = std::thread::spawn(move || {
            let mut b = vec![0u8; 4096];
            l2.read_at(&mut b, 2 * 4096).map(|()| b)
        });
        assert_eq!(rx.recv().unwrap(), 2);
        assert!(lazy.fill(2, &[7u8; 4096]).unwrap());
        assert_eq!(reader.join().unwrap().unwrap(), vec![7u8; 4096]);
        assert!(
            !lazy.fill(2, &[8u8; 4096]).unwrap(),
            "present blocks are not overwritten"
        );
        assert_eq!(lazy.missing_blocks(), 3);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn writes_need_authority_and_whole_block_writes_do_not_fetch() {
        let lazy = LazyDevice::new(Arc::new(MemoryDevice::new(2 * 4096, 4096).unwrap()), true);
        assert!(matches!(
            lazy.write_at(&[1; 4096], 0),
            Err(StorageError::NotAuthoritative)
        ));
        lazy.set_fetcher(Box::new(|_| Err("link down".into())));
        lazy.set_authoritative();
        lazy.write_at(&[1; 4096], 0).unwrap();
        assert!(lazy.is_present(0) && lazy.is_locally_written(0));
        assert_eq!(lazy.fetches(), 0);
        // Partial write to an absent block must fetch first; the fetch fails here.
        assert!(matches!(
            lazy.write_at(&[1; 10], 4096),
            Err(StorageError::Unavailable { .. })
        ));
        assert!(
            !lazy.fill(0, &[9; 4096]).unwrap(),
            "a local write wins over late data"
        );
        let mut b = [0u8; 4];
        lazy.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [1; 4]);
    }

    #[test]
    fn invalidated_blocks_are_fetched_again_and_failure_wakes_readers() {
        let lazy = Arc::new(LazyDevice::new(
            Arc::new(MemoryDevice::new(4096, 4096).unwrap()),
            true,
        ));
        lazy.set_fetcher(Box::new(|_| Ok(())));
        lazy.fill(0, &[1; 4096]).unwrap();
        lazy.invalidate(0);
        assert!(!lazy.is_present(0));
        let l2 = lazy.clone();
        let reader = std::thread::spawn(move || l2.read_at(&mut [0u8; 8], 0));
        while lazy.fetches() == 0 {
            std::thread::yield_now();
        }
        lazy.fail("source went away");
        assert!(matches!(
            reader.join().unwrap(),
            Err(StorageError::Unavailable { .. })
        ));
    }
}
