//! Credentials and TLS in `redis.mode = "sentinel"` and `"cluster"`: the gateway binary, with
//! the redis history backend and debug logs, against a topology whose every node (the
//! sentinels too) wants a password and speaks only TLS (`rediss://:<password>@...` URLs in
//! `redis.nodes`, the test CA in `redis.tls_ca_file`). Events published with `POST /publish`
//! and with `FCALL` reach a client before and after a primary is killed, with no reset, and
//! the password is in no log line.
//!
//! Standalone TLS and credentials are tests/redis_tls.rs's.

mod support;

use std::time::Duration;

use support::topology::{TestCluster, TestSentinels, TopologyOptions, TOPOLOGY_PATIENCE};
use support::*;
use tokio::time::Instant;

const SECRET: &str = "topology-auth-test-secret-of-at-least-32-bytes";

/// The gateway binary in `mode` with `redis.url = url` and `redis.nodes = nodes`, trusting the
/// topology's CA, with the redis history backend, debug logs and `extra` settings.
fn launch(
    mode: &str,
    url: &str,
    nodes: &[String],
    options: &TopologyOptions,
    extra: &[(&str, &str)],
) -> TestResult<GatewayProcess> {
    let nodes = nodes.join(",");
    let ca_file = options
        .ca_file()
        .ok_or("the topology has no TLS")?
        .display()
        .to_string();
    let mut env = vec![
        ("SSEHUB__REDIS__MODE", mode),
        ("SSEHUB__REDIS__NODES", nodes.as_str()),
        ("SSEHUB__REDIS__TLS_CA_FILE", ca_file.as_str()),
        ("SSEHUB__REDIS__RECONNECT_INITIAL_MS", "50"),
        ("SSEHUB__REDIS__RECONNECT_MAX_MS", "500"),
        ("SSEHUB__REDIS__PING_INTERVAL_SECS", "1"),
        ("SSEHUB__REDIS__COMMAND_TIMEOUT_SECS", "2"),
        ("SSEHUB__REDIS__CONNECT_TIMEOUT_SECS", "2"),
        ("SSEHUB__HISTORY__BACKEND", "redis"),
        ("SSEHUB__AUTH__JWT_SECRET", SECRET),
        // Debug: the most a deployment can log, so the password check below means something.
        ("SSEHUB__LOG__LEVEL", "debug"),
    ];
    env.extend_from_slice(extra);
    GatewayProcess::launch(url, &env, None)
}

async fn wait_ready(gateway: &GatewayProcess) -> TestResult {
    let admin = gateway.admin;
    eventually_within("the gateway is ready", TOPOLOGY_PATIENCE, || async move {
        matches!(get(admin, "/readyz", &[]).await, Ok((200, _)))
    })
    .await
    .map_err(|e| format!("{e}; gateway log:\n{}", gateway.log()).into())
}

/// `Bearer <token>` allowed to publish on `channels`.
fn bearer(channels: &[String]) -> TestResult<String> {
    let token = ssehub::auth::mint_token(SECRET, &[], channels, None, Duration::from_secs(600))?;
    Ok(format!("Bearer {token}"))
}

