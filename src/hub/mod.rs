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

mod deadlines;
mod ring;
mod wakers;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::Waker;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::config::Settings;
use crate::sse::{self, Epoch};

use deadlines::Deadlines;
use ring::Ring;
pub(crate) use ring::{Entry, EntryKind};
pub use wakers::Drain;
pub(crate) use wakers::DrainWatch;
pub(crate) use wakers::Registration;
use wakers::WakerSet;

/// A request from the hub to the upstream task: subscribe to a newly wanted channel.
#[derive(Debug)]
pub struct SubscribeRequest {
    /// Channel name.
    pub name: Arc<str>,
    /// Identifies the channel incarnation, so a late confirmation of an earlier incarnation
    /// (freed and wanted again meanwhile) is not mistaken for this one.
    pub generation: u64,
}

/// Result of handing a Redis message to the hub.
#[derive(Debug, PartialEq, Eq)]
pub enum PublishOutcome {
    /// Appended at this position.
    Appended {
        /// Entries evicted from the ring to make room.
        evicted: usize,
    },
    /// No one asked for this channel (or its subscription is not confirmed yet).
    NotWanted,
    /// The payload was dropped instead of forwarded.
    Dropped {
        /// Why (`reason` label of `ssehub_payloads_dropped_total`).
        reason: DropReason,
        /// True when this drop should be logged (rate limited per channel).
        log: bool,
    },
}

/// Why a Redis payload was not forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Not valid UTF-8, so it cannot be carried in SSE.
    InvalidUtf8,
    /// Larger than `limits.max_payload_bytes`.
    TooLarge,
}

impl DropReason {
    /// Metric label and log wording.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::InvalidUtf8 => "invalid_utf8",
            DropReason::TooLarge => "too_large",
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
    /// When channels whose readers all left are due to be freed (see `deadlines`). Locked
    /// after `channels` is released, never while it is held.
    lingering: Mutex<Deadlines<ChannelKey>>,
    /// When the oldest history entry of channels will pass `max_age` (see `deadlines`). May be
    /// locked while a channel's state is held, never the other way round.
    expiries: Mutex<Deadlines<Weak<Channel>>>,
    /// Sends subscription requests to the upstream task; closed when the hub is dropped.
    subscribe_requests: mpsc::UnboundedSender<SubscribeRequest>,
    /// True while the Redis subscription connection is up; the upstream task is the writer.
    upstream_up: watch::Sender<bool>,
    limits: HistoryLimits,
    event_type_field: String,
    next_generation: AtomicU64,
}

#[derive(Debug)]
struct Slot {
    channel: Arc<Channel>,
    /// Open streams reading this channel.
    leases: usize,
    /// When `leases` last dropped to zero; the channel is freed `linger` after that.
    idle_since: Option<Instant>,
    /// Whether `Hub::lingering` holds a ticket for this slot.
    linger_scheduled: bool,
}

/// Names one incarnation of a channel in the map.
#[derive(Debug)]
struct ChannelKey {
    name: Arc<str>,
    generation: u64,
}

/// One channel: its ring and the signal that wakes its readers.
#[derive(Debug)]
pub struct Channel {
    name: Arc<str>,
    generation: u64,
    state: RwLock<ChannelState>,
    /// Bumped when the subscription is confirmed; new streams wait on it.
    changed: watch::Sender<()>,
    /// Streams to wake when entries are appended.
    readers: WakerSet,
}

#[derive(Debug)]
struct ChannelState {
    ring: Ring,
    status: Status,
    /// When a dropped payload on this channel was last logged (log rate limiting).
    last_drop_log: Option<Instant>,
    /// Whether `Hub::expiries` holds a ticket for this channel.
    expiry_scheduled: bool,
}

/// Where a channel's Redis subscription stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    /// Requested, never confirmed: nothing is readable yet.
    Pending,
    /// Confirmed and the connection is up: the ring receives every message.
    Subscribed,
    /// Was subscribed, but the connection dropped: messages are being lost until it is back.
    Interrupted,
}

/// How often a channel may log dropped payloads.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(60);

