//! TLS sessions that complete the handshake and then send nothing, against the real binary
//! under a lowered descriptor limit (issue 13, item 1): the connection caps keep the process
//! inside its descriptors, and the first-request deadline frees the slots the silent sessions
//! hold, so normal clients are served while the attacker still holds its sockets open.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The descriptor limit of the report.
const DESCRIPTORS: u32 = 300;
/// Silent sessions attempted at once: nearly every descriptor the process has.
const SILENT_SESSIONS: usize = 290;

/// Opens `count` TLS sessions (ALPN alternating `h2` and `http/1.1`) that send nothing after
/// the handshake; returns those whose handshake completed. The others were refused at the
/// connection cap.
async fn silent_tls_sessions(
    gateway: &GatewayProcess,
    certificate: &TestCertificate,
    count: usize,
) -> TestResult<Vec<TlsStream>> {
    let connectors = [
        certificate.connector(b"h2")?,
        certificate.connector(b"http/1.1")?,
    ];
    let mut handshakes = JoinSet::new();
    for i in 0..count {
        let connector = connectors[i % 2].clone();
        let addr = gateway.addr;
        handshakes.spawn(async move { tls_connect(addr, &connector).await.ok() });
    }
    let mut sessions = Vec::with_capacity(count);
    while let Some(joined) = handshakes.join_next().await {
        sessions.extend(joined.ok().flatten());
    }
    Ok(sessions)
}

/// Opens `/events?channel=<channel>` over TLS with HTTP/1.1; `None` if refused or not `200`.
async fn tls_events(
    gateway: &GatewayProcess,
    certificate: &TestCertificate,
    channel: &str,
) -> TestResult<Option<SseClient>> {
    let Ok(tls) = tls_connect(gateway.addr, &certificate.connector(b"http/1.1")?).await else {
        return Ok(None);
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::get(format!("/events?channel={channel}"))
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())?;
    let Ok(Ok(response)) = tokio::time::timeout(PATIENCE, sender.send_request(request)).await
    else {
        return Ok(None);
    };
    let (status, client) = SseClient::from_response(response);
    Ok((status == 200).then_some(client))
}

#[tokio::test]
async fn silent_tls_sessions_cannot_starve_normal_clients() -> TestResult {
    let certificate = TestCertificate::generate()?;
    let redis = TestRedis::start().await?;
    let cert_file = certificate.cert_file.to_string_lossy().into_owned();
    let key_file = certificate.key_file.to_string_lossy().into_owned();
    let gateway = GatewayProcess::start(
        &redis,
        &[
            ("SSEHUB__SERVER__TLS__CERT_FILE", cert_file.as_str()),
            ("SSEHUB__SERVER__TLS__KEY_FILE", key_file.as_str()),
            ("SSEHUB__LIMITS__HEADER_READ_TIMEOUT_SECS", "2"),
        ],
        Some(DESCRIPTORS),
    )
    .await?;

    let mut silent = silent_tls_sessions(&gateway, &certificate, SILENT_SESSIONS).await?;
    // The cap (descriptors minus the reserve, 108 here) admitted some and refused the rest at
    // accept; on a slow machine the deadline may free slots before the last handshakes.
    assert!(
        silent.len() >= 20,
        "only {} silent sessions completed the handshake",
        silent.len()
    );

    // The attacker holds all its sockets open; a normal client is served within a bounded
    // number of tries (refused until the first-request deadline frees the slots).
    let started = Instant::now();
    let mut client = None;
    for _ in 0..50 {
        client = tls_events(&gateway, &certificate, "a").await?;
        if client.is_some() || started.elapsed() > 3 * PATIENCE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut client = client.ok_or("no TLS stream was served while the silent sessions held")?;
    redis.publish("a", "still served").await?;
    assert_eq!(client.next_data(1).await?, ["still served"]);

    // Every silent session was closed by the gateway, none by the attacker.
    let held = silent.len();
    for session in &mut silent {
        assert!(
            closed_within(session, PATIENCE).await,
            "a silent TLS session stayed open"
        );
    }
    let expired = expired_connections(gateway.admin, "first_request_timeout").await?;
    assert!(expired >= held as f64, "{expired} expired of {held} held");
    let (status, _) = get(gateway.admin, "/readyz", &[]).await?;
    assert_eq!(status, 200);
    let log = gateway.log();
    assert!(!log.contains("Too many open files"), "{log}");
    Ok(())
}
