//! The dead-letter stream: every payload received from Redis that the gateway does not deliver
//! (`ssehub_payloads_dropped_total`) is added to the Redis Stream `dead_letter.stream`, once
//! across the fleet, where it can be inspected and replayed. Also the payloads' correlation ids
//! (`log.correlation_id_field`), which drop logs and dead-letter entries carry.
//!
//! Delivery never waits for dead-lettering. The upstream task hands an owned record to a
//! bounded queue ([`DeadLetters::dropped`], `try_send`); a full queue counts the entry `failed`.
//! One writer task ([`run`]) drains the queue in batches, pipelined on a command connection of
//! its own that follows the topology (the publisher's [`CommandConnection`]), each batch bounded
//! by `redis.connect_timeout_secs + redis.command_timeout_secs`: a stopped or hung Redis costs
//! entries (`failed`), never delivery, and never piles up work.
//!
//! One entry per dropped message even when several instances receive it: each entry is one
//! atomic script, `SET <dedupe key> 1 NX PX <window>` and only if it was set the `XADD`. The
//! dedupe key is made of a SHA-1 of the channel, the event's position (redis backend) and the
//! full payload, and lives in the stream's cluster slot ([`dedupe_key`]); the instance that finds
//! it taken counts `duplicate`.
//!
//! Correlation ids are read (`serde_json`) only on the drop path and for `POST /publish`, never
//! while delivering.

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use redis::RedisResult;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::Settings;
use crate::metrics;
use crate::position::StreamId;
use crate::publisher::{CommandConnection, Connection};
use crate::topology::Topology;

/// Most entries waiting for the writer. Past it (Redis slow or down) entries are `failed`.
const QUEUE_ENTRIES: usize = 1024;
/// Most payload bytes waiting for the writer, whatever `limits.max_payload_bytes` allows each.
const QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// Most entries written in one pipeline.
const BATCH: usize = 64;
/// How often a failing dead-letter queue or writer may log.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Longest correlation id shown in a log line, in characters.
pub const MAX_LOGGED_CORRELATION_ID: usize = 128;

/// `KEYS`: dedupe key, stream. `ARGV`: window in ms, max length, then field, value, ... Answers
/// 1 when the entry was added, 0 when another instance already added it.
const WRITE_SCRIPT: &str = r"
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
  return 1
end
return 0
";

/// The Redis Cluster hash tag of `name`: what lies between its first `{` and the first `}`
/// after it, when that is not empty (the Redis rule).
pub fn hash_tag(name: &str) -> Option<&str> {
    let open = name.find('{')?;
    let close = name[open + 1..].find('}')?;
    (close > 0).then(|| &name[open + 1..open + 1 + close])
}

/// The dedupe key of the message hashed to `hash` (hex): in the same cluster slot as `stream`,
/// which the one script touching both needs. A stream name with a hash tag keeps it; another
/// becomes the tag. (Names with braces that are not a hash tag are refused at start-up.)
pub fn dedupe_key(stream: &str, hash: &str) -> String {
    if hash_tag(stream).is_some() {
        format!("{stream}:seen:{hash}")
    } else {
        format!("{{{stream}}}:seen:{hash}")
    }
}

/// SHA-1 (hex) of what identifies one message in the fleet: its channel, its position when
/// Redis assigned one, and its whole payload, each length-prefixed so that no two different
/// triples hash the same bytes.
fn message_hash(channel: &str, position: Option<&str>, payload: &[u8]) -> String {
    let mut sha = sha1_smol::Sha1::new();
    for part in [channel.as_bytes(), position.unwrap_or("").as_bytes()] {
        sha.update(&(part.len() as u64).to_be_bytes());
        sha.update(part);
    }
    sha.update(payload);
    sha.digest().to_string()
}

/// `log.correlation_id_field`: a top-level JSON field or a dotted path to one.
#[derive(Clone, Debug)]
pub struct CorrelationField(Cow<'static, str>);

impl CorrelationField {
    /// The field `path` (validated by the configuration: no empty parts).
    pub fn new(path: &str) -> CorrelationField {
        CorrelationField(Cow::Owned(path.to_string()))
    }

    /// The payload's correlation id: the field's value if the payload is a JSON object that
    /// has it as a string (as is) or a number (its text); anything else is no id.
    pub fn extract(&self, payload: &[u8]) -> Option<String> {
        let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
        let found = self
            .0
            .split('.')
            .try_fold(&value, |value, part| value.as_object()?.get(part))?;
        match found {
            serde_json::Value::String(text) => Some(text.clone()),
            serde_json::Value::Number(number) => Some(number.to_string()),
            _ => None,
        }
    }
}

/// `id` cut to [`MAX_LOGGED_CORRELATION_ID`] characters, for a log line.
pub fn for_log(id: &str) -> &str {
    match id.char_indices().nth(MAX_LOGGED_CORRELATION_ID) {
        Some((end, _)) => &id[..end],
        None => id,
    }
}

/// A message received from Redis that the hub did not deliver, as the upstream saw it.
#[derive(Debug)]
pub struct Received<'a> {
    /// The channel (the gateway's name, not the wire channel of the redis backend).
    pub channel: &'a str,
    /// The whole payload.
    pub payload: &'a [u8],
    /// With the redis backend: the event's epoch and stream id.
    pub stored: Option<(&'a str, StreamId)>,
}

impl Received<'_> {
    /// The event's SSE id (one-channel stream), when Redis assigned it a position.
    fn position(&self) -> Option<String> {
        self.stored
            .map(|(epoch, id)| crate::position::single_channel_id(epoch, &id.to_string()))
    }
}

