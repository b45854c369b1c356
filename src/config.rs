//! Configuration: one [`Settings`] tree read from `config.toml` plus `SSEHUB__<SECTION>__<KEY>`
//! environment overrides, validated once at start-up.
//!
//! Every error names the key it is about, so an operator can fix a bad deploy from the log line
//! alone. Defaults live here as named constants and are mirrored in the shipped `config.toml`
//! and the README.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::channels::Pattern;

/// Default address of the public SSE listener.
pub const DEFAULT_SERVER_LISTEN: &str = "0.0.0.0:8080";
/// Longest accepted duration setting: one year, in seconds.
pub const MAX_DURATION_SECS: u64 = 365 * 24 * 3600;
/// Shortest HS256 secret start-up accepts without a warning: the hash's output size
/// (RFC 7518 §3.2).
pub const MIN_HS256_SECRET_BYTES: usize = 32;
/// Default address of the admin listener (health, readiness, metrics).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// Default Redis URL.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Default seconds between heartbeat comments on an idle stream.
pub const DEFAULT_HEARTBEAT_SECS: u64 = 15;
/// Upper bound on `server.worker_threads`: beyond it a typo, not a machine.
pub const MAX_WORKER_THREADS: usize = 1024;
/// Default reconnection delay sent to clients in `retry:`.
pub const DEFAULT_RETRY_MS: u64 = 3000;
/// Default JSON field that names the SSE event type.
pub const DEFAULT_EVENT_TYPE_FIELD: &str = "type";
/// Default number of events kept per channel.
pub const DEFAULT_HISTORY_CAPACITY: usize = 1000;
/// Default maximum age of kept events.
pub const DEFAULT_HISTORY_MAX_AGE_SECS: u64 = 300;
/// Default time a channel stays subscribed after its last client left.
pub const DEFAULT_HISTORY_LINGER_SECS: u64 = 300;
/// Default maximum number of channels on one connection.
pub const DEFAULT_MAX_CHANNELS_PER_CONNECTION: usize = 16;
/// Default maximum number of channels held at once (subscribed, pending or lingering).
pub const DEFAULT_MAX_CHANNELS_TOTAL: usize = 100_000;
/// Default time open streams get to end on shutdown.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 10;

/// Default spread of the final `retry:` sent on shutdown.
pub const DEFAULT_SHUTDOWN_RETRY_JITTER_MS: u64 = 5000;
/// Default clock-skew leeway for JWT `exp`/`nbf`.
pub const DEFAULT_AUTH_LEEWAY_SECS: u64 = 30;
/// Default name of the token cookie.
pub const DEFAULT_AUTH_COOKIE: &str = "ssehub_token";
/// Default time a client gets to send its request headers.
pub const DEFAULT_HEADER_READ_TIMEOUT_SECS: u64 = 10;
/// Default time a connection without an open stream may stay silent.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 60;
/// Default time a stream's writes may stay blocked on a full socket before it is closed.
pub const DEFAULT_WRITE_STALL_SECS: u64 = 60;
/// Default largest request head.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Smallest accepted `limits.max_header_bytes`: hyper's HTTP/1.1 parser cannot work with a
/// smaller read buffer (it panics inside the listener), so smaller values are refused at start-up.
pub const MIN_MAX_HEADER_BYTES: usize = 8192;
/// Default largest forwarded Redis payload.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
/// Default time a repeated `Idempotency-Key` of `POST /publish` answers like the first.
pub const DEFAULT_IDEMPOTENCY_WINDOW_SECS: u64 = 300;
/// Default dead-letter stream: none (dead-lettering off).
pub const DEFAULT_DEAD_LETTER_STREAM: &str = "";
/// Default approximate length the dead-letter stream is trimmed to.
pub const DEFAULT_DEAD_LETTER_MAX_LEN: u64 = 10_000;
/// Default time one dropped message is written at most once across the fleet.
pub const DEFAULT_DEAD_LETTER_DEDUPE_SECS: u64 = 60;
/// Default JSON field (or dotted path) of a payload's correlation id.
pub const DEFAULT_CORRELATION_ID_FIELD: &str = "correlationId";

/// Environment variable prefix: `SSEHUB__REDIS__URL` overrides `[redis] url`.
pub const ENV_PREFIX: &str = "SSEHUB";

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or the environment could not be read or parsed (unknown key, wrong type, ...).
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// A value from an environment variable could not be used; names the variable.
    #[error("configuration from the environment variable {variable}: {message}")]
    Environment {
        /// The `SSEHUB__...` variable at fault.
        variable: String,
        /// What is wrong with it.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("configuration key `{key}`: {message}")]
    Invalid {
        /// Dotted key, e.g. `history.capacity`.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A value in one table of an array of tables parsed but is not acceptable.
    #[error("configuration key `{key}`: {message}")]
    InvalidEntry {
        /// The key with the table's index (from 0), e.g. `schemas[1].file`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// `[server]`: the public SSE listener.
    pub server: ServerSettings,
    /// `[admin]`: health, readiness and metrics listener.
    pub admin: AdminSettings,
    /// `[redis]`: the upstream.
    pub redis: RedisSettings,
    /// `[sse]`: wire behaviour.
    pub sse: SseSettings,
    /// `[history]`: per-channel rings.
    pub history: HistorySettings,
    /// `[channels]`: which channels may be read and how many at once.
    pub channels: ChannelSettings,
    /// `[log]`: log output.
    pub log: LogSettings,
    /// `[auth]`: JWT channel authorization.
    pub auth: AuthSettings,
    /// `[limits]`: protection against overload and abuse.
    pub limits: LimitsSettings,
    /// `[publish]`: the HTTP publish API.
    pub publish: PublishSettings,
    /// `[dead_letter]`: where undeliverable payloads are kept.
    pub dead_letter: DeadLetterSettings,
    /// `[[schemas]]`: JSON Schemas that payloads of matching channels must validate against.
    pub schemas: Vec<SchemaSettings>,
}

/// `[server]`
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Address the SSE endpoint listens on.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// Seconds open streams and connections get to finish after a shutdown signal.
    pub shutdown_grace_secs: u64,
    /// On shutdown each stream gets a final `retry:` drawn uniformly from
    /// `[sse.retry_ms, sse.retry_ms + shutdown_retry_jitter_ms]`, so clients spread their
    /// reconnects instead of stampeding the remaining instances.
    pub shutdown_retry_jitter_ms: u64,
    /// Serve the demo page at `/`.
    pub demo_page: bool,
    /// Threads running connections: `0` = one per CPU core the process may use.
    pub worker_threads: usize,
    /// Serve plain-TCP HTTP/1.1 `GET /events` on the fast path (own head parser and socket
    /// writer) instead of hyper. `false` is an escape hatch: every request then goes to hyper.
    pub http1_fast_path: bool,
    /// Origins (exact `scheme://host[:port]`) allowed to read streams cross-origin; `*` = any.
    pub cors_origins: Vec<String>,
    /// Whether cross-origin requests may carry credentials (cookies).
    pub cors_credentials: bool,
    /// `[server.tls]`: serve HTTPS (HTTP/1.1 and HTTP/2 via ALPN) when set.
    pub tls: Option<TlsSettings>,
}

/// `[server.tls]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// A secret value: deserialized like a string, never printed.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// `[auth]`
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// HS256 shared secret (prefer the environment: `SSEHUB__AUTH__JWT_SECRET`).
    pub jwt_secret: Option<Secret>,
    /// File holding the HS256 secret (trailing newline ignored).
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM public key: RSA (RS256) or EC P-256 (ES256).
    pub jwt_public_key_file: Option<PathBuf>,
    /// Required `aud` claim, when set.
    pub audience: Option<String>,
    /// Required `iss` claim, when set.
    pub issuer: Option<String>,
    /// Clock skew tolerated on `exp`/`nbf`; an open stream ends at `exp` plus this.
    pub leeway_secs: u64,
    /// Cookie carrying the token for same-site browsers.
    pub cookie_name: String,
    /// Personal channel a token may always read, `{sub}` replaced by its `sub` claim.
    pub user_channel: Option<String>,
}

