//! The upstream of a Redis Cluster (`redis.mode = "cluster"`): one subscription per shard,
//! on the primary that owns its channels' slots, through sharded pub/sub (`SSUBSCRIBE`).
//!
//! A manager routes the hub's requests to the shard owning each channel's slot and keeps the
//! slot map ([`crate::topology::cluster`]) current. Each shard runs its own task with its own
//! connection, reconnect backoff and (redis backend) history connection, so a failover or a
//! slot move touches only the channels it concerns:
//!
//! - a shard's connection drops (its primary died): its channels are interrupted, the manager
//!   reads the slot map until a replica has taken over, and the shard reconnects there;
//! - the server moves a subscription away (`sunsubscribe` push: the slot migrated, or the
//!   node was demoted by `CLUSTER FAILOVER`), or refuses one (`MOVED`): those channels are
//!   interrupted and handed to the shard that owns their slot now.
//!
//! A resubscribed channel then catches up from Redis (redis backend: no reset for what Redis
//! still holds) or gets an `upstream_interrupted` gap (memory backend), like the standalone
//! upstream's reconnect, but for that shard's channels only.
//!
//! The connections are RESP3 `MultiplexedConnection`s with a push channel, not the crate's
//! `aio::PubSub`: that one cannot carry sharded messages over RESP2 and silently swallows the
//! server's `sunsubscribe` (both pinned in tests/topology_facts.rs).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::history::SharedHistory;
use super::{count_outcome, sweep_hub, wire_names, AbortOnDrop, Backoff, SWEEP_INTERVAL};
use crate::config::RedisSettings;
use crate::dead_letter::Received;
use crate::functions::{self, LibraryBounds};
use crate::hub::{Hub, SubscribeRequest, UpstreamRequest};
use crate::metrics;
use crate::topology::cluster::{slot_of, SlotMap};
use crate::topology::{NodeAddress, Topology};

/// How often the slot map is read while every shard is up (slot moves announce themselves
/// with `sunsubscribe`; this catches what does not, like a new primary with no channels yet).
const QUIET_REFRESH: Duration = Duration::from_secs(10);

/// Runs until `shutdown` is cancelled.
pub(super) async fn run(
    topology: Arc<Topology>,
    hub: Arc<Hub>,
    mut requests: mpsc::UnboundedReceiver<crate::hub::UpstreamRequest>,
    settings: RedisSettings,
    shared_history: Option<LibraryBounds>,
    shutdown: CancellationToken,
) {
    let (events, mut shard_events) = mpsc::unbounded_channel();
    let mut manager = Manager {
        topology,
        hub,
        settings,
        bounds: shared_history,
        shutdown: shutdown.clone(),
        map: SlotMap::default(),
        shards: HashMap::new(),
        assigned: HashMap::new(),
        events,
    };
    let mut refresh = Backoff::new(
        Duration::from_millis(manager.settings.reconnect_initial_ms),
        Duration::from_millis(manager.settings.reconnect_max_ms),
    );
    let mut next_refresh = Instant::now();
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(next_refresh) => {
                next_refresh = match manager.refresh().await {
                    Ok(()) if manager.all_up() => {
                        refresh = Backoff::new(refresh.initial, refresh.max);
                        Instant::now() + QUIET_REFRESH
                    }
                    Ok(()) => Instant::now() + refresh.next_delay(),
                    Err(reason) => {
                        tracing::warn!(%reason, "cannot read the cluster's slot map");
                        Instant::now() + refresh.next_delay()
                    }
                };
            }
            Some(first) = requests.recv() => {
                let mut batch = vec![first];
                while let Ok(more) = requests.try_recv() {
                    batch.push(more);
                }
                manager.route(batch);
            }
            Some(event) = shard_events.recv() => {
                if manager.handle(event) {
                    // Something moved or failed: read the map again soon.
                    next_refresh = next_refresh.min(Instant::now() + refresh.initial);
                }
            }
            _ = sweep.tick() => {
                let freed = sweep_hub(&manager.hub);
                manager.release(freed);
            }
        }
    }
    manager.hub.record_upstream_up(false);
    manager.hub.set_shards(manager.shards.len(), 0);
}

