//! Metrics: every Prometheus series the gateway exports, named in this one module.
//!
//! The rest of the code calls the small functions here instead of naming metrics itself, so the
//! public contract (the names dashboards and alerts use) lives in one place. All series are
//! registered at zero on start-up so dashboards are never blank. Nothing is labelled by channel
//! name, client address or user: labels only take values from small fixed sets.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::time::Instant;

use crate::sse::ResetReason;

/// Open SSE streams.
pub const CONNECTIONS: &str = "ssehub_connections";
/// SSE streams opened.
pub const CONNECTIONS_OPENED: &str = "ssehub_connections_opened_total";
/// SSE streams closed, by `reason`.
pub const CONNECTIONS_CLOSED: &str = "ssehub_connections_closed_total";
/// Requests answered with an error, by `status`.
pub const REQUESTS_REJECTED: &str = "ssehub_requests_rejected_total";
/// Messages read from Redis.
pub const EVENTS_RECEIVED: &str = "ssehub_events_received_total";
/// Events handed to client sockets (summed over clients).
pub const EVENTS_DELIVERED: &str = "ssehub_events_delivered_total";
/// Bytes handed to client sockets.
pub const BYTES_SENT: &str = "ssehub_bytes_sent_total";
/// Time from reading a message from Redis to handing it to a client socket.
pub const FANOUT_LATENCY: &str = "ssehub_fanout_latency_seconds";
/// Resume attempts, by `outcome`.
pub const RESUMES: &str = "ssehub_resumes_total";
/// Events sent as part of a resume's replay.
pub const EVENTS_REPLAYED: &str = "ssehub_events_replayed_total";
/// `gateway.reset` events sent, by `reason` (on resume and while streaming).
pub const RESETS: &str = "ssehub_resets_total";
/// 1 while the Redis subscription connection is up.
pub const REDIS_UP: &str = "ssehub_redis_up";
/// Redis shards the gateway knows of: 1 for standalone and sentinel, the primaries owning slots
/// in a cluster.
pub const REDIS_SHARDS_KNOWN: &str = "ssehub_redis_shards_known";
/// Known Redis shards whose subscription connection is up.
pub const REDIS_SHARDS_UP: &str = "ssehub_redis_shards_up";
/// Re-established Redis subscription connections.
pub const REDIS_RECONNECTS: &str = "ssehub_redis_reconnects_total";
/// Channels currently subscribed on Redis.
pub const REDIS_CHANNELS: &str = "ssehub_redis_channels";
/// Channels freed before their linger ended, to stay within `channels.max_total`.
pub const CHANNELS_EVICTED: &str = "ssehub_channels_evicted_total";
/// Entries held in all rings.
pub const HISTORY_EVENTS: &str = "ssehub_history_events";
/// Encoded bytes held in all rings.
pub const HISTORY_BYTES: &str = "ssehub_history_bytes";
/// Entries evicted from rings (by capacity or age).
pub const HISTORY_EVICTED: &str = "ssehub_history_evicted_total";
/// Redis payloads not forwarded, by `reason`.
pub const PAYLOADS_DROPPED: &str = "ssehub_payloads_dropped_total";
/// Dropped payloads handed to the dead-letter stream, by `outcome`.
pub const DEAD_LETTERS: &str = "ssehub_dead_letters_total";
/// Constant 1, labelled with `version` and `commit`.
pub const BUILD_INFO: &str = "ssehub_build_info";
/// Open TCP connections, by listener (`public`, `admin`), whatever they carry.
pub const TCP_CONNECTIONS: &str = "ssehub_tcp_connections";
/// TCP connections closed at accept because a connection cap was reached, by listener and reason.
pub const TCP_REFUSED: &str = "ssehub_tcp_connections_refused_total";
/// TCP connections closed by their deadlines, by listener and reason.
pub const TCP_EXPIRED: &str = "ssehub_tcp_connections_expired_total";
/// `POST /publish` requests answered, by `status`.
pub const PUBLISH_REQUESTS: &str = "ssehub_publish_requests_total";
/// Reads of a channel's history from Redis (resumes, catch-up), by `outcome`.
pub const HISTORY_READS: &str = "ssehub_history_reads_total";
/// Events read from the Redis history after a gap in the subscription.
pub const UPSTREAM_RECOVERED_EVENTS: &str = "ssehub_upstream_recovered_events_total";

