//! Stream positions (ids) of the redis backend.
//!
//! With `history.backend = "redis"` an event's position is assigned in Redis by the `ssehub`
//! function library: the channel's *epoch* (a base-36 timestamp in microseconds, changed whenever
//! the channel's state in Redis was lost) and the event's stream id (`<ms>-<seq>`). This module
//! owns those two types and the SSE ids made of them:
//!
//! - one channel: `<epoch>.<ms in base 36>` with `.<seq in base 36>` added when the sequence is
//!   not 0, or `<epoch>.` before the channel's first event;
//! - several channels: their positions, in the order the stream names its channels, joined by
//!   `,`: one id is a complete position of the stream on any instance.
//!
//! Parsing is strict: anything else is not a position, and the stream resets instead of guessing.

use std::cmp::Ordering;
use std::fmt::{self, Write as _};
use std::sync::Arc;

/// Separates the positions of a stream's channels in one id.
const CHANNEL_SEPARATOR: char = ',';
/// Longest epoch accepted (base 36 of a microsecond time takes 10 or 11 digits).
const MAX_EPOCH_LEN: usize = 13;

/// A Redis stream id (`<milliseconds>-<sequence>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId {
    /// Milliseconds part.
    pub ms: u64,
    /// Sequence within the millisecond.
    pub seq: u64,
}

impl StreamId {
    /// Parses Redis's own spelling, `<ms>-<seq>`.
    pub fn parse_redis(text: &str) -> Option<StreamId> {
        let (ms, seq) = text.split_once('-')?;
        Some(StreamId {
            ms: parse_decimal(ms)?,
            seq: parse_decimal(seq)?,
        })
    }
}

impl fmt::Display for StreamId {
    /// Redis's own spelling, for commands.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Where a channel's history stands: its epoch and the last event (`None` before the first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    /// The channel's epoch in Redis.
    pub epoch: Arc<str>,
    /// The last event at this position; `None` at the start of the epoch.
    pub last: Option<StreamId>,
}

impl Position {
    /// Reads the `"<epoch> <id>"` reply of `ssehub_position` / `ssehub_publish` (the id may be
    /// empty: no event yet).
    pub fn parse_reply(reply: &str) -> Option<Position> {
        let (epoch, last) = reply.split_once(' ').unwrap_or((reply, ""));
        Some(Position {
            epoch: Arc::from(valid_epoch(epoch)?),
            last: parse_optional_id(last)?,
        })
    }

    /// Orders two epochs of one channel by age (they are timestamps): `Less` when `a` is older.
    pub fn compare_epochs(a: &str, b: &str) -> Ordering {
        a.len().cmp(&b.len()).then_with(|| a.cmp(b))
    }

    /// Writes this position as one channel's part of an SSE id.
    fn write_id(&self, out: &mut String) {
        out.push_str(&self.epoch);
        out.push('.');
        if let Some(last) = self.last {
            push_base36(out, last.ms);
            if last.seq != 0 {
                out.push('.');
                push_base36(out, last.seq);
            }
        }
    }

    /// Parses one channel's part of an SSE id.
    fn parse_id(text: &str) -> Option<Position> {
        let (epoch, rest) = text.split_once('.')?;
        let last = if rest.is_empty() {
            None
        } else {
            let (ms, seq) = rest.split_once('.').unwrap_or((rest, "0"));
            Some(StreamId {
                ms: parse_base36(ms)?,
                seq: parse_base36(seq)?,
            })
        };
        Some(Position {
            epoch: Arc::from(valid_epoch(epoch)?),
            last,
        })
    }
}

/// The SSE id of a one-channel stream at `epoch` and the event `stream_id` (Redis spelling), as
/// `POST /publish` answers it. Falls back to the raw parts if Redis sent something unexpected.
pub fn single_channel_id(epoch: &str, stream_id: &str) -> String {
    let position = valid_epoch(epoch).and_then(|epoch| {
        Some(Position {
            epoch: Arc::from(epoch),
            last: parse_optional_id(stream_id)?,
        })
    });
    match position {
        Some(position) => encode_id(std::slice::from_ref(&position)),
        None => format!("{epoch}.{stream_id}"),
    }
}

/// The SSE id of a stream whose channels stand at `positions` (in the stream's channel order).
pub fn encode_id(positions: &[Position]) -> String {
    let mut out = String::with_capacity(positions.len() * 24);
    for (index, position) in positions.iter().enumerate() {
        if index > 0 {
            out.push(CHANNEL_SEPARATOR);
        }
        position.write_id(&mut out);
    }
    out
}

