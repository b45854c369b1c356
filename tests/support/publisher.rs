//! A steady publisher for the redis backend: numbers `0, 1, 2, ...` on each of its channels
//! through `FCALL ssehub_publish`, at a fixed total rate, until stopped; then `end` on every
//! channel, so readers know they have seen the whole sequence. Every call of one tick goes out
//! as one pipeline on one connection, so a high rate is really met and each channel's numbers
//! reach Redis in order. It runs on a thread and runtime of its own, so a test runtime busy
//! with thousands of clients does not slow it down.

use std::time::Duration;

use redis::AsyncConnectionConfig;
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};

use super::{TestRedis, TestResult, PATIENCE};

/// The payload published on every channel after the last number.
pub const END: &str = "end";
/// How often a batch of calls goes out.
const TICK: Duration = Duration::from_millis(10);
/// Longest a publisher runs, whatever the test does (every loop bounded in time).
const MAX_RUN: Duration = Duration::from_secs(120);

/// What a stopped publisher did.
#[derive(Debug)]
pub struct Published {
    /// How many numbers each channel got (its last number is this minus one), in channel order.
    pub counts: Vec<u64>,
    /// Calls per second achieved, `end` excluded.
    pub rate: f64,
}

/// A running publisher.
pub struct StoredPublisher {
    stop: watch::Sender<bool>,
    outcome: oneshot::Receiver<TestResult<Published>>,
}

impl StoredPublisher {
    /// Starts publishing `per_second` numbers in total, spread round-robin over `channels`.
    pub async fn start(
        redis: &TestRedis,
        channels: &[String],
        per_second: u32,
    ) -> TestResult<StoredPublisher> {
        let client = redis::Client::open(redis.url())?;
        let channels = channels.to_vec();
        let (stop, stopped) = watch::channel(false);
        let (done, outcome) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::spawn(move || {
            let published = runtime.block_on(async move {
                // The crate's default (half a second) is too short for a loaded CI runner.
                let config = AsyncConnectionConfig::new().set_response_timeout(Some(PATIENCE));
                let connection = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                publish_steadily(connection, channels, per_second, stopped).await
            });
            let _ = done.send(published);
        });
        Ok(StoredPublisher { stop, outcome })
    }

    /// Stops, publishes `end` on every channel, and reports what was published (or why
    /// publishing failed).
    pub async fn finish(self) -> TestResult<Published> {
        let _ = self.stop.send(true);
        tokio::time::timeout(PATIENCE, self.outcome)
            .await
            .map_err(|_| "the publisher did not stop")??
    }
}

async fn publish_steadily(
    mut connection: redis::aio::MultiplexedConnection,
    channels: Vec<String>,
    per_second: u32,
    mut stopped: watch::Receiver<bool>,
) -> TestResult<Published> {
    let mut counts = vec![0u64; channels.len()];
    let mut sent = 0u64;
    let mut next_channel = 0;
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let started = Instant::now();
    while started.elapsed() < MAX_RUN {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped.changed() => break,
        }
        // What is due by now, so a slow round trip is made up in the next batch and the rate
        // holds on average.
        let due = (f64::from(per_second) * started.elapsed().as_secs_f64()) as u64;
        if due <= sent {
            continue;
        }
        let mut pipeline = redis::pipe();
        for _ in sent..due {
            let n = counts[next_channel];
            stored_publish(&mut pipeline, &channels[next_channel], &n.to_string());
            counts[next_channel] += 1;
            next_channel = (next_channel + 1) % channels.len();
        }
        sent = due;
        let _: Vec<String> = pipeline.query_async(&mut connection).await?;
    }
    let rate = counts.iter().sum::<u64>() as f64 / started.elapsed().as_secs_f64();
    let mut pipeline = redis::pipe();
    for channel in &channels {
        stored_publish(&mut pipeline, channel, END);
    }
    let _: Vec<String> = pipeline.query_async(&mut connection).await?;
    Ok(Published { counts, rate })
}

fn stored_publish(pipeline: &mut redis::Pipeline, channel: &str, payload: &str) {
    pipeline
        .cmd("FCALL")
        .arg("ssehub_publish")
        .arg(1)
        .arg(channel)
        .arg(payload);
}
