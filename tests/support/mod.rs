//! Test DSL: a real `redis-server` on a free loopback port, a real gateway on port 0, and a
//! small SSE client over real HTTP/1.1 sockets.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use ssehub::Settings;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

pub mod balancer;
pub mod lean;
pub mod publisher;
pub mod tls_redis;
pub mod topology;
pub mod topology_settings;

pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// How long tests wait for something that should happen promptly. Generous for slow CI.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Retries `check` until it returns true or `PATIENCE` runs out.
pub async fn eventually<F, Fut>(what: &str, check: F) -> TestResult
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_within(what, PATIENCE, check).await
}

/// [`eventually`] with a patience of its own, for what takes long by design (thousands of
/// clients).
pub async fn eventually_within<F, Fut>(what: &str, patience: Duration, mut check: F) -> TestResult
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + patience;
    loop {
        if check().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for: {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `redis-server` owned by the test, killed on drop.
pub struct TestRedis {
    pub port: u16,
    child: Option<Child>,
}

impl TestRedis {
    pub async fn start() -> TestResult<TestRedis> {
        let port = free_port()?;
        let mut redis = TestRedis { port, child: None };
        redis.restart().await?;
        Ok(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port and waits until it answers.
    pub async fn restart(&mut self) -> TestResult {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start redis-server (is it installed?): {e}"))?;
        self.child = Some(child);
        let url = self.url();
        eventually("redis-server answers PING", || {
            let url = url.clone();
            async move { ping(&url).await }
        })
        .await
    }

    /// Kills the server abruptly (SIGKILL), as a crash or network loss would.
    pub async fn kill(&mut self) -> TestResult {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Freezes the server (SIGSTOP): its sockets stay open but nothing answers, like a
    /// half-open TCP connection.
    pub async fn freeze(&self) -> TestResult {
        self.signal("-STOP").await
    }

    /// Undoes [`TestRedis::freeze`].
    pub async fn thaw(&self) -> TestResult {
        self.signal("-CONT").await
    }

    async fn signal(&self, signal: &str) -> TestResult {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .ok_or("redis-server is not running")?;
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .await?;
        if !status.success() {
            return Err(format!("kill {signal} {pid} failed").into());
        }
        Ok(())
    }

    pub async fn connection(&self) -> TestResult<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url())?;
        Ok(client.get_multiplexed_async_connection().await?)
    }

    /// PUBLISHes and returns how many subscribers Redis delivered to.
    pub async fn publish(&self, channel: &str, payload: impl AsRef<[u8]>) -> TestResult<i64> {
        let mut conn = self.connection().await?;
        let receivers: i64 = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload.as_ref())
            .query_async(&mut conn)
            .await?;
        Ok(receivers)
    }

    /// Publishes through the gateway's function library (`FCALL ssehub_publish`, loaded by a
    /// gateway with the redis backend) and returns its `"<epoch> <id>"` reply.
    pub async fn publish_stored(
        &self,
        channel: &str,
        payload: impl AsRef<[u8]>,
    ) -> TestResult<String> {
        let mut conn = self.connection().await?;
        let position: String = redis::cmd("FCALL")
            .arg("ssehub_publish")
            .arg(1)
            .arg(channel)
            .arg(payload.as_ref())
            .query_async(&mut conn)
            .await?;
        Ok(position)
    }

    /// Channels Redis has subscribers for (`PUBSUB CHANNELS`).
    pub async fn subscribed_channels(&self) -> TestResult<Vec<String>> {
        let mut conn = self.connection().await?;
        Ok(redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .query_async(&mut conn)
            .await?)
    }
}

async fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(Ok(mut conn)) = timeout(
        Duration::from_secs(1),
        client.get_multiplexed_async_connection(),
    )
    .await
    else {
        return false;
    };
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .is_ok()
}

pub fn free_port() -> TestResult<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Settings for tests: loopback, every channel public, fast Redis probing.
pub fn test_settings(redis: &TestRedis) -> Settings {
    let mut settings = Settings::default();
    settings.redis.url = redis.url();
    settings.redis.reconnect_initial_ms = 50;
    settings.redis.reconnect_max_ms = 500;
    settings.redis.ping_interval_secs = 1;
    settings.redis.command_timeout_secs = 2;
    settings.channels.public = vec!["*".to_string()];
    settings.server.shutdown_grace_secs = 5;
    settings
}

/// [`test_settings`] with the history in Redis (`history.backend = "redis"`).
pub fn redis_backend_settings(redis: &TestRedis) -> Settings {
    let mut settings = test_settings(redis);
    settings.history.backend = ssehub::config::HistoryBackend::Redis;
    settings
}

/// A gateway running inside the test process on loopback port 0.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ssehub::RunError>>>,
}

