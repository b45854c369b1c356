//! One channel as the hub holds it: its ring, where its Redis subscription stands, and the
//! bookkeeping of the channel map (leases, idle time, upkeep tickets).
//!
//! This module owns the data only; who changes it, and under which lock, is told by the modules
//! that do (`lease`, `publish`, `upkeep`, `read`).

use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::watch;
use tokio::time::Instant;

use super::ring::Ring;
use super::wakers::WakerSet;
use super::HistoryLimits;
use crate::position::Position;
use crate::schemas::Schema;

/// One channel: its ring and the signal that wakes its readers.
#[derive(Debug)]
pub(super) struct Channel {
    pub(super) name: Arc<str>,
    /// Identifies this incarnation of the name (see `SubscribeRequest::generation`).
    pub(super) generation: u64,
    pub(super) state: RwLock<ChannelState>,
    /// Bumped when the subscription is confirmed; new streams wait on it.
    pub(super) changed: watch::Sender<()>,
    /// Streams to wake when entries are appended.
    pub(super) readers: WakerSet,
    /// The schema its payloads must satisfy (`[[schemas]]`), looked up once, when the channel
    /// is created; `None`: not validated.
    pub(super) schema: Option<Arc<Schema>>,
}

impl Channel {
    /// A channel whose subscription is requested but not confirmed yet.
    pub(super) fn pending(
        name: Arc<str>,
        generation: u64,
        schema: Option<Arc<Schema>>,
        limits: &HistoryLimits,
    ) -> Channel {
        Channel {
            name,
            generation,
            state: RwLock::new(ChannelState {
                ring: Ring::new(0, limits.capacity, limits.max_age),
                status: Status::Pending,
                last_drop_log: None,
                expiry_scheduled: false,
                stored: None,
            }),
            changed: watch::Sender::new(()),
            readers: WakerSet::default(),
            schema,
        }
    }
}

#[derive(Debug)]
pub(super) struct ChannelState {
    pub(super) ring: Ring,
    pub(super) status: Status,
    /// When a dropped payload on this channel was last logged (log rate limiting).
    pub(super) last_drop_log: Option<Instant>,
    /// Whether `Hub::expiries` holds a ticket for this channel.
    pub(super) expiry_scheduled: bool,
    /// Redis backend: the channel's position in Redis after the last event received, delivered
    /// or dropped; the next event must follow it, or events were missed.
    pub(super) stored: Option<Position>,
}

/// Where a channel's Redis subscription stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Status {
    /// Requested, never confirmed: nothing is readable yet.
    Pending,
    /// Confirmed and the connection is up: the ring receives every message.
    Subscribed,
    /// Was subscribed, but the connection dropped: messages are being lost until it is back.
    Interrupted,
}

/// A channel's entry in the hub's channel map.
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) channel: Arc<Channel>,
    /// Open streams reading this channel.
    pub(super) leases: usize,
    /// When `leases` last dropped to zero; the channel is freed `linger` after that.
    pub(super) idle_since: Option<Instant>,
    /// Whether `Hub::lingering` holds a ticket for this slot.
    pub(super) linger_scheduled: bool,
}

impl Slot {
    /// Whether this slot holds the incarnation `generation` of its name, not a later one.
    pub(super) fn holds(&self, generation: u64) -> bool {
        self.channel.generation == generation
    }
}

/// Names one incarnation of a channel in the map.
#[derive(Debug)]
pub(super) struct ChannelKey {
    pub(super) name: Arc<str>,
    pub(super) generation: u64,
}
