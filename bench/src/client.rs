//! The SSE clients of one process: raw HTTP/1.1 connections on a single-threaded runtime.
//!
//! Most connections only count `\ndata:` markers with memchr; the sampled ones (and, in resume
//! mode, all of them) parse every block and check order, duplicates and latency.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::cli::{Args, Mode, Target};
use crate::stats::{hist_from_pairs, hist_pairs, new_hist};
use crate::wire::{self, Block, Dechunker, EventCounter, SseParser};

thread_local! {
    /// One read buffer for every connection of this (single-threaded) process.
    static READ_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 256 * 1024]);
}

/// Highest sequence number a verifying connection tracks (bounds its bitset).
const MAX_TRACKED_SEQ: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    Connecting,
    Open,
    Failed,
    /// The server ended the stream or the connection broke.
    Closed,
    /// Closed on purpose (resume mode drop, or the end of the run).
    Dropped,
}

/// Per-connection record, kept across reconnects.
struct Slot {
    channel: usize,
    sampled: bool,
    events: Cell<u64>,
    bytes: Cell<u64>,
    bytes_at_mark: Cell<u64>,
    state: Cell<ConnState>,
    /// Present on verifying connections.
    detail: Option<RefCell<Detail>>,
    /// The socket of a counting connection that reads lazily (`SO_RCVLOWAT`), while it is open.
    lazy_fd: Cell<Option<RawFd>>,
}

/// What a verifying connection knows about its stream.
#[derive(Default)]
struct Detail {
    parser: SseParser,
    seen: Vec<u64>,
    max_seen: Option<u64>,
    /// Every sequence below this has been seen.
    contiguous: u64,
    duplicates: u64,
    out_of_order: u64,
    /// Events whose payload is not ours (e.g. a `gateway.reset`).
    foreign: u64,
    comments: u64,
    comments_at_mark: u64,
    /// Resume mode: since the drop, until the new response head / until caught up.
    reconnected_after: Option<Duration>,
    resumed_after: Option<Duration>,
}

impl Detail {
    fn record(&mut self, seq: u64) {
        if seq >= MAX_TRACKED_SEQ {
            self.foreign += 1;
            return;
        }
        let word = (seq / 64) as usize;
        let bit = 1u64 << (seq % 64);
        if self.seen.len() <= word {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & bit != 0 {
            self.duplicates += 1;
            return;
        }
        self.seen[word] |= bit;
        if self.max_seen.is_some_and(|max| max > seq) {
            self.out_of_order += 1;
        }
        self.max_seen = Some(self.max_seen.map_or(seq, |max| max.max(seq)));
        while self.has(self.contiguous) {
            self.contiguous += 1;
        }
    }

    fn has(&self, seq: u64) -> bool {
        let word = (seq / 64) as usize;
        self.seen
            .get(word)
            .is_some_and(|w| w & (1u64 << (seq % 64)) != 0)
    }

    /// Sequences in `0..expected` never seen.
    fn missing(&self, expected: u64) -> u64 {
        (0..expected).filter(|s| !self.has(*s)).count() as u64
    }

    /// Seen sequences at or beyond `expected` (not published in the window).
    fn unexpected(&self, expected: u64) -> u64 {
        let total: u64 = self.seen.iter().map(|w| u64::from(w.count_ones())).sum();
        total - (expected - self.missing(expected))
    }
}

/// Summary of the verifying connections of a process.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct Verified {
    pub connections: u64,
    pub events: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub lost: u64,
    pub unexpected: u64,
    pub foreign: u64,
    pub comments: u64,
}

impl Verified {
    pub(crate) fn add(&mut self, other: &Verified) {
        self.connections += other.connections;
        self.events += other.events;
        self.duplicates += other.duplicates;
        self.out_of_order += other.out_of_order;
        self.lost += other.lost;
        self.unexpected += other.unexpected;
        self.foreign += other.foreign;
        self.comments += other.comments;
    }
}

/// Resume-mode figures of a process.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct ResumeStats {
    pub clients: u64,
    pub reconnected: u64,
    pub resumed: u64,
    pub failed: u64,
    /// Messages published before the drop (each client had to end up with all of them).
    pub published_before_drop: u64,
    /// Microseconds from the drop to the new response head.
    pub reconnect_us: Vec<(u64, u64)>,
    /// Microseconds from the drop until the client had every event published before the drop.
    pub resume_us: Vec<(u64, u64)>,
    pub wall_s: f64,
    /// Generator side: when the old sockets were closed and the reconnects started.
    pub closed_ms: f64,
    pub spawned_ms: f64,
}

