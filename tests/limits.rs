//! Limits: each cap is answered with a clear status and JSON, and recovers; abusive clients do
//! not disturb the others.

mod support;

use std::net::IpAddr;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn open(
    gateway: &TestGateway,
    source: &str,
    headers: &[(&str, &str)],
) -> TestResult<(u16, SseClient)> {
    let source: IpAddr = source.parse()?;
    SseClient::open_from(Some(source), gateway.addr, "/events?channel=a", headers).await
}

async fn expect_refused(
    gateway: &TestGateway,
    source: &str,
    headers: &[(&str, &str)],
    status: u16,
) -> TestResult {
    let (got, client) = open(gateway, source, headers).await?;
    assert_eq!(got, status);
    assert!(
        client.headers.get("retry-after").is_some(),
        "no Retry-After"
    );
    assert_eq!(client.headers["content-type"], "application/json");
    Ok(())
}

/// A client that is streaming and keeps receiving while limits bite elsewhere.
async fn streaming(gateway: &TestGateway) -> TestResult<SseClient> {
    let mut client = gateway.subscribe("channel=a").await?;
    client.next_block().await?;
    Ok(client)
}

#[tokio::test]
async fn the_connection_cap_answers_503_and_recovers() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.limits.max_connections = 2;
    let gateway = TestGateway::start_ready(settings).await?;
    let mut first = streaming(&gateway).await?;
    let second = streaming(&gateway).await?;
    expect_refused(&gateway, "127.0.0.1", &[], 503).await?;
    redis.publish("a", "still flowing").await?;
    assert_eq!(first.next_data(1).await?, ["still flowing"]);

    drop(second);
    eventually("a slot frees up", || async {
        matches!(open(&gateway, "127.0.0.1", &[]).await, Ok((200, _)))
    })
    .await?;
    gateway.stop().await
}

#[tokio::test]
async fn the_per_address_cap_answers_429_and_counts_forwarded_clients() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.limits.max_connections_per_ip = 2;
    settings.limits.trusted_proxies = vec!["127.0.0.9".parse()?];
    let gateway = TestGateway::start_ready(settings).await?;
    let mut held = Vec::new();
    for _ in 0..2 {
        let (status, client) = open(&gateway, "127.0.0.2", &[]).await?;
        assert_eq!(status, 200);
        held.push(client);
    }
    expect_refused(&gateway, "127.0.0.2", &[], 429).await?;
    // Another address is not affected, and spoofed X-Forwarded-For from a non-proxy is ignored.
    let (status, _other) = open(&gateway, "127.0.0.3", &[]).await?;
    assert_eq!(status, 200);
    expect_refused(
        &gateway,
        "127.0.0.2",
        &[("X-Forwarded-For", "10.0.0.1")],
        429,
    )
    .await?;

    // Behind a trusted proxy, each forwarded client gets its own allowance.
    let mut via_proxy = Vec::new();
    for client in ["10.0.0.1", "10.0.0.1", "10.0.0.2"] {
        let (status, c) = open(&gateway, "127.0.0.9", &[("X-Forwarded-For", client)]).await?;
        assert_eq!(status, 200, "{client}");
        via_proxy.push(c);
    }
    expect_refused(
        &gateway,
        "127.0.0.9",
        &[("X-Forwarded-For", "10.0.0.1")],
        429,
    )
    .await?;

    held.pop();
    eventually("the address is below its cap again", || async {
        matches!(open(&gateway, "127.0.0.2", &[]).await, Ok((200, _)))
    })
    .await?;
    gateway.stop().await
}