/// What a shard task tells the manager.
#[derive(Debug)]
enum ShardEvent {
    Up(NodeAddress),
    Down(NodeAddress),
    /// The node no longer serves these channels (`sunsubscribe` push or `MOVED`).
    Moved(NodeAddress, Vec<Arc<str>>),
}

/// What the manager asks of a shard task.
#[derive(Debug)]
enum ShardCommand {
    /// Serve these channels (new ones, or ones moved here).
    Subscribe(Vec<SubscribeRequest>),
    /// Stop serving these channels (freed, or moved away).
    Unsubscribe(Vec<Arc<str>>),
}

struct ShardHandle {
    commands: mpsc::UnboundedSender<ShardCommand>,
    up: bool,
    _task: AbortOnDrop,
}

struct Manager {
    topology: Arc<Topology>,
    hub: Arc<Hub>,
    settings: RedisSettings,
    bounds: Option<LibraryBounds>,
    shutdown: CancellationToken,
    map: SlotMap,
    shards: HashMap<NodeAddress, ShardHandle>,
    /// Each channel held, with the shard serving it.
    assigned: HashMap<Arc<str>, (SubscribeRequest, NodeAddress)>,
    events: mpsc::UnboundedSender<ShardEvent>,
}

impl Manager {
    /// Reads the slot map and makes the shards and the channels' owners follow it.
    async fn refresh(&mut self) -> Result<(), String> {
        let known = self.map.primaries();
        let map = self.topology.slot_map(&known).await?;
        if map != self.map {
            tracing::info!(
                primaries = map.primaries().len(),
                "cluster slot map changed"
            );
        }
        self.map = map;
        for primary in self.map.primaries() {
            if !self.shards.contains_key(&primary) {
                self.spawn_shard(primary);
            }
        }
        // Every channel, including ones the hub holds but no shard serves yet (at start-up).
        let mut moves: HashMap<NodeAddress, Vec<SubscribeRequest>> = HashMap::new();
        let mut leaving: HashMap<NodeAddress, Vec<Arc<str>>> = HashMap::new();
        for request in self.hub.subscriptions() {
            let Some(owner) = self.owner_of(&request.name) else {
                continue;
            };
            match self.assigned.get(&request.name) {
                Some((_, current)) if *current == owner => continue,
                Some((_, current)) => leaving
                    .entry(current.clone())
                    .or_default()
                    .push(request.name.clone()),
                None => {}
            }
            self.assigned
                .insert(request.name.clone(), (request.clone(), owner.clone()));
            moves.entry(owner).or_default().push(request);
        }
        for (shard, names) in leaving {
            self.hub.interrupt(&names);
            self.send(&shard, ShardCommand::Unsubscribe(names));
        }
        for (shard, requests) in moves {
            self.send(&shard, ShardCommand::Subscribe(requests));
        }
        self.shards
            .retain(|address, _| self.map.primaries().contains(address));
        self.report_up();
        Ok(())
    }

    /// Hands the hub's requests to the shards owning the channels.
    fn route(&mut self, requests: Vec<UpstreamRequest>) {
        let mut subscribe: HashMap<NodeAddress, Vec<SubscribeRequest>> = HashMap::new();
        let mut freed = Vec::new();
        for request in requests {
            match request {
                UpstreamRequest::Subscribe(request) => {
                    // Without a map yet, the first refresh picks it up from the hub.
                    let Some(owner) = self.owner_of(&request.name) else {
                        continue;
                    };
                    self.assigned
                        .insert(request.name.clone(), (request.clone(), owner.clone()));
                    subscribe.entry(owner).or_default().push(request);
                }
                UpstreamRequest::Unsubscribe(name) => freed.push(name),
            }
        }
        self.release(freed);
        for (shard, requests) in subscribe {
            self.send(&shard, ShardCommand::Subscribe(requests));
        }
    }