/// Heartbeat (idle-mode) figures of a process.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct Heartbeats {
    pub open_at_mark: u64,
    pub open_at_end: u64,
    /// Open connections that received bytes after the mark.
    pub with_data_after_mark: u64,
    /// Verifying connections that received a comment (`:`) block after the mark.
    pub sampled_with_comment: u64,
    pub sampled_open: u64,
}

/// Everything a client process reports.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct ChildResult {
    pub clients: u64,
    pub connected: u64,
    pub connect_errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    pub connect_us: Vec<(u64, u64)>,
    pub connect_phase_s: f64,
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub extra: u64,
    pub incomplete_connections: u64,
    pub closed_early: u64,
    pub sample: Verified,
    pub verified_all: Verified,
    pub latency_us: Vec<(u64, u64)>,
    pub heartbeats: Heartbeats,
    pub resume: Option<ResumeStats>,
    pub drain_s: f64,
    pub cpu_window_s: f64,
    pub cpu_total_s: f64,
}

/// The clients of this process.
pub(crate) struct Worker {
    args: Rc<Args>,
    /// Client i connects to `targets[i % len]`.
    targets: Vec<Target>,
    /// Where clients reconnect after the drop, if not where they were.
    resume_target: Option<Target>,
    first_client: usize,
    slots: Vec<Slot>,
    handles: RefCell<Vec<Option<AbortHandle>>>,
    latency: RefCell<Histogram<u64>>,
    connect_time: RefCell<Histogram<u64>>,
    errors: RefCell<BTreeMap<String, u64>>,
    /// Connections that reached Open or Failed in the current connect phase.
    settled: Cell<usize>,
    resumed: Cell<usize>,
    changed: Notify,
    /// Resume mode: set at the drop.
    drop: Cell<Option<(Instant, u64)>>,
    reconnect_time: RefCell<Histogram<u64>>,
    resume_time: RefCell<Histogram<u64>>,
    closed_early: Cell<u64>,
    /// Connections that failed or broke after the drop.
    failed_after_drop: Cell<usize>,
    open_at_mark: Cell<u64>,
}

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Worker {
    pub(crate) fn new(
        args: Rc<Args>,
        clients: std::ops::Range<usize>,
    ) -> Result<Rc<Worker>, String> {
        let targets = args.targets()?;
        let resume_target = args.resume_target()?;
        let full_parse = args.mode == Mode::Resume;
        let slots = clients
            .clone()
            .map(|client| {
                let sampled = args.is_sampled(client);
                Slot {
                    channel: args.channel_of(client),
                    sampled,
                    events: Cell::new(0),
                    bytes: Cell::new(0),
                    bytes_at_mark: Cell::new(0),
                    state: Cell::new(ConnState::Connecting),
                    detail: (sampled || full_parse).then(|| RefCell::new(Detail::default())),
                    lazy_fd: Cell::new(None),
                }
            })
            .collect::<Vec<_>>();
        let count = slots.len();
        Ok(Rc::new(Worker {
            args,
            targets,
            resume_target,
            first_client: clients.start,
            slots,
            handles: RefCell::new(vec![None; count]),
            latency: RefCell::new(new_hist()),
            connect_time: RefCell::new(new_hist()),
            errors: RefCell::default(),
            settled: Cell::new(0),
            resumed: Cell::new(0),
            changed: Notify::new(),
            drop: Cell::new(None),
            reconnect_time: RefCell::new(new_hist()),
            resume_time: RefCell::new(new_hist()),
            closed_early: Cell::new(0),
            failed_after_drop: Cell::new(0),
            open_at_mark: Cell::new(0),
        }))
    }

    /// Opens every connection at the configured rate; returns once all are open or failed.
    pub(crate) async fn connect_all(self: &Rc<Self>) -> f64 {
        let started = Instant::now();
        let per_process = (self.args.connect_rate / self.args.child_count as f64).max(1.0);
        for local in 0..self.slots.len() {
            let due = started + Duration::from_secs_f64(local as f64 / per_process);
            tokio::time::sleep_until(due).await;
            self.spawn_connection(local, None);
        }
        let limit = Duration::from_secs_f64(self.args.connect_timeout + 5.0);
        self.wait_until(limit, |w| w.settled.get() >= w.slots.len())
            .await;
        started.elapsed().as_secs_f64()
    }

    fn spawn_connection(self: &Rc<Self>, local: usize, resume_from: Option<String>) {
        let handle = tokio::task::spawn_local(connection(self.clone(), local, resume_from));
        self.handles.borrow_mut()[local] = Some(handle.abort_handle());
    }

    /// Waits (bounded) until `done` holds; re-checked whenever a connection changes state.
    async fn wait_until(&self, limit: Duration, done: impl Fn(&Worker) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if done(self) {
                return true;
            }
            let notified = self.changed.notified();
            if done(self) {
                return true;
            }
            let step = Instant::now() + Duration::from_millis(50);
            if Instant::now() >= deadline {
                return false;
            }
            let _ = tokio::time::timeout_at(step.min(deadline), notified).await;
        }
    }

    /// Start of the measurement window: remember what each connection had received.
    pub(crate) fn mark(&self) {
        let open = self
            .slots
            .iter()
            .filter(|s| s.state.get() == ConnState::Open)
            .count();
        self.open_at_mark.set(open as u64);
        for slot in &self.slots {
            slot.bytes_at_mark.set(slot.bytes.get());
            if let Some(detail) = &slot.detail {
                let mut detail = detail.borrow_mut();
                detail.comments_at_mark = detail.comments;
            }
        }
    }

    /// Where client `client` (global index) connects: after the drop, `--resume-target` if set.
    fn target_of(&self, client: usize) -> &Target {
        match (&self.resume_target, self.drop.get()) {
            (Some(target), Some(_)) => target,
            _ => &self.targets[client % self.targets.len()],
        }
    }

    /// Resume mode: drop every connection at once and reconnect each with its last event id.
    /// With `--kill-pid` the coordinator has just killed the server: connections it already
    /// ended are reconnected too.
    pub(crate) async fn drop_and_resume(
        self: &Rc<Self>,
        published_before_drop: u64,
    ) -> ResumeStats {
        let dropped_at = Instant::now();
        self.drop.set(Some((dropped_at, published_before_drop)));
        let server_killed = self.args.kill_pid.is_some();
        for (local, slot) in self.slots.iter().enumerate() {
            if let Some(handle) = self.handles.borrow_mut()[local].take() {
                handle.abort();
            }
            let state = slot.state.get();
            if state == ConnState::Open || (server_killed && state == ConnState::Closed) {
                slot.state.set(ConnState::Dropped);
            }
        }
        // Let the runtime drop the aborted tasks (and so close their sockets) first.
        tokio::task::yield_now().await;
        let closed_after = dropped_at.elapsed();
        self.settled.set(0);
        self.resumed.set(0);
        let mut reconnecting = 0;
        for (local, slot) in self.slots.iter().enumerate() {
            if slot.state.get() != ConnState::Dropped {
                // Never connected (or broke before the drop): nothing to resume.
                continue;
            }
            reconnecting += 1;
            let last_id = slot.detail.as_ref().and_then(|d| {
                let mut d = d.borrow_mut();
                d.parser.reset_stream();
                d.parser.last_event_id.clone()
            });
            slot.state.set(ConnState::Connecting);
            self.spawn_connection(local, last_id);
        }
        let spawned_after = dropped_at.elapsed();
        let limit = Duration::from_secs_f64(self.args.connect_timeout + 30.0);
        self.wait_until(limit, |w| {
            w.resumed.get() + w.failed_after_drop.get() >= reconnecting
        })
        .await;
        let failed = self.failed_after_drop.get() as u64;
        ResumeStats {
            clients: reconnecting as u64,
            reconnected: self.reconnect_time.borrow().len(),
            resumed: self.resumed.get() as u64,
            failed,
            published_before_drop,
            reconnect_us: hist_pairs(&self.reconnect_time.borrow()),
            resume_us: hist_pairs(&self.resume_time.borrow()),
            wall_s: dropped_at.elapsed().as_secs_f64(),
            closed_ms: closed_after.as_secs_f64() * 1000.0,
            spawned_ms: spawned_after.as_secs_f64() * 1000.0,
        }
    }

    fn expected_of(&self, slot: &Slot, published: u64) -> u64 {
        self.args.expected_on(slot.channel, published)
    }

    /// Waits (at most `--drain` seconds) until every open connection has what was published.
    pub(crate) async fn drain(&self, published: u64) -> f64 {
        let started = Instant::now();
        // Lazily read sockets hold up to `--count-lowat` bytes unread: make them readable now.
        for slot in &self.slots {
            if let Some(fd) = slot.lazy_fd.get() {
                let _ = set_int_option(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1);
            }
        }
        let limit = Duration::from_secs_f64(self.args.drain);
        self.wait_until(limit, |w| {
            w.slots.iter().all(|slot| {
                slot.state.get() != ConnState::Open
                    || slot.events.get() >= w.expected_of(slot, published)
            })
        })
        .await;
        started.elapsed().as_secs_f64()
    }

    /// Closes every connection (end of run).
    pub(crate) fn close_all(&self) {
        for handle in self.handles.borrow_mut().iter_mut() {
            if let Some(handle) = handle.take() {
                handle.abort();
            }
        }
    }

    /// The process's figures after publishing `published` messages.
    pub(crate) fn result(&self, published: u64, connect_phase_s: f64) -> ChildResult {
        let mut result = ChildResult {
            clients: self.slots.len() as u64,
            connect_errors: self.errors.borrow().values().sum(),
            error_kinds: self.errors.borrow().clone(),
            connect_us: hist_pairs(&self.connect_time.borrow()),
            connect_phase_s,
            closed_early: self.closed_early.get(),
            latency_us: hist_pairs(&self.latency.borrow()),
            ..ChildResult::default()
        };
        result.connected = self.connect_time.borrow().len();
        for slot in &self.slots {
            let expected = self.expected_of(slot, published);
            let received = slot.events.get();
            let open = slot.state.get() == ConnState::Open;
            result.expected += expected;
            result.received += received;
            if open {
                result.heartbeats.open_at_end += 1;
                if slot.bytes.get() > slot.bytes_at_mark.get() {
                    result.heartbeats.with_data_after_mark += 1;
                }
            }
            if let Some(detail) = &slot.detail {
                let detail = detail.borrow();
                let missing = detail.missing(expected);
                let verified = Verified {
                    connections: 1,
                    events: received,
                    duplicates: detail.duplicates,
                    out_of_order: detail.out_of_order,
                    lost: missing,
                    unexpected: detail.unexpected(expected),
                    foreign: detail.foreign,
                    comments: detail.comments,
                };
                result.lost += missing;
                result.extra += detail.duplicates + verified.unexpected;
                if missing > 0 {
                    result.incomplete_connections += 1;
                }
                if slot.sampled {
                    result.sample.add(&verified);
                    if open {
                        result.heartbeats.sampled_open += 1;
                        if detail.comments > detail.comments_at_mark {
                            result.heartbeats.sampled_with_comment += 1;
                        }
                    }
                }
                result.verified_all.add(&verified);
            } else {
                result.lost += expected.saturating_sub(received);
                result.extra += received.saturating_sub(expected);
                if received < expected {
                    result.incomplete_connections += 1;
                }
            }
        }
        result.heartbeats.open_at_mark = self.open_at_mark.get();
        result
    }

    fn error(&self, local: usize, kind: String) {
        let slot = &self.slots[local];
        *self.errors.borrow_mut().entry(kind).or_insert(0) += 1;
        slot.state.set(ConnState::Failed);
        self.settled.set(self.settled.get() + 1);
        if self.drop.get().is_some() {
            self.failed_after_drop.set(self.failed_after_drop.get() + 1);
        }
        self.changed.notify_waiters();
    }

    fn opened(&self, local: usize, took: Duration) {
        let slot = &self.slots[local];
        slot.state.set(ConnState::Open);
        self.settled.set(self.settled.get() + 1);
        match self.drop.get() {
            None => {
                let _ = self
                    .connect_time
                    .borrow_mut()
                    .record(took.as_micros().max(1) as u64);
            }
            Some((dropped_at, _)) => {
                let since = dropped_at.elapsed();
                let _ = self
                    .reconnect_time
                    .borrow_mut()
                    .record(since.as_micros().max(1) as u64);
                if let Some(detail) = &slot.detail {
                    detail.borrow_mut().reconnected_after = Some(since);
                }
                self.check_resumed(slot);
            }
        }
        self.changed.notify_waiters();
    }

    fn closed(&self, local: usize) {
        let slot = &self.slots[local];
        if slot.state.get() == ConnState::Open {
            slot.state.set(ConnState::Closed);
            self.closed_early.set(self.closed_early.get() + 1);
            let unresumed = slot
                .detail
                .as_ref()
                .is_some_and(|d| d.borrow().resumed_after.is_none());
            if self.drop.get().is_some() && unresumed {
                self.failed_after_drop.set(self.failed_after_drop.get() + 1);
            }
            self.changed.notify_waiters();
        }
    }

    /// Resume mode: a reconnected client is resumed once it has every event published before
    /// the drop.
    fn check_resumed(&self, slot: &Slot) {
        let Some((dropped_at, before)) = self.drop.get() else {
            return;
        };
        let Some(detail) = &slot.detail else {
            return;
        };
        let mut detail = detail.borrow_mut();
        if detail.resumed_after.is_some() || detail.reconnected_after.is_none() {
            return;
        }
        if detail.contiguous >= self.expected_of(slot, before) {
            let since = dropped_at.elapsed();
            detail.resumed_after = Some(since);
            let _ = self
                .resume_time
                .borrow_mut()
                .record(since.as_micros().max(1) as u64);
            self.resumed.set(self.resumed.get() + 1);
            self.changed.notify_waiters();
        }
    }

    /// Handles body bytes of connection `local`.
    fn consume(&self, local: usize, conn: &mut ConnParse, bytes: &[u8]) -> Result<(), String> {
        let slot = &self.slots[local];
        slot.bytes.set(slot.bytes.get() + bytes.len() as u64);
        let ConnParse { dechunk, counter } = conn;
        match &slot.detail {
            None => {
                let mut found = 0;
                dechunk.feed(bytes, |body| found += counter.count(body))?;
                slot.events.set(slot.events.get() + found);
            }
            Some(detail) => {
                let now_ns = unix_now_ns();
                let mut detail = detail.borrow_mut();
                let detail = &mut *detail;
                let mut latency = self.latency.borrow_mut();
                let mut events = 0;
                let parser = &mut detail.parser;
                let mut stamps: Vec<u64> = Vec::new();
                let mut foreign = 0;
                let mut comments = 0;
                dechunk.feed(bytes, |body| {
                    parser.feed(body, |block| match block {
                        Block::Event { data } => {
                            events += 1;
                            match wire::parse_stamp(data) {
                                Some(stamp) => {
                                    if slot.sampled {
                                        let us = now_ns.saturating_sub(stamp.sent_ns) / 1000;
                                        let _ = latency.record(us.max(1));
                                    }
                                    stamps.push(stamp.seq);
                                }
                                None => foreign += 1,
                            }
                        }
                        Block::Comment => comments += 1,
                    })
                })?;
                for seq in stamps {
                    detail.record(seq);
                }
                detail.foreign += foreign;
                detail.comments += comments;
                slot.events.set(slot.events.get() + events);
            }
        }
        if self.drop.get().is_some() {
            self.check_resumed(slot);
        }
        Ok(())
    }
}

