//! The writer's side of the hub: what the upstream task calls, and nothing else does.
//!
//! The upstream task is the single writer: it hands over Redis messages ([`Hub::publish`]),
//! confirms subscriptions ([`Hub::mark_subscribed`]) and reports the connection's state
//! ([`Hub::set_upstream_up`], and the shards' with [`Hub::set_shards`]). Each append takes the
//! next global position, encodes the frame once, and wakes the channel's readers after the head
//! has moved past it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::channel::{Channel, ChannelState, Status};
use super::ring::{Entry, EntryKind};
use super::{Hub, SubscribeRequest};
use crate::schemas::Violation;
use crate::sse::{self, ResetReason};

/// How often a channel may log dropped payloads.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(60);

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
        /// With [`DropReason::SchemaInvalid`], the payload's first violation of its channel's
        /// schema (values masked: it is for the log).
        violation: Option<Violation>,
    },
}

/// Why a Redis payload was not forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Not valid UTF-8, so it cannot be carried in SSE.
    InvalidUtf8,
    /// Larger than `limits.max_payload_bytes`.
    TooLarge,
    /// Not JSON, or not valid against its channel's schema (`[[schemas]]`).
    SchemaInvalid,
}

impl DropReason {
    /// Metric label and log wording.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::InvalidUtf8 => "invalid_utf8",
            DropReason::TooLarge => "too_large",
            DropReason::SchemaInvalid => "schema_invalid",
        }
    }
}

impl Hub {
    /// Makes the next position the head. Single writer: the upstream task.
    pub(super) fn advance_head(&self) -> u64 {
        let seq = self.head.load(Ordering::Relaxed) + 1;
        self.head.store(seq, Ordering::Release);
        seq
    }

    /// Appends `entry` to a channel's ring, making sure the channel has an expiry ticket.
    /// Returns how many entries were evicted to make room.
    pub(super) fn append(
        &self,
        channel: &Arc<Channel>,
        state: &mut ChannelState,
        entry: Entry,
    ) -> usize {
        let evicted = state.ring.push(entry);
        if !state.expiry_scheduled {
            if let Some(due) = self.expiry_due(&state.ring) {
                state.expiry_scheduled = true;
                self.expiries.lock().schedule(due, Arc::downgrade(channel));
            }
        }
        evicted
    }

    /// The payload as text, or why it is dropped (the drop log is rate limited per channel).
    /// Checked in this order: size, UTF-8, then the channel's schema, if it has one.
    pub(super) fn check_payload<'p>(
        &self,
        channel: &Channel,
        state: &mut ChannelState,
        payload: &'p [u8],
        received_at: Instant,
    ) -> Result<&'p str, PublishOutcome> {
        let text = if payload.len() > self.limits.max_payload_bytes {
            Err((DropReason::TooLarge, None))
        } else {
            std::str::from_utf8(payload)
                .map_err(|_| (DropReason::InvalidUtf8, None))
                .and_then(|text| match &channel.schema {
                    Some(schema) => match schema.first_violation(text) {
                        Some(violation) => Err((DropReason::SchemaInvalid, Some(violation))),
                        None => Ok(text),
                    },
                    None => Ok(text),
                })
        };
        text.map_err(|(reason, violation)| {
            let log = state
                .last_drop_log
                .is_none_or(|at| received_at.duration_since(at) >= DROP_LOG_INTERVAL);
            if log {
                state.last_drop_log = Some(received_at);
            }
            PublishOutcome::Dropped {
                reason,
                log,
                violation,
            }
        })
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
        let text = match self.check_payload(&channel, &mut state, payload, received_at) {
            Ok(text) => text,
            Err(dropped) => return dropped,
        };
        let seq = self.head.load(Ordering::Relaxed) + 1;
        let event_type = sse::event_type_of(text, &self.event_type_field);
        let frame = sse::WireFrame::event(self.epoch.id(seq), event_type.as_deref(), text);
        let entry = Entry {
            seq,
            kind: EntryKind::Event {
                frame,
                received_at,
                origin: None,
            },
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
                        .filter(|slot| slot.holds(request.generation))
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
                Status::Pending => state.ring.start_at(seq, None),
                Status::Interrupted => {
                    let gap = Entry {
                        seq,
                        kind: EntryKind::Gap {
                            reason: ResetReason::UpstreamInterrupted,
                            position: None,
                        },
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
        self.record_upstream_up(up);
        // The one connection is the one shard; a cluster's upstream reports its own.
        self.set_shards(1, usize::from(up));
    }

    /// Marks the subscribed channels among `names` interrupted (their shard's subscription
    /// dropped, or their slot moved): each gets a gap, or a catch-up from Redis, when it is
    /// subscribed again. The other channels are untouched.
    pub fn interrupt(&self, names: &[Arc<str>]) {
        let map = self.channels.lock();
        for name in names {
            if let Some(slot) = map.get(name) {
                let mut state = slot.channel.state.write();
                if state.status == Status::Subscribed {
                    state.status = Status::Interrupted;
                }
            }
        }
    }

    /// Records whether every subscription the gateway needs is up (readiness, `ssehub_redis_up`)
    /// without touching the channels: a cluster's upstream interrupts them shard by shard.
    pub fn record_upstream_up(&self, up: bool) {
        self.upstream_up.send_replace(up);
        crate::metrics::redis_up(up);
    }

    /// Records how many Redis shards the gateway knows of and how many of their subscription
    /// connections are up (for `/readyz` and the shard gauges).
    pub fn set_shards(&self, known: usize, up: usize) {
        let mut shards = self.shards.lock();
        *shards = (known, up);
        // Set under the lock, so concurrent reports leave the gauges at the stored numbers.
        crate::metrics::redis_shards(known, up);
    }
}
