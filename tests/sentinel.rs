//! `redis.mode = "sentinel"`: the gateway finds the primary through the sentinels and follows
//! it through failovers (the primary killed, `SENTINEL FAILOVER`, a failover that loses
//! acknowledged writes), with real sentinels, a primary and two replicas.
//!
//! With the redis backend a client's stream must hold every event Redis still holds after the
//! failover, with a `gateway.reset` only for a channel whose delivered events Redis lost; with
//! the memory backend the client is told `upstream_interrupted` and served live again. Each
//! test prints the time from the fault to the first event delivered again.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ssehub::config::HistoryBackend;
use support::topology::{query, TestSentinels, TOPOLOGY_PATIENCE};
use support::topology_settings::{sentinel_settings, TOPOLOGY_SECRET};
use support::*;
use tokio::sync::watch;
use tokio::time::Instant;

const CHANNELS: [&str; 2] = ["orders", "stock"];
/// Pause between two rounds of publishes (one per channel).
const PUBLISH_EVERY: Duration = Duration::from_millis(20);
/// Longest a publisher runs, whatever the test does.
const MAX_PUBLISHING: Duration = Duration::from_secs(90);

fn events_path() -> String {
    let query: Vec<String> = CHANNELS.iter().map(|c| format!("channel={c}")).collect();
    format!("/events?{}", query.join("&"))
}

/// What a publisher was told, per channel: the numbers Redis acknowledged.
type Acknowledged = BTreeMap<String, Vec<u64>>;

/// Publishes `<channel>-<n>` on every channel, round after round, until stopped. With the
/// redis backend through the gateway's `POST /publish` (so the gateway's publisher must follow
/// the primary too); with the memory backend by `PUBLISH` on the primary the sentinels name.
struct Publisher {
    stop: watch::Sender<bool>,
    /// The next round's number: what was published before a fault is below its value then.
    next: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<TestResult<Acknowledged>>,
}

impl Publisher {
    fn start(
        gateway: SocketAddr,
        sentinels: Vec<u16>,
        backend: HistoryBackend,
    ) -> TestResult<Self> {
        Self::start_from(0, gateway, sentinels, backend)
    }