impl TestGateway {
    pub async fn start(settings: Settings) -> TestResult<TestGateway> {
        let public = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        Self::start_on(settings, public).await
    }

    /// Starts with a public listener bound by the test (another address family, ...).
    pub async fn start_on(
        settings: Settings,
        public: tokio::net::TcpListener,
    ) -> TestResult<TestGateway> {
        let listeners = ssehub::Listeners {
            public,
            admin: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        };
        let addr = listeners.public.local_addr()?;
        let admin = listeners.admin.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(ssehub::run(settings, listeners, async move {
            let _ = stopped.await;
        }));
        let gateway = TestGateway {
            addr,
            admin,
            stop: Some(stop),
            task: Some(task),
        };
        Ok(gateway)
    }

    /// Starts and waits until `/readyz` says the Redis subscription is up.
    pub async fn start_ready(settings: Settings) -> TestResult<TestGateway> {
        let gateway = Self::start(settings).await?;
        gateway.wait_ready(200).await?;
        Ok(gateway)
    }

    pub async fn wait_ready(&self, status: u16) -> TestResult {
        let admin = self.admin;
        eventually(&format!("/readyz answers {status}"), || async move {
            matches!(get(admin, "/readyz", &[]).await, Ok((s, _)) if s == status)
        })
        .await
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> TestResult {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }

    /// Opens `/events?<query>` and expects a `200` stream.
    pub async fn subscribe(&self, query: &str) -> TestResult<SseClient> {
        self.subscribe_with(query, &[]).await
    }

    pub async fn subscribe_with(
        &self,
        query: &str,
        headers: &[(&str, &str)],
    ) -> TestResult<SseClient> {
        let (status, client) =
            SseClient::open(self.addr, &format!("/events?{query}"), headers).await?;
        if status != 200 {
            return Err(format!("expected 200 for {query}, got {status}").into());
        }
        Ok(client)
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A plain request; returns status and body text.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> TestResult<(u16, String)> {
    request(addr, "GET", path, headers).await
}

/// Sends a request and returns the status and response headers (the body is not read).
pub async fn response_head(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> TestResult<(u16, hyper::HeaderMap)> {
    let response = send(addr, method, path, headers).await?;
    Ok((response.status().as_u16(), response.headers().clone()))
}

/// Opens `path`; returns the status and, unless it is `200` (a stream that never ends), the body.
pub async fn open_status(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> TestResult<(u16, Option<String>)> {
    let response = send(addr, "GET", path, headers).await?;
    let status = response.status().as_u16();
    if status == 200 {
        return Ok((status, None));
    }
    let body = timeout(PATIENCE, response.into_body().collect())
        .await??
        .to_bytes();
    Ok((status, Some(String::from_utf8_lossy(&body).into_owned())))
}

pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> TestResult<(u16, String)> {
    let response = send(addr, method, path, headers).await?;
    let status = response.status().as_u16();
    let body = timeout(PATIENCE, response.into_body().collect())
        .await??
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> TestResult<hyper::Response<Incoming>> {
    send_from(None, addr, method, path, headers).await
}

/// Like [`send`], from a chosen loopback source address (127.0.0.2, ...).
async fn send_from(
    source: Option<std::net::IpAddr>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> TestResult<hyper::Response<Incoming>> {
    send_with(source, addr, method, path, headers, Empty::<Bytes>::new()).await
}

/// Sends `method path` with `headers` and `body` on a new HTTP/1.1 connection.
pub async fn send_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> TestResult<hyper::Response<Incoming>> {
    let body = http_body_util::Full::new(body.into());
    send_with(None, addr, method, path, headers, body).await
}

async fn send_with<B>(
    source: Option<std::net::IpAddr>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: B,
) -> TestResult<hyper::Response<Incoming>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = match source {
        None => TcpStream::connect(addr).await?,
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
    };
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(body)?;
    Ok(timeout(PATIENCE, sender.send_request(request)).await??)
}

/// One SSE block (the lines up to a blank line), as a client parser sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseBlock {
    pub id: Option<String>,
    pub event: Option<String>,
    /// Data lines joined with `\n`; `None` when the block had no `data:` line.
    pub data: Option<String>,
    pub retry: Option<u64>,
    /// Comment lines (heartbeats) in the block.
    pub comments: usize,
}

impl SseBlock {
    /// Parses the lines of one block (up to, not including, the blank line that ends it) as a
    /// browser's EventSource would: lines may end in `\r\n`, `\r` or `\n`; a field's value
    /// loses one leading space; comments are counted; unknown fields are ignored. The only SSE
    /// parser of the tests: [`SseClient`] and [`lean::LeanSseReader`] both find a block's end
    /// and hand its lines here.
    pub fn parse(lines: &str) -> SseBlock {
        let mut block = SseBlock::default();
        let mut data: Vec<&str> = Vec::new();
        for line in lines.split(['\r', '\n']).filter(|line| !line.is_empty()) {
            if line.starts_with(':') {
                block.comments += 1;
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "id" => block.id = Some(value.to_string()),
                "event" => block.event = Some(value.to_string()),
                "data" => data.push(value),
                "retry" => block.retry = value.parse().ok(),
                _ => {}
            }
        }
        if !data.is_empty() {
            block.data = Some(data.join("\n"));
        }
        block
    }

    pub fn is_event(&self) -> bool {
        self.data.is_some()
    }

    pub fn event_type(&self) -> &str {
        self.event.as_deref().unwrap_or("message")
    }

    pub fn data(&self) -> &str {
        self.data.as_deref().unwrap_or("")
    }

    /// The `gateway.reset` payload, if this is a reset.
    pub fn reset(&self) -> Option<(String, Vec<String>)> {
        if self.event.as_deref() != Some("gateway.reset") {
            return None;
        }
        let value: serde_json::Value = serde_json::from_str(self.data()).ok()?;
        let reason = value.get("reason")?.as_str()?.to_string();
        let channels = value
            .get("channels")?
            .as_array()?
            .iter()
            .filter_map(|c| c.as_str().map(str::to_string))
            .collect();
        Some((reason, channels))
    }
}

/// An SSE client over one HTTP/1.1 connection, with an independent line parser.
pub struct SseClient {
    pub headers: hyper::HeaderMap,
    body: Incoming,
    buffer: String,
    /// Bytes held back because they end in the middle of a UTF-8 sequence.
    partial: Vec<u8>,
    /// The last event id a browser would hold (updated by every block with `id:`).
    pub last_event_id: Option<String>,
    pub ended: bool,
}

impl SseClient {
    pub async fn open(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> TestResult<(u16, SseClient)> {
        Self::open_from(None, addr, path, headers).await
    }

    /// Opens a stream from a chosen loopback source address.
    pub async fn open_from(
        source: Option<std::net::IpAddr>,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> TestResult<(u16, SseClient)> {
        let response = send_from(source, addr, "GET", path, headers).await?;
        Ok(Self::from_response(response))
    }

    /// Wraps a response obtained any other way (HTTP/2, TLS).
    pub fn from_response(response: hyper::Response<Incoming>) -> (u16, SseClient) {
        let status = response.status().as_u16();
        let (parts, body) = response.into_parts();
        let client = SseClient {
            headers: parts.headers,
            body,
            buffer: String::new(),
            partial: Vec::new(),
            last_event_id: None,
            ended: false,
        };
        (status, client)
    }

    /// The next block, including comment-only and id-only blocks.
    pub async fn next_block(&mut self) -> TestResult<SseBlock> {
        self.next_block_within(PATIENCE).await
    }

    pub async fn next_block_within(&mut self, patience: Duration) -> TestResult<SseBlock> {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(block) = self.take_block() {
                if block.id.is_some() {
                    self.last_event_id = block.id.clone();
                }
                return Ok(block);
            }
            if self.ended {
                return Err("stream ended".into());
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .map_err(|_| "timed out waiting for an SSE block")?;
            match frame {
                None => self.ended = true,
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.partial.extend_from_slice(&data);
                        let valid = match std::str::from_utf8(&self.partial) {
                            Ok(text) => text.len(),
                            Err(e) => e.valid_up_to(),
                        };
                        let rest = self.partial.split_off(valid);
                        self.buffer
                            .push_str(&String::from_utf8_lossy(&self.partial));
                        self.partial = rest;
                    }
                }
            }
        }
    }

    /// The next block that carries data (skips heartbeats and id-only frames).
    pub async fn next_event(&mut self) -> TestResult<SseBlock> {
        loop {
            let block = self.next_block().await?;
            if block.is_event() {
                return Ok(block);
            }
        }
    }

    /// Collects `count` events and returns their data.
    pub async fn next_data(&mut self, count: usize) -> TestResult<Vec<String>> {
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            out.push(self.next_event().await?.data().to_string());
        }
        Ok(out)
    }

    /// Asserts no event arrives within `quiet`.
    pub async fn expect_no_event(&mut self, quiet: Duration) -> TestResult {
        match timeout(quiet, self.next_event()).await {
            Err(_) => Ok(()),
            Ok(Err(e)) => Err(e),
            Ok(Ok(block)) => Err(format!("unexpected event: {block:?}").into()),
        }
    }

    /// Reads until the server ends the response; errors if it does not within `patience`.
    pub async fn expect_end(&mut self, patience: Duration) -> TestResult {
        let deadline = Instant::now() + patience;
        while !self.ended {
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .map_err(|_| "stream did not end")?;
            match frame {
                None => self.ended = true,
                Some(frame) => {
                    frame?;
                }
            }
        }
        Ok(())
    }

    /// Splits off one complete block, skipping stray blank lines and blocks with no field a
    /// browser's EventSource would keep.
    fn take_block(&mut self) -> Option<SseBlock> {
        loop {
            let (lines, taken) = first_block(&self.buffer)?;
            let block = SseBlock::parse(&self.buffer[..lines]);
            self.buffer.drain(..taken);
            if block != SseBlock::default() {
                return Some(block);
            }
        }
    }
}

/// Where the first complete block of `text` ends, with any line end (`\r\n`, `\r`, `\n`):
/// the length of its lines and the length up to and including the blank line after them;
/// `None` until that blank line has arrived.
fn first_block(text: &str) -> Option<(usize, usize)> {
    let mut pos = 0;
    loop {
        let rest = &text[pos..];
        let end = rest.find(['\r', '\n'])?;
        // A lone `\r` at the very end may be the first half of `\r\n`: wait for more.
        if rest[end..].starts_with('\r') && end + 1 == rest.len() {
            return None;
        }
        let line_end = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        if end == 0 {
            return Some((pos, pos + line_end));
        }
        pos += end + line_end;
    }
}

/// Every series of one `/metrics` scrape of the admin listener: name plus labels, as rendered,
/// to value.
pub async fn scrape(admin: SocketAddr) -> TestResult<std::collections::HashMap<String, f64>> {
    let (status, text) = get(admin, "/metrics", &[]).await?;
    if status != 200 {
        return Err(format!("/metrics answered {status}").into());
    }
    let mut series = std::collections::HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (key, value) = line.rsplit_once(' ').ok_or("bad exposition line")?;
        series.insert(key.to_string(), value.parse()?);
    }
    Ok(series)
}

/// The value of one series (name plus labels, as rendered) on the admin listener's `/metrics`.
pub async fn metric(admin: SocketAddr, series: &str) -> TestResult<f64> {
    scrape(admin)
        .await?
        .get(series)
        .copied()
        .ok_or_else(|| format!("series {series} missing").into())
}

/// Connections of the public listener closed by a deadline (`first_request_timeout`, `idle`,
/// `stalled`) so far.
pub async fn expired_connections(admin: SocketAddr, reason: &str) -> TestResult<f64> {
    let series =
        format!("ssehub_tcp_connections_expired_total{{listener=\"public\",reason=\"{reason}\"}}");
    metric(admin, &series).await
}

/// A directory under the temporary directory, removed on drop (also when the test fails).
pub struct ScratchDir(pub std::path::PathBuf);

impl ScratchDir {
    pub fn create(name: &str) -> std::io::Result<ScratchDir> {
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path)?;
        Ok(ScratchDir(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A self-signed certificate for `localhost`, made by the test, its PEM files in a scratch
/// directory removed on drop.
pub struct TestCertificate {
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
    der: rustls::pki_types::CertificateDer<'static>,
    _dir: ScratchDir,
}

/// The client side of a TLS connection to the gateway.
pub type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

impl TestCertificate {
    pub fn generate() -> TestResult<TestCertificate> {
        static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let made = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = ScratchDir::create(&format!("ssehub-cert-{}-{made}", std::process::id()))?;
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
        let cert_file = dir.0.join("cert.pem");
        let key_file = dir.0.join("key.pem");
        std::fs::write(&cert_file, certified.cert.pem())?;
        std::fs::write(&key_file, certified.signing_key.serialize_pem())?;
        Ok(TestCertificate {
            cert_file,
            key_file,
            der: certified.cert.der().clone(),
            _dir: dir,
        })
    }

    /// `[server.tls]` serving this certificate.
    pub fn tls_settings(&self) -> ssehub::config::TlsSettings {
        ssehub::config::TlsSettings {
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
        }
    }

    /// A client that trusts only this certificate and offers only `alpn`.
    pub fn connector(&self, alpn: &[u8]) -> TestResult<tokio_rustls::TlsConnector> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone())?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
            config,
        )))
    }
}

/// Connects to `addr` and completes a TLS handshake with `localhost`, within [`PATIENCE`].
pub async fn tls_connect(
    addr: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
) -> TestResult<TlsStream> {
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let handshake = async {
        let tcp = TcpStream::connect(addr).await?;
        connector.connect(name, tcp).await
    };
    Ok(timeout(PATIENCE, handshake).await??)
}

/// Reads until the peer closes the connection (end of stream or error), for at most `patience`;
/// whether it closed.
pub async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    patience: Duration,
) -> bool {
    let mut buffer = [0u8; 4096];
    timeout(patience, async {
        while matches!(tokio::io::AsyncReadExt::read(stream, &mut buffer).await, Ok(n) if n > 0) {}
    })
    .await
    .is_ok()
}

