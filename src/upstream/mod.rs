//! The upstream: the one task that owns the Redis subscription connection.
//!
//! It connects at start-up (retrying until Redis is there), SUBSCRIBEs when the hub asks for a
//! channel, UNSUBSCRIBEs channels the hub freed after their linger or early (to stay within
//! `channels.max_total`), and hands every message to
//! the hub, which sequences and stores it. It probes the connection with PING under a timeout so
//! a half-open TCP connection is noticed too. When the connection is lost it marks every channel
//! interrupted, reconnects with capped, jittered exponential backoff, subscribes everything again
//! and records a gap in each restored channel, so resuming clients are told what was lost.
//!
//! With the redis backend it subscribes to each channel's live broadcast instead and reads the
//! shared history through the `ssehub` functions (`history`): a reconnect then catches up from
//! Redis and costs clients nothing.
//!
//! Reconnection is owned here on purpose: the redis crate's `PubSub` stream simply ends when the
//! server goes away, and `ConnectionManager`'s resubscription gives up after a long outage.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use redis::aio::{PubSub, PubSubSink};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::config::RedisSettings;
use crate::dead_letter::{self, Received};
use crate::functions::{self, LibraryBounds};
use crate::hub::{Hub, PublishOutcome, SubscribeRequest, UpstreamRequest};
use crate::metrics;
use crate::topology::{NodeAddress, Primary, Topology};

mod cluster;
mod history;

use history::SharedHistory;

/// Most channels named in one SUBSCRIBE when restoring after a reconnect.
const RESUBSCRIBE_CHUNK: usize = 1000;
/// How often idle channels are freed and old history evicted.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How long a connection must stay up before the reconnect backoff starts again from its
/// initial delay. A Redis that cuts the gateway off right after every reconnect (client
/// output-buffer limit, a flapping proxy) would otherwise be retried at the initial delay each
/// time, and every brief success would send clients another `upstream_interrupted` reset.
const STABLE_CONNECTION: Duration = Duration::from_secs(30);
/// Most messages delivered in one go before the session turns to its other duties (commands,
/// pings, the sweep, shutdown) again.
const DELIVERY_BURST: usize = 128;

/// Runs until `shutdown` is cancelled. `shared_history` is set with the redis backend: the
/// bounds of the function library it loads.
pub async fn run(
    topology: Arc<Topology>,
    hub: Arc<Hub>,
    mut requests: mpsc::UnboundedReceiver<UpstreamRequest>,
    settings: RedisSettings,
    shared_history: Option<LibraryBounds>,
    shutdown: CancellationToken,
) {
    if topology.is_cluster() {
        return cluster::run(topology, hub, requests, settings, shared_history, shutdown).await;
    }
    let mut backoff = Backoff::new(
        Duration::from_millis(settings.reconnect_initial_ms),
        Duration::from_millis(settings.reconnect_max_ms),
    );
    let mut connected_before = false;
    let mut announcements = topology.announcements();
    while !shutdown.is_cancelled() {
        // Announcements from here on are checked against the node this connects to.
        announcements.borrow_and_update();
        let connect = tokio::time::timeout(
            Duration::from_secs(settings.connect_timeout_secs),
            connect(&topology),
        );
        let failure = match connect.await {
            Ok(Ok((primary, pubsub))) => {
                let client = primary.client;
                let command_timeout = Duration::from_secs(settings.command_timeout_secs);
                let shared = match shared_history {
                    Some(bounds) => SharedHistory::connect(&client, bounds, command_timeout)
                        .await
                        .map(Some),
                    None => Ok(None),
                };
                let mut session = Session {
                    hub: &hub,
                    requests: &mut requests,
                    settings: &settings,
                    shutdown: &shutdown,
                    topology: &topology,
                    announcements: &mut announcements,
                    node: primary.address,
                    shared: None,
                };
                let ended = match shared {
                    Ok(shared) => {
                        session.shared = shared;
                        session.run(pubsub, connected_before).await
                    }
                    Err(reason) => SessionEnd::Lost {
                        up_for: None,
                        reason,
                    },
                };
                match ended {
                    SessionEnd::Shutdown => break,
                    SessionEnd::Lost { up_for, reason } => {
                        if let Some(up_for) = up_for {
                            connected_before = true;
                            backoff.session_ended(up_for);
                        }
                        reason
                    }
                }
            }
            Ok(Err(e)) => format!("connect failed: {e}"),
            Err(_) => "connect timed out".to_string(),
        };
        hub.set_upstream_up(false);
        let delay = backoff.next_delay();
        tracing::warn!(
            reason = %failure,
            retry_in_ms = delay.as_millis() as u64,
            "redis subscription connection down"
        );
        wait_before_reconnect(&hub, delay, &mut announcements, &shutdown).await;
    }
    hub.set_upstream_up(false);
}