impl Hub {
    /// Creates the hub and the receiving end of its subscription requests (for the upstream).
    pub fn new(settings: &Settings) -> (Arc<Hub>, mpsc::UnboundedReceiver<SubscribeRequest>) {
        let (subscribe_requests, requests) = mpsc::unbounded_channel();
        let hub = Hub {
            epoch: Epoch::random(),
            head: AtomicU64::new(0),
            channels: Mutex::new(HashMap::new()),
            lingering: Mutex::new(Deadlines::default()),
            expiries: Mutex::new(Deadlines::default()),
            subscribe_requests,
            upstream_up: watch::Sender::new(false),
            limits: HistoryLimits {
                capacity: settings.history.capacity,
                max_payload_bytes: settings.limits.max_payload_bytes,
                max_age: Duration::from_secs(settings.history.max_age_secs),
                linger: Duration::from_secs(settings.history.linger_secs),
            },
            event_type_field: settings.sse.event_type_field.clone(),
            next_generation: AtomicU64::new(1),
        };
        (Arc::new(hub), requests)
    }

    /// The epoch of this run; ids carry it.
    pub fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    /// The current head position.
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// Whether the Redis subscription connection is up.
    pub fn upstream_up(&self) -> bool {
        *self.upstream_up.borrow()
    }

    /// Number of channels held (subscribed, pending or lingering).
    pub fn channel_count(&self) -> usize {
        self.channels.lock().len()
    }

    /// Registers a reader on `names`, creating and requesting subscriptions where needed.
    pub fn acquire(self: &Arc<Self>, names: &[String]) -> Lease {
        let mut channels = Vec::with_capacity(names.len());
        let mut map = self.channels.lock();
        for name in names {
            let slot = match map.get_mut(name.as_str()) {
                Some(slot) => slot,
                None => {
                    let channel = self.new_channel(name);
                    map.entry(channel.name.clone()).or_insert(Slot {
                        channel,
                        leases: 0,
                        idle_since: None,
                        linger_scheduled: false,
                    })
                }
            };
            slot.leases += 1;
            slot.idle_since = None;
            channels.push(slot.channel.clone());
        }
        drop(map);
        Lease {
            hub: self.clone(),
            channels,
        }
    }

    fn new_channel(&self, name: &str) -> Arc<Channel> {
        let name: Arc<str> = Arc::from(name);
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        // If the upstream task is gone the gateway is shutting down; the stream then times out
        // waiting for confirmation, which is the right answer.
        let _ = self.subscribe_requests.send(SubscribeRequest {
            name: name.clone(),
            generation,
        });
        Arc::new(Channel {
            name,
            generation,
            state: RwLock::new(ChannelState {
                ring: Ring::new(0, self.limits.capacity, self.limits.max_age),
                status: Status::Pending,
                last_drop_log: None,
                expiry_scheduled: false,
            }),
            changed: watch::Sender::new(()),
            readers: WakerSet::default(),
        })
    }

    fn release(&self, channels: &[Arc<Channel>]) {
        let now = Instant::now();
        let mut newly_idle = Vec::new();
        let mut map = self.channels.lock();
        for channel in channels {
            // A slot is only freed with no leases, so it is still this channel's; the check
            // keeps a future change to that rule from corrupting another incarnation's count.
            let slot = map
                .get_mut(&channel.name)
                .filter(|slot| slot.channel.generation == channel.generation);
            if let Some(slot) = slot {
                slot.leases = slot.leases.saturating_sub(1);
                if slot.leases == 0 {
                    slot.idle_since = Some(now);
                    // A slot that still has a ticket (idle before, leased again meanwhile) is
                    // rescheduled from `idle_since` when that ticket comes due.
                    if !slot.linger_scheduled {
                        slot.linger_scheduled = true;
                        newly_idle.push(ChannelKey {
                            name: channel.name.clone(),
                            generation: channel.generation,
                        });
                    }
                }
            }
        }
        drop(map);
        // No due time (a linger too long to represent) means the channel is never freed.
        if let Some(due) = now.checked_add(self.limits.linger) {
            let mut lingering = self.lingering.lock();
            for key in newly_idle {
                lingering.schedule(due, key);
            }
        }
    }

