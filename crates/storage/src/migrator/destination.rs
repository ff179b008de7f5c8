//! The receiving side of a migration.

use std::io::{BufReader, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Authority, Cause, MigrationConfig, MigrationError, Observer, Progress};
use crate::auth::{handshake_link, Role};
use crate::device::{block_len, BlockDevice};
use crate::lazy::LazyDevice;
use crate::protocol::{
    block_bytes, read_frame, read_frame_or_block, DeviceInfo, DeviceTable, Event, Incoming,
    Message, ProtocolError, MAX_DEVICES, MAX_HASHES, MAX_SAMPLE,
};
use crate::report::{DeviceReport, MigrationReport, Phase, PhaseTiming};
use crate::transport::{FrameQueue, FrameWriter, Link, LinkTimeout};

/// What the backing store of a new destination device holds before any
/// block arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initial {
    /// Reads as zeros (a fresh sparse file or memory): zero blocks cost no write.
    Zeroed,
    /// Unknown contents: every block is written.
    Unknown,
    /// A base image that may share blocks with the source: its block hashes
    /// are sent so equal blocks are not transferred.
    Base,
}

/// Backing store for one incoming device, made by the caller's factory.
pub struct DestinationDevice {
    /// Where blocks are stored; must have the announced size and block size.
    pub backing: Arc<dyn BlockDevice>,
    /// What it holds now.
    pub initial: Initial,
}

/// Accepts migrations.
pub struct MigrationDestination;

/// The receiver's state machine: where a destination is in the handover
/// (see the module documentation of [`crate::migrator`] for the diagram).
/// States only move forward; a failure in any state ends the session, with
/// authority here exactly when the state had reached [`Self::Committed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HandoverState {
    /// Receiving the pre-copy stream; the source holds authority and its VM
    /// may run. Dirty lists are accepted only here.
    Receiving,
    /// HandoverOffered arrived: the source's VM is paused and the final
    /// dirty lists are in. Blocks can be read (missing ones are fetched);
    /// writes are refused. The caller prepares the VM (restored, paused).
    Offered,
    /// ReadyToRun was sent; Commit is awaited for at most the link timeout.
    /// If it does not come, the session fails and the VM must not run here.
    Ready,
    /// Commit arrived: authority is here, devices accept writes. The caller
    /// resumes the VM, then reports [`DestinationSession::running`] (or
    /// [`DestinationSession::decline`]s if it could not resume it).
    Committed,
    /// Running was sent: the source treats its VM as gone. The tail may
    /// still be arriving.
    Running,
    /// Every block is present and Completed was sent.
    Complete,
}

struct DestState {
    phase: Phase,
    handover: HandoverState,
    /// AllSent arrived, with every block present.
    all_sent: bool,
    done: bool,
    error: Option<String>,
    /// Set with `error` when the link timed out.
    timeout: Option<LinkTimeout>,
    /// Set with `error` when Commit did not follow ReadyToRun in time.
    commit_timeout: Option<Duration>,
    /// Set with `error` when the caller declined the handover.
    declined: Option<String>,
    report: MigrationReport,
}

impl DestState {
    /// Why the migration failed, if it did.
    fn failure(&self) -> Option<Cause> {
        if let Some(waited) = self.commit_timeout {
            return Some(Cause::HandoverTimeout {
                awaited: "Commit after ReadyToRun",
                waited,
            });
        }
        if let Some(why) = &self.declined {
            return Some(Cause::Caller(format!("declined the handover: {why}")));
        }
        match (&self.error, self.timeout) {
            (_, Some(t)) => Some(Cause::LinkTimeout(t)),
            (Some(e), None) => Some(Cause::Connection(e.clone())),
            (None, None) => None,
        }
    }

    /// Who holds authority, as this side knows it.
    fn authority(&self) -> Authority {
        if self.handover >= HandoverState::Committed && self.declined.is_none() {
            Authority::Destination
        } else {
            Authority::Source
        }
    }

    fn failed(&self, cause: Cause) -> MigrationError {
        MigrationError {
            phase: self.phase,
            authority: self.authority(),
            cause,
        }
    }

