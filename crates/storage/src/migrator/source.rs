//! The sending side of a migration.

use std::io::{BufReader, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::converge::{Convergence, ThrottleHook, Verdict};
use super::{
    Authority, CancelHandle, Cause, DeviceConfig, MigrationConfig, MigrationError, Mode, Observer,
    Progress,
};
use crate::auth::{handshake_link, Role};
use crate::device::{block_len, is_zero, BlockDevice};
use crate::dirty::TrackedDevice;
use crate::protocol::{
    block_frame_in, compress_block_frame, read_frame, DeviceInfo, DeviceTable, Event, Message,
    ProtocolError, BLOCK_FRAME_DATA, MAX_HASHES, MAX_LIST, T_ZERO_BLOCKS,
};
use crate::report::{DeviceReport, MigrationReport, Phase, PhaseTiming};
use crate::transport::{FrameQueue, FrameWriter, Link, WriterStopped};

/// A device to migrate.
pub struct SourceDevice {
    name: String,
    device: Arc<dyn BlockDevice>,
    tracker: Option<Arc<TrackedDevice>>,
    config: DeviceConfig,
}

impl SourceDevice {
    /// A device whose writes are tracked, so it can keep changing during a
    /// pre-copy migration.
    pub fn tracked(
        name: impl Into<String>,
        device: Arc<TrackedDevice>,
        config: DeviceConfig,
    ) -> Self {
        SourceDevice {
            name: name.into(),
            device: device.clone(),
            tracker: Some(device),
            config,
        }
    }

    /// A device that does not change while it is served (a package in a
    /// registry).
    pub fn fixed(
        name: impl Into<String>,
        device: Arc<dyn BlockDevice>,
        config: DeviceConfig,
    ) -> Self {
        SourceDevice {
            name: name.into(),
            device,
            tracker: None,
            config,
        }
    }
}

/// Pushes a set of devices to one destination per [`Self::migrate`] call;
/// calls may run concurrently from several threads (a registry serving many
/// readers of the same fixed devices).
pub struct MigrationSource {
    devices: Vec<SourceDevice>,
    config: MigrationConfig,
    observer: Option<Observer>,
    cancel: CancelHandle,
    throttle: Option<ThrottleHook>,
}

impl MigrationSource {
    /// A source for `devices` (ids are their positions).
    pub fn new(devices: Vec<SourceDevice>, config: MigrationConfig) -> Self {
        MigrationSource {
            devices,
            config,
            observer: None,
            cancel: CancelHandle::default(),
            throttle: None,
        }
    }

    /// Lets the engine slow the guest down when it dirties faster than the
    /// link drains ([`OnNoConvergence::Throttle`](super::OnNoConvergence::Throttle)):
    /// `hook` is called with increasing percentages during the dirty cycles
    /// and with 0 when the migration ends, whatever its outcome.
    pub fn with_throttle(mut self, hook: ThrottleHook) -> Self {
        self.throttle = Some(hook);
        self
    }

    /// Calls `observer` with progress (phases, blocks, cycles).
    pub fn with_observer(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    /// A handle that cancels the migrations running on this source.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// Migrates every device over `link`. `suspend` is called once all
    /// devices are ready (pre-copy) or right away (post-copy); it must pause
    /// the VM and flush its memory into the devices. The VM stays paused
    /// until this returns: on success the destination runs it (it sent
    /// Running and Completed); on an error, [`MigrationError::authority`]
    /// says what to do with it ([`Authority::Source`]: resume it and maybe
    /// retry; [`Authority::Destination`]: stop it; [`Authority::Unknown`]:
    /// keep it paused until an operator checked the destination).
    pub fn migrate<L: Link>(
        &self,
        link: L,
        suspend: impl FnOnce() -> Result<(), String>,
    ) -> Result<MigrationReport, MigrationError> {
        self.migrate_prepared(link, None, suspend)
    }

    /// [`MigrationSource::migrate`] with a `prepare` step for the final
    /// stop: called once the dirty cycles are done, while the VM still runs
    /// (a guest's before-suspend hook), then every tracked device runs one
    /// more dirty cycle, so what `prepare` made the guest write travels
    /// before the pause rather than in the downtime. In post-copy it is
    /// called right before `suspend`.
    pub fn migrate_prepared<L: Link>(
        &self,
        link: L,
        prepare: Option<Box<dyn FnOnce() + '_>>,
        suspend: impl FnOnce() -> Result<(), String>,
    ) -> Result<MigrationReport, MigrationError> {
        let mut run = Run {
            src: self,
            phase: Phase::Handshake,
            phase_start: Instant::now(),
            start: Instant::now(),
            timings: Vec::new(),
            shared: None,
            rx: None,
            writer: None,
            running: false,
            completed: false,
            acks: 0,
            bases: vec![None; self.devices.len()],
            pending: None,
            verify: vec![None; self.devices.len()],
            reports: Vec::new(),
            downtime_start: None,
            downtime: Duration::ZERO,
            bytes_received: Arc::new(AtomicU64::new(0)),
            reader: None,
            control: None,
            attached: None,
            conv: None,
            ready_reason: None,
        };
        let result = run.execute(Box::new(link), prepare, suspend);
        if let Some(c) = run.conv.as_mut() {
            c.release();
        }
        let report = run.finish_report();
        match result {
            Ok(()) => Ok(report),
            Err(cause) => {
                let cause = if self.cancel.is_cancelled() {
                    Cause::Cancelled
                } else {
                    cause
                };
                // A destination that declined after Commit and closed its
                // end makes a write fail here before the reader has handed
                // on why: give the reader, bounded, the frames already on
                // their way, so a refusal is not taken for an unknown outcome.
                if run.shared.as_ref().is_some_and(|s| s.commit_sent()) {
                    run.await_reader(DECLINE_GRACE);
                }
                // Settled before the link goes down, so the reader can no
                // longer send Commit once authority is decided to stay here.
                let authority = run
                    .shared
                    .as_ref()
                    .map_or(Authority::Source, |s| s.settle());
                // A refusal explains the failure better than the broken
                // pipe the main thread may have seen first.
                let declined = run.shared.as_ref().and_then(|s| {
                    s.declined_because
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone()
                });
                let cause = match declined {
                    Some(why) if authority == Authority::Source => Cause::Declined(why),
                    _ => cause,
                };
                if let Some(mut w) = run.writer.take() {
                    w.abort();
                }
                if let Some(c) = &run.control {
                    c.shutdown_link();
                }
                if let Some(h) = run.reader.take() {
                    let _ = h.join();
                }
                tracing::warn!(phase = %run.phase, error = %cause, %authority, "migration failed");
                Err(MigrationError {
                    phase: run.phase,
                    authority,
                    cause,
                })
            }
        }
    }
}

/// How long a failed source waits, after Commit, for the reader to hand on
/// a refusal the destination sent before closing its end.
const DECLINE_GRACE: Duration = Duration::from_secs(2);

struct Dev {
    info: DeviceInfo,
    device: Arc<dyn BlockDevice>,
    /// Held while a block is read and queued, and while the dirty set is
    /// taken and its list queued, so a block's data can never reach the
    /// destination after the Dirty list that supersedes it.
    send_lock: Mutex<()>,
    base: Mutex<Option<Arc<Vec<[u8; 32]>>>>,
}

/// The source's side of the handover (see the module documentation of
/// [`crate::migrator`]): authority is decided from this state alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handover {
    /// The VM may still run here; no handover offered yet.
    NotOffered,
    /// HandoverOffered queued: the VM is paused; no Commit sent.
    Offered,
    /// Commit handed to the link at this instant (it may have arrived).
    CommitSent(Instant),
    /// The destination refused (an Error frame before Running): it does not
    /// run the VM, so authority stays here even if Commit was sent.
    Declined,
    /// The destination acknowledged that it runs the VM.
    Running,
    /// The migration failed before Commit was sent: no Commit will be.
    Aborted,
}

struct Shared {
    devs: Vec<Dev>,
    table: DeviceTable,
    queue: Arc<FrameQueue>,
    handover: Mutex<Handover>,
    /// Why the destination declined the handover, if it did.
    declined_because: Mutex<Option<String>>,
    cancel: CancelHandle,
    /// The source's observer, told of Commit by the reader thread.
    observer: Option<Observer>,
    compression: bool,
    served: AtomicU64,
    data_blocks: AtomicU64,
    zero_blocks: AtomicU64,
    already: AtomicU64,
    saved: AtomicU64,
}

enum Block {
    Zero,
    Same,
    Data(Vec<u8>),
}

impl Shared {
    fn handover(&self) -> std::sync::MutexGuard<'_, Handover> {
        self.handover.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers ReadyToRun: sends Commit if the handover was offered and the
    /// migration is still going. Returns whether Commit was sent.
    fn commit(&self) -> Result<bool, Cause> {
        let mut h = self.handover();
        match *h {
            Handover::Offered => {
                if self.cancel.is_cancelled() || self.queue.failure().is_some() {
                    // The main thread fails and settles authority here.
                    return Ok(false);
                }
                // From the first byte written, Commit may reach the peer.
                *h = Handover::CommitSent(Instant::now());
                self.queue
                    .write_direct(Message::Event(Event::Commit).to_frame())?;
                drop(h);
                // Told from this thread, right after the write and before
                // the next frame (Running) is read, so an observer sees the
                // window in which authority is unknown.
                if let Some(o) = &self.observer {
                    o(&Progress::Phase(Phase::AuthorityTransferred));
                }
                Ok(true)
            }
            Handover::Aborted => Ok(false),
            _ => Err(ProtocolError::Unexpected {
                got: "ReadyToRun",
                state: "before the handover was offered or after Commit",
            }
            .into()),
        }
    }

    /// Running arrived: the destination runs the VM.
    fn running(&self) -> Result<(), Cause> {
        let mut h = self.handover();
        match *h {
            Handover::CommitSent(_) => {
                *h = Handover::Running;
                Ok(())
            }
            _ => Err(ProtocolError::Unexpected {
                got: "Running",
                state: "before Commit",
            }
            .into()),
        }
    }

    /// An Error frame arrived: before Running it means the destination does
    /// not run the VM (it never sends one after acting on Commit).
    /// Returns true if the handover was under way.
    fn declined(&self) -> bool {
        let mut h = self.handover();
        let during = matches!(*h, Handover::Offered | Handover::CommitSent(_));
        if during {
            *h = Handover::Declined;
        }
        during
    }

    /// Commit was sent and nothing since decided the outcome.
    fn commit_sent(&self) -> bool {
        matches!(*self.handover(), Handover::CommitSent(_))
    }

    /// The migration failed: decides who holds authority, and makes sure no
    /// Commit is sent after a decision that it stays here.
    fn settle(&self) -> Authority {
        let mut h = self.handover();
        match *h {
            Handover::NotOffered | Handover::Offered | Handover::Aborted | Handover::Declined => {
                *h = Handover::Aborted;
                Authority::Source
            }
            Handover::CommitSent(_) => Authority::Unknown,
            Handover::Running => Authority::Destination,
        }
    }

    /// Reads and classifies block `idx`; the caller holds the device's send lock.
    fn classify(&self, dev: u32, idx: u64) -> Result<Block, Cause> {
        let d = &self.devs[dev as usize];
        if d.device.known_zero(idx) {
            return Ok(Block::Zero);
        }
        let len = block_len(d.info.size, d.info.block_size, idx);
        let mut frame = block_frame_in(self.queue.spare_buffer(), dev, idx, len);
        d.device.read_at(
            &mut frame[BLOCK_FRAME_DATA..],
            idx * u64::from(d.info.block_size),
        )?;
        let data = &frame[BLOCK_FRAME_DATA..];
        if is_zero(data) {
            self.queue.give_back(frame);
            return Ok(Block::Zero);
        }
        let base = d.base.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(base) = base {
            if base.get(idx as usize) == Some(blake3::hash(data).as_bytes()) {
                self.queue.give_back(frame);
                return Ok(Block::Same);
            }
        }
        if self.compression {
            let before = frame.len();
            frame = compress_block_frame(frame, 1);
            self.saved
                .fetch_add((before - frame.len()) as u64, Ordering::Relaxed);
        }
        Ok(Block::Data(frame))
    }

    fn lock(&self, dev: u32) -> std::sync::MutexGuard<'_, ()> {
        self.devs[dev as usize]
            .send_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Answers a NeedBlock ahead of the bulk stream.
    fn serve_need(&self, dev: u32, idx: u64) -> Result<(), Cause> {
        let _g = self.lock(dev);
        let frame = match self.classify(dev, idx)? {
            Block::Zero => Message::ZeroBlocks {
                device: dev,
                start: idx,
                count: 1,
            }
            .to_frame(),
            Block::Same => Message::AlreadyHave {
                device: dev,
                start: idx,
                count: 1,
            }
            .to_frame(),
            Block::Data(f) => f,
        };
        self.served.fetch_add(1, Ordering::Relaxed);
        // If the writer has stopped the reply is dropped without error: the
        // reader keeps reading, because a destination that already completed
        // (and closed) may have left a Completed frame behind its last
        // requests; a dead connection surfaces as a read error instead.
        if let Err(e) = self.queue.write_direct(frame) {
            tracing::debug!(error = %e, "need-block reply dropped");
        }
        Ok(())
    }
}

/// Counts bytes read through it.
struct Counting<R> {
    inner: R,
    n: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn reader_loop(
    link: Box<dyn Link>,
    shared: Arc<Shared>,
    tx: Sender<Result<Message, Cause>>,
    counter: Arc<AtomicU64>,
    link_timeout: Option<Duration>,
) {
    let mut r = BufReader::with_capacity(
        8 * 1024,
        Counting {
            inner: link,
            n: counter,
        },
    );
    loop {
        match read_frame(&mut r) {
            Ok(Message::NeedBlock { device, index }) => {
                let res = shared
                    .table
                    .check_block(device, index)
                    .map_err(Cause::from)
                    .and_then(|_| shared.serve_need(device, index));
                if let Err(e) = res {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
            Ok(Message::Error { message }) => {
                let cause = if shared.declined() {
                    *shared
                        .declined_because
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(message.clone());
                    Cause::Declined(message)
                } else {
                    ProtocolError::Peer(message).into()
                };
                let _ = tx.send(Err(cause));
                return;
            }
            // The destination is alive; nothing else to do.
            Ok(Message::Keepalive) => {}
            // Answered here, not by the main thread (which may be busy
            // pushing the tail), so Commit follows ReadyToRun at once.
            Ok(Message::Event(Event::ReadyToRun)) => match shared.commit() {
                Ok(true) => {
                    if tx.send(Ok(Message::Event(Event::Commit))).is_err() {
                        return;
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            },
            Ok(Message::Event(Event::Running)) => {
                let r = shared.running().map(|()| Message::Event(Event::Running));
                let failed = r.is_err();
                if tx.send(r).is_err() || failed {
                    return;
                }
            }
            Ok(m) => {
                if tx.send(Ok(m)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let cause = Cause::from(e).of_receive(link_timeout, shared.queue.failure());
                if let Cause::LinkTimeout(t) = &cause {
                    // Wake a sender blocked on backpressure or a drain now,
                    // with the reason, instead of at its own write timeout.
                    shared.queue.fail_with(WriterStopped::TimedOut(*t));
                }
                let _ = tx.send(Err(cause));
                return;
            }
        }
    }
}

struct PendingRun {
    zero: bool,
    dev: u32,
    start: u64,
    count: u64,
}

struct CycleState {
    cycles: u32,
    quiet: u32,
    ready: Option<String>,
    history: Vec<u64>,
    final_dirty: u64,
}

struct Run<'a> {
    src: &'a MigrationSource,
    phase: Phase,
    phase_start: Instant,
    start: Instant,
    timings: Vec<PhaseTiming>,
    shared: Option<Arc<Shared>>,
    rx: Option<Receiver<Result<Message, Cause>>>,
    writer: Option<FrameWriter>,
    /// The destination acknowledged that it runs the VM.
    running: bool,
    completed: bool,
    acks: usize,
    bases: Vec<Option<Vec<[u8; 32]>>>,
    pending: Option<PendingRun>,
    verify: Vec<Option<(u64, Vec<u64>)>>,
    reports: Vec<CycleState>,
    downtime_start: Option<Instant>,
    downtime: Duration,
    bytes_received: Arc<AtomicU64>,
    reader: Option<std::thread::JoinHandle<()>>,
    control: Option<Box<dyn Link>>,
    attached: Option<super::Attached>,
    /// Rates and the convergence decision (from the dirty cycles on).
    conv: Option<Convergence>,
    /// Which rule ended the dirty cycles.
    ready_reason: Option<String>,
}

fn proto(e: impl std::fmt::Display) -> Cause {
    Cause::Protocol(ProtocolError::Io(std::io::Error::other(e.to_string())))
}

impl Run<'_> {
    fn enter(&mut self, phase: Phase) {
        let now = Instant::now();
        self.timings.push(PhaseTiming {
            phase: self.phase,
            millis: (now - self.phase_start).as_secs_f64() * 1e3,
        });
        self.phase = phase;
        self.phase_start = now;
        tracing::debug!(%phase, "migration phase");
        self.notify(&Progress::Phase(phase));
    }

    fn notify(&self, p: &Progress) {
        if let Some(o) = &self.src.observer {
            o(p);
        }
    }

    fn shared(&self) -> Result<Arc<Shared>, Cause> {
        self.shared.clone().ok_or_else(|| proto("not connected"))
    }

    fn queue(&self) -> Result<Arc<FrameQueue>, Cause> {
        Ok(self.shared()?.queue.clone())
    }

    fn push_bulk(&self, m: &Message) -> Result<(), Cause> {
        Ok(self.queue()?.push_bulk(m.to_frame())?)
    }

    fn check_cancel(&self) -> Result<(), Cause> {
        if self.src.cancel.is_cancelled() {
            Err(Cause::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Handles everything the reader delivered so far, waiting until
    /// `deadline` for the first message if given.
    /// After a failure: waits until the reader has ended (it hands on a
    /// refusal as it reads it) or `grace` has passed; what it read is
    /// dropped.
    fn await_reader(&mut self, grace: Duration) {
        let Some(rx) = self.rx.as_ref() else {
            return;
        };
        let deadline = Instant::now() + grace;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }

    fn poll(&mut self, deadline: Option<Instant>) -> Result<(), Cause> {
        self.check_cancel()?;
        let Some(rx) = self.rx.take() else {
            return Err(proto("not connected"));
        };
        let mut result = Ok(());
        let mut first = match deadline {
            Some(d) => match rx.recv_timeout(d.saturating_duration_since(Instant::now())) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => Some(Err(ProtocolError::Closed.into())),
            },
            None => None,
        };
        loop {
            let msg = match first.take() {
                Some(m) => m,
                None => match rx.try_recv() {
                    Ok(m) => m,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => Err(ProtocolError::Closed.into()),
                },
            };
            if let Err(e) = msg.and_then(|m| self.handle(m)) {
                result = Err(e);
                break;
            }
            if self.completed {
                // The destination may close right after Completed.
                break;
            }
        }
        self.rx = Some(rx);
        self.check_cancel()?;
        result
    }

    fn handle(&mut self, m: Message) -> Result<(), Cause> {
        let shared = self.shared()?;
        match m {
            Message::BaseHashes {
                device,
                start,
                hashes,
            } if self.acks < shared.devs.len() => {
                shared.table.check_run(device, start, hashes.len() as u64)?;
                let base = self.bases[device as usize].get_or_insert_with(Vec::new);
                if start != base.len() as u64 {
                    return Err(ProtocolError::OutOfRange(format!(
                        "base hashes out of order at {start}"
                    ))
                    .into());
                }
                base.extend(hashes);
            }
            Message::DeviceAck { device, has_base } if self.acks < shared.devs.len() => {
                if device as usize != self.acks {
                    return Err(ProtocolError::OutOfRange(format!(
                        "ack for device {device} out of order"
                    ))
                    .into());
                }
                let blocks = shared.table.device(device)?.blocks();
                let base = self.bases[device as usize].take();
                match (has_base, base) {
                    (true, Some(b)) if b.len() as u64 == blocks => {
                        *shared.devs[device as usize]
                            .base
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(b));
                    }
                    (false, None) => {}
                    _ => {
                        return Err(ProtocolError::Malformed {
                            kind: "DeviceAck",
                            what: "base hashes missing, incomplete or unannounced",
                        }
                        .into())
                    }
                }
                self.acks += 1;
            }
            // Commit was sent (and observers told) by the reader thread
            // (see `Shared::commit`).
            Message::Event(Event::Commit) => {}
            // Checked by the reader thread (see `Shared::running`).
            Message::Event(Event::Running) if !self.running => {
                self.running = true;
                if let Some(t) = self.downtime_start {
                    self.downtime = t.elapsed();
                }
                self.notify(&Progress::Phase(Phase::AuthorityAccepted));
            }
            Message::VerifyResult {
                device,
                mismatched,
                sample,
            } if self.src.config.verify => {
                shared.table.device(device)?;
                self.verify[device as usize] = Some((mismatched, sample));
            }
            Message::Event(Event::Completed) if self.running => self.completed = true,
            other => {
                return Err(ProtocolError::Unexpected {
                    got: other.kind(),
                    state: "from a destination",
                }
                .into())
            }
        }
        Ok(())
    }

    fn flush_run(&mut self) -> Result<(), Cause> {
        if let Some(p) = self.pending.take() {
            let m = if p.zero {
                Message::ZeroBlocks {
                    device: p.dev,
                    start: p.start,
                    count: p.count,
                }
            } else {
                Message::AlreadyHave {
                    device: p.dev,
                    start: p.start,
                    count: p.count,
                }
            };
            self.push_bulk(&m)?;
        }
        Ok(())
    }

    fn add_run(&mut self, zero: bool, dev: u32, idx: u64) -> Result<(), Cause> {
        if let Some(p) = &mut self.pending {
            if p.zero == zero && p.dev == dev && p.start + p.count == idx && p.count < 1 << 20 {
                p.count += 1;
                return Ok(());
            }
        }
        self.flush_run()?;
        self.pending = Some(PendingRun {
            zero,
            dev,
            start: idx,
            count: 1,
        });
        Ok(())
    }

    /// Sends one block in the bulk stream.
    fn send_block(&mut self, dev: u32, idx: u64) -> Result<(), Cause> {
        let shared = self.shared()?;
        // Wait for queue space before taking the lock, so need-block replies
        // never wait behind backpressure.
        shared.queue.wait_for_space()?;
        let _g = shared.lock(dev);
        match shared.classify(dev, idx)? {
            Block::Data(f) => {
                self.flush_run()?;
                shared.queue.push_bulk(f)?;
                shared.data_blocks.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            other => self.record_run(&shared, other, dev, idx),
        }
    }

    fn record_run(&mut self, shared: &Shared, b: Block, dev: u32, idx: u64) -> Result<(), Cause> {
        match b {
            Block::Zero => {
                shared.zero_blocks.fetch_add(1, Ordering::Relaxed);
                self.add_run(true, dev, idx)
            }
            Block::Same => {
                shared.already.fetch_add(1, Ordering::Relaxed);
                self.add_run(false, dev, idx)
            }
            Block::Data(_) => Ok(()),
        }
    }

    fn pass(&mut self, dev: u32, order: &[u64]) -> Result<(), Cause> {
        let total = order.len() as u64;
        for (i, &idx) in order.iter().enumerate() {
            if i % 64 == 0 {
                self.poll(None)?;
                self.notify(&Progress::Blocks {
                    done: i as u64,
                    total,
                });
            }
            self.send_block(dev, idx)?;
        }
        self.flush_run()?;
        self.notify(&Progress::Blocks { done: total, total });
        Ok(())
    }

    /// Takes the dirty set of device `dev` and queues its Dirty list,
    /// atomically with respect to need-block replies.
    fn take_and_announce(&mut self, dev: u32) -> Result<Vec<u64>, Cause> {
        self.flush_run()?;
        let shared = self.shared()?;
        let Some(tracker) = self.src.devices[dev as usize].tracker.clone() else {
            return Ok(Vec::new());
        };
        let _g = shared.lock(dev);
        let dirty = tracker.take_dirty()?;
        for chunk in dirty.chunks(MAX_LIST) {
            shared.queue.push_bulk(
                Message::Dirty {
                    device: dev,
                    blocks: chunk.to_vec(),
                }
                .to_frame(),
            )?;
        }
        Ok(dirty)
    }

    fn execute(
        &mut self,
        mut link: Box<dyn Link>,
        prepare: Option<Box<dyn FnOnce() + '_>>,
        suspend: impl FnOnce() -> Result<(), String>,
    ) -> Result<(), Cause> {
        let src = self.src;
        let cfg = &src.config;
        self.check_cancel()?;
        self.notify(&Progress::Phase(Phase::Handshake));
        let control = link.try_clone_link().map_err(ProtocolError::Io)?;
        self.attached = Some(
            src.cancel
                .attach(link.try_clone_link().map_err(ProtocolError::Io)?),
        );
        self.control = Some(control);
        link.set_link_read_timeout(Some(cfg.handshake_timeout))
            .map_err(ProtocolError::Io)?;
        link.set_link_write_timeout(Some(cfg.handshake_timeout))
            .map_err(ProtocolError::Io)?;
        handshake_link(&mut link, Role::Source, &cfg.secret)?;
        // From here on every read and write is bounded by the link timeout
        // (the socket options are shared by every handle of the connection:
        // the reader thread, the writer thread and need-block replies).
        let link_timeout = cfg.link_timeout_bound();
        link.set_link_read_timeout(link_timeout)
            .map_err(ProtocolError::Io)?;
        link.set_link_write_timeout(link_timeout)
            .map_err(ProtocolError::Io)?;
        if let Some(t) = link_timeout {
            link.detect_dead_peer(t).map_err(ProtocolError::Io)?;
        }
        if let Some(b) = cfg.socket_buffer_bytes {
            link.limit_buffers(b).map_err(ProtocolError::Io)?;
        }

        let infos: Vec<DeviceInfo> = src
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| DeviceInfo {
                id: i as u32,
                name: d.name.clone(),
                size: d.device.size(),
                block_size: d.device.block_size(),
            })
            .collect();
        let writer = FrameWriter::start(
            link.try_clone_link().map_err(ProtocolError::Io)?,
            cfg.bulk_queue_bytes,
            link_timeout,
        )
        .map_err(ProtocolError::Io)?;
        let shared = Arc::new(Shared {
            devs: src
                .devices
                .iter()
                .zip(&infos)
                .map(|(d, info)| Dev {
                    info: info.clone(),
                    device: d.device.clone(),
                    send_lock: Mutex::new(()),
                    base: Mutex::new(None),
                })
                .collect(),
            table: DeviceTable::new(infos.clone()),
            queue: writer.queue().clone(),
            handover: Mutex::new(Handover::NotOffered),
            declined_because: Mutex::new(None),
            cancel: src.cancel.clone(),
            observer: src.observer.clone(),
            compression: cfg.compression,
            served: AtomicU64::new(0),
            data_blocks: AtomicU64::new(0),
            zero_blocks: AtomicU64::new(0),
            already: AtomicU64::new(0),
            saved: AtomicU64::new(0),
        });
        self.writer = Some(writer);
        self.shared = Some(shared.clone());
        let (tx, rx) = mpsc::channel();
        self.rx = Some(rx);
        let (s2, counter) = (shared.clone(), self.bytes_received.clone());
        self.reader = Some(
            std::thread::Builder::new()
                .name("drafter-migration-source-reader".into())
                .spawn(move || reader_loop(link, s2, tx, counter, link_timeout))
                .map_err(ProtocolError::Io)?,
        );
        self.reports = src
            .devices
            .iter()
            .map(|d| CycleState {
                cycles: 0,
                quiet: 0,
                ready: if d.tracker.is_none() {
                    Some("does not change".into())
                } else {
                    None
                },
                history: Vec::new(),
                final_dirty: 0,
            })
            .collect();

        self.enter(Phase::DeviceInfo);
        for info in &infos {
            self.push_bulk(&Message::DeviceInfo(info.clone()))?;
        }
        self.push_bulk(&Message::DevicesListed {
            count: infos.len() as u32,
        })?;
        while self.acks < infos.len() {
            self.poll(Some(Instant::now() + Duration::from_millis(100)))?;
        }

        let n = infos.len() as u32;
        if cfg.mode == Mode::PostCopy {
            if let Some(prepare) = prepare {
                prepare();
            }
            self.enter(Phase::Suspend);
            self.downtime_start = Some(Instant::now());
            suspend().map_err(Cause::Caller)?;
            self.offer()?;
            self.enter(Phase::Tail);
            for dev in 0..n {
                let order: Vec<u64> = (0..infos[dev as usize].blocks()).collect();
                self.pass(dev, &order)?;
            }
        } else {
            for dev in 0..n {
                self.take_and_announce_silently(dev)?;
            }
            self.conv = Some(Convergence::new(
                cfg,
                src.throttle.clone(),
                n as usize,
                Instant::now(),
            ));
            self.enter(Phase::FullPass);
            let pass_start = Instant::now();
            let bytes_before = shared.queue.counters.total();
            for dev in 0..n {
                let order = match &src.devices[dev as usize].tracker {
                    Some(t) => t.send_order(),
                    None => (0..infos[dev as usize].blocks()).collect(),
                };
                self.pass(dev, &order)?;
            }
            self.enter(Phase::DirtyCycles);
            self.dirty_cycles(pass_start, bytes_before)?;
            if let Some(prepare) = prepare {
                prepare();
                // What the guest wrote while preparing goes out now.
                for dev in 0..n as usize {
                    if self.src.devices[dev].tracker.is_some() {
                        self.cycle(dev)?;
                    }
                }
            }
            self.enter(Phase::Suspend);
            self.downtime_start = Some(Instant::now());
            suspend().map_err(Cause::Caller)?;
            self.enter(Phase::FinalDirty);
            let mut finals = Vec::new();
            for dev in 0..n {
                let d = self.take_and_announce(dev)?;
                self.reports[dev as usize].final_dirty = d.len() as u64;
                finals.push(d);
            }
            if cfg.final_data_before_authority {
                // Stop-and-copy tail: no post-copy faults.
                for (dev, list) in std::mem::take(&mut finals).iter().enumerate() {
                    self.pass(dev as u32, list)?;
                }
            }
            self.offer()?;
            self.enter(Phase::Tail);
            for (dev, list) in finals.iter().enumerate() {
                self.pass(dev as u32, list)?;
            }
        }
        if cfg.verify {
            self.enter(Phase::Verify);
            for dev in 0..n {
                self.send_hashes(dev)?;
            }
        }
        self.push_bulk(&Message::Event(Event::AllSent))?;
        // The destination asks for authority (ReadyToRun) when it has what
        // it needs; the reader answers with Commit. With every block sent,
        // ReadyToRun must come within the link timeout (the VM is paused
        // meanwhile), and Running within the link timeout of Commit.
        let all_sent = Instant::now();
        while !self.completed {
            self.poll(Some(Instant::now() + Duration::from_millis(100)))?;
            let (awaited, waited) = match *shared.handover() {
                Handover::Offered => ("ReadyToRun after AllSent", all_sent.elapsed()),
                Handover::CommitSent(at) => ("Running acknowledgement after Commit", at.elapsed()),
                _ => continue,
            };
            if let Some(t) = link_timeout.filter(|t| waited > *t) {
                return Err(Cause::HandoverTimeout { awaited, waited: t });
            }
        }
        if let Some(mut w) = self.writer.take() {
            // The destination has everything; late need-block replies it no
            // longer reads may fail to send, which is harmless now.
            if let Err(e) = w.finish() {
                tracing::debug!(error = %e, "writer stopped after completion");
            }
        }
        self.enter(Phase::Complete);
        if let Some(c) = &self.control {
            c.shutdown_link();
        }
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
        Ok(())
    }

    /// Resets the dirty set before the full pass (which reads current data).
    fn take_and_announce_silently(&mut self, dev: u32) -> Result<(), Cause> {
        if let Some(t) = &self.src.devices[dev as usize].tracker {
            t.take_dirty()?;
        }
        Ok(())
    }

    /// Offers the handover: the VM is paused and the final dirty lists are
    /// queued. The destination may now prepare the VM; it gets authority
    /// only with Commit, sent when it answers ReadyToRun.
    fn offer(&mut self) -> Result<(), Cause> {
        self.flush_run()?;
        self.poll(None)?;
        let shared = self.shared()?;
        let mut h = shared.handover();
        if *h != Handover::NotOffered {
            return Err(proto("handover offered twice"));
        }
        *h = Handover::Offered;
        drop(h);
        self.push_bulk(&Message::Event(Event::HandoverOffered))?;
        Ok(())
    }

    fn dirty_cycles(&mut self, pass_start: Instant, bytes_before: u64) -> Result<(), Cause> {
        let shared = self.shared()?;
        let n = self.src.devices.len();
        let mut next_due = vec![Instant::now(); n];
        if self.conv.is_some() {
            // The full pass's sample counts what reached the link, so wait
            // until its queued frames are written: a small pass can sit
            // whole in the queue and would not show the link's rate.
            self.flush_run()?;
            shared.queue.drain()?;
        }
        if let Some(c) = self.conv.as_mut() {
            c.record_send(
                shared.queue.counters.total() - bytes_before,
                pass_start.elapsed(),
            );
        }
        loop {
            if self.all_ready() {
                return Ok(());
            }
            let now = Instant::now();
            let mut cycled = false;
            for (dev, due) in next_due.iter_mut().enumerate() {
                if self.src.devices[dev].tracker.is_none() || now < *due {
                    continue;
                }
                self.cycle(dev)?;
                cycled = true;
                *due = Instant::now() + self.src.devices[dev].config.cycle_throttle;
            }
            if cycled {
                self.decide()?;
            }
            if self.all_ready() {
                return Ok(());
            }
            let wake = next_due.iter().copied().min().unwrap_or_else(Instant::now);
            if wake > Instant::now() {
                // The throttle pause; wakes early on errors or cancellation.
                self.poll(Some(wake))?;
            }
        }
    }

    fn all_ready(&self) -> bool {
        self.reports.iter().all(|r| r.ready.is_some())
    }

    /// One dirty cycle of device `dev`: takes its dirty set, sends it, and
    /// records the rates and the per-device bounds.
    fn cycle(&mut self, dev: usize) -> Result<(), Cause> {
        let shared = self.shared()?;
        let cfg = &self.src.devices[dev].config;
        let (start, bytes_start) = (Instant::now(), shared.queue.counters.total());
        let dirty = self.take_and_announce(dev as u32)?;
        let taken = Instant::now();
        for &idx in &dirty {
            self.poll(None)?;
            self.send_block(dev as u32, idx)?;
        }
        self.flush_run()?;
        let d = dirty.len() as u64;
        if let Some(c) = self.conv.as_mut() {
            c.record_send(shared.queue.counters.total() - bytes_start, start.elapsed());
            c.record_dirty(dev, d * u64::from(shared.devs[dev].info.block_size), taken);
        }
        let st = &mut self.reports[dev];
        st.cycles += 1;
        st.history.push(d);
        st.quiet = if d < cfg.max_dirty_blocks {
            st.quiet + 1
        } else {
            0
        };
        if st.ready.is_none() {
            let bound = if st.quiet > cfg.min_cycles {
                Some(format!("quiet for {} cycles", st.quiet))
            } else if st.cycles >= cfg.max_cycles {
                Some("maxCycles reached".to_string())
            } else {
                None
            };
            if let Some(b) = bound {
                let b = self.conv.as_ref().map_or(b.clone(), |c| c.bound_reason(&b));
                self.ready_reason = Some(b.clone());
                st.ready = Some(b);
            }
        }
        let cycle = st.cycles;
        self.notify(&Progress::Cycle {
            device: dev,
            cycle,
            dirty: d,
        });
        Ok(())
    }

    /// After a round of cycles: the stop rule by predicted downtime over
    /// all devices, and the remedy when the guest outruns the link.
    fn decide(&mut self) -> Result<(), Cause> {
        let min_done = self
            .src
            .devices
            .iter()
            .zip(&self.reports)
            .all(|(d, r)| d.tracker.is_none() || r.cycles >= d.config.min_cycles);
        let Some(c) = self.conv.as_mut() else {
            return Ok(());
        };
        match c.evaluate(min_done) {
            Verdict::Continue => Ok(()),
            Verdict::Fits(why) => {
                for r in &mut self.reports {
                    r.ready.get_or_insert_with(|| why.clone());
                }
                self.ready_reason = Some(why);
                Ok(())
            }
            Verdict::GiveUp(why) => {
                self.ready_reason = Some(format!("gave up: {why}"));
                Err(Cause::NoConvergence(why))
            }
        }
    }

    fn send_hashes(&mut self, dev: u32) -> Result<(), Cause> {
        let shared = self.shared()?;
        let d = &shared.devs[dev as usize];
        let blocks = d.info.blocks();
        let mut buf = vec![0u8; d.info.block_size as usize];
        let mut start = 0;
        while start < blocks {
            self.poll(None)?;
            let end = (start + MAX_HASHES as u64).min(blocks);
            let mut hashes = Vec::with_capacity((end - start) as usize);
            for idx in start..end {
                let len = block_len(d.info.size, d.info.block_size, idx);
                d.device
                    .read_at(&mut buf[..len], idx * u64::from(d.info.block_size))?;
                hashes.push(*blake3::hash(&buf[..len]).as_bytes());
            }
            shared.queue.wait_for_space()?;
            self.push_bulk(&Message::VerifyHashes {
                device: dev,
                start,
                hashes,
            })?;
            start = end;
        }
        Ok(())
    }

    fn finish_report(&mut self) -> MigrationReport {
        let now = Instant::now();
        let mut phases = std::mem::take(&mut self.timings);
        phases.push(PhaseTiming {
            phase: self.phase,
            millis: (now - self.phase_start).as_secs_f64() * 1e3,
        });
        let mut r = MigrationReport {
            role: "source".into(),
            mode: match self.src.config.mode {
                Mode::PreCopy => "pre-copy".into(),
                Mode::PostCopy => "post-copy".into(),
            },
            phases,
            total_millis: (now - self.start).as_secs_f64() * 1e3,
            downtime_millis: self.downtime.as_secs_f64() * 1e3,
            max_downtime_millis: self.src.config.max_downtime.as_secs_f64() * 1e3,
            ready_reason: self.ready_reason.clone().unwrap_or_default(),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            ..Default::default()
        };
        if let Some(c) = &self.conv {
            r.bandwidth_bytes_per_sec = c.bandwidth();
            r.dirty_rate_bytes_per_sec = c.dirty_rate();
            r.predicted_downtime_millis = c.predicted.map(|d| d.as_secs_f64() * 1e3);
            r.throttle_percent = c.throttle;
        }
        if let Some(s) = &self.shared {
            r.bytes_sent = s.queue.counters.total();
            r.zero_wire_bytes = s.queue.counters.of(T_ZERO_BLOCKS);
            r.data_blocks = s.data_blocks.load(Ordering::Relaxed);
            r.zero_blocks = s.zero_blocks.load(Ordering::Relaxed);
            r.already_have_blocks = s.already.load(Ordering::Relaxed);
            r.need_block_requests = s.served.load(Ordering::Relaxed);
            r.compression_saved_bytes = s.saved.load(Ordering::Relaxed);
        }
        r.devices = self
            .src
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let st = self.reports.get(i);
                let v = self.verify.get(i).cloned().flatten();
                DeviceReport {
                    name: d.name.clone(),
                    size: d.device.size(),
                    block_size: d.device.block_size(),
                    cycles: st.map_or(0, |s| s.cycles),
                    dirty_per_cycle: st.map_or_else(Vec::new, |s| s.history.clone()),
                    final_dirty: st.map_or(0, |s| s.final_dirty),
                    ready_reason: st.and_then(|s| s.ready.clone()).unwrap_or_default(),
                    mismatched_blocks: v.as_ref().map(|v| v.0),
                    mismatch_sample: v.map(|v| v.1).unwrap_or_default(),
                }
            })
            .collect();
        r
    }
}
