//! The body of one SSE response: a cursor over the hub, woken when its channels change.
//!
//! The stream holds no queue of its own beyond one piece. When woken, and once it has handed
//! out everything it read before, it reads the next bounded piece after its cursor from the
//! rings (already-encoded, shared frames; see `Hub::read`), hands those frames to the writer
//! (the HTTP/1.1 fast path, or hyper as a response body), and moves the cursor to the position
//! the piece covers. So a client that resumes far back and never reads pins one piece, not its
//! whole replay: frames the ring evicts meanwhile are freed. Gaps and fall-offs become
//! `gateway.reset` events, so a client never sees a silent hole.
//!
//! Events at or below the head a stream started from are replays: they are counted as replayed
//! and kept out of the fan-out latency histogram, which measures live delivery only.
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
use crate::hub::{
    Drain, DrainWatch, EntryKind, Hub, Lease, Located, Origin, Registration, Skipped,
};
use crate::metrics::{self, CloseReason, ResumeOutcome};
use crate::position::{self, Position};
use crate::sse::{self, Epoch, ResetReason, WireFrame};

/// An open SSE stream over the channels of one [`Lease`].
pub(crate) struct EventStream {
    hub: Arc<Hub>,
    lease: Lease,
    /// Everything up to this position has been sent (or did not concern this stream).
    cursor: u64,
    /// The head when the stream opened: events up to it are replays, not live deliveries.
    replay_until: u64,
    /// The resume being replayed, until its outcome is counted.
    resume: Option<ResumeTally>,
    /// Channels whose history fell off, skipped until their `history_expired` reset is sent.
    skipped: Option<Skipped>,
    /// Redis backend: where each channel stands in Redis for this client (the id it is sent).
    positions: Option<Vec<Position>>,
    /// Redis backend: per channel, the position this stream reads it from when that is later
    /// than the cursor (a resume whose channels were read up to different points).
    floors: Option<Vec<u64>>,
    /// Frames read but not yet handed to the writer: at most one piece, plus control frames.
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
    kind: OutgoingKind,
}

/// How a handed-out frame is accounted for.
#[derive(Clone, Copy)]
enum OutgoingKind {
    /// Made by the gateway (preamble, reset, heartbeat, retry).
    Control,
    /// An event the client missed before it resumed.
    Replayed,
    /// A live event, read from Redis at this time (fan-out latency).
    Live(Instant),
}

impl Outgoing {
    fn control(frame: WireFrame) -> Outgoing {
        Outgoing {
            frame,
            kind: OutgoingKind::Control,
        }
    }

    /// A gateway-made frame (preamble, reset, retry), wrapped for the wire.
    fn encoded(bytes: &[u8]) -> Outgoing {
        Outgoing::control(WireFrame::new(bytes))
    }
}

/// Where a new stream starts, as the client's resume id says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resume {
    /// No resume id: the stream starts at the head.
    Fresh,
    /// A position this run still knows: the stream replays what came after it.
    From(u64),
    /// An id that is malformed, from another epoch, or ahead of the head: the stream starts at
    /// the head with an `unknown_position` reset.
    Unknown,
}

impl Resume {
    /// Reads the client's resume id, if it sent one, against this run's `epoch` and `head`.
    fn parse(resume_from: Option<&str>, epoch: &Epoch, head: u64) -> Resume {
        let Some(id) = resume_from else {
            return Resume::Fresh;
        };
        match epoch.parse_position(id).filter(|p| *p <= head) {
            Some(position) => Resume::From(position),
            None => Resume::Unknown,
        }
    }
}

