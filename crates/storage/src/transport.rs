//! Connections and the prioritised frame writer.

use std::collections::VecDeque;
use std::io::{self, BufWriter, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::protocol::{is_timeout, FRAME_TYPES, KEEPALIVE_FRAME};

/// A bidirectional byte stream a migration runs over (TCP, Unix socket, …).
pub trait Link: Read + Write + Send + 'static {
    /// A second handle to the same connection (for a reader thread).
    fn try_clone_link(&self) -> io::Result<Box<dyn Link>>;
    /// Shuts the connection down in both directions, waking blocked readers.
    fn shutdown_link(&self);
    /// Sets the read timeout (`None` blocks forever).
    fn set_link_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// Sets the write timeout (`None` blocks forever): a write that makes no
    /// progress for this long fails with a timeout error. The default does
    /// nothing (the writer then relies on the reader noticing a dead peer).
    fn set_link_write_timeout(&self, _t: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
    /// Asks the transport itself to notice a vanished peer host or a dropped
    /// link within about `timeout` (on TCP: keepalive probes and
    /// TCP_USER_TIMEOUT). A frozen peer process is not noticed this way (its
    /// kernel keeps answering); the migrator's keepalive frames catch that.
    /// The default does nothing.
    fn detect_dead_peer(&self, _timeout: Duration) -> io::Result<()> {
        Ok(())
    }
    /// Caps kernel send/receive buffering, so a priority frame never waits
    /// behind megabytes of bulk data already handed to the kernel.
    fn limit_buffers(&self, _bytes: usize) -> io::Result<()> {
        Ok(())
    }
    /// 32 bytes unique to this connection's security session that both
    /// ends compute alike (a TLS exporter), mixed into the shared-secret
    /// proofs so they cannot be relayed into another session. `None` for
    /// links without one (the default), and before a TLS handshake ended.
    fn channel_binding(&self) -> Option<[u8; 32]> {
        None
    }
}

/// A boxed link is a link, so code choosing between plain and TLS links at
/// run time (see [`crate::tls::TlsConfig::maybe_accept`]) can hand either to
/// the migrator.
impl Link for Box<dyn Link> {
    fn try_clone_link(&self) -> io::Result<Box<dyn Link>> {
        (**self).try_clone_link()
    }
    fn shutdown_link(&self) {
        (**self).shutdown_link()
    }
    fn set_link_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        (**self).set_link_read_timeout(t)
    }
    fn set_link_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        (**self).set_link_write_timeout(t)
    }
    fn detect_dead_peer(&self, timeout: Duration) -> io::Result<()> {
        (**self).detect_dead_peer(timeout)
    }
    fn limit_buffers(&self, bytes: usize) -> io::Result<()> {
        (**self).limit_buffers(bytes)
    }
    fn channel_binding(&self) -> Option<[u8; 32]> {
        (**self).channel_binding()
    }
}

