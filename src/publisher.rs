//! The publisher: how `POST /publish` puts an event into Redis, on either history backend.
//!
//! It owns one Redis command connection shared by every publish (multiplexed: concurrent
//! publishes are pipelined on it). The connection is opened by the first publish, not at
//! start-up, so the gateway starts and serves streams while Redis is down; after a connection
//! failure it is dropped and the next publish opens a new one. It is not the subscription
//! connection (`upstream` owns that one): a subscribed connection cannot send commands.
//!
//! In a Redis Cluster (`redis.mode = "cluster"`) that connection is the redis crate's cluster
//! connection ([`Topology::cluster`]): every command declares a key or channel in the
//! published channel's slot, so the client sends it to the shard that owns the channel (and
//! follows `MOVED` when the slot moved), and the live broadcast is an `SPUBLISH` that stays in
//! that shard, where the gateways `SSUBSCRIBE`.
//!
//! - `history.backend = "redis"`: `FCALL ssehub_publish 1 <channel> <payload> [<key>]`. Redis
//!   assigns the id where it stores the event; the answer is the SSE id a one-channel stream
//!   shows for it ([`crate::position::single_channel_id`]). When Redis no longer has the
//!   function (restarted without persistence, `FUNCTION FLUSH`; in a cluster also a new
//!   primary, or one a slot moved to), the library is loaded again (in a cluster on every
//!   primary: `FUNCTION LOAD` is routed to all of them) and the call retried once.
//! - `history.backend = "memory"`: the payload is `PUBLISH`ed (`SPUBLISH`ed in a cluster) on the
//!   channel, like any backend's publish, so every instance on that Redis serves it. Each
//!   instance numbers the
//!   events it receives itself, so the answer cannot be an SSE id: it is an opaque publish id,
//!   unique across the fleet ([`new_publish_id`]).
//!
//! An idempotency key makes a repeat within the window (same key, same channel, any instance)
//! publish nothing and answer the first publish's id. With the memory backend the record and
//! the `PUBLISH` are one script, so two concurrent repeats cannot both publish; the record is
//! in the channel's slot, which is what lets the script `SPUBLISH` in a cluster.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use tokio::sync::Mutex;

use crate::config::{HistoryBackend, Settings};
use crate::functions::{self, Broadcast, LibraryBounds};
use crate::topology::{NodeAddress, Topology};

/// The memory backend's publish: the idempotency record (when the request has a key, as
/// `KEYS[1]`) and the `PUBLISH` (`@PUBLISH@`: [`Broadcast::command`]), atomically. ARGV:
/// channel, payload, window in ms, new id. Answers the id of the publish that happened: the
/// new one, or the recorded one.
const MEMORY_PUBLISH_SCRIPT: &str = r"
if #KEYS == 1 then
  local earlier = redis.call('GET', KEYS[1])
  if earlier then
    return earlier
  end
  redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[3])
end
redis.call('@PUBLISH@', ARGV[1], ARGV[2])
return ARGV[4]
";

/// A command connection that follows the topology (see [`CommandConnection`]).
#[derive(Clone)]
pub(crate) enum Connection {
    /// To the one primary (standalone, or the one the sentinels report).
    Node(MultiplexedConnection),
    /// To a Redis Cluster: each command goes to the shard its key names.
    Cluster(ClusterConnection),
}

/// A shared, multiplexed command connection to wherever writes go now: the one primary
/// (standalone, or the one the sentinels announce: it is opened again when a new primary is
/// announced) or the cluster client, which routes each command by its key. Opened on first use,
/// not at start-up, and dropped after a failure ([`CommandConnection::forget`]) so that the next
/// use opens a new one. Used by the publisher and by the dead-letter writer, each with its own.
pub(crate) struct CommandConnection {
    /// Where the primary is.
    topology: Arc<Topology>,
    /// The connection with the node it is connected to (`None` for a cluster); `None` until
    /// first use and after a failure.
    slot: Mutex<Option<(Option<NodeAddress>, Connection)>>,
    connect_timeout: Duration,
    command_timeout: Duration,
}

impl CommandConnection {
    /// A connection to `topology`'s primary (or cluster) with the `[redis]` timeouts. Connects
    /// nothing yet.
    pub(crate) fn new(
        topology: Arc<Topology>,
        connect_timeout: Duration,
        command_timeout: Duration,
    ) -> CommandConnection {
        CommandConnection {
            topology,
            slot: Mutex::new(None),
            connect_timeout,
            command_timeout,
        }
    }

