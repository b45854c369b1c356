//! The hub: every channel the gateway serves, its ring, and who is reading it.
//!
//! The hub is shared by the upstream task (the only writer: it assigns sequence numbers and
//! appends) and the HTTP streams (readers: each holds a [`Lease`] on its channels and a cursor).
//! There are no per-connection queues: a stream wakes when one of its channels changes (through
//! the channel's wake-up list, see `wakers`) and reads what it has not sent yet straight from the
//! rings, one bounded piece at a time (`Hub::read`), so a slow client costs no memory, even when
//! it resumed far back.
//!
//! Positions are global: one counter orders the events of all channels, so a single id is a
//! complete resume point for a stream over several channels.
//!
//! The hub holds at most `channels.max_total` channels. A request that needs new channels
//! beyond that frees lingering ones (no reader left) early, oldest idle first, and is refused
//! whole when too few are lingering: every channel costs a Redis subscription and memory, so
//! a client naming fresh channels must not be able to make the gateway hold them without bound.
//!
//! # Layout
//!
//! This file holds the [`Hub`] type, its shared state and the lock order; each part of its work
//! is a file of its own, as `impl Hub` blocks where it needs the shared state:
//!
//! - `channel`: one channel (ring, subscription status) and its slot in the channel map.
//! - `lease`: [`Lease`], acquiring and releasing channels, and the channel cap.
//! - `publish`: the upstream task's side: appends, subscription confirmations, outages.
//! - `stored`: the same for the redis backend, whose events carry their position in Redis.
//! - `read`: a stream's reads, one bounded piece at a time.
//! - `upkeep`: the clock's work: freeing lingering channels, evicting history by age.
//! - `ring`, `wakers` (wake-up lists and the [`Drain`] signal), `deadlines` (upkeep tickets).

mod channel;
mod deadlines;
mod lease;
mod publish;
mod read;
mod ring;
mod stored;
mod upkeep;
mod wakers;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use crate::config::{HistoryBackend, Settings};
use crate::schemas::Schemas;
use crate::sse::Epoch;

use channel::{Channel, ChannelKey, Slot, Status};
use deadlines::Deadlines;
use lease::CapLog;
pub use lease::{ChannelLimitReached, Lease};
pub use publish::{DropReason, PublishOutcome};
pub(crate) use read::Skipped;
#[cfg(test)]
pub(crate) use read::PIECE_MAX_ENTRIES;
pub(crate) use ring::{EntryKind, Located, Origin};
pub use stored::{StoredEvent, StoredOutcome, Tail};
pub use upkeep::Sweep;
pub use wakers::Drain;
pub(crate) use wakers::DrainWatch;
pub(crate) use wakers::Registration;

/// What the hub asks of the upstream task, carried out in the order sent: an UNSUBSCRIBE of a
/// channel freed early must reach Redis before the SUBSCRIBE of the same name wanted again.
#[derive(Debug)]
pub enum UpstreamRequest {
    /// Subscribe to a newly wanted channel.
    Subscribe(SubscribeRequest),
    /// Unsubscribe a channel freed early to stay within `channels.max_total`.
    Unsubscribe(Arc<str>),
}

/// A request to subscribe to a newly wanted channel.
#[derive(Clone, Debug)]
pub struct SubscribeRequest {
    /// Channel name.
    pub name: Arc<str>,
    /// Identifies the channel incarnation, so a late confirmation of an earlier incarnation
    /// (freed and wanted again meanwhile) is not mistaken for this one.
    pub generation: u64,
}

/// What the hub needs to know of the configuration, and nothing more.
#[derive(Clone, Debug)]
pub struct HubSettings {
    /// `history.capacity`: most entries each channel's ring holds.
    pub history_capacity: usize,
    /// `history.max_age_secs`: entries older than this are evicted.
    pub max_age: Duration,
    /// `history.linger_secs`: how long a channel nobody reads is kept.
    pub linger: Duration,
    /// `limits.max_payload_bytes`: larger payloads are dropped.
    pub max_payload_bytes: usize,
    /// `channels.max_total`: most channels held at once.
    pub max_channels: usize,
    /// `sse.event_type_field`: the JSON field that names an event's SSE `event:` type.
    pub event_type_field: String,
    /// `history.backend = "redis"`: events carry their position in Redis, and ids are made of
    /// those positions.
    pub redis_backend: bool,
    /// `[[schemas]]`, compiled. Compiling can fail, so `From<&Settings>` leaves this empty:
    /// the caller sets it.
    pub schemas: Arc<Schemas>,
}