impl AuthSettings {
    /// The HS256 secret from `jwt_secret` or `jwt_secret_file`, if configured.
    pub fn secret(&self) -> Result<Option<String>, ConfigError> {
        match (&self.jwt_secret, &self.jwt_secret_file) {
            (Some(_), Some(_)) => Err(invalid(
                "auth.jwt_secret",
                "set either auth.jwt_secret or auth.jwt_secret_file, not both".to_string(),
            )),
            (Some(secret), None) => non_empty("auth.jwt_secret", secret.expose().to_string()),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| {
                    let message = format!("cannot read {}: {e}", path.display());
                    invalid("auth.jwt_secret_file", message)
                })
                .and_then(|s| {
                    let secret = s.trim_end_matches(['\r', '\n']).to_string();
                    non_empty("auth.jwt_secret_file", secret)
                }),
            (None, None) => Ok(None),
        }
    }
}

/// A list of IP addresses where empty entries are skipped, so that an empty environment value
/// (`SSEHUB__LIMITS__TRUSTED_PROXIES=`) means "none", as for the other list keys.
fn ip_list<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<IpAddr>, D::Error> {
    let entries: Vec<String> = Vec::deserialize(deserializer)?;
    entries
        .iter()
        .map(|entry| entry.trim())
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            entry
                .parse()
                .map_err(|_| serde::de::Error::custom(format!("`{entry}` is not an IP address")))
        })
        .collect()
}

/// An `ip:port` address, with the value shown when it is not one.
fn socket_addr<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.trim().parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "`{text}` is not an address of the form ip:port (e.g. 0.0.0.0:8080 or [::]:8080)"
        ))
    })
}

fn non_empty(key: &'static str, secret: String) -> Result<Option<String>, ConfigError> {
    if secret.is_empty() {
        return Err(invalid(key, "the secret is empty".to_string()));
    }
    Ok(Some(secret))
}

/// `[limits]`
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSettings {
    /// Most open streams; more get `503` with `Retry-After`. `0` = no limit.
    pub max_connections: usize,
    /// Most open streams per client address; more get `429`. `0` = no limit.
    pub max_connections_per_ip: usize,
    /// Proxies whose forwarding header is believed (exact addresses).
    #[serde(deserialize_with = "ip_list")]
    pub trusted_proxies: Vec<IpAddr>,
    /// The header trusted proxies name the client in.
    pub forwarded_header: ForwardedHeader,
    /// Seconds a client gets to send its request headers (slowloris protection).
    pub header_read_timeout_secs: u64,
    /// Largest accepted request head, in bytes.
    pub max_header_bytes: usize,
    /// Largest Redis payload forwarded; larger ones are dropped and counted.
    pub max_payload_bytes: usize,
    /// New streams accepted per second (reconnect storms); more get `503`. `0` = no limit.
    pub max_new_connections_per_sec: u32,
    /// Seconds a connection with no open stream and no request being answered may go without
    /// a new request before it is closed (HTTP/1.1 keep-alive, HTTP/2, TLS); traffic without
    /// requests (HTTP/2 PINGs) does not count.
    pub idle_timeout_secs: u64,
    /// Seconds a connection's writes may find the socket full (a client that stopped reading)
    /// before it is closed. `0` = never.
    pub write_stall_secs: u64,
}

/// The header a trusted proxy's client address is read from (`limits.forwarded_header`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2`.
    #[default]
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    /// `Forwarded: for=client, for="[2001:db8::1]:4711"` (RFC 7239).
    #[serde(rename = "forwarded")]
    Forwarded,
}

/// `[admin]`
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
}

/// `[redis]`
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// How Redis is deployed: one server, a Sentinel-managed primary, or a Cluster.
    pub mode: RedisMode,
    /// `redis://[user:password@]host:port[/db]`, `rediss://...` for TLS, or
    /// `unix:///path/to/redis.sock`. With `mode = "sentinel"` it says how to reach the primary
    /// (scheme, credentials, database); its host and port are replaced by the address the
    /// sentinels report.
    pub url: String,
    /// `mode = "cluster"`: seed nodes. `mode = "sentinel"`: the sentinels. Unused standalone.
    pub nodes: Vec<String>,
    /// `mode = "sentinel"`: the name the sentinels monitor the primary under.
    pub master_name: String,
    /// Seconds allowed to open the connection.
    pub connect_timeout_secs: u64,
    /// Seconds between PINGs on the subscription connection (detects half-open TCP).
    pub ping_interval_secs: u64,
    /// Seconds a PING, SUBSCRIBE or UNSUBSCRIBE may take before the connection is deemed dead.
    pub command_timeout_secs: u64,
    /// First reconnect delay; doubles per failed attempt, with jitter.
    pub reconnect_initial_ms: u64,
    /// Cap of the reconnect delay.
    pub reconnect_max_ms: u64,
    /// Seconds a new stream waits for its channels' subscriptions (e.g. while Redis is down)
    /// before it is answered `503`.
    pub subscribe_timeout_secs: u64,
    /// PEM CA bundle trusted for `rediss://` connections instead of the system's roots.
    /// Empty = the system's roots.
    pub tls_ca_file: PathBuf,
    /// PEM client certificate (chain) for mutual TLS, with `tls_key_file`. Empty = none.
    pub tls_cert_file: PathBuf,
    /// PEM private key of `tls_cert_file`. Empty = none.
    pub tls_key_file: PathBuf,
}

/// How Redis is deployed (`redis.mode`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One server at `redis.url`.
    #[default]
    Standalone,
    /// A Redis Cluster, discovered from the seed `redis.nodes`.
    Cluster,
    /// A primary found through the sentinels `redis.nodes` under `redis.master_name`; the
    /// gateway follows its failovers.
    Sentinel,
}

impl RedisSettings {
    /// The CA and client certificate for `rediss://` connections, read from the `tls_*` files
    /// and checked the way a connection will use them; `None` when no file is set. Errors name
    /// the key at fault.
    pub fn tls_certificates(&self) -> Result<Option<redis::TlsCertificates>, ConfigError> {
        if self.tls_keys_set().is_empty() {
            return Ok(None);
        }
        let root_cert = match is_set(&self.tls_ca_file) {
            Some(path) => Some(read_file("redis.tls_ca_file", path)?),
            None => None,
        };
        let roots = match &root_cert {
            Some(pem) => trust_anchors(pem)?,
            None => rustls::RootCertStore::empty(),
        };
        let client_tls = match (is_set(&self.tls_cert_file), is_set(&self.tls_key_file)) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "redis.tls_key_file",
                    "must be set with redis.tls_cert_file (the client certificate's key)"
                        .to_string(),
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "redis.tls_cert_file",
                    "must be set with redis.tls_key_file (the key's certificate)".to_string(),
                ))
            }
            (Some(cert), Some(key)) => {
                let client = redis::ClientTlsConfig {
                    client_cert: read_file("redis.tls_cert_file", cert)?,
                    client_key: read_file("redis.tls_key_file", key)?,
                };
                check_client_identity(&client, roots)?;
                Some(client)
            }
        };
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }

    /// The `tls_*` keys that are set, in the order they are documented.
    fn tls_keys_set(&self) -> Vec<&'static str> {
        [
            ("redis.tls_ca_file", &self.tls_ca_file),
            ("redis.tls_cert_file", &self.tls_cert_file),
            ("redis.tls_key_file", &self.tls_key_file),
        ]
        .into_iter()
        .filter(|(_, path)| is_set(path).is_some())
        .map(|(key, _)| key)
        .collect()
    }
}

/// `path` unless it is empty (an empty value means "unset", also from the environment).
fn is_set(path: &Path) -> Option<&Path> {
    (!path.as_os_str().is_empty()).then_some(path)
}

fn read_file(key: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))
}

/// The CA certificates of `redis.tls_ca_file`, as the trust store rustls will build from them.
fn trust_anchors(pem: &[u8]) -> Result<rustls::RootCertStore, ConfigError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let key = "redis.tls_ca_file";
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| invalid(key, format!("not a PEM certificate bundle: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| invalid(key, format!("a certificate cannot be trusted: {e}")))?;
    }
    if roots.is_empty() {
        return Err(invalid(key, "holds no PEM certificate".to_string()));
    }
    Ok(roots)
}

