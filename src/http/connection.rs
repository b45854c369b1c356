//! One accepted TCP connection, before and around the protocol: the connection caps counted at
//! accept, the refusal a client over a cap gets, and the deadlines every connection lives under.
//!
//! Stream limits ([`super::Admission`]) count SSE streams, but a connection costs a descriptor
//! and memory before it carries any stream, and an HTTP/2 connection may carry none at all. So
//! every listener also caps connections (in total and per client address) the moment they are
//! accepted, before a byte is read, and a watchdog closes connections that do not earn their
//! keep:
//!
//! - **first request**: a connection that has not sent a request within
//!   `limits.header_read_timeout_secs` of being accepted (a silent socket, a bare HTTP/2 preface,
//!   a TLS session that sends nothing after the handshake);
//! - **idle**: a connection with no open stream and no request being answered that received no
//!   request for `limits.idle_timeout_secs` (HTTP/1.1 keep-alive and HTTP/2 alike). Only
//!   requests count, not bytes: HTTP/2 PINGs, SETTINGS or WINDOW_UPDATEs (and TLS records
//!   without data) move bytes both ways at no cost to the client and would otherwise hold a
//!   connection forever;
//! - **write stall**: a connection whose writes found the socket full for
//!   `limits.write_stall_secs` (a client that stopped reading).
//!
//! The watchdog learns of requests from the listener's service ([`Activity::request_received`])
//! and of streams from the streams themselves, and of blocked writes from [`Tracked`], a thin
//! wrapper around the socket, so hyper's connections need no hooks of their own. The HTTP/1.1 fast path owns its
//! socket and applies the write stall itself (`fast_path`).

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::admission::{AddressCounts, AddressSlot};
use crate::metrics;

/// Which cap refused a connection (`reason` label of the refusal counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The listener holds its most connections.
    Total,
    /// The client address holds its most connections.
    PerAddress,
}

impl Refusal {
    fn status(self) -> u16 {
        match self {
            Refusal::Total => 503,
            Refusal::PerAddress => 429,
        }
    }

    fn message(self) -> &'static str {
        match self {
            Refusal::Total => "the gateway is at its connection limit",
            Refusal::PerAddress => "too many open connections from this address",
        }
    }
}

/// Connection caps of one listener, counted at accept.
#[derive(Debug)]
pub(crate) struct ConnectionCaps {
    /// Which listener these caps guard (`listener` label of the connection metrics).
    listener: &'static str,
    capacity: usize,
    total: Arc<Semaphore>,
    per_address: Option<(AddressCounts, usize)>,
    /// Proxies carry many clients on few addresses: they are not capped per address here (the
    /// stream admission caps the forwarded client addresses instead).
    trusted_proxies: Vec<IpAddr>,
    /// Refusals still being written. Bounded, so that refusing a flood cannot itself hold
    /// many descriptors: beyond it a refused connection is closed without an answer.
    refusing: Arc<Semaphore>,
}

/// Most refusals written at once per listener.
pub(crate) const MAX_REFUSALS_IN_FLIGHT: usize = 64;
/// How long a refused connection is kept to let the client read the refusal.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// Proof that an accepted connection was counted; gives its slots back on drop.
#[derive(Debug)]
pub(crate) struct ConnectionSlot {
    listener: &'static str,
    _total: OwnedSemaphorePermit,
    _address: Option<AddressSlot>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        metrics::tcp_connection_closed(self.listener);
    }
}