/// One entry on its way to the stream.
#[derive(Debug)]
struct DeadLetter {
    channel: String,
    reason: &'static str,
    /// The first `limits.max_payload_bytes` bytes of the payload.
    payload: Vec<u8>,
    /// The payload's whole length.
    bytes: usize,
    received_at: SystemTime,
    position: Option<String>,
    correlation_id: Option<String>,
    /// See [`message_hash`].
    hash: String,
}

impl DeadLetter {
    /// The stream entry's fields, in order.
    fn fields(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut fields = vec![
            ("channel", self.channel.as_bytes().to_vec()),
            ("reason", self.reason.as_bytes().to_vec()),
            ("bytes", self.bytes.to_string().into_bytes()),
            ("payload", self.payload.clone()),
            ("received_at", rfc3339(self.received_at).into_bytes()),
        ];
        if let Some(id) = &self.correlation_id {
            fields.push(("correlation_id", id.as_bytes().to_vec()));
        }
        if let Some(position) = &self.position {
            fields.push(("id", position.as_bytes().to_vec()));
        }
        fields
    }
}

/// What the upstream does with a dropped payload besides counting it: read its correlation id
/// and, with `dead_letter.stream` set, queue it for the stream. Shared by the upstream's tasks
/// (one per shard in a cluster) through the hub.
#[derive(Debug)]
pub struct DeadLetters {
    correlation: CorrelationField,
    queue: Option<Queue>,
}

/// The sending side of the writer's queue.
#[derive(Debug)]
struct Queue {
    /// Held here only; the writer's receiver ends when the hub (and so this) is dropped.
    sender: mpsc::Sender<DeadLetter>,
    /// Payload bytes queued and not yet taken by the writer.
    queued_bytes: Arc<AtomicUsize>,
    max_payload_bytes: usize,
    /// When a full queue was last logged.
    last_full_log: Mutex<Option<Instant>>,
}

/// Dead-lettering off, correlation ids read from the default field: for a hub that was given
/// nothing else (unit tests).
pub static DISABLED: DeadLetters = DeadLetters {
    correlation: CorrelationField(Cow::Borrowed(crate::config::DEFAULT_CORRELATION_ID_FIELD)),
    queue: None,
};

impl DeadLetters {
    /// The drop path configured by `settings`, and with `dead_letter.stream` set the writer
    /// task to run (it connects to Redis through `topology` when there is something to write).
    pub fn new(
        settings: &Settings,
        topology: Arc<Topology>,
    ) -> (
        DeadLetters,
        Option<impl std::future::Future<Output = ()> + Send>,
    ) {
        let correlation = CorrelationField::new(&settings.log.correlation_id_field);
        if settings.dead_letter.stream.is_empty() {
            return (
                DeadLetters {
                    correlation,
                    queue: None,
                },
                None,
            );
        }
        let (sender, receiver) = mpsc::channel(QUEUE_ENTRIES);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let writer = Writer::new(settings, topology, queued_bytes.clone());
        let queue = Queue {
            sender,
            queued_bytes,
            max_payload_bytes: settings.limits.max_payload_bytes,
            last_full_log: Mutex::new(None),
        };
        let dead_letters = DeadLetters {
            correlation,
            queue: Some(queue),
        };
        (dead_letters, Some(run(receiver, writer)))
    }

    /// Whether dropped payloads go to a stream.
    pub fn enabled(&self) -> bool {
        self.queue.is_some()
    }

    /// The correlation id of `payload`, if it has one.
    pub fn correlation_id(&self, payload: &[u8]) -> Option<String> {
        self.correlation.extract(payload)
    }

