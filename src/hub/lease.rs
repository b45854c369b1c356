//! Leases: how streams hold channels, and the channel cap.
//!
//! A stream acquires a [`Lease`] on its channels; the first lease on a name creates the channel
//! and asks the upstream task to subscribe. Dropping the lease releases the channels: one whose
//! last reader left lingers (`history.linger_secs`, freed by `upkeep`) so that a reconnecting
//! client finds its history.
//!
//! The cap (`channels.max_total`) is enforced here, when a lease needs new channels: lingering
//! channels are freed early, oldest idle first, and a request that cannot fit is refused whole.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;

use tokio::time::Instant;

use super::channel::{Channel, ChannelKey, Slot, Status};
use super::ring::Located;
use super::wakers::Registration;
use super::{Hub, SubscribeRequest, UpstreamRequest};

/// How often the channel cap may log that it bit.
const CAP_LOG_INTERVAL: Duration = Duration::from_secs(5);
/// How often [`Hub::wait_reachable`] looks again.
const REACHABLE_POLL: Duration = Duration::from_millis(5);

/// A request was refused because it needs more new channels than the hub can make room for
/// under `channels.max_total` (every other channel has a reader).
#[derive(Debug, thiserror::Error)]
#[error(
    "the gateway holds its maximum number of channels and too few of them are idle; retry later"
)]
pub struct ChannelLimitReached;

/// Counts of the cap's effects, logged at most once per [`CAP_LOG_INTERVAL`].
#[derive(Debug, Default)]
pub(super) struct CapLog {
    last_logged: Option<Instant>,
    evicted: u64,
    refused: u64,
}

/// A stream's hold on its channels: keeps them alive and subscribed; released on drop.
#[derive(Debug)]
pub struct Lease {
    hub: Arc<Hub>,
    pub(super) channels: Vec<Arc<Channel>>,
}

impl Lease {
    /// The leased channel names, in request order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.channels.iter().map(|c| &*c.name)
    }

    /// The name of the channel at `index` (as used in [`Batch`](super::read::Batch)).
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