impl ConnectionCaps {
    /// Caps for `listener`: at most `total` connections, and `per_address` from one address
    /// (`0` = no per-address cap) unless the address is one of `trusted_proxies`.
    pub(crate) fn new(
        listener: &'static str,
        total: usize,
        per_address: usize,
        trusted_proxies: &[IpAddr],
    ) -> ConnectionCaps {
        let capacity = total.min(Semaphore::MAX_PERMITS);
        ConnectionCaps {
            listener,
            capacity,
            total: Arc::new(Semaphore::new(capacity)),
            per_address: (per_address > 0).then(|| (AddressCounts::default(), per_address)),
            trusted_proxies: trusted_proxies.iter().map(IpAddr::to_canonical).collect(),
            refusing: Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT)),
        }
    }

    /// Most connections held at once.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The listener these caps guard.
    pub(crate) fn listener(&self) -> &'static str {
        self.listener
    }

    /// Counts a connection from `peer`, or says which cap refuses it.
    pub(crate) fn admit(&self, peer: IpAddr) -> Result<ConnectionSlot, Refusal> {
        let total = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Total)?;
        let peer = peer.to_canonical();
        let address = match &self.per_address {
            Some((counts, limit)) if !self.trusted_proxies.contains(&peer) => {
                Some(counts.try_take(peer, *limit).ok_or(Refusal::PerAddress)?)
            }
            _ => None,
        };
        metrics::tcp_connection_opened(self.listener);
        Ok(ConnectionSlot {
            listener: self.listener,
            _total: total,
            _address: address,
        })
    }

    /// Answers a refused connection and closes it. A plain-text listener writes a complete
    /// HTTP/1.1 error response (JSON body, `Retry-After`) without reading the request; a TLS
    /// listener just closes (no handshake is spent on a refusal).
    pub(crate) fn refuse(&self, stream: TcpStream, refusal: Refusal, plain_text: bool) {
        metrics::tcp_connection_refused(self.listener, refusal.label());
        let Some(permit) = plain_text
            .then(|| self.refusing.clone().try_acquire_owned().ok())
            .flatten()
        else {
            return;
        };
        tokio::spawn(async move {
            write_refusal(stream, refusal).await;
            drop(permit);
        });
    }
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::Total => "max_connections",
            Refusal::PerAddress => "max_connections_per_ip",
        }
    }
}

async fn write_refusal(stream: TcpStream, refusal: Refusal) {
    use tokio::io::AsyncReadExt;
    let body = serde_json::json!({ "error": refusal.message() }).to_string();
    let status = refusal.status();
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nretry-after: {}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        super::admission::RETRY_AFTER.as_secs(),
        body.len()
    );
    // A fresh socket's send buffer is empty: the whole answer fits without waiting.
    if stream.try_write(response.as_bytes()).is_err() {
        return;
    }
    metrics::request_rejected(status);
    let mut stream = stream;
    // Closing with the client's request unread would reset the connection and could destroy
    // the answer before the client reads it: half-close, then drain what it sent, briefly.
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
    let mut scratch = [0u8; 1024];
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        while matches!(stream.read(&mut scratch).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// The deadlines a connection lives under; see the module docs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnectionDeadlines {
    /// From accept to the first complete request head (also bounds the TLS handshake).
    pub(crate) first_request: Duration,
    /// Without an open stream and without traffic.
    pub(crate) idle: Duration,
    /// Writes blocked on a full socket; `None` = never closed for it.
    pub(crate) write_stall: Option<Duration>,
}

/// How a connection moves, shared by its socket wrapper, its watchdog and its streams.
#[derive(Debug)]
pub(crate) struct Activity {
    accepted_at: Instant,
    /// Requests received on the connection.
    requests: AtomicU64,
    /// Requests whose response is not yet produced: a connection with one is never idle.
    answering: AtomicUsize,
    /// SSE streams open on the connection: a connection with one is never idle.
    open_streams: AtomicUsize,
    /// Milliseconds after `accepted_at` of the last request received, request answered or
    /// stream closed: where the idle time is counted from.
    last_active: AtomicU64,
    /// Milliseconds after `accepted_at` at which a write first found the socket full, plus one;
    /// `0` while writes go through.
    blocked_since: AtomicU64,
    /// Set when the watchdog closes the connection for a write stall, so its streams record
    /// `stalled` as their close reason.
    stalled: AtomicBool,
}

