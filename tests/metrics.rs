//! `/metrics`: every documented series exists from start-up and moves as real clients connect,
//! receive, resume and disconnect.
//!
//! One test on purpose: the metrics recorder is process-wide, so this binary runs a single
//! scenario and can assert exact values.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use support::*;

/// Every series the README documents, as rendered with its fixed labels.
const DOCUMENTED: &[&str] = &[
    "ssehub_connections",
    "ssehub_connections_opened_total",
    "ssehub_connections_closed_total{reason=\"client_gone\"}",
    "ssehub_connections_closed_total{reason=\"shutdown\"}",
    "ssehub_requests_rejected_total{status=\"400\"}",
    "ssehub_requests_rejected_total{status=\"403\"}",
    "ssehub_requests_rejected_total{status=\"404\"}",
    "ssehub_requests_rejected_total{status=\"405\"}",
    "ssehub_requests_rejected_total{status=\"503\"}",
    "ssehub_events_received_total",
    "ssehub_events_delivered_total",
    "ssehub_bytes_sent_total",
    "ssehub_fanout_latency_seconds_count",
    "ssehub_fanout_latency_seconds_sum",
    "ssehub_fanout_latency_seconds_bucket{le=\"0.0001\"}",
    "ssehub_fanout_latency_seconds_bucket{le=\"10\"}",
    "ssehub_resumes_total{outcome=\"replayed\"}",
    "ssehub_resumes_total{outcome=\"unknown_position\"}",
    "ssehub_resumes_total{outcome=\"history_expired\"}",
    "ssehub_resumes_total{outcome=\"upstream_interrupted\"}",
    "ssehub_events_replayed_total",
    "ssehub_resets_total{reason=\"unknown_position\"}",
    "ssehub_resets_total{reason=\"history_expired\"}",
    "ssehub_resets_total{reason=\"upstream_interrupted\"}",
    "ssehub_redis_up",
    "ssehub_redis_shards_known",
    "ssehub_redis_shards_up",
    "ssehub_redis_reconnects_total",
    "ssehub_redis_channels",
    "ssehub_channels_evicted_total",
    "ssehub_history_events",
    "ssehub_history_bytes",
    "ssehub_history_evicted_total",
    "ssehub_payloads_dropped_total{reason=\"invalid_utf8\"}",
    "ssehub_payloads_dropped_total{reason=\"schema_invalid\"}",
    "ssehub_connections_closed_total{reason=\"stalled\"}",
    "ssehub_requests_rejected_total{status=\"431\"}",
    "ssehub_tcp_connections{listener=\"public\"}",
    "ssehub_tcp_connections{listener=\"admin\"}",
    "ssehub_tcp_connections_refused_total{listener=\"public\",reason=\"max_connections\"}",
    "ssehub_tcp_connections_refused_total{listener=\"public\",reason=\"max_connections_per_ip\"}",
    "ssehub_tcp_connections_expired_total{listener=\"public\",reason=\"first_request_timeout\"}",
    "ssehub_tcp_connections_expired_total{listener=\"public\",reason=\"idle\"}",
    "ssehub_tcp_connections_expired_total{listener=\"public\",reason=\"stalled\"}",
    "ssehub_requests_rejected_total{status=\"413\"}",
    "ssehub_requests_rejected_total{status=\"422\"}",
    "ssehub_publish_requests_total{status=\"200\"}",
    "ssehub_publish_requests_total{status=\"400\"}",
    "ssehub_publish_requests_total{status=\"401\"}",
    "ssehub_publish_requests_total{status=\"403\"}",
    "ssehub_publish_requests_total{status=\"405\"}",
    "ssehub_publish_requests_total{status=\"413\"}",
    "ssehub_publish_requests_total{status=\"422\"}",
    "ssehub_publish_requests_total{status=\"503\"}",
    "ssehub_history_reads_total{outcome=\"ok\"}",
    "ssehub_history_reads_total{outcome=\"history_expired\"}",
    "ssehub_history_reads_total{outcome=\"unknown_position\"}",
    "ssehub_history_reads_total{outcome=\"error\"}",
    "ssehub_upstream_recovered_events_total",
];

/// One scrape: series (name plus labels, as rendered) to value.
struct Scrape(HashMap<String, f64>);

impl Scrape {
    async fn take(admin: SocketAddr) -> TestResult<Scrape> {
        let (status, text) = get(admin, "/metrics", &[]).await?;
        assert_eq!(status, 200);
        let mut series = HashMap::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (key, value) = line.rsplit_once(' ').ok_or("bad exposition line")?;
            series.insert(key.to_string(), value.parse()?);
        }
        Ok(Scrape(series))
    }

    fn value(&self, key: &str) -> TestResult<f64> {
        self.0
            .get(key)
            .copied()
            .ok_or_else(|| format!("series {key} missing").into())
    }
}