/// Parses a client's resume id for a stream over `channels` channels; `None` when it is not
/// exactly that many well-formed positions.
pub fn parse_id(id: &str, channels: usize) -> Option<Vec<Position>> {
    let positions: Vec<Position> = id
        .split(CHANNEL_SEPARATOR)
        .take(channels + 1)
        .map(Position::parse_id)
        .collect::<Option<_>>()?;
    (positions.len() == channels).then_some(positions)
}

fn valid_epoch(epoch: &str) -> Option<&str> {
    let valid = !epoch.is_empty()
        && epoch.len() <= MAX_EPOCH_LEN
        && epoch
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
    valid.then_some(epoch)
}

fn parse_optional_id(text: &str) -> Option<Option<StreamId>> {
    if text.is_empty() {
        Some(None)
    } else {
        StreamId::parse_redis(text).map(Some)
    }
}

fn parse_decimal(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn parse_base36(text: &str) -> Option<u64> {
    // Digits only (`from_str_radix` would also take a sign), and no leading zero, so every
    // position has exactly one spelling.
    let canonical = !text.is_empty()
        && (text == "0" || !text.starts_with('0'))
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
    if !canonical {
        return None;
    }
    u64::from_str_radix(text, 36).ok()
}

fn push_base36(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 13];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize];
        n /= 36;
        if n == 0 {
            break;
        }
    }
    for &digit in &digits[start..] {
        let _ = out.write_char(char::from(digit));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(epoch: &str, last: Option<(u64, u64)>) -> Position {
        Position {
            epoch: Arc::from(epoch),
            last: last.map(|(ms, seq)| StreamId { ms, seq }),
        }
    }

    #[test]
    fn ids_round_trip_for_one_and_several_channels() {
        let positions = vec![
            position("m2kx7b9q4a", Some((1_764_374_400_123, 0))),
            position("m2kx7b9q4b", None),
            position("m2kx7b9q4c", Some((1_764_374_400_123, 17))),
        ];
        let one = encode_id(&positions[..1]);
        assert_eq!(one, "m2kx7b9q4a.mijiyo3f");
        assert_eq!(parse_id(&one, 1), Some(positions[..1].to_vec()));
        let three = encode_id(&positions);
        assert_eq!(parse_id(&three, 3), Some(positions.clone()));
        assert_eq!(parse_id(&three, 2), None);
        assert_eq!(parse_id(&three, 4), None);
    }

    #[test]
    fn anything_but_a_canonical_position_is_refused() {
        for id in [
            "",
            ".",
            "abc",
            "ABC.1",
            "abc.-1",
            "abc.01",
            "abc.1.",
            "abc.1.0x",
            "abc.1.2.3",
            "abcdefghijklmn.1",
            "abc.zzzzzzzzzzzzzzzz",
            "abc.1,",
            "0123456789abcdef-12",
        ] {
            assert_eq!(parse_id(id, 1), None, "{id:?}");
        }
    }

    #[test]
    fn replies_and_single_channel_ids() {
        assert_eq!(
            Position::parse_reply("m2kx7b9q4a 1764374400123-0"),
            Some(position("m2kx7b9q4a", Some((1_764_374_400_123, 0))))
        );
        assert_eq!(
            Position::parse_reply("m2kx7b9q4a "),
            Some(position("m2kx7b9q4a", None))
        );
        assert_eq!(Position::parse_reply("m2kx7b9q4a x-1"), None);
        assert_eq!(
            single_channel_id("m2kx7b9q4a", "1764374400123-5"),
            "m2kx7b9q4a.mijiyo3f.5"
        );
    }

    #[test]
    fn epochs_order_by_time() {
        assert_eq!(Position::compare_epochs("zz", "100"), Ordering::Less);
        assert_eq!(Position::compare_epochs("a1", "a0"), Ordering::Greater);
    }

    #[test]
    fn id_lengths_stated_in_the_readme() {
        // Epochs and ids of today's clock (2026: microseconds in 10 base-36 digits,
        // milliseconds in 8), each event the first of its millisecond.
        let now_ms = 1_795_000_000_000u64;
        let channel = |n: u64| {
            let mut epoch = String::new();
            push_base36(&mut epoch, (now_ms - 86_400_000 * n) * 1000 + n);
            position(&epoch, Some((now_ms - n, 0)))
        };
        assert_eq!(encode_id(&[channel(0)]).len(), 19);
        let sixteen: Vec<Position> = (0..16).map(channel).collect();
        assert_eq!(encode_id(&sixteen).len(), 16 * 19 + 15);
    }
}
