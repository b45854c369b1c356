//! ssehub: a gateway that turns Redis pub/sub into Server-Sent Events for browsers.
//!
//! # Layout
//!
//! - [`config`]: the `Settings` tree, read from `config.toml` and `SSEHUB__*` variables.
//! - [`channels`]: channel names and the glob patterns that make channels public.
//! - [`upstream`]: the task that owns the Redis subscription connection and its reconnects
//!   (and, with `history.backend = "redis"`, the reads of the shared history in Redis).
//! - [`functions`]: the `ssehub` Redis Function library, where the shared history's ids are
//!   assigned, and its key layout.
//! - [`hub`]: every served channel with its ring (live fan-out buffer and resume history).
//! - [`sse`]: the wire encoding (events, resets, heartbeats, ids).
//! - [`position`]: the redis backend's positions and the ids made of them.
//! - `http`: the public `/events` listener (an HTTP/1.1 fast path that writes SSE chunks straight
//!   to the socket, hyper for everything else: HTTP/2, TLS, other routes), the admin listener,
//!   CORS, admission limits, graceful shutdown.
//! - [`auth`]: JWT verification and channel grants.
//! - [`metrics`]: every Prometheus series, named in one place.
//! - [`publisher`]: `POST /publish`'s way into Redis (either history backend).
//! - [`dead_letter`]: the stream where payloads the gateway drops are kept, and correlation ids.
//! - [`schemas`]: the per-channel JSON Schemas (`[[schemas]]`) payloads are checked against.
//! - [`position`]: stream positions (ids) of the redis backend.
//!
//! Data flows one way: Redis → upstream → hub (sequence, encode once, append) → each stream
//! reads from the rings at its own cursor → socket.
//!
//! [`run`] is the one entry point: `main.rs` calls it with the configured listeners and the
//! process signals; tests call it with listeners on port 0 and their own shutdown future. It is
//! [`Gateway::start`] (every fallible set-up step) followed by [`Gateway::serve`] (supervision of
//! the long-lived tasks until shutdown or failure).

// Stricter than the workspace's `deny` (which bench/ loosens at one audited call).
#![forbid(unsafe_code)]

pub mod auth;
pub mod channels;
pub mod config;
pub mod dead_letter;
pub mod functions;
mod http;
pub mod hub;
pub mod metrics;
pub mod position;
pub mod publisher;
pub mod schemas;
pub mod sse;
pub mod topology;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Settings;

/// How long the admin listener waits for its own connections at exit.
const ADMIN_GRACE: Duration = Duration::from_secs(1);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} (configuration key `{key}`): {source}")]
    Bind {
        /// The configuration key holding the address.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The bound sockets the gateway serves on.
#[derive(Debug)]
pub struct Listeners {
    /// Public SSE listener (`server.listen`).
    pub public: TcpListener,
    /// Admin listener (`admin.listen`).
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the addresses from `settings`. Async although nothing is awaited: the sockets are
    /// registered with the runtime's reactor, so this must run inside one.
    pub async fn bind(settings: &Settings) -> Result<Listeners, StartError> {
        let bind = |key: &'static str, addr: SocketAddr| {
            listen(addr).map_err(|source| StartError::Bind { key, addr, source })
        };
        Ok(Listeners {
            public: bind("server.listen", settings.server.listen)?,
            admin: bind("admin.listen", settings.admin.listen)?,
        })
    }
}