/// Why a stream closed (`reason` label of [`CONNECTIONS_CLOSED`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client went away (or its connection failed).
    ClientGone,
    /// The gateway ended the stream because it is shutting down.
    Shutdown,
    /// The token that opened the stream expired.
    TokenExpired,
    /// The client stopped reading: nothing could be written for `limits.write_stall_secs`.
    Stalled,
}

impl CloseReason {
    const ALL: [CloseReason; 4] = [
        CloseReason::ClientGone,
        CloseReason::Shutdown,
        CloseReason::TokenExpired,
        CloseReason::Stalled,
    ];

    fn label(self) -> &'static str {
        match self {
            CloseReason::ClientGone => "client_gone",
            CloseReason::Shutdown => "shutdown",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::Stalled => "stalled",
        }
    }
}

/// How a resume went (`outcome` label of [`RESUMES`]): `replayed`, or the reset it met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResumeOutcome {
    /// Everything the client missed was replayed.
    Replayed,
    /// The client got this reset instead of (part of) what it missed.
    Reset(ResetReason),
}

impl ResumeOutcome {
    const ALL: [ResumeOutcome; 4] = [
        ResumeOutcome::Replayed,
        ResumeOutcome::Reset(ResetReason::UnknownPosition),
        ResumeOutcome::Reset(ResetReason::HistoryExpired),
        ResumeOutcome::Reset(ResetReason::UpstreamInterrupted),
    ];

    fn label(self) -> &'static str {
        match self {
            ResumeOutcome::Replayed => "replayed",
            ResumeOutcome::Reset(reason) => reason.as_str(),
        }
    }
}

/// Statuses of [`REQUESTS_REJECTED`] the gateway can produce.
pub const REJECTED_STATUSES: [u16; 10] = [400, 401, 403, 404, 405, 413, 422, 429, 431, 503];
/// Statuses of [`PUBLISH_REQUESTS`].
pub const PUBLISH_STATUSES: [u16; 8] = [200, 400, 401, 403, 405, 413, 422, 503];
/// Outcomes of [`HISTORY_READS`].
pub const HISTORY_READ_OUTCOMES: [&str; 4] = ["ok", "history_expired", "unknown_position", "error"];
/// The listeners (`listener` label of the TCP connection series).
pub const LISTENERS: [&str; 2] = ["public", "admin"];
/// Reasons of [`TCP_REFUSED`]: the configuration key of the cap that refused.
pub const REFUSAL_REASONS: [&str; 2] = ["max_connections", "max_connections_per_ip"];
/// Reasons of [`TCP_EXPIRED`].
pub const EXPIRY_REASONS: [&str; 3] = ["first_request_timeout", "idle", "stalled"];
/// Reasons of [`PAYLOADS_DROPPED`].
pub const DROP_REASONS: [&str; 3] = ["invalid_utf8", "too_large", "schema_invalid"];

/// Outcomes of [`DEAD_LETTERS`]: added to the stream, lost (queue full, Redis down or
/// failing), or already added by another instance.
pub const DEAD_LETTER_OUTCOMES: [&str; 3] = ["written", "failed", "duplicate"];

/// Fan-out latency buckets: 100 µs to 10 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// How often the exporter's histogram upkeep runs.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Handles of the per-event series, resolved once: looking a series up by name on every event
/// would cost a registry lookup per delivery.
struct HotPath {
    received: Counter,
    delivered: Counter,
    replayed: Counter,
    bytes_sent: Counter,
    latency: Histogram,
}

static HOT_PATH: OnceLock<HotPath> = OnceLock::new();

