//! The HTTP/1.1 fast path for `GET /events` on plain TCP.
//!
//! An SSE stream lives for hours and carries small frames, so what a connection costs while it
//! streams is what decides how many clients one process holds. hyper keeps an 8 KiB read buffer
//! and an 8 KiB write buffer per connection for its whole life, which doubles the resident memory
//! of an idle stream. This module therefore reads the request head itself (with `httparse`),
//! and when it is an HTTP/1.1 `GET /events` it runs the same routing as hyper would, writes the
//! response head, and then pumps the stream's frames straight into the socket. Every event is
//! encoded once, as a complete HTTP/1.1 chunk shared by all streams, so a delivery is a single
//! `send` of a buffer already in place (no copy, no per-client framing). Anything else (other
//! paths and methods, HTTP/1.0, HTTP/2 prior knowledge, malformed or oversized heads) is handed
//! to hyper together with the bytes already read, so behaviour there is hyper's.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Wake, Waker};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Version};
use http_body_util::Either;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;

use super::stream::EventStream;
use super::{ApiError, EventsEndpoint, Peer};

/// Most request headers parsed, as in hyper; more is answered `431`.
const MAX_HEADERS: usize = 100;
/// First read size for the request head; grows up to `limits.max_header_bytes`.
const INITIAL_HEAD_BUFFER: usize = 1024;
/// Most chunks queued for one vectored write.
const MAX_CHUNKS_PER_WRITE: usize = 64;
/// Bytes after which no further chunk is queued for one write: with large events, 64 chunks
/// would hold a stalled client's frames (and so history the ring evicts) in this queue.
const MAX_BYTES_PER_WRITE: usize = 64 * 1024;
/// What an HTTP/2 connection with prior knowledge starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the start of a connection turned out to be.
pub(crate) enum Sniffed {
    /// An HTTP/1.1 `GET /events`, parsed, for the fast path.
    Events(Box<Request<()>>),
    /// Anything else well-formed (HTTP/2, other requests): the bytes read so far, to be
    /// replayed to hyper.
    Other(Bytes),
    /// A head that is not HTTP or is too large: answered with this error, then closed.
    Malformed(ApiError),
    /// The client closed before sending a complete head: drop the connection.
    Gone,
}

/// Reads the first request head (bounded in size; the caller bounds it in time) and decides who
/// serves the connection. `fast_events` says whether `GET /events` may take the fast path.
pub(crate) async fn sniff<S: AsyncRead + Unpin>(
    stream: &mut S,
    peer: std::net::SocketAddr,
    max_head: usize,
    fast_events: bool,
) -> Sniffed {
    let mut buffer = BytesMut::with_capacity(INITIAL_HEAD_BUFFER);
    loop {
        match parse_head(&buffer, peer, fast_events) {
            Parsed::Events(request) => return Sniffed::Events(request),
            Parsed::Other => return Sniffed::Other(buffer.split().freeze()),
            Parsed::Malformed(error) => return Sniffed::Malformed(error),
            Parsed::Partial if buffer.len() >= max_head => {
                return Sniffed::Malformed(ApiError::HeaderTooLarge);
            }
            Parsed::Partial => {}
        }
        buffer.reserve(INITIAL_HEAD_BUFFER.min(max_head - buffer.len()).max(1));
        match tokio::io::AsyncReadExt::read_buf(stream, &mut buffer).await {
            Ok(0) | Err(_) => return Sniffed::Gone,
            Ok(_) => {}
        }
    }
}

/// For fuzzing: what [`sniff`] decides for a connection starting with `bytes`. A fast-path
/// request also goes through query parsing, as routing would.
pub(crate) fn classify(bytes: &[u8]) -> &'static str {
    let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 1));
    match parse_head(bytes, peer, true) {
        Parsed::Events(request) => match super::events::parse_query(request.uri().query(), 16) {
            Ok(_) => "events",
            Err(_) => "events: bad query",
        },
        Parsed::Other => "hyper",
        Parsed::Malformed(ApiError::HeaderTooLarge) => "431",
        Parsed::Malformed(_) => "400",
        Parsed::Partial => "partial",
    }
}

enum Parsed {
    Events(Box<Request<()>>),
    Other,
    Malformed(ApiError),
    Partial,
}