    /// Forgets channels the hub freed.
    fn release(&mut self, names: Vec<Arc<str>>) {
        let mut by_shard: HashMap<NodeAddress, Vec<Arc<str>>> = HashMap::new();
        for name in names {
            if let Some((_, shard)) = self.assigned.remove(&name) {
                by_shard.entry(shard).or_default().push(name);
            }
        }
        for (shard, names) in by_shard {
            self.send(&shard, ShardCommand::Unsubscribe(names));
        }
    }

    /// Records a shard's news; true when the slot map should be read again.
    fn handle(&mut self, event: ShardEvent) -> bool {
        let reread = match event {
            ShardEvent::Up(shard) => {
                if let Some(handle) = self.shards.get_mut(&shard) {
                    handle.up = true;
                }
                false
            }
            ShardEvent::Down(shard) => {
                if let Some(handle) = self.shards.get_mut(&shard) {
                    handle.up = false;
                }
                true
            }
            ShardEvent::Moved(shard, names) => {
                // Not served there any more: assigned again by the next refresh.
                for name in &names {
                    if self.assigned.get(name).is_some_and(|(_, s)| *s == shard) {
                        self.assigned.remove(name);
                    }
                }
                true
            }
        };
        self.report_up();
        reread
    }

    fn all_up(&self) -> bool {
        !self.shards.is_empty() && self.shards.values().all(|shard| shard.up)
    }

    /// Readiness, `ssehub_redis_up` (every shard's subscription is up) and the shard gauges.
    fn report_up(&self) {
        let up = self.shards.values().filter(|shard| shard.up).count();
        self.hub.set_shards(self.shards.len(), up);
        self.hub.record_upstream_up(self.all_up());
    }

    /// The primary owning `name`'s wire channel, by the current map.
    fn owner_of(&self, name: &str) -> Option<NodeAddress> {
        let wire = wire_names(std::iter::once(name), self.bounds.is_some());
        let slot = slot_of(wire.first()?.as_bytes());
        self.map.owner(slot).cloned()
    }

    fn send(&self, shard: &NodeAddress, command: ShardCommand) {
        if let Some(handle) = self.shards.get(shard) {
            let _ = handle.commands.send(command);
        }
    }

    fn spawn_shard(&mut self, address: NodeAddress) {
        let (commands, queue) = mpsc::unbounded_channel();
        let shard = Shard {
            address: address.clone(),
            topology: self.topology.clone(),
            hub: self.hub.clone(),
            settings: self.settings.clone(),
            bounds: self.bounds,
            events: self.events.clone(),
            channels: HashMap::new(),
        };
        let task = tokio::spawn(shard.run(queue, self.shutdown.clone()));
        self.shards.insert(
            address,
            ShardHandle {
                commands,
                up: false,
                _task: AbortOnDrop(task),
            },
        );
    }
}

/// One shard's subscription: a connection to its primary, reconnected with backoff.
struct Shard {
    address: NodeAddress,
    topology: Arc<Topology>,
    hub: Arc<Hub>,
    settings: RedisSettings,
    bounds: Option<LibraryBounds>,
    events: mpsc::UnboundedSender<ShardEvent>,
    /// The channels this shard serves, by wire name.
    channels: HashMap<String, SubscribeRequest>,
}

/// A connected period of a shard.
struct Connected {
    connection: MultiplexedConnection,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    shared: Option<SharedHistory>,
}