/// Per-connection decoding state (lives in the connection task).
struct ConnParse {
    dechunk: Dechunker,
    counter: EventCounter,
}

/// One client connection: connect, request, then read until the server ends it.
async fn connection(worker: Rc<Worker>, local: usize, resume_from: Option<String>) {
    let started = Instant::now();
    let limit = Duration::from_secs_f64(worker.args.connect_timeout);
    let opened = tokio::time::timeout(limit, open(&worker, local, resume_from.as_deref())).await;
    let (stream, head, rest) = match opened {
        Err(_) => return worker.error(local, "timeout".to_string()),
        Ok(Err(kind)) => return worker.error(local, kind),
        Ok(Ok(opened)) => opened,
    };
    worker.opened(local, started.elapsed());
    let slot = &worker.slots[local];
    let lowat = worker.args.count_lowat;
    if worker.args.mode == Mode::Fanout && slot.detail.is_none() && lowat > 1 {
        // Counting connections need no prompt reads: let the kernel queue events until
        // `lowat` bytes (or the end of the stream) before waking us, so one read counts many.
        let fd = stream.as_raw_fd();
        if set_int_option(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, lowat).is_ok() {
            slot.lazy_fd.set(Some(fd));
        }
    }
    let mut conn = ConnParse {
        dechunk: Dechunker::new(head.chunked),
        counter: EventCounter::default(),
    };
    if let Err(e) = worker.consume(local, &mut conn, &rest) {
        eprintln!("loadgen: client {}: {e}", worker.first_client + local);
        return worker.closed(local);
    }
    loop {
        if stream.readable().await.is_err() {
            break;
        }
        let outcome = READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            let mut outcome = Ok(());
            // A read shorter than the buffer drained the socket: report WouldBlock so tokio
            // clears the readiness now, instead of paying a second read that says so. (tokio
            // only clears it if no new readiness event arrived meanwhile.)
            let io = stream.try_io(Interest::READABLE, || match stream.try_read(&mut buf) {
                Ok(0) => {
                    outcome = Err("end of stream".to_string());
                    Ok(())
                }
                Ok(n) => {
                    outcome = worker.consume(local, &mut conn, &buf[..n]);
                    if n < buf.len() {
                        Err(std::io::ErrorKind::WouldBlock.into())
                    } else {
                        Ok(())
                    }
                }
                Err(e) => Err(e),
            });
            match io {
                Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => Err(e.to_string()),
                _ => outcome,
            }
        });
        if outcome.is_err() || conn.dechunk.ended() {
            break;
        }
    }
    worker.slots[local].lazy_fd.set(None);
    worker.closed(local);
}

