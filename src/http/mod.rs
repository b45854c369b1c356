//! HTTP: the public SSE listener, the admin listener, and the accept loop both share.
//!
//! Errors become responses in one place ([`ApiError`]): a status and a JSON body
//! `{"error": "..."}`. Shutdown happens in three steps: stop accepting, let the SSE streams end
//! (they watch the same cancellation token), then wait for connections under a deadline.

mod admin;
mod admission;
mod connection;
mod cors;
mod events;
mod fast_path;
mod forwarded;
mod publish;
mod stream;
mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Denied;

pub(crate) use admin::AdminEndpoint;
pub(crate) use admission::Admission;
pub(crate) use cors::Cors;

/// The TCP peer of a request and its connection's activity, attached as a request extension
/// by the listener.
#[derive(Clone, Debug)]
pub(crate) struct Peer {
    pub(crate) addr: std::net::SocketAddr,
    /// `None` on the fast path, which watches its own connection.
    pub(crate) activity: Option<Arc<connection::Activity>>,
}
pub(crate) use events::{inspect_request, EventsEndpoint};

/// Body of every response: a fixed JSON document or an SSE stream.
pub(crate) type ResponseBody = Either<Full<Bytes>, stream::EventStream>;

/// A request that cannot be served, mapped to its status in [`ApiError::into_response`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// Malformed request: `400`.
    #[error("{0}")]
    BadRequest(String),
    /// No valid credentials for what was asked: `401` with `WWW-Authenticate: Bearer`.
    #[error("{0}")]
    Unauthorized(String),
    /// Not allowed: `403`.
    #[error("{0}")]
    Forbidden(String),
    /// No such endpoint: `404`.
    #[error("not found")]
    NotFound,
    /// Wrong method on a `GET` endpoint: `405` with `Allow: GET`.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Wrong method on `POST /publish`: `405` with `Allow: POST`.
    #[error("method not allowed")]
    MethodNotAllowedUsePost,
    /// Temporarily unable to serve (upstream down): `503` with `Retry-After`.
    #[error("{0}")]
    Unavailable(String),
    /// At a connection or connection-rate limit: `503` with `Retry-After`.
    #[error("{0}")]
    Overloaded(String),
    /// Too many streams from one client address: `429` with `Retry-After`.
    #[error("{0}")]
    TooManyRequests(String),
    /// The request head is larger than `limits.max_header_bytes`: `431`.
    #[error("the request head is too large (limits.max_header_bytes)")]
    HeaderTooLarge,
    /// The request body is larger than a payload limit: `413`.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The request body is not UTF-8 (an SSE `data:` field must be text): `422`.
    #[error("the payload is not UTF-8")]
    NotUtf8,
    /// The request body is not JSON, or not valid against its channel's schema: `422`, the
    /// violations listed in the body's `errors`.
    #[error("the payload does not match the channel's JSON Schema")]
    SchemaInvalid(Vec<crate::schemas::Violation>),
}

