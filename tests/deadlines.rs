//! Connection deadlines: every connection, on every listener and transport, must send its first
//! request promptly, and a connection without an open stream is closed once it is idle. A
//! connection carrying a stream stays open.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const H2_PREFACE_AND_SETTINGS: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

/// Reads until the server closes the connection; returns how long that took.
async fn time_until_closed(mut stream: TcpStream) -> TestResult<Duration> {
    let started = Instant::now();
    let mut buffer = [0u8; 4096];
    tokio::time::timeout(PATIENCE, async {
        while matches!(stream.read(&mut buffer).await, Ok(n) if n > 0) {}
    })
    .await
    .map_err(|_| "the server kept the connection open")?;
    Ok(started.elapsed())
}

async fn gateway_with_short_deadlines() -> TestResult<(TestRedis, TestGateway)> {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.limits.header_read_timeout_secs = 1;
    settings.limits.idle_timeout_secs = 1;
    settings.sse.heartbeat_secs = 1;
    let gateway = TestGateway::start_ready(settings).await?;
    Ok((redis, gateway))
}

/// Settings where the idle deadline is the first to act on a connection that was answered:
/// hyper applies `header_read_timeout_secs` to every HTTP/1.1 keep-alive head too, so with
/// equal values either could close it first.
fn idle_before_header_timeout(settings: &mut ssehub::Settings) {
    settings.limits.header_read_timeout_secs = 3;
    settings.limits.idle_timeout_secs = 1;
}

#[tokio::test]
async fn connections_that_send_no_request_are_closed_on_both_listeners() -> TestResult {
    let (_redis, gateway) = gateway_with_short_deadlines().await?;
    for addr in [gateway.addr, gateway.admin] {
        let silent = TcpStream::connect(addr).await?;
        let waited = time_until_closed(silent).await?;
        assert!(waited < Duration::from_secs(3), "{addr}: {waited:?}");
    }
    // A bare HTTP/2 preface is not a request either.
    let mut preface_only = TcpStream::connect(gateway.addr).await?;
    preface_only.write_all(H2_PREFACE_AND_SETTINGS).await?;
    let waited = time_until_closed(preface_only).await?;
    assert!(waited < Duration::from_secs(3), "h2 preface: {waited:?}");
    let expired = expired_connections(gateway.admin, "first_request_timeout").await?;
    assert!(expired >= 2.0, "{expired}");
    gateway.stop().await
}