    /// The shared connection, opened if there is none or the primary moved since it was.
    pub(crate) async fn get(&self) -> Result<Connection, String> {
        let mut slot = self.slot.lock().await;
        if let Some((node, connection)) = slot.as_ref() {
            if !self.topology.moved_from(node) {
                return Ok(connection.clone());
            }
        }
        let (node, connection) = match self.topology.cluster() {
            // The client's own timeouts are those of `[redis]` (see `Topology::new`).
            Some(cluster) => {
                let connection = cluster
                    .get_async_connection()
                    .await
                    .map_err(|e| e.to_string())?;
                (None, Connection::Cluster(connection))
            }
            None => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.connect_timeout))
                    .set_response_timeout(Some(self.command_timeout));
                let primary = self.topology.primary().await?;
                let connection = primary
                    .client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(|e| e.to_string())?;
                (primary.address, Connection::Node(connection))
            }
        };
        *slot = Some((node, connection.clone()));
        Ok(connection)
    }

    /// Drops the shared connection, so that the next use opens a new one. Never waits: if the
    /// lock is taken, another user is opening a new connection right now anyway.
    pub(crate) fn forget(&self) {
        if let Ok(mut slot) = self.slot.try_lock() {
            *slot = None;
        }
    }
}

/// Why a publish did not happen.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// Redis refused the payload as larger than the library's limit (loaded by an instance
    /// with a smaller `limits.max_payload_bytes`).
    #[error("{0}")]
    TooLarge(String),
    /// Redis refused the request itself (a channel name the library cannot store, ...).
    #[error("{0}")]
    Rejected(String),
    /// Redis could not be reached, did not answer in time, or failed.
    #[error("{0}")]
    Unavailable(String),
}

/// Publishes events into Redis for the HTTP publish API. Shared by every request.
pub struct Publisher {
    /// The shared command connection.
    connection: CommandConnection,
    backend: HistoryBackend,
    /// `PUBLISH`, or `SPUBLISH` in a cluster (memory backend; the library has its own copy in
    /// `bounds`).
    broadcast: Broadcast,
    /// Bounds the library is (re)loaded with (redis backend).
    bounds: LibraryBounds,
    /// How long an idempotency key is remembered, in ms (memory backend; the library has its
    /// own copy in `bounds`).
    idempotency_ms: u64,
    connect_timeout: Duration,
    command_timeout: Duration,
    memory_script: redis::Script,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("backend", &self.backend)
            .field("bounds", &self.bounds)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher on `topology`'s primary, configured from `settings`. Connects nothing yet.
    pub fn new(topology: Arc<Topology>, settings: &Settings) -> Publisher {
        let broadcast = Broadcast::for_mode(settings.redis.mode);
        let connect_timeout = Duration::from_secs(settings.redis.connect_timeout_secs);
        let command_timeout = Duration::from_secs(settings.redis.command_timeout_secs);
        Publisher {
            connection: CommandConnection::new(topology, connect_timeout, command_timeout),
            backend: settings.history.backend,
            broadcast,
            bounds: LibraryBounds::from_settings(settings),
            idempotency_ms: settings
                .publish
                .idempotency_window_secs
                .saturating_mul(1000),
            connect_timeout,
            command_timeout,
            memory_script: redis::Script::new(
                &MEMORY_PUBLISH_SCRIPT.replace("@PUBLISH@", broadcast.command()),
            ),
        }
    }

    /// Publishes `payload` on `channel` (at most once per `idempotency_key` within the window)
    /// and returns its id. Bounded in time by `redis.connect_timeout_secs` plus
    /// `redis.command_timeout_secs`.
    pub async fn publish(
        &self,
        channel: &str,
        payload: &[u8],
        idempotency_key: Option<&str>,
    ) -> Result<String, PublishError> {
        if let Some(refusal) = self.refusal(channel, idempotency_key) {
            return Err(refusal);
        }
        let attempt = async {
            let published = match self.connection().await? {
                Connection::Node(mut node) => {
                    self.publish_on(&mut node, channel, payload, idempotency_key)
                        .await
                }
                Connection::Cluster(mut cluster) => {
                    self.publish_on(&mut cluster, channel, payload, idempotency_key)
                        .await
                }
            };
            published.map_err(|e| self.classify(e))
        };
        match tokio::time::timeout(self.connect_timeout + self.command_timeout, attempt).await {
            Ok(result) => result,
            Err(_) => {
                self.forget_connection();
                Err(PublishError::Unavailable(
                    "Redis did not answer in time (redis.connect_timeout_secs + \
                     redis.command_timeout_secs)"
                        .to_string(),
                ))
            }
        }
    }

