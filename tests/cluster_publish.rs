//! `POST /publish` with `redis.mode = "cluster"` against a real 3-primary / 3-replica Redis
//! Cluster (issue 15, the write side): each event goes to the shard that owns its channel's
//! slot, is stored there (redis backend) and broadcast there with `SPUBLISH`, so a sharded
//! subscriber of that primary gets it; the function library is loaded where it is missing (a
//! primary that a slot moved to, every primary after `FUNCTION FLUSH`); idempotency keys still
//! publish once.
//!
//! The gateway's subscription side is not part of this: the tests publish without waiting for
//! `/readyz` and read Redis directly. One cluster is shared by the tests of this binary
//! (started on first use, serialized by its lock, healed before each test); channel names come
//! from `channels_on_each_shard`, and each test takes its own index among them so that no two
//! tests share a channel's history.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use redis::{PushInfo, PushKind, Value};
use ssehub::config::HistoryBackend;
use support::topology::*;
use support::topology_settings::{cluster_settings, shared_cluster, TOPOLOGY_SECRET};
use support::*;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::timeout;

/// A gateway in cluster mode on `cluster`'s nodes, with `backend` and a token key.
async fn cluster_gateway(
    cluster: &TestCluster,
    backend: HistoryBackend,
) -> TestResult<TestGateway> {
    TestGateway::start(cluster_settings(cluster, backend)).await
}

/// An answer of `/publish`: status and JSON body.
#[derive(Debug)]
struct Answer {
    status: u16,
    json: serde_json::Value,
}

impl Answer {
    fn id(&self) -> TestResult<String> {
        if self.status != 200 {
            return Err(format!("expected 200, got {self:?}").into());
        }
        let id = self.json["id"].as_str().ok_or("no id in the answer")?;
        Ok(id.to_string())
    }
}