fn hot_path() -> &'static HotPath {
    HOT_PATH.get_or_init(|| HotPath {
        received: counter!(EVENTS_RECEIVED),
        delivered: counter!(EVENTS_DELIVERED),
        replayed: counter!(EVENTS_REPLAYED),
        bytes_sent: counter!(BYTES_SENT),
        latency: histogram!(FANOUT_LATENCY),
    })
}

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle) and
/// registers every series at zero. `None` if another recorder was installed first.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(FANOUT_LATENCY.to_string()), &LATENCY_BUCKETS)
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            describe_all();
            register_all();
            hot_path();
            Some(handle)
        })
        .clone()
}

fn describe_all() {
    describe_gauge!(CONNECTIONS, "Open SSE streams.");
    describe_counter!(CONNECTIONS_OPENED, "SSE streams opened.");
    describe_counter!(CONNECTIONS_CLOSED, "SSE streams closed, by reason.");
    describe_counter!(REQUESTS_REJECTED, "Requests answered with an error status.");
    describe_counter!(EVENTS_RECEIVED, "Messages read from Redis.");
    describe_counter!(
        EVENTS_DELIVERED,
        "Events handed to client sockets, summed over clients."
    );
    describe_counter!(BYTES_SENT, Unit::Bytes, "Bytes handed to client sockets.");
    describe_histogram!(
        FANOUT_LATENCY,
        Unit::Seconds,
        "Time from reading a message from Redis to handing its bytes to a client socket."
    );
    describe_counter!(RESUMES, "Resume attempts (Last-Event-ID), by outcome.");
    describe_counter!(EVENTS_REPLAYED, "Events sent as part of a resume replay.");
    describe_counter!(RESETS, "gateway.reset events sent, by reason.");
    describe_gauge!(REDIS_UP, "1 while the Redis subscription connection is up.");
    describe_gauge!(
        REDIS_SHARDS_KNOWN,
        "Redis shards the gateway knows of (1 unless Redis is a cluster: its slot-owning primaries)."
    );
    describe_gauge!(
        REDIS_SHARDS_UP,
        "Known Redis shards whose subscription connection is up."
    );
    describe_counter!(
        REDIS_RECONNECTS,
        "Redis subscription connections re-established."
    );
    describe_gauge!(REDIS_CHANNELS, "Channels currently subscribed on Redis.");
    describe_counter!(
        CHANNELS_EVICTED,
        "Idle channels freed before their linger ended, to stay within channels.max_total."
    );
    describe_gauge!(HISTORY_EVENTS, "Entries held in all rings.");
    describe_gauge!(
        HISTORY_BYTES,
        Unit::Bytes,
        "Encoded bytes held in all rings."
    );
    describe_counter!(HISTORY_EVICTED, "Ring entries evicted by capacity or age.");
    describe_counter!(PAYLOADS_DROPPED, "Redis payloads not forwarded, by reason.");
    describe_counter!(
        DEAD_LETTERS,
        "Dropped payloads handed to the dead-letter stream, by outcome."
    );
    describe_gauge!(BUILD_INFO, "Build information; always 1.");
    describe_gauge!(TCP_CONNECTIONS, "Open TCP connections, by listener.");
    describe_counter!(
        TCP_REFUSED,
        "TCP connections refused at accept by a connection cap, by listener and reason."
    );
    describe_counter!(
        TCP_EXPIRED,
        "TCP connections closed by a deadline (first request, idle, write stall)."
    );
    describe_counter!(
        PUBLISH_REQUESTS,
        "POST /publish requests answered, by status."
    );
    describe_counter!(
        HISTORY_READS,
        "Reads of a channel's history from Redis (backend = redis), by outcome."
    );
    describe_counter!(
        UPSTREAM_RECOVERED_EVENTS,
        "Events caught up from the Redis history after a subscription gap (backend = redis)."
    );
}

