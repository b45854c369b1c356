//! Upkeep by the clock: freeing channels nobody has read for `history.linger_secs`, and
//! evicting history older than `history.max_age_secs`.
//!
//! Both are driven by tickets in the hub's [`Deadlines`](super::deadlines::Deadlines) queues
//! (`lingering`, made by `lease` on release; `expiries`, made by `publish` on append), so a
//! sweep touches only the channels whose ticket is due. Freeing channels early because of the
//! channel cap is the cap's business (`lease`), though it takes from the same lingering queue.

use std::sync::{Arc, Weak};

use tokio::time::Instant;

use super::ring::Ring;
use super::{is_sparse, Hub};

/// What [`Hub::sweep`] did.
#[derive(Debug, Default)]
pub struct Sweep {
    /// Channels freed after their linger: to unsubscribe.
    pub freed: Vec<Arc<str>>,
    /// Entries evicted for age.
    pub evicted: usize,
}

impl Hub {
    /// Frees the channels nobody has read for `linger` and evicts history older than
    /// `max_age`. Only channels with a due ticket are touched (see `deadlines`), so an idle
    /// sweep costs nothing however many channels are held.
    pub fn sweep(&self, now: Instant) -> Sweep {
        Sweep {
            freed: self.free_lingering(now),
            evicted: self.evict_expired(now),
        }
    }

    /// When the oldest entry of `ring` passes `max_age` (none when empty, or too far ahead to
    /// represent).
    pub(super) fn expiry_due(&self, ring: &Ring) -> Option<Instant> {
        ring.oldest_appended_at()?.checked_add(self.limits.max_age)
    }

    fn free_lingering(&self, now: Instant) -> Vec<Arc<str>> {
        let mut map = self.channels.lock();
        let mut lingering = self.lingering.lock();
        let due = lingering.take_due(now);
        let mut freed = Vec::new();
        for key in due {
            let Some(slot) = map
                .get_mut(&key.name)
                .filter(|slot| slot.holds(key.generation))
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
                    lingering.schedule(free_at, key);
                }
                None => {}
            }
        }
        let held = map.len();
        if !freed.is_empty() && is_sparse(held, map.capacity()) {
            map.shrink_to(2 * held);
            lingering.shrink_if_sparse();
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
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::time::Instant;

    use crate::hub::testing::{acquire, hub, publish, subscribed};

    #[tokio::test(start_paused = true)]
    async fn a_channel_is_freed_linger_after_its_last_reader_left() {
        let (hub, mut requests) = hub(300, 10);
        let first = subscribed(&hub, &mut requests, "orders");
        drop(first);
        tokio::time::advance(Duration::from_secs(6)).await;
        // Read again and left again: the linger counts from this second departure.
        drop(acquire(&hub, &["orders"]));
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
        drop(acquire(&hub, &["orders"]));
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
}