    /// Waits until the Redis subscription of every leased channel is confirmed. Returns false
    /// when `timeout` passes first.
    pub async fn wait_subscribed(&self, lease: &Lease, timeout: Duration) -> bool {
        let wait_all = async {
            for channel in &lease.channels {
                // Subscribe before checking, so a confirmation in between still wakes us.
                let mut changed = channel.changed.subscribe();
                while channel.state.read().status != Status::Subscribed {
                    if changed.changed().await.is_err() {
                        return;
                    }
                }
            }
        };
        tokio::time::timeout(timeout, wait_all).await.is_ok() && lease.all_subscribed()
    }

    /// Reads, for a stream at `cursor`, the next piece of what its channels received: the
    /// entries after the cursor in position order, at most [`PIECE_MAX_ENTRIES`] of them and
    /// [`PIECE_MAX_BYTES`] of frames (but at least one), so that a stream holds one piece at a
    /// time however far behind it is. The piece covers every entry up to its `limit`: a stream
    /// that moves its cursor there neither skips nor repeats an entry. Channels in `skipped`
    /// are left out, and the piece does not go past `skipped.until`.
    pub(crate) fn read(&self, lease: &Lease, cursor: u64, skipped: Option<&Skipped>) -> Batch {
        // Load the head before reading rings: every entry up to it is already appended, so no
        // entry below the new cursor can be missed by a ring read that raced an append.
        let head = self.head();
        let mut limit = skipped.map_or(head, |skipped| skipped.until.min(head));
        let mut batch = Batch {
            items: Vec::new(),
            fell_off: Vec::new(),
            limit,
            head,
        };
        for (index, channel) in lease.channels.iter().enumerate() {
            if skipped.is_some_and(|skipped| skipped.channels.contains(&index)) {
                continue;
            }
            let state = channel.state.read();
            let Ok(entries) = state.ring.entries_after(cursor, limit) else {
                batch.fell_off.push(index);
                continue;
            };
            // No piece can take more of one channel than this channel alone would fill it with.
            let mut size = PieceSize::default();
            for entry in entries {
                if size.is_full() {
                    // This channel has more: the piece is complete only up to what was taken.
                    limit = size.last_seq;
                    break;
                }
                size.add(entry);
                batch.items.push((index, entry.clone()));
            }
        }
        if lease.channels.len() > 1 {
            batch.items.retain(|(_, entry)| entry.seq <= limit);
            // Stable: entries sharing a position (one gap across channels) keep channel order.
            batch.items.sort_by_key(|(_, entry)| entry.seq);
        }
        batch.limit = cut_to_one_piece(&mut batch.items, limit);
        batch
    }

    // ----- Upstream side: only the upstream task calls these. -----

    /// Makes the next position the head. Single writer: the upstream task.
    fn advance_head(&self) -> u64 {
        let seq = self.head.load(Ordering::Relaxed) + 1;
        self.head.store(seq, Ordering::Release);
        seq
    }

    /// Appends `entry` to a channel's ring, making sure the channel has an expiry ticket.
    /// Returns how many entries were evicted to make room.
    fn append(&self, channel: &Arc<Channel>, state: &mut ChannelState, entry: Entry) -> usize {
        let evicted = state.ring.push(entry);
        if !state.expiry_scheduled {
            if let Some(due) = self.expiry_due(&state.ring) {
                state.expiry_scheduled = true;
                self.expiries.lock().schedule(due, Arc::downgrade(channel));
            }
        }
        evicted
    }

    /// When the oldest entry of `ring` passes `max_age` (none when empty, or too far ahead to
    /// represent).
    fn expiry_due(&self, ring: &Ring) -> Option<Instant> {
        ring.oldest_appended_at()?.checked_add(self.limits.max_age)
    }

