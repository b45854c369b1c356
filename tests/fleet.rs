//! Several gateways behind a balancer without stickiness. With the in-memory history (the
//! default), each instance's ids are its own: a client that resumes on another instance is told
//! plainly (`gateway.reset`, `unknown_position`) and then served live, never given a silent gap.

mod support;

use support::balancer::Balancer;
use support::*;

#[tokio::test]
async fn a_resume_on_another_memory_instance_gets_unknown_position_then_live_events() -> TestResult
{
    let redis = TestRedis::start().await?;
    let first = TestGateway::start_ready(test_settings(&redis)).await?;
    let second = TestGateway::start_ready(test_settings(&redis)).await?;
    let balancer = Balancer::start(&[first.addr, second.addr]).await?;

    assert_eq!(balancer.next_backend(), Some(first.addr));
    let mut client = SseClient::open(balancer.addr, "/events?channel=orders", &[])
        .await?
        .1;
    client.next_block().await?;
    for n in 0..3 {
        redis.publish("orders", format!("before-{n}")).await?;
    }
    assert_eq!(
        client.next_data(3).await?,
        ["before-0", "before-1", "before-2"]
    );
    let last_id = client.last_event_id.clone().ok_or("events carry ids")?;

    balancer.cut_all();
    assert_eq!(balancer.next_backend(), Some(second.addr));
    let resume = [("Last-Event-ID", last_id.as_str())];
    let (status, mut resumed) =
        SseClient::open(balancer.addr, "/events?channel=orders", &resume).await?;
    assert_eq!(status, 200);
    let reset = loop {
        let block = resumed.next_block().await?;
        if block.is_event() {
            break block;
        }
    };
    assert_eq!(
        reset.reset(),
        Some(("unknown_position".to_string(), vec!["orders".to_string()]))
    );
    redis.publish("orders", "after").await?;
    assert_eq!(resumed.next_data(1).await?, ["after"]);
    first.stop().await?;
    second.stop().await
}

/// Reads data events until `count` were seen, failing on any reset.
async fn read_events(client: &mut SseClient, count: usize) -> TestResult<Vec<String>> {
    let mut data = Vec::with_capacity(count);
    while data.len() < count {
        let block = client.next_event().await?;
        if let Some(reset) = block.reset() {
            return Err(format!("unexpected reset {reset:?} after {data:?}").into());
        }
        data.push(block.data().to_string());
    }
    Ok(data)
}

#[tokio::test]
async fn a_resume_on_another_redis_instance_gets_exactly_the_missed_events() -> TestResult {
    let redis = TestRedis::start().await?;
    let first = TestGateway::start_ready(redis_backend_settings(&redis)).await?;
    let second = TestGateway::start_ready(redis_backend_settings(&redis)).await?;
    let balancer = Balancer::start(&[first.addr, second.addr]).await?;

    let mut client = SseClient::open(balancer.addr, "/events?channel=orders", &[])
        .await?
        .1;
    client.next_block().await?;
    for n in 0..3 {
        redis
            .publish_stored("orders", format!("before-{n}"))
            .await?;
    }
    assert_eq!(
        read_events(&mut client, 3).await?,
        ["before-0", "before-1", "before-2"]
    );
    let last_id = client.last_event_id.clone().ok_or("events carry ids")?;

    balancer.cut_all();
    for n in 0..5 {
        redis
            .publish_stored("orders", format!("missed-{n}"))
            .await?;
    }
    assert_eq!(balancer.next_backend(), Some(second.addr));
    let resume = [("Last-Event-ID", last_id.as_str())];
    let (status, mut resumed) =
        SseClient::open(balancer.addr, "/events?channel=orders", &resume).await?;
    assert_eq!(status, 200);
    assert_eq!(
        read_events(&mut resumed, 5).await?,
        (0..5).map(|n| format!("missed-{n}")).collect::<Vec<_>>()
    );
    redis.publish_stored("orders", "after").await?;
    assert_eq!(read_events(&mut resumed, 1).await?, ["after"]);
    first.stop().await?;
    second.stop().await
}

/// Three channels whose keys hash to different Redis Cluster slots (865, 15419 and 8000, the
/// last by its hash tag), as the query names them.
const SPREAD_CHANNELS: [&str; 3] = ["alpha", "beta", "feed:{42}"];
const SPREAD_QUERY: &str = "/events?channel=alpha&channel=beta&channel=feed:%7B42%7D";

/// Publishes `count` numbered events (`<channel>#<n>`) spread over the channels, from `next`.
async fn publish_spread(redis: &TestRedis, next: &mut [usize; 3], count: usize) -> TestResult {
    for k in 0..count {
        // An uneven spread, so each channel's share changes from batch to batch.
        let channel = (k * 7 + next.iter().sum::<usize>()) % 3;
        let payload = format!("{}#{}", SPREAD_CHANNELS[channel], next[channel]);
        redis
            .publish_stored(SPREAD_CHANNELS[channel], payload)
            .await?;
        next[channel] += 1;
    }
    Ok(())
}