impl From<&Settings> for HubSettings {
    fn from(settings: &Settings) -> Self {
        HubSettings {
            history_capacity: settings.history.capacity,
            max_age: Duration::from_secs(settings.history.max_age_secs),
            linger: Duration::from_secs(settings.history.linger_secs),
            max_payload_bytes: settings.limits.max_payload_bytes,
            max_channels: settings.channels.max_total,
            event_type_field: settings.sse.event_type_field.clone(),
            redis_backend: settings.history.backend == HistoryBackend::Redis,
            schemas: Arc::default(),
        }
    }
}

/// Bounds of each channel's history.
#[derive(Clone, Copy, Debug)]
struct HistoryLimits {
    capacity: usize,
    max_payload_bytes: usize,
    max_age: Duration,
    linger: Duration,
}

/// Shared state of all channels. See the module docs.
#[derive(Debug)]
pub struct Hub {
    epoch: Epoch,
    /// The highest position whose entry is fully appended. Written only by the upstream task
    /// (release), read by streams (acquire) before they read rings, so that every entry up to it
    /// is visible in its ring.
    head: AtomicU64,
    channels: Mutex<HashMap<Arc<str>, Slot>>,
    /// When channels whose readers all left are due to be freed (see `deadlines`), soonest
    /// first, which is also oldest idle first: the order channels are freed early in when the
    /// cap is reached. May be locked while `channels` is held, never the other way round.
    lingering: Mutex<Deadlines<ChannelKey>>,
    /// When the oldest history entry of channels will pass `max_age` (see `deadlines`). May be
    /// locked while a channel's state is held, never the other way round.
    expiries: Mutex<Deadlines<Weak<Channel>>>,
    /// Sends (un)subscription requests to the upstream task; closed when the hub is dropped.
    /// Sent while `channels` is held, so requests for one name are queued in map order.
    upstream_requests: mpsc::UnboundedSender<UpstreamRequest>,
    /// True while the Redis subscription connection is up; the upstream task is the writer.
    upstream_up: watch::Sender<bool>,
    /// Redis shards known and shards whose subscription connection is up, in that order; the
    /// upstream task is the writer. One lock, so a reader never sees the count of one report
    /// with the other's; no other lock is taken while it is held.
    shards: Mutex<(usize, usize)>,
    limits: HistoryLimits,
    /// `channels.max_total`: most channels held at once.
    max_channels: usize,
    /// What the cap did since it was last logged (the log is rate limited).
    cap_log: Mutex<CapLog>,
    event_type_field: String,
    redis_backend: bool,
    /// Each new channel takes its schema from here.
    schemas: Arc<Schemas>,
    next_generation: AtomicU64,
    /// What the upstream does with payloads it drops (correlation ids, dead-letter queue); set
    /// once at start-up, [`crate::dead_letter::DISABLED`] until then.
    dead_letters: std::sync::OnceLock<crate::dead_letter::DeadLetters>,
}

/// Below this capacity the channel map and the lingering queue are never shrunk.
const MIN_SHRINK_CAPACITY: usize = 1024;

/// Whether a collection of `len` entries with room for `capacity` should give room back:
/// collections never shrink by themselves, so after a burst of channels (a flood of fresh names)
/// their peak-sized tables would stay allocated for good.
fn is_sparse(len: usize, capacity: usize) -> bool {
    capacity > MIN_SHRINK_CAPACITY && capacity > 4 * len
}

impl Hub {
    /// Creates the hub and the receiving end of its subscription requests (for the upstream).
    pub fn new(settings: HubSettings) -> (Arc<Hub>, mpsc::UnboundedReceiver<UpstreamRequest>) {
        let (upstream_requests, requests) = mpsc::unbounded_channel();
        let hub = Hub {
            epoch: Epoch::random(),
            head: AtomicU64::new(0),
            channels: Mutex::new(HashMap::new()),
            lingering: Mutex::new(Deadlines::default()),
            expiries: Mutex::new(Deadlines::default()),
            upstream_requests,
            upstream_up: watch::Sender::new(false),
            // Nothing is known before the upstream task's first report.
            shards: Mutex::new((0, 0)),
            limits: HistoryLimits {
                capacity: settings.history_capacity,
                max_payload_bytes: settings.max_payload_bytes,
                max_age: settings.max_age,
                linger: settings.linger,
            },
            max_channels: settings.max_channels,
            cap_log: Mutex::new(CapLog::default()),
            event_type_field: settings.event_type_field,
            redis_backend: settings.redis_backend,
            schemas: settings.schemas,
            next_generation: AtomicU64::new(1),
            dead_letters: std::sync::OnceLock::new(),
        };
        (Arc::new(hub), requests)
    }