/// Pending connections the kernel queues before `accept`; capped by `net.core.somaxconn`. A
/// fleet of clients reconnecting at once (an instance restart behind a load balancer) overflows
/// the default of 1,024, and every overflowed SYN costs its client a retransmission second.
const LISTEN_BACKLOG: u32 = 16_384;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std and tokio do: a restarted gateway can bind while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Entry points for fuzzing request handling without a network (`fuzz/`). Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    use std::sync::OnceLock;

    /// Parses and authorizes a request the way `GET /events` does, against a gateway configured
    /// with public `news:*`, an HS256 secret and `user:{sub}` channels. Returns the 4xx message
    /// or the resume position.
    pub fn inspect_request(
        query: Option<&str>,
        headers: &http::HeaderMap,
    ) -> Result<Option<u64>, String> {
        static FIXTURE: OnceLock<Option<(crate::auth::Authorizer, crate::sse::Epoch)>> =
            OnceLock::new();
        let fixture = FIXTURE.get_or_init(|| {
            let public = crate::channels::PublicChannels::new(&["news:*".to_string()]).ok()?;
            let settings = crate::config::AuthSettings {
                jwt_secret: serde_json::from_value(serde_json::json!("fuzz-secret")).ok(),
                user_channel: Some("user:{sub}".to_string()),
                ..Default::default()
            };
            let authorizer = crate::auth::Authorizer::new(public, &settings).ok()?;
            Some((authorizer, crate::sse::Epoch::random()))
        });
        let Some((authorizer, epoch)) = fixture else {
            return Err("fuzz fixture failed to build".to_string());
        };
        crate::http::inspect_request(authorizer, epoch, 16, query, headers)
    }

    /// The HS256 secret of [`authorize_token`]'s gateway, for targets that sign what they fuzz
    /// so that validation past the signature is reached.
    pub const TOKEN_SECRET: &str = "fuzz-token-secret-of-at-least-32-bytes";

    /// Verifies `token` and authorizes `channels` with it, against a gateway configured with an
    /// HS256 secret ([`TOKEN_SECRET`]), issuer `fuzz-issuer`, audience `fuzz-audience`, a
    /// leeway of 60 s, public `news:*` and `user:{sub}` channels. Returns whether it was
    /// accepted, or the 4xx message.
    pub fn authorize_token(token: &str, channels: &[String]) -> Result<(), String> {
        static AUTHORIZER: OnceLock<Option<crate::auth::Authorizer>> = OnceLock::new();
        let authorizer = AUTHORIZER.get_or_init(|| {
            let public = crate::channels::PublicChannels::new(&["news:*".to_string()]).ok()?;
            let settings = crate::config::AuthSettings {
                jwt_secret: serde_json::from_value(serde_json::json!(TOKEN_SECRET)).ok(),
                user_channel: Some("user:{sub}".to_string()),
                issuer: Some("fuzz-issuer".to_string()),
                audience: Some("fuzz-audience".to_string()),
                leeway_secs: 60,
                ..Default::default()
            };
            crate::auth::Authorizer::new(public, &settings).ok()
        });
        let Some(authorizer) = authorizer else {
            return Err("fuzz fixture failed to build".to_string());
        };
        let mut headers = http::HeaderMap::new();
        let bearer = http::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|e| format!("not a header value: {e}"))?;
        headers.insert(http::header::AUTHORIZATION, bearer);
        authorizer
            .authorize(&headers, None, channels)
            .map(|_| ())
            .map_err(|denied| denied.to_string())
    }

    /// Classifies the first bytes of a connection the way every plain-text connection is
    /// classified before it is served (fast path, hyper, an error answer, or more bytes needed),
    /// and for a fast-path request runs the routing that follows. Returns what was decided.
    pub fn classify_head(bytes: &[u8]) -> &'static str {
        crate::http::classify_head(bytes)
    }
}

/// Asks the admin listener at `admin` for `/healthz`; `Ok` when it answers `200`. A listener on
/// an unspecified address (`0.0.0.0`) is probed on loopback.
pub fn probe_health(admin: SocketAddr, timeout: Duration) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut target = admin;
    if target.ip().is_unspecified() {
        target.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut stream = std::net::TcpStream::connect_timeout(&target, timeout)
        .map_err(|e| format!("{target}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 16];
    let read = stream.read(&mut head).map_err(|e| e.to_string())?;
    let status_line = String::from_utf8_lossy(&head[..read]);
    if status_line.starts_with("HTTP/1.0 200") || status_line.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!("unexpected answer: {status_line:?}"))
    }
}

/// Why the gateway stopped other than by a requested shutdown.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// It could not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// A long-lived task ended or panicked while the gateway ran; it drained and stopped.
    #[error("the {task} task failed: {cause}")]
    TaskFailed {
        /// Which task.
        task: &'static str,
        /// Its panic message, or that it ended when it should not have.
        cause: String,
    },
}

/// A running gateway: every fallible step of start-up done, its long-lived tasks spawned and
/// supervised.
///
/// [`Gateway::serve`] waits for the shutdown signal or for any supervised task to end, whichever
/// comes first. A task that ends on its own (or panics) is a failure: it is logged with its
/// cause, `/readyz` answers `503`, the streams drain as for a shutdown, and `serve` returns
/// [`RunError::TaskFailed`], so the process exits non-zero and its orchestrator restarts it.
pub struct Gateway {
    settings: Arc<Settings>,
    hub: Arc<hub::Hub>,
    /// Stops the public listener and the upstream task.
    stop: CancellationToken,
    /// Stops the admin listener, after the public one has drained.
    admin_stop: CancellationToken,
    /// Tells open streams to send their final `retry:` and end.
    drain: Arc<hub::Drain>,
    /// Set to the failed task's name; `/readyz` reports it.
    failure: Arc<std::sync::OnceLock<&'static str>>,
    public_server: Supervised,
    upstream: Supervised,
    admin_server: Supervised,
    others: Vec<Supervised>,
}