    /// Records the first failure only.
    fn set_error(&mut self, msg: String) {
        if self.error.is_none() {
            self.error = Some(msg);
        }
    }
}

struct DestShared {
    state: Mutex<DestState>,
    cv: Condvar,
}

impl DestShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, DestState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A migration being received. Its devices exist from the start; reads of
/// blocks not yet present fetch them with priority.
pub struct DestinationSession {
    devices: Vec<(DeviceInfo, Arc<LazyDevice>)>,
    shared: Arc<DestShared>,
    reader: Option<JoinHandle<()>>,
    control: Box<dyn Link>,
    queue: Arc<FrameQueue>,
    link_timeout: Option<Duration>,
    observer: Option<Observer>,
}

fn failed(phase: Phase, authority: bool, cause: Cause) -> MigrationError {
    MigrationError {
        phase,
        authority: if authority {
            Authority::Destination
        } else {
            Authority::Source
        },
        cause,
    }
}

impl MigrationDestination {
    /// Runs the handshake and receives the device list on `link`, creating
    /// each device with `factory`, then receives the rest in a background
    /// thread. Returns once the devices exist.
    pub fn accept<L: Link>(
        link: L,
        config: &MigrationConfig,
        factory: impl FnMut(&DeviceInfo) -> Result<DestinationDevice, String>,
    ) -> Result<DestinationSession, MigrationError> {
        Self::accept_observed(link, config, None, factory)
    }

