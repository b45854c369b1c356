//! Failures under load with the history in Redis (issue 14): an instance killed with thousands of
//! clients on it, and the subscription connection closed by Redis while events pour in. Either
//! way every client gets every event exactly once, in order, and no `gateway.reset`: a client
//! that moves to another instance brings only its last event id, and a gateway that lost its
//! subscription reads what it missed back from Redis.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::lean::LeanSseReader;
use support::publisher::{StoredPublisher, END};
use support::*;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Both tests load the 2 cores of a CI runner on their own; run one at a time.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Most blocks one client reads in a test (every loop bounded).
const MAX_BLOCKS: usize = 200_000;
/// Most attempts to open a stream on the surviving instance.
const MAX_OPEN_ATTEMPTS: usize = 50;
/// Pause between those attempts.
const OPEN_RETRY: Duration = Duration::from_millis(100);

/// `count` channel names starting with `prefix`.
fn channel_names(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|n| format!("{prefix}-{n}")).collect()
}

/// Checks that `data` is the channel's published sequence from its first number (`0` when
/// `from_start`) to the last one (`published` numbers were published, `0..published`), then
/// `end`: nothing missing, nothing twice, in order.
fn check_sequence(data: &[String], published: u64, from_start: bool) -> Result<(), String> {
    let Some((last, numbers)) = data.split_last() else {
        return Err("received nothing".to_string());
    };
    if last != END {
        return Err(format!("did not end with `{END}` but with {last:?}"));
    }
    let numbers: Vec<u64> = numbers
        .iter()
        .map(|n| n.parse().map_err(|_| format!("unexpected payload {n:?}")))
        .collect::<Result<_, _>>()?;
    let Some(&first) = numbers.first() else {
        return Err("received no number before the end".to_string());
    };
    if from_start && first != 0 {
        return Err(format!("the first number was {first}, not 0"));
    }
    for (offset, &n) in numbers.iter().enumerate() {
        let expected = first + offset as u64;
        if n != expected {
            return Err(format!(
                "got {n} where {expected} was due (first {first}, {} received)",
                numbers.len()
            ));
        }
    }
    let expected_last = published.checked_sub(1);
    if numbers.last().copied() != expected_last {
        return Err(format!(
            "the last number was {:?}, {expected_last:?} was published last",
            numbers.last()
        ));
    }
    Ok(())
}

/// Reads data events until `end`, failing on a reset or a lost stream.
async fn read_to_end(mut client: SseClient) -> TestResult<Vec<String>> {
    let mut data = Vec::new();
    for _ in 0..MAX_BLOCKS {
        let block = client.next_event().await?;
        if let Some(reset) = block.reset() {
            return Err(format!("unexpected reset {reset:?} after {} events", data.len()).into());
        }
        data.push(block.data().to_string());
        if block.data() == END {
            return Ok(data);
        }
    }
    Err("read too many blocks".into())
}

/// How far the clients of the storm have got.
#[derive(Default)]
struct Progress {
    /// Clients that received their first event.
    started: AtomicUsize,
    /// Clients that received an event on the surviving instance.
    resumed: AtomicUsize,
}

/// Opens `path` on `addr` as EventSource reconnects: with `Last-Event-ID` when it has one,
/// again after a short pause while the instance cannot take it.
async fn open_stream(
    addr: SocketAddr,
    path: &str,
    last_id: Option<&str>,
) -> TestResult<LeanSseReader> {
    let headers: Vec<(&str, &str)> = last_id
        .map(|id| ("Last-Event-ID", id))
        .into_iter()
        .collect();
    let mut failure = String::new();
    for _ in 0..MAX_OPEN_ATTEMPTS {
        match LeanSseReader::open(addr, path, &headers).await {
            Ok((_, Some(client))) => return Ok(client),
            Ok((status, None)) => failure = format!("status {status}"),
            Err(e) => failure = e.to_string(),
        }
        tokio::time::sleep(OPEN_RETRY).await;
    }
    Err(format!("could not open {path} on {addr}: {failure}").into())
}

