//! The body of one SSE response: a cursor over the hub, woken when its channels change.
//!
//! The stream holds no queue of its own. When woken it reads everything after its cursor from
//! the rings (already-encoded, shared frames), hands those frames to the writer (the HTTP/1.1
//! fast path, or hyper as a response body), and moves the cursor to the head it read up to.
//! Gaps and fall-offs become `gateway.reset` events, so a client never sees a silent hole.
//!
//! Wake-ups come from the hub's wake-up lists (`hub::wakers`): before each look at the rings
//! the stream makes sure it is registered on every channel it reads and on the drain signal.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body::{Body, Frame};
use tokio::time::{Instant, Sleep};

use super::admission::Admitted;
use super::connection::Activity;
use crate::hub::{Drain, DrainWatch, EntryKind, Hub, Lease, Registration};
use crate::metrics::{self, CloseReason};
use crate::sse::{self, WireFrame};

/// Reasons carried by `gateway.reset`; part of the public contract.
pub(crate) mod reset_reason {
    /// The resume id is malformed, from another epoch, or ahead of the head.
    pub(crate) const UNKNOWN_POSITION: &str = "unknown_position";
    /// The ring no longer reaches back to the client's position.
    pub(crate) const HISTORY_EXPIRED: &str = "history_expired";
    /// The Redis subscription was down; messages in that window are lost.
    pub(crate) const UPSTREAM_INTERRUPTED: &str = "upstream_interrupted";
}

/// An open SSE stream over the channels of one [`Lease`].
pub(crate) struct EventStream {
    hub: Arc<Hub>,
    lease: Lease,
    /// Everything up to this position has been sent (or did not concern this stream).
    cursor: u64,
    /// Frames read but not yet handed to the writer.
    pending: VecDeque<Outgoing>,
    /// This stream's entries in its channels' wake-up lists, one per leased channel.
    listening: Vec<Registration>,
    /// The gateway's drain signal, and this stream's entry in its wake-up list.
    drain: Arc<Drain>,
    drain_watch: DrainWatch,
    /// Fires when a heartbeat may be due; see `last_write`.
    heartbeat: Pin<Box<Sleep>>,
    heartbeat_every: Duration,
    /// When a frame was last handed out. The heartbeat timer is not reset per event (a
    /// timer-wheel operation per delivery); when it fires early it is re-armed from here instead.
    last_write: Instant,
    /// `(retry_ms, jitter)` for the final `retry:` at shutdown.
    shutdown_retry: (u64, u64),
    /// When the token that opened the stream expires; the stream ends then.
    expiry: Option<Pin<Box<Sleep>>>,
    /// Set when the gateway decided to end the stream; hyper then ends the body cleanly.
    finished: Option<CloseReason>,
    /// Holds this stream's connection-limit slots until it ends.
    _admitted: Admitted,
    /// The connection's activity, when its watchdog runs apart from the stream (hyper): counts
    /// the stream as open there, and tells whether the watchdog closed it for a write stall.
    connection: Option<Arc<Activity>>,
}

/// A frame waiting to be written.
struct Outgoing {
    frame: WireFrame,
    /// For events: when the message was read from Redis (fan-out latency).
    received_at: Option<Instant>,
}

impl Outgoing {
    fn control(frame: WireFrame) -> Outgoing {
        Outgoing {
            frame,
            received_at: None,
        }
    }

    /// A gateway-made frame (preamble, reset, retry), wrapped for the wire.
    fn encoded(bytes: &[u8]) -> Outgoing {
        Outgoing::control(WireFrame::new(bytes))
    }
}

/// What one read of the rings found, for resume accounting.
#[derive(Default)]
struct ReadSummary {
    events: usize,
    interrupted: bool,
    expired: bool,
}

/// What a new stream starts from.
pub(crate) struct StreamStart<'a> {
    /// The client's resume id, if it sent a non-empty one.
    pub(crate) resume_from: Option<&'a str>,
    /// Advertised reconnection delay.
    pub(crate) retry_ms: u64,
    /// Silence after which a heartbeat comment is sent.
    pub(crate) heartbeat: Duration,
    /// Spread added to `retry_ms` in the final `retry:` sent at shutdown.
    pub(crate) shutdown_retry_jitter_ms: u64,
    /// When the stream must end because its credentials expire.
    pub(crate) expires_at: Option<SystemTime>,
    /// The stream's admission (connection-limit slots).
    pub(crate) admitted: Admitted,
    /// The activity of the connection carrying the stream, if it is watched (see `connection`).
    pub(crate) connection: Option<Arc<Activity>>,
}