/// Checks that the client certificate and key parse and belong together, by building the
/// rustls client configuration a connection will use.
fn check_client_identity(
    client: &redis::ClientTlsConfig,
    roots: rustls::RootCertStore,
) -> Result<(), ConfigError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(&client.client_cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("redis.tls_cert_file", format!("not a PEM certificate: {e}")))?;
    if chain.is_empty() {
        return Err(invalid(
            "redis.tls_cert_file",
            "holds no PEM certificate".to_string(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&client.client_key)
        .map_err(|e| invalid("redis.tls_key_file", format!("not a PEM private key: {e}")))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("redis.tls_cert_file", e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map(drop)
        .map_err(|e| {
            invalid(
                "redis.tls_key_file",
                format!("does not fit redis.tls_cert_file: {e}"),
            )
        })
}

/// Whether a Redis URL asks for TLS.
pub fn is_tls_url(url: &str) -> bool {
    matches!(url.split_once("://"), Some(("rediss" | "valkeys", _)))
}

/// `[sse]`
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SseSettings {
    /// Seconds of silence after which a heartbeat comment is sent.
    pub heartbeat_secs: u64,
    /// Reconnection delay advertised with `retry:`.
    pub retry_ms: u64,
    /// Field of a JSON object payload whose string value becomes the SSE event type.
    pub event_type_field: String,
}

/// `[history]`
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistorySettings {
    /// Events kept per channel for resumption.
    pub capacity: usize,
    /// Seconds an event stays resumable.
    pub max_age_secs: u64,
    /// Seconds a channel stays subscribed (and its history kept) after its last client left.
    pub linger_secs: u64,
    /// Where the history is kept and event ids are assigned.
    pub backend: HistoryBackend,
}

/// Where a channel's history lives (`history.backend`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HistoryBackend {
    /// Each instance keeps its own rings and numbers its own events; plain `PUBLISH` feeds it.
    #[default]
    Memory,
    /// The history and the ids live in Redis (the `ssehub` function library), shared by the
    /// whole fleet.
    Redis,
}

/// `[publish]`
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PublishSettings {
    /// Seconds a repeated `Idempotency-Key` (same channel) publishes nothing and answers like
    /// the first request.
    pub idempotency_window_secs: u64,
}

/// `[dead_letter]`
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeadLetterSettings {
    /// The Redis Stream payloads received but not delivered are added to; empty = off.
    pub stream: String,
    /// Approximate length the stream is trimmed to (`XADD ... MAXLEN ~`).
    pub max_len: u64,
    /// Seconds one dropped message is written at most once, whichever instances receive it.
    pub dedupe_secs: u64,
}

/// One `[[schemas]]` table: a JSON Schema and the channels whose payloads must satisfy it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaSettings {
    /// Glob patterns, as in `channels.public`, of the channels this schema checks. The first
    /// table with a matching pattern applies.
    pub channels: Vec<String>,
    /// The schema (JSON Schema draft 2020-12). A relative path is resolved against the folder
    /// of the configuration file (the working directory when there is none).
    pub file: PathBuf,
}

/// `[channels]`
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelSettings {
    /// Glob patterns (`*` = any run of characters) of channels anyone may subscribe to.
    pub public: Vec<String>,
    /// Most distinct channels one connection may request.
    pub max_per_connection: usize,
    /// Most channels held at once, counting subscribed, pending and lingering ones. Each costs
    /// a Redis subscription and gateway memory, so without a cap one client naming fresh
    /// channels could make the gateway hold as many as it can send requests.
    pub max_total: usize,
}

/// `[log]`
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `text` (human) or `json`.
    pub format: LogFormat,
    /// A tracing filter: `info`, `debug`, `ssehub=debug,hyper=info`, ...
    pub level: String,
    /// The JSON field (top-level, or a dotted path) whose value log lines about a payload carry
    /// as `correlation_id`.
    pub correlation_id_field: String,
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: parse_default_addr(DEFAULT_SERVER_LISTEN),
            shutdown_grace_secs: DEFAULT_SHUTDOWN_GRACE_SECS,
            shutdown_retry_jitter_ms: DEFAULT_SHUTDOWN_RETRY_JITTER_MS,
            demo_page: true,
            worker_threads: 0,
            http1_fast_path: true,
            cors_origins: Vec::new(),
            cors_credentials: false,
            tls: None,
        }
    }
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            listen: parse_default_addr(DEFAULT_ADMIN_LISTEN),
        }
    }
}

fn parse_default_addr(addr: &str) -> SocketAddr {
    addr.parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            jwt_secret: None,
            jwt_secret_file: None,
            jwt_public_key_file: None,
            audience: None,
            issuer: None,
            leeway_secs: DEFAULT_AUTH_LEEWAY_SECS,
            cookie_name: DEFAULT_AUTH_COOKIE.to_string(),
            user_channel: None,
        }
    }
}

impl Default for LimitsSettings {
    fn default() -> Self {
        LimitsSettings {
            max_connections: 0,
            max_connections_per_ip: 0,
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::default(),
            header_read_timeout_secs: DEFAULT_HEADER_READ_TIMEOUT_SECS,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_new_connections_per_sec: 0,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT_SECS,
            write_stall_secs: DEFAULT_WRITE_STALL_SECS,
        }
    }
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            mode: RedisMode::Standalone,
            url: DEFAULT_REDIS_URL.to_string(),
            nodes: Vec::new(),
            master_name: String::new(),
            connect_timeout_secs: 5,
            ping_interval_secs: 5,
            command_timeout_secs: 5,
            reconnect_initial_ms: 100,
            reconnect_max_ms: 5000,
            subscribe_timeout_secs: 10,
            tls_ca_file: PathBuf::new(),
            tls_cert_file: PathBuf::new(),
            tls_key_file: PathBuf::new(),
        }
    }
}

impl Default for SseSettings {
    fn default() -> Self {
        SseSettings {
            heartbeat_secs: DEFAULT_HEARTBEAT_SECS,
            retry_ms: DEFAULT_RETRY_MS,
            event_type_field: DEFAULT_EVENT_TYPE_FIELD.to_string(),
        }
    }
}

impl Default for HistorySettings {
    fn default() -> Self {
        HistorySettings {
            capacity: DEFAULT_HISTORY_CAPACITY,
            max_age_secs: DEFAULT_HISTORY_MAX_AGE_SECS,
            linger_secs: DEFAULT_HISTORY_LINGER_SECS,
            backend: HistoryBackend::Memory,
        }
    }
}

impl Default for PublishSettings {
    fn default() -> Self {
        PublishSettings {
            idempotency_window_secs: DEFAULT_IDEMPOTENCY_WINDOW_SECS,
        }
    }
}

impl Default for DeadLetterSettings {
    fn default() -> Self {
        DeadLetterSettings {
            stream: DEFAULT_DEAD_LETTER_STREAM.to_string(),
            max_len: DEFAULT_DEAD_LETTER_MAX_LEN,
            dedupe_secs: DEFAULT_DEAD_LETTER_DEDUPE_SECS,
        }
    }
}

impl Default for ChannelSettings {
    fn default() -> Self {
        ChannelSettings {
            public: Vec::new(),
            max_per_connection: DEFAULT_MAX_CHANNELS_PER_CONNECTION,
            max_total: DEFAULT_MAX_CHANNELS_TOTAL,
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Text,
            level: "info".to_string(),
            correlation_id_field: DEFAULT_CORRELATION_ID_FIELD.to_string(),
        }
    }
}

impl Settings {
    /// Loads `path` (optional when `path_required` is false) and the process environment.
    pub fn load(path: &Path, path_required: bool) -> Result<Settings, ConfigError> {
        Self::load_with_env(path, path_required, std::env::vars())
    }

