//! What Redis itself does under the faults the gateway follows (issue 15), with no gateway
//! involved: how sentinels announce a new primary, what replicas answer, where sharded pub/sub
//! lives in a cluster and what its clients see when a slot moves or a primary fails over, and
//! how the `redis` crate surfaces it. Each test asserts the behaviour it pins, so a Redis or
//! crate upgrade that changes it turns the test red, and prints the timings it measures.
//!
//! One cluster is shared by the cluster tests of this binary (started on first use, serialized
//! by its lock, healed before each test); each sentinel test has its own topology because a
//! failover leaves sentinels busy for a while.

mod support;

use std::time::Duration;

use redis::Value;
use support::topology::*;
use support::*;
use tokio::time::{timeout, Instant};
use tokio_stream::StreamExt;

/// Subscribes to `+switch-master` on `sentinel` and waits (in a task, so the arrival time is
/// taken when it arrives) for the first payload and the time it took from `since`.
async fn first_switch_master(
    sentinel: u16,
    since: &std::sync::Arc<std::sync::OnceLock<Instant>>,
) -> TestResult<tokio::task::JoinHandle<TestResult<(String, Duration)>>> {
    let mut pubsub = redis::Client::open(redis_url(sentinel))?
        .get_async_pubsub()
        .await?;
    pubsub.subscribe("+switch-master").await?;
    let since = since.clone();
    Ok(tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        let message = timeout(TOPOLOGY_PATIENCE, messages.next())
            .await
            .map_err(|_| "no +switch-master within the patience")?
            .ok_or("the sentinel's pub/sub stream ended")?;
        let start = since.get().copied().ok_or("message before the fault")?;
        Ok((message.get_payload::<String>()?, start.elapsed()))
    }))
}

/// Subscribes to `+switch-master` on every sentinel of `topology`; the fault's time goes in
/// the returned cell.
async fn watch_switch_master(
    topology: &TestSentinels,
) -> TestResult<(
    std::sync::Arc<std::sync::OnceLock<Instant>>,
    Vec<tokio::task::JoinHandle<TestResult<(String, Duration)>>>,
)> {
    let since = std::sync::Arc::new(std::sync::OnceLock::new());
    let mut watchers = Vec::new();
    for sentinel in topology.sentinel_ports() {
        watchers.push(first_switch_master(sentinel, &since).await?);
    }
    Ok((since, watchers))
}

async fn await_switch_master(
    watchers: Vec<tokio::task::JoinHandle<TestResult<(String, Duration)>>>,
) -> TestResult<Vec<(String, Duration)>> {
    let mut seen = Vec::new();
    for watcher in watchers {
        seen.push(watcher.await??);
    }
    Ok(seen)
}

/// Asserts `+switch-master <name> <old ip> <old port> <new ip> <new port>` from old to new.
fn assert_switch_master(payload: &str, old: u16, new: u16) {
    let expected = format!("{MASTER_NAME} 127.0.0.1 {old} 127.0.0.1 {new}");
    assert_eq!(payload, expected, "the +switch-master payload");
}

#[tokio::test]
async fn sentinels_publish_switch_master_when_the_primary_is_killed() -> TestResult {
    let mut topology = TestSentinels::start().await?;
    let (since, watchers) = watch_switch_master(&topology).await?;
    let _ = since.set(Instant::now());
    let old = topology.kill_primary().await?;
    let new = topology
        .wait_for_primary_change(old, TOPOLOGY_PATIENCE)
        .await?;
    let seen = await_switch_master(watchers).await?;
    for (payload, after) in &seen {
        assert_switch_master(payload, old, new);
        println!("timing: sentinel kill_primary -> +switch-master: {after:?}");
    }
    println!(
        "timing: sentinel kill_primary -> the last sentinel's +switch-master: {:?}",
        seen.iter()
            .map(|(_, after)| *after)
            .max()
            .unwrap_or_default()
    );
    Ok(())
}

#[tokio::test]
async fn sentinels_publish_switch_master_on_sentinel_failover() -> TestResult {
    let topology = TestSentinels::start().await?;
    let (since, watchers) = watch_switch_master(&topology).await?;
    let _ = since.set(Instant::now());
    let old = topology.sentinel_failover().await?;
    let new = topology
        .wait_for_primary_change(old, TOPOLOGY_PATIENCE)
        .await?;
    let seen = await_switch_master(watchers).await?;
    for (payload, after) in &seen {
        assert_switch_master(payload, old, new);
        println!("timing: SENTINEL FAILOVER -> +switch-master: {after:?}");
    }
    // A planned failover keeps the old primary: it is reconfigured as a replica of the new one.
    poll_until(
        "the old primary to become a replica",
        TOPOLOGY_PATIENCE,
        || async move {
            match role(old).await {
                Ok(role) if role == "slave" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn replicas_answer_role_slave_and_refuse_writes_with_readonly() -> TestResult {
    let mut topology = TestSentinels::start().await?;
    let primary = topology.primary().await?;
    assert_eq!(role(primary).await?, "master");
    for replica in topology.replicas().await? {
        assert_eq!(role(replica).await?, "slave");
        let refused = try_query::<()>(replica, redis::cmd("SET").arg("k").arg("v")).await?;
        let error = refused.err().ok_or("a write to a replica succeeded")?;
        assert_eq!(
            error.code(),
            Some("READONLY"),
            "a write to a replica: {error}"
        );
    }
    let old = topology.kill_primary().await?;
    let promoted = topology
        .wait_for_primary_change(old, TOPOLOGY_PATIENCE)
        .await?;
    assert_eq!(role(promoted).await?, "master");
    query::<()>(promoted, redis::cmd("SET").arg("k").arg("v")).await?;
    Ok(())
}

#[tokio::test]
async fn a_lossy_sentinel_failover_loses_acknowledged_writes() -> TestResult {
    let mut topology = TestSentinels::start().await?;
    query::<()>(
        topology.primary().await?,
        redis::cmd("SET").arg("kept").arg("1"),
    )
    .await?;
    // Replicated before the cut: WAIT returns once both replicas acknowledged it.
    let replicated: i64 = query(
        topology.primary().await?,
        redis::cmd("WAIT").arg(2).arg(5000),
    )
    .await?;
    assert_eq!(replicated, 2);
    let mut lost = redis::cmd("SET");
    lost.arg("lost").arg("1");
    let (old, replies) = topology.kill_primary_losing(&[lost]).await?;
    assert_eq!(
        replies,
        vec![Value::Okay],
        "the primary acknowledged the write"
    );
    let new = topology
        .wait_for_primary_change(old, TOPOLOGY_PATIENCE)
        .await?;
    let kept: Option<String> = query(new, redis::cmd("GET").arg("kept")).await?;
    let gone: Option<String> = query(new, redis::cmd("GET").arg("lost")).await?;
    assert_eq!(kept.as_deref(), Some("1"));
    assert_eq!(gone, None, "the acknowledged write is lost by the failover");
    Ok(())
}