/// What the replay of a resume has met so far; its outcome is counted once the replay has been
/// read up to the head the stream started from (or when the client leaves before that).
#[derive(Default)]
struct ResumeTally {
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
    /// `unknown_position` reset, and the first piece of the replay of what the client missed.
    pub(crate) fn open(
        hub: Arc<Hub>,
        lease: Lease,
        start: StreamStart<'_>,
        drain: Arc<Drain>,
    ) -> EventStream {
        if hub.redis_backend() {
            return EventStream::open_on_redis_history(hub, lease, start, drain);
        }
        // The first poll registers for wake-ups and then reads again, so nothing appended
        // between this read and that poll is missed.
        let head = hub.head();
        let resume = Resume::parse(start.resume_from, hub.epoch(), head);
        let cursor = match resume {
            Resume::From(position) => position,
            Resume::Fresh | Resume::Unknown => head,
        };
        let retry_ms = start.retry_ms;
        let mut stream = EventStream::new(hub, lease, start, drain, cursor);
        stream.replay_until = head;
        let position = stream.hub.epoch().id(cursor);
        let preamble = sse::encode_preamble(retry_ms, position);
        stream.pending.push_back(Outgoing::encoded(&preamble));
        if resume == Resume::Unknown {
            let names: Vec<&str> = stream.lease.names().collect();
            let reason = ResetReason::UnknownPosition;
            let reset = sse::encode_reset(position, reason, &names);
            stream.pending.push_back(Outgoing::encoded(&reset));
            metrics::reset_sent(reason);
            metrics::resumed(ResumeOutcome::Reset(reason));
        } else {
            if let Resume::From(_) = resume {
                stream.resume = Some(ResumeTally::default());
            }
            // Only the first piece: the rest is read as the writer takes it. A short replay
            // fits in it, so its outcome is counted here, as soon as it is known.
            stream.read_next_piece();
        }
        stream
    }

    /// A stream at `cursor` (also where its replay ends, unless told otherwise), counted open.
    fn new(
        hub: Arc<Hub>,
        lease: Lease,
        start: StreamStart<'_>,
        drain: Arc<Drain>,
        cursor: u64,
    ) -> EventStream {
        let stream = EventStream {
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
            replay_until: cursor,
            resume: None,
            skipped: None,
            positions: None,
            floors: None,
            lease,
            hub,
        };
        metrics::stream_opened();
        if let Some(connection) = &stream.connection {
            connection.stream_opened();
        }
        stream
    }

    /// Opens a stream with the redis backend: its id is each channel's position in Redis, and a
    /// resume id is looked up channel by channel in the rings, which hold the history loaded
    /// from Redis (so it resumes clients that read on other instances too).
    fn open_on_redis_history(
        hub: Arc<Hub>,
        lease: Lease,
        start: StreamStart<'_>,
        drain: Arc<Drain>,
    ) -> EventStream {
        let head = hub.head();
        let current: Vec<Position> = (0..lease.len())
            .filter_map(|index| hub.position_at(&lease, index, head))
            .collect();
        let resume_from = start.resume_from;
        let retry_ms = start.retry_ms;
        let mut stream = EventStream::new(hub, lease, start, drain, head);
        let channels = stream.lease.len();
        let wanted = resume_from.and_then(|id| position::parse_id(id, channels));
        let Some(wanted) = wanted.filter(|_| current.len() == channels) else {
            // A fresh stream; or an id that is no position of these channels, which the
            // preamble leaves in place (so a cut right after it still resets next time).
            let preamble = match resume_from {
                None => sse::encode_preamble(retry_ms, position::encode_id(&current)),
                Some(_) => Bytes::from(format!("retry: {retry_ms}\n\n")),
            };
            stream.pending.push_back(Outgoing::encoded(&preamble));
            stream.positions = Some(current);
            if resume_from.is_some() {
                let all: Vec<usize> = (0..channels).collect();
                stream.reset_channels(&all, ResetReason::UnknownPosition);
                metrics::resumed(ResumeOutcome::Reset(ResetReason::UnknownPosition));
            }
            return stream;
        };
        let preamble = sse::encode_preamble(retry_ms, position::encode_id(&wanted));
        stream.pending.push_back(Outgoing::encoded(&preamble));
        let mut floors = vec![head; channels];
        let (mut expired, mut unknown) = (Vec::new(), Vec::new());
        for (index, position) in wanted.iter().enumerate() {
            match stream.hub.locate(&stream.lease, index, position) {
                Located::At(seq) => floors[index] = seq,
                Located::Expired => expired.push(index),
                Located::Unknown | Located::Ahead => unknown.push(index),
            }
        }
        stream.positions = Some(wanted);
        stream.cursor = floors.iter().copied().min().unwrap_or(head);
        stream.floors = Some(floors);
        for (channels, reason) in [
            (&unknown, ResetReason::UnknownPosition),
            (&expired, ResetReason::HistoryExpired),
        ] {
            if !channels.is_empty() {
                stream.reset_channels(channels, reason);
            }
        }
        if unknown.is_empty() {
            stream.resume = Some(ResumeTally {
                expired: !expired.is_empty(),
                ..ResumeTally::default()
            });
        } else {
            metrics::resumed(ResumeOutcome::Reset(ResetReason::UnknownPosition));
        }
        stream.read_next_piece();
        stream
    }