    /// Appends a Redis message to its channel's ring.
    pub fn publish(&self, name: &str, payload: &[u8], received_at: Instant) -> PublishOutcome {
        let Some(channel) = self.channels.lock().get(name).map(|s| s.channel.clone()) else {
            return PublishOutcome::NotWanted;
        };
        let mut state = channel.state.write();
        if state.status != Status::Subscribed {
            // Before confirmation no client has been promised this message.
            return PublishOutcome::NotWanted;
        }
        let text = if payload.len() > self.limits.max_payload_bytes {
            Err(DropReason::TooLarge)
        } else {
            std::str::from_utf8(payload).map_err(|_| DropReason::InvalidUtf8)
        };
        let text = match text {
            Ok(text) => text,
            Err(reason) => {
                let log = state
                    .last_drop_log
                    .is_none_or(|at| received_at.duration_since(at) >= DROP_LOG_INTERVAL);
                if log {
                    state.last_drop_log = Some(received_at);
                }
                return PublishOutcome::Dropped { reason, log };
            }
        };
        let seq = self.head.load(Ordering::Relaxed) + 1;
        let event_type = sse::event_type_of(text, &self.event_type_field);
        let frame = sse::WireFrame::event(self.epoch.id(seq), event_type.as_deref(), text);
        let entry = Entry {
            seq,
            kind: EntryKind::Event { frame, received_at },
            appended_at: received_at,
        };
        let evicted = self.append(&channel, &mut state, entry);
        drop(state);
        self.advance_head();
        channel.readers.wake_all();
        PublishOutcome::Appended { evicted }
    }

    /// Marks the confirmed subscriptions among `confirmed` as live, all at one new position.
    /// A channel seen for the first time starts its history there; a channel whose subscription
    /// was interrupted gets a gap entry there, so its readers learn messages may be lost.
    pub fn mark_subscribed(&self, confirmed: &[SubscribeRequest]) {
        let channels: Vec<Arc<Channel>> = {
            let map = self.channels.lock();
            confirmed
                .iter()
                .filter_map(|request| {
                    map.get(&request.name)
                        .filter(|slot| slot.channel.generation == request.generation)
                })
                .map(|slot| slot.channel.clone())
                .collect()
        };
        let seq = self.head.load(Ordering::Relaxed) + 1;
        let now = Instant::now();
        let mut restored = Vec::with_capacity(channels.len());
        for channel in channels {
            let mut state = channel.state.write();
            match state.status {
                Status::Pending => state.ring.start_at(seq),
                Status::Interrupted => {
                    let gap = Entry {
                        seq,
                        kind: EntryKind::Gap,
                        appended_at: now,
                    };
                    self.append(&channel, &mut state, gap);
                }
                Status::Subscribed => continue,
            }
            drop(state);
            restored.push(channel);
        }
        // Move the head before flipping the status: a new stream that sees `Subscribed` must
        // also see a head at or past the channel's start, or it would begin before the history
        // and get a spurious reset.
        self.advance_head();
        for channel in &restored {
            channel.state.write().status = Status::Subscribed;
            channel.changed.send_replace(());
            channel.readers.wake_all();
        }
    }

    /// Every channel currently held, as requests to subscribe again after a reconnect.
    pub fn subscriptions(&self) -> Vec<SubscribeRequest> {
        self.channels
            .lock()
            .values()
            .map(|slot| SubscribeRequest {
                name: slot.channel.name.clone(),
                generation: slot.channel.generation,
            })
            .collect()
    }

    /// Records whether the Redis subscription connection is up. When it goes down, every
    /// subscribed channel becomes interrupted: it will get a gap when it is restored.
    pub fn set_upstream_up(&self, up: bool) {
        if !up {
            for slot in self.channels.lock().values() {
                let mut state = slot.channel.state.write();
                if state.status == Status::Subscribed {
                    state.status = Status::Interrupted;
                }
            }
        }
        self.upstream_up.send_replace(up);
        crate::metrics::redis_up(up);
    }

    /// Frees the channels nobody has read for `linger` and evicts history older than
    /// `max_age`. Only channels with a due ticket are touched (see `deadlines`), so an idle
    /// sweep costs nothing however many channels are held.
    pub fn sweep(&self, now: Instant) -> Sweep {
        Sweep {
            freed: self.free_lingering(now),
            evicted: self.evict_expired(now),
        }
    }

