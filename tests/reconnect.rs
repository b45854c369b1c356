//! A Redis that cuts the gateway off again and again (as the client output-buffer limit does)
//! is retried with a growing delay: the backoff starts over only after a connection that stayed
//! up, so clients do not get a burst of back-to-back `upstream_interrupted` resets.

mod support;

use std::time::Duration;

use support::*;
use tokio::time::Instant;

const RECONNECTS: &str = "ssehub_redis_reconnects_total";

/// Kills the gateway's subscription connection and returns how long the gateway took to be
/// subscribed again.
async fn cut_off(redis: &TestRedis, gateway: &TestGateway) -> TestResult<Duration> {
    let before = metric(gateway.admin, RECONNECTS).await?;
    let mut conn = redis.connection().await?;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await?;
    assert_eq!(killed, 1, "the gateway's subscription connection");
    let cut_at = Instant::now();
    let deadline = cut_at + PATIENCE;
    while metric(gateway.admin, RECONNECTS).await? <= before {
        if Instant::now() > deadline {
            return Err("the gateway did not reconnect".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(cut_at.elapsed())
}

#[tokio::test]
async fn repeated_cut_offs_back_off_instead_of_reconnecting_at_once() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.redis.reconnect_initial_ms = 50;
    settings.redis.reconnect_max_ms = 800;
    let gateway = TestGateway::start_ready(settings).await?;
    let mut client = gateway.subscribe("channel=flap").await?;
    let mut waits = Vec::new();
    for _ in 0..5 {
        waits.push(cut_off(&redis, &gateway).await?);
    }
    // Delays of 25-50, 50-100, 100-200, 200-400, 400-800 ms: the last one waits at least
    // 400 ms. Reset after every brief success, each would be 25-50 ms.
    let last = waits[waits.len() - 1];
    assert!(last >= Duration::from_millis(400), "{waits:?}");
    // Clients stay served throughout.
    eventually("events flow after the cut-offs", || async {
        redis.publish("flap", "back").await.is_ok_and(|n| n > 0)
    })
    .await?;
    loop {
        let block = client.next_event().await?;
        if block.data() == "back" {
            break;
        }
    }
    gateway.stop().await
}