impl EventStream {
    /// Opens a stream whose channels are all subscribed. Queues the preamble, any
    /// `unknown_position` reset, and the replay of what the client missed.
    pub(crate) fn open(
        hub: Arc<Hub>,
        lease: Lease,
        start: StreamStart<'_>,
        drain: Arc<Drain>,
    ) -> EventStream {
        // The first poll registers for wake-ups and then reads again, so nothing appended
        // between this read and that poll is missed.
        let head = hub.head();
        let resumed = start
            .resume_from
            .map(|id| hub.epoch().parse_position(id).filter(|p| *p <= head));
        let cursor = match resumed {
            Some(Some(position)) => position,
            None | Some(None) => head,
        };
        let mut stream = EventStream {
            pending: VecDeque::new(),
            listening: (0..lease.len()).map(|_| Registration::default()).collect(),
            drain,
            drain_watch: DrainWatch::default(),
            heartbeat: Box::pin(tokio::time::sleep(start.heartbeat)),
            heartbeat_every: start.heartbeat,
            last_write: Instant::now(),
            shutdown_retry: (start.retry_ms, start.shutdown_retry_jitter_ms),
            expiry: start
                .expires_at
                .map(|at| Box::pin(tokio::time::sleep(until(at)))),
            finished: None,
            _admitted: start.admitted,
            connection: start.connection,
            cursor,
            lease,
            hub,
        };
        metrics::stream_opened();
        if let Some(connection) = &stream.connection {
            connection.stream_opened();
        }
        let position = stream.hub.epoch().id(cursor);
        let preamble = sse::encode_preamble(start.retry_ms, position);
        stream.pending.push_back(Outgoing::encoded(&preamble));
        if let Some(None) = resumed {
            let names: Vec<&str> = stream.lease.names().collect();
            let reset = sse::encode_reset(position, reset_reason::UNKNOWN_POSITION, &names);
            stream.pending.push_back(Outgoing::encoded(&reset));
            metrics::reset_sent(reset_reason::UNKNOWN_POSITION);
            metrics::resumed(reset_reason::UNKNOWN_POSITION, 0);
        } else {
            let replay = stream.read_new_entries();
            if resumed.is_some() {
                metrics::resumed(replay.outcome(), replay.events);
            }
        }
        stream
    }

    /// Moves everything after the cursor into `pending`, turning gaps and fall-offs into resets.
    fn read_new_entries(&mut self) -> ReadSummary {
        if self.hub.head() <= self.cursor {
            return ReadSummary::default();
        }
        let batch = self.hub.read(&self.lease, self.cursor);
        let epoch = self.hub.epoch();
        let mut summary = ReadSummary::default();
        // Consumed, so each event's frame moves into `pending` without another reference count.
        let mut items = batch.items.into_iter().peekable();
        while let Some((channel, entry)) = items.next() {
            match entry.kind {
                EntryKind::Event { frame, received_at } => {
                    summary.events += 1;
                    self.pending.push_back(Outgoing {
                        frame,
                        received_at: Some(received_at),
                    });
                }
                EntryKind::Gap => {
                    // One reconnect puts a gap at the same position in every channel it hit:
                    // report them together.
                    let mut names = vec![self.lease.name(channel)];
                    while let Some((other, _)) = items.next_if(|(_, next)| {
                        next.seq == entry.seq && matches!(next.kind, EntryKind::Gap)
                    }) {
                        names.push(self.lease.name(other));
                    }
                    let id = epoch.id(entry.seq);
                    let reset = sse::encode_reset(id, reset_reason::UPSTREAM_INTERRUPTED, &names);
                    self.pending.push_back(Outgoing::encoded(&reset));
                    metrics::reset_sent(reset_reason::UPSTREAM_INTERRUPTED);
                    summary.interrupted = true;
                }
            }
        }
        if !batch.fell_off.is_empty() {
            let names: Vec<&str> = batch.fell_off.iter().map(|i| self.lease.name(*i)).collect();
            let id = epoch.id(batch.limit);
            let reset = sse::encode_reset(id, reset_reason::HISTORY_EXPIRED, &names);
            self.pending.push_back(Outgoing::encoded(&reset));
            metrics::reset_sent(reset_reason::HISTORY_EXPIRED);
            summary.expired = true;
        }
        self.cursor = batch.limit;
        summary
    }