impl Activity {
    /// The activity of a connection accepted at `accepted_at`.
    pub(crate) fn accepted_at(accepted_at: Instant) -> Activity {
        Activity {
            accepted_at,
            requests: AtomicU64::new(0),
            answering: AtomicUsize::new(0),
            open_streams: AtomicUsize::new(0),
            last_active: AtomicU64::new(0),
            blocked_since: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
        }
    }

    /// Counts a request; the connection is not idle until the returned guard is dropped
    /// (when the response is produced).
    pub(crate) fn request_received(self: &Arc<Self>) -> Answering {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.answering.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Answering(self.clone())
    }

    pub(crate) fn stream_opened(&self) {
        self.open_streams.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stream_closed(&self) {
        self.open_streams.fetch_sub(1, Ordering::Relaxed);
        self.touch();
    }

    /// Restarts the idle time.
    fn touch(&self) {
        let now = self.accepted_at.elapsed().as_millis() as u64;
        self.last_active.fetch_max(now, Ordering::Relaxed);
    }

    /// Since when the connection is idle; `None` while it answers a request or carries a
    /// stream.
    fn idle_since(&self) -> Option<Instant> {
        let busy = self.answering.load(Ordering::Relaxed) > 0
            || self.open_streams.load(Ordering::Relaxed) > 0;
        let last_active = Duration::from_millis(self.last_active.load(Ordering::Relaxed));
        (!busy).then(|| self.accepted_at + last_active)
    }

    /// Whether the watchdog closed the connection because its writes stalled.
    pub(crate) fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    fn write_went_through(&self) {
        if self.blocked_since.load(Ordering::Relaxed) != 0 {
            self.blocked_since.store(0, Ordering::Relaxed);
        }
    }

    fn write_blocked(&self) {
        if self.blocked_since.load(Ordering::Relaxed) == 0 {
            let since = self.accepted_at.elapsed().as_millis() as u64 + 1;
            self.blocked_since.store(since, Ordering::Relaxed);
        }
    }

    /// When writes started to block, if they are blocked.
    fn blocked_at(&self) -> Option<Instant> {
        match self.blocked_since.load(Ordering::Relaxed) {
            0 => None,
            since => Some(self.accepted_at + Duration::from_millis(since - 1)),
        }
    }
}

/// A request being answered on a connection (see [`Activity::request_received`]).
#[derive(Debug)]
pub(crate) struct Answering(Arc<Activity>);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.answering.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// Why the watchdog closed a connection (`reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// No request within the first-request deadline.
    NoRequest,
    /// No stream and no traffic for the idle timeout.
    Idle,
    /// Writes blocked for the write-stall limit.
    Stalled,
}

impl Expiry {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Expiry::NoRequest => "first_request_timeout",
            Expiry::Idle => "idle",
            Expiry::Stalled => "stalled",
        }
    }
}

/// Resolves when the connection has outlived one of its deadlines. Sleeps until the earliest
/// moment one could be due, so a busy connection costs a wake-up per deadline period, not per
/// event.
pub(crate) async fn watchdog(activity: &Activity, deadlines: ConnectionDeadlines) -> Expiry {
    loop {
        let now = Instant::now();
        let first_request_due = activity.accepted_at + deadlines.first_request;
        if activity.requests.load(Ordering::Relaxed) == 0 && now >= first_request_due {
            return Expiry::NoRequest;
        }
        if let (Some(limit), Some(blocked_at)) = (deadlines.write_stall, activity.blocked_at()) {
            if now >= blocked_at + limit {
                activity.stalled.store(true, Ordering::Relaxed);
                return Expiry::Stalled;
            }
        }
        let idle_since = activity.idle_since();
        if idle_since.is_some_and(|since| now >= since + deadlines.idle) {
            return Expiry::Idle;
        }
        // While busy, look again one idle period later: a stream open for hours costs a
        // wake-up per period.
        let mut next = idle_since.unwrap_or(now) + deadlines.idle;
        if activity.requests.load(Ordering::Relaxed) == 0 {
            next = next.min(first_request_due);
        }
        if let Some(limit) = deadlines.write_stall {
            // Not blocked now: look again within half the limit, so a stall that starts right
            // after this look is noticed at most half a limit late.
            let stall_due = activity
                .blocked_at()
                .map_or(now + limit / 2, |blocked_at| blocked_at + limit);
            next = next.min(stall_due);
        }
        tokio::time::sleep_until(next.max(now + Duration::from_millis(10))).await;
    }
}

