//! The upstream's side of the shared history (`history.backend = "redis"`).
//!
//! With the redis backend the gateway subscribes to each channel's live broadcast
//! (`functions::live_channel`), whose messages carry the position Redis assigned, and reads the
//! history through the `ssehub` function library on a command connection of its own:
//!
//! - when a channel is first served, its recent history ([`SharedHistory::load`]), so clients
//!   that read on another instance resume here;
//! - when an event does not follow the last one received (the subscription dropped, or Redis
//!   closed it), what was missed ([`SharedHistory::catch_up`]); only what Redis no longer has
//!   becomes a reset (`history_expired`, or `unknown_position` when the channel's state was lost).
//!
//! The library is loaded on every connection: a Redis restarted without persistence has lost it.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;

use super::with_timeout;
use crate::dead_letter::Received;
use crate::functions::{self, LibraryBounds, Loaded};
use crate::hub::{Hub, PublishOutcome, StoredEvent, StoredOutcome, SubscribeRequest, Tail};
use crate::metrics;
use crate::position::{Position, StreamId};
use crate::sse::ResetReason;

/// Most events read from Redis in one call of a catch-up.
const READ_PAGE: usize = 1000;
/// Most times one live event is handed over again after catching up before the channel is
/// reset instead (events keep arriving faster than they are read).
const MAX_CATCH_UPS_PER_EVENT: usize = 3;

/// The command connection to the shared history.
pub(super) struct SharedHistory {
    connection: MultiplexedConnection,
    bounds: LibraryBounds,
    timeout: Duration,
}

impl SharedHistory {
    /// Connects and makes sure the function library is loaded.
    pub(super) async fn connect(
        client: &redis::Client,
        bounds: LibraryBounds,
        timeout: Duration,
    ) -> Result<SharedHistory, String> {
        let connection = with_timeout(
            timeout,
            "connect (history)",
            client.get_multiplexed_async_connection(),
        )
        .await?;
        let mut history = SharedHistory {
            connection,
            bounds,
            timeout,
        };
        let loaded = with_timeout(
            timeout,
            "FUNCTION LOAD",
            functions::load_library(&mut history.connection, &history.bounds),
        )
        .await?;
        if let Loaded::Newer(version) = loaded {
            tracing::info!(
                version,
                ours = functions::LIBRARY_VERSION,
                "a newer ssehub function library is loaded; keeping it"
            );
        }
        Ok(history)
    }

    /// Loads the recent history of newly subscribed channels and marks them subscribed.
    pub(super) async fn load(
        &mut self,
        hub: &Hub,
        requests: &[SubscribeRequest],
    ) -> Result<(), String> {
        for request in requests {
            let reply: Vec<Vec<u8>> = with_timeout(
                self.timeout,
                "FCALL ssehub_tail",
                redis::cmd("FCALL")
                    .arg("ssehub_tail")
                    .arg(1)
                    .arg(&*request.name)
                    .arg(self.bounds.capacity)
                    .query_async(&mut self.connection),
            )
            .await?;
            let Some(tail) = parse_tail(&reply) else {
                metrics::history_read("error");
                return Err(format!("unexpected ssehub_tail reply for {}", request.name));
            };
            metrics::history_read("ok");
            let outcomes = hub.load_history(request, &tail);
            // Not dead-lettered: this is history, dead-lettered when it was received live.
            for ((id, payload), outcome) in tail.events.iter().zip(outcomes) {
                let event = StoredEvent {
                    epoch: &tail.start.epoch,
                    id: *id,
                    prev: None,
                    payload,
                };
                count_outcome(hub, &request.name, &event, outcome, false);
            }
        }
        Ok(())
    }

    /// Makes `requests` live after their (re)subscription: a channel with a position catches up
    /// from Redis, a new one loads its recent history, and both are marked restored.
    pub(super) async fn restore(
        &mut self,
        hub: &Hub,
        requests: &[SubscribeRequest],
    ) -> Result<(), String> {
        let mut fresh = Vec::new();
        for request in requests {
            match hub.stored_position(&request.name) {
                Some(from) => self.catch_up(hub, &request.name, from).await?,
                None => fresh.push(request.clone()),
            }
        }
        self.load(hub, &fresh).await?;
        let names: Vec<Arc<str>> = requests.iter().map(|r| r.name.clone()).collect();
        hub.mark_restored(&names);
        Ok(())
    }

    /// Hands a live message to the hub, first reading from Redis what was missed before it.
    pub(super) async fn deliver(&mut self, hub: &Hub, message: &redis::Msg) -> Result<(), String> {
        metrics::event_received();
        let Some(name) = functions::channel_of_live(message.get_channel_name()) else {
            return Ok(());
        };
        let Some(event) = parse_live(message.get_payload_bytes()) else {
            tracing::warn!(channel = name, "ignored a malformed ssehub broadcast");
            return Ok(());
        };
        for _ in 0..=MAX_CATCH_UPS_PER_EVENT {
            match hub.publish_stored(name, &event) {
                StoredOutcome::Published(outcome) => {
                    count_outcome(hub, name, &event, outcome, true);
                    return Ok(());
                }
                StoredOutcome::Duplicate => return Ok(()),
                StoredOutcome::Behind { from } => self.catch_up(hub, name, from).await?,
            }
        }
        // Still behind: give up on the gap rather than fall further back.
        self.reset_to_current(hub, name, ResetReason::HistoryExpired)
            .await
    }