/// Waits until `key` has `expected` (evictions run on a 1 s sweep; streams close asynchronously).
async fn expect(admin: SocketAddr, key: &str, expected: f64) -> TestResult {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let seen = Scrape::take(admin).await?.value(key).ok();
        if seen == Some(expected) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{key}: expected {expected}, last seen {seen:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn metrics_follow_clients_through_connect_receive_resume_and_disconnect() -> TestResult {
    let mut redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.history.capacity = 5;
    let gateway = TestGateway::start_ready(settings).await?;
    let admin = gateway.admin;

    // Everything exists at zero before the first client.
    let start = Scrape::take(admin).await?;
    for key in DOCUMENTED {
        start.value(key)?;
    }
    assert_eq!(start.value("ssehub_redis_up")?, 1.0);
    assert_eq!(start.value("ssehub_redis_shards_known")?, 1.0);
    assert_eq!(start.value("ssehub_redis_shards_up")?, 1.0);
    assert_eq!(start.value("ssehub_connections")?, 0.0);
    assert!(start
        .0
        .keys()
        .any(|k| k.starts_with("ssehub_build_info{version=\"") && k.contains("commit=\"")));

    // Two clients receive three events each.
    let mut a = gateway.subscribe("channel=m").await?;
    let mut b = gateway.subscribe("channel=m").await?;
    a.next_block().await?;
    b.next_block().await?;
    expect(admin, "ssehub_connections", 2.0).await?;
    expect(admin, "ssehub_connections_opened_total", 2.0).await?;
    for n in 0..3 {
        redis.publish("m", format!("{n}")).await?;
    }
    a.next_data(3).await?;
    b.next_data(3).await?;
    let scrape = Scrape::take(admin).await?;
    assert_eq!(scrape.value("ssehub_events_received_total")?, 3.0);
    assert_eq!(scrape.value("ssehub_events_delivered_total")?, 6.0);
    assert_eq!(scrape.value("ssehub_fanout_latency_seconds_count")?, 6.0);
    assert!(scrape.value("ssehub_fanout_latency_seconds_sum")? > 0.0);
    assert!(scrape.value("ssehub_bytes_sent_total")? > 6.0 * 10.0);
    expect(admin, "ssehub_redis_channels", 1.0).await?;
    expect(admin, "ssehub_history_events", 3.0).await?;
    assert!(Scrape::take(admin).await?.value("ssehub_history_bytes")? > 0.0);

    // One leaves; it resumes after missing two events.
    let last = a.last_event_id.clone().ok_or("no id")?;
    drop(a);
    expect(admin, "ssehub_connections", 1.0).await?;
    expect(
        admin,
        "ssehub_connections_closed_total{reason=\"client_gone\"}",
        1.0,
    )
    .await?;
    redis.publish("m", "3").await?;
    redis.publish("m", "4").await?;
    b.next_data(2).await?; // ingested before the resume reads the ring
    let mut resumed = gateway
        .subscribe_with("channel=m", &[("Last-Event-ID", &last)])
        .await?;
    resumed.next_block().await?;
    resumed.next_data(2).await?;
    let scrape = Scrape::take(admin).await?;
    assert_eq!(
        scrape.value("ssehub_resumes_total{outcome=\"replayed\"}")?,
        1.0
    );
    assert_eq!(scrape.value("ssehub_events_replayed_total")?, 2.0);

    // A foreign id and an evicted position are counted as resets.
    let mut foreign = gateway
        .subscribe_with("channel=m", &[("Last-Event-ID", "nope-1")])
        .await?;
    foreign.next_event().await?;
    for n in 5..12 {
        redis.publish("m", format!("{n}")).await?;
    }
    expect(admin, "ssehub_history_evicted_total", 7.0).await?;
    let mut expired = gateway
        .subscribe_with("channel=m", &[("Last-Event-ID", &last)])
        .await?;
    expired.next_event().await?;
    let scrape = Scrape::take(admin).await?;
    assert_eq!(
        scrape.value("ssehub_resumes_total{outcome=\"unknown_position\"}")?,
        1.0
    );
    assert_eq!(
        scrape.value("ssehub_resets_total{reason=\"unknown_position\"}")?,
        1.0
    );
    assert_eq!(
        scrape.value("ssehub_resumes_total{outcome=\"history_expired\"}")?,
        1.0
    );
    assert_eq!(
        scrape.value("ssehub_resets_total{reason=\"history_expired\"}")?,
        1.0
    );

    // Rejected requests and dropped payloads.
    get(gateway.addr, "/events", &[]).await?;
    get(gateway.addr, "/nowhere", &[]).await?;
    redis.publish("m", b"\xff").await?;
    expect(
        admin,
        "ssehub_payloads_dropped_total{reason=\"invalid_utf8\"}",
        1.0,
    )
    .await?;
    let scrape = Scrape::take(admin).await?;
    assert_eq!(
        scrape.value("ssehub_requests_rejected_total{status=\"400\"}")?,
        1.0
    );
    assert_eq!(
        scrape.value("ssehub_requests_rejected_total{status=\"404\"}")?,
        1.0
    );

    // Redis goes away and comes back.
    let before_outage = b.last_event_id.clone().ok_or("no id")?;
    redis.kill().await?;
    expect(admin, "ssehub_redis_up", 0.0).await?;
    expect(admin, "ssehub_redis_shards_up", 0.0).await?;
    assert_eq!(
        Scrape::take(admin)
            .await?
            .value("ssehub_redis_shards_known")?,
        1.0,
        "a shard that is down is still known"
    );
    redis.restart().await?;
    expect(admin, "ssehub_redis_up", 1.0).await?;
    expect(admin, "ssehub_redis_shards_up", 1.0).await?;
    expect(admin, "ssehub_redis_reconnects_total", 1.0).await?;
    b.next_event().await?; // its reset
    let mut across = gateway
        .subscribe_with("channel=m", &[("Last-Event-ID", &before_outage)])
        .await?;
    across.next_block().await?;
    let scrape = Scrape::take(admin).await?;
    assert!(scrape.value("ssehub_resets_total{reason=\"upstream_interrupted\"}")? >= 1.0);

    // Shutdown closes the remaining streams with reason `shutdown`. The recorder is
    // process-wide, so a second gateway's /metrics still shows the first one's series.
    let observer = TestGateway::start_ready(test_settings(&redis)).await?;
    let open = Scrape::take(admin).await?.value("ssehub_connections")?;
    gateway.stop().await?;
    expect(
        observer.admin,
        "ssehub_connections_closed_total{reason=\"shutdown\"}",
        open,
    )
    .await?;
    expect(observer.admin, "ssehub_connections", 0.0).await?;
    observer.stop().await
}
