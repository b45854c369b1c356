//! The cluster side of `redis.mode = "cluster"`: which primary owns which hash slot.
//!
//! The slot map is read with `CLUSTER SLOTS` from the first node that answers: the nodes of
//! the last map first (they are the cluster as it is now), then the configured seeds (the
//! whole last map may be gone after a long outage). The upstream asks again whenever a shard's
//! connection drops or the server moves a subscription away (`sunsubscribe`), and now and then.

use std::time::Duration;

use super::{NodeAddress, Topology};

/// Hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The slot of `key`, as Redis computes it: CRC16 (XMODEM) of the key's hash tag (the first
/// non-empty `{...}`) or of the whole key, modulo [`SLOTS`].
pub fn slot_of(key: &[u8]) -> u16 {
    let hashed = hash_tag(key).unwrap_or(key);
    crc16(hashed) % SLOTS
}

fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|&b| b == b'{')?;
    let close = key[open + 1..].iter().position(|&b| b == b'}')?;
    (close > 0).then(|| &key[open + 1..open + 1 + close])
}

/// CRC16-CCITT (XMODEM), the checksum Redis Cluster hashes keys with.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Which primary owns each slot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotMap {
    /// `(first slot, last slot, primary)`, sorted by first slot.
    ranges: Vec<(u16, u16, NodeAddress)>,
}

impl SlotMap {
    /// The primary that owns `slot`, if any does.
    pub fn owner(&self, slot: u16) -> Option<&NodeAddress> {
        let index = self.ranges.partition_point(|(first, _, _)| *first <= slot);
        let (first, last, primary) = self.ranges.get(index.checked_sub(1)?)?;
        (*first <= slot && slot <= *last).then_some(primary)
    }

    /// Every primary owning at least one slot, each once.
    pub fn primaries(&self) -> Vec<NodeAddress> {
        let mut primaries: Vec<NodeAddress> =
            self.ranges.iter().map(|(_, _, p)| p.clone()).collect();
        primaries.sort();
        primaries.dedup();
        primaries
    }

    /// Reads a `CLUSTER SLOTS` reply: `[[first, last, [host, port, id, ...], replicas...], ...]`.
    fn parse(reply: &redis::Value, default_host: &str) -> Option<SlotMap> {
        let redis::Value::Array(ranges) = reply else {
            return None;
        };
        let mut map = SlotMap::default();
        for range in ranges {
            let redis::Value::Array(fields) = range else {
                return None;
            };
            let (first, last) = (integer(fields.first()?)?, integer(fields.get(1)?)?);
            let redis::Value::Array(primary) = fields.get(2)? else {
                return None;
            };
            let host = match primary.first()? {
                redis::Value::BulkString(host) => String::from_utf8(host.clone()).ok()?,
                _ => return None,
            };
            // An empty host means "the node you asked" (`cluster-preferred-endpoint-type`).
            let host = if host.is_empty() || host == "?" {
                default_host.to_string()
            } else {
                host
            };
            let port = u16::try_from(integer(primary.get(1)?)?).ok()?;
            map.ranges.push((
                u16::try_from(first).ok()?,
                u16::try_from(last).ok()?,
                (host, port),
            ));
        }
        map.ranges.sort();
        Some(map)
    }
}

fn integer(value: &redis::Value) -> Option<i64> {
    match value {
        redis::Value::Int(n) => Some(*n),
        _ => None,
    }
}

impl Topology {
    /// The cluster's slot map from the first node that answers: `known` first, then the seeds.
    pub async fn slot_map(&self, known: &[NodeAddress]) -> Result<SlotMap, String> {
        let mut failures = Vec::new();
        let seeds = self.seeds.iter().filter_map(|seed| seed.address());
        let candidates: Vec<NodeAddress> = known.iter().cloned().chain(seeds).collect();
        for (host, port) in candidates {
            match self.ask_slots(&host, port).await {
                Ok(map) if !map.ranges.is_empty() => return Ok(map),
                Ok(_) => failures.push(format!("{host}:{port}: no slots assigned")),
                Err(e) => failures.push(format!("{host}:{port}: {e}")),
            }
        }
        Err(format!(
            "no cluster node answered CLUSTER SLOTS: {}",
            failures.join("; ")
        ))
    }

    async fn ask_slots(&self, host: &str, port: u16) -> Result<SlotMap, String> {
        let client = self.connector.client_at(host, port)?;
        let ask = async {
            let mut connection = client.get_multiplexed_async_connection().await?;
            redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<redis::Value>(&mut connection)
                .await
        };
        let timeout: Duration = self.connect_timeout;
        match tokio::time::timeout(timeout, ask).await {
            Ok(Ok(reply)) => {
                SlotMap::parse(&reply, host).ok_or_else(|| "unexpected CLUSTER SLOTS reply".into())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(slot_of(b"123456789"), 0x31C3 % SLOTS);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
        assert_eq!(slot_of(b"ssehub:{orders}:live"), slot_of(b"orders"));
    }

    #[test]
    fn owners_are_found_by_range() {
        let node = |port| ("127.0.0.1".to_string(), port);
        let map = SlotMap {
            ranges: vec![
                (0, 5460, node(1)),
                (5461, 10922, node(2)),
                (10923, 16383, node(3)),
            ],
        };
        assert_eq!(map.owner(0), Some(&node(1)));
        assert_eq!(map.owner(5461), Some(&node(2)));
        assert_eq!(map.owner(16383), Some(&node(3)));
        let gap = SlotMap {
            ranges: vec![(0, 10, node(1)), (20, 30, node(2))],
        };
        assert_eq!(gap.owner(15), None);
        assert_eq!(map.primaries().len(), 3);
    }
}