    /// Like [`Settings::load`] with an explicit environment (for tests).
    pub fn load_with_env(
        path: &Path,
        path_required: bool,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(key, _)| key.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        let mut settings: Settings = config::Config::builder()
            .add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(path_required),
            )
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("channels.public")
                    .with_list_parse_key("server.cors_origins")
                    .with_list_parse_key("limits.trusted_proxies")
                    .with_list_parse_key("redis.nodes")
                    .source(Some(env.clone())),
            )
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|e| name_the_variable(e, &env))?;
        settings.resolve_schema_files(path);
        settings.validated()
    }

    /// Makes relative `[[schemas]] file` paths relative to the folder of the configuration
    /// file, so the gateway finds its schemas whatever its working directory. Without a file
    /// (environment only) they stay relative to the working directory.
    fn resolve_schema_files(&mut self, config_file: &Path) {
        if !config_file.is_file() {
            return;
        }
        let folder = config_file.parent().unwrap_or(Path::new(""));
        for schema in &mut self.schemas {
            // An empty path stays empty, for validation to name it.
            if schema.file.is_relative() && !schema.file.as_os_str().is_empty() {
                schema.file = folder.join(&schema.file);
            }
        }
    }

    /// Checks the values that parse but make no sense.
    pub fn validated(mut self) -> Result<Settings, ConfigError> {
        // An empty environment list (`SSEHUB__CHANNELS__PUBLIC=`) means "no public channels".
        self.channels.public.retain(|p| !p.is_empty());
        for pattern in &self.channels.public {
            Pattern::parse(pattern).map_err(|message| invalid("channels.public", message))?;
        }
        self.validate_schemas()?;
        self.validate_redis_topology()?;
        self.validate_redis_tls()?;
        if self.server.worker_threads > MAX_WORKER_THREADS {
            return Err(invalid(
                "server.worker_threads",
                format!("must be at most {MAX_WORKER_THREADS} (0 = one per core)"),
            ));
        }
        positive("sse.heartbeat_secs", self.sse.heartbeat_secs)?;
        positive("history.capacity", self.history.capacity as u64)?;
        positive(
            "channels.max_per_connection",
            self.channels.max_per_connection as u64,
        )?;
        positive("channels.max_total", self.channels.max_total as u64)?;
        positive(
            "publish.idempotency_window_secs",
            self.publish.idempotency_window_secs,
        )?;
        positive(
            "redis.connect_timeout_secs",
            self.redis.connect_timeout_secs,
        )?;
        positive("redis.ping_interval_secs", self.redis.ping_interval_secs)?;
        positive(
            "redis.command_timeout_secs",
            self.redis.command_timeout_secs,
        )?;
        positive(
            "redis.reconnect_initial_ms",
            self.redis.reconnect_initial_ms,
        )?;
        if self.redis.reconnect_max_ms < self.redis.reconnect_initial_ms {
            return Err(invalid(
                "redis.reconnect_max_ms",
                "must be at least redis.reconnect_initial_ms".to_string(),
            ));
        }
        self.validate_security()?;
        self.validate_durations()?;
        let field = &self.sse.event_type_field;
        if field.is_empty() {
            return Err(invalid(
                "sse.event_type_field",
                "must not be empty".to_string(),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", format!("not a valid filter: {e}")))?;
        if self.log.correlation_id_field.split('.').any(str::is_empty) {
            return Err(invalid(
                "log.correlation_id_field",
                "must be a field name or a dotted path without empty parts".to_string(),
            ));
        }
        self.validate_dead_letter()?;
        Ok(self)
    }

    /// `[dead_letter]`: a stream name whose braces would not keep its dedupe keys in its own
    /// cluster slot is refused (see `dead_letter::dedupe_key`).
    fn validate_dead_letter(&self) -> Result<(), ConfigError> {
        let dead_letter = &self.dead_letter;
        if dead_letter.stream.is_empty() {
            return Ok(());
        }
        if crate::dead_letter::hash_tag(&dead_letter.stream).is_none()
            && dead_letter.stream.contains(['{', '}'])
        {
            return Err(invalid(
                "dead_letter.stream",
                format!(
                    "{:?} has braces that are not a Redis Cluster hash tag (a `{{` followed \
                     later by a `}}` with at least one character between them)",
                    dead_letter.stream
                ),
            ));
        }
        positive("dead_letter.max_len", dead_letter.max_len)?;
        positive("dead_letter.dedupe_secs", dead_letter.dedupe_secs)
    }

    /// Each `[[schemas]]` table names a file and at least one valid channel pattern. The files
    /// themselves are read and compiled when the gateway starts (`crate::schemas`).
    fn validate_schemas(&self) -> Result<(), ConfigError> {
        for (index, schema) in self.schemas.iter().enumerate() {
            let entry = |key: &str, message: String| ConfigError::InvalidEntry {
                key: format!("schemas[{index}].{key}"),
                message,
            };
            if schema.channels.is_empty() {
                return Err(entry(
                    "channels",
                    "must list at least one channel pattern".to_string(),
                ));
            }
            for pattern in &schema.channels {
                Pattern::parse(pattern).map_err(|message| entry("channels", message))?;
            }
            if schema.file.as_os_str().is_empty() {
                return Err(entry("file", "must not be empty".to_string()));
            }
        }
        Ok(())
    }

    /// `redis.mode` and the keys that go with it: a key set for another mode is a mistake
    /// (the operator meant something the gateway would silently not do).
    fn validate_redis_topology(&mut self) -> Result<(), ConfigError> {
        let redis = &mut self.redis;
        redis.nodes.retain(|node| !node.is_empty());
        check_redis_url(&redis.url).map_err(|message| invalid("redis.url", message))?;
        for node in &redis.nodes {
            check_redis_url(node)
                .and_then(|()| check_network_url(node))
                .map_err(|message| invalid("redis.nodes", message))?;
        }
        let needs = |key, what: &str| invalid(key, format!("must be set with redis.mode = {what}"));
        let unused = |key, what: &str| {
            invalid(
                key,
                format!("is not used with redis.mode = {what}; remove it or change the mode"),
            )
        };
        match redis.mode {
            RedisMode::Standalone => {
                if !redis.nodes.is_empty() {
                    return Err(unused("redis.nodes", "\"standalone\" (it uses redis.url)"));
                }
                if !redis.master_name.is_empty() {
                    return Err(unused("redis.master_name", "\"standalone\""));
                }
            }
            RedisMode::Sentinel => {
                if redis.nodes.is_empty() {
                    return Err(needs(
                        "redis.nodes",
                        "\"sentinel\" (the sentinels' addresses)",
                    ));
                }
                if redis.master_name.is_empty() {
                    return Err(needs("redis.master_name", "\"sentinel\""));
                }
                check_network_url(&redis.url).map_err(|message| invalid("redis.url", message))?;
            }
            RedisMode::Cluster => {
                if redis.nodes.is_empty() {
                    return Err(needs("redis.nodes", "\"cluster\" (seed nodes)"));
                }
                if !redis.master_name.is_empty() {
                    return Err(unused("redis.master_name", "\"cluster\""));
                }
                if let Some(node) = redis.nodes.iter().find(|node| url_database(node) != 0) {
                    return Err(invalid(
                        "redis.nodes",
                        format!(
                            "`{}` names a database; a Redis Cluster has only database 0",
                            redact_url(node)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The `redis.tls_*` files: read and parsed now, so that a bad one stops the start with its
    /// key named rather than failing every connection later, and refused when no `rediss://`
    /// URL would use them (the operator believes the link is encrypted and it is not).
    fn validate_redis_tls(&self) -> Result<(), ConfigError> {
        let redis = &self.redis;
        let Some(key) = redis.tls_keys_set().first().copied() else {
            return Ok(());
        };
        let mut urls = std::iter::once(&redis.url).chain(&redis.nodes);
        if !urls.any(|url| is_tls_url(url)) {
            return Err(invalid(
                key,
                "is set but no Redis URL uses TLS; write rediss:// in redis.url (or in \
                 redis.nodes for TLS to the sentinels), or remove the key"
                    .to_string(),
            ));
        }
        redis.tls_certificates().map(drop)
    }

    /// Every duration at most a year: beyond that a value is a typo, and adding it to the clock
    /// could overflow (a panic on the first connection instead of a start-up error).
    fn validate_durations(&self) -> Result<(), ConfigError> {
        let seconds = [
            (
                "server.shutdown_grace_secs",
                self.server.shutdown_grace_secs,
            ),
            ("auth.leeway_secs", self.auth.leeway_secs),
            (
                "limits.header_read_timeout_secs",
                self.limits.header_read_timeout_secs,
            ),
            ("limits.idle_timeout_secs", self.limits.idle_timeout_secs),
            ("limits.write_stall_secs", self.limits.write_stall_secs),
            (
                "redis.connect_timeout_secs",
                self.redis.connect_timeout_secs,
            ),
            ("redis.ping_interval_secs", self.redis.ping_interval_secs),
            (
                "redis.command_timeout_secs",
                self.redis.command_timeout_secs,
            ),
            (
                "redis.subscribe_timeout_secs",
                self.redis.subscribe_timeout_secs,
            ),
            ("sse.heartbeat_secs", self.sse.heartbeat_secs),
            ("history.max_age_secs", self.history.max_age_secs),
            ("history.linger_secs", self.history.linger_secs),
            (
                "publish.idempotency_window_secs",
                self.publish.idempotency_window_secs,
            ),
        ];
        let milliseconds = [
            (
                "server.shutdown_retry_jitter_ms",
                self.server.shutdown_retry_jitter_ms,
            ),
            (
                "redis.reconnect_initial_ms",
                self.redis.reconnect_initial_ms,
            ),
            ("redis.reconnect_max_ms", self.redis.reconnect_max_ms),
            ("sse.retry_ms", self.sse.retry_ms),
        ];
        let too_long = seconds
            .into_iter()
            .find(|(_, value)| *value > MAX_DURATION_SECS)
            .or_else(|| {
                milliseconds
                    .into_iter()
                    .find(|(_, value)| *value > MAX_DURATION_SECS * 1000)
            });
        match too_long {
            Some((key, value)) => Err(invalid(
                key,
                format!("{value} is more than a year ({MAX_DURATION_SECS} seconds)"),
            )),
            None => Ok(()),
        }
    }

    fn validate_security(&mut self) -> Result<(), ConfigError> {
        self.server.cors_origins.retain(|o| !o.is_empty());
        let any_origin = self.server.cors_origins.iter().any(|o| o == "*");
        if any_origin && self.server.cors_credentials {
            return Err(invalid(
                "server.cors_origins",
                "`*` cannot be combined with server.cors_credentials = true".to_string(),
            ));
        }
        for origin in self.server.cors_origins.iter().filter(|o| *o != "*") {
            if let Some(problem) = origin_problem(origin) {
                return Err(invalid(
                    "server.cors_origins",
                    format!(
                        "`{origin}` {problem}: a browser's Origin never matches it; \
                         write it like https://app.example.com:8443"
                    ),
                ));
            }
        }
        if let Some(template) = &self.auth.user_channel {
            if !template.contains(crate::channels::SUB_PLACEHOLDER) {
                return Err(invalid(
                    "auth.user_channel",
                    "must contain {sub}, e.g. \"user:{sub}\"".to_string(),
                ));
            }
        }
        if self.auth.cookie_name.is_empty() {
            return Err(invalid("auth.cookie_name", "must not be empty".to_string()));
        }
        self.auth.secret()?;
        positive(
            "limits.header_read_timeout_secs",
            self.limits.header_read_timeout_secs,
        )?;
        if self.limits.max_header_bytes < MIN_MAX_HEADER_BYTES {
            return Err(invalid(
                "limits.max_header_bytes",
                format!(
                    "must be at least {MIN_MAX_HEADER_BYTES} (got {})",
                    self.limits.max_header_bytes
                ),
            ));
        }
        positive("limits.idle_timeout_secs", self.limits.idle_timeout_secs)?;
        positive(
            "limits.max_payload_bytes",
            self.limits.max_payload_bytes as u64,
        )?;
        Ok(())
    }

    /// What is allowed but risky, one sentence each, naming the key: logged once at start-up.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Ok(Some(secret)) = self.auth.secret() {
            if secret.len() < MIN_HS256_SECRET_BYTES {
                let key = match self.auth.jwt_secret_file {
                    Some(_) => "auth.jwt_secret_file",
                    None => "auth.jwt_secret",
                };
                warnings.push(format!(
                    "{key}: the HS256 secret is {} bytes; use at least \
                     {MIN_HS256_SECRET_BYTES} random bytes (RFC 7518 §3.2), shorter ones can be \
                     guessed offline from any token",
                    secret.len()
                ));
            }
        }
        let admin = self.admin.listen.ip().to_canonical();
        if !admin.is_loopback() {
            warnings.push(format!(
                "admin.listen: {} is not a loopback address; /metrics and /readyz are reachable \
                 from the network, so restrict who can connect to it",
                self.admin.listen
            ));
        }
        let urls = std::iter::once(("redis.url", &self.redis.url))
            .chain(self.redis.nodes.iter().map(|node| ("redis.nodes", node)));
        for (key, url) in urls {
            if is_tls_url(url) && url.ends_with("#insecure") {
                warnings.push(format!(
                    "{key}: `{}` ends with #insecure: the Redis server's certificate is not \
                     verified (nor redis.tls_ca_file used), so anyone on the path can read the \
                     traffic and the password; use redis.tls_ca_file instead",
                    redact_url(url)
                ));
            }
        }
        if self.channels.public.iter().any(|p| p == "*") {
            warnings.push(
                "channels.public contains \"*\": every channel is readable without a token \
                 (Redis's own `__` channels excepted); list the public prefixes instead"
                    .to_string(),
            );
        }
        warnings
    }

    /// Heartbeat period.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.sse.heartbeat_secs)
    }

    /// Shutdown grace period.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.server.shutdown_grace_secs)
    }
}

/// Why a configured CORS origin can never equal a browser's `Origin` header
/// (`scheme://host[:port]`, lower case, nothing after the authority), if it cannot.
fn origin_problem(origin: &str) -> Option<&'static str> {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return Some("has no scheme");
    };
    if scheme != "http" && scheme != "https" {
        return Some("is not an http or https origin");
    }
    if authority.is_empty() {
        return Some("has no host");
    }
    if authority.ends_with('/') {
        return Some("ends with a slash");
    }
    if authority.contains(['/', '?', '#']) {
        return Some("has a path");
    }
    if authority.contains('@') {
        return Some("has user information");
    }
    if origin.bytes().any(|b| b.is_ascii_uppercase()) {
        return Some("has upper-case letters");
    }
    None
}

/// A loading error, naming the `SSEHUB__...` variable behind it when the key it is about was set
/// from the environment (the environment wins over the file, so that is where the value came
/// from).
fn name_the_variable(error: config::ConfigError, env: &config::Map<String, String>) -> ConfigError {
    let message = error.to_string();
    let quoted_after = |marker: &str| {
        let start = message.find(marker)? + marker.len();
        let end = message[start..].find('`')?;
        Some(message[start..start + end].to_string())
    };
    let key = quoted_after("for key `");
    let unknown = quoted_after("unknown field `");
    // The variable for `server.listen` is SSEHUB__SERVER__LISTEN; an unknown field is one level
    // below its key (`server` + `lisen`), or a whole unknown section at the top.
    let path: Vec<String> = key
        .iter()
        .flat_map(|key| key.split('.'))
        .map(str::to_string)
        .chain(unknown)
        .collect();
    if path.is_empty() {
        return ConfigError::Load(error);
    }
    let wanted = format!("{ENV_PREFIX}__{}", path.join("__")).to_uppercase();
    let variable = env.keys().find(|name| {
        let name = name.to_uppercase();
        name == wanted || name.starts_with(&format!("{wanted}__"))
    });
    match variable {
        Some(variable) => ConfigError::Environment {
            variable: variable.clone(),
            message,
        },
        None => ConfigError::Load(error),
    }
}

/// Checks a Redis URL the way the Redis client will read it, and says in words what is wrong
/// (the client itself only says that the URL "did not parse"). Passwords are never echoed.
pub fn check_redis_url(url: &str) -> Result<(), String> {
    const EXPECTED: &str = "expected redis://[user:password@]host:port[/db] (rediss:// for TLS)";
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("`{}` is not a URL; {EXPECTED}", redact_url(url)));
    };
    match scheme {
        "redis" | "valkey" | "rediss" | "valkeys" => check_redis_authority(rest)?,
        "unix" | "redis+unix" | "valkey+unix" => {}
        other => {
            return Err(format!(
                "the scheme `{other}://` is not supported; {EXPECTED}"
            ))
        }
    }
    redis::Client::open(url)
        .map(drop)
        .map_err(|e| format!("not a valid Redis URL: {e}"))
}

/// Refuses a Unix socket URL where the gateway needs a network address (sentinels, cluster
/// nodes, and a primary the sentinels report).
fn check_network_url(url: &str) -> Result<(), String> {
    match url.split_once("://") {
        Some((scheme, _)) if scheme.ends_with("unix") => Err(format!(
            "`{}` is a Unix socket; this mode needs redis://host:port",
            redact_url(url)
        )),
        _ => Ok(()),
    }
}

/// The database a `redis://` URL names (0 when it names none).
fn url_database(url: &str) -> u32 {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = rest.find('/').map_or("", |at| &rest[at + 1..]);
    path.split(['?', '#'])
        .next()
        .unwrap_or("")
        .parse()
        .unwrap_or(0)
}

/// The `[user:password@]host:port[/db]` part of a `redis://` or `rediss://` URL.
fn check_redis_authority(rest: &str) -> Result<(), String> {
    // The userinfo ends at the last `@`, as for `redact_url`: a password with `/`, `?` or `#`
    // must not be taken for the port. The query (`?protocol=resp3`) and the fragment
    // (`#insecure`) are the client's to check.
    let address = rest.rsplit_once('@').map_or(rest, |(_, address)| address);
    let address = address.split(['?', '#']).next().unwrap_or(address);
    let (host_port, path) = address.split_at(address.find('/').unwrap_or(address.len()));
    // A bracketed IPv6 host may contain colons; the port follows the closing bracket.
    let port_separator = match host_port.rfind(']') {
        Some(bracket) => host_port[bracket..].find(':').map(|i| bracket + i),
        None => host_port.rfind(':'),
    };
    let (host, port) = match port_separator {
        Some(at) => (&host_port[..at], Some(&host_port[at + 1..])),
        None => (host_port, None),
    };
    if host.is_empty() {
        return Err("the URL names no host; expected redis://host:port[/db]".to_string());
    }
    if let Some(port) = port {
        if !port.parse::<u16>().is_ok_and(|p| p > 0) {
            return Err(format!("the port `{port}` is not a number from 1 to 65535"));
        }
    }
    let db = path.trim_start_matches('/');
    if !db.is_empty() && db.parse::<u32>().is_err() {
        return Err(format!("the database `{db}` is not a number (e.g. /0)"));
    }
    Ok(())
}

/// `url` with any password replaced by `***`, for logging: the userinfo's, and a Unix socket
/// URL's `pass=` query value.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The userinfo ends at the last `@`: a password with an unencoded `/`, `?` or `#` must not
    // end it early and be printed as the host or the path.
    let rest = match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(user, _)| user);
            format!("{user}:***@{host}")
        }
        None => rest.to_string(),
    };
    match rest.split_once('?') {
        Some((before, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key @ ("pass" | "password"), _)) => format!("{key}=***"),
                    _ => pair.to_string(),
                })
                .collect();
            format!("{scheme}://{before}?{}", query.join("&"))
        }
        None => format!("{scheme}://{rest}"),
    }
}