impl Gateway {
    /// Validates `settings`, builds everything that can fail, and starts serving on `listeners`.
    pub async fn start(settings: Settings, listeners: Listeners) -> Result<Gateway, StartError> {
        let settings = Arc::new(settings.validated()?);
        let invalid = |key, message| config::ConfigError::Invalid { key, message };
        let redis_key = match settings.redis.mode {
            config::RedisMode::Standalone => "redis.url",
            _ => "redis.nodes",
        };
        let topology =
            topology::Topology::new(&settings.redis).map_err(|e| invalid(redis_key, e))?;
        let public = channels::PublicChannels::new(&settings.channels.public)
            .map_err(|e| invalid("channels.public", e))?;
        let authorizer = auth::Authorizer::new(public, &settings.auth)?;
        let schemas = Arc::new(schemas::Schemas::compile(&settings.schemas)?);
        let mut public_options = http::ServeOptions::public(&settings)?;
        let admin_options = http::ServeOptions::admin(&settings.limits);

        let metrics_handle = metrics::install();
        log_settings(&settings, public_options.connection_cap());
        let (hub, subscribe_requests) = hub::Hub::new(hub::HubSettings {
            schemas: schemas.clone(),
            ..hub::HubSettings::from(&*settings)
        });
        let (dead_letters, dead_letter_writer) =
            dead_letter::DeadLetters::new(&settings, topology.clone());
        hub.set_dead_letters(dead_letters);
        let stop = CancellationToken::new();
        topology.start_watching(stop.clone());
        let drain = Arc::new(hub::Drain::default());
        let upstream = Supervised::spawn(
            "upstream",
            upstream::run(
                topology.clone(),
                hub.clone(),
                subscribe_requests,
                settings.redis.clone(),
                (settings.history.backend == config::HistoryBackend::Redis)
                    .then(|| functions::LibraryBounds::from_settings(&settings)),
                stop.clone(),
            ),
        );
        let events = Arc::new(http::EventsEndpoint {
            hub: hub.clone(),
            authorizer,
            cors: http::Cors::new(
                &settings.server.cors_origins,
                settings.server.cors_credentials,
            ),
            admission: http::Admission::new(&settings.limits),
            settings: settings.clone(),
            drain: drain.clone(),
            publisher: publisher::Publisher::new(topology.clone(), &settings),
            schemas,
        });
        if settings.server.http1_fast_path {
            public_options.fast_events = Some(events.clone());
        }
        let public_server = Supervised::spawn(
            "public listener",
            http::serve(
                listeners.public,
                events,
                http::route_public,
                public_options,
                stop.clone(),
                settings.shutdown_grace(),
            ),
        );
        // The admin listener outlives the public one, so probes keep answering while draining.
        let admin_stop = CancellationToken::new();
        let failure = Arc::new(std::sync::OnceLock::new());
        let admin = Arc::new(http::AdminEndpoint {
            hub: hub.clone(),
            redis_mode: settings.redis.mode,
            draining: stop.clone(),
            failure: failure.clone(),
            metrics: metrics_handle.clone(),
        });
        let admin_server = Supervised::spawn(
            "admin listener",
            http::serve(
                listeners.admin,
                admin,
                http::route_admin,
                admin_options,
                admin_stop.clone(),
                ADMIN_GRACE,
            ),
        );
        let mut others: Vec<Supervised> = metrics_handle
            .map(|h| Supervised::spawn("metrics upkeep", metrics::run_upkeep(h)))
            .into_iter()
            .collect();
        if let Some(writer) = dead_letter_writer {
            others.push(Supervised::spawn("dead-letter writer", writer));
        }
        tracing::info!(
            listen = %settings.server.listen,
            admin = %settings.admin.listen,
            epoch = %hub.epoch(),
            "ssehub started"
        );
        Ok(Gateway {
            settings,
            hub,
            stop,
            admin_stop,
            drain,
            failure,
            public_server,
            upstream,
            admin_server,
            others,
        })
    }

    /// Supervises one more long-lived task (an embedder's own, or a test's): if it ends or
    /// panics before shutdown, the gateway fails as for one of its own.
    pub fn supervise(&mut self, name: &'static str, task: tokio::task::JoinHandle<()>) {
        self.others.push(Supervised::new(name, task));
    }

