//! What Redis itself does under the faults the gateway follows (issue 15), with no gateway
//! involved: how sentinels announce a new primary, what replicas answer, where sharded pub/sub
//! lives in a cluster and what its clients see when a slot moves or a primary fails over, and
//! how the `redis` crate surfaces it. Each test asserts the behaviour it pins, so a Redis or
//! crate upgrade that changes it turns the test red, and prints the timings it measures.
//!
//! One cluster is shared by the cluster tests of this binary (started on first use, serialized
//! by its lock, healed before each test); each sentinel test has its own topology because a
//! failover leaves sentinels busy for a while.

mod support;

use std::time::Duration;

use redis::Value;
use support::topology::*;
use support::topology_settings::shared_cluster;
use support::*;
use tokio::time::{timeout, Instant};
use tokio_stream::StreamExt;

/// Subscribes to `+switch-master` on `sentinel` and waits (in a task, so the arrival time is
/// taken when it arrives) for the first payload and the time it took from `since`.
async fn first_switch_master(
    sentinel: u16,
    since: &std::sync::Arc<std::sync::OnceLock<Instant>>,
) -> TestResult<tokio::task::JoinHandle<TestResult<(String, Duration)>>> {
    let mut pubsub = redis::Client::open(redis_url(sentinel))?
        .get_async_pubsub()
        .await?;
    pubsub.subscribe("+switch-master").await?;
    let since = since.clone();
    Ok(tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        let message = timeout(TOPOLOGY_PATIENCE, messages.next())
            .await
            .map_err(|_| "no +switch-master within the patience")?
            .ok_or("the sentinel's pub/sub stream ended")?;
        let start = since.get().copied().ok_or("message before the fault")?;
        Ok((message.get_payload::<String>()?, start.elapsed()))
    }))
}

/// Subscribes to `+switch-master` on every sentinel of `topology`; the fault's time goes in
/// the returned cell.
async fn watch_switch_master(
    topology: &TestSentinels,
) -> TestResult<(
    std::sync::Arc<std::sync::OnceLock<Instant>>,
    Vec<tokio::task::JoinHandle<TestResult<(String, Duration)>>>,
)> {
    let since = std::sync::Arc::new(std::sync::OnceLock::new());
    let mut watchers = Vec::new();
    for sentinel in topology.sentinel_ports() {
        watchers.push(first_switch_master(sentinel, &since).await?);
    }
    Ok((since, watchers))
}

async fn await_switch_master(
    watchers: Vec<tokio::task::JoinHandle<TestResult<(String, Duration)>>>,
) -> TestResult<Vec<(String, Duration)>> {
    let mut seen = Vec::new();
    for watcher in watchers {
        seen.push(watcher.await??);
    }
    Ok(seen)
}

/// Asserts `+switch-master <name> <old ip> <old port> <new ip> <new port>` from old to new.
fn assert_switch_master(payload: &str, old: u16, new: u16) {
    let expected = format!("{MASTER_NAME} 127.0.0.1 {old} 127.0.0.1 {new}");
    assert_eq!(payload, expected, "the +switch-master payload");
}

#[tokio::test]
async fn sentinels_publish_switch_master_when_the_primary_is_killed() -> TestResult {
    let mut topology = TestSentinels::start().await?;
    let (since, watchers) = watch_switch_master(&topology).await?;
    let _ = since.set(Instant::now());
    let old = topology.kill_primary().await?;
    let new = topology
        .wait_for_primary_change(old, TOPOLOGY_PATIENCE)
        .await?;
    let seen = await_switch_master(watchers).await?;
    for (payload, after) in &seen {
        assert_switch_master(payload, old, new);
        println!("timing: sentinel kill_primary -> +switch-master: {after:?}");
    }
    println!(
        "timing: sentinel kill_primary -> the last sentinel's +switch-master: {:?}",
        seen.iter()
            .map(|(_, after)| *after)
            .max()
            .unwrap_or_default()
    );
    Ok(())
}