    fn free_lingering(&self, now: Instant) -> Vec<Arc<str>> {
        let due = self.lingering.lock().take_due(now);
        if due.is_empty() {
            return Vec::new();
        }
        let mut freed = Vec::new();
        let mut still_idle = Vec::new();
        let mut map = self.channels.lock();
        for key in due {
            let Some(slot) = map
                .get_mut(&key.name)
                .filter(|slot| slot.channel.generation == key.generation)
            else {
                continue;
            };
            slot.linger_scheduled = false;
            if slot.leases > 0 {
                continue;
            }
            match slot
                .idle_since
                .and_then(|since| since.checked_add(self.limits.linger))
            {
                Some(free_at) if free_at <= now => {
                    map.remove(&key.name);
                    freed.push(key.name);
                }
                // Leased and left again since the ticket was made: wait from the last release.
                Some(free_at) => {
                    slot.linger_scheduled = true;
                    still_idle.push((free_at, key));
                }
                None => {}
            }
        }
        drop(map);
        let mut lingering = self.lingering.lock();
        for (free_at, key) in still_idle {
            lingering.schedule(free_at, key);
        }
        freed
    }

    fn evict_expired(&self, now: Instant) -> usize {
        let due = self.expiries.lock().take_due(now);
        let mut evicted = 0;
        let mut next = Vec::new();
        for channel in due.iter().filter_map(Weak::upgrade) {
            let mut state = channel.state.write();
            evicted += state.ring.evict_expired(now);
            state.expiry_scheduled = false;
            if let Some(due) = self.expiry_due(&state.ring) {
                state.expiry_scheduled = true;
                next.push((due, Arc::downgrade(&channel)));
            }
        }
        let mut expiries = self.expiries.lock();
        for (due, channel) in next {
            expiries.schedule(due, channel);
        }
        evicted
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

/// What [`Hub::sweep`] did.
#[derive(Debug, Default)]
pub struct Sweep {
    /// Channels freed after their linger: to unsubscribe.
    pub freed: Vec<Arc<str>>,
    /// Entries evicted for age.
    pub evicted: usize,
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

/// A stream's hold on its channels: keeps them alive and subscribed; released on drop.
#[derive(Debug)]
pub struct Lease {
    hub: Arc<Hub>,
    channels: Vec<Arc<Channel>>,
}

impl Lease {
    /// The leased channel names, in request order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.channels.iter().map(|c| &*c.name)
    }

    /// The name of the channel at `index` (as used in [`Batch`]).
    pub(crate) fn name(&self, index: usize) -> &str {
        self.channels.get(index).map_or("", |c| &c.name)
    }

    /// Number of leased channels.
    pub(crate) fn len(&self) -> usize {
        self.channels.len()
    }

    /// Makes `waker` be woken at the next append to any leased channel; `registrations` holds
    /// one entry per channel. Call before reading, so an append in between is not missed.
    pub(crate) fn listen(&self, registrations: &mut [Registration], waker: &Waker) {
        for (channel, registration) in self.channels.iter().zip(registrations) {
            channel.readers.register(registration, waker);
        }
    }

    /// Withdraws the registrations of a stream that ends.
    pub(crate) fn stop_listening(&self, registrations: &mut [Registration]) {
        for (channel, registration) in self.channels.iter().zip(registrations) {
            channel.readers.deregister(registration);
        }
    }

    fn all_subscribed(&self) -> bool {
        self.channels
            .iter()
            .all(|c| c.state.read().status == Status::Subscribed)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.hub.release(&self.channels);
    }
}

/// What a stream has to send after one read of its channels.
#[derive(Debug)]
pub(crate) struct Batch {
    /// Entries after the cursor, in position order, with the index of their channel.
    pub(crate) items: Vec<(usize, Entry)>,
    /// Channels whose ring no longer reaches back to the cursor.
    pub(crate) fell_off: Vec<usize>,
    /// The position this piece covers completely: the stream's cursor after sending it.
    pub(crate) limit: u64,
    /// The head when the piece was read (where a stream resumes channels that fell off).
    pub(crate) head: u64,
}

/// Most entries one [`Hub::read`] returns.
pub(crate) const PIECE_MAX_ENTRIES: usize = 64;
/// Encoded bytes after which a [`Hub::read`] takes no further entry. With the entry that crosses
/// it, a piece holds less than this plus one `limits.max_payload_bytes` frame.
pub(crate) const PIECE_MAX_BYTES: usize = 64 * 1024;

/// Channels a stream has given up on up to a position (their history fell off and the reset
/// for them is due at `until`): reads leave them out and stop at `until`.
#[derive(Debug)]
pub(crate) struct Skipped {
    /// Indexes of the channels in the lease.
    pub(crate) channels: Vec<usize>,
    /// The position up to which they are skipped.
    pub(crate) until: u64,
}

/// The running size of a piece being read.
#[derive(Debug, Default)]
struct PieceSize {
    entries: usize,
    bytes: usize,
    last_seq: u64,
}

impl PieceSize {
    fn add(&mut self, entry: &Entry) {
        self.entries += 1;
        self.bytes += entry.kind.byte_len();
        self.last_seq = entry.seq;
    }

    /// Whether the piece takes no further entry (an empty piece always takes one).
    fn is_full(&self) -> bool {
        self.entries >= PIECE_MAX_ENTRIES || self.bytes >= PIECE_MAX_BYTES
    }
}

/// Cuts `items` (in position order, complete up to `limit`) to one piece and returns the position
/// the piece covers completely. Entries sharing the last position (a gap in several channels)
/// stay together, so a cut never splits one reset.
fn cut_to_one_piece(items: &mut Vec<(usize, Entry)>, limit: u64) -> u64 {
    let mut size = PieceSize::default();
    let mut taken = 0;
    for (_, entry) in items.iter() {
        if size.is_full() && entry.seq != size.last_seq {
            break;
        }
        size.add(entry);
        taken += 1;
    }
    if taken == items.len() {
        return limit;
    }
    items.truncate(taken);
    size.last_seq
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hub with the given history limits, in seconds.
    fn hub(
        max_age_secs: u64,
        linger_secs: u64,
    ) -> (Arc<Hub>, mpsc::UnboundedReceiver<SubscribeRequest>) {
        let mut settings = Settings::default();
        settings.history.max_age_secs = max_age_secs;
        settings.history.linger_secs = linger_secs;
        Hub::new(&settings)
    }

    /// Leases `name` and confirms its subscription, as the upstream task would.
    fn subscribed(
        hub: &Arc<Hub>,
        requests: &mut mpsc::UnboundedReceiver<SubscribeRequest>,
        name: &str,
    ) -> Lease {
        let lease = hub.acquire(&[name.to_string()]);
        let mut confirmed = Vec::new();
        while let Ok(request) = requests.try_recv() {
            confirmed.push(request);
        }
        hub.mark_subscribed(&confirmed);
        lease
    }

    fn publish(hub: &Hub, name: &str) {
        let outcome = hub.publish(name, b"payload", Instant::now());
        assert!(
            matches!(outcome, PublishOutcome::Appended { .. }),
            "{outcome:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_channel_is_freed_linger_after_its_last_reader_left() {
        let (hub, mut requests) = hub(300, 10);
        let first = subscribed(&hub, &mut requests, "orders");
        drop(first);
        tokio::time::advance(Duration::from_secs(6)).await;
        // Read again and left again: the linger counts from this second departure.
        drop(hub.acquire(&["orders".to_string()]));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(hub.sweep(Instant::now()).freed.is_empty());
        assert_eq!(hub.channel_count(), 1);
        tokio::time::advance(Duration::from_secs(4)).await;
        let freed = hub.sweep(Instant::now()).freed;
        assert_eq!(freed, vec![Arc::<str>::from("orders")]);
        assert_eq!(hub.channel_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_channel_with_a_reader_is_never_freed() {
        let (hub, mut requests) = hub(300, 10);
        let reader = subscribed(&hub, &mut requests, "orders");
        drop(hub.acquire(&["orders".to_string()]));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(hub.sweep(Instant::now()).freed.is_empty());
        assert_eq!(hub.channel_count(), 1);
        drop(reader);
    }

    #[tokio::test(start_paused = true)]
    async fn history_is_evicted_by_age_entry_by_entry() {
        let (hub, mut requests) = hub(5, 300);
        let _reader = subscribed(&hub, &mut requests, "orders");
        publish(&hub, "orders");
        tokio::time::advance(Duration::from_secs(3)).await;
        publish(&hub, "orders");
        publish(&hub, "orders");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            hub.sweep(Instant::now()).evicted,
            0,
            "nothing is older than 5 s yet"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(hub.sweep(Instant::now()).evicted, 1);
        assert_eq!(hub.measure().events, 2);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(hub.sweep(Instant::now()).evicted, 2);
        assert_eq!(hub.measure().events, 0);
        // An emptied ring is scheduled again by its next append.
        publish(&hub, "orders");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(hub.sweep(Instant::now()).evicted, 1);
    }

    /// Leases `names` and confirms them all at one position.
    fn subscribed_all(
        hub: &Arc<Hub>,
        requests: &mut mpsc::UnboundedReceiver<SubscribeRequest>,
        names: &[&str],
    ) -> Lease {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let lease = hub.acquire(&names);
        let mut confirmed = Vec::new();
        while let Ok(request) = requests.try_recv() {
            confirmed.push(request);
        }
        hub.mark_subscribed(&confirmed);
        lease
    }

    /// A Redis outage and recovery: one gap, at one new position, in every channel.
    fn outage(hub: &Hub) {
        hub.set_upstream_up(false);
        hub.mark_subscribed(&hub.subscriptions());
        hub.set_upstream_up(true);
    }

    /// Reads piece after piece from `cursor` up to the head: `(channel, seq, is_gap)` per entry,
    /// and the pieces' sizes.
    fn read_in_pieces(
        hub: &Hub,
        lease: &Lease,
        mut cursor: u64,
    ) -> (Vec<(usize, u64, bool)>, Vec<usize>) {
        let mut entries = Vec::new();
        let mut pieces = Vec::new();
        // Bounded: every piece moves the cursor forward by at least one position.
        for _ in 0..=hub.head() {
            if cursor >= hub.head() {
                break;
            }
            let piece = hub.read(lease, cursor, None);
            assert!(piece.fell_off.is_empty());
            assert!(piece.limit > cursor, "a piece always makes progress");
            pieces.push(piece.items.len());
            for (channel, entry) in &piece.items {
                assert!(entry.seq > cursor && entry.seq <= piece.limit);
                entries.push((*channel, entry.seq, matches!(entry.kind, EntryKind::Gap)));
            }
            cursor = piece.limit;
        }
        (entries, pieces)
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_returns_a_bounded_piece() {
        let (hub, mut requests) = hub(300, 300);
        let lease = subscribed(&hub, &mut requests, "orders");
        let start = hub.head();
        for _ in 0..200 {
            publish(&hub, "orders");
        }
        let piece = hub.read(&lease, start, None);
        assert_eq!(piece.items.len(), PIECE_MAX_ENTRIES);
        assert_eq!(piece.limit, start + PIECE_MAX_ENTRIES as u64);

        // Large events: the byte bound, crossed by the last entry taken.
        let large = "x".repeat(20 * 1024);
        let from = hub.head();
        for _ in 0..10 {
            hub.publish("orders", large.as_bytes(), Instant::now());
        }
        let piece = hub.read(&lease, from, None);
        let bytes: usize = piece.items.iter().map(|(_, e)| e.kind.byte_len()).sum();
        assert_eq!(piece.items.len(), 4, "{bytes} bytes");
        assert!(bytes >= PIECE_MAX_BYTES && bytes < PIECE_MAX_BYTES + large.len() + 100);
        // A single entry larger than the bound is still a piece of one.
        let huge = "y".repeat(100 * 1024);
        let mut settings = Settings::default();
        settings.limits.max_payload_bytes = 200 * 1024;
        let (hub, mut requests) = Hub::new(&settings);
        let lease = subscribed(&hub, &mut requests, "orders");
        let from = hub.head();
        hub.publish("orders", huge.as_bytes(), Instant::now());
        hub.publish("orders", huge.as_bytes(), Instant::now());
        let piece = hub.read(&lease, from, None);
        assert_eq!((piece.items.len(), piece.limit), (1, from + 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_multi_channel_replay_in_pieces_delivers_every_entry_once_in_order() {
        let (hub, mut requests) = hub(300, 300);
        let lease = subscribed_all(&hub, &mut requests, &["a", "b", "c"]);
        let _unread = subscribed(&hub, &mut requests, "elsewhere");
        let start = hub.head();
        // Uneven runs per channel, so pieces end in the middle of one channel's run, plus
        // positions that concern none of the stream's channels.
        let mut expected = Vec::new();
        for round in 0..40u64 {
            for (channel, name) in ["a", "b", "c", "elsewhere"].iter().enumerate() {
                for _ in 0..(round * (channel as u64 + 1)) % 7 {
                    publish(&hub, name);
                    if channel < 3 {
                        expected.push((channel, hub.head(), false));
                    }
                }
            }
        }
        assert!(expected.len() > 3 * PIECE_MAX_ENTRIES);
        let (entries, pieces) = read_in_pieces(&hub, &lease, start);
        assert_eq!(entries, expected);
        assert!(pieces.len() > 3);
        assert!(
            pieces.iter().all(|&size| size <= PIECE_MAX_ENTRIES),
            "{pieces:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_gap_across_channels_at_a_piece_boundary_stays_in_one_piece() {
        // The gap position lands just before, at and just after the entry bound.
        for events_before in [
            PIECE_MAX_ENTRIES - 2,
            PIECE_MAX_ENTRIES - 1,
            PIECE_MAX_ENTRIES,
        ] {
            let (hub, mut requests) = hub(300, 300);
            let lease = subscribed_all(&hub, &mut requests, &["a", "b", "c"]);
            let start = hub.head();
            for _ in 0..events_before {
                publish(&hub, "b");
            }
            outage(&hub);
            let gap = hub.head();
            publish(&hub, "c");
            let mut cursor = start;
            let mut gap_pieces = Vec::new();
            while cursor < hub.head() {
                let piece = hub.read(&lease, cursor, None);
                let gaps: Vec<usize> = piece
                    .items
                    .iter()
                    .filter(|(_, e)| matches!(e.kind, EntryKind::Gap))
                    .map(|(channel, e)| {
                        assert_eq!(e.seq, gap);
                        *channel
                    })
                    .collect();
                if !gaps.is_empty() {
                    gap_pieces.push(gaps);
                }
                cursor = piece.limit;
            }
            assert_eq!(
                gap_pieces,
                vec![vec![0, 1, 2]],
                "{events_before} events before"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_channel_whose_history_was_evicted_falls_off_in_a_piece() {
        let mut settings = Settings::default();
        settings.history.capacity = 100;
        let (hub, mut requests) = Hub::new(&settings);
        let lease = subscribed_all(&hub, &mut requests, &["a", "b"]);
        let start = hub.head();
        for _ in 0..100 {
            publish(&hub, "a");
            publish(&hub, "b");
            publish(&hub, "a");
        }
        let piece = hub.read(&lease, start, None);
        assert_eq!(piece.fell_off, vec![0]);
        assert_eq!(piece.head, hub.head());
        assert!(piece.items.iter().all(|(channel, _)| *channel == 1));
        assert_eq!(piece.items.len(), PIECE_MAX_ENTRIES);
        // Skipping it up to the head, the rest of b comes in pieces and stops there.
        let skipped = Skipped {
            channels: vec![0],
            until: piece.head,
        };
        let mut cursor = piece.limit;
        let mut b_entries = piece.items.len();
        while cursor < skipped.until {
            let piece = hub.read(&lease, cursor, Some(&skipped));
            assert!(piece.fell_off.is_empty());
            assert!(piece.items.iter().all(|(channel, _)| *channel == 1));
            b_entries += piece.items.len();
            cursor = piece.limit;
        }
        assert_eq!((b_entries, cursor), (100, hub.head()));
        // Read from a position still held, a is complete again.
        let piece = hub.read(&lease, hub.head() - 1, None);
        assert!(piece.fell_off.is_empty());
        assert_eq!(piece.items.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn measure_counts_every_channel() {
        let (hub, mut requests) = hub(300, 300);
        let _orders = subscribed(&hub, &mut requests, "orders");
        let _users = subscribed(&hub, &mut requests, "users");
        let _pending = hub.acquire(&["pending".to_string()]);
        publish(&hub, "orders");
        publish(&hub, "orders");
        publish(&hub, "users");
        let size = hub.measure();
        assert_eq!((size.events, size.subscribed), (3, 2));
        assert!(size.bytes > 3 * "payload".len());
    }
}
