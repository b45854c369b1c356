//! The per-channel ring: the live fan-out buffer and the resumption history at once.
//!
//! A ring holds the most recent entries of one channel in sequence order, bounded by a count and
//! an age. It remembers the highest sequence it can no longer vouch for (`complete_since`), so a
//! reader whose cursor is older learns that it fell off instead of silently skipping events.
//!
//! With the redis backend every entry also carries its position in Redis (see `position`), and
//! the ring knows the position it is complete from, so a client's resume id, assigned in Redis,
//! can be found in it ([`Ring::locate`]).

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::position::Position;
use crate::sse::{ResetReason, WireFrame};

/// One position in a channel's history.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    /// Global sequence number: orders entries across all channels of this gateway.
    pub(crate) seq: u64,
    /// What happened at this position.
    pub(crate) kind: EntryKind,
    /// When the entry was appended, for age-based eviction.
    pub(crate) appended_at: Instant,
}

/// What a ring entry stands for.
#[derive(Clone, Debug)]
pub(crate) enum EntryKind {
    /// A published message, already SSE-encoded with its id; shared by every reader.
    Event {
        /// The complete SSE frame, inside its HTTP/1.1 chunk.
        frame: WireFrame,
        /// When the upstream read the message from Redis (for latency accounting).
        received_at: Instant,
        /// Where Redis put the event (redis backend only).
        origin: Option<Arc<Origin>>,
    },
    /// Messages may be lost just before this position: the stream sends a reset.
    Gap {
        /// Why (the reset's reason).
        reason: ResetReason,
        /// The channel's position in Redis after the gap (redis backend only).
        position: Option<Position>,
    },
}

/// An event's place in the shared history (redis backend).
#[derive(Debug)]
pub(crate) struct Origin {
    /// The channel's position once this event is delivered.
    pub(crate) position: Position,
    /// Length of the event's own id (the position of a one-channel stream), which the frame
    /// starts with: streams over several channels send the frame after it, behind their own.
    pub(crate) id_len: usize,
}

impl EntryKind {
    pub(crate) fn byte_len(&self) -> usize {
        match self {
            EntryKind::Event { frame, .. } => frame.http1_chunk().len(),
            EntryKind::Gap { .. } => 0,
        }
    }

    /// The channel's position in Redis once this entry is read (redis backend).
    pub(crate) fn position(&self) -> Option<&Position> {
        match self {
            EntryKind::Event { origin, .. } => origin.as_ref().map(|o| &o.position),
            EntryKind::Gap { position, .. } => position.as_ref(),
        }
    }
}

/// Where a client's position (redis backend) is in a ring.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Located {
    /// At this sequence: the client has read everything up to it.
    At(u64),
    /// Older than what the ring holds: events after it were evicted.
    Expired,
    /// Not in this ring's history, and not ahead of it: from history lost in Redis.
    Unknown,
    /// Later than what the ring has received so far: it may still arrive.
    Ahead,
}

/// A reader's cursor is older than what the ring can still prove complete.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct FellOff;

/// Bounded history of one channel.
#[derive(Debug)]
pub(crate) struct Ring {
    entries: VecDeque<Entry>,
    /// The ring holds every entry of this channel with a sequence greater than this. It moves
    /// forward when an entry is evicted, and starts at the position where the subscription was
    /// confirmed (nothing before that was seen).
    complete_since: u64,
    /// The position in Redis at `complete_since` (redis backend).
    start_position: Option<Position>,
    /// Sum of the encoded frame sizes, for memory accounting.
    bytes: usize,
    capacity: usize,
    max_age: Duration,
}

impl Ring {
    /// An empty ring that is complete from position `complete_since` on.
    pub(crate) fn new(complete_since: u64, capacity: usize, max_age: Duration) -> Self {
        Ring {
            entries: VecDeque::new(),
            complete_since,
            start_position: None,
            bytes: 0,
            capacity: capacity.max(1),
            max_age,
        }
    }

    /// Appends an entry (its sequence must exceed every entry's so far) and evicts by count.
    /// Returns how many entries were evicted.
    pub(crate) fn push(&mut self, entry: Entry) -> usize {
        debug_assert!(self.entries.back().is_none_or(|last| last.seq < entry.seq));
        self.bytes += entry.kind.byte_len();
        self.entries.push_back(entry);
        let mut evicted = 0;
        while self.entries.len() > self.capacity {
            self.evict_oldest();
            evicted += 1;
        }
        evicted
    }

    /// Evicts entries appended more than `max_age` before `now`. Returns how many.
    pub(crate) fn evict_expired(&mut self, now: Instant) -> usize {
        let mut evicted = 0;
        while self
            .entries
            .front()
            .is_some_and(|oldest| now.saturating_duration_since(oldest.appended_at) > self.max_age)
        {
            self.evict_oldest();
            evicted += 1;
        }
        evicted
    }