    /// Redis backend: moves `channels` to their current position and queues a reset for them,
    /// carrying the stream's id from there.
    fn reset_channels(&mut self, channels: &[usize], reason: ResetReason) {
        let head = self.hub.head();
        let Some(positions) = self.positions.as_mut() else {
            return;
        };
        for &index in channels {
            if let Some(current) = self.hub.position_at(&self.lease, index, head) {
                positions[index] = current;
            }
        }
        let names: Vec<&str> = channels.iter().map(|i| self.lease.name(*i)).collect();
        let reset = sse::encode_reset(position::encode_id(positions), reason, &names);
        self.pending.push_back(Outgoing::encoded(&reset));
        metrics::reset_sent(reason);
    }

    /// Moves the next piece after the cursor into `pending`, turning gaps and fall-offs into
    /// resets.
    fn read_next_piece(&mut self) {
        if self.hub.head() <= self.cursor {
            self.count_resume_if_replayed();
            return;
        }
        let batch = self.hub.read(
            &self.lease,
            self.cursor,
            self.skipped.as_ref(),
            self.floors.as_deref(),
        );
        let hub = self.hub.clone();
        let epoch = hub.epoch();
        let replaying = self.cursor < self.replay_until;
        // Consumed, so each event's frame moves into `pending` without another reference count.
        let mut items = batch.items.into_iter().peekable();
        while let Some((channel, entry)) = items.next() {
            match entry.kind {
                EntryKind::Event {
                    frame,
                    received_at,
                    origin,
                } => {
                    let kind = if entry.seq <= self.replay_until {
                        OutgoingKind::Replayed
                    } else {
                        OutgoingKind::Live(received_at)
                    };
                    let frame = match origin {
                        Some(origin) => self.with_stream_id(channel, &origin, frame),
                        None => frame,
                    };
                    self.pending.push_back(Outgoing { frame, kind });
                }
                EntryKind::Gap { reason, position } => {
                    // One reconnect puts a gap at the same position in every channel it hit:
                    // report them together.
                    self.move_position(channel, position);
                    let mut gapped = vec![channel];
                    while let Some((other, next)) = items.next_if(|(_, next)| {
                        next.seq == entry.seq && matches!(next.kind, EntryKind::Gap { .. })
                    }) {
                        gapped.push(other);
                        if let EntryKind::Gap { position, .. } = next.kind {
                            self.move_position(other, position);
                        }
                    }
                    let names: Vec<&str> = gapped.iter().map(|i| self.lease.name(*i)).collect();
                    let reset = match &self.positions {
                        Some(positions) => {
                            sse::encode_reset(position::encode_id(positions), reason, &names)
                        }
                        None => sse::encode_reset(epoch.id(entry.seq), reason, &names),
                    };
                    self.pending.push_back(Outgoing::encoded(&reset));
                    metrics::reset_sent(reason);
                    if entry.seq <= self.replay_until {
                        if let Some(resume) = &mut self.resume {
                            resume.interrupted = true;
                        }
                    }
                }
            }
        }
        if !batch.fell_off.is_empty() {
            if replaying {
                if let Some(resume) = &mut self.resume {
                    resume.expired = true;
                }
            }
            self.skip_fallen_off(batch.fell_off, batch.head);
        }
        self.cursor = batch.limit;
        if self
            .floors
            .as_ref()
            .is_some_and(|floors| floors.iter().all(|floor| *floor <= self.cursor))
        {
            self.floors = None;
        }
        self.send_due_expiry_reset();
        self.count_resume_if_replayed();
    }

