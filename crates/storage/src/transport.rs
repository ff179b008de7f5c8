//! Connections and the prioritised frame writer.

use std::collections::VecDeque;
use std::io::{self, BufWriter, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::protocol::FRAME_TYPES;

/// A bidirectional byte stream a migration runs over (TCP, Unix socket, …).
pub trait Link: Read + Write + Send + 'static {
    /// A second handle to the same connection (for a reader thread).
    fn try_clone_link(&self) -> io::Result<Box<dyn Link>>;
    /// Shuts the connection down in both directions, waking blocked readers.
    fn shutdown_link(&self);
    /// Sets the read timeout (`None` blocks forever).
    fn set_link_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// Caps kernel send/receive buffering, so a priority frame never waits
    /// behind megabytes of bulk data already handed to the kernel.
    fn limit_buffers(&self, _bytes: usize) -> io::Result<()> {
        Ok(())
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
    failed: Option<String>,
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
}

const SPARE_BUFFERS: usize = 32;

/// Error returned when the writer has stopped.
#[derive(Debug, Clone, thiserror::Error)]
#[error("connection writer stopped: {0}")]
pub struct WriterStopped(pub String);

impl FrameQueue {
    fn new(link: Box<dyn Link>, bulk_limit: usize) -> Self {
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
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, frame: Vec<u8>, priority: bool) -> Result<(), WriterStopped> {
        let mut q = self.lock();
        if let Some(f) = &q.failed {
            return Err(WriterStopped(f.clone()));
        }
        if q.closing {
            return Err(WriterStopped("connection closing".into()));
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
                return Err(WriterStopped(f.clone()));
            }
            if q.closing {
                return Err(WriterStopped("connection closing".into()));
            }
            q.pushed += 1;
        }
        let mut out = self.out();
        if let Err(e) = out.write_all(&frame).and_then(|()| out.flush()) {
            out.get_ref().shutdown_link();
            drop(out);
            let why = format!("write failed: {e}");
            self.fail(why.clone());
            return Err(WriterStopped(why));
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
                return Err(WriterStopped(f.clone()));
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
                return Err(WriterStopped(f.clone()));
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

    /// Marks the queue failed (e.g. the reader saw the connection die).
    pub fn fail(&self, why: String) {
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
    pub fn start(link: Box<dyn Link>, bulk_limit: usize) -> io::Result<Self> {
        let control = link.try_clone_link()?;
        let queue = Arc::new(FrameQueue::new(link, bulk_limit));
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

fn writer_loop(q: &FrameQueue) {
    loop {
        let (frame, priority) = {
            let mut g = q.lock();
            loop {
                if g.failed.is_some() {
                    return;
                }
                if let Some(f) = g.priority.pop_front() {
                    break (f, true);
                }
                if let Some(f) = g.bulk.pop_front() {
                    g.bulk_bytes -= f.len();
                    break (f, false);
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
                        q.fail(format!("write failed: {e}"));
                        return;
                    }
                    Some(Ok(())) => {
                        g = q.lock();
                        continue;
                    }
                    None => {}
                }
                g = q.lock();
                if !g.priority.is_empty() || !g.bulk.is_empty() || g.closing || g.failed.is_some() {
                    continue;
                }
                g.writer_waiting = true;
                g = q.wake_writer.wait(g).unwrap_or_else(|p| p.into_inner());
                g.writer_waiting = false;
            }
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
            q.fail(format!("write failed: {e}"));
            return;
        }
        q.counters.add(ty, frame.len() as u64);
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