/// The subscription connection to the node that serves subscriptions now, with its client
/// (for the history's command connection).
async fn connect(topology: &Topology) -> Result<(Primary, PubSub), String> {
    let primary = topology.primary().await?;
    let pubsub = primary
        .client
        .get_async_pubsub()
        .await
        .map_err(|e| e.to_string())?;
    Ok((primary, pubsub))
}

/// Sleeps `delay` while still freeing idle channels and aging history. A new primary
/// announced meanwhile ends the wait: the old one is what failed.
async fn wait_before_reconnect(
    hub: &Hub,
    delay: Duration,
    announcements: &mut watch::Receiver<Option<NodeAddress>>,
    shutdown: &CancellationToken,
) {
    let until = Instant::now() + delay;
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return,
            _ = shutdown.cancelled() => return,
            Ok(()) = announcements.changed() => return,
            _ = sweep.tick() => {
                // Nothing to unsubscribe from: the next connection subscribes only what is left.
                sweep_hub(hub);
            }
        }
    }
}

/// Frees idle channels and ages history. Returns the freed channels.
fn sweep_hub(hub: &Hub) -> Vec<Arc<str>> {
    let sweep = hub.sweep(Instant::now());
    metrics::history_evicted(sweep.evicted);
    sweep.freed
}

/// Why a connected session ended.
enum SessionEnd {
    Shutdown,
    Lost {
        /// How long the session was up, if it got as far as restoring subscriptions.
        up_for: Option<Duration>,
        reason: String,
    },
}

/// One connected period of the subscription connection.
struct Session<'a> {
    hub: &'a Arc<Hub>,
    requests: &'a mut mpsc::UnboundedReceiver<UpstreamRequest>,
    settings: &'a RedisSettings,
    shutdown: &'a CancellationToken,
    topology: &'a Topology,
    /// New primaries, as sentinels announce them.
    announcements: &'a mut watch::Receiver<Option<NodeAddress>>,
    /// The node this session is connected to.
    node: Option<NodeAddress>,
    /// The shared history's command connection (redis backend).
    shared: Option<SharedHistory>,
}