/// A token that was refused answers `401` (none or invalid) or `403` (no grant) on every endpoint.
impl From<Denied> for ApiError {
    fn from(denied: Denied) -> ApiError {
        match denied {
            Denied::Unauthenticated(message) => ApiError::Unauthorized(message),
            Denied::Forbidden(message) => ApiError::Forbidden(message),
        }
    }
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed | ApiError::MethodNotAllowedUsePost => {
                StatusCode::METHOD_NOT_ALLOWED
            }
            ApiError::Unavailable(_) | ApiError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotUtf8 | ApiError::SchemaInvalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }

    pub(crate) fn into_response(self) -> Response<ResponseBody> {
        let status = self.status();
        crate::metrics::request_rejected(status.as_u16());
        let body = match &self {
            ApiError::SchemaInvalid(violations) => {
                serde_json::json!({ "error": self.to_string(), "errors": violations })
            }
            _ => serde_json::json!({ "error": self.to_string() }),
        };
        let mut response = json_response(status, &body);
        match self {
            ApiError::MethodNotAllowed => {
                response
                    .headers_mut()
                    .insert(ALLOW, HeaderValue::from_static("GET"));
            }
            ApiError::MethodNotAllowedUsePost => {
                response
                    .headers_mut()
                    .insert(ALLOW, HeaderValue::from_static("POST"));
            }
            ApiError::Unavailable(_) | ApiError::Overloaded(_) | ApiError::TooManyRequests(_) => {
                let seconds = admission::RETRY_AFTER.as_secs().to_string();
                if let Ok(value) = HeaderValue::from_str(&seconds) {
                    response.headers_mut().insert(RETRY_AFTER, value);
                }
            }
            ApiError::Unauthorized(_) => {
                response
                    .headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

/// A response with a JSON body.
pub(crate) fn json_response(
    status: StatusCode,
    body: &serde_json::Value,
) -> Response<ResponseBody> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(body.to_string()))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Routes of the public listener.
pub(crate) async fn route_public<B: publish::PublishBody>(
    endpoint: Arc<EventsEndpoint>,
    request: Request<B>,
) -> Result<Response<ResponseBody>, Infallible> {
    let path = request.uri().path().to_string();
    // Only the Origin is needed after the request is consumed (for CORS headers).
    let origin = request.headers().get(http::header::ORIGIN).cloned();
    let result = match (path.as_str(), request.method()) {
        ("/events", &Method::GET) => endpoint.handle(request).await,
        ("/events", &Method::OPTIONS) => Ok(endpoint.cors.preflight(origin.as_ref())),
        ("/", &Method::GET) if endpoint.settings.server.demo_page => Ok(demo_page()),
        ("/events", _) => Err(ApiError::MethodNotAllowed),
        ("/publish", _) => Ok(publish::handle(&endpoint, request).await),
        _ => Err(ApiError::NotFound),
    };
    let mut response = result.unwrap_or_else(|error| {
        log_rejection(&path, &error);
        error.into_response()
    });
    if response.status() != StatusCode::NO_CONTENT {
        endpoint.cors.decorate(origin.as_ref(), &mut response);
    }
    Ok(response)
}

/// The self-contained demo page served at `/` (`server.demo_page`).
fn demo_page() -> Response<ResponseBody> {
    const PAGE: &str = include_str!("demo.html");
    let mut response = Response::new(Either::Left(Full::new(Bytes::from_static(PAGE.as_bytes()))));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

/// Routes of the admin listener.
pub(crate) async fn route_admin(
    endpoint: Arc<AdminEndpoint>,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let result = match (request.uri().path(), request.method()) {
        ("/healthz", &Method::GET) => Ok(endpoint.healthz()),
        ("/readyz", &Method::GET) => Ok(endpoint.readyz()),
        ("/metrics", &Method::GET) => Ok(endpoint.metrics()),
        ("/healthz" | "/readyz" | "/metrics", _) => Err(ApiError::MethodNotAllowed),
        _ => Err(ApiError::NotFound),
    };
    Ok(result.unwrap_or_else(ApiError::into_response))
}

/// Logs a rejected request at debug level, at most once per second (a flood of bad requests must
/// not flood the log). Only the path is logged: query strings may carry tokens.
fn log_rejection(path: &str, error: &ApiError) {
    static LAST_LOGGED_SECOND: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if LAST_LOGGED_SECOND.swap(second, Ordering::Relaxed) == second {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let suppressed = SUPPRESSED.swap(0, Ordering::Relaxed);
    let shown: String = path.chars().take(128).collect();
    tracing::debug!(path = %shown, status = error.status().as_u16(), %error, suppressed, "request rejected");
}

/// How a listener serves its connections: caps, deadlines, protocol limits and optional TLS.
pub(crate) struct ServeOptions {
    /// Connection caps, counted at accept.
    pub(crate) caps: connection::ConnectionCaps,
    /// First-request, idle and write-stall deadlines.
    pub(crate) deadlines: connection::ConnectionDeadlines,
    /// Largest request head.
    pub(crate) max_header_bytes: usize,
    /// Terminates TLS when set.
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    /// Serves plain-TCP HTTP/1.1 `GET /events` without hyper when set (see `fast_path`).
    pub(crate) fast_events: Option<Arc<EventsEndpoint>>,
    builder: auto::Builder<TokioExecutor>,
}

/// For fuzzing: what the listener decides for a connection starting with `bytes`.
pub(crate) fn classify_head(bytes: &[u8]) -> &'static str {
    fast_path::classify(bytes)
}

/// Most connections the admin listener holds: enough for probes and scrapers, and part of the
/// descriptors kept back from the public listener, so the admin listener always answers.
pub(crate) const ADMIN_MAX_CONNECTIONS: usize = 64;
/// Descriptors kept back from the public listener's connections: the admin listener's, the
/// refusals being written, plus the Redis connection, the listeners, the runtime and logging.
const DESCRIPTOR_RESERVE: usize = ADMIN_MAX_CONNECTIONS + connection::MAX_REFUSALS_IN_FLIGHT + 64;

impl ServeOptions {
    /// Options of the public listener, from `[limits]` and `[server]`.
    pub(crate) fn public(
        settings: &crate::config::Settings,
    ) -> Result<ServeOptions, crate::config::ConfigError> {
        let limits = &settings.limits;
        let caps = connection::ConnectionCaps::new(
            "public",
            public_connection_cap(limits.max_connections),
            limits.max_connections_per_ip,
            &limits.trusted_proxies,
        );
        let tls = settings
            .server
            .tls
            .as_ref()
            .map(tls::acceptor)
            .transpose()?;
        Ok(ServeOptions::new(caps, limits, tls))
    }

    /// Options of the admin listener: the same deadlines and head limits as the public one,
    /// and a small connection cap of its own.
    pub(crate) fn admin(limits: &crate::config::LimitsSettings) -> ServeOptions {
        let caps = connection::ConnectionCaps::new("admin", ADMIN_MAX_CONNECTIONS, 0, &[]);
        ServeOptions::new(caps, limits, None)
    }

    fn new(
        caps: connection::ConnectionCaps,
        limits: &crate::config::LimitsSettings,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> ServeOptions {
        let header_read_timeout = Duration::from_secs(limits.header_read_timeout_secs);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // Timeouts need a timer, or hyper panics on the first connection.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .max_buf_size(limits.max_header_bytes);
        // Every HTTP/2 protection is set here rather than left to hyper's defaults, which may
        // change between releases: a header list (and so the CONTINUATION frames h2 accepts
        // for one) bounded by `limits.max_header_bytes`, and the limits below.
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
            .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESET_STREAMS);
        ServeOptions {
            caps,
            deadlines: connection::ConnectionDeadlines {
                first_request: header_read_timeout,
                idle: Duration::from_secs(limits.idle_timeout_secs),
                write_stall: (limits.write_stall_secs > 0)
                    .then(|| Duration::from_secs(limits.write_stall_secs)),
            },
            max_header_bytes: limits.max_header_bytes,
            tls,
            fast_events: None,
            builder,
        }
    }

    fn listener(&self) -> &'static str {
        self.caps.listener()
    }

    /// Most connections the listener holds at once.
    pub(crate) fn connection_cap(&self) -> usize {
        self.caps.capacity()
    }
}

/// Most streams open at once on one HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS); more
/// are refused with REFUSED_STREAM. Each costs h2 state and, for `/events`, a stream: far more
/// than a browser opens (one per EventSource of an origin), while `limits.max_connections_per_ip`
/// and `limits.max_connections` still cap the streams a client holds in total.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Streams the client may reset before hyper accepts them before the connection is closed
/// with GOAWAY ENHANCE_YOUR_CALM: the rapid-reset attack (CVE-2023-44487) opens and cancels
/// streams faster than the server can serve them, so that each costs work but none counts
/// against SETTINGS_MAX_CONCURRENT_STREAMS. A real client cancels an EventSource it just
/// opened rarely; h2's own default, made explicit.
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams the server may reset because of the client's protocol errors before the connection
/// is closed (the "MadeYouReset" variant of rapid reset, CVE-2025-8671); hyper's default.
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// Connections the public listener may hold: `limits.max_connections`, but never more than the
/// process's descriptor limit minus [`DESCRIPTOR_RESERVE`]: past that, `accept` would fail
/// for the admin listener and Redis too.
pub(crate) fn public_connection_cap(max_connections: usize) -> usize {
    let descriptors =
        rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(u64::MAX, |(soft, _hard)| soft);
    let budget = usize::try_from(descriptors)
        .unwrap_or(usize::MAX)
        .saturating_sub(DESCRIPTOR_RESERVE)
        .max(1);
    if max_connections == 0 {
        budget
    } else {
        max_connections.min(budget)
    }
}

/// Accepts connections on `listener` and serves each (HTTP/1.1, h2c, TLS; the fast path for
/// `GET /events` when enabled) until `stop` is cancelled; then waits up to `grace` for open
/// connections to finish.
pub(crate) async fn serve<E, F, Fut>(
    listener: TcpListener,
    endpoint: Arc<E>,
    handle: F,
    options: ServeOptions,
    stop: CancellationToken,
    grace: Duration,
) where
    E: Send + Sync + 'static,
    F: Fn(Arc<E>, Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<ResponseBody>, Infallible>> + Send + 'static,
{
    let options = Arc::new(options);
    let graceful = GracefulShutdown::new();
    // Every connection's task, for the drain; hyper's are also watched by `graceful`.
    let connections = tokio_util::task::TaskTracker::new();
    let local = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_per_connection_error(&e) => continue,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on the error.
                tracing::error!(error = %e, "accept failed; pausing accepts for 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // Counted before any protocol work: a client over a cap costs no more than this.
        let slot = match options.caps.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                options.caps.refuse(stream, refusal, options.tls.is_none());
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let accepted = Accepted {
            peer,
            at: tokio::time::Instant::now(),
            _slot: slot,
        };
        let server = HyperServer {
            options: options.clone(),
            endpoint: endpoint.clone(),
            handle,
            watcher: graceful.watcher(),
        };
        tokio::spawn(connections.track_future(serve_connection(stream, accepted, server)));
    }
    drop(listener);
    connections.close();
    let open = connections.len();
    let drained = async {
        tokio::join!(graceful.shutdown(), connections.wait());
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            ?local,
            open,
            "shutdown grace period expired; closing remaining connections"
        );
    }
}

/// A counted connection: who, since when, and its slots under the caps.
struct Accepted {
    peer: std::net::SocketAddr,
    at: tokio::time::Instant,
    _slot: connection::ConnectionSlot,
}

/// Everything needed to hand a connection to hyper.
struct HyperServer<E, F> {
    options: Arc<ServeOptions>,
    endpoint: Arc<E>,
    handle: F,
    watcher: hyper_util::server::graceful::Watcher,
}

/// Serves one accepted connection: its first request head decides who serves it (the fast
/// path, hyper, or an error answer); TLS is terminated first where configured.
async fn serve_connection<E, F, Fut>(
    mut stream: tokio::net::TcpStream,
    accepted: Accepted,
    server: HyperServer<E, F>,
) where
    E: Send + Sync + 'static,
    F: Fn(Arc<E>, Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<ResponseBody>, Infallible>> + Send + 'static,
{
    let options = server.options.clone();
    if let Some(acceptor) = options.tls.clone() {
        // Boxed: the TLS and hyper state would otherwise size every fast-path task too.
        return Box::pin(serve_tls(stream, acceptor, accepted, server)).await;
    }
    let deadline = accepted.at + options.deadlines.first_request;
    let fast = options.fast_events.is_some();
    let head = fast_path::sniff(&mut stream, accepted.peer, options.max_header_bytes, fast);
    let Ok(sniffed) = tokio::time::timeout_at(deadline, head).await else {
        // A client that trickles its head (slowloris) or sends nothing is cut off.
        return metrics_expired(&options, connection::Expiry::NoRequest);
    };
    match sniffed {
        fast_path::Sniffed::Events(request) => {
            if let Some(events) = options.fast_events.clone() {
                let stall = options.deadlines.write_stall;
                fast_path::serve(stream, *request, events, stall).await;
            }
        }
        fast_path::Sniffed::Other(prefix) => {
            let activity = Arc::new(connection::Activity::accepted_at(accepted.at));
            let io = connection::Tracked::new(stream, activity.clone());
            let io = fast_path::Rewind::new(prefix, io);
            // Boxed: hyper's connection state is large, and inline it would size the task of
            // every fast-path stream too.
            Box::pin(server.serve(io, accepted.peer, activity)).await;
        }
        fast_path::Sniffed::Malformed(error) => fast_path::answer(&mut stream, error).await,
        fast_path::Sniffed::Gone => {}
    }
}

/// The TLS variant of [`serve_connection`]: handshake and first head both within the
/// first-request deadline, then hyper (HTTP/2 or HTTP/1.1, as ALPN chose).
async fn serve_tls<E, F, Fut>(
    stream: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    accepted: Accepted,
    server: HyperServer<E, F>,
) where
    E: Send + Sync + 'static,
    F: Fn(Arc<E>, Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<ResponseBody>, Infallible>> + Send + 'static,
{
    let options = server.options.clone();
    let activity = Arc::new(connection::Activity::accepted_at(accepted.at));
    let deadline = accepted.at + options.deadlines.first_request;
    let handshake_and_head = async {
        let tracked = connection::Tracked::new(stream, activity.clone());
        let mut tls = match acceptor.accept(tracked).await {
            Ok(tls) => tls,
            Err(e) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                return None;
            }
        };
        let sniffed =
            fast_path::sniff(&mut tls, accepted.peer, options.max_header_bytes, false).await;
        Some((tls, sniffed))
    };
    match tokio::time::timeout_at(deadline, handshake_and_head).await {
        Err(_) => metrics_expired(&options, connection::Expiry::NoRequest),
        Ok(None | Some((_, fast_path::Sniffed::Gone))) => {}
        Ok(Some((mut tls, fast_path::Sniffed::Malformed(error)))) => {
            fast_path::answer(&mut tls, error).await;
        }
        Ok(Some((tls, fast_path::Sniffed::Other(prefix)))) => {
            let io = fast_path::Rewind::new(prefix, tls);
            server.serve(io, accepted.peer, activity).await;
        }
        // Not asked for: the fast path is for plain TCP only.
        Ok(Some((_, fast_path::Sniffed::Events(_)))) => {}
    }
}

fn metrics_expired(options: &ServeOptions, expiry: connection::Expiry) {
    crate::metrics::tcp_connection_expired(options.listener(), expiry.label());
}

impl<E, F, Fut> HyperServer<E, F>
where
    E: Send + Sync + 'static,
    F: Fn(Arc<E>, Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<ResponseBody>, Infallible>> + Send + 'static,
{
    /// Serves the connection with hyper until it ends, is drained, or outlives a deadline.
    async fn serve<IO>(
        self,
        io: IO,
        peer: std::net::SocketAddr,
        activity: Arc<connection::Activity>,
    ) where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (endpoint, handle) = (self.endpoint, self.handle);
        let peer = Peer {
            addr: peer,
            activity: Some(activity.clone()),
        };
        let service = service_fn(move |mut request: Request<Incoming>| {
            let answering = peer.activity.as_ref().map(|a| a.request_received());
            request.extensions_mut().insert(peer.clone());
            let response = handle(endpoint.clone(), request);
            async move {
                // Not idle while the response is being produced (e.g. waiting for Redis).
                let response = response.await;
                drop(answering);
                response
            }
        });
        let connection = self
            .options
            .builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        let connection = self.watcher.watch(connection);
        tokio::select! {
            result = connection => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            }
            expiry = connection::watchdog(&activity, self.options.deadlines) => {
                tracing::debug!(reason = expiry.label(), "closing a connection past its deadline");
                metrics_expired(&self.options, expiry);
            }
        }
    }
}

fn is_per_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    )
}