#[tokio::test]
async fn sentinels_publish_switch_master_on_sentinel_failover() -> TestResult {
    let topology = TestSentinels::start().await?;
    let (since, watchers) = watch_switch_master(&topology).await?;
    let _ = since.set(Instant::now());
    let old = topology.sentinel_failover().await?;
    let new = topology
        .wait_for_primary_change(old, TOPOLOGY_PATIENCE)
        .await?;
    let seen = await_switch_master(watchers).await?;
    for (payload, after) in &seen {
        assert_switch_master(payload, old, new);
        println!("timing: SENTINEL FAILOVER -> +switch-master: {after:?}");
    }
    // A planned failover keeps the old primary: it is reconfigured as a replica of the new one.
    poll_until(
        "the old primary to become a replica",
        TOPOLOGY_PATIENCE,
        || async move {
            match role(old).await {
                Ok(role) if role == "slave" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn replicas_answer_role_slave_and_refuse_writes_with_readonly() -> TestResult {
    let mut topology = TestSentinels::start().await?;
    let primary = topology.primary().await?;
    assert_eq!(role(primary).await?, "master");
    for replica in topology.replicas().await? {
        assert_eq!(role(replica).await?, "slave");
        let refused = try_query::<()>(replica, redis::cmd("SET").arg("k").arg("v")).await?;
        let error = refused.err().ok_or("a write to a replica succeeded")?;
        assert_eq!(
            error.code(),
            Some("READONLY"),
            "a write to a replica: {error}"
        );
    }
    let old = topology.kill_primary().await?;
    let promoted = topology
        .wait_for_primary_change(old, TOPOLOGY_PATIENCE)
        .await?;
    assert_eq!(role(promoted).await?, "master");
    query::<()>(promoted, redis::cmd("SET").arg("k").arg("v")).await?;
    Ok(())
}

#[tokio::test]
async fn a_lossy_sentinel_failover_loses_acknowledged_writes() -> TestResult {
    let mut topology = TestSentinels::start().await?;
    query::<()>(
        topology.primary().await?,
        redis::cmd("SET").arg("kept").arg("1"),
    )
    .await?;
    // Replicated before the cut: both replicas acknowledged it.
    wait_replicated(topology.primary().await?, 2).await?;
    let mut lost = redis::cmd("SET");
    lost.arg("lost").arg("1");
    let (old, replies) = topology.kill_primary_losing(&[lost]).await?;
    assert_eq!(
        replies,
        vec![Value::Okay],
        "the primary acknowledged the write"
    );
    let new = topology
        .wait_for_primary_change(old, TOPOLOGY_PATIENCE)
        .await?;
    let kept: Option<String> = query(new, redis::cmd("GET").arg("kept")).await?;
    let gone: Option<String> = query(new, redis::cmd("GET").arg("lost")).await?;
    assert_eq!(kept.as_deref(), Some("1"));
    assert_eq!(gone, None, "the acknowledged write is lost by the failover");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Redis Cluster
// ---------------------------------------------------------------------------------------------

/// A RESP value as it came over the wire, for the facts the crate would hide.
#[derive(Clone, Debug, PartialEq)]
enum Raw {
    /// Simple string, bulk string, integer, double, boolean: as text.
    Text(String),
    Error(String),
    Nil,
    Array(Vec<Raw>),
    /// A RESP3 out-of-band push (`>`).
    Push(Vec<Raw>),
    Map(Vec<(Raw, Raw)>),
}

fn text(s: &str) -> Raw {
    Raw::Text(s.to_string())
}

/// A connection speaking RESP by hand: commands out, values in, nothing interpreted.
struct RawConnection {
    reader: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl RawConnection {
    /// Connects to `port`; with `resp3`, switches with `HELLO 3` first.
    async fn open(port: u16, resp3: bool) -> TestResult<RawConnection> {
        let (read, writer) = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await?
            .into_split();
        let mut connection = RawConnection {
            reader: tokio::io::BufReader::new(read),
            writer,
        };
        if resp3 {
            connection.send(&["HELLO", "3"]).await?;
            connection.read().await?;
        }
        Ok(connection)
    }

    async fn send(&mut self, args: &[&str]) -> TestResult {
        use tokio::io::AsyncWriteExt;
        let mut bytes = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            bytes.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
        }
        self.writer.write_all(&bytes).await?;
        Ok(())
    }

    async fn call(&mut self, args: &[&str]) -> TestResult<Raw> {
        self.send(args).await?;
        self.read().await
    }

    /// The next value, within [`PATIENCE`]; an error when the connection ends.
    async fn read(&mut self) -> TestResult<Raw> {
        timeout(PATIENCE, read_raw(&mut self.reader))
            .await
            .map_err(|_| "no RESP value within the patience")?
    }
}

fn read_raw<'a>(
    reader: &'a mut tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = TestResult<Raw>> + Send + 'a>> {
    Box::pin(async move {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt};
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Err("connection closed".into());
        }
        let line = line.trim_end_matches("\r\n");
        let (kind, rest) = line.split_at(1);
        Ok(match kind {
            "+" | ":" | "," | "#" | "(" => Raw::Text(rest.to_string()),
            "-" => Raw::Error(rest.to_string()),
            "_" => Raw::Nil,
            "$" if rest == "-1" => Raw::Nil,
            "$" => {
                let mut bytes = vec![0; rest.parse::<usize>()? + 2];
                reader.read_exact(&mut bytes).await?;
                bytes.truncate(bytes.len() - 2);
                Raw::Text(String::from_utf8(bytes)?)
            }
            "*" if rest == "-1" => Raw::Nil,
            "*" | ">" => {
                let mut items = Vec::new();
                for _ in 0..rest.parse::<usize>()? {
                    items.push(read_raw(reader).await?);
                }
                if kind == "*" {
                    Raw::Array(items)
                } else {
                    Raw::Push(items)
                }
            }
            "%" => {
                let mut pairs = Vec::new();
                for _ in 0..rest.parse::<usize>()? {
                    pairs.push((read_raw(reader).await?, read_raw(reader).await?));
                }
                Raw::Map(pairs)
            }
            _ => return Err(format!("unexpected RESP line {line:?}").into()),
        })
    })
}

/// A loopback TCP proxy to one node for one client, which can slip extra commands to the
/// node: how a test makes `redis::aio::PubSub` (which has no SSUBSCRIBE) hold a sharded
/// subscription and shows what the crate then does with the server's pushes.
struct InjectingProxy {
    port: u16,
    inject: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    /// Every byte the node sent to the client, as the client got it.
    to_client: std::sync::Arc<parking_lot::Mutex<Vec<u8>>>,
}

impl InjectingProxy {
    async fn start(target: u16) -> TestResult<InjectingProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (inject, mut injected) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let to_client = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let transcript = to_client.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                return;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 16 * 1024];
                while let Ok(n) = server_read.read(&mut buffer).await {
                    if n == 0 || client_write.write_all(&buffer[..n]).await.is_err() {
                        return;
                    }
                    transcript.lock().extend_from_slice(&buffer[..n]);
                }
            });
            let mut buffer = vec![0u8; 16 * 1024];
            loop {
                tokio::select! {
                    read = client_read.read(&mut buffer) => match read {
                        Ok(n) if n > 0 => {
                            if server_write.write_all(&buffer[..n]).await.is_err() { return; }
                        }
                        _ => return,
                    },
                    Some(bytes) = injected.recv() => {
                        if server_write.write_all(&bytes).await.is_err() { return; }
                    }
                }
            }
        });
        Ok(InjectingProxy {
            port,
            inject,
            to_client,
        })
    }

    fn url(&self, resp3: bool) -> String {
        let protocol = if resp3 { "?protocol=resp3" } else { "" };
        format!("redis://127.0.0.1:{}{protocol}", self.port)
    }

    fn client_got(&self, needle: &str) -> bool {
        String::from_utf8_lossy(&self.to_client.lock()).contains(needle)
    }

    fn ssubscribe(&self, channel: &str) -> TestResult {
        let bytes = format!(
            "*2\r\n$10\r\nSSUBSCRIBE\r\n${}\r\n{channel}\r\n",
            channel.len()
        );
        self.inject
            .send(bytes.into_bytes())
            .map_err(|_| "the proxy is gone".into())
    }
}