    /// Serves until `shutdown` resolves or a supervised task fails, then drains within
    /// `server.shutdown_grace_secs`.
    pub async fn serve(mut self, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
        let failed = {
            let mut tasks = self.all_tasks();
            tokio::select! {
                () = shutdown => None,
                failed = first_to_end(&mut tasks) => Some(failed),
            }
        };
        match &failed {
            None => tracing::info!("shutdown requested: ending streams"),
            Some((task, cause)) => {
                let _ = self.failure.set(task);
                tracing::error!(task, %cause, "a long-lived task failed: draining and exiting");
            }
        }
        self.stop.cancel();
        self.drain.start();
        // The listener drains within the grace period; the upstream stops at once.
        let grace = self.settings.shutdown_grace() + ADMIN_GRACE;
        self.public_server.finish(grace).await;
        self.upstream.finish(grace).await;
        self.admin_stop.cancel();
        self.admin_server.finish(ADMIN_GRACE * 2).await;
        for task in &self.others {
            task.handle.abort();
        }
        tracing::info!(epoch = %self.hub.epoch(), "ssehub stopped");
        match failed {
            None => Ok(()),
            Some((task, cause)) => Err(RunError::TaskFailed { task, cause }),
        }
    }

    fn all_tasks(&mut self) -> Vec<&mut Supervised> {
        let mut tasks = vec![
            &mut self.public_server,
            &mut self.upstream,
            &mut self.admin_server,
        ];
        tasks.extend(self.others.iter_mut());
        tasks
    }
}

/// Runs the gateway until `shutdown` resolves, then drains within `server.shutdown_grace_secs`.
/// See [`Gateway`] for what happens when one of its tasks fails instead.
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    Gateway::start(settings, listeners)
        .await?
        .serve(shutdown)
        .await
}

/// A long-lived task and whether it has been seen to end.
struct Supervised {
    name: &'static str,
    handle: tokio::task::JoinHandle<()>,
    ended: bool,
}

impl Supervised {
    fn new(name: &'static str, handle: tokio::task::JoinHandle<()>) -> Supervised {
        Supervised {
            name,
            handle,
            ended: false,
        }
    }

    fn spawn(name: &'static str, task: impl Future<Output = ()> + Send + 'static) -> Supervised {
        Supervised::new(name, tokio::spawn(task))
    }

    /// Polls for the task's end: its name and why it ended.
    fn poll_end(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<(&'static str, String)> {
        if self.ended {
            return std::task::Poll::Pending;
        }
        let result = std::task::ready!(std::pin::Pin::new(&mut self.handle).poll(cx));
        self.ended = true;
        let cause = match result {
            Ok(()) => "it ended although the gateway was not shutting down".to_string(),
            Err(e) if e.is_panic() => panic_message(e.into_panic()),
            Err(e) => e.to_string(),
        };
        std::task::Poll::Ready((self.name, cause))
    }

    /// Waits up to `within` for the task to end after its stop signal, then aborts it.
    async fn finish(&mut self, within: Duration) {
        if self.ended {
            return;
        }
        if tokio::time::timeout(within, &mut self.handle)
            .await
            .is_err()
        {
            tracing::warn!(task = self.name, "did not stop in time; aborted");
            self.handle.abort();
        }
        self.ended = true;
    }
}

/// Resolves when the first of `tasks` ends.
async fn first_to_end(tasks: &mut [&mut Supervised]) -> (&'static str, String) {
    std::future::poll_fn(|cx| {
        for task in tasks.iter_mut() {
            if let std::task::Poll::Ready(ended) = task.poll_end(cx) {
                return std::task::Poll::Ready(ended);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// The text of a panic payload.
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(message) => format!("panicked: {message}"),
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(message) => format!("panicked: {message}"),
            Err(_) => "panicked".to_string(),
        },
    }
}

/// Logs the effective configuration at start-up, with the Redis password masked.
fn log_settings(settings: &Settings, connection_cap: usize) {
    tracing::info!(
        server.listen = %settings.server.listen,
        admin.listen = %settings.admin.listen,
        redis = %topology::Topology::describe(&settings.redis),
        sse.heartbeat_secs = settings.sse.heartbeat_secs,
        sse.retry_ms = settings.sse.retry_ms,
        sse.event_type_field = %settings.sse.event_type_field,
        history.capacity = settings.history.capacity,
        history.max_age_secs = settings.history.max_age_secs,
        history.linger_secs = settings.history.linger_secs,
        channels.public = ?settings.channels.public,
        channels.max_per_connection = settings.channels.max_per_connection,
        dead_letter.stream = %settings.dead_letter.stream,
        public_connections = connection_cap,
        "configuration (public_connections: the cap of the public listener, within the descriptor limit)"
    );
}
