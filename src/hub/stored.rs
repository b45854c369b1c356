//! The writer's side of the hub with the redis backend: events whose position Redis assigned.
//!
//! Each channel remembers where it stands in Redis (`ChannelState::stored`). An event is
//! appended only when it follows that position exactly (its `prev` is the last event received);
//! one that is already held is a duplicate (the same event read twice: live and in a catch-up),
//! and one further on means events were missed, so the upstream task reads them from Redis first
//! ([`StoredOutcome::Behind`]). That is how a dropped subscription loses nothing.
//!
//! When the upstream starts serving a channel it loads the channel's recent history from Redis
//! ([`Hub::load_history`]), so this instance can resume clients that read on another one.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::channel::{Channel, ChannelState, Status};
use super::ring::{Entry, EntryKind, Origin};
use super::{Hub, PublishOutcome, SubscribeRequest};
use crate::position::{self, Position, StreamId};
use crate::sse::{self, ResetReason, WireFrame};

/// One event as Redis stored it.
#[derive(Debug)]
pub struct StoredEvent<'a> {
    /// The channel's position with this event: its epoch and the event's stream id.
    pub epoch: &'a str,
    /// The event's stream id.
    pub id: StreamId,
    /// The event before it in the channel (`None` for the first of its epoch).
    pub prev: Option<StreamId>,
    /// The payload, verbatim.
    pub payload: &'a [u8],
}

/// Result of handing a stored event to the hub.
#[derive(Debug, PartialEq, Eq)]
pub enum StoredOutcome {
    /// Appended, dropped or not wanted, as with the memory backend.
    Published(PublishOutcome),
    /// Already received (a catch-up and the live feed overlap).
    Duplicate,
    /// Events between the channel's position and this one were missed: read them from Redis,
    /// from this position on, and hand this event over again.
    Behind {
        /// The channel's position in Redis after the last event received.
        from: Position,
    },
}

/// A channel's recent history, as `ssehub_tail` returned it.
#[derive(Debug)]
pub struct Tail {
    /// The position just before the first event (the history is complete from there).
    pub start: Position,
    /// The events, oldest first: stream id and payload.
    pub events: Vec<(StreamId, Vec<u8>)>,
}

impl Hub {
    /// Appends an event read from Redis (live or in a catch-up) if it follows the channel's
    /// position; see [`StoredOutcome`].
    pub fn publish_stored(&self, name: &str, event: &StoredEvent<'_>) -> StoredOutcome {
        let Some(channel) = self.channels.lock().get(name).map(|s| s.channel.clone()) else {
            return StoredOutcome::Published(PublishOutcome::NotWanted);
        };
        let mut state = channel.state.write();
        let Some(stored) = state.stored.clone() else {
            // Not loaded yet: the load will include this event.
            return StoredOutcome::Published(PublishOutcome::NotWanted);
        };
        match Position::compare_epochs(event.epoch, &stored.epoch) {
            std::cmp::Ordering::Less => return StoredOutcome::Duplicate,
            std::cmp::Ordering::Equal if Some(event.id) <= stored.last => {
                return StoredOutcome::Duplicate
            }
            std::cmp::Ordering::Equal if event.prev != stored.last => {
                return StoredOutcome::Behind { from: stored }
            }
            // A newer epoch (the channel's state was lost in Redis) follows on only from its
            // first event; otherwise its earlier events must be read, or a reset sent.
            std::cmp::Ordering::Greater if event.prev.is_some() => {
                return StoredOutcome::Behind { from: stored }
            }
            _ => {}
        }
        let outcome = self.append_stored(&channel, &mut state, event);
        drop(state);
        if matches!(outcome, PublishOutcome::Appended { .. }) {
            self.advance_head();
            channel.readers.wake_all();
        }
        StoredOutcome::Published(outcome)
    }

