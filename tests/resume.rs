//! Resumption: `Last-Event-ID` replays exactly what was missed, or says plainly why it cannot.

mod support;

use std::time::Duration;

use support::*;

/// Connects, reads the preamble, and returns the client with its position.
async fn connect(gateway: &TestGateway, query: &str) -> TestResult<(SseClient, String)> {
    let mut client = gateway.subscribe(query).await?;
    let preamble = client.next_block().await?;
    let id = preamble.id.ok_or("preamble without id")?;
    Ok((client, id))
}

async fn publish_all(redis: &TestRedis, channel: &str, payloads: &[&str]) -> TestResult {
    for payload in payloads {
        redis.publish(channel, payload).await?;
    }
    Ok(())
}

#[tokio::test]
async fn resumes_with_exactly_the_missed_events_from_the_header() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let (mut client, _) = connect(&gateway, "channel=orders").await?;
    publish_all(&redis, "orders", &["1", "2", "3"]).await?;
    assert_eq!(client.next_data(3).await?, ["1", "2", "3"]);
    let last = client.last_event_id.clone().ok_or("no last id")?;
    drop(client);

    publish_all(&redis, "orders", &["4", "5", "6"]).await?;
    let mut resumed = gateway
        .subscribe_with("channel=orders", &[("Last-Event-ID", &last)])
        .await?;
    let preamble = resumed.next_block().await?;
    assert_eq!(preamble.id.as_deref(), Some(last.as_str()));
    assert_eq!(resumed.next_data(3).await?, ["4", "5", "6"]);
    redis.publish("orders", "7").await?;
    assert_eq!(resumed.next_data(1).await?, ["7"]);
    resumed.expect_no_event(Duration::from_millis(300)).await?;
    gateway.stop().await
}

#[tokio::test]
async fn resumes_from_the_last_event_id_query_parameter() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let (mut client, _) = connect(&gateway, "channel=q").await?;
    publish_all(&redis, "q", &["a"]).await?;
    client.next_event().await?;
    let last = client.last_event_id.clone().ok_or("no last id")?;
    drop(client);
    publish_all(&redis, "q", &["b", "c"]).await?;

    let (mut resumed, _) = connect(&gateway, &format!("channel=q&lastEventId={last}")).await?;
    assert_eq!(resumed.next_data(2).await?, ["b", "c"]);
    // The header wins over the query parameter when both are present.
    let newest = resumed.last_event_id.clone().ok_or("no last id")?;
    let mut by_header = gateway
        .subscribe_with(
            &format!("channel=q&lastEventId={last}"),
            &[("Last-Event-ID", &newest)],
        )
        .await?;
    by_header.next_block().await?;
    by_header
        .expect_no_event(Duration::from_millis(300))
        .await?;
    gateway.stop().await
}

#[tokio::test]
async fn resumes_a_client_that_had_received_no_event_yet() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let (client, start) = connect(&gateway, "channel=fresh").await?;
    drop(client);
    publish_all(&redis, "fresh", &["missed 1", "missed 2"]).await?;
    let mut resumed = gateway
        .subscribe_with("channel=fresh", &[("Last-Event-ID", &start)])
        .await?;
    resumed.next_block().await?;
    assert_eq!(resumed.next_data(2).await?, ["missed 1", "missed 2"]);
    gateway.stop().await
}

#[tokio::test]
async fn foreign_or_malformed_ids_get_unknown_position_then_live_events() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let (client, own) = connect(&gateway, "channel=x").await?;
    drop(client);
    let (epoch, _) = own.split_once('-').ok_or("id shape")?;
    let ahead = format!("{epoch}-999999");
    for bad in ["0000000000000000-1", "garbage", ahead.as_str()] {
        let mut client = gateway
            .subscribe_with("channel=x&channel=y", &[("Last-Event-ID", bad)])
            .await?;
        client.next_block().await?;
        let reset = client.next_event().await?;
        assert_eq!(
            reset.reset(),
            Some((
                "unknown_position".to_string(),
                vec!["x".to_string(), "y".to_string()]
            ))
        );
        assert!(reset.id.is_some());
        redis.publish("y", format!("live after {bad}")).await?;
        assert_eq!(client.next_data(1).await?, [format!("live after {bad}")]);
    }
    gateway.stop().await
}