    /// Queues `message`, dropped for `reason`, for the stream (when dead-lettering is on).
    /// Never waits: a full queue counts the entry `failed`.
    pub fn dropped(
        &self,
        reason: &'static str,
        message: &Received<'_>,
        correlation_id: Option<String>,
    ) {
        let Some(queue) = &self.queue else {
            return;
        };
        let position = message.position();
        let kept = message.payload.len().min(queue.max_payload_bytes);
        let letter = DeadLetter {
            channel: message.channel.to_string(),
            reason,
            payload: message.payload[..kept].to_vec(),
            bytes: message.payload.len(),
            received_at: SystemTime::now(),
            hash: message_hash(message.channel, position.as_deref(), message.payload),
            position,
            correlation_id,
        };
        let queued = queue.queued_bytes.fetch_add(kept, Ordering::Relaxed);
        let refused = if queued + kept > QUEUE_BYTES {
            Some(letter)
        } else {
            queue.sender.try_send(letter).err().map(|e| e.into_inner())
        };
        if let Some(letter) = refused {
            queue.queued_bytes.fetch_sub(kept, Ordering::Relaxed);
            metrics::dead_letters("failed", 1);
            queue.log_full(&letter);
        }
    }
}

impl Queue {
    fn log_full(&self, letter: &DeadLetter) {
        let now = Instant::now();
        {
            let mut last = self.last_full_log.lock();
            if last.is_some_and(|at| now.duration_since(at) < FAILURE_LOG_INTERVAL) {
                return;
            }
            *last = Some(now);
        }
        tracing::warn!(
            channel = letter.channel,
            reason = letter.reason,
            correlation_id = letter.correlation_id.as_deref().map(for_log),
            "the dead-letter queue is full (Redis slow or down): entry lost \
             (logged at most once a minute)"
        );
    }
}

/// Writes queued entries to the stream.
struct Writer {
    connection: CommandConnection,
    stream: String,
    max_len: u64,
    dedupe_ms: u64,
    /// Bound of one batch: connecting plus the pipeline.
    timeout: Duration,
    /// Shared with the queue: what the writer takes is no longer queued.
    queued_bytes: Arc<AtomicUsize>,
    /// When a failure was last logged, and the failures since.
    last_failure_log: Option<Instant>,
    failed_since_log: u64,
}

impl Writer {
    fn new(settings: &Settings, topology: Arc<Topology>, queued_bytes: Arc<AtomicUsize>) -> Self {
        let connect_timeout = Duration::from_secs(settings.redis.connect_timeout_secs);
        let command_timeout = Duration::from_secs(settings.redis.command_timeout_secs);
        Writer {
            connection: CommandConnection::new(topology, connect_timeout, command_timeout),
            stream: settings.dead_letter.stream.clone(),
            max_len: settings.dead_letter.max_len,
            dedupe_ms: settings.dead_letter.dedupe_secs.saturating_mul(1000),
            timeout: connect_timeout + command_timeout,
            queued_bytes,
            last_failure_log: None,
            failed_since_log: 0,
        }
    }

    /// Writes `batch` in one pipeline and counts each entry's outcome.
    async fn write(&mut self, batch: &[DeadLetter]) {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for letter in batch {
            let command = pipe
                .cmd("EVAL")
                .arg(WRITE_SCRIPT)
                .arg(2)
                .arg(dedupe_key(&self.stream, &letter.hash))
                .arg(&self.stream)
                .arg(self.dedupe_ms)
                .arg(self.max_len);
            for (field, value) in letter.fields() {
                command.arg(field).arg(value);
            }
        }
        let attempt = async {
            let results: Vec<RedisResult<i64>> = match self.connection.get().await? {
                Connection::Node(mut node) => pipe.query_async(&mut node).await,
                Connection::Cluster(mut cluster) => pipe.query_async(&mut cluster).await,
            }
            .map_err(|e| e.to_string())?;
            Ok::<_, String>(results)
        };
        let results = match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(results)) if results.len() == batch.len() => results,
            Ok(Ok(results)) => {
                let error = format!("{} replies to {} entries", results.len(), batch.len());
                return self.failed(batch, &error);
            }
            Ok(Err(error)) => {
                self.connection.forget();
                return self.failed(batch, &error);
            }
            Err(_) => {
                self.connection.forget();
                let error = format!(
                    "Redis did not answer within {:?} (redis.connect_timeout_secs + \
                     redis.command_timeout_secs)",
                    self.timeout
                );
                return self.failed(batch, &error);
            }
        };
        for (letter, result) in batch.iter().zip(results) {
            match result {
                Ok(1) => metrics::dead_letters("written", 1),
                Ok(_) => metrics::dead_letters("duplicate", 1),
                Err(e) => self.failed(std::slice::from_ref(letter), &e.to_string()),
            }
        }
    }

    /// Counts `letters` lost and logs it (rate limited) with the first one's correlation id.
    fn failed(&mut self, letters: &[DeadLetter], error: &str) {
        metrics::dead_letters("failed", letters.len() as u64);
        self.failed_since_log += letters.len() as u64;
        let now = Instant::now();
        if self
            .last_failure_log
            .is_some_and(|at| now.duration_since(at) < FAILURE_LOG_INTERVAL)
        {
            return;
        }
        self.last_failure_log = Some(now);
        let Some(first) = letters.first() else {
            return;
        };
        tracing::warn!(
            stream = self.stream,
            channel = first.channel,
            reason = first.reason,
            correlation_id = first.correlation_id.as_deref().map(for_log),
            lost = self.failed_since_log,
            error,
            "could not write to the dead-letter stream: entries lost \
             (logged at most once a minute)"
        );
        self.failed_since_log = 0;
    }
}