#[tokio::test]
async fn a_three_channel_stream_resumes_back_and_forth_exactly_once_in_order() -> TestResult {
    let redis = TestRedis::start().await?;
    let first = TestGateway::start_ready(redis_backend_settings(&redis)).await?;
    let second = TestGateway::start_ready(redis_backend_settings(&redis)).await?;
    let balancer = Balancer::start(&[first.addr, second.addr]).await?;

    let mut published = [0usize; 3];
    let mut received: Vec<String> = Vec::new();
    let mut last_id: Option<String> = None;
    let mut backends = Vec::new();
    for round in 0..6 {
        backends.push(balancer.next_backend());
        let headers: Vec<(&str, &str)> = last_id
            .iter()
            .map(|id| ("Last-Event-ID", id.as_str()))
            .collect();
        let (status, mut client) = SseClient::open(balancer.addr, SPREAD_QUERY, &headers).await?;
        assert_eq!(status, 200);
        publish_spread(&redis, &mut published, 5 + round).await?;
        let expected = published.iter().sum::<usize>() - received.len();
        received.extend(read_events(&mut client, expected).await?);
        last_id = Some(client.last_event_id.clone().ok_or("events carry ids")?);
        balancer.cut_all();
        // Published while the client is away: the next instance must replay them.
        publish_spread(&redis, &mut published, 4 + round).await?;
    }
    let headers = [("Last-Event-ID", last_id.as_deref().unwrap_or_default())];
    let (_, mut client) = SseClient::open(balancer.addr, SPREAD_QUERY, &headers).await?;
    let rest = published.iter().sum::<usize>() - received.len();
    received.extend(read_events(&mut client, rest).await?);
    client
        .expect_no_event(std::time::Duration::from_millis(300))
        .await?;

    assert!(backends.contains(&Some(first.addr)) && backends.contains(&Some(second.addr)));
    for (index, channel) in SPREAD_CHANNELS.iter().enumerate() {
        let got: Vec<&str> = received
            .iter()
            .filter_map(|data| data.strip_prefix(&format!("{channel}#")))
            .collect();
        let want: Vec<String> = (0..published[index]).map(|n| n.to_string()).collect();
        assert_eq!(got, want, "{channel}: every event once, in order");
    }
    assert_eq!(received.len(), published.iter().sum::<usize>());
    first.stop().await?;
    second.stop().await
}

/// The first block that is an event (data or reset).
async fn first_event(client: &mut SseClient) -> TestResult<SseBlock> {
    client.next_event().await
}

#[tokio::test]
async fn after_flushall_old_positions_are_unknown_and_no_id_is_reused() -> TestResult {
    let redis = TestRedis::start().await?;
    let first = TestGateway::start_ready(redis_backend_settings(&redis)).await?;
    let second = TestGateway::start_ready(redis_backend_settings(&redis)).await?;
    let mut client = first.subscribe("channel=orders").await?;
    let mut ids_before = Vec::new();
    for n in 0..3 {
        redis
            .publish_stored("orders", format!("before-{n}"))
            .await?;
        read_events(&mut client, 1).await?;
        ids_before.push(client.last_event_id.clone().ok_or("events carry ids")?);
    }

    let mut conn = redis.connection().await?;
    redis::cmd("FLUSHALL").query_async::<()>(&mut conn).await?;
    redis.publish_stored("orders", "after").await?;
    // The live stream goes on: nothing it was sent is lost, and the new event has a new id.
    assert_eq!(read_events(&mut client, 1).await?, ["after"]);
    let id_after = client.last_event_id.clone().ok_or("events carry ids")?;
    assert!(!ids_before.contains(&id_after), "{id_after} reused");

    // A resume from before the flush cannot be served exactly, on either instance.
    for gateway in [&first, &second] {
        let resume = [("Last-Event-ID", ids_before[1].as_str())];
        let (_, mut stale) =
            SseClient::open(gateway.addr, "/events?channel=orders", &resume).await?;
        let reset = first_event(&mut stale).await?;
        assert_eq!(
            reset.reset(),
            Some(("unknown_position".to_string(), vec!["orders".to_string()]))
        );
    }
    // A resume from after it is exact.
    let resume = [("Last-Event-ID", id_after.as_str())];
    let (_, mut fresh) = SseClient::open(second.addr, "/events?channel=orders", &resume).await?;
    redis.publish_stored("orders", "later").await?;
    assert_eq!(read_events(&mut fresh, 1).await?, ["later"]);
    first.stop().await?;
    second.stop().await
}