    /// A publish refused before Redis is asked: in a cluster, an idempotency record of the
    /// memory backend must be in the channel's slot, which a name with a `}` but no hash tag
    /// cannot give (see [`memory_idempotency_record`]).
    fn refusal(&self, channel: &str, idempotency_key: Option<&str>) -> Option<PublishError> {
        let sharded = self.broadcast == Broadcast::Spublish;
        (sharded
            && self.backend == HistoryBackend::Memory
            && idempotency_key.is_some()
            && functions::key_base(channel).is_none())
        .then(|| {
            PublishError::Rejected(format!(
                "channel {channel:?}: in a Redis Cluster, an Idempotency-Key needs a channel \
                 name without `}}` or with a {{hash tag}}"
            ))
        })
    }

    /// The shared connection.
    async fn connection(&self) -> Result<Connection, PublishError> {
        self.connection
            .get()
            .await
            .map_err(|e| PublishError::Unavailable(format!("cannot connect to Redis: {e}")))
    }

    /// Drops the shared connection, so that the next publish opens a new one.
    fn forget_connection(&self) {
        self.connection.forget();
    }

    /// Publishes with the configured backend on `connection`.
    async fn publish_on(
        &self,
        connection: &mut (impl ConnectionLike + Send),
        channel: &str,
        payload: &[u8],
        idempotency_key: Option<&str>,
    ) -> Result<String, Failure> {
        match self.backend {
            HistoryBackend::Redis => {
                self.publish_through_function(connection, channel, payload, idempotency_key)
                    .await
            }
            HistoryBackend::Memory => {
                self.publish_live(connection, channel, payload, idempotency_key)
                    .await
            }
        }
    }

    /// `ssehub_publish`, loading the library first when Redis does not have it.
    async fn publish_through_function(
        &self,
        connection: &mut (impl ConnectionLike + Send),
        channel: &str,
        payload: &[u8],
        idempotency_key: Option<&str>,
    ) -> Result<String, Failure> {
        let position = match call_publish(connection, channel, payload, idempotency_key).await {
            Err(e) if is_missing_function(&e) => {
                tracing::info!("the ssehub function library is missing in Redis: loading it");
                // In a cluster the version check asks one primary (the client's choice) and
                // `FUNCTION LOAD` goes to every primary of the client's slot map. The `MOVED`
                // that led to a new owner makes the client refresh that map, normally before
                // the load is sent; should the load still miss the new owner, this publish
                // answers 503 and the next one loads the library there.
                functions::load_library(connection, &self.bounds).await?;
                call_publish(connection, channel, payload, idempotency_key).await?
            }
            result => result?,
        };
        let (epoch, stream_id) = position
            .split_once(' ')
            .ok_or_else(|| Failure::Unexpected(format!("ssehub_publish answered {position:?}")))?;
        Ok(crate::position::single_channel_id(epoch, stream_id))
    }

    /// `PUBLISH` with the idempotency record, in one script.
    async fn publish_live(
        &self,
        connection: &mut (impl ConnectionLike + Send),
        channel: &str,
        payload: &[u8],
        idempotency_key: Option<&str>,
    ) -> Result<String, Failure> {
        if self.broadcast == Broadcast::Spublish && idempotency_key.is_none() {
            // No record to keep: the command itself names the channel, which is all the
            // cluster client needs to send it to the shard that owns the channel's slot (a
            // script declaring no key would go to a random node, which refuses a channel it
            // does not own).
            redis::cmd("SPUBLISH")
                .arg(channel)
                .arg(payload)
                .query_async::<i64>(connection)
                .await?;
            return Ok(new_publish_id());
        }
        let mut invocation = self.memory_script.prepare_invoke();
        if let Some(key) = idempotency_key {
            invocation.key(memory_idempotency_record(channel, key));
        }
        invocation
            .arg(channel)
            .arg(payload)
            .arg(self.idempotency_ms)
            .arg(new_publish_id());
        Ok(invocation.invoke_async(connection).await?)
    }

