//! Reading: what a stream gets from its channels, one bounded piece at a time.
//!
//! A stream reads straight from the rings at its cursor; [`Hub::read`] merges its channels'
//! entries in position order and cuts them to one piece (at most [`PIECE_MAX_ENTRIES`] entries
//! and about [`PIECE_MAX_BYTES`] of frames), so a stream far behind holds one piece at a time
//! rather than the whole replay.

use super::ring::{Entry, Located};
use super::{Hub, Lease};
use crate::position::Position;

/// Most entries one [`Hub::read`] returns.
pub(crate) const PIECE_MAX_ENTRIES: usize = 64;
/// Encoded bytes after which a [`Hub::read`] takes no further entry. With the entry that crosses
/// it, a piece holds less than this plus one `limits.max_payload_bytes` frame.
pub(crate) const PIECE_MAX_BYTES: usize = 64 * 1024;

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

/// Channels a stream has given up on up to a position (their history fell off and the reset
/// for them is due at `until`): reads leave them out and stop at `until`.
#[derive(Debug)]
pub(crate) struct Skipped {
    /// Indexes of the channels in the lease.
    pub(crate) channels: Vec<usize>,
    /// The position up to which they are skipped.
    pub(crate) until: u64,
}

impl Hub {
    /// Reads, for a stream at `cursor`, the next piece of what its channels received: the
    /// entries after the cursor in position order, at most [`PIECE_MAX_ENTRIES`] of them and
    /// [`PIECE_MAX_BYTES`] of frames (but at least one), so that a stream holds one piece at a
    /// time however far behind it is. The piece covers every entry up to its `limit`: a stream
    /// that moves its cursor there neither skips nor repeats an entry. Channels in `skipped`
    /// are left out, and the piece does not go past `skipped.until`.
    ///
    /// `floors` (redis backend, one per channel) start some channels later than the cursor: a
    /// client resuming on this instance may have read its channels up to different positions.
    pub(crate) fn read(
        &self,
        lease: &Lease,
        cursor: u64,
        skipped: Option<&Skipped>,
        floors: Option<&[u64]>,
    ) -> Batch {
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
            let from = floors.map_or(cursor, |floors| floors[index].max(cursor));
            let Ok(entries) = state.ring.entries_after(from, limit) else {
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
}

impl Hub {
    /// Finds a client's position in Redis in channel `index` of the lease (redis backend).
    pub(crate) fn locate(&self, lease: &Lease, index: usize, wanted: &Position) -> Located {
        lease.channels[index].state.read().ring.locate(wanted)
    }

    /// Channel `index`'s position in Redis once everything up to `seq` is read, or its current
    /// one when `seq` is older than its ring (redis backend).
    pub(crate) fn position_at(&self, lease: &Lease, index: usize, seq: u64) -> Option<Position> {
        let state = lease.channels[index].state.read();
        state
            .ring
            .position_at(seq)
            .or(state.ring.current_position())
            .cloned()
    }
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
    use tokio::time::Instant;

    use super::*;
    use crate::hub::testing::{default_settings, hub, publish, subscribed, subscribed_all};
    use crate::hub::{EntryKind, HubSettings};

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
            let piece = hub.read(lease, cursor, None, None);
            assert!(piece.fell_off.is_empty());
            assert!(piece.limit > cursor, "a piece always makes progress");
            pieces.push(piece.items.len());
            for (channel, entry) in &piece.items {
                assert!(entry.seq > cursor && entry.seq <= piece.limit);
                entries.push((
                    *channel,
                    entry.seq,
                    matches!(entry.kind, EntryKind::Gap { .. }),
                ));
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
        let piece = hub.read(&lease, start, None, None);
        assert_eq!(piece.items.len(), PIECE_MAX_ENTRIES);
        assert_eq!(piece.limit, start + PIECE_MAX_ENTRIES as u64);

        // Large events: the byte bound, crossed by the last entry taken.
        let large = "x".repeat(20 * 1024);
        let from = hub.head();
        for _ in 0..10 {
            hub.publish("orders", large.as_bytes(), Instant::now());
        }
        let piece = hub.read(&lease, from, None, None);
        let bytes: usize = piece.items.iter().map(|(_, e)| e.kind.byte_len()).sum();
        assert_eq!(piece.items.len(), 4, "{bytes} bytes");
        assert!(bytes >= PIECE_MAX_BYTES && bytes < PIECE_MAX_BYTES + large.len() + 100);
        // A single entry larger than the bound is still a piece of one.
        let huge = "y".repeat(100 * 1024);
        let (hub, mut requests) = Hub::new(HubSettings {
            max_payload_bytes: 200 * 1024,
            ..default_settings()
        });
        let lease = subscribed(&hub, &mut requests, "orders");
        let from = hub.head();
        hub.publish("orders", huge.as_bytes(), Instant::now());
        hub.publish("orders", huge.as_bytes(), Instant::now());
        let piece = hub.read(&lease, from, None, None);
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
                let piece = hub.read(&lease, cursor, None, None);
                let gaps: Vec<usize> = piece
                    .items
                    .iter()
                    .filter(|(_, e)| matches!(e.kind, EntryKind::Gap { .. }))
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
        let (hub, mut requests) = Hub::new(HubSettings {
            history_capacity: 100,
            ..default_settings()
        });
        let lease = subscribed_all(&hub, &mut requests, &["a", "b"]);
        let start = hub.head();
        for _ in 0..100 {
            publish(&hub, "a");
            publish(&hub, "b");
            publish(&hub, "a");
        }
        let piece = hub.read(&lease, start, None, None);
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
            let piece = hub.read(&lease, cursor, Some(&skipped), None);
            assert!(piece.fell_off.is_empty());
            assert!(piece.items.iter().all(|(channel, _)| *channel == 1));
            b_entries += piece.items.len();
            cursor = piece.limit;
        }
        assert_eq!((b_entries, cursor), (100, hub.head()));
        // Read from a position still held, a is complete again.
        let piece = hub.read(&lease, hub.head() - 1, None, None);
        assert!(piece.fell_off.is_empty());
        assert_eq!(piece.items.len(), 1);
    }
}
