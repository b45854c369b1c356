//! The `ssehub` Redis Function library against a real redis-server: ids assigned where the
//! history is stored, idempotent publishing, trimming and lost history told apart, keys kept in
//! the channel's own hash slot, and a newer library never replaced by an older instance.

mod support;

use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use ssehub::functions::{load_library, Broadcast, LibraryBounds, Loaded, LIBRARY_VERSION};
use support::*;
use tokio_stream::StreamExt;

const BOUNDS: LibraryBounds = LibraryBounds {
    capacity: 5,
    max_age_ms: 300_000,
    key_ttl_ms: 86_400_000,
    idempotency_ms: 300_000,
    max_payload_bytes: 1024,
    broadcast: Broadcast::Publish,
};

async fn with_library(redis: &TestRedis) -> TestResult<MultiplexedConnection> {
    let mut connection = redis.connection().await?;
    assert_eq!(load_library(&mut connection, &BOUNDS).await?, Loaded::Ours);
    Ok(connection)
}

/// `FCALL ssehub_publish`; returns `(epoch, id)`.
async fn publish(
    connection: &mut MultiplexedConnection,
    channel: &str,
    payload: &str,
    key: Option<&str>,
) -> TestResult<(String, String)> {
    let mut call = redis::cmd("FCALL");
    call.arg("ssehub_publish").arg(1).arg(channel).arg(payload);
    if let Some(key) = key {
        call.arg(key);
    }
    let position: String = call.query_async(connection).await?;
    let (epoch, id) = position.split_once(' ').ok_or("position shape")?;
    Ok((epoch.to_string(), id.to_string()))
}

/// `FCALL_RO ssehub_read`; returns the outcome, the epoch and `(id, prev, payload)` triples.
async fn read(
    connection: &mut MultiplexedConnection,
    channel: &str,
    epoch: &str,
    after: &str,
) -> TestResult<(String, String, Vec<(String, String, String)>)> {
    let reply: Vec<String> = redis::cmd("FCALL_RO")
        .arg("ssehub_read")
        .arg(1)
        .arg(channel)
        .arg(epoch)
        .arg(after)
        .arg(100)
        .query_async(connection)
        .await?;
    let (outcome, rest) = reply.split_first().ok_or("empty reply")?;
    let (epoch, entries) = rest.split_first().ok_or("no epoch")?;
    let events = entries
        .chunks(3)
        .map(|e| (e[0].clone(), e[1].clone(), e[2].clone()))
        .collect();
    Ok((outcome.clone(), epoch.clone(), events))
}

fn stream_id(id: &str) -> TestResult<(u64, u64)> {
    let (ms, seq) = id.split_once('-').ok_or("id shape")?;
    Ok((ms.parse()?, seq.parse()?))
}

#[tokio::test]
async fn ids_grow_and_each_event_names_the_one_before() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut connection = with_library(&redis).await?;
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(publish(&mut connection, "orders", &format!("e{n}"), None).await?);
    }
    let epoch = ids[0].0.clone();
    assert!(ids.iter().all(|(e, _)| *e == epoch), "{ids:?}");
    for pair in ids.windows(2) {
        assert!(stream_id(&pair[0].1)? < stream_id(&pair[1].1)?, "{pair:?}");
    }
    let (outcome, _, events) = read(&mut connection, "orders", &epoch, "").await?;
    assert_eq!(outcome, "ok");
    let expected: Vec<(String, String, String)> = (0..4)
        .map(|n| {
            let prev = if n == 0 {
                String::new()
            } else {
                ids[n - 1].1.clone()
            };
            (ids[n].1.clone(), prev, format!("e{n}"))
        })
        .collect();
    assert_eq!(events, expected);
    // From the second event on, only what follows it.
    let (_, _, after) = read(&mut connection, "orders", &epoch, &ids[1].1).await?;
    assert_eq!(after, expected[2..]);
    Ok(())
}