fn parse_head(bytes: &[u8], peer: std::net::SocketAddr, fast_events: bool) -> Parsed {
    if bytes.is_empty() {
        return Parsed::Partial;
    }
    if bytes.starts_with(H2_PREFACE) {
        return Parsed::Other;
    }
    if H2_PREFACE.starts_with(bytes) {
        return Parsed::Partial;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    match head.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Malformed(ApiError::HeaderTooLarge);
        }
        Err(e) => {
            return Parsed::Malformed(ApiError::BadRequest(format!("malformed request: {e}")));
        }
    }
    let is_events = fast_events
        && head.method == Some("GET")
        && head.version == Some(1)
        && head
            .path
            .is_some_and(|p| p.split('?').next() == Some("/events"));
    if !is_events {
        return Parsed::Other;
    }
    let mut builder = Request::builder()
        .method(http::Method::GET)
        .uri(head.path.unwrap_or("/events"))
        .version(Version::HTTP_11);
    for header in head.headers.iter() {
        builder = builder.header(header.name, header.value);
    }
    let peer = Peer {
        addr: peer,
        activity: None,
    };
    match builder.extension(peer).body(()) {
        Ok(request) => Parsed::Events(Box::new(request)),
        // Header bytes `http` refuses: hyper gives the proper error.
        Err(_) => Parsed::Other,
    }
}

/// Serves one `GET /events` on the connection, then closes it. `write_stall` closes a stream
/// whose writes stay blocked that long.
pub(crate) async fn serve(
    mut stream: TcpStream,
    request: Request<()>,
    endpoint: Arc<EventsEndpoint>,
    write_stall: Option<Duration>,
) {
    // Boxed so the routing future's state does not stay in this task for the stream's life.
    let response = match Box::pin(super::route_public(endpoint, request)).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    let result = match body {
        Either::Right(mut events) => {
            let head = encode_head(&parts, Framing::Chunked);
            // The response's header map would otherwise live as long as the stream.
            drop(parts);
            match stream.write_all(&head).await {
                Ok(()) => pump(&mut stream, &mut events, write_stall).await,
                Err(e) => Err(e),
            }
        }
        Either::Left(full) => write_fixed(&mut stream, &parts, full).await,
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "stream connection ended with an error");
    }
    let _ = stream.shutdown().await;
}

/// Answers a connection whose first head could not be served with `error`, then closes it.
pub(crate) async fn answer<S: AsyncWrite + Unpin>(stream: &mut S, error: ApiError) {
    let (parts, body) = error.into_response().into_parts();
    if let Either::Left(full) = body {
        let _ = write_fixed(stream, &parts, full).await;
    }
    let _ = stream.shutdown().await;
}

/// Writes a complete response with a fixed body, announcing that the connection closes.
async fn write_fixed<S: AsyncWrite + Unpin>(
    stream: &mut S,
    parts: &http::response::Parts,
    body: http_body_util::Full<Bytes>,
) -> io::Result<()> {
    let body = match http_body_util::BodyExt::collect(body).await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    let mut head = encode_head(parts, Framing::Length(body.len()));
    head.extend_from_slice(&body);
    stream.write_all(&head).await
}

/// How the response body is delimited.
enum Framing {
    Chunked,
    /// A fixed body, after which the connection closes.
    Length(usize),
}

fn encode_head(parts: &http::response::Parts, framing: Framing) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    let reason = parts.status.canonical_reason().unwrap_or("");
    head.extend_from_slice(format!("HTTP/1.1 {} {reason}\r\n", parts.status.as_u16()).as_bytes());
    for (name, value) in &parts.headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    // As hyper does on the other path (RFC 9110 asks origin servers with a clock for it).
    if !parts.headers.contains_key(http::header::DATE) {
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        head.extend_from_slice(format!("date: {date}\r\n").as_bytes());
    }
    match framing {
        Framing::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n"),
        Framing::Length(length) => head.extend_from_slice(
            format!("content-length: {length}\r\nconnection: close\r\n\r\n").as_bytes(),
        ),
    }
    head
}

/// Writes the stream's frames into the socket as HTTP/1.1 chunks until the stream ends (then
/// writes the last chunk), the client goes away, or writes stay blocked for `write_stall` (the
/// stream then closes as `stalled`).
async fn pump(
    stream: &mut TcpStream,
    events: &mut EventStream,
    write_stall: Option<Duration>,
) -> io::Result<()> {
    let mut out = Outgoing::default();
    let mut client = ClientWatch::new();
    let mut stall = StallWatch::new(write_stall);
    let result =
        poll_fn(|cx| pump_once(cx, stream, events, &mut out, &mut client, &mut stall)).await;
    if stall.fired {
        events.close_as(crate::metrics::CloseReason::Stalled);
    }
    result
}