    /// [`Self::accept`], telling `observer` of each phase as it starts:
    /// [`Phase::Handshake`], [`Phase::DeviceInfo`], [`Phase::FullPass`]
    /// (devices made, the stream is arriving), [`Phase::DirtyCycles`] (the
    /// first dirty list), [`Phase::Tail`] (the handover was offered),
    /// [`Phase::AuthorityTransferred`] (Commit arrived: authority is here),
    /// [`Phase::AuthorityAccepted`] (Running sent) and [`Phase::Complete`].
    /// It is called from the thread that sees the step (the caller's or
    /// the receiving thread).
    pub fn accept_observed<L: Link>(
        link: L,
        config: &MigrationConfig,
        observer: Option<Observer>,
        mut factory: impl FnMut(&DeviceInfo) -> Result<DestinationDevice, String>,
    ) -> Result<DestinationSession, MigrationError> {
        let notify = |p: Phase| {
            if let Some(o) = &observer {
                o(&Progress::Phase(p));
            }
        };
        notify(Phase::Handshake);
        let start = Instant::now();
        let mut link: Box<dyn Link> = Box::new(link);
        let err = |phase, c: Cause| failed(phase, false, c);
        let io = |phase, e: std::io::Error| failed(phase, false, ProtocolError::Io(e).into());
        let control = link.try_clone_link().map_err(|e| io(Phase::Handshake, e))?;
        link.set_link_read_timeout(Some(config.handshake_timeout))
            .map_err(|e| io(Phase::Handshake, e))?;
        link.set_link_write_timeout(Some(config.handshake_timeout))
            .map_err(|e| io(Phase::Handshake, e))?;
        handshake_link(&mut link, Role::Destination, &config.secret)
            .map_err(|e| err(Phase::Handshake, e.into()))?;
        let handshake_ms = start.elapsed().as_secs_f64() * 1e3;
        notify(Phase::DeviceInfo);

        let mut table = DeviceTable::default();
        let list = (|| -> Result<(), ProtocolError> {
            loop {
                match read_frame(&mut link)? {
                    Message::DeviceInfo(info) if (table.devices().len() as u32) < MAX_DEVICES => {
                        table.push(info)?
                    }
                    Message::DevicesListed { count } if count as usize == table.devices().len() => {
                        return Ok(())
                    }
                    Message::Error { message } => return Err(ProtocolError::Peer(message)),
                    Message::Keepalive => {}
                    m => {
                        return Err(ProtocolError::Unexpected {
                            got: m.kind(),
                            state: "while receiving the device list",
                        })
                    }
                }
            }
        })();
        if let Err(e) = list {
            // Bounded by the handshake's write timeout, still set.
            let e = Cause::from(e);
            let _ = link.write_all(
                &Message::Error {
                    message: e.to_string(),
                }
                .to_frame(),
            );
            link.shutdown_link();
            return Err(err(Phase::DeviceInfo, e));
        }
        // From here on every read and write is bounded by the link timeout
        // (socket options, shared by the reader and writer handles).
        let link_timeout = config.link_timeout_bound();
        link.set_link_read_timeout(link_timeout)
            .map_err(|e| io(Phase::DeviceInfo, e))?;
        link.set_link_write_timeout(link_timeout)
            .map_err(|e| io(Phase::DeviceInfo, e))?;
        if let Some(t) = link_timeout {
            link.detect_dead_peer(t)
                .map_err(|e| io(Phase::DeviceInfo, e))?;
        }
        if let Some(b) = config.socket_buffer_bytes {
            link.limit_buffers(b)
                .map_err(|e| io(Phase::DeviceInfo, e))?;
        }
        // The writer (and its keepalives) starts before the factory runs, so
        // a slow factory does not look like a dead destination to the source.
        let mut writer = FrameWriter::start(
            link.try_clone_link()
                .map_err(|e| io(Phase::DeviceInfo, e))?,
            config.bulk_queue_bytes,
            link_timeout,
        )
        .map_err(|e| io(Phase::DeviceInfo, e))?;
        let refuse = |writer: &mut FrameWriter, e: Cause| {
            let _ = writer.queue().write_direct(
                Message::Error {
                    message: e.to_string(),
                }
                .to_frame(),
            );
            writer.abort();
            err(Phase::DeviceInfo, e)
        };

        let mut made = Vec::new();
        for info in table.devices() {
            let d = match factory(info) {
                Ok(d) => d,
                Err(e) => {
                    return Err(refuse(
                        &mut writer,
                        Cause::Caller(format!("device {:?}: {e}", info.name)),
                    ))
                }
            };
            if d.backing.size() != info.size || d.backing.block_size() != info.block_size {
                let e = Cause::Caller(format!(
                    "device {:?}: backing has {} bytes in {}-byte blocks, source announced {} in {}-byte blocks",
                    info.name,
                    d.backing.size(),
                    d.backing.block_size(),
                    info.size,
                    info.block_size
                ));
                return Err(refuse(&mut writer, e));
            }
            made.push(d);
        }

        let queue = writer.queue().clone();
        let mut devices = Vec::new();
        let mut bases = Vec::new();
        for (info, d) in table.devices().iter().zip(made) {
            let lazy = Arc::new(LazyDevice::new(
                d.backing.clone(),
                d.initial == Initial::Zeroed,
            ));
            let (q, id) = (queue.clone(), info.id);
            lazy.set_fetcher(Box::new(move |index| {
                q.write_direct(Message::NeedBlock { device: id, index }.to_frame())
                    .map_err(|e| e.to_string())
            }));
            let is_base = d.initial == Initial::Base;
            if is_base {
                send_base_hashes(&queue, info, &*d.backing)
                    .map_err(|e| err(Phase::DeviceInfo, e))?;
            }
            queue
                .push_bulk(
                    Message::DeviceAck {
                        device: info.id,
                        has_base: is_base,
                    }
                    .to_frame(),
                )
                .map_err(|e| err(Phase::DeviceInfo, e.into()))?;
            bases.push(is_base);
            devices.push((info.clone(), lazy));
        }

        let shared = Arc::new(DestShared {
            state: Mutex::new(DestState {
                phase: Phase::FullPass,
                handover: HandoverState::Receiving,
                all_sent: false,
                done: false,
                error: None,
                timeout: None,
                commit_timeout: None,
                declined: None,
                report: MigrationReport {
                    role: "destination".into(),
                    phases: vec![PhaseTiming {
                        phase: Phase::Handshake,
                        millis: handshake_ms,
                    }],
                    ..Default::default()
                },
            }),
            cv: Condvar::new(),
        });
        notify(Phase::FullPass);
        let mut rx = Receiver {
            observer: observer.clone(),
            dirty_seen: false,
            devices: devices.clone(),
            bases,
            table,
            queue: queue.clone(),
            shared: shared.clone(),
            received: Arc::new(AtomicU64::new(0)),
            verify: vec![None; devices.len()],
            start,
            scratch: Vec::new(),
            link_timeout,
        };
        let reader = std::thread::Builder::new()
            .name("drafter-migration-destination".into())
            .spawn(move || rx.run(link, writer))
            .map_err(|e| io(Phase::DeviceInfo, e))?;
        Ok(DestinationSession {
            devices,
            shared,
            reader: Some(reader),
            control,
            queue,
            link_timeout,
            observer,
        })
    }
}