/// A socket that reports its blocked writes to the connection's [`Activity`].
pub(crate) struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Tracked<T> {
    pub(crate) fn new(inner: T, activity: Arc<Activity>) -> Tracked<T> {
        Tracked { inner, activity }
    }

    fn record_write(&self, result: &Poll<io::Result<usize>>) {
        match result {
            Poll::Ready(Ok(n)) if *n > 0 => self.activity.write_went_through(),
            Poll::Pending => self.activity.write_blocked(),
            _ => {}
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.record_write(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.record_write(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_per_address_and_in_total_and_release_on_drop() {
        let caps = ConnectionCaps::new("public", 3, 2, &["10.0.0.9".parse().expect("ip")]);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let first = caps.admit(a).expect("first");
        let _second = caps.admit(a).expect("second");
        assert_eq!(caps.admit(a).err(), Some(Refusal::PerAddress));
        // An IPv4-mapped IPv6 peer is the same address.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert_eq!(caps.admit(mapped).err(), Some(Refusal::PerAddress));
        drop(first);
        let _third = caps.admit(a).expect("released slot");
        // A trusted proxy is not capped per address, only in total.
        let proxy: IpAddr = "10.0.0.9".parse().expect("ip");
        let _proxied = caps.admit(proxy).expect("the third connection");
        assert_eq!(caps.admit(proxy).err(), Some(Refusal::Total));
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_enforces_first_request_idle_and_stall_deadlines() {
        let deadlines = ConnectionDeadlines {
            first_request: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            write_stall: Some(Duration::from_secs(30)),
        };
        let silent = Activity::accepted_at(Instant::now());
        let started = Instant::now();
        assert_eq!(watchdog(&silent, deadlines).await, Expiry::NoRequest);
        assert_eq!(started.elapsed().as_secs(), 10);

        let idle = Arc::new(Activity::accepted_at(Instant::now()));
        drop(idle.request_received());
        let started = Instant::now();
        assert_eq!(watchdog(&idle, deadlines).await, Expiry::Idle);
        assert!((60..=61).contains(&started.elapsed().as_secs()));

        let streaming = Arc::new(Activity::accepted_at(Instant::now()));
        let answering = streaming.request_received();
        streaming.stream_opened();
        drop(answering);
        let watched = streaming.clone();
        let watch = tokio::spawn(async move { watchdog(&watched, deadlines).await });
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(
            !watch.is_finished(),
            "a connection with a stream is never idle"
        );
        let blocked_at = Instant::now();
        streaming.write_blocked();
        assert_eq!(watch.await.ok(), Some(Expiry::Stalled));
        assert!(streaming.stalled());
        assert!(blocked_at.elapsed() <= Duration::from_secs(31));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_counts_from_the_last_answer_or_stream_not_from_traffic() {
        let deadlines = ConnectionDeadlines {
            first_request: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            write_stall: None,
        };
        let activity = Arc::new(Activity::accepted_at(Instant::now()));
        let watched = activity.clone();
        let watch = tokio::spawn(async move { watchdog(&watched, deadlines).await });
        // A request answered slowly (say, waiting for Redis) is not idle time.
        let answering = activity.request_received();
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!watch.is_finished(), "closed while answering");
        drop(answering);
        let answered = Instant::now();
        // Writes that go through (PING answers, say) do not make a connection busy.
        for _ in 0..10 {
            activity.write_went_through();
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        assert_eq!(watch.await.ok(), Some(Expiry::Idle));
        assert!((60..=61).contains(&answered.elapsed().as_secs()));
    }
}