    /// Appends `event` at the next position (the caller advances the head afterwards) or drops
    /// it; either way the channel's position in Redis moves past it.
    fn append_stored(
        &self,
        channel: &Arc<Channel>,
        state: &mut ChannelState,
        event: &StoredEvent<'_>,
    ) -> PublishOutcome {
        let received_at = Instant::now();
        // Shared with the channel's earlier events of the same epoch: one allocation per epoch.
        let epoch = match &state.stored {
            Some(stored) if &*stored.epoch == event.epoch => stored.epoch.clone(),
            _ => Arc::from(event.epoch),
        };
        let position = Position {
            epoch,
            last: Some(event.id),
        };
        state.stored = Some(position.clone());
        let text = match self.check_payload(channel, state, event.payload, received_at) {
            Ok(text) => text,
            Err(dropped) => return dropped,
        };
        let event_type = sse::event_type_of(text, &self.event_type_field);
        let id = position::encode_id(std::slice::from_ref(&position));
        let origin = Origin {
            position,
            id_len: id.len(),
        };
        let entry = Entry {
            seq: self.head.load(Ordering::Relaxed) + 1,
            kind: EntryKind::Event {
                frame: WireFrame::event_with_id(&id, event_type.as_deref(), text),
                received_at,
                origin: Some(Arc::new(origin)),
            },
            // Age counts from when Redis stored the event, so `history.max_age_secs` means the
            // same on every instance, whenever each one loaded it.
            appended_at: stored_at(event.id, received_at),
        };
        let evicted = self.append(channel, state, entry);
        PublishOutcome::Appended { evicted }
    }

    /// Starts serving a newly subscribed channel with its recent history from Redis, then marks
    /// it subscribed. A late answer for an earlier incarnation of the name is ignored.
    pub fn load_history(&self, request: &SubscribeRequest, tail: &Tail) -> Vec<PublishOutcome> {
        let Some(channel) = self
            .channels
            .lock()
            .get(&request.name)
            .filter(|slot| slot.holds(request.generation))
            .map(|slot| slot.channel.clone())
        else {
            return Vec::new();
        };
        let mut outcomes = Vec::with_capacity(tail.events.len());
        {
            let mut state = channel.state.write();
            if state.status != Status::Pending {
                return outcomes;
            }
            let start = self.head.load(Ordering::Relaxed);
            state.ring.start_at(start, Some(tail.start.clone()));
            state.stored = Some(tail.start.clone());
            for (id, payload) in &tail.events {
                let event = StoredEvent {
                    epoch: &tail.start.epoch,
                    id: *id,
                    prev: state.stored.as_ref().and_then(|p| p.last),
                    payload,
                };
                let outcome = self.append_stored(&channel, &mut state, &event);
                if matches!(outcome, PublishOutcome::Appended { .. }) {
                    self.advance_head();
                }
                outcomes.push(outcome);
            }
        }
        // As in `mark_subscribed`: the head is past the history before the status says so.
        self.advance_head();
        channel.state.write().status = Status::Subscribed;
        channel.changed.send_replace(());
        channel.readers.wake_all();
        outcomes
    }

    /// Records that the events between the channel's position and `position` cannot be had
    /// (trimmed, or lost in Redis): readers get a reset for `reason` and go on from `position`.
    pub fn append_stored_gap(&self, name: &str, reason: ResetReason, position: Position) {
        let Some(channel) = self.channels.lock().get(name).map(|s| s.channel.clone()) else {
            return;
        };
        let mut state = channel.state.write();
        if state.stored.is_none() {
            return;
        }
        state.stored = Some(position.clone());
        let now = Instant::now();
        let gap = Entry {
            seq: self.head.load(Ordering::Relaxed) + 1,
            kind: EntryKind::Gap {
                reason,
                position: Some(position),
            },
            appended_at: now,
        };
        self.append(&channel, &mut state, gap);
        drop(state);
        self.advance_head();
        channel.readers.wake_all();
    }

    /// Where channel `name` stands in Redis, once its history is loaded.
    pub fn stored_position(&self, name: &str) -> Option<Position> {
        let channel = self.channels.lock().get(name).map(|s| s.channel.clone())?;
        let state = channel.state.read();
        state.stored.clone()
    }

    /// Marks channels whose subscription was interrupted as live again, without a gap: the
    /// upstream has read what they missed from Redis.
    pub fn mark_restored(&self, names: &[Arc<str>]) {
        let channels: Vec<Arc<Channel>> = {
            let map = self.channels.lock();
            names
                .iter()
                .filter_map(|name| map.get(name).map(|slot| slot.channel.clone()))
                .collect()
        };
        for channel in channels {
            let mut state = channel.state.write();
            if state.status == Status::Interrupted {
                state.status = Status::Subscribed;
                drop(state);
                // Streams opened while the subscription was down wait for this.
                channel.changed.send_replace(());
                channel.readers.wake_all();
            }
        }
    }
}

/// When Redis stored the event `id` (its milliseconds part), as an `Instant`: `now` minus the
/// event's age. A clock difference between Redis and this host only shifts it by that much.
fn stored_at(id: StreamId, now: Instant) -> Instant {
    let wall_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let age = Duration::from_millis(wall_ms.saturating_sub(id.ms));
    now.checked_sub(age).unwrap_or(now)
}
