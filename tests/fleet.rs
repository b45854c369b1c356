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
