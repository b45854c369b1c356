//! Replays are read in bounded pieces as the client takes them: a resumed client that never
//! reads does not keep history the ring has evicted, and replayed events stay out of the fan-out
//! latency histogram.
//!
//! The memory test runs the gateway binary, so its resident memory is the gateway's alone. The
//! latency test runs the only in-process gateway of this test binary, so the process-wide
//! metrics recorder sees its traffic alone and exact values can be asserted.

mod support;

use std::net::SocketAddr;

use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

/// Ring capacity of the memory test, as in the reported attack.
const CAPACITY: usize = 1000;
/// Payload size of the memory test.
const PAYLOAD_BYTES: usize = 16 * 1024;
/// Resumed connections that never read, opened per round.
const STALLED_PER_ROUND: usize = 10;
/// Rounds of "open stalled resumes 1000 back, then publish 1000 more (evicting them)". The old
/// code kept each round's replay (1000 x 16 KiB, about 16 MiB) alive until the connections
/// closed.
const ROUNDS: usize = 4;
/// Allowed growth of the gateway's resident memory over the rounds. The old code grew by about
/// 16 MiB per round (measured: +44.6 MiB here); bounded pieces: +0.2 to +10.8 MiB.
const MAX_GROWTH_KIB: u64 = 24 * 1024;

/// The gateway binary with a ring of `CAPACITY` events.
async fn start_binary(redis: &TestRedis) -> TestResult<GatewayProcess> {
    let capacity = CAPACITY.to_string();
    let env = [
        ("SSEHUB__HISTORY__CAPACITY", capacity.as_str()),
        ("SSEHUB__LOG__LEVEL", "warn"),
    ];
    GatewayProcess::start(redis, &env, None).await
}

/// Waits until the gateway has `count` open streams.
async fn wait_for_streams(admin: SocketAddr, count: usize) -> TestResult {
    eventually(&format!("{count} open streams"), || async move {
        matches!(metric(admin, "ssehub_connections").await, Ok(n) if n == count as f64)
    })
    .await
}

/// A payload of `PAYLOAD_BYTES` that starts with its number.
fn payload(n: usize) -> String {
    let mut payload = format!("{n:08} ");
    payload.extend(std::iter::repeat_n('x', PAYLOAD_BYTES - payload.len()));
    payload
}