/// `POST /publish` until the gateway answers 200: after a failover its publisher may still be
/// finding the new primary (an attempt it refuses is lost, and the test waits for this one).
async fn publish_through_gateway(
    gateway: &GatewayProcess,
    bearer: &str,
    channel: &str,
    payload: &str,
) -> TestResult {
    let path = format!("/publish?channel={channel}");
    let mut last = String::new();
    let deadline = Instant::now() + TOPOLOGY_PATIENCE;
    while Instant::now() < deadline {
        let headers = [("authorization", bearer)];
        match send_body(gateway.addr, "POST", &path, &headers, payload.to_string()).await {
            Ok(response) if response.status() == 200 => return Ok(()),
            Ok(response) => last = format!("status {}", response.status()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("POST /publish {channel} {payload}: never 200, last {last}").into())
}

/// `FCALL ssehub_publish` on the node on `port`: stored in the channel's history and
/// broadcast, as a publisher without the gateway does it.
async fn publish_with_fcall(
    options: &TopologyOptions,
    port: u16,
    channel: &str,
    payload: &str,
) -> TestResult {
    let mut call = redis::cmd("FCALL");
    call.arg("ssehub_publish").arg(1).arg(channel).arg(payload);
    let _id: String = options.query(port, &call).await?;
    Ok(())
}

/// Reads until an event with `payload` arrives, skipping others (earlier events replayed);
/// a reset fails the test.
async fn expect_payload(client: &mut SseClient, payload: &str) -> TestResult {
    let deadline = Instant::now() + TOPOLOGY_PATIENCE;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let block = client.next_block_within(left).await?;
        if let Some(reset) = block.reset() {
            return Err(format!("a reset {reset:?} while waiting for {payload:?}").into());
        }
        if block.is_event() && block.data() == payload {
            return Ok(());
        }
    }
    Err(format!("{payload:?} never arrived").into())
}

/// The gateway logged at debug level, and never the password.
fn assert_password_not_logged(gateway: &GatewayProcess, options: &TopologyOptions) -> TestResult {
    let log = gateway.log();
    let password = options
        .password
        .as_deref()
        .ok_or("the topology has no password")?;
    assert!(log.contains("DEBUG"), "no debug line in the log:\n{log}");
    assert!(
        !log.contains(password),
        "the Redis password is in the log:\n{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_mode_with_password_and_tls_follows_a_killed_primary() -> TestResult {
    let mut sentinels = TestSentinels::start_with(TopologyOptions::secured()?).await?;
    let options = sentinels.options().clone();
    let primary = sentinels.primary().await?;
    let gateway = launch(
        "sentinel",
        &sentinels.redis_url_of(primary),
        &sentinels.sentinel_urls(),
        &options,
        &[("SSEHUB__REDIS__MASTER_NAME", sentinels.master_name())],
    )?;
    wait_ready(&gateway).await?;
    let channel = "orders".to_string();
    let bearer = bearer(std::slice::from_ref(&channel))?;
    let mut client = gateway
        .subscribe_from("127.0.0.1", "channel=orders")
        .await?;
    publish_through_gateway(&gateway, &bearer, &channel, "posted").await?;
    expect_payload(&mut client, "posted").await?;
    publish_with_fcall(&options, primary, &channel, "called").await?;
    expect_payload(&mut client, "called").await?;

    // Both replicas hold everything: the failover loses nothing, so no reset is due.
    options.wait_replicated(primary, 2).await?;
    let killed_at = Instant::now();
    sentinels.kill_primary().await?;
    let new_primary = sentinels
        .wait_for_primary_change(primary, TOPOLOGY_PATIENCE)
        .await?;
    publish_with_fcall(&options, new_primary, &channel, "called after").await?;
    expect_payload(&mut client, "called after").await?;
    println!(
        "sentinel, password and TLS: served by :{new_primary} {:?} after the kill",
        killed_at.elapsed()
    );
    publish_through_gateway(&gateway, &bearer, &channel, "posted after").await?;
    expect_payload(&mut client, "posted after").await?;
    // The failover was heard from a sentinel (its subscription authenticated over TLS), not
    // only found by reconnecting.
    let log = gateway.log();
    assert!(
        log.contains("sentinel announced a new primary"),
        "no sentinel announced the failover:\n{log}"
    );
    assert_password_not_logged(&gateway, &options)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_with_password_and_tls_survives_a_killed_primary() -> TestResult {
    let mut cluster = TestCluster::start_with(TopologyOptions::secured()?).await?;
    let options = cluster.options().clone();
    let seeds = cluster.seed_urls();
    let gateway = launch("cluster", &seeds[0], &seeds, &options, &[])?;
    wait_ready(&gateway).await?;
    let shards = cluster.channels_on_each_shard(1).await?;
    let channels: Vec<String> = shards.iter().map(|(_, names)| names[0].clone()).collect();
    let bearer = bearer(&channels)?;
    let query: Vec<String> = channels.iter().map(|c| format!("channel={c}")).collect();
    let mut client = gateway
        .subscribe_from("127.0.0.1", &query.join("&"))
        .await?;
    for (primary, names) in &shards {
        let channel = &names[0];
        publish_through_gateway(&gateway, &bearer, channel, &format!("{channel} posted")).await?;
        expect_payload(&mut client, &format!("{channel} posted")).await?;
        publish_with_fcall(&options, *primary, channel, &format!("{channel} called")).await?;
        expect_payload(&mut client, &format!("{channel} called")).await?;
    }

    // The replica holds everything: the failover loses nothing, so no reset is due.
    let victim = shards[0].0;
    options.wait_replicated(victim, 1).await?;
    let killed_at = Instant::now();
    cluster.kill_node(victim).await?;
    let new_primary = cluster.wait_for_failover_of(victim).await?;
    let after = format!("{} called after", channels[0]);
    publish_with_fcall(&options, new_primary, &channels[0], &after).await?;
    expect_payload(&mut client, &after).await?;
    println!(
        "cluster, password and TLS: :{victim}'s channel served by :{new_primary} {:?} after \
         the kill",
        killed_at.elapsed()
    );
    for channel in &channels {
        let payload = format!("{channel} posted after");
        publish_through_gateway(&gateway, &bearer, channel, &payload).await?;
        expect_payload(&mut client, &payload).await?;
    }
    assert_password_not_logged(&gateway, &options)
}