#[tokio::test]
async fn an_idempotency_key_publishes_once_and_answers_with_the_first_position() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut connection = with_library(&redis).await?;
    let first = publish(&mut connection, "orders", "paid", Some("order-7")).await?;
    let again = publish(&mut connection, "orders", "paid", Some("order-7")).await?;
    assert_eq!(first, again);
    // The same key on another channel is another event.
    let other = publish(&mut connection, "invoices", "paid", Some("order-7")).await?;
    assert_ne!(other.1, "");
    let (_, _, events) = read(&mut connection, "orders", &first.0, "").await?;
    assert_eq!(events.len(), 1);
    Ok(())
}

#[tokio::test]
async fn positions_past_the_trim_are_expired_and_positions_from_lost_history_unknown() -> TestResult
{
    let redis = TestRedis::start().await?;
    let mut connection = with_library(&redis).await?;
    let (epoch, first) = publish(&mut connection, "orders", "e0", None).await?;
    let mut last = first.clone();
    for n in 1..=BOUNDS.capacity + 1 {
        last = publish(&mut connection, "orders", &format!("e{n}"), None)
            .await?
            .1;
    }
    // `capacity` events are kept: the one right after `first` was trimmed too.
    let (outcome, _, events) = read(&mut connection, "orders", &epoch, &first).await?;
    assert_eq!((outcome.as_str(), events.len()), ("history_expired", 0));
    let (outcome, _, events) = read(&mut connection, "orders", &epoch, &last).await?;
    assert_eq!((outcome.as_str(), events.len()), ("ok", 0));
    // A position beyond the last stored event was lost with a failover.
    let (ms, _) = stream_id(&last)?;
    let lost = format!("{}-0", ms + 60_000);
    let (outcome, _, _) = read(&mut connection, "orders", &epoch, &lost).await?;
    assert_eq!(outcome, "unknown_position");
    Ok(())
}

#[tokio::test]
async fn a_position_inside_the_kept_history_that_redis_never_stored_is_unknown() -> TestResult {
    // What a planned failover leaves behind: the old primary took writes after the replica
    // was promoted, a gateway delivered them, and the new primary's history forks before them.
    let redis = TestRedis::start().await?;
    let mut connection = with_library(&redis).await?;
    let (epoch, first) = publish(&mut connection, "orders", "e0", None).await?;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    publish(&mut connection, "orders", "e1", None).await?;
    let (ms, _) = stream_id(&first)?;
    let never_stored = format!("{ms}-7");
    let (outcome, _, events) = read(&mut connection, "orders", &epoch, &never_stored).await?;
    assert_eq!((outcome.as_str(), events.len()), ("unknown_position", 0));
    // The stored one still reads on.
    let (outcome, _, events) = read(&mut connection, "orders", &epoch, &first).await?;
    assert_eq!((outcome.as_str(), events.len()), ("ok", 1));
    Ok(())
}

#[tokio::test]
async fn flushall_starts_a_new_epoch_so_no_position_names_two_events() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut connection = with_library(&redis).await?;
    let (old_epoch, old_id) = publish(&mut connection, "orders", "before", None).await?;
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut connection)
        .await?;
    let (new_epoch, new_id) = publish(&mut connection, "orders", "after", None).await?;
    // Within the same millisecond the stream id may repeat: the epoch tells them apart.
    assert_ne!(old_epoch, new_epoch, "ids {old_id} and {new_id}");
    let (outcome, epoch, _) = read(&mut connection, "orders", &old_epoch, &old_id).await?;
    assert_eq!(
        (outcome.as_str(), epoch.as_str()),
        ("unknown_position", new_epoch.as_str())
    );
    Ok(())
}

#[tokio::test]
async fn a_reader_position_names_an_epoch_before_the_first_event() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut connection = with_library(&redis).await?;
    let position: String = redis::cmd("FCALL")
        .arg("ssehub_position")
        .arg(1)
        .arg("quiet")
        .query_async(&mut connection)
        .await?;
    let (epoch, last) = position.split_once(' ').ok_or("position shape")?;
    assert_eq!(last, "");
    let (published_epoch, id) = publish(&mut connection, "quiet", "first", None).await?;
    assert_eq!(epoch, published_epoch);
    let (outcome, _, events) = read(&mut connection, "quiet", epoch, "").await?;
    assert_eq!(outcome, "ok");
    assert_eq!(events, [(id, String::new(), "first".to_string())]);
    Ok(())
}