    /// Redis backend: moves the channel's position to the event's and returns its frame with
    /// this stream's id. A one-channel stream's id is the event's own position, already in the
    /// shared frame; a stream over several channels sends its own id line first, then the
    /// shared frame after the event's id line.
    fn with_stream_id(&mut self, channel: usize, origin: &Origin, frame: WireFrame) -> WireFrame {
        let Some(positions) = self.positions.as_mut() else {
            return frame;
        };
        positions[channel] = origin.position.clone();
        if positions.len() == 1 {
            return frame;
        }
        let rest = frame.after_id_line(origin.id_len);
        let id = position::encode_id(positions);
        let head = WireFrame::id_chunk_head(&id, rest.frame_len());
        self.pending.push_back(Outgoing::control(head));
        rest
    }

    /// Redis backend: records channel `channel`'s position after a gap.
    fn move_position(&mut self, channel: usize, position: Option<Position>) {
        if let (Some(positions), Some(position)) = (self.positions.as_mut(), position) {
            positions[channel] = position;
        }
    }

    /// Skips channels whose history fell off up to `head`, the position their reset will carry
    /// (as if everything up to it had been read at once): the other channels' entries up to
    /// there are still sent first, and the fallen-off channels' remaining entries up to there
    /// are not sent at all. Channels that fall off while others are skipped join them.
    fn skip_fallen_off(&mut self, fell_off: Vec<usize>, head: u64) {
        match &mut self.skipped {
            Some(skipped) => skipped.channels.extend(fell_off),
            None => {
                self.skipped = Some(Skipped {
                    channels: fell_off,
                    until: head,
                })
            }
        }
    }

    /// Queues the `history_expired` reset once the cursor reached the position it carries.
    fn send_due_expiry_reset(&mut self) {
        let Some(skipped) = self.skipped.take_if(|skipped| skipped.until <= self.cursor) else {
            return;
        };
        let names: Vec<&str> = skipped
            .channels
            .iter()
            .map(|i| self.lease.name(*i))
            .collect();
        let reason = ResetReason::HistoryExpired;
        let reset = match self.positions.as_mut() {
            Some(positions) => {
                for &index in &skipped.channels {
                    if let Some(at) = self.hub.position_at(&self.lease, index, skipped.until) {
                        positions[index] = at;
                    }
                }
                sse::encode_reset(position::encode_id(positions), reason, &names)
            }
            None => sse::encode_reset(self.hub.epoch().id(skipped.until), reason, &names),
        };
        self.pending.push_back(Outgoing::encoded(&reset));
        metrics::reset_sent(reason);
    }