fn register_all() {
    gauge!(CONNECTIONS).set(0.0);
    counter!(CONNECTIONS_OPENED).absolute(0);
    for reason in CloseReason::ALL {
        counter!(CONNECTIONS_CLOSED, "reason" => reason.label()).absolute(0);
    }
    for status in REJECTED_STATUSES {
        counter!(REQUESTS_REJECTED, "status" => status.to_string()).absolute(0);
    }
    counter!(EVENTS_RECEIVED).absolute(0);
    counter!(EVENTS_DELIVERED).absolute(0);
    counter!(BYTES_SENT).absolute(0);
    // Registering the histogram makes it render (with zero counts) before the first event.
    let _ = histogram!(FANOUT_LATENCY);
    for outcome in ResumeOutcome::ALL {
        counter!(RESUMES, "outcome" => outcome.label()).absolute(0);
    }
    counter!(EVENTS_REPLAYED).absolute(0);
    for reason in ResetReason::ALL {
        counter!(RESETS, "reason" => reason.as_str()).absolute(0);
    }
    gauge!(REDIS_UP).set(0.0);
    gauge!(REDIS_SHARDS_KNOWN).set(0.0);
    gauge!(REDIS_SHARDS_UP).set(0.0);
    counter!(REDIS_RECONNECTS).absolute(0);
    gauge!(REDIS_CHANNELS).set(0.0);
    counter!(CHANNELS_EVICTED).absolute(0);
    gauge!(HISTORY_EVENTS).set(0.0);
    gauge!(HISTORY_BYTES).set(0.0);
    counter!(HISTORY_EVICTED).absolute(0);
    for reason in DROP_REASONS {
        counter!(PAYLOADS_DROPPED, "reason" => reason).absolute(0);
    }
    for outcome in DEAD_LETTER_OUTCOMES {
        counter!(DEAD_LETTERS, "outcome" => outcome).absolute(0);
    }
    for listener in LISTENERS {
        gauge!(TCP_CONNECTIONS, "listener" => listener).set(0.0);
        for reason in REFUSAL_REASONS {
            counter!(TCP_REFUSED, "listener" => listener, "reason" => reason).absolute(0);
        }
        for reason in EXPIRY_REASONS {
            counter!(TCP_EXPIRED, "listener" => listener, "reason" => reason).absolute(0);
        }
    }
    for status in PUBLISH_STATUSES {
        counter!(PUBLISH_REQUESTS, "status" => status.to_string()).absolute(0);
    }
    for outcome in HISTORY_READ_OUTCOMES {
        counter!(HISTORY_READS, "outcome" => outcome).absolute(0);
    }
    counter!(UPSTREAM_RECOVERED_EVENTS).absolute(0);
    gauge!(
        BUILD_INFO,
        "version" => env!("CARGO_PKG_VERSION"),
        "commit" => option_env!("SSEHUB_COMMIT").unwrap_or("unknown")
    )
    .set(1.0);
}

/// Runs the exporter's periodic upkeep (histogram maintenance) until the task is dropped.
pub async fn run_upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

// ----- Recording: one function per thing that happens. -----

/// A stream opened.
pub fn stream_opened() {
    counter!(CONNECTIONS_OPENED).increment(1);
    gauge!(CONNECTIONS).increment(1.0);
}

/// A stream closed.
pub fn stream_closed(reason: CloseReason) {
    counter!(CONNECTIONS_CLOSED, "reason" => reason.label()).increment(1);
    gauge!(CONNECTIONS).decrement(1.0);
}

/// A request was answered with an error status.
pub fn request_rejected(status: u16) {
    counter!(REQUESTS_REJECTED, "status" => status.to_string()).increment(1);
}

/// A message arrived from Redis.
pub fn event_received() {
    hot_path().received.increment(1);
}

/// A live event read from Redis at `received_at` was handed to a client socket at `now`.
pub fn event_delivered(received_at: Instant, now: Instant) {
    let hot = hot_path();
    hot.delivered.increment(1);
    hot.latency
        .record(now.saturating_duration_since(received_at).as_secs_f64());
}

/// Bytes handed to a client socket.
pub fn bytes_sent(bytes: usize) {
    hot_path().bytes_sent.increment(bytes as u64);
}