    /// Maps a failure to what the client is told; forgets a connection that may be broken.
    fn classify(&self, failure: Failure) -> PublishError {
        let error = match failure {
            Failure::Unexpected(message) => return PublishError::Unavailable(message),
            Failure::Redis(error) => error,
        };
        let detail = error.detail().unwrap_or_default();
        if matches!(error.kind(), redis::ErrorKind::Server(_)) {
            // The library's refusals start with its name; see `redis/ssehub.lua`.
            if detail.starts_with("ssehub: the payload is larger") {
                return PublishError::TooLarge(detail.to_string());
            }
            if detail.starts_with("ssehub:") {
                return PublishError::Rejected(detail.to_string());
            }
        }
        // An I/O error, a dropped connection, or a node that no longer takes writes
        // (READONLY after a failover demoted it): the next publish reconnects, to the
        // primary of the moment.
        self.forget_connection();
        PublishError::Unavailable(format!("Redis failed the publish: {error}"))
    }
}

/// A failed publish before it is classified.
#[derive(Debug)]
enum Failure {
    Redis(redis::RedisError),
    /// Redis answered something this build does not understand.
    Unexpected(String),
}

impl From<redis::RedisError> for Failure {
    fn from(error: redis::RedisError) -> Failure {
        Failure::Redis(error)
    }
}

async fn call_publish(
    connection: &mut (impl ConnectionLike + Send),
    channel: &str,
    payload: &[u8],
    idempotency_key: Option<&str>,
) -> redis::RedisResult<String> {
    let mut call = redis::cmd("FCALL");
    call.arg("ssehub_publish").arg(1).arg(channel).arg(payload);
    if let Some(key) = idempotency_key {
        call.arg(key);
    }
    call.query_async(connection).await
}

/// Whether Redis answered that the function does not exist (it lost the library).
fn is_missing_function(error: &redis::RedisError) -> bool {
    error
        .detail()
        .is_some_and(|detail| detail.starts_with("Function not found"))
}

/// The key of the memory backend's idempotency record for `key` on `channel`: in the channel's
/// own hash slot, as the function library's keys are ([`functions::key_base`]), apart from the
/// library's records (`mi`, not `i`: the two backends' records hold different ids), and ending
/// in the key's length, so two different (channel, key) pairs never name one record although
/// both may contain `:`. A name the library refuses (a `}` without a hash tag) gets a prefix
/// of its own.
pub fn memory_idempotency_record(channel: &str, key: &str) -> String {
    let base = functions::key_base(channel).unwrap_or_else(|| format!("ssehub:m:{channel}"));
    format!("{base}:mi:{key}:{}", key.len())
}

/// A new memory-backend publish id: `m`, the time in ms and 64 random bits, both base 36
/// (`m` + 8 + 13 characters). Unique across the fleet without coordination; sortable by time
/// only roughly (clocks differ), and not an SSE id.
pub fn new_publish_id() -> String {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis());
    let random: u64 = rand::random();
    format!(
        "m{}{:0>13}",
        base36(u64::try_from(now_ms).unwrap_or(u64::MAX)),
        base36(random)
    )
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_records_live_in_the_channels_slot_and_never_collide() {
        assert_eq!(
            memory_idempotency_record("orders", "k1"),
            "ssehub:{orders}:mi:k1:2"
        );
        assert_eq!(
            memory_idempotency_record("{shop}:orders", "k1"),
            "ssehub:t:{shop}:orders:mi:k1:2"
        );
        assert_ne!(
            memory_idempotency_record("{t}a", "x:mi:b"),
            memory_idempotency_record("{t}a:mi:x", "b")
        );
        assert_ne!(
            memory_idempotency_record("{x}", "k"),
            memory_idempotency_record("x", "k")
        );
        assert_eq!(memory_idempotency_record("{}x", "k"), "ssehub:m:{}x:mi:k:1");
    }

    #[test]
    fn publish_ids_are_distinct_and_shaped() {
        let a = new_publish_id();
        let b = new_publish_id();
        assert_ne!(a, b);
        assert!(a.starts_with('m') && a.len() == 22, "{a}");
        assert!(a[1..].bytes().all(|c| c.is_ascii_alphanumeric()), "{a}");
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
    }
}