    /// Starts with round number `first`.
    fn start_from(
        first: u64,
        gateway: SocketAddr,
        sentinels: Vec<u16>,
        backend: HistoryBackend,
    ) -> TestResult<Self> {
        let token = ssehub::auth::mint_token(
            TOPOLOGY_SECRET,
            &[],
            &["*".to_string()],
            None,
            Duration::from_secs(600),
        )?;
        let (stop, stopped) = watch::channel(false);
        let next = Arc::new(AtomicU64::new(first));
        let counter = next.clone();
        let task = tokio::spawn(async move {
            let mut acknowledged = Acknowledged::new();
            let started = Instant::now();
            while !*stopped.borrow() && started.elapsed() < MAX_PUBLISHING {
                let n = counter.load(Ordering::SeqCst);
                for channel in CHANNELS {
                    let payload = format!("{channel}-{n}");
                    let published = match backend {
                        HistoryBackend::Redis => {
                            publish_through_gateway(gateway, &token, channel, &payload).await
                        }
                        HistoryBackend::Memory => {
                            publish_on_primary(&sentinels, channel, &payload).await
                        }
                    };
                    if published {
                        acknowledged.entry(channel.to_string()).or_default().push(n);
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(PUBLISH_EVERY).await;
            }
            Ok(acknowledged)
        });
        Ok(Publisher { stop, next, task })
    }

    fn next_number(&self) -> u64 {
        self.next.load(Ordering::SeqCst)
    }

    async fn stop(self) -> TestResult<Acknowledged> {
        let _ = self.stop.send(true);
        self.task.await?
    }
}

async fn publish_through_gateway(
    gateway: SocketAddr,
    token: &str,
    channel: &str,
    payload: &str,
) -> bool {
    let bearer = format!("Bearer {token}");
    let path = format!("/publish?channel={channel}");
    let answer = send_body(
        gateway,
        "POST",
        &path,
        &[("authorization", bearer.as_str())],
        payload.to_string(),
    )
    .await;
    matches!(answer, Ok(response) if response.status() == 200)
}

async fn publish_on_primary(sentinels: &[u16], channel: &str, payload: &str) -> bool {
    for sentinel in sentinels {
        let named: TestResult<(String, u16)> = query(
            *sentinel,
            redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(support::topology::MASTER_NAME),
        )
        .await;
        if let Ok((_, port)) = named {
            let published: TestResult<i64> =
                query(port, redis::cmd("PUBLISH").arg(channel).arg(payload)).await;
            return published.is_ok();
        }
    }
    false
}

/// What a client saw, per channel.
#[derive(Debug, Default)]
struct Seen {
    /// Numbers in arrival order.
    numbers: BTreeMap<String, Vec<u64>>,
    /// Every id, to check none was given to two events.
    ids: Vec<String>,
    /// `(reason, channels)` of each reset.
    resets: Vec<(String, Vec<String>)>,
    /// Per channel, how many of its numbers had arrived at each of its resets.
    reset_at: BTreeMap<String, Vec<usize>>,
    /// When the first event published after the fault arrived.
    first_after_fault: Option<Instant>,
    /// `(channel, number, arrival)` of every event.
    arrivals: Vec<(String, u64, Instant)>,
    last_event_id: Option<String>,
}

impl Seen {
    /// Reads events for `window`, noting when one numbered `after` or later arrives.
    async fn read(&mut self, client: &mut SseClient, window: Duration, after: Option<u64>) {
        let until = Instant::now() + window;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            let Ok(block) = client.next_block_within(left).await else {
                return;
            };
            if !block.is_event() {
                continue;
            }
            if let Some(reset) = block.reset() {
                for channel in &reset.1 {
                    let arrived = self.numbers.get(channel).map_or(0, Vec::len);
                    self.reset_at
                        .entry(channel.clone())
                        .or_default()
                        .push(arrived);
                }
                self.resets.push(reset);
                continue;
            }
            let Some((channel, number)) = block.data().rsplit_once('-') else {
                continue;
            };
            let Ok(number) = number.parse::<u64>() else {
                continue;
            };
            if after.is_some_and(|after| number >= after) && self.first_after_fault.is_none() {
                self.first_after_fault = Some(Instant::now());
            }
            self.numbers
                .entry(channel.to_string())
                .or_default()
                .push(number);
            self.arrivals
                .push((channel.to_string(), number, Instant::now()));
            if let Some(id) = &block.id {
                self.ids.push(id.clone());
                self.last_event_id = Some(id.clone());
            }
        }
    }

    fn count(&self) -> usize {
        self.numbers.values().map(Vec::len).sum()
    }

    fn reset_channels(&self) -> BTreeSet<String> {
        self.resets
            .iter()
            .flat_map(|(_, c)| c.iter().cloned())
            .collect()
    }
}

/// The numbers Redis holds for `channel` (its stream on the primary), in order.
async fn stored_numbers(primary: u16, channel: &str) -> TestResult<Vec<u64>> {
    let key = format!("ssehub:{{{channel}}}:h");
    // Entries are `[id, [field, value, ...]]`; the payload is field `p`.
    let entries: Vec<(String, Vec<String>)> =
        query(primary, redis::cmd("XRANGE").arg(&key).arg("-").arg("+")).await?;
    let mut numbers = Vec::new();
    for (_, fields) in entries {
        let payload = fields
            .chunks_exact(2)
            .find(|pair| pair[0] == "p")
            .map(|pair| &pair[1])
            .ok_or("an entry without payload")?;
        let (_, number) = payload.rsplit_once('-').ok_or("a foreign payload")?;
        numbers.push(number.parse()?);
    }
    Ok(numbers)
}

/// Checks a redis-backend stream across a failover, channel by channel: in order without
/// repeats; between two resets (and after the last) every event Redis holds was delivered; a
/// delivered event Redis no longer has was published; and a reset for exactly the channels
/// whose delivered events Redis lost. (A reset tells the client to refetch: what Redis holds
/// from before the point the stream goes on from may be skipped.)
async fn check_exact_delivery(
    seen: &Seen,
    acknowledged: &Acknowledged,
    primary: u16,
) -> TestResult<BTreeSet<String>> {
    let mut lost_channels = BTreeSet::new();
    for channel in CHANNELS {
        let got = seen.numbers.get(channel).cloned().unwrap_or_default();
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "{channel}: out of order or repeated: {got:?}"
        );
        let stored = stored_numbers(primary, channel).await?;
        let resets = seen.reset_at.get(channel).cloned().unwrap_or_default();
        for segment in segments(&got, &resets) {
            let (Some(first), Some(last)) = (segment.first(), segment.last()) else {
                continue;
            };
            let is_last = segment.as_ptr_range().end == got.as_ptr_range().end;
            let missing: Vec<u64> = stored
                .iter()
                .filter(|n| **n >= *first && (is_last || **n <= *last))
                .filter(|n| !segment.contains(n))
                .copied()
                .collect();
            assert!(
                missing.is_empty(),
                "{channel}: Redis holds {missing:?}, never delivered"
            );
        }
        let acked: BTreeSet<u64> = acknowledged
            .get(channel)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        let stored_set: BTreeSet<u64> = stored.iter().copied().collect();
        let lost: Vec<u64> = got
            .iter()
            .filter(|n| !stored_set.contains(n))
            .copied()
            .collect();
        // A delivered event Redis no longer has must have been published (acknowledged, or
        // in flight when the primary died: its answer then never came).
        let unknown: Vec<&u64> = lost
            .iter()
            .filter(|n| !acked.contains(n) && acked.range(**n..).next().is_some())
            .collect();
        assert!(
            unknown.is_empty(),
            "{channel}: delivered but never published: {unknown:?}"
        );
        if !lost.is_empty() {
            println!(
                "{channel}: {} delivered event(s) lost by Redis: {lost:?}",
                lost.len()
            );
            lost_channels.insert(channel.to_string());
        }
    }
    assert_eq!(
        seen.reset_channels(),
        lost_channels,
        "resets {:?} must name exactly the channels whose delivered events Redis lost",
        seen.resets
    );
    let distinct: BTreeSet<&String> = seen.ids.iter().collect();
    assert_eq!(
        distinct.len(),
        seen.ids.len(),
        "an id was given to two events"
    );
    Ok(lost_channels)
}