/// One client of the storm: reads `channel` on `first` and, when that stream is lost, goes on
/// reading on `fallback` from its last event id alone, until `end`. Returns every data payload
/// received, failing on a reset.
async fn read_through_failover(
    channel: String,
    first: SocketAddr,
    fallback: SocketAddr,
    progress: Arc<Progress>,
) -> TestResult<Vec<String>> {
    let path = format!("/events?channel={channel}");
    let mut client = open_stream(first, &path, None).await?;
    let mut data: Vec<String> = Vec::new();
    let mut moved = false;
    let mut resumed = false;
    for _ in 0..MAX_BLOCKS {
        let block = match client.next_event().await {
            Ok(block) => block,
            Err(lost) if !moved => {
                let last_id = client
                    .last_event_id
                    .clone()
                    .ok_or_else(|| format!("the stream was lost ({lost}) before any id"))?;
                client = open_stream(fallback, &path, Some(&last_id)).await?;
                moved = true;
                continue;
            }
            Err(lost) => return Err(format!("lost the stream on the fallback: {lost}").into()),
        };
        if let Some(reset) = block.reset() {
            return Err(format!("unexpected reset {reset:?} after {} events", data.len()).into());
        }
        if data.is_empty() {
            progress.started.fetch_add(1, Ordering::Relaxed);
        }
        if moved && !resumed {
            resumed = true;
            progress.resumed.fetch_add(1, Ordering::Relaxed);
        }
        data.push(block.data().to_string());
        if block.data() == END {
            return Ok(data);
        }
    }
    Err("read too many blocks".into())
}

/// Awaits every reader within `patience` and checks each one's sequence against what was
/// published on its channel (see [`check_sequence`]); returns how many readers were checked.
async fn check_readers(
    readers: Vec<(usize, JoinHandle<TestResult<Vec<String>>>)>,
    published: &[u64],
    from_start: bool,
    patience: Duration,
) -> TestResult<usize> {
    let deadline = Instant::now() + patience;
    let total = readers.len();
    let mut failures = Vec::new();
    for (channel, reader) in readers {
        let outcome = match tokio::time::timeout_at(deadline, reader).await {
            Err(_) => Err("still reading when the test's patience ran out".to_string()),
            Ok(joined) => match joined {
                Err(e) => Err(format!("reader panicked: {e}")),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok(data)) => check_sequence(&data, published[channel], from_start),
            },
        };
        if let Err(failure) = outcome {
            failures.push(format!("a reader of channel {channel}: {failure}"));
        }
    }
    if !failures.is_empty() {
        let shown: Vec<&String> = failures.iter().take(5).collect();
        return Err(format!(
            "{} of {total} readers failed, e.g. {shown:#?}",
            failures.len()
        )
        .into());
    }
    Ok(total)
}

/// What the readers that already stopped failed with (at most a few).
async fn failures_so_far(
    readers: &mut [(usize, JoinHandle<TestResult<Vec<String>>>)],
) -> Vec<String> {
    let mut failures = Vec::new();
    for (channel, reader) in readers.iter_mut().filter(|(_, r)| r.is_finished()) {
        match reader.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => failures.push(format!("a reader of channel {channel}: {e}")),
            Err(e) => failures.push(format!("a reader of channel {channel} panicked: {e}")),
        }
        if failures.len() == 5 {
            break;
        }
    }
    failures
}

/// `failure`, with what the publisher has to say: clients that stop receiving may mean it
/// stopped.
async fn failed_while_publishing(
    failure: String,
    publisher: StoredPublisher,
) -> Box<dyn std::error::Error + Send + Sync> {
    let publishing = match publisher.finish().await {
        Ok(published) => format!(
            "published {:?} numbers at {:.0}/s",
            published.counts, published.rate
        ),
        Err(e) => format!("publishing failed: {e}"),
    };
    format!("{failure}; {publishing}").into()
}