/// Closes a stream whose writes find the socket full for too long. The timer is armed once per
/// blocked episode, not per write: a reader that keeps up costs no timer operation.
struct StallWatch {
    limit: Option<Duration>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    blocked: bool,
    fired: bool,
}

impl StallWatch {
    fn new(limit: Option<Duration>) -> StallWatch {
        StallWatch {
            limit,
            timer: None,
            blocked: false,
            fired: false,
        }
    }

    /// Writes went through.
    fn flowing(&mut self) {
        self.blocked = false;
    }

    /// Writes are blocked; true once they have been for the whole limit.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(limit) = self.limit else {
            return false;
        };
        if !self.blocked {
            self.blocked = true;
            let deadline = tokio::time::Instant::now() + limit;
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        self.fired = self
            .timer
            .as_mut()
            .is_some_and(|timer| timer.as_mut().poll(cx).is_ready());
        self.fired
    }
}

/// Chunks handed to the socket but not yet written: shared buffers, never copied.
#[derive(Default)]
struct Outgoing {
    chunks: VecDeque<Bytes>,
    /// The last chunk has been queued: once written, the response is complete.
    ending: bool,
}

impl Outgoing {
    fn advance(&mut self, mut written: usize) {
        while written > 0 {
            let Some(front) = self.chunks.front_mut() else {
                return;
            };
            if written >= front.len() {
                written -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(written);
                written = 0;
            }
        }
    }

    /// Writes as much as the socket takes: one `send` for the usual single chunk, one
    /// `sendmsg` when several are queued.
    fn poll_write(&mut self, cx: &mut Context<'_>, stream: &TcpStream) -> Poll<io::Result<()>> {
        while !self.chunks.is_empty() {
            let written = ready!(poll_send(cx, stream, |socket| {
                if let (1, Some(single)) = (self.chunks.len(), self.chunks.front()) {
                    return socket.send(single);
                }
                let slices: Vec<IoSlice<'_>> = self
                    .chunks
                    .iter()
                    .take(MAX_CHUNKS_PER_WRITE)
                    .map(|chunk| IoSlice::new(chunk))
                    .collect();
                socket.send_vectored(&slices)
            }))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(written);
        }
        Poll::Ready(Ok(()))
    }
}

/// Sends on the socket when it is writable; `Pending` (waker registered) while it is full.
/// `send` rather than `write`: the socket layer directly, without the file-write path.
fn poll_send(
    cx: &mut Context<'_>,
    stream: &TcpStream,
    mut send: impl FnMut(SockRef<'_>) -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_write_ready(cx))?;
        match stream.try_io(Interest::WRITABLE, || send(SockRef::from(stream))) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => return Poll::Ready(result),
        }
    }
}