/// The gateway binary as a child process, configured from the environment only, optionally
/// under a lowered file-descriptor limit. Its log goes to a temporary file, removed on drop.
pub struct GatewayProcess {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    child: Child,
    log: std::path::PathBuf,
    config: std::path::PathBuf,
}

impl GatewayProcess {
    /// Starts the binary against `redis` with `env` (`SSEHUB__...` pairs) and waits until it is
    /// ready. `descriptor_limit` sets both the soft and the hard `RLIMIT_NOFILE`.
    pub async fn start(
        redis: &TestRedis,
        env: &[(&str, &str)],
        descriptor_limit: Option<u32>,
    ) -> TestResult<GatewayProcess> {
        let process = Self::launch(&redis.url(), env, descriptor_limit)?;
        let admin = process.admin;
        eventually("the gateway binary is ready", || async move {
            matches!(get(admin, "/readyz", &[]).await, Ok((200, _)))
        })
        .await?;
        Ok(process)
    }

    /// Starts the binary against the Redis at `redis_url` with `env`, without waiting for it
    /// to be ready (or even to start: it may refuse its configuration).
    pub fn launch(
        redis_url: &str,
        env: &[(&str, &str)],
        descriptor_limit: Option<u32>,
    ) -> TestResult<GatewayProcess> {
        let admin_port = free_port()?;
        // Every setting comes from the environment; the empty file keeps ./config.toml out.
        let config = std::env::temp_dir().join(format!("ssehub-test-{admin_port}.toml"));
        std::fs::write(&config, "")?;
        Self::launch_configured(config, admin_port, redis_url, env, descriptor_limit)
    }

