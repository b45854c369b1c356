//! Graceful shutdown of the real binary: SIGTERM ends every stream with a spread-out final
//! `retry:`, readiness fails while draining, and the process exits within the grace period.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const RETRY_MS: u64 = 3000;
const JITTER_MS: u64 = 5000;
const GRACE_SECS: u64 = 5;

/// The gateway binary with a short grace period and a known retry and jitter.
async fn start_binary(redis: &TestRedis) -> TestResult<GatewayProcess> {
    let (retry, jitter, grace) = (
        RETRY_MS.to_string(),
        JITTER_MS.to_string(),
        GRACE_SECS.to_string(),
    );
    let env = [
        ("SSEHUB__SSE__RETRY_MS", retry.as_str()),
        ("SSEHUB__SERVER__SHUTDOWN_RETRY_JITTER_MS", jitter.as_str()),
        ("SSEHUB__SERVER__SHUTDOWN_GRACE_SECS", grace.as_str()),
    ];
    GatewayProcess::start(redis, &env, None).await
}

/// Reads blocks until the stream ends; returns the `retry:` values seen after `skip` blocks.
async fn retries_until_end(mut client: SseClient) -> TestResult<Vec<u64>> {
    let mut retries = Vec::new();
    loop {
        match client
            .next_block_within(Duration::from_secs(GRACE_SECS + 5))
            .await
        {
            Ok(block) => retries.extend(block.retry),
            Err(_) if client.ended => return Ok(retries),
            Err(e) => return Err(e),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_every_client_a_spread_retry_and_exits_within_grace() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut binary = start_binary(&redis).await?;
    let mut clients = Vec::new();
    for n in 0..500 {
        let (status, mut client) =
            SseClient::open(binary.addr, &format!("/events?channel=c{}", n % 10), &[]).await?;
        assert_eq!(status, 200);
        let preamble = client.next_block().await?;
        assert_eq!(preamble.retry, Some(RETRY_MS));
        clients.push(client);
    }
    let readers: Vec<_> = clients
        .into_iter()
        .map(|client| tokio::spawn(retries_until_end(client)))
        .collect();

    let signalled = Instant::now();
    binary.terminate().await?;
    let status = binary
        .exit_within(Duration::from_secs(GRACE_SECS + 2))
        .await?;
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(GRACE_SECS), "exit took {took:?}");

    let mut finals = Vec::new();
    for reader in readers {
        let retries = reader.await??;
        let last = *retries.last().ok_or("a client got no final retry")?;
        finals.push(last);
    }
    assert_eq!(finals.len(), 500);
    assert!(finals
        .iter()
        .all(|r| (RETRY_MS..=RETRY_MS + JITTER_MS).contains(r)));
    let mean = finals.iter().sum::<u64>() as f64 / finals.len() as f64;
    let variance = finals
        .iter()
        .map(|r| (*r as f64 - mean).powi(2))
        .sum::<f64>()
        / 500.0;
    // A uniform spread over 5000 ms has a standard deviation of about 1443 ms.
    assert!(
        variance.sqrt() > 1000.0,
        "retries not spread: sd {}",
        variance.sqrt()
    );
    let mut distinct = finals.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(
        distinct.len() > 300,
        "only {} distinct retry values",
        distinct.len()
    );
    Ok(())
}

/// Events of 512 KiB published for [`stuck_stream`]: 20 MiB, several times what a loopback
/// connection buffers (`net.ipv4.tcp_wmem` caps the gateway's send buffer at 4 MiB by default).
const FLOOD_EVENTS: usize = 40;

/// A stream on `channel` that cannot finish: its client reads up to the preamble, then never
/// again, while the stream has 20 MiB queued for it. The drain then lasts the whole grace
/// period, since the stream's final `retry:` stays behind bytes the socket never takes.
///
/// Nothing here depends on timing. The flood is published and received first, then the stuck
/// client resumes from before it. (Flooding a stream that is already open races with the
/// shutdown: a stream not yet woken for the flood when draining starts sends its `retry:` and
/// ends at once.) A replay is read one piece at a time as the socket takes it, so a stream
/// whose last piece just went into the socket may have nothing queued for a moment: the helper
/// returns only once the bytes handed to the socket stopped growing, when the socket is full
/// and the stream holds unsent bytes for good. The client also asks for a tiny receive buffer,
/// so how much the kernel takes off the gateway's hands does not depend on the machine's TCP
/// buffer settings.
async fn stuck_stream(
    binary: &GatewayProcess,
    redis: &TestRedis,
    channel: &str,
) -> TestResult<TcpStream> {
    let path = format!("/events?channel={channel}");
    let (status, mut first) = SseClient::open(binary.addr, &path, &[]).await?;
    assert_eq!(status, 200);
    let before_flood = first.next_block().await?.id.ok_or("preamble without id")?;
    let big = "x".repeat(512 * 1024);
    for _ in 0..FLOOD_EVENTS {
        let receivers = redis.publish(channel, &big).await?;
        assert_eq!(receivers, 1, "the gateway is subscribed to {channel}");
    }
    let admin = binary.admin;
    eventually("the gateway received the flood", || async move {
        matches!(metric(admin, "ssehub_events_received_total").await,
            Ok(received) if received >= FLOOD_EVENTS as f64)
    })
    .await?;
    drop(first);

    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut stuck = socket.connect(binary.addr).await?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nLast-Event-ID: {before_flood}\r\n\r\n");
    stuck.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while !String::from_utf8_lossy(&head).contains("retry:") {
            let mut buf = [0u8; 1024];
            match stuck.read(&mut buf).await? {
                0 => return Err("the stream closed before its preamble".into()),
                n => head.extend_from_slice(&buf[..n]),
            }
        }
        TestResult::Ok(())
    })
    .await
    .map_err(|_| "no stream preamble")??;
    socket_filled(binary.admin).await?;
    Ok(stuck)
}

/// Waits until `ssehub_bytes_sent_total` holds still across three scrapes in a row.
async fn socket_filled(admin: std::net::SocketAddr) -> TestResult {
    let mut last = -1.0;
    let mut unchanged = 0;
    let deadline = Instant::now() + PATIENCE;
    while unchanged < 3 {
        if Instant::now() > deadline {
            return Err("the bytes sent to the stuck client never stopped growing".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sent = metric(admin, "ssehub_bytes_sent_total").await?;
        unchanged = if sent == last { unchanged + 1 } else { 0 };
        last = sent;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_as_soon_as_draining_starts() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut binary = start_binary(&redis).await?;
    // Holds the drain open for the whole grace period, so the checks below run while draining.
    let stuck = stuck_stream(&binary, &redis, "flood").await?;
    binary.terminate().await?;
    let admin = binary.admin;
    eventually("/readyz answers 503 while draining", || async move {
        matches!(get(admin, "/readyz", &[]).await, Ok((503, body)) if body.contains("draining"))
    })
    .await?;
    // The admin listener is still up (liveness answers) until the process exits.
    let (health, _) = get(binary.admin, "/healthz", &[]).await?;
    assert_eq!(health, 200);
    let status = binary
        .exit_within(PATIENCE + Duration::from_secs(GRACE_SECS))
        .await?;
    assert!(status.success());
    drop(stuck);
    Ok(())
}