#[tokio::test]
async fn evicted_history_sends_history_expired_then_live_events() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.history.capacity = 3;
    let gateway = TestGateway::start_ready(settings).await?;
    let (client, start) = connect(&gateway, "channel=busy").await?;
    drop(client);
    let (mut witness, _) = connect(&gateway, "channel=busy").await?;
    publish_all(&redis, "busy", &["1", "2", "3", "4", "5"]).await?;
    // Once a live client saw them, the gateway has ingested (and evicted) them.
    witness.next_data(5).await?;

    let mut resumed = gateway
        .subscribe_with("channel=busy", &[("Last-Event-ID", &start)])
        .await?;
    resumed.next_block().await?;
    let reset = resumed.next_event().await?;
    assert_eq!(
        reset.reset(),
        Some(("history_expired".to_string(), vec!["busy".to_string()]))
    );
    redis.publish("busy", "6").await?;
    assert_eq!(resumed.next_data(1).await?, ["6"]);

    // A resume from the reset's id is complete again: nothing to replay, no reset.
    let reset_id = reset.id.ok_or("reset without id")?;
    let mut again = gateway
        .subscribe_with("channel=busy", &[("Last-Event-ID", &reset_id)])
        .await?;
    again.next_block().await?;
    assert_eq!(again.next_data(1).await?, ["6"]);
    gateway.stop().await
}

#[tokio::test]
async fn a_slow_reader_that_falls_off_the_ring_gets_history_expired() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.history.capacity = 2;
    let gateway = TestGateway::start_ready(settings).await?;
    let (client, start) = connect(&gateway, "channel=a&channel=b").await?;
    drop(client);
    let (mut witness, _) = connect(&gateway, "channel=a&channel=b").await?;
    // Channel a overflows, channel b does not: only a is reset, b replays.
    publish_all(&redis, "a", &["a1", "a2", "a3"]).await?;
    publish_all(&redis, "b", &["b1"]).await?;
    witness.next_data(4).await?;
    let mut resumed = gateway
        .subscribe_with("channel=a&channel=b", &[("Last-Event-ID", &start)])
        .await?;
    resumed.next_block().await?;
    assert_eq!(resumed.next_event().await?.data(), "b1");
    let reset = resumed.next_event().await?;
    assert_eq!(
        reset.reset(),
        Some(("history_expired".to_string(), vec!["a".to_string()]))
    );
    gateway.stop().await
}

#[tokio::test]
async fn events_older_than_max_age_are_not_replayed() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.history.max_age_secs = 1;
    let gateway = TestGateway::start_ready(settings).await?;
    let (client, start) = connect(&gateway, "channel=old").await?;
    drop(client);
    publish_all(&redis, "old", &["stale"]).await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let mut resumed = gateway
        .subscribe_with("channel=old", &[("Last-Event-ID", &start)])
        .await?;
    resumed.next_block().await?;
    let reset = resumed.next_event().await?;
    assert_eq!(
        reset.reset(),
        Some(("history_expired".to_string(), vec!["old".to_string()]))
    );
    gateway.stop().await
}

#[tokio::test]
async fn a_channel_not_subscribed_since_the_position_is_reset_and_others_replay() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let (client, start) = connect(&gateway, "channel=known").await?;
    drop(client);
    let (mut witness, _) = connect(&gateway, "channel=known").await?;
    publish_all(&redis, "known", &["k1", "k2"]).await?;
    witness.next_data(2).await?;
    // `new` was never subscribed: messages on it since `start` may have been missed.
    let mut resumed = gateway
        .subscribe_with("channel=known&channel=new", &[("Last-Event-ID", &start)])
        .await?;
    resumed.next_block().await?;
    assert_eq!(resumed.next_data(2).await?, ["k1", "k2"]);
    let reset = resumed.next_event().await?;
    assert_eq!(
        reset.reset(),
        Some(("history_expired".to_string(), vec!["new".to_string()]))
    );
    redis.publish("new", "n1").await?;
    assert_eq!(resumed.next_data(1).await?, ["n1"]);
    gateway.stop().await
}

#[tokio::test]
async fn a_channel_is_freed_after_linger() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.history.linger_secs = 1;
    let gateway = TestGateway::start_ready(settings).await?;
    let (client, start) = connect(&gateway, "channel=brief").await?;
    assert!(redis
        .subscribed_channels()
        .await?
        .contains(&"brief".to_string()));
    redis.publish("brief", "seen").await?;
    drop(client);

    eventually("Redis has no subscriber for `brief`", || async {
        matches!(redis.subscribed_channels().await, Ok(c) if !c.contains(&"brief".to_string()))
    })
    .await?;
    // Its history went with it: a resume cannot be proven complete.
    let mut resumed = gateway
        .subscribe_with("channel=brief", &[("Last-Event-ID", &start)])
        .await?;
    resumed.next_block().await?;
    let reset = resumed.next_event().await?;
    assert_eq!(
        reset.reset().map(|r| r.0).as_deref(),
        Some("history_expired")
    );
    assert!(redis
        .subscribed_channels()
        .await?
        .contains(&"brief".to_string()));
    gateway.stop().await
}