/// Sets one integer socket option.
fn set_int_option(
    fd: std::os::fd::BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
    value: usize,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let v = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fd` is a valid open socket for the duration of the call
    // (borrowed from its owner), and we pass a pointer to a live c_int
    // together with its exact size, as setsockopt requires.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Link for TcpStream {
    fn try_clone_link(&self) -> io::Result<Box<dyn Link>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_link(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
    fn set_link_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
    fn set_link_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(t)
    }
    fn detect_dead_peer(&self, timeout: Duration) -> io::Result<()> {
        use std::os::fd::AsFd;
        // Probe after a third of the timeout of silence, then every third,
        // three times; TCP_USER_TIMEOUT caps both the probes and data left
        // unacknowledged at the whole timeout.
        let step = usize::try_from(timeout.as_millis().div_ceil(3000))
            .unwrap_or(usize::MAX)
            .max(1);
        let millis = usize::try_from(timeout.as_millis())
            .unwrap_or(usize::MAX)
            .max(1);
        let fd = self.as_fd();
        set_int_option(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
        set_int_option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, step)?;
        set_int_option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, step)?;
        set_int_option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3)?;
        set_int_option(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, millis)
    }
    fn limit_buffers(&self, bytes: usize) -> io::Result<()> {
        use std::os::fd::AsFd;
        self.set_nodelay(true)?;
        // Keep little *unsent* data in the kernel (writes block until the
        // unsent queue drops below `bytes`), while the window — and so
        // throughput — stays autotuned; bound the receive queue too.
        set_int_option(
            self.as_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            bytes,
        )?;
        set_int_option(self.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, 4 * bytes)
    }
}

impl Link for UnixStream {
    fn try_clone_link(&self) -> io::Result<Box<dyn Link>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_link(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
    fn set_link_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
    fn set_link_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(t)
    }
    fn limit_buffers(&self, bytes: usize) -> io::Result<()> {
        use std::os::fd::AsFd;
        set_int_option(self.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, bytes)
    }
}

/// Bytes written per frame type, shared with reports.
#[derive(Default)]
pub struct WireCounters {
    by_type: [AtomicU64; FRAME_TYPES],
}

impl WireCounters {
    /// Adds `n` bytes of frame type `ty`.
    pub fn add(&self, ty: u8, n: u64) {
        if let Some(c) = self.by_type.get(ty as usize) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }
    /// Bytes of frame type `ty`.
    pub fn of(&self, ty: u8) -> u64 {
        self.by_type
            .get(ty as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
    /// All bytes.
    pub fn total(&self) -> u64 {
        self.by_type.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

struct Queues {
    priority: VecDeque<Vec<u8>>,
    bulk: VecDeque<Vec<u8>>,
    bulk_bytes: usize,
    closing: bool,
    failed: Option<WriterStopped>,
    pushed: u64,
    written: u64,
    /// Producers blocked in wait_for_space/drain (wake them only then).
    producers_waiting: usize,
    /// The writer is asleep waiting for frames.
    writer_waiting: bool,
}

/// Outgoing frames in two queues. The writer thread always sends every
/// queued priority frame before the next bulk frame, and bulk frames are at
/// most one block long, so a priority reply waits for at most one bulk frame.
pub struct FrameQueue {
    q: Mutex<Queues>,
    wake_writer: Condvar,
    wake_producer: Condvar,
    bulk_limit: usize,
    /// Bytes written, by frame type.
    pub counters: WireCounters,
    spare: Mutex<Vec<Vec<u8>>>,
    /// The link's write side, shared by the writer thread and direct writers.
    out: Mutex<BufWriter<Box<dyn Link>>>,
    /// The link's timeout, if any (keepalive interval and error reports).
    link_timeout: Option<Duration>,
}

const SPARE_BUFFERS: usize = 32;

/// Which way a link went quiet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    /// Nothing at all (not even a keepalive frame) arrived from the peer.
    Receiving,
    /// The peer accepted none of the data being written to it.
    Sending,
}

impl std::fmt::Display for Silence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Silence::Receiving => "nothing received from the peer",
            Silence::Sending => "the peer accepted no data",
        })
    }
}

/// The peer showed no sign of life for the link timeout: its host or the
/// link is down, or its process is frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("link timeout: {silence} for {secs:.1} s (peer frozen, unreachable or link dead)", secs = .waited.as_secs_f64())]
pub struct LinkTimeout {
    /// Which way the link went quiet.
    pub silence: Silence,
    /// How long it was quiet.
    pub waited: Duration,
}

/// Error returned when the writer has stopped.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriterStopped {
    /// The connection failed, was closed or aborted.
    #[error("connection writer stopped: {0}")]
    Failed(String),
    /// The link timed out (see [`FrameQueue::fail_with`]).
    #[error(transparent)]
    TimedOut(#[from] LinkTimeout),
}

impl FrameQueue {
    fn new(link: Box<dyn Link>, bulk_limit: usize, link_timeout: Option<Duration>) -> Self {
        FrameQueue {
            q: Mutex::new(Queues {
                priority: VecDeque::new(),
                bulk: VecDeque::new(),
                bulk_bytes: 0,
                closing: false,
                failed: None,
                pushed: 0,
                written: 0,
                producers_waiting: 0,
                writer_waiting: false,
            }),
            wake_writer: Condvar::new(),
            wake_producer: Condvar::new(),
            bulk_limit,
            counters: WireCounters::default(),
            spare: Mutex::new(Vec::new()),
            out: Mutex::new(BufWriter::with_capacity(64 * 1024, link)),
            link_timeout,
        }
    }

    /// What a failed write means: a link timeout if the write timed out.
    fn write_failure(&self, e: &io::Error) -> WriterStopped {
        match self.link_timeout {
            Some(waited) if is_timeout(e) => WriterStopped::TimedOut(LinkTimeout {
                silence: Silence::Sending,
                waited,
            }),
            _ => WriterStopped::Failed(format!("write failed: {e}")),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, frame: Vec<u8>, priority: bool) -> Result<(), WriterStopped> {
        let mut q = self.lock();
        if let Some(f) = &q.failed {
            return Err(f.clone());
        }
        if q.closing {
            return Err(WriterStopped::Failed("connection closing".into()));
        }
        q.pushed += 1;
        if priority {
            q.priority.push_back(frame);
        } else {
            q.bulk_bytes += frame.len();
            q.bulk.push_back(frame);
        }
        let wake = q.writer_waiting;
        drop(q);
        if wake {
            self.wake_writer.notify_one();
        }
        Ok(())
    }

    /// A buffer from a frame already written (or an empty one), so block
    /// frames reuse memory instead of allocating and zero-filling each time.
    pub fn spare_buffer(&self) -> Vec<u8> {
        self.spare
            .lock()
            .ok()
            .and_then(|mut s| s.pop())
            .unwrap_or_default()
    }

    fn recycle(&self, buf: Vec<u8>) {
        if let Ok(mut s) = self.spare.lock() {
            if s.len() < SPARE_BUFFERS && buf.capacity() >= 4096 {
                s.push(buf);
            }
        }
    }

    fn out(&self) -> std::sync::MutexGuard<'_, BufWriter<Box<dyn Link>>> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes a priority frame from the calling thread, right after the frame
    /// being written now, without waking the writer thread. It blocks while
    /// the link is full, so a thread that must keep reading the same
    /// connection (a receive loop) must use [`Self::push_priority`] instead.
    pub fn write_direct(&self, frame: Vec<u8>) -> Result<(), WriterStopped> {
        {
            let mut q = self.lock();
            if let Some(f) = &q.failed {
                return Err(f.clone());
            }
            if q.closing {
                return Err(WriterStopped::Failed("connection closing".into()));
            }
            q.pushed += 1;
        }
        let mut out = self.out();
        if let Err(e) = out.write_all(&frame).and_then(|()| out.flush()) {
            out.get_ref().shutdown_link();
            drop(out);
            let why = self.write_failure(&e);
            self.fail_with(why.clone());
            return Err(why);
        }
        drop(out);
        self.counters
            .add(frame.first().copied().unwrap_or(0), frame.len() as u64);
        self.recycle(frame);
        let mut q = self.lock();
        q.written += 1;
        let wake = q.producers_waiting > 0;
        drop(q);
        if wake {
            self.wake_producer.notify_all();
        }
        Ok(())
    }

    /// Queues a frame ahead of all bulk frames.
    pub fn push_priority(&self, frame: Vec<u8>) -> Result<(), WriterStopped> {
        self.push(frame, true)
    }

    /// Queues a bulk frame (never blocks; see [`Self::wait_for_space`]).
    pub fn push_bulk(&self, frame: Vec<u8>) -> Result<(), WriterStopped> {
        self.push(frame, false)
    }

    /// Blocks while the bulk queue is over its limit (backpressure).
    pub fn wait_for_space(&self) -> Result<(), WriterStopped> {
        let mut q = self.lock();
        loop {
            if let Some(f) = &q.failed {
                return Err(f.clone());
            }
            if q.bulk_bytes < self.bulk_limit || q.closing {
                return Ok(());
            }
            q = self.wait_producer(q);
        }
    }

    /// Blocks until every frame queued so far has been written to the link
    /// (events and priority frames also flushed).
    pub fn drain(&self) -> Result<(), WriterStopped> {
        let mut q = self.lock();
        let target = q.pushed;
        loop {
            if let Some(f) = &q.failed {
                return Err(f.clone());
            }
            if q.written >= target {
                return Ok(());
            }
            q = self.wait_producer(q);
        }
    }

    fn wait_producer<'a>(
        &'a self,
        mut q: std::sync::MutexGuard<'a, Queues>,
    ) -> std::sync::MutexGuard<'a, Queues> {
        q.producers_waiting += 1;
        let mut q = self
            .wake_producer
            .wait(q)
            .unwrap_or_else(|p| p.into_inner());
        q.producers_waiting -= 1;
        q
    }

    /// Returns a buffer that is no longer needed to the spare pool.
    pub fn give_back(&self, buf: Vec<u8>) {
        self.recycle(buf);
    }

    /// Why the queue failed, if it did.
    pub fn failure(&self) -> Option<WriterStopped> {
        self.lock().failed.clone()
    }

    /// Marks the queue failed (e.g. the reader saw the connection die).
    pub fn fail(&self, why: String) {
        self.fail_with(WriterStopped::Failed(why));
    }

    /// Marks the queue failed with `why`, which blocked and later producers
    /// get (unless it had already failed): e.g. the reader saw the link time
    /// out, so a producer waiting for space learns why at once.
    pub fn fail_with(&self, why: WriterStopped) {
        let mut q = self.lock();
        if q.failed.is_none() {
            q.failed = Some(why);
        }
        q.priority.clear();
        q.bulk.clear();
        drop(q);
        self.wake_writer.notify_all();
        self.wake_producer.notify_all();
    }
}

/// A frame queue plus the thread writing it to a link.
pub struct FrameWriter {
    queue: Arc<FrameQueue>,
    thread: Option<JoinHandle<()>>,
    control: Box<dyn Link>,
}

impl FrameWriter {
    /// Starts a writer thread on `link`; at most `bulk_limit` bytes of bulk
    /// frames are queued before [`FrameQueue::wait_for_space`] blocks.
    ///
    /// With a `link_timeout`, the thread sends a Keepalive frame whenever it
    /// has written nothing for a third of it (so the peer's reader, which
    /// gives up after the timeout, knows this side is alive), and a write
    /// that times out (see [`Link::set_link_write_timeout`]) fails the queue
    /// with [`WriterStopped::TimedOut`].
    pub fn start(
        link: Box<dyn Link>,
        bulk_limit: usize,
        link_timeout: Option<Duration>,
    ) -> io::Result<Self> {
        let control = link.try_clone_link()?;
        let queue = Arc::new(FrameQueue::new(link, bulk_limit, link_timeout));
        let q = queue.clone();
        let thread = std::thread::Builder::new()
            .name("drafter-frame-writer".into())
            .spawn(move || writer_loop(&q))
            .ok();
        if thread.is_none() {
            queue.fail("could not start writer thread".into());
        }
        Ok(FrameWriter {
            queue,
            thread,
            control,
        })
    }

    /// The queue to push frames into.
    pub fn queue(&self) -> &Arc<FrameQueue> {
        &self.queue
    }

    /// Writes everything queued, then stops the thread.
    pub fn finish(&mut self) -> Result<(), WriterStopped> {
        let r = self.queue.drain();
        if r.is_err() {
            self.abort();
        } else {
            self.stop();
        }
        r
    }

    /// Drops queued frames, shuts the link down and stops the thread.
    pub fn abort(&mut self) {
        self.queue.fail("connection aborted".into());
        self.control.shutdown_link();
        self.stop();
    }

    fn stop(&mut self) {
        {
            let mut q = self.queue.lock();
            q.closing = true;
        }
        self.queue.wake_writer.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FrameWriter {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.abort();
        }
    }
}

/// What the writer thread sends next.
enum Next {
    /// A queued frame, and whether it is a priority frame.
    Queued(Vec<u8>, bool),
    /// A keepalive: nothing was sent for a while.
    Keepalive,
}

fn writer_loop(q: &FrameQueue) {
    // The peer's reader gives up after the link timeout without a byte from
    // us: while idle, send a keepalive every third of it.
    let keepalive_every = q
        .link_timeout
        .map(|t| (t / 3).max(Duration::from_millis(1)));
    let mut last_write = Instant::now();
    loop {
        let next = {
            let mut g = q.lock();
            loop {
                if g.failed.is_some() {
                    return;
                }
                if let Some(f) = g.priority.pop_front() {
                    break Next::Queued(f, true);
                }
                if let Some(f) = g.bulk.pop_front() {
                    g.bulk_bytes -= f.len();
                    break Next::Queued(f, false);
                }
                if g.closing {
                    drop(g);
                    let _ = q.out().flush();
                    return;
                }
                // Nothing to send: push out what is buffered before sleeping.
                drop(g);
                let flushed = {
                    let mut out = q.out();
                    if out.buffer().is_empty() {
                        None
                    } else {
                        Some(out.flush())
                    }
                };
                match flushed {
                    Some(Err(e)) => {
                        q.out().get_ref().shutdown_link();
                        q.fail_with(q.write_failure(&e));
                        return;
                    }
                    Some(Ok(())) => {
                        last_write = Instant::now();
                        g = q.lock();
                        continue;
                    }
                    None => {}
                }
                g = q.lock();
                if !g.priority.is_empty() || !g.bulk.is_empty() || g.closing || g.failed.is_some() {
                    continue;
                }
                let Some(every) = keepalive_every else {
                    g.writer_waiting = true;
                    g = q.wake_writer.wait(g).unwrap_or_else(|p| p.into_inner());
                    g.writer_waiting = false;
                    continue;
                };
                let due = last_write + every;
                let now = Instant::now();
                if now >= due {
                    break Next::Keepalive;
                }
                g.writer_waiting = true;
                g = match q.wake_writer.wait_timeout(g, due - now) {
                    Ok((g, _)) => g,
                    Err(p) => p.into_inner().0,
                };
                g.writer_waiting = false;
            }
        };
        // Keepalives are not queued frames: they count as bytes on the wire,
        // never as written frames (which drain() waits for).
        let (frame, priority, queued) = match next {
            Next::Queued(f, p) => (f, p, true),
            Next::Keepalive => (KEEPALIVE_FRAME.to_vec(), true, false),
        };
        let ty = frame.first().copied().unwrap_or(0);
        let res = {
            let mut out = q.out();
            let r = out.write_all(&frame).and_then(|()| {
                // Priority replies and events go out at once; an event's
                // byte count below then means it really left this host.
                if priority || ty == crate::protocol::T_EVENT {
                    out.flush()
                } else {
                    Ok(())
                }
            });
            if r.is_err() {
                out.get_ref().shutdown_link();
            }
            r
        };
        if let Err(e) = res {
            q.fail_with(q.write_failure(&e));
            return;
        }
        last_write = Instant::now();
        q.counters.add(ty, frame.len() as u64);
        if !queued {
            continue;
        }
        q.recycle(frame);
        let mut g = q.lock();
        g.written += 1;
        // Wake producers with hysteresis (half-empty bulk queue), so the
        // bulk sender is not switched in for every frame.
        let wake = g.producers_waiting > 0 && g.bulk_bytes <= q.bulk_limit / 2;
        drop(g);
        if wake {
            q.wake_producer.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{read_frame, Message};

    #[test]
    fn an_idle_writer_sends_keepalives_that_drain_does_not_wait_for() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let timeout = Duration::from_millis(150);
        let mut w = FrameWriter::start(Box::new(a), 1 << 20, Some(timeout)).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let start = Instant::now();
        for _ in 0..3 {
            assert_eq!(read_frame(&mut b).unwrap(), Message::Keepalive);
        }
        // About one every third of the timeout, never slower.
        assert!(start.elapsed() < 6 * timeout, "{:?}", start.elapsed());
        let q = w.queue().clone();
        q.push_bulk(
            Message::Dirty {
                device: 0,
                blocks: vec![1],
            }
            .to_frame(),
        )
        .unwrap();
        q.drain().unwrap();
        let m = loop {
            match read_frame(&mut b).unwrap() {
                Message::Keepalive => {}
                m => break m,
            }
        };
        assert_eq!(
            m,
            Message::Dirty {
                device: 0,
                blocks: vec![1]
            }
        );
        assert!(q.counters.of(crate::protocol::T_KEEPALIVE) >= 15);
        w.finish().unwrap();
    }

    #[test]
    fn a_writer_whose_peer_stops_reading_times_out() {
        let (a, _b) = UnixStream::pair().unwrap();
        let timeout = Duration::from_millis(200);
        a.set_link_write_timeout(Some(timeout)).unwrap();
        a.limit_buffers(16 * 1024).unwrap();
        let w = FrameWriter::start(Box::new(a), 64 * 1024, Some(timeout)).unwrap();
        let q = w.queue().clone();
        let start = Instant::now();
        let err = loop {
            if let Err(e) = q.wait_for_space() {
                break e;
            }
            if let Err(e) = q.push_bulk(vec![0u8; 16 * 1024]) {
                break e;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "writer never timed out"
            );
        };
        let WriterStopped::TimedOut(t) = err else {
            panic!("expected a timeout, got {err}");
        };
        assert_eq!(t.silence, Silence::Sending);
        assert_eq!(t.waited, timeout);
        assert!(
            err.to_string().contains("the peer accepted no data"),
            "{err}"
        );
    }
}