impl Shard {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<ShardCommand>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = Backoff::new(
            Duration::from_millis(self.settings.reconnect_initial_ms),
            Duration::from_millis(self.settings.reconnect_max_ms),
        );
        while !shutdown.is_cancelled() {
            let reason = match self.connect().await {
                Ok(connected) => {
                    let up_since = Instant::now();
                    let reason = self.serve(connected, &mut commands, &shutdown).await;
                    backoff.session_ended(up_since.elapsed());
                    reason
                }
                Err(reason) => reason,
            };
            let Some(reason) = reason else {
                return;
            };
            let names: Vec<Arc<str>> = self.channels.values().map(|r| r.name.clone()).collect();
            self.hub.interrupt(&names);
            let _ = self.events.send(ShardEvent::Down(self.address.clone()));
            let delay = backoff.next_delay();
            tracing::warn!(
                shard = %format!("{}:{}", self.address.0, self.address.1),
                %reason,
                retry_in_ms = delay.as_millis() as u64,
                "redis shard subscription down"
            );
            // Keep taking commands while down: the channels are subscribed on reconnect.
            let until = Instant::now() + delay;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(until) => break,
                    command = commands.recv() => match command {
                        Some(command) => self.note(command),
                        None => return,
                    },
                }
            }
        }
    }

    /// Opens the RESP3 connection (and the history's), subscribes every channel of the shard
    /// and makes them live.
    async fn connect(&mut self) -> Result<Connected, Option<String>> {
        let timeout = Duration::from_secs(self.settings.connect_timeout_secs);
        let client = self.topology.node(&self.address).map_err(Some)?;
        let info = client.get_connection_info().clone();
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client =
            redis::Client::open(info.set_redis_settings(resp3)).map_err(|e| Some(e.to_string()))?;
        let (pushes_tx, pushes) = mpsc::unbounded_channel();
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(Duration::from_secs(
                self.settings.command_timeout_secs,
            )))
            .set_push_sender(pushes_tx);
        let connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| Some(format!("connect failed: {e}")))?;
        let shared = match self.bounds {
            Some(bounds) => Some(
                SharedHistory::connect(
                    &client,
                    bounds,
                    Duration::from_secs(self.settings.command_timeout_secs),
                )
                .await
                .map_err(Some)?,
            ),
            None => None,
        };
        let mut connected = Connected {
            connection,
            pushes,
            shared,
        };
        let requests: Vec<SubscribeRequest> = self.channels.values().cloned().collect();
        self.subscribe(&mut connected, requests)
            .await
            .map_err(Some)?;
        let _ = self.events.send(ShardEvent::Up(self.address.clone()));
        Ok(connected)
    }

    /// Serves pushes and commands until the connection fails (`Some(reason)`) or shutdown
    /// (`None`).
    async fn serve(
        &mut self,
        mut connected: Connected,
        commands: &mut mpsc::UnboundedReceiver<ShardCommand>,
        shutdown: &CancellationToken,
    ) -> Option<String> {
        let ping_every = Duration::from_secs(self.settings.ping_interval_secs);
        let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return None,
                push = connected.pushes.recv() => match push {
                    Some(push) => self.on_push(&mut connected, push).await,
                    None => Err("connection closed".to_string()),
                },
                command = commands.recv() => match command {
                    Some(ShardCommand::Subscribe(requests)) => {
                        self.subscribe(&mut connected, requests).await
                    }
                    Some(ShardCommand::Unsubscribe(names)) => {
                        self.unsubscribe(&mut connected, names).await
                    }
                    None => return None,
                },
                _ = ping.tick() => redis::cmd("PING")
                    .query_async::<redis::Value>(&mut connected.connection)
                    .await
                    .map(drop)
                    .map_err(|e| format!("PING failed: {e}")),
            };
            if let Err(reason) = result {
                return Some(reason);
            }
        }
    }

    /// Records a command while disconnected.
    fn note(&mut self, command: ShardCommand) {
        match command {
            ShardCommand::Subscribe(requests) => {
                for request in requests {
                    if let Some(wire) = self.wire_name(&request.name) {
                        self.channels.insert(wire, request);
                    }
                }
            }
            ShardCommand::Unsubscribe(names) => {
                for name in names {
                    if let Some(wire) = self.wire_name(&name) {
                        self.channels.remove(&wire);
                    }
                }
            }
        }
    }

    /// SSUBSCRIBEs `requests` (one command per slot: a sharded subscription may not span
    /// slots), then makes them live. Channels the node refuses with MOVED go back to the
    /// manager.
    async fn subscribe(
        &mut self,
        connected: &mut Connected,
        requests: Vec<SubscribeRequest>,
    ) -> Result<(), String> {
        if requests.is_empty() {
            return Ok(());
        }
        let mut by_slot: HashMap<u16, Vec<(String, SubscribeRequest)>> = HashMap::new();
        for request in requests {
            if let Some(wire) = self.wire_name(&request.name) {
                by_slot
                    .entry(slot_of(wire.as_bytes()))
                    .or_default()
                    .push((wire, request));
            }
        }
        let mut live = Vec::new();
        for (_, group) in by_slot {
            let names: Vec<&String> = group.iter().map(|(wire, _)| wire).collect();
            let answer = redis::cmd("SSUBSCRIBE")
                .arg(&names)
                .exec_async(&mut connected.connection)
                .await;
            match answer {
                Ok(()) => {
                    for (wire, request) in group {
                        self.channels.insert(wire, request.clone());
                        live.push(request);
                    }
                }
                Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::Moved) => {
                    let moved: Vec<Arc<str>> = group.iter().map(|(_, r)| r.name.clone()).collect();
                    for (wire, _) in &group {
                        self.channels.remove(wire);
                    }
                    let _ = self
                        .events
                        .send(ShardEvent::Moved(self.address.clone(), moved));
                }
                Err(e) => return Err(format!("SSUBSCRIBE failed: {e}")),
            }
        }
        match connected.shared.as_mut() {
            Some(shared) => shared.restore(&self.hub, &live).await,
            None => {
                self.hub.mark_subscribed(&live);
                Ok(())
            }
        }
    }

    async fn unsubscribe(
        &mut self,
        connected: &mut Connected,
        names: Vec<Arc<str>>,
    ) -> Result<(), String> {
        let mut by_slot: HashMap<u16, Vec<String>> = HashMap::new();
        for name in names {
            if let Some(wire) = self.wire_name(&name) {
                if self.channels.remove(&wire).is_some() {
                    by_slot
                        .entry(slot_of(wire.as_bytes()))
                        .or_default()
                        .push(wire);
                }
            }
        }
        for (_, wires) in by_slot {
            // A channel whose slot moved away is refused: nothing to undo then.
            let answer = redis::cmd("SUNSUBSCRIBE")
                .arg(&wires)
                .exec_async(&mut connected.connection)
                .await;
            if let Err(e) = answer {
                if !matches!(e.kind(), redis::ErrorKind::Server(_)) {
                    return Err(format!("SUNSUBSCRIBE failed: {e}"));
                }
            }
        }
        Ok(())
    }

    /// A message, or the server taking a subscription away.
    async fn on_push(&mut self, connected: &mut Connected, push: PushInfo) -> Result<(), String> {
        match push.kind {
            PushKind::SMessage => {
                let Some(message) = redis::Msg::from_push_info(push) else {
                    return Ok(());
                };
                match connected.shared.as_mut() {
                    Some(shared) => shared.deliver(&self.hub, &message).await,
                    None => {
                        metrics::event_received();
                        let channel = message.get_channel_name();
                        let payload = message.get_payload_bytes();
                        let outcome = self.hub.publish(channel, payload, Instant::now());
                        let received = Received {
                            channel,
                            payload,
                            stored: None,
                        };
                        count_outcome(&self.hub, outcome, &received, true);
                        Ok(())
                    }
                }
            }
            PushKind::SUnsubscribe => {
                // Sent by the server when the slot left this node (migration, failover): the
                // channel is interrupted until the shard that owns it now subscribes it.
                let wire = match push.data.first() {
                    Some(redis::Value::BulkString(bytes)) => {
                        String::from_utf8_lossy(bytes).into_owned()
                    }
                    _ => return Ok(()),
                };
                if let Some(request) = self.channels.remove(&wire) {
                    let names = vec![request.name];
                    self.hub.interrupt(&names);
                    let _ = self
                        .events
                        .send(ShardEvent::Moved(self.address.clone(), names));
                }
                Ok(())
            }
            PushKind::Disconnection => Err("connection closed".to_string()),
            _ => Ok(()),
        }
    }

    fn wire_name(&self, name: &str) -> Option<String> {
        if self.bounds.is_some() {
            functions::live_channel(name)
        } else {
            Some(name.to_string())
        }
    }
}