#[tokio::test]
async fn redis_restart_sends_upstream_interrupted_then_live_events() -> TestResult {
    let mut redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let (mut live, _) = connect(&gateway, "channel=r&channel=s").await?;
    let (mut other, _) = connect(&gateway, "channel=t").await?;
    let (away, _) = connect(&gateway, "channel=r").await?;
    redis.publish("r", "before").await?;
    assert_eq!(live.next_data(1).await?, ["before"]);
    let away_id = {
        let mut away = away;
        away.next_event().await?;
        away.last_event_id.clone().ok_or("no id")?
    };
    redis.publish("r", "missed but kept").await?;
    assert_eq!(live.next_data(1).await?, ["missed but kept"]);

    redis.kill().await?;
    gateway.wait_ready(503).await?;
    redis.restart().await?;
    gateway.wait_ready(200).await?;

    let reset = live.next_event().await?;
    assert_eq!(
        reset.reset(),
        Some((
            "upstream_interrupted".to_string(),
            vec!["r".to_string(), "s".to_string()]
        ))
    );
    let reset = other.next_event().await?;
    assert_eq!(
        reset.reset(),
        Some(("upstream_interrupted".to_string(), vec!["t".to_string()]))
    );
    eventually("the gateway re-subscribed", || async {
        matches!(redis.subscribed_channels().await, Ok(c) if c.len() == 3)
    })
    .await?;
    redis.publish("s", "after").await?;
    assert_eq!(live.next_data(1).await?, ["after"]);

    // A client that left before the outage replays up to the gap, learns of it, then continues.
    let mut resumed = gateway
        .subscribe_with("channel=r", &[("Last-Event-ID", &away_id)])
        .await?;
    resumed.next_block().await?;
    assert_eq!(resumed.next_data(1).await?, ["missed but kept"]);
    let reset = resumed.next_event().await?;
    assert_eq!(
        reset.reset().map(|r| r.0).as_deref(),
        Some("upstream_interrupted")
    );
    redis.publish("r", "after too").await?;
    assert_eq!(resumed.next_data(1).await?, ["after too"]);
    gateway.stop().await
}

#[tokio::test]
async fn a_gateway_started_while_redis_is_down_becomes_ready_when_it_appears() -> TestResult {
    let mut redis = TestRedis::start().await?;
    redis.kill().await?;
    let gateway = TestGateway::start(test_settings(&redis)).await?;
    gateway.wait_ready(503).await?;
    let (status, _) = get(gateway.admin, "/healthz", &[]).await?;
    assert_eq!(status, 200);

    // A client arriving meanwhile waits for the subscription instead of missing events.
    let addr = gateway.addr;
    let waiting =
        tokio::spawn(async move { SseClient::open(addr, "/events?channel=w", &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart().await?;
    gateway.wait_ready(200).await?;
    let (status, mut client) = waiting.await??;
    assert_eq!(status, 200);
    client.next_block().await?;
    redis.publish("w", "first").await?;
    assert_eq!(client.next_data(1).await?, ["first"]);
    gateway.stop().await
}

#[tokio::test]
async fn a_client_gets_503_when_the_subscription_cannot_be_confirmed() -> TestResult {
    let mut redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.redis.subscribe_timeout_secs = 1;
    redis.kill().await?;
    let gateway = TestGateway::start(settings).await?;
    let (status, body) = get(gateway.addr, "/events?channel=z", &[]).await?;
    assert_eq!(status, 503);
    let body: serde_json::Value = serde_json::from_str(&body)?;
    assert!(body["error"].is_string());
    gateway.stop().await
}

#[tokio::test]
async fn a_redis_that_stops_answering_is_detected_by_ping() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let (mut client, _) = connect(&gateway, "channel=h").await?;

    redis.freeze().await?;
    // PING every second with a 2 s timeout: the dead connection is noticed without any FIN.
    gateway.wait_ready(503).await?;
    redis.thaw().await?;
    gateway.wait_ready(200).await?;

    let reset = client.next_event().await?;
    assert_eq!(
        reset.reset().map(|r| r.0).as_deref(),
        Some("upstream_interrupted")
    );
    eventually("the gateway re-subscribed", || async {
        matches!(redis.subscribed_channels().await, Ok(c) if c.contains(&"h".to_string()))
    })
    .await?;
    redis.publish("h", "back").await?;
    assert_eq!(client.next_data(1).await?, ["back"]);
    gateway.stop().await
}