fn pump_once(
    cx: &mut Context<'_>,
    stream: &mut TcpStream,
    events: &mut EventStream,
    out: &mut Outgoing,
    client: &mut ClientWatch,
    stall: &mut StallWatch,
) -> Poll<io::Result<()>> {
    loop {
        if client.gone(cx, stream) {
            return Poll::Ready(Ok(()));
        }
        // Backpressure: while the socket is full, take no more frames from the stream.
        match out.poll_write(cx, stream) {
            Poll::Ready(written) => {
                written?;
                stall.flowing();
            }
            Poll::Pending if stall.expired(cx) => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client stopped reading (limits.write_stall_secs)",
                )));
            }
            Poll::Pending => return Poll::Pending,
        }
        if out.ending {
            return Poll::Ready(Ok(()));
        }
        // The queue is empty here: `poll_write` wrote everything.
        let mut queued = 0;
        while out.chunks.len() < MAX_CHUNKS_PER_WRITE && queued < MAX_BYTES_PER_WRITE {
            match events.poll_wire_frame(cx) {
                Poll::Ready(Some(frame)) => {
                    let chunk = frame.into_http1_chunk();
                    queued += chunk.len();
                    out.chunks.push_back(chunk);
                }
                Poll::Ready(None) => {
                    out.chunks.push_back(Bytes::from_static(b"0\r\n\r\n"));
                    out.ending = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        if out.chunks.is_empty() {
            return Poll::Pending;
        }
    }
}

/// Notices when the client closes its side, without checking the socket on every wake-up.
///
/// Checking means polling for read readiness, which registers the task under the socket's lock.
/// Instead the read side is registered once with a waker of our own that raises a flag and wakes
/// the task; the socket is read only after that flag was raised.
struct ClientWatch {
    signal: Arc<ReadSignal>,
    /// `signal` as a waker, for the read-readiness registration.
    signal_waker: Waker,
    /// The task waker last handed to `signal`, to skip re-registering an unchanged one.
    task_waker: Option<Waker>,
}

/// Raised by the socket's read readiness; wakes the task that owns the connection.
#[derive(Default)]
struct ReadSignal {
    readable: AtomicBool,
    task: AtomicWaker,
}

impl Wake for ReadSignal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.readable.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl ClientWatch {
    fn new() -> ClientWatch {
        // Raised at the start: the first poll registers the read side.
        let signal = Arc::new(ReadSignal {
            readable: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        ClientWatch {
            signal_waker: Waker::from(signal.clone()),
            signal,
            task_waker: None,
        }
    }

    /// Whether the client closed its side (or the connection failed). Bytes it sends are
    /// discarded: a stream takes no further requests.
    fn gone(&mut self, cx: &mut Context<'_>, stream: &mut TcpStream) -> bool {
        if !self
            .task_waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            self.signal.task.register(cx.waker());
            self.task_waker = Some(cx.waker().clone());
        }
        if !self.signal.readable.swap(false, Ordering::Acquire) {
            return false;
        }
        let mut signal_cx = Context::from_waker(&self.signal_waker);
        let mut scratch = [0u8; 64];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut *stream).poll_read(&mut signal_cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return true,
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(_)) => return true,
                Poll::Pending => return false,
            }
        }
    }
}

/// A connection whose first bytes were already read: replays them, then reads on.
pub(crate) struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub(crate) fn new(prefix: Bytes, inner: T) -> Rewind<T> {
        Rewind { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
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

    fn peer() -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], 1))
    }

    #[test]
    fn only_http11_get_events_takes_the_fast_path() {
        let events = b"GET /events?channel=a HTTP/1.1\r\nHost: x\r\nLast-Event-ID: e-1\r\n\r\n";
        match parse_head(events, peer(), true) {
            Parsed::Events(request) => {
                assert_eq!(request.uri().query(), Some("channel=a"));
                assert_eq!(request.headers()["last-event-id"], "e-1");
                assert!(request.extensions().get::<Peer>().is_some());
            }
            _ => panic!("expected the fast path"),
        }
        for other in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"POST /events HTTP/1.1\r\n\r\n",
            b"GET /events HTTP/1.0\r\n\r\n",
            b"OPTIONS /events HTTP/1.1\r\n\r\n",
            b"GET /eventsX HTTP/1.1\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(other, peer(), true), Parsed::Other),
                "{other:?}"
            );
        }
        assert!(matches!(parse_head(events, peer(), false), Parsed::Other));
        for partial in [&b"GET /events HTTP/1.1\r\nHost"[..], b"PRI * HTTP/2"] {
            assert!(matches!(parse_head(partial, peer(), true), Parsed::Partial));
        }
    }

    #[test]
    fn heads_that_are_not_http_are_malformed() {
        for garbage in [
            &b"\x16\x03\x01garbage\r\n\r\n"[..],
            b"GET /\r\n\r\n",
            b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
            b"GET /\0 HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(
                    parse_head(garbage, peer(), true),
                    Parsed::Malformed(ApiError::BadRequest(_))
                ),
                "{garbage:?}"
            );
        }
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(
            parse_head(&many, peer(), true),
            Parsed::Malformed(ApiError::HeaderTooLarge)
        ));
    }

    #[test]
    fn partial_writes_resume_inside_a_chunk() {
        let mut out = Outgoing::default();
        out.chunks.push_back(Bytes::from_static(b"3\r\nabc\r\n"));
        out.chunks.push_back(Bytes::from_static(b"2\r\nde\r\n"));
        out.advance(3);
        assert_eq!(
            out.chunks.front().map(|b| b.as_ref()),
            Some(&b"abc\r\n"[..])
        );
        out.advance(5);
        assert_eq!(
            out.chunks.front().map(|b| b.as_ref()),
            Some(&b"2\r\nde\r\n"[..])
        );
        out.advance(7);
        assert!(out.chunks.is_empty());
    }
}
