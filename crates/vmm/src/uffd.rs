//! userfaultfd-backed guest memory: a handler thread resolves each missing page
//! with content from a caller-supplied [`PageProvider`] (the post-copy path of
//! live migration plugs in here).
//!
//! A page is only ever resolved with content the provider returned. When the
//! provider fails, the handler retries it (with backoff, within the provider's
//! [`RetryPolicy`]); when the deadline passes it reports an [`UffdFailure`] to
//! whoever registered with [`UffdHandler::on_failure`] (the VMM ends the VM with
//! it) and leaves the page unresolved: the faulting thread stays blocked rather
//! than run on a page that is not the guest's.
//!
//! Ending such a VM needs care. A kick does not free a vCPU blocked on a missing
//! page when KVM reached it through instruction emulation (a kernel-mode access
//! waits again and again while the signal stays pending), and closing the
//! userfaultfd would make the kernel fill the page with zeros. So the VMM kicks
//! every vCPU out of the guest first, then calls [`UffdHandler::abandon`]: the
//! pages given up on become inaccessible, the blocked vCPU's access fails and it
//! leaves `KVM_RUN`. Only then is the handler stopped and the userfaultfd closed.

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use userfaultfd::{Event, Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::{GuestMemory, MemoryError, PAGE_SIZE};

/// Supplies guest pages on demand.
pub trait PageProvider: Send + 'static {
    /// Fills `buf` (one 4 KiB page) with guest memory at `offset` in the memory
    /// file layout (guest RAM regions concatenated in address order). On error
    /// `buf` is discarded, whatever it holds.
    fn fill(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;

    /// How long, and how often, to retry [`PageProvider::fill`] when it fails
    /// before the VM is ended. Defaults to [`RetryPolicy::default`].
    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::default()
    }
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

/// How a failing [`PageProvider`] is retried for one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Give up on a page (and end the VM) once it has been failing for this long.
    /// Zero means a single attempt.
    pub deadline: Duration,
    /// Wait before the first retry; the wait doubles after each failure.
    pub initial_backoff: Duration,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// The default deadline for one page.
    pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

    /// A single attempt, no retry.
    pub const NO_RETRY: RetryPolicy = RetryPolicy {
        deadline: Duration::ZERO,
        initial_backoff: Duration::ZERO,
        max_backoff: Duration::ZERO,
    };
}

impl Default for RetryPolicy {
    /// 30 s per page, retrying after 10 ms, then 20 ms, ... at most every 500 ms.
    fn default() -> Self {
        RetryPolicy {
            deadline: Self::DEFAULT_DEADLINE,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(500),
        }
    }
}

/// Why the userfaultfd handler could not give the guest one of its pages. The
/// guest cannot go on: the VMM ends the VM with this.
#[derive(Debug, thiserror::Error)]
pub enum UffdFailure {
    /// The provider kept failing until the deadline.
    #[error(
        "guest page at offset {offset:#x} could not be fetched: {source} \
         ({attempts} attempts in {elapsed:.1?})"
    )]
    Fetch {
        /// The page's offset in the memory file layout.
        offset: u64,
        /// How many times the provider was asked.
        attempts: u32,
        /// How long it was retried.
        elapsed: Duration,
        /// The provider's last error.
        source: std::io::Error,
    },
    /// The kernel refused the page's content.
    #[error("guest page at offset {offset:#x} could not be placed: {err}")]
    Copy {
        /// The page's offset in the memory file layout.
        offset: u64,
        /// The UFFDIO_COPY error.
        err: String,
    },
    /// The handler could not read faults any more.
    #[error("userfaultfd handler failed: {0}")]
    Handler(String),
}

/// Something the VMM wants done with the handler's first failure.
type FailureCallback = Box<dyn FnOnce(&UffdFailure) + Send>;

/// Delivers the first failure to the callback, whichever comes first.
#[derive(Default)]
struct FailureSink(Mutex<SinkState>);

#[derive(Default)]
struct SinkState {
    callback: Option<FailureCallback>,
    first: Option<UffdFailure>,
}