impl Session<'_> {
    async fn run(&mut self, pubsub: PubSub, connected_before: bool) -> SessionEnd {
        let command_timeout = Duration::from_secs(self.settings.command_timeout_secs);
        let (mut sink, mut messages) = pubsub.split();
        if let Err(reason) = self.restore(&mut sink, command_timeout).await {
            return SessionEnd::Lost {
                up_for: None,
                reason,
            };
        }
        let up_since = Instant::now();
        if connected_before {
            metrics::redis_reconnected();
        }
        tracing::info!(
            channels = self.hub.channel_count(),
            reconnect = connected_before,
            "redis subscription connection up"
        );

        let (commands, command_queue) = mpsc::unbounded_channel();
        let (results_tx, mut results) = mpsc::unbounded_channel();
        let worker = tokio::spawn(run_commands(
            sink,
            command_queue,
            results_tx,
            command_timeout,
            self.shared.is_some(),
        ));
        let _abort_worker = AbortOnDrop(worker);

        let mut ping = tokio::time::interval_at(
            Instant::now() + Duration::from_secs(self.settings.ping_interval_secs),
            Duration::from_secs(self.settings.ping_interval_secs),
        );
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        let lost = |reason: String| SessionEnd::Lost {
            up_for: Some(up_since.elapsed()),
            reason,
        };
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
                Ok(()) = self.announcements.changed() => {
                    if self.topology.moved_from(&self.node) {
                        return lost("a new primary was announced".to_string());
                    }
                }
                message = messages.next() => match message {
                    Some(message) => {
                        if let Err(reason) = self.handle(&message).await {
                            return lost(reason);
                        }
                        // Deliver what has already arrived without a turn of the select per
                        // message (each turn sets up every branch again).
                        for _ in 1..DELIVERY_BURST {
                            match ready_now(&mut messages) {
                                Some(Some(message)) => {
                                    if let Err(reason) = self.handle(&message).await {
                                        return lost(reason);
                                    }
                                }
                                Some(None) => return lost("connection closed".to_string()),
                                None => break,
                            }
                        }
                    }
                    None => return lost("connection closed".to_string()),
                },
                Some(first) = self.requests.recv() => {
                    let mut batch = vec![first];
                    while let Ok(more) = self.requests.try_recv() {
                        batch.push(more);
                    }
                    for command in commands_in_order(batch) {
                        let _ = commands.send(command);
                    }
                }
                result = results.recv() => match result {
                    Some(Ok(Some(confirmed))) => {
                        if let Err(reason) = self.confirmed(&confirmed).await {
                            return lost(reason);
                        }
                    }
                    Some(Ok(None)) => {}
                    Some(Err(reason)) => return lost(reason),
                    None => return lost("command worker stopped".to_string()),
                },
                _ = ping.tick() => {
                    let _ = commands.send(Command::Ping);
                }
                _ = sweep.tick() => {
                    let freed = sweep_hub(self.hub);
                    if !freed.is_empty() {
                        tracing::debug!(channels = freed.len(), "unsubscribing idle channels");
                        let _ = commands.send(Command::Unsubscribe(freed));
                    }
                }
            }
        }
    }

    /// Subscribes every channel the hub holds, then marks them live at one position.
    async fn restore(&mut self, sink: &mut PubSubSink, timeout: Duration) -> Result<(), String> {
        // Queued requests are covered: the hub's list includes every channel created so far.
        while self.requests.try_recv().is_ok() {}
        let wanted = self.hub.subscriptions();
        let redis_backend = self.shared.is_some();
        for chunk in wanted.chunks(RESUBSCRIBE_CHUNK) {
            let names = wire_names(chunk.iter().map(|r| &*r.name), redis_backend);
            with_timeout(timeout, "SUBSCRIBE", sink.subscribe(&names)).await?;
        }
        match self.shared.as_mut() {
            // Subscribed first, so nothing published from here on is missed; then what each
            // channel missed meanwhile is read from Redis.
            Some(shared) => shared.restore(self.hub, &wanted).await?,
            None => self.hub.mark_subscribed(&wanted),
        }
        self.hub.set_upstream_up(true);
        Ok(())
    }

    /// Hands one message to the hub.
    async fn handle(&mut self, message: &redis::Msg) -> Result<(), String> {
        match self.shared.as_mut() {
            None => {
                self.deliver(message);
                Ok(())
            }
            Some(shared) => shared.deliver(self.hub, message).await,
        }
    }

    /// Makes newly confirmed subscriptions live (with the redis backend, after loading their
    /// history).
    async fn confirmed(&mut self, confirmed: &[SubscribeRequest]) -> Result<(), String> {
        match self.shared.as_mut() {
            None => {
                self.hub.mark_subscribed(confirmed);
                Ok(())
            }
            Some(shared) => shared.load(self.hub, confirmed).await,
        }
    }

    fn deliver(&self, message: &redis::Msg) {
        metrics::event_received();
        let channel = message.get_channel_name();
        let payload = message.get_payload_bytes();
        let outcome = self.hub.publish(channel, payload, Instant::now());
        let received = Received {
            channel,
            payload,
            stored: None,
        };
        count_outcome(self.hub, outcome, &received, true);
    }
}

