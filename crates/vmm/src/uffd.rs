//! userfaultfd-backed guest memory: a handler thread resolves each missing page
//! with content from a caller-supplied [`PageProvider`] (the post-copy path of
//! live migration plugs in here).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use userfaultfd::{Event, Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::{GuestMemory, MemoryError, PAGE_SIZE};

/// Supplies guest pages on demand.
pub trait PageProvider: Send + 'static {
    /// Fills `buf` (one 4 KiB page) with guest memory at `offset` in the memory
    /// file layout (guest RAM regions concatenated in address order).
    fn fill(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

/// A [`PageProvider`] reading pages from a memory file.
pub struct FilePageProvider(std::fs::File);

impl FilePageProvider {
    /// Serves pages from `file`.
    pub fn new(file: std::fs::File) -> Self {
        Self(file)
    }
}

impl PageProvider for FilePageProvider {
    fn fill(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.0.read_exact_at(buf, offset)
    }
}

#[derive(Clone, Copy)]
struct Span {
    host: usize,
    len: usize,
    file_off: u64,
}

/// The running userfaultfd handler; stops its thread when dropped.
pub struct UffdHandler {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<u64>>,
}

impl UffdHandler {
    /// Registers every region of `mem` with a new userfaultfd and starts the
    /// handler thread feeding it from `provider`.
    pub fn start(mem: &GuestMemory, provider: Box<dyn PageProvider>) -> Result<Self, MemoryError> {
        let err = |e: &dyn std::fmt::Display| MemoryError::Uffd(e.to_string());
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(|e| err(&e))?;
        let mut spans = Vec::new();
        let mut file_off = 0;
        for r in mem.iter() {
            let host = r.as_ptr() as usize;
            let len = r.len() as usize;
            uffd.register(host as *mut libc::c_void, len)
                .map_err(|e| err(&e))?;
            spans.push(Span {
                host,
                len,
                file_off,
            });
            file_off += r.len();
        }
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| err(&e))?);
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("uffd".into())
            .spawn(move || serve(uffd, spans, provider, &stop2))
            .map_err(|e| err(&e))?;
        Ok(UffdHandler {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the handler and returns how many page faults it resolved.
    pub fn stop(mut self) -> u64 {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> u64 {
        let _ = self.stop.write(1);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for UffdHandler {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn serve(uffd: Uffd, spans: Vec<Span>, mut provider: Box<dyn PageProvider>, stop: &EventFd) -> u64 {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut faults = 0u64;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structs for the call's duration.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("uffd poll: {}", std::io::Error::last_os_error());
            return faults;
        }
        if fds[1].revents != 0 {
            return faults;
        }
        let event = match uffd.read_event() {
            Ok(Some(e)) => e,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!("uffd read: {e}");
                return faults;
            }
        };
        let Event::Pagefault { addr, .. } = event else {
            continue;
        };
        let addr = (addr as usize) & !(PAGE_SIZE as usize - 1);
        let Some(span) = spans
            .iter()
            .find(|s| addr >= s.host && addr < s.host + s.len)
        else {
            tracing::error!("uffd fault outside guest memory at {addr:#x}");
            continue;
        };
        let offset = span.file_off + (addr - span.host) as u64;
        if let Err(e) = provider.fill(offset, &mut page) {
            // The guest cannot continue without this page; leaving the fault
            // unresolved would hang it silently, so fail loudly instead.
            tracing::error!("page provider failed at offset {offset:#x}: {e}");
            page.fill(0);
        }
        // SAFETY: `page` is a valid 4 KiB buffer and `addr` is a page-aligned
        // address inside a range registered with this userfaultfd.
        let res = unsafe {
            uffd.copy(
                page.as_ptr().cast(),
                addr as *mut libc::c_void,
                PAGE_SIZE as usize,
                true,
            )
        };
        match res {
            Ok(_) => faults += 1,
            // Another fault on the same page raced with us: already resolved.
            Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                let _ = uffd.wake(addr as *mut libc::c_void, PAGE_SIZE as usize);
            }
            Err(e) => tracing::error!("uffd copy at {addr:#x}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create, MemoryBackend};
    use std::sync::atomic::{AtomicU64, Ordering};
    use vm_memory::{Bytes, GuestAddress};

    struct Pattern(Arc<AtomicU64>);
    impl PageProvider for Pattern {
        fn fill(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            buf.fill((offset / PAGE_SIZE) as u8);
            Ok(())
        }
    }

    #[test]
    fn missing_pages_come_from_the_provider() {
        let seen = Arc::new(AtomicU64::new(0));
        let m = create(
            64 << 12,
            MemoryBackend::Userfault(Box::new(Pattern(seen.clone()))),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut b = [0u8; 2];
        m.guest
            .read_slice(&mut b, GuestAddress(5 * PAGE_SIZE + 10))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b, [5, 5]);
        m.guest
            .read_slice(&mut b, GuestAddress(9 * PAGE_SIZE))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b, [9, 9]);
        // A page already present does not fault again.
        m.guest
            .read_slice(&mut b, GuestAddress(5 * PAGE_SIZE))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(seen.load(Ordering::SeqCst), 2);
        let handler = m.uffd;
        assert_eq!(handler.map(UffdHandler::stop), Some(2));
    }
}
