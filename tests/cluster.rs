//! `redis.mode = "cluster"`: a 3-primary / 3-replica Redis Cluster started by the test. The
//! gateway serves each channel through sharded pub/sub on the primary owning its slot, and a
//! fault on one shard (its primary killed, a slot migrated) touches only that shard's
//! channels. Each test prints the time from the fault to the first event delivered again.

mod support;

use std::time::Duration;

use ssehub::config::HistoryBackend;
use support::topology::{key_slot, query, wait_replicated, TestCluster, TOPOLOGY_PATIENCE};
use support::topology_settings::{cluster_settings, shared_cluster};
use support::*;
use tokio::time::Instant;

/// Publishes on the primary owning `channel` now (asked each time: it moves in these tests):
/// `SPUBLISH` for the memory backend, `FCALL ssehub_publish` (which stores it and broadcasts
/// it in its slot) for the redis backend.
async fn publish(
    cluster: &TestCluster,
    backend: HistoryBackend,
    channel: &str,
    payload: &str,
) -> TestResult {
    let owner = cluster.owner_of_slot(key_slot(channel)).await?;
    match backend {
        HistoryBackend::Memory => {
            let _: i64 = query(owner, redis::cmd("SPUBLISH").arg(channel).arg(payload)).await?;
        }
        HistoryBackend::Redis => {
            let _: String = query(
                owner,
                redis::cmd("FCALL")
                    .arg("ssehub_publish")
                    .arg(1)
                    .arg(channel)
                    .arg(payload),
            )
            .await?;
        }
    }
    Ok(())
}

/// Publishes rounds `marker`, `marker + 1`, ... on every client's channel until client
/// `index` sees one of them; returns when that happened (bounded by the topology's patience, counted from `since`).
async fn publish_until_served(
    cluster: &TestCluster,
    backend: HistoryBackend,
    clients: &mut [(String, SseClient, Seen)],
    index: usize,
    marker: u64,
    since: Instant,
) -> TestResult<Instant> {
    let mut round = marker;
    while clients[index].2.first_marked.is_none() && since.elapsed() < TOPOLOGY_PATIENCE {
        publish_and_read(cluster, backend, clients, round..round + 1, Some(marker)).await?;
        round += 1;
    }
    let served = clients[index].2.first_marked;
    let channel = &clients[index].0;
    Ok(served.ok_or_else(|| format!("{channel} was never served again"))?)
}

/// What one client saw: data payloads and resets, in order.
#[derive(Debug, Default)]
struct Seen {
    data: Vec<String>,
    /// `(reason, channels)` of each reset.
    resets: Vec<(String, Vec<String>)>,
    /// When the first payload starting with the marker arrived.
    first_marked: Option<Instant>,
    /// The numbers Redis acknowledged for this client's channel.
    acknowledged: Vec<u64>,
    last_event_id: Option<String>,
}