fn send_base_hashes(
    queue: &FrameQueue,
    info: &DeviceInfo,
    dev: &dyn BlockDevice,
) -> Result<(), Cause> {
    let blocks = info.blocks();
    let mut buf = vec![0u8; info.block_size as usize];
    let mut start = 0;
    while start < blocks {
        let end = (start + MAX_HASHES as u64).min(blocks);
        let mut hashes = Vec::with_capacity((end - start) as usize);
        for idx in start..end {
            let len = block_len(info.size, info.block_size, idx);
            dev.read_at(&mut buf[..len], idx * u64::from(info.block_size))?;
            hashes.push(*blake3::hash(&buf[..len]).as_bytes());
        }
        queue.wait_for_space()?;
        queue.push_bulk(
            Message::BaseHashes {
                device: info.id,
                start,
                hashes,
            }
            .to_frame(),
        )?;
        start = end;
    }
    Ok(())
}

impl DestinationSession {
    /// The incoming devices, usable at once (reads fetch on demand; writes
    /// are refused until authority arrives).
    pub fn devices(&self) -> &[(DeviceInfo, Arc<LazyDevice>)] {
        &self.devices
    }

    /// The device called `name`.
    pub fn device(&self, name: &str) -> Option<Arc<LazyDevice>> {
        self.devices
            .iter()
            .find(|(i, _)| i.name == name)
            .map(|(_, d)| d.clone())
    }

    /// Where the handover is.
    pub fn state(&self) -> HandoverState {
        self.shared.lock().handover
    }

    /// True once Commit arrived: authority is here.
    pub fn has_authority(&self) -> bool {
        self.shared.lock().authority() == Authority::Destination
    }