fn invalid(key: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { key, message }
}

fn positive(key: &'static str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(invalid(key, "must be greater than 0".to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let dir = std::env::temp_dir().join(format!("ssehub-config-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).map_err(|e| invalid("test", e.to_string()))?;
        let path = dir.join("config.toml");
        let mut file = std::fs::File::create(&path).map_err(|e| invalid("test", e.to_string()))?;
        file.write_all(toml.as_bytes())
            .map_err(|e| invalid("test", e.to_string()))?;
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let result = Settings::load_with_env(&path, true, env);
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    fn error_of(toml: &str, env: &[(&str, &str)]) -> String {
        match load(toml, env) {
            Ok(_) => panic!("expected a configuration error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_apply_to_an_empty_file() {
        let settings = load("", &[]).expect("empty config is valid");
        assert_eq!(settings.server.listen.to_string(), DEFAULT_SERVER_LISTEN);
        assert_eq!(settings.admin.listen.to_string(), DEFAULT_ADMIN_LISTEN);
        assert_eq!(settings.redis.url, DEFAULT_REDIS_URL);
        assert_eq!(settings.sse.heartbeat_secs, 15);
        assert_eq!(settings.sse.retry_ms, 3000);
        assert_eq!(settings.sse.event_type_field, "type");
        assert_eq!(settings.history.capacity, 1000);
        assert_eq!(settings.history.max_age_secs, 300);
        assert_eq!(settings.history.linger_secs, 300);
        assert!(settings.channels.public.is_empty());
        assert_eq!(settings.channels.max_per_connection, 16);
        assert_eq!(settings.channels.max_total, 100_000);
        assert_eq!(settings.server.shutdown_grace_secs, 10);
        assert_eq!(settings.history.backend, HistoryBackend::Memory);
        assert_eq!(settings.publish.idempotency_window_secs, 300);
    }

    #[test]
    fn schema_tables_are_read_with_relative_files_next_to_the_config_file() {
        let settings = load(
            "[[schemas]]\nchannels = [\"orders:*\"]\nfile = \"schemas/orders.json\"\n\n\
             [[schemas]]\nchannels = [\"audit\"]\nfile = \"/etc/ssehub/audit.json\"\n",
            &[],
        )
        .expect("valid tables");
        let [orders, audit] = &settings.schemas[..] else {
            panic!("two tables: {:?}", settings.schemas);
        };
        assert_eq!(orders.channels, ["orders:*"]);
        assert!(orders.file.is_absolute(), "{:?}", orders.file);
        assert!(orders.file.ends_with("schemas/orders.json"));
        assert!(orders.file.starts_with(std::env::temp_dir()));
        assert_eq!(audit.file, Path::new("/etc/ssehub/audit.json"));
        let without_file = Settings::load_with_env(
            Path::new("/nonexistent/ssehub.toml"),
            false,
            std::iter::empty(),
        )
        .expect("defaults");
        assert!(without_file.schemas.is_empty());
    }

    #[test]
    fn schema_tables_need_valid_patterns_and_a_file() {
        for (toml, key) in [
            ("[[schemas]]\nchannels = []\nfile = \"a.json\"", "`schemas[0].channels`"),
            (
                "[[schemas]]\nchannels = [\"a\"]\nfile = \"a.json\"\n[[schemas]]\nchannels = [\"a b\"]\nfile = \"b.json\"",
                "`schemas[1].channels`",
            ),
            ("[[schemas]]\nchannels = [\"a\"]\nfile = \"\"", "`schemas[0].file`"),
        ] {
            let error = error_of(toml, &[]);
            assert!(error.contains(key), "{toml}: {error}");
        }
        assert!(error_of("[[schemas]]\nchannels = [\"a\"]", &[]).contains("file"));
    }

    #[test]
    fn history_backend_and_idempotency_window_are_read_and_checked() {
        let settings = load("[history]\nbackend = \"redis\"\n", &[]).expect("valid backend");
        assert_eq!(settings.history.backend, HistoryBackend::Redis);
        let settings = load("", &[("SSEHUB__HISTORY__BACKEND", "memory")]).expect("valid");
        assert_eq!(settings.history.backend, HistoryBackend::Memory);
        let err = error_of("[history]\nbackend = \"disk\"\n", &[]);
        assert!(err.contains("history.backend"), "{err}");
        let err = error_of("", &[("SSEHUB__HISTORY__BACKEND", "disk")]);
        assert!(err.contains("SSEHUB__HISTORY__BACKEND"), "{err}");
        let settings = load("[publish]\nidempotency_window_secs = 60\n", &[]).expect("valid");
        assert_eq!(settings.publish.idempotency_window_secs, 60);
        for bad in ["0", "31536001"] {
            let err = error_of("", &[("SSEHUB__PUBLISH__IDEMPOTENCY_WINDOW_SECS", bad)]);
            assert!(
                err.contains("publish.idempotency_window_secs"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn environment_overrides_the_file() {
        let settings = load(
            "[redis]\nurl = \"redis://127.0.0.1:1\"\n[channels]\npublic = [\"a\"]\n",
            &[
                ("SSEHUB__REDIS__URL", "redis://127.0.0.1:6380"),
                ("SSEHUB__SERVER__LISTEN", "127.0.0.1:18080"),
                ("SSEHUB__HISTORY__CAPACITY", "7"),
                ("SSEHUB__CHANNELS__PUBLIC", "orders,user:*"),
            ],
        )
        .expect("valid overrides");
        assert_eq!(settings.redis.url, "redis://127.0.0.1:6380");
        assert_eq!(settings.server.listen.to_string(), "127.0.0.1:18080");
        assert_eq!(settings.history.capacity, 7);
        assert_eq!(settings.channels.public, vec!["orders", "user:*"]);
    }

    #[test]
    fn empty_environment_lists_mean_none() {
        let settings = load(
            "",
            &[
                ("SSEHUB__CHANNELS__PUBLIC", ""),
                ("SSEHUB__SERVER__CORS_ORIGINS", ""),
                ("SSEHUB__LIMITS__TRUSTED_PROXIES", ""),
            ],
        )
        .expect("empty lists are valid");
        assert!(settings.channels.public.is_empty());
        assert!(settings.server.cors_origins.is_empty());
        assert!(settings.limits.trusted_proxies.is_empty());
        let settings = load("", &[("SSEHUB__LIMITS__TRUSTED_PROXIES", "10.0.0.1,::1")])
            .expect("valid proxies");
        assert_eq!(settings.limits.trusted_proxies.len(), 2);
        let err = error_of("", &[("SSEHUB__LIMITS__TRUSTED_PROXIES", "nope")]);
        assert!(err.contains("trusted_proxies"), "{err}");
    }

    #[test]
    fn passwords_are_redacted_from_logged_urls() {
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("redis://:s3cret@host:1/0"),
            "redis://:***@host:1/0"
        );
        assert_eq!(redact_url("rediss://me:p@ss@host"), "rediss://me:***@host");
        assert!(!redact_url("redis://u:hunter2@h").contains("hunter2"));
        assert_eq!(
            redact_url("rediss://:s3cret@host:1/0#insecure"),
            "rediss://:***@host:1/0#insecure"
        );
        for leaky in [
            "redis://:x9/y9@h:1",
            "redis://:x9?y9@h:1",
            "redis://:x9#y9@h:1",
            "unix:///r.sock?db=1&pass=x9y9",
            "unix:///r.sock?password=x9y9",
        ] {
            let redacted = redact_url(leaky);
            assert!(!redacted.contains("x9"), "{leaky}: {redacted}");
            assert!(!redacted.contains("y9"), "{leaky}: {redacted}");
        }
        assert_eq!(
            redact_url("unix:///r.sock?db=1&pass=x"),
            "unix:///r.sock?db=1&pass=***"
        );
    }

    #[test]
    fn errors_from_the_environment_name_the_variable() {
        let err = error_of("", &[("SSEHUB__SERVER__LISEN", "1")]);
        assert!(err.contains("SSEHUB__SERVER__LISEN"), "{err}");
        let err = error_of("", &[("SSEHUB__NONSENSE__X", "1")]);
        assert!(err.contains("SSEHUB__NONSENSE__X"), "{err}");
        let err = error_of("", &[("SSEHUB__SSE__RETRY_MS", "soon")]);
        assert!(err.contains("SSEHUB__SSE__RETRY_MS"), "{err}");
        // From the file: no variable to name.
        let err = error_of("[server]\nlisen = 1\n", &[]);
        assert!(!err.contains("SSEHUB__"), "{err}");
    }

    #[test]
    fn redis_modes_take_their_nodes_from_the_file_or_the_environment() {
        let sentinel = load(
            "[redis]\nmode = \"sentinel\"\nmaster_name = \"main\"\n\
             nodes = [\"redis://127.0.0.1:26379\"]\n",
            &[],
        )
        .expect("valid sentinel settings");
        assert_eq!(sentinel.redis.mode, RedisMode::Sentinel);
        assert_eq!(sentinel.redis.nodes, ["redis://127.0.0.1:26379"]);
        let cluster = load(
            "",
            &[
                ("SSEHUB__REDIS__MODE", "cluster"),
                (
                    "SSEHUB__REDIS__NODES",
                    "redis://127.0.0.1:7000,redis://127.0.0.1:7001",
                ),
            ],
        )
        .expect("valid cluster settings");
        assert_eq!(cluster.redis.mode, RedisMode::Cluster);
        assert_eq!(cluster.redis.nodes.len(), 2);
    }

    #[test]
    fn redis_mode_keys_that_do_not_fit_the_mode_name_the_key() {
        let cases = [
            (
                "[redis]\nmode = \"sentinel\"\nmaster_name = \"m\"\n",
                "redis.nodes",
            ),
            (
                "[redis]\nmode = \"sentinel\"\nnodes = [\"redis://h:1\"]\n",
                "redis.master_name",
            ),
            ("[redis]\nmode = \"cluster\"\n", "redis.nodes"),
            ("[redis]\nnodes = [\"redis://h:1\"]\n", "redis.nodes"),
            ("[redis]\nmaster_name = \"m\"\n", "redis.master_name"),
            (
                "[redis]\nmode = \"cluster\"\nnodes = [\"redis://h:1/2\"]\n",
                "redis.nodes",
            ),
            (
                "[redis]\nmode = \"cluster\"\nnodes = [\"unix:///tmp/r.sock\"]\n",
                "redis.nodes",
            ),
            (
                "[redis]\nmode = \"cluster\"\nnodes = [\"redis://:pw@h:x\"]\n",
                "redis.nodes",
            ),
            ("[redis]\nmode = \"mesh\"\n", "mode"),
        ];
        for (toml, key) in cases {
            let err = error_of(toml, &[]);
            assert!(err.contains(key), "{toml}: {err}");
            assert!(!err.contains("pw@"), "{err}");
        }
    }

    #[test]
    fn bad_addresses_and_redis_urls_are_explained() {
        let err = error_of("[server]\nlisten = \"nowhere\"\n", &[]);
        assert!(
            err.contains("`nowhere`") && err.contains("ip:port"),
            "{err}"
        );
        for (url, words) in [
            ("ftp://x", "scheme `ftp://`"),
            ("nonsense", "is not a URL"),
            ("redis://", "no host"),
            ("redis://:secret@:6379", "no host"),
            ("redis://h:notaport", "port `notaport`"),
            ("redis://h:99999", "port `99999`"),
            ("redis://h:1/abc", "database `abc`"),
            ("rediss://:secret@h:port", "port `port`"),
            ("rediss://h:1#secure", "#insecure"),
            ("redis://u:x9?y9@h:1", "not a valid Redis URL"),
        ] {
            let message = check_redis_url(url).err().unwrap_or_default();
            assert!(message.contains(words), "{url}: {message}");
            assert!(!message.contains("secret"), "{message}");
            assert!(!message.contains("x9"), "{message}");
        }
        for url in [
            "redis://h:1/0",
            "redis://u:p@[::1]:6379",
            "redis://h",
            "unix:///r.sock",
            "rediss://:p@h:6380/1",
            "rediss://h:1/#insecure",
            "rediss://h:1#insecure",
            "valkeys://h",
            "redis://h:1/0?protocol=resp3",
        ] {
            assert_eq!(check_redis_url(url), Ok(()), "{url}");
        }
    }

    /// PEM files for `redis.tls_*`: a CA, a client certificate it signed with its key, and a
    /// key of nothing. Removed on drop.
    struct TlsFiles {
        dir: PathBuf,
        ca: String,
        cert: String,
        key: String,
        stray_key: String,
    }

    impl TlsFiles {
        fn generate() -> TlsFiles {
            let dir = std::env::temp_dir().join(format!("ssehub-tls-{}", rand::random::<u64>()));
            std::fs::create_dir_all(&dir).expect("scratch directory");
            let write = |name: &str, pem: String| {
                let path = dir.join(name);
                std::fs::write(&path, pem).expect("PEM file");
                path.display().to_string()
            };
            let mut ca = rcgen::CertificateParams::new(Vec::new()).expect("CA params");
            ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca_key = rcgen::KeyPair::generate().expect("CA key");
            let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key).expect("CA");
            let key = rcgen::KeyPair::generate().expect("client key");
            let cert = rcgen::CertificateParams::new(vec!["client".to_string()])
                .and_then(|params| params.signed_by(&key, &ca))
                .expect("client certificate");
            let stray_key = rcgen::KeyPair::generate().expect("stray key");
            TlsFiles {
                ca: write("ca.pem", ca.pem()),
                cert: write("cert.pem", cert.pem()),
                key: write("key.pem", key.serialize_pem()),
                stray_key: write("stray-key.pem", stray_key.serialize_pem()),
                dir,
            }
        }
    }

    impl Drop for TlsFiles {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const TLS_URL: (&str, &str) = ("SSEHUB__REDIS__URL", "rediss://:pw@127.0.0.1:6380");

    #[test]
    fn redis_tls_files_are_read_with_a_rediss_url() {
        let files = TlsFiles::generate();
        let env = [
            TLS_URL,
            ("SSEHUB__REDIS__TLS_CA_FILE", files.ca.as_str()),
            ("SSEHUB__REDIS__TLS_CERT_FILE", files.cert.as_str()),
            ("SSEHUB__REDIS__TLS_KEY_FILE", files.key.as_str()),
        ];
        let settings = load("", &env).expect("valid TLS settings");
        let tls = settings.redis.tls_certificates().expect("readable files");
        let tls = tls.expect("TLS material");
        assert!(tls.root_cert.is_some() && tls.client_tls.is_some());
        // The sentinels' URLs count: TLS to the sentinels, plain to the primary.
        let sentinels = format!(
            "[redis]\nmode = \"sentinel\"\nmaster_name = \"m\"\n\
             nodes = [\"rediss://127.0.0.1:26379\"]\ntls_ca_file = \"{}\"\n",
            files.ca
        );
        assert!(load(&sentinels, &[]).is_ok());
        // Empty values are unset, also from the environment.
        let empty = [
            ("SSEHUB__REDIS__TLS_CA_FILE", ""),
            ("SSEHUB__REDIS__TLS_CERT_FILE", ""),
        ];
        let plain = load("", &empty).expect("empty TLS keys are unset");
        assert!(matches!(plain.redis.tls_certificates(), Ok(None)));
        // System roots: a rediss:// URL needs no file.
        assert!(load("", &[TLS_URL]).is_ok());
    }

    #[test]
    fn redis_tls_problems_name_their_key() {
        let files = TlsFiles::generate();
        let missing = files.dir.join("missing.pem").display().to_string();
        /// Environment, words the error must contain.
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: [Case; 7] = [
            (
                &[TLS_URL, ("SSEHUB__REDIS__TLS_CA_FILE", &missing)],
                &["redis.tls_ca_file", "cannot read"],
            ),
            (
                &[TLS_URL, ("SSEHUB__REDIS__TLS_CA_FILE", &files.key)],
                &["redis.tls_ca_file", "no PEM certificate"],
            ),
            (
                &[TLS_URL, ("SSEHUB__REDIS__TLS_CERT_FILE", &files.cert)],
                &["redis.tls_key_file", "redis.tls_cert_file"],
            ),
            (
                &[TLS_URL, ("SSEHUB__REDIS__TLS_KEY_FILE", &files.key)],
                &["redis.tls_cert_file", "redis.tls_key_file"],
            ),
            (
                &[
                    TLS_URL,
                    ("SSEHUB__REDIS__TLS_CERT_FILE", &files.cert),
                    ("SSEHUB__REDIS__TLS_KEY_FILE", &files.stray_key),
                ],
                &["redis.tls_key_file", "does not fit"],
            ),
            (
                &[("SSEHUB__REDIS__TLS_CA_FILE", &files.ca)],
                &["redis.tls_ca_file", "rediss://"],
            ),
            (
                &[
                    ("SSEHUB__REDIS__URL", "redis://:pw@127.0.0.1:6379"),
                    ("SSEHUB__REDIS__TLS_CERT_FILE", &files.cert),
                    ("SSEHUB__REDIS__TLS_KEY_FILE", &files.key),
                ],
                &["redis.tls_cert_file", "rediss://"],
            ),
        ];
        for (env, words) in cases {
            let err = error_of("", env);
            for word in words {
                assert!(err.contains(word), "{env:?}: {err}");
            }
            assert!(!err.contains("pw"), "{err}");
        }
    }

    #[test]
    fn an_insecure_rediss_url_is_accepted_with_a_warning() {
        let env = [(
            "SSEHUB__REDIS__URL",
            "rediss://:pw@127.0.0.1:6380/#insecure",
        )];
        let settings = load("", &env).expect("#insecure is the client's to allow");
        let warnings = settings.warnings();
        assert!(
            warnings
                .iter()
                .any(|w| w.starts_with("redis.url:") && w.contains("not verified")),
            "{warnings:?}"
        );
        assert!(warnings.iter().all(|w| !w.contains("pw")), "{warnings:?}");
    }

    #[test]
    fn history_backend_is_memory_unless_set_and_other_values_name_the_key() {
        assert_eq!(
            load("", &[]).map(|s| s.history.backend).ok(),
            Some(HistoryBackend::Memory)
        );
        let redis = load("[history]\nbackend = \"redis\"\n", &[]);
        assert_eq!(
            redis.map(|s| s.history.backend).ok(),
            Some(HistoryBackend::Redis)
        );
        let err = error_of("[history]\nbackend = \"disk\"\n", &[]);
        assert!(err.contains("history.backend"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        assert!(error_of("[server]\nlisten_addr = \"x\"\n", &[]).contains("listen_addr"));
        assert!(error_of("[nonsense]\nx = 1\n", &[]).contains("nonsense"));
        assert!(error_of("", &[("SSEHUB__SSE__HEARTBEAT", "3")]).contains("heartbeat"));
    }

    #[test]
    fn invalid_values_are_rejected_by_key() {
        assert!(error_of("[server]\nworker_threads = 5000", &[]).contains("server.worker_threads"));
        let err = error_of("[history]\ncapacity = \"lots\"\n", &[]);
        assert!(err.contains("capacity"), "{err}");
        let err = error_of("[server]\nlisten = \"nowhere\"\n", &[]);
        assert!(err.contains("listen"), "{err}");
        let err = error_of("[history]\ncapacity = 0\n", &[]);
        assert!(err.contains("history.capacity"), "{err}");
        let err = error_of("[redis]\nurl = \"http://x\"\n", &[]);
        assert!(err.contains("redis.url"), "{err}");
        let err = error_of("[channels]\npublic = [\"bad pattern\"]\n", &[]);
        assert!(err.contains("channels.public"), "{err}");
        for too_small in ["1024", "8191"] {
            let env = [("SSEHUB__LIMITS__MAX_HEADER_BYTES", too_small)];
            let err = error_of("", &env);
            assert!(err.contains("limits.max_header_bytes"), "{err}");
        }
        assert!(load("[limits]\nmax_header_bytes = 8192\n", &[]).is_ok());
        let err = error_of("[channels]\nmax_total = 0\n", &[]);
        assert!(err.contains("channels.max_total"), "{err}");
        let err = error_of("", &[("SSEHUB__SSE__RETRY_MS", "soon")]);
        assert!(err.contains("retry_ms"), "{err}");
        let forever = u64::MAX.to_string();
        let err = error_of(
            "",
            &[("SSEHUB__LIMITS__IDLE_TIMEOUT_SECS", forever.as_str())],
        );
        assert!(err.contains("limits.idle_timeout_secs"), "{err}");
        let err = error_of("", &[("SSEHUB__SSE__RETRY_MS", "31536000001")]);
        assert!(err.contains("sse.retry_ms"), "{err}");
        assert!(load("[history]\nmax_age_secs = 31536000\n", &[]).is_ok());
    }

    #[test]
    fn cors_origins_a_browser_never_sends_are_refused() {
        for bad in [
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://App.example.com",
            "HTTPS://app.example.com",
            "app.example.com",
            "https://",
            "ftp://app.example.com",
        ] {
            let env = [("SSEHUB__SERVER__CORS_ORIGINS", bad)];
            let err = error_of("", &env);
            assert!(err.contains("server.cors_origins"), "{bad}: {err}");
            assert!(err.contains(bad), "{bad}: {err}");
        }
        let good =
            "[server]\ncors_origins = [\"https://app.example.com:8443\", \"http://[::1]:3000\"]\n";
        assert!(load(good, &[]).is_ok());
    }

    #[test]
    fn risky_settings_warn_naming_the_key() {
        let quiet = load("", &[]).expect("defaults");
        assert!(quiet.warnings().is_empty(), "{:?}", quiet.warnings());
        let risky = load(
            "[auth]\njwt_secret = \"short\"\n[admin]\nlisten = \"0.0.0.0:9090\"\n\
             [channels]\npublic = [\"*\"]\n",
            &[],
        )
        .expect("risky but valid");
        let warnings = risky.warnings();
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(warnings[0].starts_with("auth.jwt_secret:"), "{warnings:?}");
        assert!(warnings[1].starts_with("admin.listen:"), "{warnings:?}");
        assert!(warnings[2].starts_with("channels.public"), "{warnings:?}");
        let long_secret = format!("[auth]\njwt_secret = \"{}\"\n", "k".repeat(32));
        assert!(load(&long_secret, &[])
            .expect("valid")
            .warnings()
            .is_empty());
    }
}