/// Connects, sends the request and reads the response head. Errors are short labels.
async fn open(
    worker: &Worker,
    local: usize,
    resume_from: Option<&str>,
) -> Result<(TcpStream, wire::Head, Vec<u8>), String> {
    let client = worker.first_client + local;
    let target = worker.target_of(client);
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {}", e.kind()))?;
    bind_address_no_port(&socket).map_err(|e| format!("setsockopt: {}", e.kind()))?;
    let source = SocketAddr::new(worker.args.source_addr(client).into(), 0);
    socket
        .bind(source)
        .map_err(|e| format!("bind: {}", e.kind()))?;
    let mut stream = socket
        .connect(target.addr)
        .await
        .map_err(|e| format!("connect: {}", e.kind()))?;
    let _ = stream.set_nodelay(true);
    let mut request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n",
        worker.args.request_path(client),
        target.host
    );
    if let Some(id) = resume_from {
        request.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {}", e.kind()))?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        stream
            .readable()
            .await
            .map_err(|e| format!("read: {}", e.kind()))?;
        let mut chunk = [0u8; 4096];
        match stream.try_read(&mut chunk) {
            Ok(0) => return Err("closed before the response head".to_string()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(format!("read: {}", e.kind())),
        }
        if let Some(head) = wire::parse_head(&buf)? {
            if head.status != 200 {
                return Err(format!("status {}", head.status));
            }
            let rest = buf.split_off(head.len);
            return Ok((stream, head, rest));
        }
    }
}