/// Counts what the hub did with a message. A drop is logged (rate limited by the hub) with the
/// payload's correlation id and, when `dead_letter` is set, handed to the dead-letter queue.
fn count_outcome(hub: &Hub, outcome: PublishOutcome, message: &Received<'_>, dead_letter: bool) {
    match outcome {
        PublishOutcome::Appended { evicted } => metrics::history_evicted(evicted),
        PublishOutcome::NotWanted => {}
        PublishOutcome::Dropped {
            reason,
            log,
            violation,
        } => {
            metrics::payload_dropped(reason.label());
            let dead_letters = hub.dead_letters();
            let dead_letter = dead_letter && dead_letters.enabled();
            // Parsed only here, on the drop path, and only when someone will use it.
            let correlation_id = if log || dead_letter {
                dead_letters.correlation_id(message.payload)
            } else {
                None
            };
            if log {
                let (error_path, error) = violation
                    .as_ref()
                    .map(|v| (v.path.as_str(), v.message.as_str()))
                    .unzip();
                tracing::warn!(
                    channel = message.channel,
                    reason = reason.label(),
                    bytes = message.payload.len(),
                    correlation_id = correlation_id.as_deref().map(dead_letter::for_log),
                    error_path,
                    error,
                    "dropped a payload (logged at most once a minute per channel)"
                );
            }
            if dead_letter {
                dead_letters.dropped(reason.label(), message, correlation_id);
            }
        }
    }
}

/// The stream's next item if it is ready now (`None` if it is not). Polling with a no-op waker
/// loses no wake-up here: the select that follows polls the stream again with the task's waker
/// before the task sleeps.
fn ready_now<S: Stream + Unpin>(stream: &mut S) -> Option<Option<S::Item>> {
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(stream).poll_next(&mut cx) {
        Poll::Ready(item) => Some(item),
        Poll::Pending => None,
    }
}

/// What the command worker is asked to do on the subscription connection.
#[derive(Debug)]
enum Command {
    Subscribe(Vec<SubscribeRequest>),
    Unsubscribe(Vec<Arc<str>>),
    Ping,
}

/// Turns the hub's requests into as few commands as keep their order: each run of subscribes
/// becomes one SUBSCRIBE, each run of unsubscribes one UNSUBSCRIBE.
fn commands_in_order(requests: Vec<UpstreamRequest>) -> Vec<Command> {
    let mut commands = Vec::new();
    for request in requests {
        match (request, commands.last_mut()) {
            (UpstreamRequest::Subscribe(request), Some(Command::Subscribe(run))) => {
                run.push(request)
            }
            (UpstreamRequest::Subscribe(request), _) => {
                commands.push(Command::Subscribe(vec![request]))
            }
            (UpstreamRequest::Unsubscribe(name), Some(Command::Unsubscribe(run))) => run.push(name),
            (UpstreamRequest::Unsubscribe(name), _) => {
                commands.push(Command::Unsubscribe(vec![name]))
            }
        }
    }
    commands
}

/// `Ok(Some(..))`: these subscriptions are confirmed. `Ok(None)`: done. `Err`: connection dead.
type CommandResult = Result<Option<Vec<SubscribeRequest>>, String>;