    /// The epoch of this run; ids carry it.
    pub fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    /// Sets what the upstream does with dropped payloads (once; later calls are ignored).
    pub fn set_dead_letters(&self, dead_letters: crate::dead_letter::DeadLetters) {
        let _ = self.dead_letters.set(dead_letters);
    }

    /// What the upstream does with dropped payloads.
    pub fn dead_letters(&self) -> &crate::dead_letter::DeadLetters {
        self.dead_letters
            .get()
            .unwrap_or(&crate::dead_letter::DISABLED)
    }

    /// Whether the history lives in Redis (`history.backend = "redis"`).
    pub fn redis_backend(&self) -> bool {
        self.redis_backend
    }

    /// The current head position.
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// Whether the Redis subscription connection is up.
    pub fn upstream_up(&self) -> bool {
        *self.upstream_up.borrow()
    }

    /// Redis shards known and shards up, as last reported by the upstream task (see
    /// [`Hub::set_shards`]).
    pub fn shards(&self) -> (usize, usize) {
        *self.shards.lock()
    }

    /// Number of channels held (subscribed, pending or lingering).
    pub fn channel_count(&self) -> usize {
        self.channels.lock().len()
    }

    /// Sizes the history and counts live subscriptions. This visits every channel, so it is
    /// done when metrics are scraped rather than on a timer.
    pub fn measure(&self) -> HistorySize {
        // Visit the channels outside the map lock, which every publish needs.
        let channels: Vec<Arc<Channel>> = self
            .channels
            .lock()
            .values()
            .map(|slot| slot.channel.clone())
            .collect();
        let mut size = HistorySize::default();
        for channel in channels {
            let state = channel.state.read();
            size.events += state.ring.len();
            size.bytes += state.ring.bytes();
            size.subscribed += usize::from(state.status == Status::Subscribed);
        }
        size
    }
}

/// What [`Hub::measure`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HistorySize {
    /// Entries held in all rings.
    pub events: usize,
    /// Encoded bytes held in all rings.
    pub bytes: usize,
    /// Channels whose subscription is confirmed and live.
    pub subscribed: usize,
}

/// Helpers for unit tests in the hub and elsewhere in the crate that need a hub with confirmed
/// channels.
#[cfg(test)]
pub(crate) mod testing {
    use tokio::time::Instant;

    use super::*;

    /// The receiving end of a test hub's subscription requests.
    pub(crate) type Requests = mpsc::UnboundedReceiver<UpstreamRequest>;

    /// The hub's share of the default configuration.
    pub(crate) fn default_settings() -> HubSettings {
        HubSettings::from(&Settings::default())
    }

    /// A hub with the given history limits, in seconds.
    pub(crate) fn hub(max_age_secs: u64, linger_secs: u64) -> (Arc<Hub>, Requests) {
        capped_hub(max_age_secs, linger_secs, 100)
    }

    /// A hub holding at most `max_total` channels.
    pub(crate) fn capped_hub(
        max_age_secs: u64,
        linger_secs: u64,
        max_total: usize,
    ) -> (Arc<Hub>, Requests) {
        Hub::new(HubSettings {
            max_age: Duration::from_secs(max_age_secs),
            linger: Duration::from_secs(linger_secs),
            max_channels: max_total,
            ..default_settings()
        })
    }