impl FailureSink {
    fn lock(&self) -> std::sync::MutexGuard<'_, SinkState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn report(&self, failure: UffdFailure) {
        tracing::error!("{failure}");
        let mut s = self.lock();
        if s.first.is_some() {
            return;
        }
        if let Some(cb) = s.callback.take() {
            cb(&failure);
        }
        s.first = Some(failure);
    }

    fn set_callback(&self, cb: FailureCallback) {
        let mut s = self.lock();
        match &s.first {
            Some(f) => cb(f),
            None => s.callback = Some(cb),
        }
    }
}

/// Sleeps between attempts; `sleep` returns false when the handler must stop.
pub(crate) trait RetryClock {
    /// The current time.
    fn now(&self) -> Instant;
    /// Waits `d`; false if asked to stop meanwhile.
    fn sleep(&mut self, d: Duration) -> bool;
}

/// What [`fetch_page`] ended with.
#[derive(Debug)]
pub(crate) enum Fetched {
    /// `buf` holds the page.
    Page,
    /// The provider kept failing past the deadline.
    GaveUp(UffdFailure),
    /// The handler was asked to stop (or abandon) while waiting to retry; what
    /// had failed so far.
    Stopped(UffdFailure),
}

/// Asks `provider` for the page at `offset` until it succeeds, the policy's
/// deadline passes or the clock says stop. Never gives up before the deadline,
/// never sleeps past it (a provider call that blocks can overrun it).
pub(crate) fn fetch_page(
    provider: &mut dyn PageProvider,
    offset: u64,
    buf: &mut [u8],
    policy: &RetryPolicy,
    clock: &mut dyn RetryClock,
) -> Fetched {
    let start = clock.now();
    let mut backoff = policy.initial_backoff;
    let mut attempts = 0u32;
    loop {
        attempts = attempts.saturating_add(1);
        let err = match provider.fill(offset, buf) {
            Ok(()) => return Fetched::Page,
            Err(e) => e,
        };
        let elapsed = clock.now().saturating_duration_since(start);
        let failure = |source| UffdFailure::Fetch {
            offset,
            attempts,
            elapsed,
            source,
        };
        let Some(left) = policy
            .deadline
            .checked_sub(elapsed)
            .filter(|l| !l.is_zero())
        else {
            return Fetched::GaveUp(failure(err));
        };
        // Never spin: at least a millisecond between attempts.
        let wait = backoff.max(Duration::from_millis(1)).min(left);
        tracing::warn!(
            offset,
            attempts,
            "guest page fetch failed, retrying in {wait:?}: {err}"
        );
        if !clock.sleep(wait) {
            return Fetched::Stopped(failure(err));
        }
        backoff = backoff.saturating_mul(2).min(policy.max_backoff);
    }
}

/// Waits between attempts, cut short by a stop or abandon request.
struct StopClock<'a> {
    stop: &'a EventFd,
    abandon: &'a EventFd,
    /// The wait ended because the VMM abandoned missing pages.
    abandoned: bool,
}

impl RetryClock for StopClock<'_> {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&mut self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
            match poll_in(&[self.stop.as_raw_fd(), self.abandon.as_raw_fd()], ms) {
                Ok([true, _]) => return false,
                Ok([_, true]) => {
                    self.abandoned = true;
                    return false;
                }
                Ok(_) if left.is_zero() => return true,
                Ok(_) => {}
                // Cannot wait: treat it as a request to stop rather than spin.
                Err(e) => {
                    tracing::error!("uffd retry wait: {e}");
                    return false;
                }
            }
        }
    }
}