/// Publishes `<channel>-<n>` on every channel (one client per channel) round after round
/// until every client has seen a payload of round `until_round` or `patience` runs out,
/// reading between rounds.
async fn publish_and_read(
    cluster: &TestCluster,
    backend: HistoryBackend,
    clients: &mut [(String, SseClient, Seen)],
    rounds: std::ops::Range<u64>,
    marker_from: Option<u64>,
) -> TestResult {
    for round in rounds {
        for (channel, _, seen) in clients.iter_mut() {
            // Publishing fails while the shard's primary is down: that round is lost for it.
            let payload = format!("{channel}-{round}");
            if publish(cluster, backend, channel, &payload).await.is_ok() {
                seen.acknowledged.push(round);
            }
        }
        for (_, client, seen) in clients.iter_mut() {
            while let Ok(block) = client.next_block_within(Duration::from_millis(20)).await {
                if !block.is_event() {
                    continue;
                }
                if let Some(reset) = block.reset() {
                    seen.resets.push(reset);
                    continue;
                }
                let number = block
                    .data()
                    .rsplit_once('-')
                    .and_then(|(_, n)| n.parse::<u64>().ok());
                if marker_from.is_some_and(|from| number.is_some_and(|n| n >= from))
                    && seen.first_marked.is_none()
                {
                    seen.first_marked = Some(Instant::now());
                }
                seen.data.push(block.data().to_string());
                seen.last_event_id = block.id.clone();
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    KillPrimary,
    ClusterFailover,
}

/// One client per shard's channel and one on all of them; a fault on the first shard: only
/// its channel is interrupted (memory backend: one `upstream_interrupted`), on the
/// multi-channel stream too, and it is served again by the new primary.
async fn a_fault_interrupts_only_its_shard(fault: Fault) -> TestResult {
    let backend = HistoryBackend::Memory;
    let mut cluster = shared_cluster().await?;
    let gateway =
        TestGateway::start_ready(cluster_settings(&cluster, HistoryBackend::Memory)).await?;
    let shards = cluster.channels_on_each_shard(1).await?;
    let channels: Vec<String> = shards.iter().map(|(_, names)| names[0].clone()).collect();
    let mut clients = Vec::new();
    for channel in &channels {
        let client = gateway.subscribe(&format!("channel={channel}")).await?;
        clients.push((channel.clone(), client, Seen::default()));
    }
    let all: Vec<String> = channels.iter().map(|c| format!("channel={c}")).collect();
    let mut everything = gateway.subscribe(&all.join("&")).await?;
    publish_and_read(&cluster, backend, &mut clients, 0..5, None).await?;
    for (channel, _, seen) in &clients {
        assert_eq!(seen.data.len(), 5, "{channel}: {seen:?}");
    }

    // `/readyz` and the gauges describe the whole cluster: three shards, all up.
    let (status, body) = get(gateway.admin, "/readyz", &[]).await?;
    let readiness: serde_json::Value = serde_json::from_str(&body)?;
    let whole = serde_json::json!({ "mode": "cluster", "shards_known": 3, "shards_up": 3 });
    assert_eq!((status, &readiness["redis"]), (200, &whole));

    let victim = shards[0].0;
    let fault_at = Instant::now();
    let new_primary = match fault {
        Fault::KillPrimary => {
            cluster.kill_node(victim).await?;
            cluster.wait_for_failover_of(victim).await?
        }
        Fault::ClusterFailover => {
            let replica = cluster.replica_of(victim).await?;
            cluster.failover(replica).await?;
            replica
        }
    };
    let marker = 1_000;
    let back = publish_until_served(&cluster, backend, &mut clients, 0, marker, fault_at).await?;
    println!(
        "cluster, {fault:?} of :{victim}: its channel served again by :{new_primary} {:?} after \
         the fault",
        back - fault_at
    );
    let interrupted = vec![(
        "upstream_interrupted".to_string(),
        vec![channels[0].clone()],
    )];
    assert_eq!(clients[0].2.resets, interrupted);
    for (channel, _, seen) in &clients[1..] {
        assert!(
            seen.resets.is_empty(),
            "{channel} is on another shard: {seen:?}"
        );
    }
    // The stream over every shard: the same single reset, for the first shard's channel only.
    let mut resets = Vec::new();
    while let Ok(block) = everything
        .next_block_within(Duration::from_millis(200))
        .await
    {
        if let Some(reset) = block.reset() {
            resets.push(reset);
        }
    }
    assert_eq!(resets, interrupted);
    let admin = gateway.admin;
    eventually("every shard up again", || async move {
        let (status, body) = get(admin, "/readyz", &[]).await.unwrap_or_default();
        let readiness: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        status == 200 && readiness["redis"]["shards_up"] == 3
    })
    .await?;
    gateway.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_interrupts_only_its_shards_channels() -> TestResult {
    a_fault_interrupts_only_its_shard(Fault::KillPrimary).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_interrupts_only_its_shards_channels() -> TestResult {
    a_fault_interrupts_only_its_shard(Fault::ClusterFailover).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrated_slot_moves_only_its_channel() -> TestResult {
    let backend = HistoryBackend::Memory;
    let cluster = shared_cluster().await?;
    let gateway =
        TestGateway::start_ready(cluster_settings(&cluster, HistoryBackend::Memory)).await?;
    let shards = cluster.channels_on_each_shard(1).await?;
    let mut clients = Vec::new();
    for (_, names) in &shards {
        let channel = names[0].clone();
        let client = gateway.subscribe(&format!("channel={channel}")).await?;
        clients.push((channel, client, Seen::default()));
    }
    publish_and_read(&cluster, backend, &mut clients, 0..3, None).await?;

    let moving = clients[0].0.clone();
    let target = shards[1].0;
    let fault_at = Instant::now();
    cluster.migrate_slot(key_slot(&moving), target).await?;
    let marker = 1_000;
    let back = publish_until_served(&cluster, backend, &mut clients, 0, marker, fault_at).await?;
    println!(
        "cluster, slot migrated: its channel served again {:?} after the move",
        back - fault_at
    );
    let interrupted = vec![("upstream_interrupted".to_string(), vec![moving.clone()])];
    assert_eq!(clients[0].2.resets, interrupted);
    for (channel, _, seen) in &clients[1..] {
        assert!(seen.resets.is_empty(), "{channel} did not move: {seen:?}");
        assert_eq!(
            seen.data.len(),
            seen.acknowledged.len(),
            "{channel}: {seen:?}"
        );
    }
    gateway.stop().await
}

/// Redis backend: a killed primary whose replica had everything, a slot migrated, then a
/// `CLUSTER FAILOVER`. The channels of the faulty shards get every event Redis acknowledged,
/// in order, with no reset; the others are untouched; a stream over every shard keeps one
/// complete position through all of it and resumes from its one id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_history_failovers_and_slot_moves_cost_clients_nothing() -> TestResult {
    let backend = HistoryBackend::Redis;
    let mut cluster = shared_cluster().await?;
    let gateway =
        TestGateway::start_ready(cluster_settings(&cluster, HistoryBackend::Redis)).await?;
    let shards = cluster.channels_on_each_shard(1).await?;
    let channels: Vec<String> = shards.iter().map(|(_, names)| names[0].clone()).collect();
    let mut clients = Vec::new();
    for channel in &channels {
        let client = gateway.subscribe(&format!("channel={channel}")).await?;
        clients.push((channel.clone(), client, Seen::default()));
    }
    let all: Vec<String> = channels.iter().map(|c| format!("channel={c}")).collect();
    let all = format!("/events?{}", all.join("&"));
    let mut everything = [(
        "all".to_string(),
        SseClient::open(gateway.addr, &all, &[]).await?.1,
        Seen::default(),
    )];
    publish_and_read(&cluster, backend, &mut clients, 0..5, None).await?;

    // Everything written so far is on the replica too: this failover loses nothing.
    let victim = shards[0].0;
    wait_replicated(victim, 1).await?;
    let fault_at = Instant::now();
    cluster.kill_node(victim).await?;
    let new_primary = cluster.wait_for_failover_of(victim).await?;
    let marker = 1_000;
    let back = publish_until_served(&cluster, backend, &mut clients, 0, marker, fault_at).await?;
    println!(
        "cluster, redis history, primary :{victim} killed: its channel served again by \
         :{new_primary} {:?} after the kill",
        back - fault_at
    );

    // A slot moves under the second shard's channel.
    let moving = channels[1].clone();
    let target = shards[2].0;
    let moved_at = Instant::now();
    cluster.migrate_slot(key_slot(&moving), target).await?;
    let marker = 2_000;
    clients[1].2.first_marked = None;
    let back = publish_until_served(&cluster, backend, &mut clients, 1, marker, moved_at).await?;
    println!(
        "cluster, redis history, slot migrated: its channel served again {:?} after the move",
        back - moved_at
    );

    // A planned failover of the shard that now serves the second and third channels.
    let replica = cluster.replica_of(target).await?;
    let failover_at = Instant::now();
    cluster.failover(replica).await?;
    let marker = 2_500;
    clients[2].2.first_marked = None;
    let back =
        publish_until_served(&cluster, backend, &mut clients, 2, marker, failover_at).await?;
    println!(
        "cluster, redis history, CLUSTER FAILOVER: its channels served again {:?} after it",
        back - failover_at
    );

    // Every acknowledged event arrived, in order, with no reset, on every channel.
    publish_and_read(&cluster, backend, &mut clients, 3_000..3_001, None).await?;
    for (channel, _, seen) in &clients {
        assert!(seen.resets.is_empty(), "{channel}: {seen:?}");
        let numbers: Vec<u64> = seen
            .data
            .iter()
            .filter_map(|d| d.rsplit_once('-').and_then(|(_, n)| n.parse().ok()))
            .collect();
        assert_eq!(numbers, seen.acknowledged, "{channel}");
    }
    // The stream over every shard saw all of it too, and resumes from its one id.
    let (_, all_client, all_seen) = &mut everything[0];
    while let Ok(block) = all_client
        .next_block_within(Duration::from_millis(300))
        .await
    {
        if let Some(reset) = block.reset() {
            all_seen.resets.push(reset);
        } else if block.is_event() {
            all_seen.data.push(block.data().to_string());
            all_seen.last_event_id = block.id.clone();
        }
    }
    assert!(all_seen.resets.is_empty(), "{all_seen:?}");
    let expected: usize = clients.iter().map(|(_, _, s)| s.acknowledged.len()).sum();
    assert_eq!(all_seen.data.len(), expected, "{all_seen:?}");
    let last_id = all_seen.last_event_id.clone().ok_or("events carry ids")?;
    let resume = [("Last-Event-ID", last_id.as_str())];
    let (status, mut resumed) = SseClient::open(gateway.addr, &all, &resume).await?;
    assert_eq!(status, 200);
    for channel in &channels {
        publish(&cluster, backend, channel, &format!("{channel}-4000")).await?;
    }
    let got = resumed.next_data(3).await?;
    let mut want: Vec<String> = channels.iter().map(|c| format!("{c}-4000")).collect();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    want.sort();
    assert_eq!(got_sorted, want);
    gateway.stop().await
}

/// Redis backend: a failover that loses acknowledged writes (the replica was cut off, then
/// took over). The clients saw those events; the gateway tells them `unknown_position` for
/// that channel only, and new events get ids past the lost ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_history_writes_lost_in_a_takeover_reset_only_their_channel() -> TestResult {
    let backend = HistoryBackend::Redis;
    // A cluster of its own: the takeover leaves the old primary out of step for a while.
    let cluster = TestCluster::start().await?;
    let gateway =
        TestGateway::start_ready(cluster_settings(&cluster, HistoryBackend::Redis)).await?;
    let shards = cluster.channels_on_each_shard(1).await?;
    let channels: Vec<String> = shards.iter().map(|(_, names)| names[0].clone()).collect();
    let all: Vec<String> = channels.iter().map(|c| format!("channel={c}")).collect();
    let all = format!("/events?{}", all.join("&"));
    let mut clients = vec![(
        channels[0].clone(),
        SseClient::open(gateway.addr, &all, &[]).await?.1,
        Seen::default(),
    )];
    publish_and_read(&cluster, backend, &mut clients, 0..3, None).await?;

    let victim = shards[0].0;
    let lost: Vec<redis::Cmd> = (100..103)
        .map(|n| {
            let mut call = redis::cmd("FCALL");
            call.arg("ssehub_publish")
                .arg(1)
                .arg(&channels[0])
                .arg(format!("{}-{n}", channels[0]));
            call
        })
        .collect();
    let fault_at = Instant::now();
    cluster.takeover_losing(victim, &lost).await?;
    let marker = 1_000;
    let back = publish_until_served(&cluster, backend, &mut clients, 0, marker, fault_at).await?;
    println!(
        "cluster, lossy takeover: served again {:?} after it",
        back - fault_at
    );
    let seen = &clients[0].2;
    assert!(seen.data.iter().any(|d| d.ends_with("-100")), "{seen:?}");
    assert_eq!(
        seen.resets,
        vec![("unknown_position".to_string(), vec![channels[0].clone()])]
    );
    gateway.stop().await
}