const STORM_CHANNELS: usize = 10;
const STORM_CLIENTS_PER_CHANNEL: usize = 200;
/// Numbers published per second, over all channels.
const STORM_RATE: u32 = 200;
/// How long the 2,000 clients may take to open, later to resume, and then to read to the end
/// (the whole test stays near a minute at worst).
const STORM_PATIENCE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_instance_under_load_loses_nothing_for_its_2000_clients() -> TestResult {
    let _heavy = HEAVY.lock().await;
    let began = Instant::now();
    let redis = TestRedis::start().await?;
    let env = [
        ("SSEHUB__HISTORY__BACKEND", "redis"),
        ("SSEHUB__LOG__LEVEL", "warn"),
    ];
    let mut doomed = GatewayProcess::start(&redis, &env, None).await?;
    let survivor = GatewayProcess::start(&redis, &env, None).await?;
    let channels = channel_names("storm", STORM_CHANNELS);
    let publisher = StoredPublisher::start(&redis, &channels, STORM_RATE).await?;

    let total = STORM_CHANNELS * STORM_CLIENTS_PER_CHANNEL;
    let progress = Arc::new(Progress::default());
    let mut readers: Vec<(usize, JoinHandle<_>)> = (0..total)
        .map(|n| {
            let channel = n % STORM_CHANNELS;
            let reader = tokio::spawn(read_through_failover(
                channels[channel].clone(),
                doomed.addr,
                survivor.addr,
                progress.clone(),
            ));
            (channel, reader)
        })
        .collect();
    let all_started = eventually_within("every client received events", STORM_PATIENCE, || {
        let progress = progress.clone();
        async move { progress.started.load(Ordering::Relaxed) == total }
    })
    .await;
    if let Err(e) = all_started {
        let started = progress.started.load(Ordering::Relaxed);
        let failed = failures_so_far(&mut readers).await;
        let failure = format!("{e} ({started} did; readers that failed: {failed:#?})");
        return Err(failed_while_publishing(failure, publisher).await);
    }
    let opened = began.elapsed();

    doomed.kill().await?;
    let killed = Instant::now();
    let all_resumed = eventually_within(
        "every client resumed on the surviving instance",
        STORM_PATIENCE,
        || {
            let progress = progress.clone();
            async move { progress.resumed.load(Ordering::Relaxed) == total }
        },
    )
    .await;
    if let Err(e) = all_resumed {
        let resumed = progress.resumed.load(Ordering::Relaxed);
        let failed = failures_so_far(&mut readers).await;
        let failure = format!("{e} ({resumed} did; readers that failed: {failed:#?})");
        return Err(failed_while_publishing(failure, publisher).await);
    }
    let resumed = killed.elapsed();
    let published = publisher.finish().await?;
    let checked = check_readers(readers, &published.counts, false, STORM_PATIENCE).await?;
    assert_eq!(checked, total);
    println!(
        "{total} clients: open and reading after {opened:?}, all resumed {resumed:?} after the \
         kill, {:.0} events/s published, {:?} in all",
        published.rate,
        began.elapsed()
    );
    Ok(())
}

/// Closes the gateway's subscription connection from the Redis side; waits until there is one
/// to close (the gateway reconnects after each).
async fn kill_subscription_connections(redis: &TestRedis) -> TestResult {
    let connection = redis.connection().await?;
    eventually("a subscription connection to close", || {
        let mut connection = connection.clone();
        async move {
            let closed: redis::RedisResult<i64> = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("pubsub")
                .query_async(&mut connection)
                .await;
            matches!(closed, Ok(n) if n > 0)
        }
    })
    .await
}

/// The sum of every series of `name` on the admin listener (0 when none exists yet).
async fn metric_total(admin: SocketAddr, name: &str) -> TestResult<f64> {
    let series = scrape(admin).await?;
    Ok(series
        .iter()
        .filter(|(key, _)| *key == name || key.starts_with(&format!("{name}{{")))
        .map(|(_, value)| value)
        .sum())
}

const CATCH_UP_CHANNELS: usize = 3;
const CATCH_UP_CLIENTS: usize = 50;
/// Numbers published per second, over all channels.
const CATCH_UP_RATE: u32 = 1000;
/// How many times Redis closes the subscription connection, and how far apart.
const SUBSCRIPTION_KILLS: usize = 3;
const BETWEEN_KILLS: Duration = Duration::from_millis(400);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_subscription_connection_catches_up_from_redis_without_a_reset() -> TestResult {
    let _heavy = HEAVY.lock().await;
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(redis_backend_settings(&redis)).await?;
    let channels = channel_names("orders", CATCH_UP_CHANNELS);
    let mut readers = Vec::with_capacity(CATCH_UP_CLIENTS);
    for n in 0..CATCH_UP_CLIENTS {
        let channel = n % CATCH_UP_CHANNELS;
        let mut client = gateway
            .subscribe(&format!("channel={}", channels[channel]))
            .await?;
        // The preamble: the channel is served from here on.
        client.next_block().await?;
        readers.push((channel, tokio::spawn(read_to_end(client))));
    }

    let publisher = StoredPublisher::start(&redis, &channels, CATCH_UP_RATE).await?;
    for _ in 0..SUBSCRIPTION_KILLS {
        // Publishing goes on meanwhile: these pauses are load, not waits for an outcome.
        tokio::time::sleep(BETWEEN_KILLS).await;
        kill_subscription_connections(&redis).await?;
    }
    tokio::time::sleep(BETWEEN_KILLS).await;
    let published = publisher.finish().await?;
    println!(
        "published {:?} numbers at {:.0}/s while the subscription was closed \
         {SUBSCRIPTION_KILLS} times",
        published.counts, published.rate
    );

    check_readers(readers, &published.counts, true, PATIENCE).await?;
    let recovered = metric_total(gateway.admin, "ssehub_upstream_recovered_events_total").await?;
    assert!(recovered > 0.0, "no event was caught up from Redis");
    let resets = metric_total(gateway.admin, "ssehub_resets_total").await?;
    assert_eq!(resets, 0.0, "resets were sent");
    println!("{recovered} events caught up from Redis");
    gateway.stop().await
}