    /// Ends the stream for shutdown, after a spread-out final `retry:` so a fleet's clients do
    /// not all come back at the same moment.
    fn begin_drain(&mut self) {
        let (retry_ms, jitter_ms) = self.shutdown_retry;
        let retry = retry_ms + rand::random_range(0..=jitter_ms);
        let frame = format!("retry: {retry}\n\n");
        self.pending.push_back(Outgoing::encoded(frame.as_bytes()));
        self.finished = Some(CloseReason::Shutdown);
    }
}

impl ReadSummary {
    /// The `outcome` label of a resume whose replay this was.
    fn outcome(&self) -> &'static str {
        if self.expired {
            reset_reason::HISTORY_EXPIRED
        } else if self.interrupted {
            reset_reason::UPSTREAM_INTERRUPTED
        } else {
            "replayed"
        }
    }
}

/// How long from now until the wall-clock time `at` (zero if it has passed).
fn until(at: SystemTime) -> Duration {
    at.duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.lease.stop_listening(&mut self.listening);
        self.drain.deregister(&mut self.drain_watch);
        if let Some(connection) = &self.connection {
            connection.stream_closed();
            if connection.stalled() {
                self.finished = Some(CloseReason::Stalled);
            }
        }
        metrics::stream_closed(self.finished.unwrap_or(CloseReason::ClientGone));
    }
}

impl EventStream {
    /// Records why the writer gave up on the stream (for the close-reason metric).
    pub(crate) fn close_as(&mut self, reason: CloseReason) {
        self.finished = Some(reason);
    }
}

impl Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .poll_wire_frame(cx)
            .map(|frame| frame.map(|frame| Ok(Frame::data(frame.frame()))))
    }
}

impl EventStream {
    /// The next frame to write, or `None` when the stream has ended. Pending until one is due.
    pub(crate) fn poll_wire_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<WireFrame>> {
        loop {
            if let Some(frame) = self.next_pending() {
                return Poll::Ready(Some(frame));
            }
            if self.finished.is_some() {
                return Poll::Ready(None);
            }
            if self.token_expired(cx) {
                self.finished = Some(CloseReason::TokenExpired);
                continue;
            }
            // Register before looking, so news that lands after the look wakes us.
            if self.drain.check(&mut self.drain_watch, cx.waker()) {
                self.begin_drain();
                continue;
            }
            self.lease.listen(&mut self.listening, cx.waker());
            self.read_new_entries();
            if !self.pending.is_empty() || self.heartbeat_fired(cx) {
                continue;
            }
            return Poll::Pending;
        }
    }

    /// Hands out the oldest queued frame, accounting for it.
    fn next_pending(&mut self) -> Option<WireFrame> {
        let outgoing = self.pending.pop_front()?;
        // One clock read per frame serves both the latency histogram and the heartbeat.
        let now = Instant::now();
        self.last_write = now;
        metrics::bytes_sent(outgoing.frame.frame_len());
        if let Some(received_at) = outgoing.received_at {
            metrics::event_delivered(received_at, now);
        }
        Some(outgoing.frame)
    }

    fn token_expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.expiry
            .as_mut()
            .is_some_and(|expiry| expiry.as_mut().poll(cx).is_ready())
    }

    /// Whether the heartbeat timer fired; if so it queued a heartbeat when one is due and was
    /// re-armed (the caller polls again so the new deadline is registered).
    fn heartbeat_fired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.heartbeat.as_mut().poll(cx).is_pending() {
            return false;
        }
        let now = Instant::now();
        if now >= self.last_write + self.heartbeat_every {
            self.pending
                .push_back(Outgoing::control(WireFrame::heartbeat()));
            self.last_write = now;
        }
        let next = self.last_write + self.heartbeat_every;
        self.heartbeat.as_mut().reset(next);
        true
    }
}