    /// Reads from Redis the events of `name` after `from` and appends them; what Redis no
    /// longer has becomes a reset.
    pub(super) async fn catch_up(
        &mut self,
        hub: &Hub,
        name: &str,
        mut from: Position,
    ) -> Result<(), String> {
        let pages = self.bounds.capacity / READ_PAGE + 2;
        for _ in 0..pages {
            let last = from.last.map(|id| id.to_string()).unwrap_or_default();
            let reply: Vec<Vec<u8>> = with_timeout(
                self.timeout,
                "FCALL_RO ssehub_read",
                redis::cmd("FCALL_RO")
                    .arg("ssehub_read")
                    .arg(1)
                    .arg(name)
                    .arg(&*from.epoch)
                    .arg(last)
                    .arg(READ_PAGE)
                    .query_async(&mut self.connection),
            )
            .await?;
            let reason = match reply.first().map(Vec::as_slice) {
                Some(b"ok") => None,
                Some(b"history_expired") => Some(ResetReason::HistoryExpired),
                Some(b"unknown_position") => Some(ResetReason::UnknownPosition),
                _ => {
                    metrics::history_read("error");
                    return Err(format!("unexpected ssehub_read reply for {name}"));
                }
            };
            if let Some(reason) = reason {
                metrics::history_read(reason.as_str());
                return self.reset_to_current(hub, name, reason).await;
            }
            metrics::history_read("ok");
            let epoch = text(reply.get(1)).unwrap_or_default();
            let events = reply.get(2..).unwrap_or_default();
            let mut recovered = 0;
            for triple in events.chunks_exact(3) {
                let (Some(id), Some(prev)) = (stream_id(&triple[0]), text(Some(&triple[1]))) else {
                    return Err(format!("unexpected ssehub_read reply for {name}"));
                };
                let event = StoredEvent {
                    epoch,
                    id,
                    prev: StreamId::parse_redis(prev),
                    payload: &triple[2],
                };
                if let StoredOutcome::Published(outcome) = hub.publish_stored(name, &event) {
                    recovered += u64::from(matches!(outcome, PublishOutcome::Appended { .. }));
                    // A drop read again here (the live copy was dropped too) has the same
                    // position, so the dead-letter stream's dedupe keeps one entry.
                    count_outcome(hub, name, &event, outcome, true);
                }
                from = Position {
                    epoch: Arc::from(epoch),
                    last: Some(id),
                };
            }
            metrics::upstream_recovered_events(recovered);
            if events.len() < 3 * READ_PAGE {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Moves `name` to its current position in Redis, with a reset for what lies between.
    async fn reset_to_current(
        &mut self,
        hub: &Hub,
        name: &str,
        reason: ResetReason,
    ) -> Result<(), String> {
        let reply: String = with_timeout(
            self.timeout,
            "FCALL ssehub_position",
            redis::cmd("FCALL")
                .arg("ssehub_position")
                .arg(1)
                .arg(name)
                .query_async(&mut self.connection),
        )
        .await?;
        let position = Position::parse_reply(&reply)
            .ok_or_else(|| format!("unexpected ssehub_position reply for {name}: {reply}"))?;
        tracing::warn!(
            channel = name,
            reason = reason.as_str(),
            "events missed on the subscription are no longer in Redis; readers get a reset"
        );
        hub.append_stored_gap(name, reason, position);
        Ok(())
    }
}

/// Reads a live broadcast: `"<epoch> <id> <prev>\n<payload>"`.
fn parse_live(message: &[u8]) -> Option<StoredEvent<'_>> {
    let newline = message.iter().position(|&b| b == b'\n')?;
    let head = std::str::from_utf8(&message[..newline]).ok()?;
    let mut parts = head.split(' ');
    let (epoch, id, prev) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    // Checks the epoch's spelling.
    Position::parse_reply(epoch)?;
    Some(StoredEvent {
        epoch,
        id: StreamId::parse_redis(id)?,
        prev: if prev.is_empty() {
            None
        } else {
            Some(StreamId::parse_redis(prev)?)
        },
        payload: &message[newline + 1..],
    })
}

/// Reads the reply of `ssehub_tail`: `[epoch, last, start, id1, prev1, payload1, ...]`.
fn parse_tail(reply: &[Vec<u8>]) -> Option<Tail> {
    let epoch = text(reply.first())?;
    let start = text(reply.get(2))?;
    let start = Position::parse_reply(&format!("{epoch} {start}"))?;
    let events = reply
        .get(3..)?
        .chunks_exact(3)
        .map(|triple| Some((stream_id(&triple[0])?, triple[2].clone())))
        .collect::<Option<Vec<_>>>()?;
    Some(Tail { start, events })
}

fn text(bytes: Option<&Vec<u8>>) -> Option<&str> {
    bytes.and_then(|bytes| std::str::from_utf8(bytes).ok())
}

fn stream_id(bytes: &[u8]) -> Option<StreamId> {
    StreamId::parse_redis(std::str::from_utf8(bytes).ok()?)
}

/// Counts what happened to `event` of channel `name`, as the memory backend's delivery does; a
/// drop is dead-lettered when `dead_letter` is set.
fn count_outcome(
    hub: &Hub,
    name: &str,
    event: &StoredEvent<'_>,
    outcome: PublishOutcome,
    dead_letter: bool,
) {
    let received = Received {
        channel: name,
        payload: event.payload,
        stored: Some((event.epoch, event.id)),
    };
    super::count_outcome(hub, outcome, &received, dead_letter);
}