#[tokio::test]
async fn trimming_past_a_position_resets_only_that_channel() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = redis_backend_settings(&redis);
    settings.history.capacity = 5;
    let first = TestGateway::start_ready(settings.clone()).await?;
    let second = TestGateway::start_ready(settings).await?;
    let query = "/events?channel=busy&channel=calm";
    let mut client = first.subscribe(&query["/events?".len()..]).await?;
    redis.publish_stored("busy", "busy-0").await?;
    redis.publish_stored("calm", "calm-0").await?;
    read_events(&mut client, 2).await?;
    let last_id = client.last_event_id.clone().ok_or("events carry ids")?;
    drop(client);

    // Ten events on a channel that keeps five: the client's position there is trimmed.
    for n in 1..=10 {
        redis.publish_stored("busy", format!("busy-{n}")).await?;
    }
    redis.publish_stored("calm", "calm-1").await?;
    let resume = [("Last-Event-ID", last_id.as_str())];
    let (_, mut resumed) = SseClient::open(second.addr, query, &resume).await?;
    let reset = first_event(&mut resumed).await?;
    assert_eq!(
        reset.reset(),
        Some(("history_expired".to_string(), vec!["busy".to_string()]))
    );
    assert_eq!(read_events(&mut resumed, 1).await?, ["calm-1"]);
    redis.publish_stored("busy", "busy-11").await?;
    assert_eq!(read_events(&mut resumed, 1).await?, ["busy-11"]);
    first.stop().await?;
    second.stop().await
}

/// How many times Redis ran `command` (from `INFO commandstats`).
async fn command_calls(redis: &TestRedis, command: &str) -> TestResult<u64> {
    let mut conn = redis.connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await?;
    let prefix = format!("cmdstat_{command}:calls=");
    Ok(info
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0))
}

#[tokio::test]
async fn resumes_on_another_instance_are_served_from_its_cache_not_a_redis_call_each() -> TestResult
{
    let redis = TestRedis::start().await?;
    let first = TestGateway::start_ready(redis_backend_settings(&redis)).await?;
    let second = TestGateway::start_ready(redis_backend_settings(&redis)).await?;
    let mut client = first.subscribe("channel=orders").await?;
    redis.publish_stored("orders", "seen").await?;
    read_events(&mut client, 1).await?;
    let last_id = client.last_event_id.clone().ok_or("events carry ids")?;
    for n in 0..5 {
        redis
            .publish_stored("orders", format!("missed-{n}"))
            .await?;
    }

    let calls_before = command_calls(&redis, "fcall").await?;
    let resume = [("Last-Event-ID", last_id.as_str())];
    let mut resumed = Vec::new();
    for _ in 0..50 {
        resumed.push(second.subscribe_with("channel=orders", &resume).await?);
    }
    for client in &mut resumed {
        assert_eq!(read_events(client, 5).await?.len(), 5);
    }
    let calls = command_calls(&redis, "fcall").await? - calls_before;
    println!("50 resumes on the second instance: {calls} FCALL(s)");
    // One load of the channel's history (ssehub_tail), not one read per resume.
    assert_eq!(calls, 1);
    first.stop().await?;
    second.stop().await
}

#[tokio::test]
async fn plain_publish_is_not_served_with_the_redis_backend() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(redis_backend_settings(&redis)).await?;
    let mut client = gateway.subscribe("channel=orders").await?;
    client.next_block().await?;
    // No gateway listens on the plain channel: an id assigned here could differ per instance.
    assert_eq!(redis.publish("orders", "plain").await?, 0);
    redis.publish_stored("orders", "stored").await?;
    assert_eq!(read_events(&mut client, 1).await?, ["stored"]);
    client
        .expect_no_event(std::time::Duration::from_millis(200))
        .await?;
    gateway.stop().await
}

#[tokio::test]
async fn a_stream_opened_while_redis_is_down_opens_once_the_subscription_is_restored() -> TestResult
{
    let mut redis = TestRedis::start().await?;
    let mut settings = redis_backend_settings(&redis);
    // Far beyond the test's patience: only the restore itself can let the stream open in time.
    settings.redis.subscribe_timeout_secs = 60;
    let gateway = TestGateway::start_ready(settings).await?;
    let mut holder = gateway.subscribe("channel=orders").await?;
    redis.publish_stored("orders", "before").await?;
    assert_eq!(holder.next_data(1).await?, ["before"]);

    redis.kill().await?;
    gateway.wait_ready(503).await?;
    let addr = gateway.addr;
    let opening =
        tokio::spawn(async move { SseClient::open(addr, "/events?channel=orders", &[]).await });
    redis.restart().await?;
    let (status, mut late) = opening.await??;
    assert_eq!(status, 200);
    redis.publish_stored("orders", "after").await?;
    // Redis restarted empty, so the channel's history is gone: a reset may come first.
    let event = loop {
        let event = late.next_event().await?;
        if event.reset().is_none() {
            break event;
        }
    };
    assert_eq!(event.data(), "after");
    gateway.stop().await
}