    /// Waits until `done` says so, or the session failed.
    fn wait_for(&self, done: impl Fn(&DestState) -> bool) -> Result<(), MigrationError> {
        let mut g = self.shared.lock();
        loop {
            if done(&g) {
                return Ok(());
            }
            if let Some(cause) = g.failure() {
                return Err(g.failed(cause));
            }
            g = self.shared.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits until the source offers the handover: its VM is paused and the
    /// final dirty lists are in. Reads (fetching missing blocks) give the
    /// source's final data from then on.
    pub fn wait_offer(&self) -> Result<(), MigrationError> {
        self.wait_for(|g| g.handover >= HandoverState::Offered)
    }

    /// Waits until the source sent every block (AllSent) and every block is
    /// present, before or after the handover.
    pub fn wait_received(&self) -> Result<(), MigrationError> {
        self.wait_for(|g| g.all_sent)
    }

    /// Asks for authority (ReadyToRun) once the handover was offered, and
    /// waits at most the link timeout for Commit. On `Ok` authority is here:
    /// the caller resumes the VM, then calls [`Self::running`] (or
    /// [`Self::decline`] if it could not resume it). On an error the VM must
    /// not run here: the source keeps it.
    pub fn ready_to_run(&self) -> Result<(), MigrationError> {
        let mut g = self.shared.lock();
        if g.handover >= HandoverState::Committed {
            return Ok(());
        }
        if let Some(cause) = g.failure() {
            return Err(g.failed(cause));
        }
        match g.handover {
            HandoverState::Offered => {
                if let Err(e) = self
                    .queue
                    .push_priority(Message::Event(Event::ReadyToRun).to_frame())
                {
                    return Err(g.failed(e.into()));
                }
                g.handover = HandoverState::Ready;
            }
            HandoverState::Ready => {}
            _ => {
                return Err(g.failed(
                    ProtocolError::Unexpected {
                        got: "ReadyToRun",
                        state: "before the source offered the handover",
                    }
                    .into(),
                ))
            }
        }
        let deadline = self.link_timeout.map(|t| (Instant::now() + t, t));
        loop {
            if g.handover >= HandoverState::Committed {
                return Ok(());
            }
            if let Some(cause) = g.failure() {
                return Err(g.failed(cause));
            }
            g = match deadline {
                None => self.shared.cv.wait(g).unwrap_or_else(|p| p.into_inner()),
                Some((at, waited)) => {
                    let now = Instant::now();
                    if now >= at {
                        // Decided under the lock: a Commit that arrives
                        // later is never acted on.
                        g.commit_timeout = Some(waited);
                        g.set_error(format!("no Commit within {waited:?} of ReadyToRun"));
                        let err = g.failed(Cause::HandoverTimeout {
                            awaited: "Commit after ReadyToRun",
                            waited,
                        });
                        drop(g);
                        self.refuse(&err.to_string());
                        self.shared.cv.notify_all();
                        return Err(err);
                    }
                    match self.shared.cv.wait_timeout(g, at - now) {
                        Ok((g, _)) => g,
                        Err(p) => p.into_inner().0,
                    }
                }
            };
        }
    }

    /// Reports that the VM runs here (after Commit). The source then treats
    /// its VM as gone. If the link is already down, the VM still runs here
    /// (authority is here since Commit); the error says the source may not
    /// know.
    pub fn running(&self) -> Result<(), MigrationError> {
        let g = self.shared.lock();
        match g.handover {
            HandoverState::Committed => {}
            HandoverState::Running | HandoverState::Complete => return Ok(()),
            _ => {
                return Err(g.failed(Cause::Caller(
                    "running reported without Commit: the VM must not run here".into(),
                )))
            }
        }
        drop(g);
        // Written from this thread, so the acknowledgement is in the kernel
        // when this returns (bounded by the link's write timeout). The
        // receiver does not send Completed before the state is Running.
        let sent = self
            .queue
            .write_direct(Message::Event(Event::Running).to_frame());
        // Told before Completed can go out (and the session end).
        if let (Ok(()), Some(o)) = (&sent, &self.observer) {
            o(&Progress::Phase(Phase::AuthorityAccepted));
        }
        let mut g = self.shared.lock();
        g.handover = HandoverState::Running;
        let sent = sent.and_then(|()| {
            if g.all_sent {
                g.handover = HandoverState::Complete;
                g.phase = Phase::Complete;
                self.queue
                    .push_bulk(Message::Event(Event::Completed).to_frame())
            } else {
                Ok(())
            }
        });
        let r = sent.map_err(|e| g.failed(e.into()));
        drop(g);
        self.shared.cv.notify_all();
        r
    }

    /// Declines the handover: the VM does not run here and never did (the
    /// caller could not restore or resume it). The source, told so, resumes
    /// its VM. Refused after [`Self::running`].
    pub fn decline(&self, reason: &str) {
        let mut g = self.shared.lock();
        if g.handover >= HandoverState::Running {
            tracing::error!(reason, "decline after Running ignored: the VM runs here");
            return;
        }
        g.declined = Some(reason.to_string());
        g.set_error(format!("declined: {reason}"));
        drop(g);
        self.refuse(reason);
        self.shared.cv.notify_all();
    }

    /// Tells the source (bounded by the link's write timeout) that the VM
    /// will not run here, then shuts the link down.
    fn refuse(&self, reason: &str) {
        let msg: String = reason.chars().take(crate::protocol::MAX_ERROR).collect();
        let _ = self
            .queue
            .write_direct(Message::Error { message: msg }.to_frame());
        for (_, d) in &self.devices {
            d.fail(reason);
        }
        self.control.shutdown_link();
    }

    /// Takes authority as soon as it is offered: [`Self::wait_offer`],
    /// [`Self::ready_to_run`], then [`Self::running`] (for callers with no
    /// VM to resume, or whose VM needs nothing but the devices).
    pub fn wait_authority(&self) -> Result<(), MigrationError> {
        if self.state() < HandoverState::Committed {
            self.wait_offer()?;
            self.ready_to_run()?;
        }
        self.running()
    }

    /// Waits until every block is present and the source confirmed the end.
    /// If authority was not taken yet, it is taken once everything arrived
    /// ([`Self::wait_received`], [`Self::ready_to_run`], [`Self::running`]).
    pub fn wait_complete(mut self) -> Result<MigrationReport, MigrationError> {
        let handover = (|| {
            if self.state() < HandoverState::Committed {
                self.wait_received()?;
                self.ready_to_run()?;
            }
            self.running()
        })();
        let r = handover.and_then(|()| {
            let mut g = self.shared.lock();
            loop {
                if g.done {
                    break Ok(g.report.clone());
                }
                if let Some(cause) = g.failure() {
                    break Err(g.failed(cause));
                }
                g = self.shared.cv.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        });
        if r.is_err() {
            self.control.shutdown_link();
        }
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
        r
    }

    /// Shuts the connection down (a destination giving up); devices keep
    /// what they have, absent blocks become unavailable.
    pub fn abort(&self) {
        self.control.shutdown_link();
    }
}

impl Drop for DestinationSession {
    fn drop(&mut self) {
        if let Some(h) = self.reader.take() {
            if !h.is_finished() {
                self.control.shutdown_link();
            }
            let _ = h.join();
        }
    }
}

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

struct Receiver {
    observer: Option<Observer>,
    /// A dirty list arrived (the source is in its dirty cycles).
    dirty_seen: bool,
    devices: Vec<(DeviceInfo, Arc<LazyDevice>)>,
    bases: Vec<bool>,
    table: DeviceTable,
    queue: Arc<FrameQueue>,
    shared: Arc<DestShared>,
    received: Arc<AtomicU64>,
    verify: Vec<Option<(u64, Vec<u64>)>>,
    start: Instant,
    scratch: Vec<u8>,
    /// The read timeout set on the link (None: unbounded).
    link_timeout: Option<Duration>,
}

impl Receiver {
    fn run(&mut self, link: Box<dyn Link>, mut writer: FrameWriter) {
        // Small buffer: block payloads (larger than it) are read straight
        // into their frame buffer instead of being copied through it.
        let mut r = BufReader::with_capacity(
            8 * 1024,
            Counting {
                inner: link,
                n: self.received.clone(),
            },
        );
        let result = self
            .receive(&mut r)
            .map_err(|e| e.of_receive(self.link_timeout, self.queue.failure()));
        let result = result.and_then(|()| Ok(writer.finish()?));
        let mut g = self.shared.lock();
        g.report.bytes_received = self.received.load(Ordering::Relaxed);
        g.report.bytes_sent = self.queue.counters.total();
        g.report.need_block_requests = self.devices.iter().map(|(_, d)| d.fetches()).sum();
        g.report.total_millis = self.start.elapsed().as_secs_f64() * 1e3;
        g.report.devices = self
            .devices
            .iter()
            .zip(&self.verify)
            .map(|((i, _), v)| DeviceReport {
                name: i.name.clone(),
                size: i.size,
                block_size: i.block_size,
                mismatched_blocks: v.as_ref().map(|v| v.0),
                mismatch_sample: v.as_ref().map(|v| v.1.clone()).unwrap_or_default(),
                ..Default::default()
            })
            .collect();
        let done = match result {
            Ok(()) => {
                g.done = true;
                g.phase = Phase::Complete;
                true
            }
            // Completed went out (by `running`) and the source closed.
            Err(_) if g.handover == HandoverState::Complete => {
                g.done = true;
                g.phase = Phase::Complete;
                true
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::warn!(phase = %g.phase, error = %msg, "incoming migration failed");
                // An Error frame tells the source that the VM does not run
                // here: never sent once Commit arrived (the caller may be
                // resuming the VM right now).
                if !e.link_is_gone() && g.handover < HandoverState::Committed {
                    let _ = writer.queue().push_priority(
                        Message::Error {
                            message: msg.clone(),
                        }
                        .to_frame(),
                    );
                    let _ = writer.queue().drain();
                }
                writer.abort();
                for (_, d) in &self.devices {
                    d.fail(&msg);
                }
                if let Cause::LinkTimeout(t) = e {
                    if g.error.is_none() {
                        g.timeout = Some(t);
                    }
                }
                g.set_error(msg);
                false
            }
        };
        drop(g);
        self.shared.cv.notify_all();
        if done {
            self.notify(Phase::Complete);
        }
    }

    fn notify(&self, p: Phase) {
        if let Some(o) = &self.observer {
            o(&Progress::Phase(p));
        }
    }

    fn set_phase(&self, p: Phase) {
        let mut g = self.shared.lock();
        let millis = self.start.elapsed().as_secs_f64() * 1e3;
        g.report.phases.push(PhaseTiming { phase: p, millis });
        g.phase = p;
    }

    fn lazy(&self, id: u32) -> Result<&LazyDevice, Cause> {
        self.table.device(id)?;
        Ok(&self.devices[id as usize].1)
    }

    fn state(&self) -> HandoverState {
        self.shared.lock().handover
    }

    fn receive(&mut self, r: &mut impl Read) -> Result<(), Cause> {
        let mut spare = Vec::new();
        loop {
            let msg = match read_frame_or_block(r, std::mem::take(&mut spare))? {
                Incoming::Message(m) => m,
                Incoming::Block { device, index, len } => {
                    let expected = self.table.block_len(device, index)?;
                    if len != expected {
                        return Err(ProtocolError::BadBlock {
                            device,
                            index,
                            what: format!("{len} bytes, expected {expected}"),
                        }
                        .into());
                    }
                    let mut read_err = None;
                    let res = self.lazy(device)?.fill_from(index, &mut |buf| {
                        r.read_exact(buf).inspect_err(|e| read_err = Some(e.kind()))
                    });
                    match (res, read_err) {
                        (Ok(_), _) => {}
                        (Err(_), Some(std::io::ErrorKind::UnexpectedEof)) => {
                            return Err(ProtocolError::Truncated.into())
                        }
                        (
                            Err(_),
                            Some(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
                        ) => return Err(ProtocolError::TimedOut.into()),
                        (Err(e), Some(_)) => return Err(Cause::Connection(e.to_string())),
                        (Err(e), None) => return Err(e.into()),
                    }
                    self.shared.lock().report.data_blocks += 1;
                    continue;
                }
            };
            match msg {
                Message::BlockData {
                    device,
                    index,
                    compressed,
                    data,
                } => {
                    let len = self.table.block_len(device, index)?;
                    block_bytes(device, index, compressed, &data, len, &mut self.scratch)?;
                    let bytes: &[u8] = if compressed { &self.scratch } else { &data };
                    self.lazy(device)?.fill(index, bytes)?;
                    self.shared.lock().report.data_blocks += 1;
                    spare = data.into_buffer();
                }
                Message::ZeroBlocks {
                    device,
                    start,
                    count,
                } => {
                    self.table.check_run(device, start, count)?;
                    let lazy = self.lazy(device)?;
                    for i in start..start + count {
                        lazy.fill_zero(i)?;
                    }
                    self.shared.lock().report.zero_blocks += count;
                }
                Message::AlreadyHave {
                    device,
                    start,
                    count,
                } => {
                    self.table.check_run(device, start, count)?;
                    if !self.bases[device as usize] {
                        return Err(ProtocolError::Unexpected {
                            got: "AlreadyHave",
                            state: "for a device without a base",
                        }
                        .into());
                    }
                    let lazy = self.lazy(device)?;
                    for i in start..start + count {
                        lazy.mark_present(i);
                    }
                    self.shared.lock().report.already_have_blocks += count;
                }
                Message::Dirty { device, blocks } if self.state() == HandoverState::Receiving => {
                    let lazy = self.lazy(device)?;
                    for &b in &blocks {
                        self.table.check_block(device, b)?;
                    }
                    for b in blocks {
                        lazy.invalidate(b);
                    }
                    if !self.dirty_seen {
                        self.dirty_seen = true;
                        self.notify(Phase::DirtyCycles);
                    }
                }
                Message::Event(Event::HandoverOffered)
                    if self.state() == HandoverState::Receiving =>
                {
                    self.set_phase(Phase::Tail);
                    self.shared.lock().handover = HandoverState::Offered;
                    self.shared.cv.notify_all();
                    self.notify(Phase::Tail);
                }
                Message::Event(Event::Commit) => {
                    let mut g = self.shared.lock();
                    if g.error.is_some() {
                        // The caller gave up waiting (or declined) first:
                        // this Commit is never acted on.
                        return Err(Cause::Connection(
                            "Commit arrived after the handover was abandoned".into(),
                        ));
                    }
                    if g.handover != HandoverState::Ready {
                        return Err(ProtocolError::Unexpected {
                            got: "Commit",
                            state: "without ReadyToRun",
                        }
                        .into());
                    }
                    for (_, d) in &self.devices {
                        d.set_authoritative();
                    }
                    g.handover = HandoverState::Committed;
                    let millis = self.start.elapsed().as_secs_f64() * 1e3;
                    g.report.phases.push(PhaseTiming {
                        phase: Phase::AuthorityTransferred,
                        millis,
                    });
                    g.phase = Phase::AuthorityTransferred;
                    // Told before the caller, waiting for this state, can
                    // resume the VM: an observer sees authority here and
                    // the VM not yet running.
                    self.notify(Phase::AuthorityTransferred);
                    drop(g);
                    self.shared.cv.notify_all();
                }
                Message::VerifyHashes {
                    device,
                    start,
                    hashes,
                } if self.state() >= HandoverState::Offered => {
                    self.table.check_run(device, start, hashes.len() as u64)?;
                    self.check_hashes(device, start, &hashes)?;
                }
                Message::Event(Event::AllSent) if self.state() >= HandoverState::Offered => {
                    for (info, d) in &self.devices {
                        if d.missing_blocks() != 0 {
                            return Err(ProtocolError::OutOfRange(format!(
                                "source finished with {} blocks of {:?} never sent",
                                d.missing_blocks(),
                                info.name
                            ))
                            .into());
                        }
                    }
                    for (id, v) in self.verify.iter().enumerate() {
                        if let Some((mismatched, sample)) = v {
                            self.queue.push_bulk(
                                Message::VerifyResult {
                                    device: id as u32,
                                    mismatched: *mismatched,
                                    sample: sample.clone(),
                                }
                                .to_frame(),
                            )?;
                        }
                    }
                    let mut g = self.shared.lock();
                    g.all_sent = true;
                    if g.handover == HandoverState::Running {
                        self.queue
                            .push_bulk(Message::Event(Event::Completed).to_frame())?;
                        g.handover = HandoverState::Complete;
                        drop(g);
                        self.set_phase(Phase::Complete);
                        return Ok(());
                    }
                    drop(g);
                    // Running (and Completed) come from the caller.
                    self.shared.cv.notify_all();
                }
                Message::Error { message } => return Err(ProtocolError::Peer(message).into()),
                // The source is alive; nothing else to do.
                Message::Keepalive => {}
                m => {
                    return Err(ProtocolError::Unexpected {
                        got: m.kind(),
                        state: match self.state() {
                            HandoverState::Receiving => "before the handover offer",
                            HandoverState::Offered | HandoverState::Ready => {
                                "after the handover offer"
                            }
                            _ => "after Commit",
                        },
                    }
                    .into())
                }
            }
        }
    }

    fn check_hashes(&mut self, device: u32, start: u64, hashes: &[[u8; 32]]) -> Result<(), Cause> {
        let (info, lazy) = &self.devices[device as usize];
        let mut buf = vec![0u8; info.block_size as usize];
        let entry = self.verify[device as usize].get_or_insert_with(|| (0, Vec::new()));
        for (i, h) in hashes.iter().enumerate() {
            let idx = start + i as u64;
            if lazy.is_locally_written(idx) {
                continue;
            }
            let len = block_len(info.size, info.block_size, idx);
            let same = lazy.is_present(idx) && {
                lazy.backing()
                    .read_at(&mut buf[..len], idx * u64::from(info.block_size))?;
                blake3::hash(&buf[..len]).as_bytes() == h
            };
            if !same && !lazy.is_locally_written(idx) {
                entry.0 += 1;
                if entry.1.len() < MAX_SAMPLE {
                    entry.1.push(idx);
                }
            }
        }
        Ok(())
    }
}
