//! Live delivery: Redis messages reach SSE clients, encoded safely, in publish order.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test]
async fn delivers_events_on_one_channel_in_publish_order() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let mut client = gateway.subscribe("channel=orders").await?;
    assert_eq!(client.headers["content-type"], "text/event-stream");
    assert_eq!(client.headers["cache-control"], "no-cache");
    assert_eq!(client.headers["x-accel-buffering"], "no");

    let preamble = client.next_block().await?;
    assert_eq!(preamble.retry, Some(3000));
    assert!(preamble.id.is_some() && !preamble.is_event());

    for n in 0..20 {
        assert_eq!(redis.publish("orders", format!("order {n}")).await?, 1);
    }
    let expected: Vec<String> = (0..20).map(|n| format!("order {n}")).collect();
    assert_eq!(client.next_data(20).await?, expected);
    gateway.stop().await
}

#[tokio::test]
async fn delivers_several_channels_in_one_global_order() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let mut client = gateway
        .subscribe("channel=orders&channel=user%3A42&channel=orders")
        .await?;
    client.next_block().await?;

    let mut expected = Vec::new();
    for n in 0..30 {
        let channel = if n % 3 == 0 { "user:42" } else { "orders" };
        redis.publish(channel, format!("{channel} {n}")).await?;
        expected.push(format!("{channel} {n}"));
    }
    redis.publish("elsewhere", "not for this client").await?;
    assert_eq!(client.next_data(30).await?, expected);
    client.expect_no_event(Duration::from_millis(300)).await?;
    gateway.stop().await
}

#[tokio::test]
async fn ids_increase_and_carry_one_epoch() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let mut client = gateway.subscribe("channel=a&channel=b").await?;
    client.next_block().await?;
    for channel in ["a", "b", "a"] {
        redis.publish(channel, "x").await?;
    }
    let mut last: Option<(String, u64)> = None;
    for _ in 0..3 {
        let id = client.next_event().await?.id.ok_or("event without id")?;
        assert!(!id.contains(char::is_whitespace));
        let (epoch, seq) = id.split_once('-').ok_or("id shape")?;
        let seq: u64 = seq.parse()?;
        if let Some((last_epoch, last_seq)) = &last {
            assert_eq!(epoch, last_epoch);
            assert!(seq > *last_seq);
        }
        last = Some((epoch.to_string(), seq));
    }
    gateway.stop().await
}

#[tokio::test]
async fn multi_line_and_carriage_return_payloads_cannot_inject_fields() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let mut client = gateway.subscribe("channel=c").await?;
    client.next_block().await?;

    redis.publish("c", "a\n\nevent: evil\ndata: x").await?;
    redis.publish("c", "a\r\revent: evil\rdata: x").await?;
    redis.publish("c", "one\r\ntwo\nthree\rfour").await?;
    redis.publish("c", "").await?;
    redis.publish("c", "trailing\n").await?;

    let first = client.next_event().await?;
    assert_eq!(first.event_type(), "message");
    assert_eq!(first.data(), "a\n\nevent: evil\ndata: x");
    let second = client.next_event().await?;
    assert_eq!(second.event_type(), "message");
    assert_eq!(second.data(), "a\n\nevent: evil\ndata: x");
    assert_eq!(client.next_event().await?.data(), "one\ntwo\nthree\nfour");
    assert_eq!(client.next_event().await?.data(), "");
    assert_eq!(client.next_event().await?.data(), "trailing\n");
    gateway.stop().await
}

#[tokio::test]
async fn event_type_comes_from_the_json_type_field() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.sse.event_type_field = "kind".to_string();
    let gateway = TestGateway::start_ready(settings).await?;
    let mut client = gateway.subscribe("channel=orders").await?;
    client.next_block().await?;

    let placed = r#"{"kind":"OrderPlaced","data":{"orderId":"o-1"}}"#;
    redis.publish("orders", placed).await?;
    redis.publish("orders", r#"{"type":"ignored"}"#).await?;
    redis.publish("orders", r#"{"kind":"bad\ntype"}"#).await?;
    redis.publish("orders", "[1,2]").await?;
    // Names that would fire EventSource's own handlers or fake a reset stay plain messages.
    for reserved in ["error", "open", "gateway.reset"] {
        redis
            .publish("orders", format!(r#"{{"kind":"{reserved}"}}"#))
            .await?;
    }

    let event = client.next_event().await?;
    assert_eq!(event.event_type(), "OrderPlaced");
    assert_eq!(event.data(), placed);
    for _ in 0..6 {
        assert_eq!(client.next_event().await?.event_type(), "message");
    }
    gateway.stop().await
}

#[tokio::test]
async fn invalid_utf8_is_dropped_and_the_stream_stays_healthy() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let mut client = gateway.subscribe("channel=bin").await?;
    let mut other = gateway.subscribe("channel=bin").await?;
    client.next_block().await?;
    other.next_block().await?;

    redis.publish("bin", b"\xff\xfe not utf-8").await?;
    redis.publish("bin", "after").await?;
    for c in [&mut client, &mut other] {
        assert_eq!(c.next_event().await?.data(), "after");
    }
    gateway.stop().await
}

#[tokio::test]
async fn heartbeat_comments_keep_an_idle_stream_alive() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.sse.heartbeat_secs = 1;
    let gateway = TestGateway::start_ready(settings).await?;
    let mut client = gateway.subscribe("channel=quiet").await?;
    client.next_block().await?;
    let started = tokio::time::Instant::now();
    let block = client.next_block_within(Duration::from_secs(5)).await?;
    assert_eq!(
        block.comments, 1,
        "expected a heartbeat comment, got {block:?}"
    );
    assert!(!block.is_event());
    assert!(started.elapsed() >= Duration::from_millis(500));
    // And again: heartbeats repeat while the stream is idle.
    let block = client.next_block_within(Duration::from_secs(5)).await?;
    assert_eq!(block.comments, 1);
    gateway.stop().await
}

#[tokio::test]
async fn two_hundred_concurrent_clients_each_receive_every_event() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let mut clients = Vec::new();
    for n in 0..200 {
        let channels = if n % 2 == 0 {
            "channel=fan"
        } else {
            "channel=fan&channel=side"
        };
        let mut client = gateway.subscribe(channels).await?;
        client.next_block().await?;
        clients.push(client);
    }
    let expected: Vec<String> = (0..50).map(|n| format!("event {n}")).collect();
    for payload in &expected {
        redis.publish("fan", payload).await?;
    }
    let readers = clients.into_iter().map(|mut client| {
        let expected = expected.clone();
        tokio::spawn(async move {
            let got = client.next_data(expected.len()).await?;
            if got != expected {
                return Err::<(), Box<dyn std::error::Error + Send + Sync>>(
                    format!("client got {got:?}").into(),
                );
            }
            Ok(())
        })
    });
    for reader in readers {
        reader.await??;
    }
    gateway.stop().await
}