/// `IP_BIND_ADDRESS_NO_PORT`: `bind()` then only fixes the source address and `connect()` picks
/// the port, checking the whole 4-tuple. Without it every `bind()` to port 0 searches for a port
/// free on that address against every other socket, which takes seconds in a reconnect storm of
/// thousands of sockets.
fn bind_address_no_port(socket: &TcpSocket) -> std::io::Result<()> {
    set_int_option(
        socket.as_raw_fd(),
        libc::IPPROTO_IP,
        libc::IP_BIND_ADDRESS_NO_PORT,
        1,
    )
}

/// `setsockopt` with an `int` value.
fn set_int_option(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: `fd` is a socket this process owns; the pointer and length describe a live c_int.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Merges histogram pairs of several processes.
pub(crate) fn merge_pairs<'a>(parts: impl Iterator<Item = &'a Vec<(u64, u64)>>) -> Histogram<u64> {
    let mut merged = new_hist();
    for pairs in parts {
        let _ = merged.add(hist_from_pairs(pairs));
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detail_counts_duplicates_reordering_and_gaps() {
        let mut detail = Detail::default();
        for seq in [0, 1, 3, 2, 2, 5] {
            detail.record(seq);
        }
        assert_eq!(detail.duplicates, 1);
        assert_eq!(detail.out_of_order, 1);
        assert_eq!(detail.contiguous, 4);
        // Expected 0..6: 4 is missing; nothing beyond 6 was seen.
        assert_eq!(detail.missing(6), 1);
        assert_eq!(detail.unexpected(6), 0);
        // Expected only 0..3: 3 and 5 were not published in the window.
        assert_eq!(detail.missing(3), 0);
        assert_eq!(detail.unexpected(3), 2);
    }
}