    /// Like [`GatewayProcess::launch`], with the configuration file `config` (removed on drop)
    /// beneath the environment, and the admin listener on `admin_port`.
    pub fn launch_configured(
        config: std::path::PathBuf,
        admin_port: u16,
        redis_url: &str,
        env: &[(&str, &str)],
        descriptor_limit: Option<u32>,
    ) -> TestResult<GatewayProcess> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse()?;
        let log = std::env::temp_dir().join(format!("ssehub-test-{}.log", admin.port()));
        let binary = env!("CARGO_BIN_EXE_ssehub");
        let mut command = match descriptor_limit {
            // `ulimit -n` in a shell that then becomes the gateway: the limit is its own.
            Some(limit) => {
                let mut shell = Command::new("/bin/sh");
                shell
                    .args(["-c", "ulimit -n \"$0\" && exec \"$@\""])
                    .arg(limit.to_string())
                    .arg(binary);
                shell
            }
            None => Command::new(binary),
        };
        command
            .arg("--config")
            .arg(&config)
            .env_clear()
            .env("SSEHUB__REDIS__URL", redis_url)
            .env("SSEHUB__SERVER__LISTEN", addr.to_string())
            .env("SSEHUB__ADMIN__LISTEN", admin.to_string())
            .env("SSEHUB__CHANNELS__PUBLIC", "*")
            .env("SSEHUB__LOG__LEVEL", "info");
        for (key, value) in env {
            command.env(key, value);
        }
        let log_file = std::fs::File::create(&log)?;
        let child = command
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()?;
        Ok(GatewayProcess {
            addr,
            admin,
            child,
            log,
            config,
        })
    }

    /// Opens `/events?<query>` from a chosen loopback address and expects a `200` stream.
    pub async fn subscribe_from(&self, source: &str, query: &str) -> TestResult<SseClient> {
        let path = format!("/events?{query}");
        let (status, client) =
            SseClient::open_from(Some(source.parse()?), self.addr, &path, &[]).await?;
        if status != 200 {
            return Err(format!("expected 200 for {query}, got {status}").into());
        }
        Ok(client)
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process's resident memory (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> TestResult<u64> {
        let pid = self.child.id().ok_or("the gateway exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let line = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .ok_or("no VmRSS line")?;
        Ok(line.trim().trim_end_matches("kB").trim().parse()?)
    }

    /// Kills the process abruptly (SIGKILL), as a crash or a lost node would, and reaps it.
    pub async fn kill(&mut self) -> TestResult {
        self.child.kill().await?;
        Ok(())
    }

    /// Sends SIGTERM, as an orchestrator does to stop the gateway.
    pub async fn terminate(&self) -> TestResult {
        self.signal("-TERM").await
    }

    /// Sends `signal` (`-STOP`, `-CONT`, `-TERM`, ...) with `kill`.
    pub async fn signal(&self, signal: &str) -> TestResult {
        let pid = self.child.id().ok_or("the gateway exited")?;
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .await?;
        if !status.success() {
            return Err(format!("kill {signal} failed").into());
        }
        Ok(())
    }

    /// Waits at most `limit` for the process to exit; returns its exit status.
    pub async fn exit_within(&mut self, limit: Duration) -> TestResult<std::process::ExitStatus> {
        let status = timeout(limit, self.child.wait())
            .await
            .map_err(|_| format!("the gateway did not exit within {limit:?}"))??;
        Ok(status)
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_file(&self.config);
    }
}