    fn evict_oldest(&mut self) {
        if let Some(oldest) = self.entries.pop_front() {
            self.bytes -= oldest.kind.byte_len();
            self.complete_since = oldest.seq;
            if let Some(position) = oldest.kind.position() {
                self.start_position = Some(position.clone());
            }
        }
    }

    /// Restarts the history at `seq`: used when a subscription is first confirmed. With the
    /// redis backend, `position` is where the channel stood in Redis at that point.
    pub(crate) fn start_at(&mut self, seq: u64, position: Option<Position>) {
        self.entries.clear();
        self.bytes = 0;
        self.complete_since = seq;
        self.start_position = position;
    }

    /// The channel's position in Redis after every entry held (redis backend).
    pub(crate) fn current_position(&self) -> Option<&Position> {
        self.entries
            .iter()
            .rev()
            .find_map(|entry| entry.kind.position())
            .or(self.start_position.as_ref())
    }

    /// The channel's position in Redis once every entry up to `seq` is read (redis backend);
    /// `None` when `seq` is older than the ring.
    pub(crate) fn position_at(&self, seq: u64) -> Option<&Position> {
        if seq < self.complete_since {
            return None;
        }
        let end = self.entries.partition_point(|e| e.seq <= seq);
        self.entries
            .range(..end)
            .rev()
            .find_map(|entry| entry.kind.position())
            .or(self.start_position.as_ref())
    }

    /// Finds a client's position in Redis in this ring (redis backend).
    pub(crate) fn locate(&self, wanted: &Position) -> Located {
        let Some(current) = self.current_position() else {
            return Located::Unknown;
        };
        // A position from an epoch Redis has lost is unknown even where this ring still holds
        // what followed it: every instance answers a resume id the same way.
        match Position::compare_epochs(&wanted.epoch, &current.epoch) {
            Ordering::Greater => return Located::Ahead,
            Ordering::Less => return Located::Unknown,
            Ordering::Equal if wanted.last > current.last => return Located::Ahead,
            Ordering::Equal => {}
        }
        if self.start_position.as_ref() == Some(wanted) {
            return Located::At(self.complete_since);
        }
        // Recent positions are the common case: search from the newest entry.
        if let Some(entry) = self
            .entries
            .iter()
            .rev()
            .find(|entry| entry.kind.position() == Some(wanted))
        {
            return Located::At(entry.seq);
        }
        let before_start = self
            .start_position
            .as_ref()
            .is_some_and(|start| start.epoch == wanted.epoch && wanted.last < start.last);
        if before_start {
            Located::Expired
        } else {
            Located::Unknown
        }
    }

    /// The entries with `cursor < seq <= limit`, oldest first, or `FellOff` when entries after
    /// `cursor` may have been evicted already. An iterator, so a bounded read stops early.
    pub(crate) fn entries_after(
        &self,
        cursor: u64,
        limit: u64,
    ) -> Result<impl Iterator<Item = &Entry>, FellOff> {
        if cursor < self.complete_since {
            return Err(FellOff);
        }
        let start = self.entries.partition_point(|e| e.seq <= cursor);
        Ok(self
            .entries
            .range(start..)
            .take_while(move |e| e.seq <= limit))
    }

    /// When the oldest entry held was appended.
    pub(crate) fn oldest_appended_at(&self) -> Option<Instant> {
        self.entries.front().map(|oldest| oldest.appended_at)
    }

