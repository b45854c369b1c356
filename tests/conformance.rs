//! One HTTP contract on both code paths: every `/events` behaviour a client sees (statuses, JSON
//! errors, CORS, headers, resume, heartbeats) is checked on the HTTP/1.1 fast path and through
//! hyper (`server.http1_fast_path = false`), and the two answer with the same headers.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP: &str = "https://app.example";

/// Headers that describe the transport rather than the answer: allowed to differ.
const FRAMING: [&str; 4] = [
    "connection",
    "content-length",
    "transfer-encoding",
    "keep-alive",
];

async fn gateway(redis: &TestRedis, fast_path: bool) -> TestResult<TestGateway> {
    let mut settings = test_settings(redis);
    settings.server.http1_fast_path = fast_path;
    settings.server.cors_origins = vec![APP.to_string()];
    settings.channels.public = vec!["open:*".to_string()];
    settings.sse.heartbeat_secs = 1;
    TestGateway::start_ready(settings).await
}

/// Status and the answer's header names (without framing) for `path` with an allowed Origin.
async fn head(gateway: &TestGateway, method: &str, path: &str) -> TestResult<(u16, Vec<String>)> {
    let (status, headers) = response_head(gateway.addr, method, path, &[("Origin", APP)]).await?;
    assert!(headers.contains_key("date"), "{method} {path}: no Date");
    if status != 200 && status != 204 {
        assert_eq!(
            headers["content-type"], "application/json",
            "{method} {path}"
        );
    }
    assert_eq!(
        headers
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some(APP),
        "{method} {path}"
    );
    let names: BTreeSet<String> = headers
        .keys()
        .map(|name| name.as_str().to_string())
        .filter(|name| !FRAMING.contains(&name.as_str()))
        .collect();
    Ok((status, names.into_iter().collect()))
}

/// Every status `/events` can answer a single client with, and the headers of each.
async fn answers(gateway: &TestGateway) -> TestResult<Vec<(u16, Vec<String>)>> {
    let mut answers = Vec::new();
    for (method, path, status) in [
        ("GET", "/events?channel=open:a", 200),
        ("GET", "/events", 400),
        ("GET", "/events?channel=open:a&bogus=1", 400),
        ("GET", "/events?channel=secret", 403),
        ("GET", "/nowhere", 404),
        ("POST", "/events?channel=open:a", 405),
        ("OPTIONS", "/events?channel=open:a", 204),
    ] {
        let answer = head(gateway, method, path).await?;
        assert_eq!(answer.0, status, "{method} {path}");
        answers.push(answer);
    }
    Ok(answers)
}

/// A raw oversized head: `431` with the JSON body.
async fn oversized(gateway: &TestGateway) -> TestResult<String> {
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await?;
    let huge = format!(
        "GET /events?channel=open:a HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "y".repeat(20_000)
    );
    stream.write_all(huge.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer)).await??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

async fn streams_resumes_and_beats(gateway: &TestGateway, redis: &TestRedis) -> TestResult {
    let mut client = gateway.subscribe("channel=open:a").await?;
    assert!(client.next_block().await?.retry.is_some(), "preamble");
    redis.publish("open:a", "one").await?;
    assert_eq!(client.next_data(1).await?, ["one"]);
    let id = client.last_event_id.clone().ok_or("no id")?;
    // Heartbeats while idle.
    let beat = client.next_block_within(Duration::from_secs(3)).await?;
    assert!(beat.comments > 0 && !beat.is_event(), "{beat:?}");
    drop(client);
    redis.publish("open:a", "two").await?;
    redis.publish("open:a", "three").await?;
    let mut resumed = gateway
        .subscribe_with("channel=open:a", &[("Last-Event-ID", id.as_str())])
        .await?;
    assert_eq!(resumed.next_data(2).await?, ["two", "three"]);
    Ok(())
}

#[tokio::test]
async fn both_code_paths_keep_one_contract() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut contracts = Vec::new();
    for fast_path in [true, false] {
        let gateway = gateway(&redis, fast_path).await?;
        contracts.push(answers(&gateway).await?);
        let answer = oversized(&gateway).await?;
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.60}");
        assert!(answer.contains("\"error\""), "{answer}");
        streams_resumes_and_beats(&gateway, &redis).await?;
        gateway.stop().await?;
    }
    assert_eq!(contracts[0], contracts[1], "fast path vs hyper");
    Ok(())
}