impl Hub {
    /// Registers a reader on `names` (distinct), creating and requesting subscriptions where
    /// needed. When that would hold more than `channels.max_total` channels, lingering ones are
    /// freed first, oldest idle first; if too few are lingering nothing changes and the request
    /// is refused.
    pub fn acquire(self: &Arc<Self>, names: &[String]) -> Result<Lease, ChannelLimitReached> {
        let mut map = self.channels.lock();
        let new = names
            .iter()
            .filter(|name| !map.contains_key(name.as_str()))
            .count();
        let excess = (map.len() + new).saturating_sub(self.max_channels);
        if excess > 0 && !self.free_oldest_idle(&mut map, excess, names) {
            drop(map);
            self.note_cap(0, 1);
            return Err(ChannelLimitReached);
        }
        let mut channels = Vec::with_capacity(names.len());
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
        if excess > 0 {
            crate::metrics::channels_evicted(excess);
            self.note_cap(excess, 0);
        }
        Ok(Lease {
            hub: self.clone(),
            channels,
        })
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

    /// Redis backend: waits, up to `timeout`, until every channel of a client's resume id is
    /// no longer ahead of this instance. A client that read an event on another instance may
    /// come back here before the event reached this instance's subscription; it must get the
    /// rest, not an `unknown_position` reset.
    pub async fn wait_reachable(&self, lease: &Lease, resume_id: &str, timeout: Duration) {
        let Some(wanted) = crate::position::parse_id(resume_id, lease.len()) else {
            return;
        };
        let deadline = Instant::now() + timeout;
        // Bounded by the deadline; a poll, since the rare wait is short and every append
        // would otherwise have to check for waiters.
        while Instant::now() < deadline {
            let ahead = wanted
                .iter()
                .enumerate()
                .any(|(index, position)| self.locate(lease, index, position) == Located::Ahead);
            if !ahead {
                return;
            }
            tokio::time::sleep(REACHABLE_POLL).await;
        }
    }

    /// Frees `count` lingering channels, oldest idle first, sparing the channels in `wanted`
    /// (the request about to read them), and queues their UNSUBSCRIBEs. Frees none and returns
    /// false when fewer than `count` are lingering, so a refused request changes nothing.
    ///
    /// The lingering queue is ordered by `idle_since + linger`, oldest idle first. Its tickets
    /// may be stale: the channel was freed, is read again (dropped here; its next release makes
    /// a new ticket) or was read and left again since (the ticket is early: it goes back with
    /// the right due time). No ticket is ever late, so the first ticket found to be exact is
    /// the oldest idle channel. Each stale ticket is handled once, so the cost stays in
    /// proportion to the channels freed and releases made, not to the channels held.
    fn free_oldest_idle(
        &self,
        map: &mut HashMap<Arc<str>, Slot>,
        count: usize,
        wanted: &[String],
    ) -> bool {
        let mut lingering = self.lingering.lock();
        let mut chosen = Vec::with_capacity(count);
        let mut spared = Vec::new();
        while chosen.len() < count {
            let Some((due, key)) = lingering.pop_soonest() else {
                break;
            };
            let Some(slot) = map
                .get_mut(&key.name)
                .filter(|slot| slot.holds(key.generation))
            else {
                continue;
            };
            let idle_due = slot
                .idle_since
                .filter(|_| slot.leases == 0)
                .and_then(|since| since.checked_add(self.limits.linger));
            match idle_due {
                None => slot.linger_scheduled = false,
                Some(idle_due) if idle_due > due => lingering.schedule(idle_due, key),
                Some(_) if wanted.iter().any(|name| **name == *key.name) => spared.push((due, key)),
                Some(_) => chosen.push((due, key)),
            }
        }
        let made_room = chosen.len() == count;
        if !made_room {
            spared.append(&mut chosen);
        }
        for (due, key) in spared {
            lingering.schedule(due, key);
        }
        drop(lingering);
        for (_, key) in chosen {
            map.remove(&key.name);
            // A gone upstream task means shutdown: nothing left to unsubscribe from.
            let _ = self
                .upstream_requests
                .send(UpstreamRequest::Unsubscribe(key.name));
        }
        made_room
    }

    /// Records that the cap freed `evicted` channels early or `refused` requests, and logs the
    /// counts gathered since the last log at most once per [`CAP_LOG_INTERVAL`]: under a flood
    /// the cap bites on every request.
    fn note_cap(&self, evicted: usize, refused: u64) {
        let now = Instant::now();
        let mut log = self.cap_log.lock();
        log.evicted += evicted as u64;
        log.refused += refused;
        if log
            .last_logged
            .is_some_and(|at| now.duration_since(at) < CAP_LOG_INTERVAL)
        {
            return;
        }
        let (evicted, refused) = (log.evicted, log.refused);
        *log = CapLog {
            last_logged: Some(now),
            evicted: 0,
            refused: 0,
        };
        drop(log);
        tracing::warn!(
            max_total = self.max_channels,
            evicted,
            refused,
            "channel cap reached: idle channels freed early, requests refused when none was idle \
             (channels.max_total; logged at most every 5 s)"
        );
    }

    /// Creates a channel for `name` and asks the upstream task to subscribe to it.
    fn new_channel(&self, name: &str) -> Arc<Channel> {
        let name: Arc<str> = Arc::from(name);
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        // If the upstream task is gone the gateway is shutting down; the stream then times out
        // waiting for confirmation, which is the right answer.
        let _ = self
            .upstream_requests
            .send(UpstreamRequest::Subscribe(SubscribeRequest {
                name: name.clone(),
                generation,
            }));
        let schema = self.schemas.for_channel(&name);
        Arc::new(Channel::pending(name, generation, schema, &self.limits))
    }

    fn release(&self, channels: &[Arc<Channel>]) {
        let now = Instant::now();
        // No due time (a linger too long to represent) means the channel is never freed.
        let due = now.checked_add(self.limits.linger);
        let mut map = self.channels.lock();
        // Scheduled under the map lock, so a lingering channel always has its ticket when the
        // cap looks for one to free.
        let mut lingering = self.lingering.lock();
        for channel in channels {
            // A slot is only freed with no leases, so it is still this channel's; the check
            // keeps a future change to that rule from corrupting another incarnation's count.
            let slot = map
                .get_mut(&channel.name)
                .filter(|slot| slot.holds(channel.generation));
            if let Some(slot) = slot {
                slot.leases = slot.leases.saturating_sub(1);
                if slot.leases == 0 {
                    slot.idle_since = Some(now);
                    // A slot that still has a ticket (idle before, leased again meanwhile) is
                    // rescheduled from `idle_since` when that ticket comes due.
                    if let (false, Some(due)) = (slot.linger_scheduled, due) {
                        slot.linger_scheduled = true;
                        let key = ChannelKey {
                            name: channel.name.clone(),
                            generation: channel.generation,
                        };
                        lingering.schedule(due, key);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::hub::testing::{acquire, capped_hub, drain, subscribed};

    #[tokio::test(start_paused = true)]
    async fn the_cap_frees_the_oldest_idle_channel_first() {
        let (hub, mut requests) = capped_hub(300, 300, 3);
        let a = subscribed(&hub, &mut requests, "a");
        let b = subscribed(&hub, &mut requests, "b");
        let c = subscribed(&hub, &mut requests, "c");
        drop(a);
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(c);
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(b);
        tokio::time::advance(Duration::from_secs(1)).await;
        // Read and left again: "a" is now the newest idle, though its first ticket is oldest.
        drop(acquire(&hub, &["a"]));

        let _d = acquire(&hub, &["d"]).expect("room made");
        assert_eq!(drain(&mut requests), ["-c", "+d"]);
        let _e = acquire(&hub, &["e"]).expect("room made");
        assert_eq!(drain(&mut requests), ["-b", "+e"]);
        let _f = acquire(&hub, &["f"]).expect("room made");
        assert_eq!(drain(&mut requests), ["-a", "+f"]);
        assert_eq!(hub.channel_count(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_refuses_when_every_channel_has_a_reader() {
        let (hub, mut requests) = capped_hub(300, 300, 2);
        let _a = subscribed(&hub, &mut requests, "a");
        let _b = subscribed(&hub, &mut requests, "b");
        assert!(acquire(&hub, &["c"]).is_err());
        // Channels already held need no room.
        let _also_a = acquire(&hub, &["a", "b"]).expect("no new channel");
        assert!(drain(&mut requests).is_empty());
        assert_eq!(hub.channel_count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_cannot_fit_changes_nothing() {
        let (hub, mut requests) = capped_hub(300, 300, 3);
        let _a = subscribed(&hub, &mut requests, "a");
        let _b = subscribed(&hub, &mut requests, "b");
        drop(subscribed(&hub, &mut requests, "c"));
        // Two new channels need two idle ones: "c" alone is not enough, and stays.
        assert!(acquire(&hub, &["x", "y"]).is_err());
        assert!(drain(&mut requests).is_empty());
        assert_eq!(hub.channel_count(), 3);
        // The idle channel a request asks for is read, not freed to make room for itself.
        assert!(acquire(&hub, &["c", "x"]).is_err());
        let _x = acquire(&hub, &["x"]).expect("room made");
        assert_eq!(drain(&mut requests), ["-c", "+x"]);
    }
}