/// Runs commands one at a time, in order. Order matters: an UNSUBSCRIBE of a freed channel must
/// reach Redis before the SUBSCRIBE of the same channel wanted again.
async fn run_commands(
    mut sink: PubSubSink,
    mut commands: mpsc::UnboundedReceiver<Command>,
    results: mpsc::UnboundedSender<CommandResult>,
    timeout: Duration,
    redis_backend: bool,
) {
    while let Some(command) = commands.recv().await {
        let result = match command {
            Command::Subscribe(batch) => {
                let names = wire_names(batch.iter().map(|r| &*r.name), redis_backend);
                with_timeout(timeout, "SUBSCRIBE", sink.subscribe(&names))
                    .await
                    .map(|()| Some(batch))
            }
            Command::Unsubscribe(names) => {
                let names = wire_names(names.iter().map(|n| &**n), redis_backend);
                with_timeout(timeout, "UNSUBSCRIBE", sink.unsubscribe(&names))
                    .await
                    .map(|()| None)
            }
            Command::Ping => with_timeout(timeout, "PING", sink.ping::<redis::Value>())
                .await
                .map(|_| None),
        };
        let failed = result.is_err();
        if results.send(result).is_err() || failed {
            return;
        }
    }
}

/// The Redis channels that carry `names`: the names themselves, or with the redis backend the
/// library's live broadcast of each (a name the library refuses is never leased).
fn wire_names<'n>(names: impl Iterator<Item = &'n str>, redis_backend: bool) -> Vec<String> {
    if redis_backend {
        names.filter_map(functions::live_channel).collect()
    } else {
        names.map(str::to_owned).collect()
    }
}

async fn with_timeout<T>(
    timeout: Duration,
    what: &str,
    command: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, command).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("{what} failed: {e}")),
        Err(_) => Err(format!("{what} timed out after {timeout:?}")),
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Capped exponential backoff with "equal jitter": half the delay is fixed, half random, so a
/// fleet of gateways does not reconnect to a restarted Redis in lockstep.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// Starts again from the initial delay, but only after a connection that stayed up for
    /// [`STABLE_CONNECTION`]: repeated brief successes keep the delay growing.
    fn session_ended(&mut self, up_for: Duration) {
        if up_for >= STABLE_CONNECTION {
            self.attempt = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_up_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        let ceilings = [100, 200, 400, 800, 1000, 1000, 1000, 1000];
        for (delay, ceiling) in delays.iter().zip(ceilings) {
            let ceiling = Duration::from_millis(ceiling);
            assert!(
                *delay >= ceiling / 2 && *delay <= ceiling,
                "{delay:?} vs {ceiling:?}"
            );
        }
        backoff.session_ended(STABLE_CONNECTION);
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn brief_sessions_do_not_reset_the_backoff() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        for _ in 0..4 {
            backoff.next_delay();
            // Cut off again right after each reconnect: the delay keeps growing.
            backoff.session_ended(Duration::from_millis(200));
        }
        let delay = backoff.next_delay();
        assert!(delay >= Duration::from_millis(500), "{delay:?}");
        backoff.session_ended(STABLE_CONNECTION);
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn requests_become_commands_in_their_order() {
        let subscribe = |name: &str| {
            UpstreamRequest::Subscribe(SubscribeRequest {
                name: Arc::from(name),
                generation: 1,
            })
        };
        let unsubscribe = |name: &str| UpstreamRequest::Unsubscribe(Arc::from(name));
        let requests = vec![
            subscribe("a"),
            subscribe("b"),
            unsubscribe("a"),
            unsubscribe("c"),
            subscribe("a"),
        ];
        let summary: Vec<String> = commands_in_order(requests)
            .iter()
            .map(|command| match command {
                Command::Subscribe(run) => {
                    let names: Vec<&str> = run.iter().map(|r| &*r.name).collect();
                    format!("SUBSCRIBE {}", names.join(" "))
                }
                Command::Unsubscribe(run) => {
                    let names: Vec<&str> = run.iter().map(|n| &**n).collect();
                    format!("UNSUBSCRIBE {}", names.join(" "))
                }
                Command::Ping => "PING".to_string(),
            })
            .collect();
        assert_eq!(summary, ["SUBSCRIBE a b", "UNSUBSCRIBE a c", "SUBSCRIBE a"]);
    }
}