/// `SPUBLISH channel payload` on `port`; the number of receivers.
async fn spublish(port: u16, channel: &str, payload: &str) -> TestResult<redis::RedisResult<i64>> {
    try_query(port, redis::cmd("SPUBLISH").arg(channel).arg(payload)).await
}

/// Waits until `port` counts `count` subscribers of shard channel `channel`
/// (`PUBSUB SHARDNUMSUB`).
async fn wait_for_shard_subscribers(port: u16, channel: &str, count: i64) -> TestResult {
    poll_until("the shard channel's subscribers", PATIENCE, || async move {
        let reply: TestResult<(String, i64)> =
            query(port, redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(channel)).await;
        match reply {
            Ok((_, n)) if n == count => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// `["<kind>", channel, <rest>]` as RESP2 sends it.
fn raw_array(items: &[&str]) -> Raw {
    Raw::Array(items.iter().map(|s| text(s)).collect())
}

fn raw_push(items: &[&str]) -> Raw {
    Raw::Push(items.iter().map(|s| text(s)).collect())
}

#[tokio::test]
async fn sharded_pubsub_is_served_by_the_slot_owner_and_other_nodes_answer_moved() -> TestResult {
    let cluster = shared_cluster().await?;
    let shards = cluster.channels_on_each_shard(1).await?;
    let (owner, channel) = (shards[0].0, shards[0].1[0].clone());
    let slot = key_slot(&channel);
    let elsewhere = shards[1].0;

    let mut subscriber = RawConnection::open(owner, false).await?;
    assert_eq!(
        subscriber.call(&["SSUBSCRIBE", &channel]).await?,
        raw_array(&["ssubscribe", &channel, "1"])
    );
    assert_eq!(spublish(owner, &channel, "hello").await??, 1);
    assert_eq!(
        subscriber.read().await?,
        raw_array(&["smessage", &channel, "hello"])
    );

    // Another primary redirects both sides to the owner.
    let moved = format!("MOVED {slot} 127.0.0.1:{owner}");
    let mut stranger = RawConnection::open(elsewhere, false).await?;
    assert_eq!(
        stranger.call(&["SSUBSCRIBE", &channel]).await?,
        Raw::Error(moved.clone())
    );
    let refused = spublish(elsewhere, &channel, "hello").await?;
    assert_eq!(
        refused
            .err()
            .and_then(|e| e.code().map(String::from))
            .as_deref(),
        Some("MOVED")
    );

    // The crate's RESP3 PubSub, made to SSUBSCRIBE, yields `smessage` as a message.
    let proxy = InjectingProxy::start(owner).await?;
    let pubsub = redis::Client::open(proxy.url(true))?
        .get_async_pubsub()
        .await?;
    let (_sink, mut messages) = pubsub.split();
    proxy.ssubscribe(&channel)?;
    wait_for_shard_subscribers(owner, &channel, 2).await?;
    assert_eq!(spublish(owner, &channel, "resp3").await??, 2);
    let message = timeout(PATIENCE, messages.next())
        .await?
        .ok_or("the stream ended")?;
    assert_eq!(message.get_payload::<String>()?, "resp3");

    // The crate's RESP2 PubSub cannot read `smessage`: its stream ENDS on the first one.
    let proxy = InjectingProxy::start(owner).await?;
    let pubsub = redis::Client::open(proxy.url(false))?
        .get_async_pubsub()
        .await?;
    let (_sink, mut messages) = pubsub.split();
    proxy.ssubscribe(&channel)?;
    wait_for_shard_subscribers(owner, &channel, 3).await?;
    assert_eq!(spublish(owner, &channel, "resp2").await??, 3);
    let next = timeout(PATIENCE, messages.next()).await?;
    assert!(
        next.is_none(),
        "RESP2 PubSub yielded {next:?} instead of ending"
    );
    Ok(())
}

#[tokio::test]
async fn migrating_a_slot_sends_sunsubscribe_which_the_crate_pubsub_swallows() -> TestResult {
    let cluster = shared_cluster().await?;
    let shards = cluster.channels_on_each_shard(1).await?;
    let (owner, channel) = (shards[0].0, shards[0].1[0].clone());
    let target = shards[1].0;

    let mut raw2 = RawConnection::open(owner, false).await?;
    raw2.call(&["SSUBSCRIBE", &channel]).await?;
    let mut raw3 = RawConnection::open(owner, true).await?;
    assert_eq!(
        raw3.call(&["SSUBSCRIBE", &channel]).await?,
        raw_push(&["ssubscribe", &channel, "1"])
    );
    // The crate's PubSub, RESP2 and RESP3, holding the sharded subscription (see InjectingProxy).
    let mut crate_pubsubs = Vec::new();
    for resp3 in [false, true] {
        let proxy = InjectingProxy::start(owner).await?;
        let (sink, messages) = redis::Client::open(proxy.url(resp3))?
            .get_async_pubsub()
            .await?
            .split();
        proxy.ssubscribe(&channel)?;
        crate_pubsubs.push((resp3, proxy, sink, messages));
    }
    // The crate's RESP3 MultiplexedConnection with a push sender (the only crate connection
    // that takes a sharded subscription as a command).
    let (push_sender, mut pushes) = tokio::sync::mpsc::unbounded_channel();
    let config = redis::AsyncConnectionConfig::new().set_push_sender(push_sender);
    let mut multiplexed = redis::Client::open(format!("{}?protocol=resp3", redis_url(owner)))?
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    redis::cmd("SSUBSCRIBE")
        .arg(&channel)
        .query_async::<Value>(&mut multiplexed)
        .await?;
    wait_for_shard_subscribers(owner, &channel, 5).await?;
    while pushes.try_recv().is_ok() {} // the ssubscribe confirmation

    let started = Instant::now();
    cluster.migrate_slot(key_slot(&channel), target).await?;
    println!(
        "timing: migrate_slot (one slot, no keys) took {:?}",
        started.elapsed()
    );

    // The server tells every shard subscriber, and keeps the connection open.
    assert_eq!(
        raw2.read().await?,
        raw_array(&["sunsubscribe", &channel, "0"])
    );
    assert_eq!(
        raw2.call(&["PING"]).await?,
        text("PONG"),
        "RESP2 left subscribed mode"
    );
    assert_eq!(
        raw3.read().await?,
        raw_push(&["sunsubscribe", &channel, "0"])
    );
    assert_eq!(raw3.call(&["PING"]).await?, text("PONG"));
    // The push-sender connection forwards it as a PushInfo.
    let push = timeout(PATIENCE, pushes.recv())
        .await?
        .ok_or("push channel closed")?;
    assert_eq!(push.kind, redis::PushKind::SUnsubscribe);
    assert_eq!(
        push.data,
        vec![
            Value::BulkString(channel.clone().into_bytes()),
            Value::Int(0)
        ]
    );

    // The crate's PubSub got the push but neither yields it nor ends: the first thing its
    // stream yields afterwards is a message of a later, plain subscription.
    for (resp3, proxy, mut sink, mut messages) in crate_pubsubs {
        poll_until("the push to reach the crate", PATIENCE, || async {
            if proxy.client_got("sunsubscribe") {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        })
        .await?;
        let probe = format!("probe-{resp3}");
        sink.subscribe(&probe).await?;
        query::<i64>(owner, redis::cmd("PUBLISH").arg(&probe).arg("after")).await?;
        let next = timeout(PATIENCE, messages.next())
            .await?
            .ok_or("stream ended")?;
        assert_eq!(
            (next.get_channel_name(), next.get_payload::<String>()?),
            (probe.as_str(), "after".to_string()),
            "resp3={resp3}: the sunsubscribe push was swallowed"
        );
    }
    Ok(())
}

#[tokio::test]
async fn killing_a_primary_promotes_its_replica_and_ends_its_subscribers() -> TestResult {
    let mut cluster = shared_cluster().await?;
    let shards = cluster.channels_on_each_shard(1).await?;
    let (owner, channel) = (shards[0].0, shards[0].1[0].clone());
    let replica = cluster.replica_of(owner).await?;
    let mut subscriber = RawConnection::open(owner, false).await?;
    subscriber.call(&["SSUBSCRIBE", &channel]).await?;
    // A replica takes SSUBSCRIBE for its primary's slots and gets the primary's SPUBLISHes
    // (they replicate).
    let mut on_replica = RawConnection::open(replica, false).await?;
    assert_eq!(
        on_replica.call(&["SSUBSCRIBE", &channel]).await?,
        raw_array(&["ssubscribe", &channel, "1"])
    );
    assert_eq!(
        spublish(owner, &channel, "replicated").await??,
        1,
        "counts the node's own subscribers"
    );
    assert_eq!(
        subscriber.read().await?,
        raw_array(&["smessage", &channel, "replicated"])
    );
    let replicated = on_replica
        .read()
        .await
        .map_err(|e| format!("replica subscriber before the kill: {e}"))?;
    assert_eq!(replicated, raw_array(&["smessage", &channel, "replicated"]));

    let killed_at = Instant::now();
    cluster.kill_node(owner).await?;
    let ended = subscriber.read().await;
    assert!(
        ended.is_err(),
        "the killed primary's subscriber got {ended:?}"
    );

    // Retry SSUBSCRIBE + SPUBLISH on the replica until it serves the channel.
    let mut attempts = 0;
    let delivered_after = poll_until(
        "sharded pub/sub on the promoted replica",
        TOPOLOGY_PATIENCE,
        || {
            attempts += 1;
            let channel = channel.clone();
            async move {
                match role(replica).await {
                    Ok(role) if role == "master" => {}
                    other => return Err(format!("ROLE {other:?}")),
                }
                let mut subscriber = RawConnection::open(replica, false)
                    .await
                    .map_err(|e| e.to_string())?;
                let reply = subscriber
                    .call(&["SSUBSCRIBE", &channel])
                    .await
                    .map_err(|e| e.to_string())?;
                if let Raw::Error(e) = reply {
                    return Err(e);
                }
                match spublish(replica, &channel, "back").await {
                    Ok(Ok(2)) => {}
                    other => return Err(format!("SPUBLISH: {other:?}")),
                }
                match subscriber.read().await {
                    Ok(m) if m == raw_array(&["smessage", &channel, "back"]) => {
                        Ok(killed_at.elapsed())
                    }
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await?;
    let promoted = cluster.wait_for_failover_of(owner).await?;
    let agreed_after = killed_at.elapsed();
    assert_eq!(
        promoted, replica,
        "the killed primary's replica is promoted"
    );
    // Its own subscribers kept their subscription through the promotion.
    let back = on_replica
        .read()
        .await
        .map_err(|e| format!("replica subscriber after the promotion: {e}"))?;
    assert_eq!(back, raw_array(&["smessage", &channel, "back"]));
    println!("timing: cluster kill primary -> first SSUBSCRIBE+SPUBLISH delivered on the promoted replica: {delivered_after:?} ({attempts} attempts)");
    println!("timing: cluster kill primary -> cluster_state:ok and slot map agreed on every node: {agreed_after:?}");
    Ok(())
}

#[tokio::test]
async fn a_planned_cluster_failover_tells_the_old_primarys_subscribers() -> TestResult {
    let cluster = shared_cluster().await?;
    let shards = cluster.channels_on_each_shard(1).await?;
    let (owner, channel) = (shards[0].0, shards[0].1[0].clone());
    let replica = cluster.replica_of(owner).await?;
    let mut raw2 = RawConnection::open(owner, false).await?;
    raw2.call(&["SSUBSCRIBE", &channel]).await?;
    let mut raw3 = RawConnection::open(owner, true).await?;
    raw3.call(&["SSUBSCRIBE", &channel]).await?;

    let started = Instant::now();
    cluster.failover(replica).await?;
    println!(
        "timing: CLUSTER FAILOVER -> promoted and agreed on every node: {:?}",
        started.elapsed()
    );
    let seen2 = raw2.read().await.map_err(|e| e.to_string());
    let seen3 = raw3.read().await.map_err(|e| e.to_string());
    println!("fact: after CLUSTER FAILOVER the old primary's RESP2 subscriber got {seen2:?}, RESP3 {seen3:?}");
    assert_eq!(seen2, Ok(raw_array(&["sunsubscribe", &channel, "0"])));
    assert_eq!(seen3, Ok(raw_push(&["sunsubscribe", &channel, "0"])));
    Ok(())
}

#[tokio::test]
async fn a_plain_publish_reaches_plain_subscribers_on_every_node() -> TestResult {
    let cluster = shared_cluster().await?;
    let ports: Vec<u16> = cluster
        .seed_urls()
        .iter()
        .filter_map(|url| url.rsplit(':').next()?.parse().ok())
        .collect();
    let mut subscribers = Vec::new();
    for &port in &ports {
        let mut subscriber = RawConnection::open(port, false).await?;
        subscriber.call(&["SUBSCRIBE", "plain"]).await?;
        subscribers.push(subscriber);
    }
    let receivers: i64 = query(
        ports[0],
        redis::cmd("PUBLISH").arg("plain").arg("everywhere"),
    )
    .await?;
    assert_eq!(
        receivers, 1,
        "PUBLISH counts only the receiving node's own subscribers"
    );
    for subscriber in &mut subscribers {
        assert_eq!(
            subscriber.read().await?,
            raw_array(&["message", "plain", "everywhere"])
        );
    }
    Ok(())
}

const SPUBLISH_LIBRARY: &str = "#!lua name=facts\n\
    redis.register_function('spublish_key', function(keys, args) return redis.call('SPUBLISH', keys[1], args[1]) end)\n\
    redis.register_function('spublish_arg', function(keys, args) return redis.call('SPUBLISH', args[2], args[1]) end)";

#[tokio::test]
async fn a_function_spublishes_to_its_key_channel_but_not_to_another_slot() -> TestResult {
    let cluster = shared_cluster().await?;
    for primary in cluster.primaries().await? {
        query::<String>(
            primary,
            redis::cmd("FUNCTION")
                .arg("LOAD")
                .arg("REPLACE")
                .arg(SPUBLISH_LIBRARY),
        )
        .await?;
    }
    let shards = cluster.channels_on_each_shard(2).await?;
    let (owner, channel, same_node_other_slot) =
        (shards[0].0, shards[0].1[0].clone(), shards[0].1[1].clone());
    let other_shard = shards[1].1[0].clone();
    let mut subscriber = RawConnection::open(owner, false).await?;
    subscriber.call(&["SSUBSCRIBE", &channel]).await?;

    let fcall = |function: &str, key: &str, extra: &str| {
        let mut command = redis::cmd("FCALL");
        command
            .arg(function)
            .arg(1)
            .arg(key)
            .arg("payload")
            .arg(extra);
        command
    };
    let receivers: i64 = query(owner, &fcall("spublish_key", &channel, "")).await?;
    assert_eq!(receivers, 1);
    assert_eq!(
        subscriber.read().await?,
        raw_array(&["smessage", &channel, "payload"])
    );

    for (what, target, expected) in [
        (
            "same node, other slot",
            &same_node_other_slot,
            "Script attempted to access keys that do not hash to the same slot",
        ),
        (
            "other shard",
            &other_shard,
            "Script attempted to access a non local key in a cluster node",
        ),
    ] {
        let outcome = try_query::<i64>(owner, &fcall("spublish_arg", &channel, target)).await?;
        let error = outcome
            .err()
            .ok_or_else(|| format!("{what}: SPUBLISH to another slot worked"))?;
        println!("fact: FCALL SPUBLISH to a channel in another slot ({what}): {error}");
        assert!(error.to_string().contains(expected), "{what}: {error}");
    }
    Ok(())
}

#[tokio::test]
async fn a_lossy_takeover_loses_acknowledged_writes() -> TestResult {
    // A cluster of its own: a takeover leaves replication histories the shared one need not
    // carry.
    let cluster = TestCluster::start().await?;
    let shards = cluster.channels_on_each_shard(2).await?;
    let (primary, kept_key, lost_key) =
        (shards[0].0, shards[0].1[0].clone(), shards[0].1[1].clone());
    query::<()>(primary, redis::cmd("SET").arg(&kept_key).arg("1")).await?;
    wait_replicated(primary, 1).await?;
    let mut lost = redis::cmd("SET");
    lost.arg(&lost_key).arg("1");
    let (promoted, replies) = cluster.takeover_losing(primary, &[lost]).await?;
    assert_eq!(
        replies,
        vec![Value::Okay],
        "the primary acknowledged the write"
    );
    assert_eq!(
        query::<Option<String>>(promoted, redis::cmd("GET").arg(&kept_key))
            .await?
            .as_deref(),
        Some("1")
    );
    assert_eq!(
        query::<Option<String>>(promoted, redis::cmd("GET").arg(&lost_key)).await?,
        None
    );
    Ok(())
}

#[tokio::test]
async fn a_new_primary_joins_and_takes_a_slot_with_its_keys() -> TestResult {
    // A cluster of its own: the shared one keeps three primaries, each with a replica.
    let mut cluster = TestCluster::start().await?;
    let added = cluster.add_primary().await?;
    let shards = cluster.channels_on_each_shard(1).await?;
    let (owner, key) = (shards[0].0, shards[0].1[0].clone());
    query::<()>(owner, redis::cmd("SET").arg(&key).arg("moved")).await?;
    cluster.migrate_slot(key_slot(&key), added).await?;
    assert_eq!(cluster.owner_of_slot(key_slot(&key)).await?, added);
    assert!(cluster.primaries().await?.contains(&added));
    assert_eq!(
        query::<Option<String>>(added, redis::cmd("GET").arg(&key))
            .await?
            .as_deref(),
        Some("moved")
    );
    // The new shard serves sharded pub/sub for it at once.
    let mut subscriber = RawConnection::open(added, false).await?;
    subscriber.call(&["SSUBSCRIBE", &key]).await?;
    assert_eq!(spublish(added, &key, "there").await??, 1);
    Ok(())
}