    /// Number of entries held.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Bytes of encoded frames held.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, at: Instant) -> Entry {
        Entry {
            seq,
            kind: EntryKind::Event {
                frame: WireFrame::new(format!("frame {seq}").as_bytes()),
                received_at: at,
                origin: None,
            },
            appended_at: at,
        }
    }

    fn seqs(ring: &Ring, cursor: u64, limit: u64) -> Result<Vec<u64>, FellOff> {
        Ok(ring.entries_after(cursor, limit)?.map(|e| e.seq).collect())
    }

    #[test]
    fn reads_entries_after_cursor_up_to_limit() {
        let now = Instant::now();
        let mut ring = Ring::new(10, 100, Duration::from_secs(60));
        for seq in [11, 13, 17, 20] {
            ring.push(event(seq, now));
        }
        assert_eq!(seqs(&ring, 10, 100), Ok(vec![11, 13, 17, 20]));
        assert_eq!(seqs(&ring, 12, 17), Ok(vec![13, 17]));
        assert_eq!(seqs(&ring, 20, 100), Ok(vec![]));
        // A cursor between entries of this channel is fine: positions are global.
        assert_eq!(seqs(&ring, 15, 100), Ok(vec![17, 20]));
    }

    #[test]
    fn cursor_before_subscription_start_falls_off() {
        let ring = Ring::new(10, 100, Duration::from_secs(60));
        assert_eq!(seqs(&ring, 9, 100), Err(FellOff));
        assert_eq!(seqs(&ring, 10, 100), Ok(vec![]));
    }

    #[test]
    fn evicts_by_count_and_moves_completeness_forward() {
        let now = Instant::now();
        let mut ring = Ring::new(0, 3, Duration::from_secs(60));
        let evicted: usize = (1..=5).map(|seq| ring.push(event(seq, now))).sum();
        assert_eq!(evicted, 2);
        assert_eq!(ring.len(), 3);
        assert_eq!(seqs(&ring, 2, 100), Ok(vec![3, 4, 5]));
        assert_eq!(seqs(&ring, 1, 100), Err(FellOff));
        let held = WireFrame::new(b"frame 3").http1_chunk().len();
        assert_eq!(ring.bytes(), held * 3);
    }

    #[test]
    fn evicts_by_age() {
        let start = Instant::now();
        let mut ring = Ring::new(0, 100, Duration::from_secs(5));
        ring.push(event(1, start));
        ring.push(event(2, start + Duration::from_secs(3)));
        assert_eq!(ring.evict_expired(start + Duration::from_secs(5)), 0);
        assert_eq!(ring.evict_expired(start + Duration::from_secs(6)), 1);
        assert_eq!(seqs(&ring, 1, 100), Ok(vec![2]));
        assert_eq!(seqs(&ring, 0, 100), Err(FellOff));
        assert_eq!(ring.evict_expired(start + Duration::from_secs(9)), 1);
        assert_eq!(ring.len(), 0);
        assert_eq!(ring.bytes(), 0);
        assert_eq!(seqs(&ring, 2, 100), Ok(vec![]));
    }

    #[test]
    fn gap_entries_are_read_in_order() -> Result<(), &'static str> {
        let now = Instant::now();
        let mut ring = Ring::new(0, 10, Duration::from_secs(60));
        ring.push(event(1, now));
        ring.push(Entry {
            seq: 2,
            kind: EntryKind::Gap {
                reason: ResetReason::UpstreamInterrupted,
                position: None,
            },
            appended_at: now,
        });
        ring.push(event(3, now));
        let out: Vec<&Entry> = ring.entries_after(0, 3).map_err(|_| "fell off")?.collect();
        assert!(matches!(out[1].kind, EntryKind::Gap { .. }));
        assert_eq!(out.len(), 3);
        Ok(())
    }

    fn stored(epoch: &str, ms: u64, at: Instant) -> Entry {
        let position = Position {
            epoch: Arc::from(epoch),
            last: Some(crate::position::StreamId { ms, seq: 0 }),
        };
        Entry {
            seq: ms,
            kind: EntryKind::Event {
                frame: WireFrame::new(b"frame"),
                received_at: at,
                origin: Some(Arc::new(Origin {
                    position,
                    id_len: 2,
                })),
            },
            appended_at: at,
        }
    }

    fn at(epoch: &str, ms: Option<u64>) -> Position {
        Position {
            epoch: Arc::from(epoch),
            last: ms.map(|ms| crate::position::StreamId { ms, seq: 0 }),
        }
    }

    #[test]
    fn positions_in_redis_are_located_in_the_ring() {
        let now = Instant::now();
        let mut ring = Ring::new(0, 3, Duration::from_secs(60));
        ring.start_at(10, Some(at("e1", Some(10))));
        for ms in 11..=14 {
            ring.push(stored("e1", ms, now));
        }
        // Holds 12..=14: complete from 11 on.
        assert_eq!(ring.locate(&at("e1", Some(11))), Located::At(11));
        assert_eq!(ring.locate(&at("e1", Some(13))), Located::At(13));
        assert_eq!(ring.locate(&at("e1", Some(14))), Located::At(14));
        assert_eq!(ring.locate(&at("e1", Some(10))), Located::Expired);
        assert_eq!(ring.locate(&at("e1", None)), Located::Expired);
        assert_eq!(ring.locate(&at("e1", Some(15))), Located::Ahead);
        assert_eq!(ring.locate(&at("e2", Some(1))), Located::Ahead);
        assert_eq!(ring.locate(&at("e0", Some(13))), Located::Unknown);
        assert_eq!(ring.position_at(13), Some(&at("e1", Some(13))));
        assert_eq!(ring.position_at(10), None);
        // A newer epoch makes every position of the old one unknown, even those still held.
        ring.push(stored("e2", 20, now));
        assert_eq!(ring.locate(&at("e1", Some(14))), Located::Unknown);
        assert_eq!(ring.locate(&at("e2", Some(20))), Located::At(20));
    }
}
