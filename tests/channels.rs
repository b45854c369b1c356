//! The channel cap (`channels.max_total`): lingering channels are freed early, oldest idle
//! first, and unsubscribed in Redis; when every channel has a reader, new channels get `503`
//! and nothing is left behind.
//!
//! The tests run one at a time (`SERIAL`): they read process-wide counters from `/metrics`
//! (the recorder is global), in particular the count of streams closed by their client, which
//! is how a test knows that a stream it closed has released its channels.

mod support;

use std::collections::BTreeSet;

use support::*;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CLIENT_GONE: &str = "ssehub_connections_closed_total{reason=\"client_gone\"}";
const REJECTED_503: &str = "ssehub_requests_rejected_total{status=\"503\"}";
const EVICTED: &str = "ssehub_channels_evicted_total";

/// A gateway holding at most `max_total` channels, with the default 300 s linger: without the
/// cap nothing would be freed during the test.
async fn capped_gateway(redis: &TestRedis, max_total: usize) -> TestResult<TestGateway> {
    let mut settings = test_settings(redis);
    settings.channels.max_total = max_total;
    settings.history.linger_secs = 300;
    TestGateway::start_ready(settings).await
}

/// Opens a stream on `channel` and waits for its first block (the subscription is live).
async fn reader(gateway: &TestGateway, channel: &str) -> TestResult<SseClient> {
    let mut client = gateway.subscribe(&format!("channel={channel}")).await?;
    client.next_block().await?;
    Ok(client)
}

/// Reads `channel` once and leaves; returns when the gateway has seen the stream close, so
/// the channel is lingering.
async fn read_and_leave(gateway: &TestGateway, channel: &str) -> TestResult {
    let closed = metric(gateway.admin, CLIENT_GONE).await?;
    drop(reader(gateway, channel).await?);
    let admin = gateway.admin;
    eventually(
        &format!("the stream on {channel} is closed"),
        || async move { matches!(metric(admin, CLIENT_GONE).await, Ok(n) if n > closed) },
    )
    .await
}

/// Waits until Redis holds exactly `expected` subscriptions.
async fn expect_subscribed(redis: &TestRedis, expected: &[&str]) -> TestResult {
    let expected: BTreeSet<String> = expected.iter().map(|c| c.to_string()).collect();
    eventually(&format!("Redis is subscribed to {expected:?}"), || async {
        matches!(redis.subscribed_channels().await,
            Ok(channels) if channels.iter().cloned().collect::<BTreeSet<_>>() == expected)
    })
    .await
}

/// Asserts `/events?<query>` is refused with `503`, `Retry-After` and a JSON error body.
async fn expect_channel_limit(gateway: &TestGateway, query: &str) -> TestResult {
    let path = format!("/events?{query}");
    let (status, headers) = response_head(gateway.addr, "GET", &path, &[]).await?;
    assert_eq!(status, 503, "{query}");
    assert!(headers.get("retry-after").is_some(), "no Retry-After");
    assert_eq!(headers["content-type"], "application/json");
    let (status, body) = open_status(gateway.addr, &path, &[]).await?;
    assert_eq!(status, 503, "{query}");
    let body: serde_json::Value = serde_json::from_str(&body.ok_or("no body")?)?;
    let message = body["error"].as_str().ok_or("no error message")?;
    assert!(message.contains("channels"), "{message}");
    Ok(())
}

#[tokio::test]
async fn the_oldest_idle_channel_is_freed_to_make_room() -> TestResult {
    let _serial = SERIAL.lock().await;
    let redis = TestRedis::start().await?;
    let gateway = capped_gateway(&redis, 4).await?;
    let evicted = metric(gateway.admin, EVICTED).await?;
    for channel in ["a", "b", "c", "d"] {
        read_and_leave(&gateway, channel).await?;
    }
    expect_subscribed(&redis, &["a", "b", "c", "d"]).await?;

    let mut fifth = reader(&gateway, "e").await?;
    expect_subscribed(&redis, &["b", "c", "d", "e"]).await?;
    assert_eq!(metric(gateway.admin, EVICTED).await?, evicted + 1.0);
    redis.publish("e", "after the eviction").await?;
    assert_eq!(fifth.next_data(1).await?, ["after the eviction"]);

    drop(fifth);
    gateway.stop().await
}

#[tokio::test]
async fn a_new_channel_gets_503_while_every_channel_has_a_reader() -> TestResult {
    let _serial = SERIAL.lock().await;
    let redis = TestRedis::start().await?;
    let gateway = capped_gateway(&redis, 4).await?;
    let mut readers = Vec::new();
    for channel in ["a", "b", "c", "d"] {
        readers.push(reader(&gateway, channel).await?);
    }
    let before = scrape(gateway.admin).await?;

    expect_channel_limit(&gateway, "channel=e").await?;
    let after = scrape(gateway.admin).await?;
    assert_eq!(after[REJECTED_503], before[REJECTED_503] + 2.0);
    assert_eq!(after[EVICTED], before[EVICTED]);
    assert_eq!(get(gateway.admin, "/readyz", &[]).await?.0, 200);
    expect_subscribed(&redis, &["a", "b", "c", "d"]).await?;
    for (channel, client) in ["a", "b", "c", "d"].into_iter().zip(&mut readers) {
        redis
            .publish(channel, format!("still flowing on {channel}"))
            .await?;
        assert_eq!(
            client.next_data(1).await?,
            [format!("still flowing on {channel}")]
        );
    }

    // Once a reader leaves, its channel makes room.
    let closed = metric(gateway.admin, CLIENT_GONE).await?;
    drop(readers.remove(0));
    let admin = gateway.admin;
    eventually("the stream on a is closed", || async move {
        matches!(metric(admin, CLIENT_GONE).await, Ok(n) if n > closed)
    })
    .await?;
    let fifth = reader(&gateway, "e").await?;
    expect_subscribed(&redis, &["b", "c", "d", "e"]).await?;
    assert_eq!(metric(gateway.admin, EVICTED).await?, before[EVICTED] + 1.0);

    drop((readers, fifth));
    gateway.stop().await
}

#[tokio::test]
async fn a_multi_channel_request_that_cannot_fit_is_refused_whole() -> TestResult {
    let _serial = SERIAL.lock().await;
    let redis = TestRedis::start().await?;
    let gateway = capped_gateway(&redis, 4).await?;
    let mut readers = Vec::new();
    for channel in ["a", "b", "c"] {
        readers.push(reader(&gateway, channel).await?);
    }
    read_and_leave(&gateway, "d").await?;
    let evicted = metric(gateway.admin, EVICTED).await?;

    // Two new channels need two idle ones; "d" alone is not enough and is not freed.
    expect_channel_limit(&gateway, "channel=x&channel=y").await?;
    expect_subscribed(&redis, &["a", "b", "c", "d"]).await?;
    assert_eq!(metric(gateway.admin, EVICTED).await?, evicted);

    let single = reader(&gateway, "x").await?;
    expect_subscribed(&redis, &["a", "b", "c", "x"]).await?;

    drop((readers, single));
    gateway.stop().await
}
