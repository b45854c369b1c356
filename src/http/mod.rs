//! HTTP: the public SSE listener, the admin listener, and the accept loop both share.
//!
//! Errors become responses in one place ([`ApiError`]): a status and a JSON body
//! `{"error": "..."}`. Shutdown happens in three steps: stop accepting, let the SSE streams end
//! (they watch the same cancellation token), then wait for connections under a deadline.

mod admin;
mod admission;
mod cors;
mod events;
mod fast_path;
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

pub(crate) use admin::AdminEndpoint;
pub(crate) use admission::Admission;
pub(crate) use cors::Cors;

/// The TCP peer of a request, attached as a request extension by the accept loop.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Peer(pub(crate) std::net::SocketAddr);
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
    /// Wrong method: `405`.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Temporarily unable to serve (upstream down): `503` with `Retry-After`.
    #[error("{0}")]
    Unavailable(String),
    /// At a connection or connection-rate limit: `503` with `Retry-After`.
    #[error("{0}")]
    Overloaded(String),
    /// Too many streams from one client address: `429` with `Retry-After`.
    #[error("{0}")]
    TooManyRequests(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unavailable(_) | ApiError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    pub(crate) fn into_response(self) -> Response<ResponseBody> {
        let status = self.status();
        crate::metrics::request_rejected(status.as_u16());
        let body = serde_json::json!({ "error": self.to_string() });
        let mut response = json_response(status, &body);
        match self {
            ApiError::MethodNotAllowed => {
                response
                    .headers_mut()
                    .insert(ALLOW, HeaderValue::from_static("GET"));
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
pub(crate) async fn route_public<B>(
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

/// How a listener serves its connections: protocol limits and optional TLS.
#[derive(Clone)]
pub(crate) struct ServeOptions {
    /// Time a client gets to send a complete request head (slowloris protection); also bounds
    /// the TLS handshake.
    pub(crate) header_read_timeout: Duration,
    /// Largest request head accepted.
    pub(crate) max_header_bytes: usize,
    /// Terminates TLS when set.
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    /// Serves plain-TCP HTTP/1.1 `GET /events` without hyper when set (see `fast_path`).
    pub(crate) fast_events: Option<Arc<EventsEndpoint>>,
}

impl ServeOptions {
    /// Options from `[limits]` and `[server.tls]`.
    pub(crate) fn from_settings(
        limits: &crate::config::LimitsSettings,
        tls: Option<&crate::config::TlsSettings>,
    ) -> Result<ServeOptions, crate::config::ConfigError> {
        Ok(ServeOptions {
            header_read_timeout: Duration::from_secs(limits.header_read_timeout_secs),
            max_header_bytes: limits.max_header_bytes,
            tls: tls.map(tls::acceptor).transpose()?,
            fast_events: None,
        })
    }

    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // Timeouts need a timer, or hyper panics on the first connection.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .max_buf_size(self.max_header_bytes);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(self.max_header_bytes).unwrap_or(u32::MAX));
        builder
    }
}

/// Accepts connections on `listener` and serves each with `handle` (HTTP/1.1 and h2c) until
/// `stop` is cancelled; then waits up to `grace` for open connections to finish.
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
    let builder = options.builder();
    let graceful = GracefulShutdown::new();
    // Fast-path streams are not hyper connections: they are tracked here for the drain.
    let streams = tokio_util::task::TaskTracker::new();
    let local = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_per_connection_error(&e) => continue,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on the error.
                tracing::error!(error = %e, "accept failed; pausing accepts for 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let (stream, peer) = stream;
        let _ = stream.set_nodelay(true);
        let endpoint = endpoint.clone();
        let service = service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(Peer(peer));
            handle(endpoint.clone(), request)
        });
        let Some(acceptor) = options.tls.clone() else {
            let Some(events) = options.fast_events.clone() else {
                let connection = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
                continue;
            };
            let (builder, watcher) = (builder.clone(), graceful.watcher());
            let (timeout, max_head) = (options.header_read_timeout, options.max_header_bytes);
            tokio::spawn(streams.track_future(async move {
                let mut stream = stream;
                match fast_path::sniff(&mut stream, peer, timeout, max_head).await {
                    fast_path::Sniffed::Events(request) => {
                        fast_path::serve(stream, *request, events).await;
                    }
                    fast_path::Sniffed::Other(prefix) => {
                        let io = TokioIo::new(fast_path::Rewind::new(prefix, stream));
                        let connection = builder.serve_connection(io, service).into_owned();
                        // Boxed: hyper's connection state is large, and inline it would size
                        // the task of every fast-path stream too.
                        if let Err(e) = Box::pin(watcher.watch(connection)).await {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    }
                    fast_path::Sniffed::Gone => {}
                }
            }));
            continue;
        };
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        let handshake_timeout = options.header_read_timeout;
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!("TLS handshake timed out"),
            };
            let connection = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    streams.close();
    let open = graceful.count() + streams.len();
    let drained = async {
        tokio::join!(graceful.shutdown(), streams.wait());
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            ?local,
            open,
            "shutdown grace period expired; closing remaining connections"
        );
    }
}

fn is_per_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    )
}