/// The writer task: drains the queue until the hub (holding its sender) is dropped.
async fn run(mut queue: mpsc::Receiver<DeadLetter>, mut writer: Writer) {
    let mut batch = Vec::with_capacity(BATCH);
    while queue.recv_many(&mut batch, BATCH).await > 0 {
        let taken = batch.iter().map(|letter| letter.payload.len()).sum();
        writer.queued_bytes.fetch_sub(taken, Ordering::Relaxed);
        writer.write(&batch).await;
        batch.clear();
    }
}

/// `at` in RFC 3339, UTC, with milliseconds: `2026-11-05T14:03:07.123Z`.
fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, of_day) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::cluster::slot_of;

    #[test]
    fn dedupe_keys_hash_to_the_streams_slot() {
        let hash = message_hash("orders", None, b"payload");
        for stream in [
            "ssehub:dead",
            "dead",
            "{ops}:dead",
            "x{ops}y",
            "a{b}}c",
            "{{b}",
        ] {
            let key = dedupe_key(stream, &hash);
            assert_eq!(
                slot_of(key.as_bytes()),
                slot_of(stream.as_bytes()),
                "{stream}"
            );
        }
        assert_eq!(dedupe_key("dl", "ab"), "{dl}:seen:ab");
        assert_eq!(dedupe_key("{t}dl", "ab"), "{t}dl:seen:ab");
    }

    #[test]
    fn hash_tags_follow_the_redis_rule() {
        assert_eq!(hash_tag("{a}b"), Some("a"));
        assert_eq!(hash_tag("x{a}{b}"), Some("a"));
        assert_eq!(hash_tag("{}a"), None);
        assert_eq!(hash_tag("{}{a}"), None);
        assert_eq!(hash_tag("a}b{"), None);
        assert_eq!(hash_tag("plain"), None);
    }

    #[test]
    fn message_hashes_separate_their_parts() {
        let base = message_hash("ab", None, b"c");
        assert_ne!(base, message_hash("a", None, b"bc"));
        assert_ne!(base, message_hash("ab", Some("1"), b"c"));
        assert_eq!(base, message_hash("ab", None, b"c"));
        assert_eq!(base.len(), 40);
    }

    #[test]
    fn correlation_ids_are_strings_or_numbers_at_the_field_or_path() {
        let top = CorrelationField::new("correlationId");
        let nested = CorrelationField::new("metadata.correlationId");
        assert_eq!(
            top.extract(br#"{"correlationId":"c-1","x":1}"#),
            Some("c-1".to_string())
        );
        assert_eq!(
            top.extract(br#"{"correlationId":42}"#),
            Some("42".to_string())
        );
        assert_eq!(
            top.extract(br#"{"correlationId":1.5}"#),
            Some("1.5".to_string())
        );
        for absent in [
            &br#"{"correlationId":null}"#[..],
            br#"{"correlationId":{"a":1}}"#,
            br#"{"correlationId":true}"#,
            br#"{"other":"x"}"#,
            br#"["correlationId"]"#,
            b"not json",
            b"{\"correlationId\":\"\xff\"}",
        ] {
            assert_eq!(top.extract(absent), None, "{absent:?}");
        }
        assert_eq!(
            nested.extract(br#"{"metadata":{"correlationId":"m-7"}}"#),
            Some("m-7".to_string())
        );
        assert_eq!(nested.extract(br#"{"metadata":"m-7"}"#), None);
        assert_eq!(nested.extract(br#"{"metadata.correlationId":"m-7"}"#), None);
    }

    #[test]
    fn logged_correlation_ids_are_cut_at_128_characters() {
        let long = "é".repeat(200);
        assert_eq!(for_log(&long).chars().count(), 128);
        assert_eq!(for_log("short"), "short");
    }

    #[test]
    fn times_are_rfc3339_utc_with_milliseconds() {
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339(at), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