#[tokio::test]
async fn idle_keep_alive_and_http2_connections_are_closed() -> TestResult {
    let (_redis, gateway) = gateway_with_short_deadlines().await?;
    // HTTP/1.1 keep-alive after one answered request.
    let mut keep_alive = TcpStream::connect(gateway.addr).await?;
    keep_alive
        .write_all(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let waited = time_until_closed(keep_alive).await?;
    assert!(waited < Duration::from_secs(4), "keep-alive: {waited:?}");

    // HTTP/2 after one answered request: hyper has no idle timeout of its own.
    let stream = TcpStream::connect(gateway.addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    let connection = tokio::spawn(connection);
    let request = hyper::Request::get("/nowhere").body(Empty::<Bytes>::new())?;
    assert_eq!(sender.send_request(request).await?.status(), 404);
    let started = Instant::now();
    tokio::time::timeout(PATIENCE, connection)
        .await
        .map_err(|_| "the idle HTTP/2 connection stayed open")?
        .ok();
    assert!(started.elapsed() < Duration::from_secs(4));
    let idle = expired_connections(gateway.admin, "idle").await?;
    assert!(idle >= 1.0, "{idle}");
    gateway.stop().await
}

#[tokio::test]
async fn a_connection_carrying_a_stream_is_never_idle() -> TestResult {
    let (redis, gateway) = gateway_with_short_deadlines().await?;
    let stream = TcpStream::connect(gateway.addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    let connection = tokio::spawn(connection);
    let uri = format!("http://{}/events?channel=kept", gateway.addr);
    let response = sender
        .send_request(hyper::Request::get(uri).body(Empty::<Bytes>::new())?)
        .await?;
    let (status, mut client) = SseClient::from_response(response);
    assert_eq!(status, 200);
    // Several idle timeouts pass; only heartbeats flow.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!connection.is_finished());
    redis.publish("kept", "still here").await?;
    assert_eq!(client.next_data(1).await?, ["still here"]);
    gateway.stop().await
}

async fn tls_gateway_with_short_deadlines(
    certificate: &TestCertificate,
) -> TestResult<(TestRedis, TestGateway)> {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    idle_before_header_timeout(&mut settings);
    settings.server.tls = Some(certificate.tls_settings());
    let gateway = TestGateway::start_ready(settings).await?;
    Ok((redis, gateway))
}

async fn expired(gateway: &TestGateway, listener: &str, reason: &str) -> TestResult<f64> {
    let series = format!(
        "ssehub_tcp_connections_expired_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
    );
    metric(gateway.admin, &series).await
}

#[tokio::test]
async fn tls_sessions_that_send_nothing_after_the_handshake_are_closed() -> TestResult {
    let certificate = TestCertificate::generate()?;
    let (_redis, gateway) = tls_gateway_with_short_deadlines(&certificate).await?;
    for alpn in [&b"h2"[..], b"http/1.1"] {
        let mut silent = tls_connect(gateway.addr, &certificate.connector(alpn)?).await?;
        assert_eq!(silent.get_ref().1.alpn_protocol(), Some(alpn));
        assert!(
            closed_within(&mut silent, PATIENCE).await,
            "a silent TLS session with ALPN {} stayed open",
            String::from_utf8_lossy(alpn)
        );
    }
    // The metrics are process-wide, shared with the other tests of this file: at least.
    let expired = expired(&gateway, "public", "first_request_timeout").await?;
    assert!(expired >= 2.0, "{expired}");
    gateway.stop().await
}

#[tokio::test]
async fn idle_tls_connections_are_closed_after_one_request() -> TestResult {
    let certificate = TestCertificate::generate()?;
    let (_redis, gateway) = tls_gateway_with_short_deadlines(&certificate).await?;

    let tls = tls_connect(gateway.addr, &certificate.connector(b"h2")?).await?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
    let connection = tokio::spawn(connection);
    let uri = format!("https://localhost:{}/nowhere", gateway.addr.port());
    let request = hyper::Request::get(uri).body(Empty::<Bytes>::new())?;
    assert_eq!(sender.send_request(request).await?.status(), 404);
    tokio::time::timeout(PATIENCE, connection)
        .await
        .map_err(|_| "the idle TLS HTTP/2 connection stayed open")?
        .ok();

    let tls = tls_connect(gateway.addr, &certificate.connector(b"http/1.1")?).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    let connection = tokio::spawn(connection);
    let request = hyper::Request::get("/nowhere")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())?;
    assert_eq!(sender.send_request(request).await?.status(), 404);
    tokio::time::timeout(PATIENCE, connection)
        .await
        .map_err(|_| "the idle TLS HTTP/1.1 connection stayed open")?
        .ok();

    let idle = expired(&gateway, "public", "idle").await?;
    assert!(idle >= 2.0, "{idle}");
    gateway.stop().await
}

#[tokio::test]
async fn idle_admin_connections_are_closed_after_one_request() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    idle_before_header_timeout(&mut settings);
    let gateway = TestGateway::start_ready(settings).await?;
    let mut keep_alive = TcpStream::connect(gateway.admin).await?;
    keep_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    time_until_closed(keep_alive).await?;

    let stream = TcpStream::connect(gateway.admin).await?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    let connection = tokio::spawn(connection);
    let request = hyper::Request::get("/healthz").body(Empty::<Bytes>::new())?;
    assert_eq!(sender.send_request(request).await?.status(), 200);
    tokio::time::timeout(PATIENCE, connection)
        .await
        .map_err(|_| "the idle admin HTTP/2 connection stayed open")?
        .ok();
    let idle = expired(&gateway, "admin", "idle").await?;
    assert!(idle >= 2.0, "{idle}");
    gateway.stop().await
}