/// An event a resuming client had missed was handed to its socket. It counts as delivered, but
/// not in the fan-out latency histogram: its age is how long the client was away, not how fast
/// the gateway is.
pub fn replayed_event_delivered() {
    let hot = hot_path();
    hot.delivered.increment(1);
    hot.replayed.increment(1);
}

/// A resume's outcome became known (its replay was read, or the client left first).
pub fn resumed(outcome: ResumeOutcome) {
    counter!(RESUMES, "outcome" => outcome.label()).increment(1);
}

/// A `gateway.reset` was sent.
pub fn reset_sent(reason: ResetReason) {
    counter!(RESETS, "reason" => reason.as_str()).increment(1);
}

/// The Redis subscription connection went up or down.
pub fn redis_up(up: bool) {
    gauge!(REDIS_UP).set(if up { 1.0 } else { 0.0 });
}

/// How many Redis shards the gateway knows of, and how many of their subscription connections
/// are up.
pub fn redis_shards(known: usize, up: usize) {
    gauge!(REDIS_SHARDS_KNOWN).set(known as f64);
    gauge!(REDIS_SHARDS_UP).set(up as f64);
}

/// The Redis subscription connection was re-established after a loss.
pub fn redis_reconnected() {
    counter!(REDIS_RECONNECTS).increment(1);
}

/// Current number of subscribed channels.
pub fn redis_channels(count: usize) {
    gauge!(REDIS_CHANNELS).set(count as f64);
}

/// Idle channels were freed early to stay within the channel cap.
pub fn channels_evicted(count: usize) {
    counter!(CHANNELS_EVICTED).increment(count as u64);
}

/// Current size of all rings.
pub fn history_size(events: usize, bytes: usize) {
    gauge!(HISTORY_EVENTS).set(events as f64);
    gauge!(HISTORY_BYTES).set(bytes as f64);
}

/// Ring entries evicted.
pub fn history_evicted(count: usize) {
    if count > 0 {
        counter!(HISTORY_EVICTED).increment(count as u64);
    }
}

/// A TCP connection was accepted and counted.
pub fn tcp_connection_opened(listener: &'static str) {
    gauge!(TCP_CONNECTIONS, "listener" => listener).increment(1.0);
}

/// A counted TCP connection closed.
pub fn tcp_connection_closed(listener: &'static str) {
    gauge!(TCP_CONNECTIONS, "listener" => listener).decrement(1.0);
}

/// A TCP connection was refused at accept.
pub fn tcp_connection_refused(listener: &'static str, reason: &'static str) {
    counter!(TCP_REFUSED, "listener" => listener, "reason" => reason).increment(1);
}

/// A TCP connection was closed by one of its deadlines.
pub fn tcp_connection_expired(listener: &'static str, reason: &'static str) {
    counter!(TCP_EXPIRED, "listener" => listener, "reason" => reason).increment(1);
}

/// A payload was not forwarded.
pub fn payload_dropped(reason: &'static str) {
    counter!(PAYLOADS_DROPPED, "reason" => reason).increment(1);
}

/// `count` dead-letter entries ended with `outcome` (see [`DEAD_LETTER_OUTCOMES`]).
pub fn dead_letters(outcome: &'static str, count: u64) {
    counter!(DEAD_LETTERS, "outcome" => outcome).increment(count);
}

/// A `POST /publish` request was answered with `status`.
pub fn publish_request(status: u16) {
    counter!(PUBLISH_REQUESTS, "status" => status.to_string()).increment(1);
}

/// A channel's history was read from Redis: `ok`, `history_expired`, `unknown_position` or
/// `error`.
pub fn history_read(outcome: &'static str) {
    counter!(HISTORY_READS, "outcome" => outcome).increment(1);
}

/// `count` events were caught up from the Redis history after a subscription gap.
pub fn upstream_recovered_events(count: u64) {
    if count > 0 {
        counter!(UPSTREAM_RECOVERED_EVENTS).increment(count);
    }
}