#[tokio::test]
async fn live_messages_carry_epoch_id_previous_id_and_the_payload_verbatim() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut connection = with_library(&redis).await?;
    let client = redis::Client::open(redis.url())?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe("ssehub:{orders}:live").await?;
    let payload = "line one\nline two {\"json\": true}";
    let (epoch, first) = publish(&mut connection, "orders", "x", None).await?;
    let (_, second) = publish(&mut connection, "orders", payload, None).await?;
    let mut messages = Box::pin(pubsub.on_message());
    let mut received = Vec::new();
    for _ in 0..2 {
        let message = tokio::time::timeout(PATIENCE, messages.next())
            .await?
            .ok_or("subscription ended")?;
        received.push(message.get_payload::<String>()?);
    }
    assert_eq!(
        received,
        [
            format!("{epoch} {first} \nx"),
            format!("{epoch} {second} {first}\n{payload}")
        ]
    );
    Ok(())
}

/// Redis Cluster's key hash slot (CRC16/XMODEM of the hash tag or the whole key, mod 16384).
fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match bytes.iter().position(|b| *b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|b| *b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    let mut crc: u16 = 0;
    for byte in hashed {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[tokio::test]
async fn every_key_of_a_channel_lives_in_the_channel_slot() -> TestResult {
    assert_eq!(slot("123456789"), 0x31C3, "CRC16/XMODEM check value");
    let redis = TestRedis::start().await?;
    let mut connection = with_library(&redis).await?;
    for channel in ["orders", "user:{42}", "a{b", "tenant:7:billing"] {
        publish(&mut connection, channel, "x", Some("k")).await?;
        let keys: Vec<String> = connection.keys("ssehub:*").await?;
        assert!(keys.len() >= 3, "{keys:?}");
        for key in &keys {
            assert_eq!(slot(key), slot(channel), "{key} for {channel}");
        }
        redis::cmd("FLUSHDB")
            .query_async::<()>(&mut connection)
            .await?;
    }
    // A `}` without a hash tag cannot be kept in the channel's slot: refused, nothing stored.
    let refused = publish(&mut connection, "a}b", "x", None).await;
    assert!(refused.is_err());
    let keys: Vec<String> = connection.keys("ssehub:*").await?;
    assert!(keys.is_empty(), "{keys:?}");
    Ok(())
}

#[tokio::test]
async fn an_older_instance_keeps_a_newer_library() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut connection = redis.connection().await?;
    let newer = ssehub::functions::library_source(&BOUNDS).replace(
        &format!("local VERSION = {LIBRARY_VERSION}\n"),
        &format!("local VERSION = {}\n", LIBRARY_VERSION + 1),
    );
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(newer)
        .query_async::<String>(&mut connection)
        .await?;
    assert_eq!(
        load_library(&mut connection, &BOUNDS).await?,
        Loaded::Newer(LIBRARY_VERSION + 1)
    );
    let version: i64 = redis::cmd("FCALL_RO")
        .arg("ssehub_version")
        .arg(0)
        .query_async(&mut connection)
        .await?;
    assert_eq!(version, LIBRARY_VERSION + 1);
    // The same or an older version is replaced.
    redis::cmd("FUNCTION")
        .arg("DELETE")
        .arg("ssehub")
        .query_async::<()>(&mut connection)
        .await?;
    assert_eq!(load_library(&mut connection, &BOUNDS).await?, Loaded::Ours);
    Ok(())
}

#[tokio::test]
async fn events_older_than_the_age_bound_count_as_trimmed() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut connection = redis.connection().await?;
    let short = LibraryBounds {
        max_age_ms: 500,
        ..BOUNDS
    };
    load_library(&mut connection, &short).await?;
    let (epoch, first) = publish(&mut connection, "orders", "old", None).await?;
    let (_, last) = publish(&mut connection, "orders", "older", None).await?;
    let (connection, epoch_ref, first) = (&connection, epoch.as_str(), first.as_str());
    eventually("the events age out", || async move {
        let mut connection = connection.clone();
        matches!(read(&mut connection, "orders", epoch_ref, first).await,
            Ok((outcome, _, _)) if outcome == "history_expired")
    })
    .await?;
    // A reader that saw the last event has missed nothing.
    let (outcome, _, events) = read(&mut connection.clone(), "orders", &epoch, &last).await?;
    assert_eq!((outcome.as_str(), events.len()), ("ok", 0));
    Ok(())
}