/// Publishes payloads `from..to` on one connection, pipelined in batches.
async fn publish_range(redis: &TestRedis, channel: &str, from: usize, to: usize) -> TestResult {
    let mut conn = redis.connection().await?;
    let numbers: Vec<usize> = (from..to).collect();
    for batch in numbers.chunks(100) {
        let mut pipe = redis::pipe();
        for n in batch {
            pipe.cmd("PUBLISH").arg(channel).arg(payload(*n)).ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
    }
    Ok(())
}

/// Reads events `from..to` in order, checking each one's number.
async fn expect_range(client: &mut SseClient, from: usize, to: usize) -> TestResult {
    for n in from..to {
        let event = client.next_event().await?;
        let number = event.data().split(' ').next().unwrap_or("");
        assert_eq!(
            number,
            format!("{n:08}"),
            "event {n} out of order or missing"
        );
        assert_eq!(event.data().len(), PAYLOAD_BYTES);
    }
    Ok(())
}

/// Opens a stream resuming from `id` with a tiny receive buffer, and never reads from it.
async fn open_stalled(addr: SocketAddr, id: &str) -> TestResult<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut stream = socket.connect(addr).await?;
    let request =
        format!("GET /events?channel=big HTTP/1.1\r\nHost: {addr}\r\nLast-Event-ID: {id}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    Ok(stream)
}

#[tokio::test]
async fn a_resumed_client_that_never_reads_does_not_pin_evicted_history() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = start_binary(&redis).await?;
    let mut reader = SseClient::open(gateway.addr, "/events?channel=big", &[])
        .await?
        .1;
    reader.next_block().await?;
    publish_range(&redis, "big", 0, CAPACITY).await?;
    expect_range(&mut reader, 0, CAPACITY).await?;
    // The ring is full: from here on every event published evicts one. One more turn of the
    // ring warms the allocator up (freed frames are reused from then on) before the baseline.
    let mut round_start = reader.last_event_id.clone().ok_or("no last id")?;
    publish_range(&redis, "big", CAPACITY, 2 * CAPACITY).await?;
    expect_range(&mut reader, CAPACITY, 2 * CAPACITY).await?;
    let baseline = gateway.rss_kib()?;

    let mut stalled = Vec::new();
    for round in 2..ROUNDS + 2 {
        for _ in 0..STALLED_PER_ROUND {
            stalled.push(open_stalled(gateway.addr, &round_start).await?);
        }
        wait_for_streams(gateway.admin, 1 + stalled.len()).await?;
        round_start = reader.last_event_id.clone().ok_or("no last id")?;
        publish_range(&redis, "big", round * CAPACITY, (round + 1) * CAPACITY).await?;
        // A normal client still gets every event, in order, and the instance stays ready.
        expect_range(&mut reader, round * CAPACITY, (round + 1) * CAPACITY).await?;
        assert_eq!(get(gateway.admin, "/readyz", &[]).await?.0, 200);
    }
    let grown = gateway.rss_kib()?.saturating_sub(baseline);
    println!(
        "gateway VmRSS {baseline} KiB with a full ring, +{grown} KiB after {ROUNDS} rounds of \
         {STALLED_PER_ROUND} stalled resumes"
    );
    assert!(
        grown < MAX_GROWTH_KIB,
        "stalled resumes pinned memory: VmRSS grew by {grown} KiB"
    );

    // A normal resume from 1000 events back replays exactly them, in order, over many pieces.
    let (_, mut resumed) = SseClient::open(
        gateway.addr,
        "/events?channel=big",
        &[("Last-Event-ID", &round_start)],
    )
    .await?;
    let preamble = resumed.next_block().await?;
    assert_eq!(preamble.id.as_deref(), Some(round_start.as_str()));
    expect_range(
        &mut resumed,
        (ROUNDS + 1) * CAPACITY,
        (ROUNDS + 2) * CAPACITY,
    )
    .await?;
    publish_range(&redis, "big", 0, 1).await?;
    expect_range(&mut resumed, 0, 1).await?;
    expect_range(&mut reader, 0, 1).await?;
    drop(stalled);
    Ok(())
}

#[tokio::test]
async fn replayed_events_stay_out_of_the_fanout_latency_histogram() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let admin = gateway.admin;
    let mut live = gateway.subscribe("channel=lat").await?;
    let position = live.next_block().await?.id.ok_or("preamble without id")?;
    for n in 0..5 {
        redis.publish("lat", format!("{n}")).await?;
    }
    assert_eq!(live.next_data(5).await?, ["0", "1", "2", "3", "4"]);
    assert_eq!(
        metric(admin, "ssehub_fanout_latency_seconds_count").await?,
        5.0
    );

    // A client that was away for all five resumes and gets them again: replays, not fan-out.
    let mut resumed = gateway
        .subscribe_with("channel=lat", &[("Last-Event-ID", &position)])
        .await?;
    resumed.next_block().await?;
    assert_eq!(resumed.next_data(5).await?, ["0", "1", "2", "3", "4"]);
    let metrics = scrape(admin).await?;
    assert_eq!(metrics["ssehub_fanout_latency_seconds_count"], 5.0);
    assert_eq!(metrics["ssehub_events_replayed_total"], 5.0);
    assert_eq!(metrics["ssehub_resumes_total{outcome=\"replayed\"}"], 1.0);
    assert_eq!(metrics["ssehub_events_delivered_total"], 10.0);

    // A live event afterwards is fan-out for both.
    redis.publish("lat", "live").await?;
    assert_eq!(live.next_data(1).await?, ["live"]);
    assert_eq!(resumed.next_data(1).await?, ["live"]);
    let metrics = scrape(admin).await?;
    assert_eq!(metrics["ssehub_fanout_latency_seconds_count"], 7.0);
    assert_eq!(metrics["ssehub_events_delivered_total"], 12.0);
    assert_eq!(metrics["ssehub_events_replayed_total"], 5.0);
    gateway.stop().await
}