/// `POST /publish?channel=<channel>` with a token that may publish anywhere, and an optional
/// `Idempotency-Key`. Retried while the gateway is not listening yet (it is started without
/// waiting for `/readyz`).
async fn publish(
    gateway: SocketAddr,
    channel: &str,
    key: Option<&str>,
    payload: &str,
) -> TestResult<Answer> {
    let token = ssehub::auth::mint_token(
        TOPOLOGY_SECRET,
        &[],
        &["*".to_string()],
        None,
        Duration::from_secs(600),
    )?;
    let bearer = format!("Bearer {token}");
    let mut headers = vec![("authorization", bearer.as_str())];
    if let Some(key) = key {
        headers.push(("idempotency-key", key));
    }
    let path = format!("/publish?channel={channel}");
    let mut last_error = String::new();
    for _ in 0..50 {
        match send_body(
            gateway,
            "POST",
            &path,
            &headers,
            Bytes::from(payload.to_string()),
        )
        .await
        {
            Ok(response) => {
                let status = response.status().as_u16();
                let body = timeout(PATIENCE, response.into_body().collect())
                    .await??
                    .to_bytes();
                let json = serde_json::from_slice(&body)
                    .map_err(|e| format!("{status}: body {body:?} is not JSON: {e}"))?;
                return Ok(Answer { status, json });
            }
            Err(e) => last_error = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("POST {path} failed: {last_error}").into())
}

/// A RESP3 connection to one node holding a sharded subscription to `channel`; its pushes
/// arrive on the receiver.
struct ShardSubscriber {
    _connection: redis::aio::MultiplexedConnection,
    pushes: UnboundedReceiver<PushInfo>,
}

impl ShardSubscriber {
    async fn start(port: u16, channel: &str) -> TestResult<ShardSubscriber> {
        let (sender, mut pushes) = tokio::sync::mpsc::unbounded_channel();
        let config = redis::AsyncConnectionConfig::new().set_push_sender(sender);
        let mut connection = redis::Client::open(format!("{}?protocol=resp3", redis_url(port)))?
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("SSUBSCRIBE")
            .arg(channel)
            .query_async::<Value>(&mut connection)
            .await?;
        let confirmation = timeout(PATIENCE, pushes.recv())
            .await?
            .ok_or("push channel closed")?;
        if confirmation.kind != PushKind::SSubscribe {
            return Err(format!("SSUBSCRIBE {channel} on :{port}: {confirmation:?}").into());
        }
        Ok(ShardSubscriber {
            _connection: connection,
            pushes,
        })
    }

    /// The payload of the next `smessage`, which must be on `channel`.
    async fn next_message(&mut self, channel: &str) -> TestResult<String> {
        let push = timeout(PATIENCE, self.pushes.recv())
            .await
            .map_err(|_| format!("no smessage on {channel} within the patience"))?
            .ok_or("push channel closed")?;
        match (&push.kind, push.data.as_slice()) {
            (PushKind::SMessage, [Value::BulkString(name), Value::BulkString(payload)])
                if name == channel.as_bytes() =>
            {
                Ok(String::from_utf8(payload.clone())?)
            }
            _ => Err(format!("expected an smessage on {channel}, got {push:?}").into()),
        }
    }

    /// Fails if a push arrives within `quiet`.
    async fn expect_nothing(&mut self, quiet: Duration) -> TestResult {
        match timeout(quiet, self.pushes.recv()).await {
            Err(_) => Ok(()),
            Ok(push) => Err(format!("unexpected push {push:?}").into()),
        }
    }
}

/// `(stream id, payload)` of every event of `channel` (no hash tag) stored on `port`.
async fn stored_events(port: u16, channel: &str) -> TestResult<Vec<(String, String)>> {
    let entries: Vec<(String, Vec<(String, String)>)> = query(
        port,
        redis::cmd("XRANGE")
            .arg(format!("ssehub:{{{channel}}}:h"))
            .arg("-")
            .arg("+"),
    )
    .await?;
    Ok(entries
        .into_iter()
        .map(|(id, fields)| {
            let payload = fields
                .into_iter()
                .find(|(name, _)| name == "p")
                .map(|(_, value)| value)
                .unwrap_or_default();
            (id, payload)
        })
        .collect())
}

/// Publishes `payload` on `channel` through `gateway` (redis backend) and checks it the way a
/// gateway of the cluster would see it: stored last in the stream on `owner`, broadcast to
/// `subscriber` (an `SSUBSCRIBE` of the live channel on `owner`) as
/// `"<epoch> <id> <prev>\n<payload>"`, with the answer naming that event.
async fn publish_and_check_stored(
    gateway: SocketAddr,
    owner: u16,
    channel: &str,
    subscriber: &mut ShardSubscriber,
    payload: &str,
) -> TestResult {
    let id = publish(gateway, channel, None, payload).await?.id()?;
    let events = stored_events(owner, channel).await?;
    let (stream_id, stored) = events
        .last()
        .ok_or_else(|| format!("no event of {channel} on :{owner}"))?;
    assert_eq!(stored, payload, "{channel} on :{owner}");
    let prev = events
        .len()
        .checked_sub(2)
        .map_or("", |at| events[at].0.as_str());
    let live = ssehub::functions::live_channel(channel).ok_or("no live channel")?;
    let message = subscriber.next_message(&live).await?;
    let (head, body) = message
        .split_once('\n')
        .ok_or("no newline in the message")?;
    assert_eq!(body, payload);
    let parts: Vec<&str> = head.split(' ').collect();
    let [epoch, broadcast_id, broadcast_prev] = parts[..] else {
        return Err(format!("the message's head {head:?} is not `<epoch> <id> <prev>`").into());
    };
    assert_eq!((broadcast_id, broadcast_prev), (stream_id.as_str(), prev));
    assert_eq!(id, ssehub::position::single_channel_id(epoch, stream_id));
    Ok(())
}

/// The library version `port` answers, or why it cannot.
async fn library_version(port: u16) -> TestResult<Result<i64, String>> {
    Ok(
        try_query::<i64>(port, redis::cmd("FCALL_RO").arg("ssehub_version").arg(0))
            .await?
            .map_err(|e| e.to_string()),
    )
}

#[tokio::test]
async fn the_redis_backend_publishes_on_each_shard_and_loads_the_library_on_every_primary(
) -> TestResult {
    let cluster = shared_cluster().await?;
    let shards = cluster.channels_on_each_shard(4).await?;
    // No library anywhere: the first publish must load it on every primary, not only on the
    // one its channel lives on.
    for (primary, _) in &shards {
        query::<()>(*primary, redis::cmd("FUNCTION").arg("FLUSH")).await?;
    }
    let gateway = cluster_gateway(&cluster, HistoryBackend::Redis).await?;
    let (first_owner, first_channel) = (shards[0].0, &shards[0].1[0]);
    publish(gateway.addr, first_channel, None, "loads")
        .await?
        .id()?;
    for (primary, _) in &shards {
        assert_eq!(
            library_version(*primary).await?,
            Ok(ssehub::functions::LIBRARY_VERSION),
            "the library on :{primary} after a publish on :{first_owner}"
        );
    }
    for (owner, channels) in &shards {
        let channel = &channels[0];
        let live = ssehub::functions::live_channel(channel).ok_or("no live channel")?;
        let mut subscriber = ShardSubscriber::start(*owner, &live).await?;
        for n in 0..2 {
            let payload = format!("{channel}-{n}");
            publish_and_check_stored(gateway.addr, *owner, channel, &mut subscriber, &payload)
                .await?;
        }
    }
    gateway.stop().await
}

#[tokio::test]
async fn a_primary_that_a_slot_moved_to_gets_the_library_and_the_event() -> TestResult {
    let mut cluster = shared_cluster().await?;
    let shards = cluster.channels_on_each_shard(4).await?;
    let (owner, channel) = (shards[0].0, shards[0].1[1].clone());
    let gateway = cluster_gateway(&cluster, HistoryBackend::Redis).await?;
    // The publisher knows the cluster and every primary has the library before the move.
    publish(gateway.addr, &channel, None, "before")
        .await?
        .id()?;

    let added = cluster
        .add_primary()
        .await
        .map_err(|e| format!("add_primary: {e}"))?;
    assert!(
        library_version(added).await?.is_err(),
        "a new primary starts without the library"
    );
    cluster
        .migrate_slot(cluster.slot_of(&channel), added)
        .await
        .map_err(|e| format!("migrate_slot: {e}"))?;
    let live = ssehub::functions::live_channel(&channel).ok_or("no live channel")?;
    let mut subscriber = ShardSubscriber::start(added, &live)
        .await
        .map_err(|e| format!("SSUBSCRIBE on :{added}: {e}"))?;
    publish_and_check_stored(gateway.addr, added, &channel, &mut subscriber, "after")
        .await
        .map_err(|e| format!("publish after the move to :{added}: {e}"))?;
    let moved: Vec<String> = stored_events(added, &channel)
        .await?
        .into_iter()
        .map(|(_, payload)| payload)
        .collect();
    assert_eq!(
        moved,
        ["before", "after"],
        "the history moved with the slot"
    );
    assert_ne!(owner, added);
    gateway.stop().await
}

#[tokio::test]
async fn the_memory_backend_spublishes_on_the_owning_shard() -> TestResult {
    let cluster = shared_cluster().await?;
    let shards = cluster.channels_on_each_shard(4).await?;
    let gateway = cluster_gateway(&cluster, HistoryBackend::Memory).await?;
    for (owner, channels) in &shards {
        let channel = &channels[2];
        let mut subscriber = ShardSubscriber::start(*owner, channel).await?;
        let payload = format!("live on {channel}");
        let id = publish(gateway.addr, channel, None, &payload).await?.id()?;
        assert!(id.starts_with('m'), "{id}");
        assert_eq!(subscriber.next_message(channel).await?, payload);
    }
    gateway.stop().await
}

#[tokio::test]
async fn an_idempotency_key_publishes_once_in_a_cluster() -> TestResult {
    let cluster = shared_cluster().await?;
    let shards = cluster.channels_on_each_shard(4).await?;
    let (owner, channel) = (shards[1].0, shards[1].1[3].clone());

    let gateway = cluster_gateway(&cluster, HistoryBackend::Redis).await?;
    let first = publish(gateway.addr, &channel, Some("k-1"), "once")
        .await?
        .id()?;
    let again = publish(gateway.addr, &channel, Some("k-1"), "twice")
        .await?
        .id()?;
    assert_eq!(first, again);
    let stored: Vec<String> = stored_events(owner, &channel)
        .await?
        .into_iter()
        .map(|(_, payload)| payload)
        .collect();
    assert_eq!(stored, ["once"]);
    gateway.stop().await?;

    let gateway = cluster_gateway(&cluster, HistoryBackend::Memory).await?;
    let mut subscriber = ShardSubscriber::start(owner, &channel).await?;
    let first = publish(gateway.addr, &channel, Some("k-1"), "live once")
        .await?
        .id()?;
    let again = publish(gateway.addr, &channel, Some("k-1"), "live twice")
        .await?
        .id()?;
    assert_eq!(first, again);
    assert_eq!(subscriber.next_message(&channel).await?, "live once");
    subscriber
        .expect_nothing(Duration::from_millis(300))
        .await?;

    // A name with a `}` but no hash tag has no key in its own slot for the record: refused
    // with a key, published (to the slot's owner) without one.
    let odd = "odd}name";
    let odd_owner = cluster.owner_of_slot(key_slot(odd)).await?;
    let mut subscriber = ShardSubscriber::start(odd_owner, odd).await?;
    let refused = publish(gateway.addr, "odd%7Dname", Some("k-1"), "refused").await?;
    assert_eq!(refused.status, 400, "{refused:?}");
    publish(gateway.addr, "odd%7Dname", None, "odd")
        .await?
        .id()?;
    assert_eq!(subscriber.next_message(odd).await?, "odd");
    gateway.stop().await
}