#[tokio::test]
async fn oversized_payloads_and_malformed_idempotency_keys_are_refused() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut connection = with_library(&redis).await?;
    let big = "x".repeat(BOUNDS.max_payload_bytes + 1);
    let error = publish(&mut connection, "orders", &big, None).await;
    assert!(
        format!("{error:?}").contains("max_payload_bytes"),
        "{error:?}"
    );
    for key in ["has space", &"k".repeat(129), "caf\u{e9}"] {
        let error = publish(&mut connection, "orders", "x", Some(key)).await;
        assert!(
            format!("{error:?}").contains("idempotency key"),
            "{key}: {error:?}"
        );
    }
    let keys: Vec<String> = connection.keys("ssehub:*").await?;
    assert!(keys.is_empty(), "nothing stored: {keys:?}");
    Ok(())
}

#[tokio::test]
async fn the_tail_is_the_most_recent_history_with_the_position_before_it() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut connection = with_library(&redis).await?;
    let tail = |count: usize| {
        let mut call = redis::cmd("FCALL");
        call.arg("ssehub_tail").arg(1).arg("orders").arg(count);
        call
    };
    // A channel never published to: its epoch is created, nothing before it.
    let empty: Vec<String> = tail(10).query_async(&mut connection).await?;
    assert_eq!(empty.len(), 3);
    assert_eq!((&empty[1][..], &empty[2][..]), ("", ""));
    let mut ids = Vec::new();
    for n in 0..7 {
        ids.push(
            publish(&mut connection, "orders", &format!("e{n}"), None)
                .await?
                .1,
        );
    }
    // Capacity 5: e2..e6 are kept; asking for 3 gives e4..e6 and starts after e3.
    let reply: Vec<String> = tail(3).query_async(&mut connection).await?;
    assert_eq!(reply[0], empty[0], "same epoch");
    assert_eq!((&reply[1], &reply[2]), (&ids[6], &ids[3]));
    let events: Vec<(String, String, String)> = reply[3..]
        .chunks(3)
        .map(|e| (e[0].clone(), e[1].clone(), e[2].clone()))
        .collect();
    let expected: Vec<(String, String, String)> = (4..7)
        .map(|n| (ids[n].clone(), ids[n - 1].clone(), format!("e{n}")))
        .collect();
    assert_eq!(events, expected);
    let all: Vec<String> = tail(100).query_async(&mut connection).await?;
    assert_eq!((all.len() - 3) / 3, 5);
    assert_eq!(all[2], ids[1], "trimmed to the capacity");
    Ok(())
}

#[tokio::test]
async fn every_key_expires_when_nobody_publishes_any_more() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut connection = with_library(&redis).await?;
    publish(&mut connection, "orders", "one", Some("key-1")).await?;
    let keys: Vec<String> = connection.keys("ssehub:*").await?;
    assert_eq!(keys.len(), 3, "{keys:?}");
    for key in keys {
        let ttl: i64 = connection.pttl(&key).await?;
        let bound = if key.contains(":i:") {
            BOUNDS.idempotency_ms
        } else {
            BOUNDS.key_ttl_ms
        };
        assert!(ttl > 0 && ttl as u64 <= bound, "{key}: {ttl} ms");
    }
    Ok(())
}