    /// Leases `names`, leaving their subscriptions unconfirmed.
    pub(crate) fn acquire(hub: &Arc<Hub>, names: &[&str]) -> Result<Lease, ChannelLimitReached> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        hub.acquire(&names)
    }

    /// The queued requests, as `+name` (subscribe) and `-name` (unsubscribe).
    pub(crate) fn drain(requests: &mut Requests) -> Vec<String> {
        std::iter::from_fn(|| requests.try_recv().ok())
            .map(|request| match request {
                UpstreamRequest::Subscribe(r) => format!("+{}", r.name),
                UpstreamRequest::Unsubscribe(name) => format!("-{name}"),
            })
            .collect()
    }

    /// Publishes a small payload on `name`, which must be subscribed.
    pub(crate) fn publish(hub: &Hub, name: &str) {
        let outcome = hub.publish(name, b"payload", Instant::now());
        assert!(
            matches!(outcome, PublishOutcome::Appended { .. }),
            "{outcome:?}"
        );
    }

    /// Leases `name` and confirms its subscription, as the upstream task would.
    pub(crate) fn subscribed(hub: &Arc<Hub>, requests: &mut Requests, name: &str) -> Lease {
        subscribed_all(hub, requests, &[name])
    }

    /// Leases `names` and confirms them all at one position.
    pub(crate) fn subscribed_all(hub: &Arc<Hub>, requests: &mut Requests, names: &[&str]) -> Lease {
        lease_confirmed(hub, requests, names).expect("under the cap")
    }

    /// Leases `names` and confirms every subscription requested so far, at one position, as
    /// the upstream task would.
    pub(crate) fn lease_confirmed(
        hub: &Arc<Hub>,
        requests: &mut Requests,
        names: &[&str],
    ) -> Result<Lease, ChannelLimitReached> {
        let lease = acquire(hub, names)?;
        let mut confirmed = Vec::new();
        while let Ok(request) = requests.try_recv() {
            if let UpstreamRequest::Subscribe(request) = request {
                confirmed.push(request);
            }
        }
        hub.mark_subscribed(&confirmed);
        Ok(lease)
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::testing::{acquire, default_settings, hub, publish, subscribed};
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn payloads_failing_their_channels_schema_are_dropped_after_the_other_checks() {
        let schemas = Schemas::from_documents(&[(
            &["orders:*"],
            serde_json::json!({"type": "object", "required": ["qty"],
                "properties": {"qty": {"type": "integer", "minimum": 1}}}),
        )]);
        let (hub, mut requests) = Hub::new(HubSettings {
            max_payload_bytes: 64,
            schemas: Arc::new(schemas),
            ..default_settings()
        });
        let _orders = subscribed(&hub, &mut requests, "orders:1");
        let _news = subscribed(&hub, &mut requests, "news");
        let now = Instant::now();
        let dropped = |outcome: PublishOutcome| match outcome {
            PublishOutcome::Dropped {
                reason, violation, ..
            } => Some((reason, violation.map(|v| v.path))),
            _ => None,
        };
        let too_large = format!("{{\"qty\": \"{}\"}}", "x".repeat(64));
        assert_eq!(
            dropped(hub.publish("orders:1", too_large.as_bytes(), now)),
            Some((DropReason::TooLarge, None))
        );
        assert_eq!(
            dropped(hub.publish("orders:1", b"\xff", now)),
            Some((DropReason::InvalidUtf8, None))
        );
        assert_eq!(
            dropped(hub.publish("orders:1", br#"{"qty": 0}"#, now)),
            Some((DropReason::SchemaInvalid, Some("/qty".to_string())))
        );
        assert_eq!(
            dropped(hub.publish("orders:1", b"qty", now)),
            Some((DropReason::SchemaInvalid, Some(String::new())))
        );
        assert!(matches!(
            hub.publish("orders:1", br#"{"qty": 3}"#, now),
            PublishOutcome::Appended { .. }
        ));
        assert!(matches!(
            hub.publish("news", b"not json", now),
            PublishOutcome::Appended { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn measure_counts_every_channel() {
        let (hub, mut requests) = hub(300, 300);
        let _orders = subscribed(&hub, &mut requests, "orders");
        let _users = subscribed(&hub, &mut requests, "users");
        let _pending = acquire(&hub, &["pending"]);
        publish(&hub, "orders");
        publish(&hub, "orders");
        publish(&hub, "users");
        let size = hub.measure();
        assert_eq!((size.events, size.subscribed), (3, 2));
        assert!(size.bytes > 3 * "payload".len());
    }

    #[tokio::test]
    async fn the_single_upstream_reports_one_shard() {
        let (hub, _requests) = hub(300, 300);
        assert_eq!(
            hub.shards(),
            (0, 0),
            "nothing known before the first report"
        );
        hub.set_upstream_up(true);
        assert_eq!(hub.shards(), (1, 1));
        hub.set_upstream_up(false);
        assert_eq!(hub.shards(), (1, 0));
        hub.set_shards(3, 2);
        assert_eq!(hub.shards(), (3, 2));
    }
}