/// Polls `fds` for input for up to `timeout_ms` (-1: forever); which are ready.
/// Retries on EINTR.
fn poll_in<const N: usize>(fds: &[i32; N], timeout_ms: i32) -> std::io::Result<[bool; N]> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `pfds` is a valid array of N pollfd structs for the call's duration.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
        if rc >= 0 {
            return Ok(pfds.map(|p| p.revents != 0));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[derive(Clone, Copy)]
struct Span {
    host: usize,
    len: usize,
    file_off: u64,
}

/// The running userfaultfd handler; stops its thread (and closes the
/// userfaultfd) when dropped.
pub struct UffdHandler {
    stop: Arc<EventFd>,
    abandon: Arc<EventFd>,
    failures: Arc<FailureSink>,
    thread: Option<JoinHandle<u64>>,
}

impl UffdHandler {
    /// Registers every region of `mem` with a new userfaultfd and starts the
    /// handler thread feeding it from `provider`, retried per its
    /// [`PageProvider::retry_policy`].
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
        let abandon = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| err(&e))?);
        let failures = Arc::new(FailureSink::default());
        let server = Server {
            policy: provider.retry_policy(),
            uffd,
            spans,
            provider,
            stop: stop.clone(),
            abandon: abandon.clone(),
            failures: failures.clone(),
            _mem: mem.clone(),
            failed: BTreeSet::new(),
            abandoned: false,
            faults: 0,
        };
        let thread = std::thread::Builder::new()
            .name("uffd".into())
            .spawn(move || server.serve())
            .map_err(|e| err(&e))?;
        Ok(UffdHandler {
            stop,
            abandon,
            failures,
            thread: Some(thread),
        })
    }

    /// Calls `report` once with the handler's first failure (at once if it has
    /// already failed). After a failure the page stays missing and its faulting
    /// thread blocked: the guest cannot go on and should be stopped.
    pub fn on_failure(&self, report: impl FnOnce(&UffdFailure) + Send + 'static) {
        self.failures.set_callback(Box::new(report));
    }

    /// The handler's first failure, as text, if it has failed.
    pub fn failure(&self) -> Option<String> {
        self.failures.lock().first.as_ref().map(|f| f.to_string())
    }

    /// Gives up on every page the handler could not fetch, now and from now on
    /// (a page still being retried is given up at once): each becomes
    /// inaccessible (`PROT_NONE`) and its waiters are woken. A vCPU blocked on
    /// such a page then leaves `KVM_RUN` (with `EFAULT`, or an MMIO exit for an
    /// access KVM emulates) where a kick alone would leave it spinning in the
    /// fault; a host thread touching it gets `SIGSEGV`; nobody ever reads zeros
    /// from it. Pages the provider does deliver are still served.
    ///
    /// Call only once every vCPU has been told to leave the guest for good: a
    /// vCPU still running could go on after such an exit.
    pub fn abandon(&self) {
        if let Err(e) = self.abandon.write(1) {
            tracing::error!("cannot signal the uffd handler to abandon missing pages: {e}");
        }
    }

    /// Stops the handler and returns how many page faults it resolved. A page
    /// nobody has touched reads as zeros afterwards (the kernel's fallback once
    /// the userfaultfd is closed; abandoned pages stay inaccessible): stop the
    /// vCPUs first.
    pub fn stop(mut self) -> u64 {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> u64 {
        if let Err(e) = self.stop.write(1) {
            tracing::error!("cannot signal the uffd handler to stop: {e}");
        }
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

/// The handler thread's state.
struct Server {
    uffd: Uffd,
    spans: Vec<Span>,
    provider: Box<dyn PageProvider>,
    policy: RetryPolicy,
    stop: Arc<EventFd>,
    abandon: Arc<EventFd>,
    failures: Arc<FailureSink>,
    /// Keeps the mapping alive while the thread may copy into it or mprotect it.
    _mem: GuestMemory,
    /// Host addresses of pages given up on; the VM is ending, so later
    /// failures are not retried and faults on these are not fetched again.
    failed: BTreeSet<usize>,
    /// [`UffdHandler::abandon`] was called.
    abandoned: bool,
    faults: u64,
}

impl Server {
    /// Serves faults until asked to stop; returns how many it resolved. Keeps the
    /// userfaultfd open until then, whatever fails.
    fn serve(mut self) -> u64 {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        loop {
            let fds = [
                self.uffd.as_raw_fd(),
                self.stop.as_raw_fd(),
                self.abandon.as_raw_fd(),
            ];
            let ready = match poll_in(&fds, -1) {
                Ok(r) => r,
                Err(e) => return self.fail_and_wait(format!("poll: {e}")),
            };
            if ready[1] {
                return self.faults;
            }
            if ready[2] {
                let _ = self.abandon.read();
                self.abandon_failed();
            }
            if !ready[0] {
                continue;
            }
            let event = match self.uffd.read_event() {
                Ok(Some(e)) => e,
                Ok(None) => continue,
                Err(e) => return self.fail_and_wait(format!("read: {e}")),
            };
            let Event::Pagefault { addr, .. } = event else {
                continue;
            };
            let addr = (addr as usize) & !(PAGE_SIZE as usize - 1);
            let Some(span) = self
                .spans
                .iter()
                .find(|s| addr >= s.host && addr < s.host + s.len)
            else {
                tracing::error!("uffd fault outside guest memory at {addr:#x}");
                continue;
            };
            // A thread kicked while blocked on a page given up on faults again
            // and again: nothing new to do.
            if self.failed.contains(&addr) {
                continue;
            }
            let offset = span.file_off + (addr - span.host) as u64;
            if !self.resolve(addr, offset, &mut page) {
                return self.faults;
            }
        }
    }

    /// Fetches and places one page; false when asked to stop meanwhile.
    fn resolve(&mut self, addr: usize, offset: u64, page: &mut [u8]) -> bool {
        let policy = if self.failed.is_empty() && !self.abandoned {
            self.policy
        } else {
            RetryPolicy::NO_RETRY
        };
        let mut clock = StopClock {
            stop: &self.stop,
            abandon: &self.abandon,
            abandoned: false,
        };
        let fetched = fetch_page(self.provider.as_mut(), offset, page, &policy, &mut clock);
        let abandoned = clock.abandoned;
        match fetched {
            Fetched::Page => {}
            Fetched::Stopped(_) if !abandoned => return false,
            // Abandoned half-way: give up now (the serve loop then sees the
            // request and makes the other failed pages inaccessible too).
            Fetched::Stopped(f) | Fetched::GaveUp(f) => {
                self.give_up(addr, f);
                return true;
            }
        }
        // SAFETY: `page` is a valid 4 KiB buffer and `addr` is a page-aligned
        // address inside a range registered with this userfaultfd.
        let res = unsafe {
            self.uffd.copy(
                page.as_ptr().cast(),
                addr as *mut libc::c_void,
                PAGE_SIZE as usize,
                true,
            )
        };
        match res {
            Ok(_) => self.faults += 1,
            // Another fault on the same page raced with us: already resolved.
            Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                self.wake(addr);
            }
            Err(e) => self.give_up(
                addr,
                UffdFailure::Copy {
                    offset,
                    err: format!("{e:?}"),
                },
            ),
        }
        true
    }

    /// Leaves the page unresolved (its thread stays blocked rather than run on a
    /// page that is not the guest's) and reports why; once abandoned, makes it
    /// inaccessible at once.
    fn give_up(&mut self, addr: usize, failure: UffdFailure) {
        self.failed.insert(addr);
        self.failures.report(failure);
        if self.abandoned {
            self.make_inaccessible(addr);
        }
    }

    /// Handles [`UffdHandler::abandon`].
    fn abandon_failed(&mut self) {
        if self.abandoned {
            return;
        }
        self.abandoned = true;
        let failed: Vec<usize> = self.failed.iter().copied().collect();
        for addr in failed {
            self.make_inaccessible(addr);
        }
    }

    /// Turns a page given up on into one that faults for good, and wakes the
    /// threads waiting for it so they see that.
    fn make_inaccessible(&self, addr: usize) {
        // SAFETY: `addr` is a page-aligned address inside a guest memory mapping
        // that `self._mem` keeps mapped; PROT_NONE only makes later accesses
        // fault, it unmaps nothing and no Rust reference into guest memory exists.
        let rc = unsafe {
            libc::mprotect(
                addr as *mut libc::c_void,
                PAGE_SIZE as usize,
                libc::PROT_NONE,
            )
        };
        if rc != 0 {
            tracing::error!(
                "cannot make the missing guest page at {addr:#x} inaccessible: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        self.wake(addr);
    }

    fn wake(&self, addr: usize) {
        if let Err(e) = self
            .uffd
            .wake(addr as *mut libc::c_void, PAGE_SIZE as usize)
        {
            tracing::error!("uffd wake at {addr:#x}: {e:?}");
        }
    }

    /// Reports a handler failure, then waits for the stop request with the
    /// userfaultfd still open (closing it would hand zero pages to the guest).
    fn fail_and_wait(self, why: String) -> u64 {
        self.failures.report(UffdFailure::Handler(why));
        loop {
            match poll_in(&[self.stop.as_raw_fd()], -1) {
                Ok([true]) => return self.faults,
                Ok(_) => {}
                Err(e) => {
                    // Nothing left to wait with: keep the userfaultfd open for
                    // good rather than fill missing pages with zeros.
                    tracing::error!("uffd handler cannot wait for stop ({e}); leaking it");
                    let faults = self.faults;
                    std::mem::forget(self.uffd);
                    return faults;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create, MemoryBackend};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc::channel;
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

    /// Fails `failures` times (`u32::MAX`: forever) for one offset, garbage in
    /// the buffer each time; serves `0xa5` pages otherwise.
    struct Flaky {
        bad: u64,
        failures: u32,
        calls: Arc<AtomicU64>,
        policy: RetryPolicy,
    }
    impl PageProvider for Flaky {
        fn fill(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            if offset == self.bad {
                self.calls.fetch_add(1, Ordering::SeqCst);
                if self.failures > 0 {
                    self.failures = self
                        .failures
                        .saturating_sub(u32::from(self.failures != u32::MAX));
                    buf.fill(0xee);
                    return Err(std::io::Error::other("source unreachable"));
                }
            }
            buf.fill(0xa5);
            Ok(())
        }
        fn retry_policy(&self) -> RetryPolicy {
            self.policy
        }
    }

    /// A clock that only moves when slept on; records the sleeps.
    struct FakeClock {
        now: Instant,
        slept: Vec<Duration>,
        stop_after: Option<usize>,
    }
    impl FakeClock {
        fn new() -> Self {
            FakeClock {
                now: Instant::now(),
                slept: Vec::new(),
                stop_after: None,
            }
        }
    }
    impl RetryClock for FakeClock {
        fn now(&self) -> Instant {
            self.now
        }
        fn sleep(&mut self, d: Duration) -> bool {
            if self.stop_after == Some(self.slept.len()) {
                return false;
            }
            self.slept.push(d);
            self.now += d;
            true
        }
    }

    fn flaky(failures: u32, policy: RetryPolicy) -> (Flaky, Arc<AtomicU64>) {
        let calls = Arc::new(AtomicU64::new(0));
        let p = Flaky {
            bad: 3 * PAGE_SIZE,
            failures,
            calls: calls.clone(),
            policy,
        };
        (p, calls)
    }

    const POLICY: RetryPolicy = RetryPolicy {
        deadline: Duration::from_secs(1),
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(300),
    };

    #[test]
    fn fetch_retries_with_growing_backoff_until_the_provider_succeeds() {
        let (mut p, calls) = flaky(2, POLICY);
        let mut clock = FakeClock::new();
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        let got = fetch_page(&mut p, 3 * PAGE_SIZE, &mut buf, &POLICY, &mut clock);
        assert!(matches!(got, Fetched::Page), "{got:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(
            clock.slept,
            [Duration::from_millis(10), Duration::from_millis(20)]
        );
        assert!(buf.iter().all(|b| *b == 0xa5));
    }

    #[test]
    fn fetch_gives_up_at_the_deadline_naming_the_offset() {
        let (mut p, calls) = flaky(u32::MAX, POLICY);
        let mut clock = FakeClock::new();
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        let got = fetch_page(&mut p, 3 * PAGE_SIZE, &mut buf, &POLICY, &mut clock);
        let Fetched::GaveUp(f) = got else {
            panic!("{got:?}")
        };
        let total: Duration = clock.slept.iter().sum();
        // Retried for exactly the deadline, never sleeping past it, backoff capped.
        assert_eq!(total, POLICY.deadline);
        assert!(clock.slept.iter().all(|d| *d <= POLICY.max_backoff));
        assert_eq!(calls.load(Ordering::SeqCst), clock.slept.len() as u64 + 1);
        let msg = f.to_string();
        assert!(
            msg.starts_with("guest page at offset 0x3000 could not be fetched: source unreachable"),
            "{msg}"
        );
    }

    #[test]
    fn fetch_without_retry_tries_once_and_a_stop_ends_the_wait() {
        let (mut p, calls) = flaky(u32::MAX, POLICY);
        let mut clock = FakeClock::new();
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        let got = fetch_page(
            &mut p,
            3 * PAGE_SIZE,
            &mut buf,
            &RetryPolicy::NO_RETRY,
            &mut clock,
        );
        assert!(matches!(got, Fetched::GaveUp(_)), "{got:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(clock.slept.is_empty());

        let mut clock = FakeClock::new();
        clock.stop_after = Some(2);
        let got = fetch_page(&mut p, 3 * PAGE_SIZE, &mut buf, &POLICY, &mut clock);
        assert!(matches!(got, Fetched::Stopped(_)), "{got:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 1 + 3);
    }

    #[test]
    fn a_zero_backoff_does_not_spin() {
        let policy = RetryPolicy {
            deadline: Duration::from_millis(5),
            ..RetryPolicy::NO_RETRY
        };
        let (mut p, calls) = flaky(u32::MAX, policy);
        let mut clock = FakeClock::new();
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        let got = fetch_page(&mut p, 3 * PAGE_SIZE, &mut buf, &policy, &mut clock);
        assert!(matches!(got, Fetched::GaveUp(_)), "{got:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 6);
    }

    /// Reads the failing page on a new thread; the byte comes back on the channel.
    fn touch(m: &crate::memory::Memory) -> std::sync::mpsc::Receiver<u8> {
        let (tx, rx) = channel();
        let guest = m.guest.clone();
        std::thread::spawn(move || {
            let b: u8 = guest
                .read_obj(GuestAddress(3 * PAGE_SIZE + 7))
                .unwrap_or_else(|e| panic!("{e}"));
            let _ = tx.send(b);
        });
        rx
    }

    #[test]
    fn a_page_that_cannot_be_fetched_is_reported_and_never_filled() {
        let policy = RetryPolicy {
            deadline: Duration::from_millis(200),
            ..POLICY
        };
        let (p, calls) = flaky(u32::MAX, policy);
        let m = create(16 << 12, MemoryBackend::Userfault(Box::new(p)))
            .unwrap_or_else(|e| panic!("{e}"));
        let Some(handler) = m.uffd.as_ref() else {
            panic!("no uffd handler")
        };
        let (ftx, frx) = channel();
        handler.on_failure(move |f| {
            let _ = ftx.send(f.to_string());
        });
        let page = touch(&m);
        let msg = frx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("no failure reported: {e}"));
        assert!(
            msg.starts_with("guest page at offset 0x3000 could not be fetched: source unreachable"),
            "{msg}"
        );
        assert!(calls.load(Ordering::SeqCst) >= 3, "not retried");
        // The reader stays blocked: no zero page, no garbage.
        assert!(page.recv_timeout(Duration::from_millis(300)).is_err());
        // Other pages are still served, and a late subscriber hears of the failure.
        let b: u8 = m
            .guest
            .read_obj(GuestAddress(5 * PAGE_SIZE))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b, 0xa5);
        let (ltx, lrx) = channel();
        handler.on_failure(move |f| {
            let _ = ltx.send(f.to_string());
        });
        assert_eq!(lrx.try_recv().ok().as_deref(), Some(msg.as_str()));
        assert_eq!(handler.failure().as_deref(), Some(msg.as_str()));
        // Stopping closes the userfaultfd: the kernel then lets the blocked
        // reader go (on a zero page: why vCPUs must stop first).
        drop(m);
        let _ = page.recv_timeout(Duration::from_secs(10));
    }

    #[test]
    fn a_page_that_fails_twice_is_served_on_retry() {
        let (p, calls) = flaky(2, POLICY);
        let m = create(16 << 12, MemoryBackend::Userfault(Box::new(p)))
            .unwrap_or_else(|e| panic!("{e}"));
        let failed = Arc::new(AtomicU64::new(0));
        let f2 = failed.clone();
        if let Some(h) = m.uffd.as_ref() {
            h.on_failure(move |_| {
                f2.fetch_add(1, Ordering::SeqCst);
            });
        }
        let page = touch(&m);
        let b = page
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("page never served: {e}"));
        assert_eq!(b, 0xa5);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(failed.load(Ordering::SeqCst), 0);
        assert_eq!(m.uffd.as_ref().and_then(UffdHandler::failure), None);
    }
}