#[tokio::test]
async fn a_burst_above_the_new_connection_rate_gets_503_while_others_keep_receiving() -> TestResult
{
    const RATE: u32 = 5;
    /// Bounds the burst; it normally meets a refusal after about RATE streams.
    const MAX_BURST: usize = 200;
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.limits.max_new_connections_per_sec = RATE;
    let gateway = TestGateway::start_ready(settings).await?;
    let mut connected = streaming(&gateway).await?;
    // The bucket holds at most one second's worth, so after a second it is full however long
    // this sleep really took: only its lower bound matters.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // Open streams back to back until one is refused. How many get in depends on how fast this
    // machine opens them (the bucket refills meanwhile), so the bounds below are computed from
    // the burst's measured duration instead of assuming one.
    let burst_started = tokio::time::Instant::now();
    let mut statuses = Vec::new();
    let mut admitted = Vec::new();
    while statuses.len() < MAX_BURST && !statuses.contains(&503) {
        let (status, client) = open(&gateway, "127.0.0.1", &[]).await?;
        if status == 503 {
            assert_eq!(client.headers["retry-after"], "1");
        }
        statuses.push(status);
        admitted.push(client);
    }
    let burst = burst_started.elapsed();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(
        statuses.last(),
        Some(&503),
        "no refusal in a burst of {MAX_BURST} at {RATE}/s over {burst:?}"
    );
    assert_eq!(ok + 1, statuses.len(), "{statuses:?}");
    // A full bucket admits RATE at once, then at most RATE per second of the burst.
    let refilled = (burst.as_secs_f64() * f64::from(RATE)).ceil() as usize;
    let most = RATE as usize + refilled;
    assert!(
        (RATE as usize..=most).contains(&ok),
        "admitted {ok} before the first refusal at {RATE}/s in {burst:?} (expected {RATE}..={most})"
    );
    redis.publish("a", "unaffected").await?;
    assert_eq!(connected.next_data(1).await?, ["unaffected"]);

    eventually(
        "a new stream is admitted once the bucket refills",
        || async { matches!(open(&gateway, "127.0.0.1", &[]).await, Ok((200, _))) },
    )
    .await?;
    gateway.stop().await
}

#[tokio::test]
async fn a_slowloris_connection_is_closed_while_streams_keep_receiving() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.limits.header_read_timeout_secs = 1;
    let gateway = TestGateway::start_ready(settings).await?;
    let mut normal = streaming(&gateway).await?;

    let mut slow = TcpStream::connect(gateway.addr).await?;
    slow.write_all(b"GET /events?channel=a HTTP/1.1\r\nHost: x\r\n")
        .await?;
    let started = tokio::time::Instant::now();
    let mut closed = false;
    // The head timeout is 1 s; the patience only bounds the loop (the idle timeout, the other
    // deadline that could close it, is 60 s).
    while started.elapsed() < PATIENCE {
        // One header byte every 200 ms: never completes the head.
        if slow.write_all(b"X").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(200), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => {} // an error response before the close is fine
            Err(_) => {}
        }
    }
    assert!(
        closed,
        "slowloris connection still open after {:?}",
        started.elapsed()
    );

    // The stream opened before outlives the header timeout and keeps receiving.
    redis.publish("a", "after slowloris").await?;
    assert_eq!(normal.next_data(1).await?, ["after slowloris"]);
    gateway.stop().await
}

#[tokio::test]
async fn oversized_request_heads_are_refused() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let huge = "x".repeat(32 * 1024);
    let (status, _) = get(gateway.addr, "/events?channel=a", &[("X-Padding", &huge)]).await?;
    assert_eq!(status, 431);
    let mut after = streaming(&gateway).await?;
    redis.publish("a", "fine").await?;
    assert_eq!(after.next_data(1).await?, ["fine"]);
    gateway.stop().await
}

#[tokio::test]
async fn payloads_over_the_size_limit_are_dropped_and_others_flow() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.limits.max_payload_bytes = 100;
    let gateway = TestGateway::start_ready(settings).await?;
    let mut client = streaming(&gateway).await?;
    redis.publish("a", "y".repeat(101)).await?;
    redis.publish("a", "z".repeat(100)).await?;
    assert_eq!(client.next_data(1).await?, ["z".repeat(100)]);
    gateway.stop().await
}