/// When the first event numbered `after` or later that Redis kept arrived: the end of the
/// outage as clients see it (events the old primary took and lost do not count).
async fn first_kept_arrival(seen: &Seen, primary: u16, after: u64) -> TestResult<Instant> {
    let mut kept = BTreeMap::new();
    for channel in CHANNELS {
        let stored: BTreeSet<u64> = stored_numbers(primary, channel)
            .await?
            .into_iter()
            .collect();
        kept.insert(channel.to_string(), stored);
    }
    seen.arrivals
        .iter()
        .find(|(channel, number, _)| *number >= after && kept[channel].contains(number))
        .map(|(_, _, at)| *at)
        .ok_or_else(|| "no event Redis kept arrived after the fault".into())
}

/// `numbers` cut at each reset's count.
fn segments<'a>(numbers: &'a [u64], resets: &[usize]) -> Vec<&'a [u64]> {
    let mut cuts = vec![0];
    cuts.extend(resets.iter().map(|at| (*at).min(numbers.len())));
    cuts.push(numbers.len());
    cuts.windows(2).map(|w| &numbers[w[0]..w[1]]).collect()
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    KillPrimary,
    SentinelFailover,
}

/// A failover under live publishing with the redis backend, a client on both channels that
/// reconnects with its `Last-Event-ID` halfway: every event Redis holds arrives exactly once.
async fn redis_backend_survives(fault: Fault) -> TestResult {
    let mut sentinels = TestSentinels::start().await?;
    let gateway =
        TestGateway::start_ready(sentinel_settings(&sentinels, HistoryBackend::Redis)).await?;
    let mut client = SseClient::open(gateway.addr, &events_path(), &[]).await?.1;
    let publisher = Publisher::start(
        gateway.addr,
        sentinels.sentinel_ports(),
        HistoryBackend::Redis,
    )?;
    let mut seen = Seen::default();
    seen.read(&mut client, Duration::from_millis(600), None)
        .await;
    assert!(seen.count() > 0, "no events before the fault");

    let fault_at = Instant::now();
    let before = publisher.next_number() + 1;
    let old = match fault {
        Fault::KillPrimary => sentinels.kill_primary().await?,
        Fault::SentinelFailover => sentinels.sentinel_failover().await?,
    };
    // Read while the failover happens, so arrival times are measured as they come.
    while seen.first_after_fault.is_none() && fault_at.elapsed() < TOPOLOGY_PATIENCE {
        seen.read(&mut client, Duration::from_millis(100), Some(before))
            .await;
    }
    let first = seen
        .first_after_fault
        .ok_or("no event published after the fault was delivered")?;
    let new = sentinels
        .wait_for_primary_change(old, TOPOLOGY_PATIENCE)
        .await?;
    let kept = first_kept_arrival(&seen, new, before).await?;
    println!(
        "{fault:?}: first event published after the fault delivered {:?} after it; first \
         one that Redis kept {:?} after it",
        first - fault_at,
        kept - fault_at
    );

    // Halfway, the client reconnects from its position (one id over both channels).
    drop(client);
    let last_id = seen.last_event_id.clone().ok_or("events carry ids")?;
    let resume = [("Last-Event-ID", last_id.as_str())];
    let (status, mut client) = SseClient::open(gateway.addr, &events_path(), &resume).await?;
    if status != 200 {
        let body = client.next_block().await;
        panic!("resume answered {status}: {body:?}");
    }
    seen.read(&mut client, Duration::from_millis(500), None)
        .await;
    let acknowledged = publisher.stop().await?;
    // Everything published is delivered once the stream is quiet.
    seen.read(&mut client, Duration::from_secs(1), None).await;
    let lost = check_exact_delivery(&seen, &acknowledged, new).await?;
    println!(
        "{fault:?}: {} events delivered, lost channels {lost:?}",
        seen.count()
    );
    gateway.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_is_followed_and_every_event_redis_holds_is_delivered() -> TestResult {
    redis_backend_survives(Fault::KillPrimary).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_is_followed_and_every_event_redis_holds_is_delivered() -> TestResult {
    redis_backend_survives(Fault::SentinelFailover).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_lost_in_a_failover_reset_only_their_channel_and_no_id_is_reused() -> TestResult {
    let mut sentinels = TestSentinels::start().await?;
    let gateway =
        TestGateway::start_ready(sentinel_settings(&sentinels, HistoryBackend::Redis)).await?;
    let mut client = SseClient::open(gateway.addr, &events_path(), &[]).await?.1;
    client.next_block().await?;
    let mut seen = Seen::default();
    let publisher = Publisher::start(
        gateway.addr,
        sentinels.sentinel_ports(),
        HistoryBackend::Redis,
    )?;
    seen.read(&mut client, Duration::from_millis(400), None)
        .await;
    let mut acknowledged = publisher.stop().await?;
    seen.read(&mut client, Duration::from_millis(300), None)
        .await;

    // Three events on "orders" that the primary acknowledges and delivers, then loses.
    let next = acknowledged.values().flatten().max().map_or(0, |n| n + 1);
    let lost: Vec<redis::Cmd> = (next..next + 3)
        .map(|n| {
            let mut call = redis::cmd("FCALL");
            call.arg("ssehub_publish")
                .arg(1)
                .arg("orders")
                .arg(format!("orders-{n}"));
            call
        })
        .collect();
    let fault_at = Instant::now();
    let (old, _) = sentinels.kill_primary_losing(&lost).await?;
    acknowledged
        .entry("orders".to_string())
        .or_default()
        .extend(next..next + 3);
    let resumed_from = next + 3;
    let publisher = Publisher::start_from(
        resumed_from,
        gateway.addr,
        sentinels.sentinel_ports(),
        HistoryBackend::Redis,
    )?;
    while seen.first_after_fault.is_none() && fault_at.elapsed() < TOPOLOGY_PATIENCE {
        seen.read(&mut client, Duration::from_millis(100), Some(resumed_from))
            .await;
    }
    let first = seen
        .first_after_fault
        .ok_or("nothing delivered after the failover")?;
    println!(
        "lossy failover: first event after it delivered {:?} after the kill",
        first - fault_at
    );
    let new = sentinels
        .wait_for_primary_change(old, TOPOLOGY_PATIENCE)
        .await?;
    seen.read(&mut client, Duration::from_millis(300), None)
        .await;
    for (channel, numbers) in publisher.stop().await? {
        acknowledged.entry(channel).or_default().extend(numbers);
    }
    seen.read(&mut client, Duration::from_secs(1), None).await;
    let got_lost = seen
        .numbers
        .get("orders")
        .is_some_and(|n| n.contains(&next));
    assert!(
        got_lost,
        "the client saw the events Redis later lost: {seen:?}"
    );
    let lost_channels = check_exact_delivery(&seen, &acknowledged, new).await?;
    assert_eq!(lost_channels, BTreeSet::from(["orders".to_string()]));
    assert!(
        seen.resets
            .iter()
            .all(|(reason, _)| reason == "unknown_position"),
        "{:?}",
        seen.resets
    );
    gateway.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_memory_backend_a_failover_is_announced_then_served_live() -> TestResult {
    let mut sentinels = TestSentinels::start().await?;
    let gateway =
        TestGateway::start_ready(sentinel_settings(&sentinels, HistoryBackend::Memory)).await?;
    // `/readyz` names the mode; behind sentinels the gateway subscribes on one shard, the primary.
    let (status, body) = get(gateway.admin, "/readyz", &[]).await?;
    let readiness: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(
        (status, &readiness["redis"]),
        (
            200,
            &serde_json::json!({ "mode": "sentinel", "shards_known": 1, "shards_up": 1 })
        ),
        "{body}"
    );
    let mut client = SseClient::open(gateway.addr, &events_path(), &[]).await?.1;
    let publisher = Publisher::start(
        gateway.addr,
        sentinels.sentinel_ports(),
        HistoryBackend::Memory,
    )?;
    let mut seen = Seen::default();
    seen.read(&mut client, Duration::from_millis(500), None)
        .await;
    assert!(seen.count() > 0, "no events before the fault");

    let fault_at = Instant::now();
    let before = publisher.next_number() + 1;
    let old = sentinels.kill_primary().await?;
    while seen.first_after_fault.is_none() && fault_at.elapsed() < TOPOLOGY_PATIENCE {
        seen.read(&mut client, Duration::from_millis(100), Some(before))
            .await;
    }
    sentinels
        .wait_for_primary_change(old, TOPOLOGY_PATIENCE)
        .await?;
    let first = seen
        .first_after_fault
        .ok_or("nothing delivered after the failover")?;
    println!(
        "memory backend: first event after the kill delivered {:?} after it",
        first - fault_at
    );
    publisher.stop().await?;
    let expected: Vec<(String, Vec<String>)> = vec![(
        "upstream_interrupted".to_string(),
        CHANNELS.iter().map(|c| c.to_string()).collect(),
    )];
    assert_eq!(seen.resets, expected);
    gateway.stop().await
}