    /// Counts the resume's outcome once its replay has been read completely.
    fn count_resume_if_replayed(&mut self) {
        if self.cursor >= self.replay_until {
            if let Some(resume) = self.resume.take() {
                metrics::resumed(resume.outcome());
            }
        }
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

impl ResumeTally {
    /// The `outcome` label of a resume whose replay this was.
    fn outcome(&self) -> ResumeOutcome {
        if self.expired {
            ResumeOutcome::Reset(ResetReason::HistoryExpired)
        } else if self.interrupted {
            ResumeOutcome::Reset(ResetReason::UpstreamInterrupted)
        } else {
            ResumeOutcome::Replayed
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
        // A client that leaves during its replay still made a resume attempt.
        if let Some(resume) = self.resume.take() {
            metrics::resumed(resume.outcome());
        }
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
            self.read_next_piece();
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
        match outgoing.kind {
            OutgoingKind::Control => {}
            OutgoingKind::Replayed => metrics::replayed_event_delivered(),
            OutgoingKind::Live(received_at) => metrics::event_delivered(received_at, now),
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

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use http::HeaderMap;
    use tokio::sync::mpsc;

    use super::*;
    use crate::config::Settings;
    use crate::http::admission::Admission;
    use crate::hub::{HubSettings, UpstreamRequest, PIECE_MAX_ENTRIES};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// What a client sees of one frame.
    #[derive(Debug, PartialEq, Eq)]
    enum Seen {
        Event(String),
        Reset {
            reason: String,
            channels: Vec<String>,
            id: String,
        },
        Other,
    }

    fn seen(frame: &WireFrame) -> Seen {
        let text = String::from_utf8_lossy(&frame.frame()).into_owned();
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .map(str::to_string)
        };
        let Some(data) = field("data: ") else {
            return Seen::Other;
        };
        if field("event: ").as_deref() != Some(sse::RESET_EVENT) {
            return Seen::Event(data);
        }
        let reset: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
        Seen::Reset {
            reason: reset["reason"].as_str().unwrap_or("").to_string(),
            channels: reset["channels"]
                .as_array()
                .map(|c| {
                    c.iter()
                        .filter_map(|c| c.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            id: field("id: ").unwrap_or_default(),
        }
    }

    fn hub_with_capacity(capacity: usize) -> (Arc<Hub>, mpsc::UnboundedReceiver<UpstreamRequest>) {
        Hub::new(HubSettings {
            history_capacity: capacity,
            ..crate::hub::testing::default_settings()
        })
    }

    /// Leases `names`, confirming them as the upstream task would.
    fn lease(
        hub: &Arc<Hub>,
        requests: &mut mpsc::UnboundedReceiver<UpstreamRequest>,
        names: &[&str],
    ) -> Lease {
        crate::hub::testing::lease_confirmed(hub, requests, names).expect("under the cap")
    }

    /// Opens a stream resuming from `position`.
    fn resume(hub: &Arc<Hub>, lease: Lease, position: u64) -> Result<EventStream, &'static str> {
        let id = hub.epoch().id(position).to_string();
        let admitted = Admission::new(&Settings::default().limits)
            .admit([127, 0, 0, 1].into(), &HeaderMap::new())
            .map_err(|_| "admission refused")?;
        let start = StreamStart {
            resume_from: Some(&id),
            retry_ms: 1000,
            heartbeat: Duration::from_secs(3600),
            shutdown_retry_jitter_ms: 0,
            expires_at: None,
            admitted,
            connection: None,
        };
        Ok(EventStream::open(
            hub.clone(),
            lease,
            start,
            Arc::new(Drain::default()),
        ))
    }

    /// Takes every frame the stream has to give now (bounded), as a client would see them.
    fn drain(stream: &mut EventStream) -> Vec<Seen> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut out = Vec::new();
        for _ in 0..100_000 {
            match stream.poll_wire_frame(&mut cx) {
                Poll::Ready(Some(frame)) => out.push(seen(&frame)),
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        out.retain(|seen| *seen != Seen::Other);
        out
    }

    fn publish(hub: &Hub, name: &str, payload: &str) {
        hub.publish(name, payload.as_bytes(), Instant::now());
    }

    fn events(payloads: impl IntoIterator<Item = String>) -> Vec<Seen> {
        payloads.into_iter().map(Seen::Event).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_resumed_stream_queues_one_piece_of_its_replay() -> TestResult {
        let (hub, mut requests) = hub_with_capacity(1000);
        let lease = lease(&hub, &mut requests, &["a"]);
        let start = hub.head();
        for n in 0..500 {
            publish(&hub, "a", &format!("a{n}"));
        }
        let stream = resume(&hub, lease, start)?;
        // The preamble and one piece.
        assert!(
            stream.pending.len() <= 1 + PIECE_MAX_ENTRIES,
            "{} frames queued",
            stream.pending.len()
        );
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_replay_does_not_keep_what_the_ring_evicts() -> TestResult {
        let (hub, mut requests) = hub_with_capacity(100);
        let lease = lease(&hub, &mut requests, &["a"]);
        let start = hub.head();
        for n in 0..100 {
            publish(&hub, "a", &format!("old{n}"));
        }
        let mut stream = resume(&hub, lease, start)?;
        // The client reads nothing while the ring turns over.
        for n in 0..100 {
            publish(&hub, "a", &format!("new{n}"));
        }
        let seen = drain(&mut stream);
        // It gets the piece it was holding, then learns that the rest is gone.
        let held = PIECE_MAX_ENTRIES.min(100);
        assert_eq!(
            seen[..held],
            events((0..held).map(|n| format!("old{n}")))[..]
        );
        assert_eq!(
            seen[held],
            Seen::Reset {
                reason: ResetReason::HistoryExpired.as_str().to_string(),
                channels: vec!["a".to_string()],
                id: hub.epoch().id(hub.head()).to_string(),
            }
        );
        assert_eq!(seen.len(), held + 1);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_replay_across_pieces_sends_every_event_once_in_order_and_one_reset_per_gap(
    ) -> TestResult {
        let (hub, mut requests) = hub_with_capacity(1000);
        let lease = lease(&hub, &mut requests, &["a", "b", "c"]);
        let start = hub.head();
        let mut expected = Vec::new();
        for n in 0..150 {
            let name = ["a", "b", "c"][n % 3];
            publish(&hub, name, &format!("{name}{n}"));
            expected.push(Seen::Event(format!("{name}{n}")));
        }
        hub.set_upstream_up(false);
        hub.mark_subscribed(&hub.subscriptions());
        hub.set_upstream_up(true);
        expected.push(Seen::Reset {
            reason: ResetReason::UpstreamInterrupted.as_str().to_string(),
            channels: vec!["a".to_string(), "b".to_string(), "c".to_string()],
            id: hub.epoch().id(hub.head()).to_string(),
        });
        for n in 0..50 {
            publish(&hub, "b", &format!("after{n}"));
            expected.push(Seen::Event(format!("after{n}")));
        }
        let mut stream = resume(&hub, lease, start)?;
        assert_eq!(drain(&mut stream), expected);
        publish(&hub, "c", "live");
        assert_eq!(drain(&mut stream), events(["live".to_string()]));
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_fallen_off_channel_is_reset_after_the_others_replay_across_pieces() -> TestResult {
        let (hub, mut requests) = hub_with_capacity(100);
        let lease = lease(&hub, &mut requests, &["a", "b"]);
        let start = hub.head();
        for n in 0..100 {
            publish(&hub, "a", &format!("a{n}"));
            publish(&hub, "b", &format!("b{n}"));
            publish(&hub, "a", &format!("a{n}'"));
        }
        let head = hub.head();
        let mut stream = resume(&hub, lease, start)?;
        let mut expected = events((0..100).map(|n| format!("b{n}")));
        expected.push(Seen::Reset {
            reason: ResetReason::HistoryExpired.as_str().to_string(),
            channels: vec!["a".to_string()],
            id: hub.epoch().id(head).to_string(),
        });
        assert_eq!(drain(&mut stream), expected);
        publish(&hub, "a", "live");
        assert_eq!(drain(&mut stream), events(["live".to_string()]));
        Ok(())
    }
}
