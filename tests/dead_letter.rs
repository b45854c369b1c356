//! The dead-letter stream (`[dead_letter]`) and correlation ids (`log.correlation_id_field`,
//! `X-Correlation-Id`), with a real `redis-server` and gateways as real processes (the
//! `ssehub_dead_letters_total` counters are per process):
//!
//! - every drop reason, received by two instances, ends in exactly one stream entry with every
//!   field right (the binary payload byte-exact, a too-large one truncated), on either history
//!   backend; one instance counts `written`, the other `duplicate`;
//! - the stream is trimmed near `dead_letter.max_len`;
//! - Redis gone while dead-lettering: the entries are counted `failed`, clients still get every
//!   good event in order, and the gateway keeps running;
//! - drop logs and HTTP publish logs carry `correlation_id` (field, dotted path, header);
//! - a stream name whose braces are no hash tag is refused, naming the key;
//! - in a Redis Cluster the entry lands on the stream's shard, not the channel's.

mod support;

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use ssehub::functions::{self, LibraryBounds};
use support::*;

const STREAM: &str = "ssehub:dead-letters";
const SECRET: &str = "dead-letter-test-secret-of-at-least-32-bytes";
/// `limits.max_payload_bytes` of these gateways: small, so a too-large payload is cheap.
const MAX_PAYLOAD: usize = 64;

/// One stream entry: its id and its fields in order.
type Entry = (String, Vec<(String, Vec<u8>)>);

async fn entries(redis: &mut MultiplexedConnection) -> TestResult<Vec<Entry>> {
    let raw: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
        .arg(STREAM)
        .arg("-")
        .arg("+")
        .query_async(redis)
        .await?;
    let mut out = Vec::new();
    for (id, flat) in raw {
        let mut fields = Vec::new();
        for pair in flat.chunks_exact(2) {
            fields.push((String::from_utf8(pair[0].clone())?, pair[1].clone()));
        }
        out.push((id, fields));
    }
    Ok(out)
}

async fn stream_len(redis: &mut MultiplexedConnection) -> TestResult<u64> {
    Ok(redis::cmd("XLEN").arg(STREAM).query_async(redis).await?)
}

/// A field's value.
fn field<'e>(entry: &'e Entry, name: &str) -> Option<&'e [u8]> {
    entry
        .1
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_slice())
}

/// `ssehub_dead_letters_total{outcome}` of one gateway.
async fn dead_letters(gateway: &GatewayProcess, outcome: &str) -> TestResult<f64> {
    metric(
        gateway.admin,
        &format!("ssehub_dead_letters_total{{outcome=\"{outcome}\"}}"),
    )
    .await
}

/// `outcome` summed over `gateways`.
async fn total(gateways: &[&GatewayProcess], outcome: &str) -> TestResult<f64> {
    let mut sum = 0.0;
    for gateway in gateways {
        sum += dead_letters(gateway, outcome).await?;
    }
    Ok(sum)
}

/// A gateway with dead-lettering on, ready, and its `extra` settings.
async fn start_gateway(redis: &TestRedis, extra: &[(&str, &str)]) -> TestResult<GatewayProcess> {
    start_configured(redis, "", extra).await
}

/// The JSON Schema of channel `orders` in [`start_validating_gateway`]: `qty`, if present, is an
/// integer.
const ORDERS_SCHEMA: &str = r#"{"type": "object", "properties": {"qty": {"type": "integer"}}}"#;

/// Like [`start_gateway`], with [`ORDERS_SCHEMA`] checking channel `orders` (`[[schemas]]`
/// tables cannot be set from the environment: they go in a configuration file).
async fn start_validating_gateway(
    redis: &TestRedis,
    extra: &[(&str, &str)],
) -> TestResult<GatewayProcess> {
    let schemas = "[[schemas]]\nchannels = [\"orders\"]\nfile = \"orders.json\"\n";
    start_configured(redis, schemas, extra).await
}

/// A gateway with dead-lettering on, the configuration file `config` (next to an
/// `orders.json` holding [`ORDERS_SCHEMA`]) and its `extra` settings, once it is ready.
async fn start_configured(
    redis: &TestRedis,
    config: &str,
    extra: &[(&str, &str)],
) -> TestResult<GatewayProcess> {
    let admin_port = free_port()?;
    let folder = std::env::temp_dir().join(format!("ssehub-dead-letter-{admin_port}"));
    std::fs::create_dir_all(&folder)?;
    std::fs::write(folder.join("orders.json"), ORDERS_SCHEMA)?;
    let config_file = folder.join("config.toml");
    std::fs::write(&config_file, config)?;
    let max_payload = MAX_PAYLOAD.to_string();
    let mut env = vec![
        ("SSEHUB__DEAD_LETTER__STREAM", STREAM),
        ("SSEHUB__LIMITS__MAX_PAYLOAD_BYTES", max_payload.as_str()),
        ("SSEHUB__AUTH__JWT_SECRET", SECRET),
    ];
    env.extend_from_slice(extra);
    let gateway =
        GatewayProcess::launch_configured(config_file, admin_port, &redis.url(), &env, None)?;
    let admin = gateway.admin;
    eventually("the gateway binary is ready", || async move {
        matches!(get(admin, "/readyz", &[]).await, Ok((200, _)))
    })
    .await?;
    Ok(gateway)
}

/// Waits until `count` connections subscribe to the wire channel `wire` in Redis.
async fn wait_for_subscribers(redis: &TestRedis, wire: &str, count: i64) -> TestResult {
    let connection = redis.connection().await?;
    eventually(&format!("{count} subscribers of {wire}"), || {
        let mut connection = connection.clone();
        async move {
            let reply: redis::RedisResult<(String, i64)> = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(wire)
                .query_async(&mut connection)
                .await;
            matches!(reply, Ok((_, n)) if n == count)
        }
    })
    .await
}

/// Both history backends publish differently; this is how a test puts a raw payload into Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Memory,
    Redis,
}

impl Backend {
    fn env(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Redis => "redis",
        }
    }

    fn wire(self, channel: &str) -> TestResult<String> {
        match self {
            Backend::Memory => Ok(channel.to_string()),
            Backend::Redis => functions::live_channel(channel).ok_or("no live channel".into()),
        }
    }

    /// Publishes `payload` raw; with the redis backend returns the event's SSE id.
    async fn publish(
        self,
        redis: &TestRedis,
        channel: &str,
        payload: &[u8],
    ) -> TestResult<Option<String>> {
        match self {
            Backend::Memory => {
                let receivers = redis.publish(channel, payload).await?;
                assert_eq!(receivers, 2, "both instances receive the message");
                Ok(None)
            }
            Backend::Redis => {
                let reply = redis.publish_stored(channel, payload).await?;
                let (epoch, id) = reply.split_once(' ').ok_or("unexpected reply")?;
                Ok(Some(ssehub::position::single_channel_id(epoch, id)))
            }
        }
    }
}

/// Loads the function library with a larger payload bound than the gateways', as an instance
/// configured with a larger `limits.max_payload_bytes` would: Redis then stores payloads these
/// gateways drop as too large.
async fn load_library_accepting_large_payloads(redis: &TestRedis) -> TestResult {
    let mut settings = ssehub::Settings::default();
    settings.limits.max_payload_bytes = 1024 * 1024;
    let bounds = LibraryBounds::from_settings(&settings);
    let mut connection = redis.connection().await?;
    functions::load_library(&mut connection, &bounds).await?;
    Ok(())
}

fn is_rfc3339_utc_millis(text: &str) -> bool {
    let bytes = text.as_bytes();
    let digits = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 22];
    bytes.len() == 24
        && digits.iter().all(|&i| bytes[i].is_ascii_digit())
        && [
            (4, b'-'),
            (7, b'-'),
            (10, b'T'),
            (13, b':'),
            (16, b':'),
            (19, b'.'),
            (23, b'Z'),
        ]
        .iter()
        .all(|&(i, c)| bytes[i] == c)
}

/// The scenario of test 1 on `backend`: each drop reason published once while two instances
/// serve the channel ends in exactly one entry.
async fn each_drop_reason_is_dead_lettered_once(backend: Backend) -> TestResult {
    let redis = TestRedis::start().await?;
    let settings = [("SSEHUB__HISTORY__BACKEND", backend.env())];
    let a = start_validating_gateway(&redis, &settings).await?;
    let b = start_validating_gateway(&redis, &settings).await?;
    let _client_a = a.subscribe_from("127.0.0.1", "channel=orders").await?;
    let _client_b = b.subscribe_from("127.0.0.1", "channel=orders").await?;
    wait_for_subscribers(&redis, &backend.wire("orders")?, 2).await?;
    if backend == Backend::Redis {
        load_library_accepting_large_payloads(&redis).await?;
    }
    let mut connection = redis.connection().await?;

    let binary: Vec<u8> = b"\x00\xff\xfe binary \x80\r\n\x01".to_vec();
    let large = format!(
        r#"{{"correlationId":"order-77","pad":"{}"}}"#,
        "x".repeat(3 * MAX_PAYLOAD)
    )
    .into_bytes();
    let invalid = br#"{"correlationId":"order-78","qty":"three"}"#;
    let cases: [(&str, &[u8], Option<&str>); 3] = [
        ("invalid_utf8", &binary, None),
        ("too_large", &large, Some("order-77")),
        ("schema_invalid", invalid, Some("order-78")),
    ];
    for (done, (reason, payload, correlation_id)) in cases.into_iter().enumerate() {
        let position = backend.publish(&redis, "orders", payload).await?;
        let seen = (done + 1) as f64;
        eventually(&format!("both instances dead-letter {reason}"), || async {
            let written = total(&[&a, &b], "written").await.unwrap_or(0.0);
            let duplicate = total(&[&a, &b], "duplicate").await.unwrap_or(0.0);
            written + duplicate >= 2.0 * seen
        })
        .await?;
        assert_eq!(total(&[&a, &b], "written").await?, seen, "{reason}");
        assert_eq!(total(&[&a, &b], "duplicate").await?, seen, "{reason}");
        assert_eq!(total(&[&a, &b], "failed").await?, 0.0, "{reason}");

        let all = entries(&mut connection).await?;
        assert_eq!(all.len(), done + 1, "one entry per drop: {all:?}");
        let entry = &all[done];
        let kept = &payload[..payload.len().min(MAX_PAYLOAD)];
        assert_eq!(field(entry, "channel"), Some(&b"orders"[..]));
        assert_eq!(field(entry, "reason"), Some(reason.as_bytes()));
        assert_eq!(
            field(entry, "bytes"),
            Some(payload.len().to_string().as_bytes())
        );
        assert_eq!(field(entry, "payload"), Some(kept), "{reason}: byte-exact");
        let received_at = std::str::from_utf8(field(entry, "received_at").unwrap_or_default())?;
        assert!(is_rfc3339_utc_millis(received_at), "{received_at:?}");
        assert_eq!(
            field(entry, "correlation_id"),
            correlation_id.map(str::as_bytes)
        );
        assert_eq!(
            field(entry, "id"),
            position.as_deref().map(str::as_bytes),
            "the event's SSE id with the redis backend only"
        );
    }
    Ok(())
}

#[tokio::test]
async fn each_drop_reason_ends_in_one_entry_with_the_memory_backend() -> TestResult {
    each_drop_reason_is_dead_lettered_once(Backend::Memory).await
}

#[tokio::test]
async fn each_drop_reason_ends_in_one_entry_with_the_redis_backend() -> TestResult {
    each_drop_reason_is_dead_lettered_once(Backend::Redis).await
}

#[tokio::test]
async fn the_stream_is_trimmed_near_max_len() -> TestResult {
    const MAX_LEN: u64 = 20;
    const PUBLISHED: usize = 300;
    let redis = TestRedis::start().await?;
    let max_len = MAX_LEN.to_string();
    let gateway = start_gateway(&redis, &[("SSEHUB__DEAD_LETTER__MAX_LEN", &max_len)]).await?;
    let _client = gateway.subscribe_from("127.0.0.1", "channel=bulk").await?;
    wait_for_subscribers(&redis, "bulk", 1).await?;
    let mut connection = redis.connection().await?;
    for i in 0..PUBLISHED {
        // Distinct payloads: identical ones within the window are one message to the dedupe.
        let mut payload = format!("bad-{i}").into_bytes();
        payload.push(0xff);
        redis::cmd("PUBLISH")
            .arg("bulk")
            .arg(payload)
            .query_async::<i64>(&mut connection)
            .await?;
    }
    eventually("every drop is written", || async {
        dead_letters(&gateway, "written").await.unwrap_or(0.0) >= PUBLISHED as f64
    })
    .await?;
    let len = stream_len(&mut connection).await?;
    // `MAXLEN ~` removes whole stream nodes (100 entries each by default) only while at least
    // MAX_LEN entries remain: between MAX_LEN and MAX_LEN + 100 are left.
    assert!(
        (MAX_LEN..MAX_LEN + 100).contains(&len),
        "XLEN {len} after {PUBLISHED} entries with max_len {MAX_LEN}"
    );
    Ok(())
}

/// The output buffer (`omem`) of Redis's pub/sub client connections, from `CLIENT LIST`.
async fn subscriber_output_buffers(redis: &TestRedis) -> TestResult<Vec<u64>> {
    let mut connection = redis.connection().await?;
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut connection)
        .await?;
    let mut buffers = Vec::new();
    for line in list.lines() {
        let fields: Vec<(&str, &str)> = line
            .split(' ')
            .filter_map(|pair| pair.split_once('='))
            .collect();
        let get = |name: &str| fields.iter().find(|(key, _)| *key == name).map(|(_, v)| *v);
        if get("sub").is_some_and(|subs| subs != "0") {
            buffers.push(get("omem").unwrap_or("unknown").parse()?);
        }
    }
    Ok(buffers)
}

#[tokio::test]
async fn redis_gone_while_dead_lettering_counts_failed_and_delivery_goes_on() -> TestResult {
    const ROUNDS: usize = 10;
    let mut redis = TestRedis::start().await?;
    let fast = [
        ("SSEHUB__REDIS__CONNECT_TIMEOUT_SECS", "1"),
        ("SSEHUB__REDIS__COMMAND_TIMEOUT_SECS", "1"),
    ];
    let mut gateway = start_gateway(&redis, &fast).await?;
    let mut client = gateway
        .subscribe_from("127.0.0.1", "channel=orders")
        .await?;
    wait_for_subscribers(&redis, "orders", 1).await?;

    // Stopped, the gateway reads nothing: every message waits in its socket buffer, all
    // written by Redis before Redis goes.
    gateway.signal("-STOP").await?;
    for i in 0..ROUNDS {
        assert_eq!(redis.publish("orders", format!("good-{i}")).await?, 1);
        assert_eq!(redis.publish("orders", [0xff, i as u8]).await?, 1);
    }
    eventually("Redis has written everything to the subscriber", || async {
        matches!(subscriber_output_buffers(&redis).await, Ok(buffers) if buffers == [0])
    })
    .await?;
    redis.kill().await?;
    gateway.signal("-CONT").await?;

    let expected: Vec<String> = (0..ROUNDS).map(|i| format!("good-{i}")).collect();
    assert_eq!(client.next_data(ROUNDS).await?, expected);
    eventually("every bad payload is counted failed", || async {
        dead_letters(&gateway, "failed").await.unwrap_or(0.0) >= ROUNDS as f64
    })
    .await?;
    assert_eq!(dead_letters(&gateway, "failed").await?, ROUNDS as f64);
    assert_eq!(dead_letters(&gateway, "written").await?, 0.0);
    assert!(
        gateway.is_running(),
        "the gateway exited:\n{}",
        gateway.log()
    );
    assert_eq!(get(gateway.admin, "/healthz", &[]).await?.0, 200);
    Ok(())
}

/// Waits until a log line has every one of `words`; returns it.
async fn log_line(gateway: &GatewayProcess, words: &[&str]) -> TestResult<String> {
    let find = || {
        gateway
            .log()
            .lines()
            .find(|line| words.iter().all(|word| line.contains(word)))
            .map(str::to_string)
    };
    eventually(&format!("a log line with {words:?}"), || async {
        find().is_some()
    })
    .await
    .map_err(|e| format!("{e}; gateway log:\n{}", gateway.log()))?;
    Ok(find().unwrap_or_default())
}

async fn publish_over_http(
    gateway: &GatewayProcess,
    channel: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> TestResult<u16> {
    let token = ssehub::auth::mint_token(
        SECRET,
        &[],
        &[channel.to_string()],
        None,
        Duration::from_secs(600),
    )?;
    let bearer = format!("Bearer {token}");
    let mut all = vec![("authorization", bearer.as_str())];
    all.extend_from_slice(headers);
    let response = send_body(
        gateway.addr,
        "POST",
        &format!("/publish?channel={channel}"),
        &all,
        body.to_string(),
    )
    .await?;
    Ok(response.status().as_u16())
}

#[tokio::test]
async fn correlation_ids_are_in_the_json_logs_of_drops_and_publishes() -> TestResult {
    let redis = TestRedis::start().await?;
    let json = ("SSEHUB__LOG__FORMAT", "json");
    let top_level = start_gateway(&redis, &[json]).await?;
    let dotted = start_gateway(
        &redis,
        &[
            json,
            (
                "SSEHUB__LOG__CORRELATION_ID_FIELD",
                "metadata.correlationId",
            ),
        ],
    )
    .await?;
    let _a = top_level
        .subscribe_from("127.0.0.1", "channel=drops")
        .await?;
    let _b = dotted.subscribe_from("127.0.0.1", "channel=drops").await?;
    wait_for_subscribers(&redis, "drops", 2).await?;

    // A dropped payload (too large), read from the field or the dotted path.
    let pad = "x".repeat(2 * MAX_PAYLOAD);
    let payload = format!(
        r#"{{"correlationId":"top-1","metadata":{{"correlationId":"nested-2"}},"pad":"{pad}"}}"#
    );
    redis.publish("drops", payload).await?;
    let dropped = "dropped a payload";
    log_line(&top_level, &[dropped, r#""correlation_id":"top-1""#]).await?;
    log_line(&dotted, &[dropped, r#""correlation_id":"nested-2""#]).await?;
    // The failure or success of dead-lettering it is logged apart; the drop line is enough here.

    // HTTP publishes: the payload's field, then the header, which wins.
    let body = r#"{"metadata":{"correlationId":"nested-3"},"n":1}"#;
    assert_eq!(publish_over_http(&dotted, "http", &[], body).await?, 200);
    let line = log_line(
        &dotted,
        &["published over HTTP", r#""correlation_id":"nested-3""#],
    )
    .await?;
    assert!(line.contains(r#""channel":"http""#), "{line}");
    let header = [("x-correlation-id", "header-4")];
    assert_eq!(
        publish_over_http(&dotted, "http", &header, body).await?,
        200
    );
    log_line(
        &dotted,
        &["published over HTTP", r#""correlation_id":"header-4""#],
    )
    .await?;
    let bad = [("x-correlation-id", "two words")];
    assert_eq!(publish_over_http(&dotted, "http", &bad, body).await?, 400);
    Ok(())
}

#[test]
fn a_stream_name_whose_braces_are_no_hash_tag_is_refused() {
    for bad in ["dl}", "{dl", "{}dl", "dl{}", "}{dl"] {
        let mut settings = ssehub::Settings::default();
        settings.dead_letter.stream = bad.to_string();
        let error = settings.validated().err().map(|e| e.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("dead_letter.stream")),
            "{bad:?}: {error:?}"
        );
    }
    for good in ["dl", "{ops}:dl", "a{b}c"] {
        let mut settings = ssehub::Settings::default();
        settings.dead_letter.stream = good.to_string();
        assert!(settings.validated().is_ok(), "{good:?}");
    }
}

/// In a Redis Cluster the entry goes to the shard owning the stream's slot (the writer's cluster
/// connection routes the script by its keys), whichever shard the channel is on.
#[tokio::test]
async fn in_a_cluster_the_entry_lands_on_the_streams_shard() -> TestResult {
    use support::topology::{query, TestCluster};
    let cluster = TestCluster::start().await?;
    let stream_owner = cluster.owner_of_slot(cluster.slot_of(STREAM)).await?;
    let (channel_owner, channel) = cluster
        .channels_on_each_shard(1)
        .await?
        .into_iter()
        .find(|(primary, _)| *primary != stream_owner)
        .and_then(|(primary, names)| Some((primary, names.into_iter().next()?)))
        .ok_or("no shard apart from the stream's")?;
    let mut settings = ssehub::Settings::default();
    settings.redis.mode = ssehub::config::RedisMode::Cluster;
    settings.redis.nodes = cluster.seed_urls();
    settings.channels.public = vec!["*".to_string()];
    settings.dead_letter.stream = STREAM.to_string();
    let gateway = TestGateway::start_ready(settings).await?;
    let _client = gateway.subscribe(&format!("channel={channel}")).await?;
    let subscribed = || async {
        let mut count = redis::cmd("PUBSUB");
        count.arg("SHARDNUMSUB").arg(&channel);
        matches!(
            query::<(String, i64)>(channel_owner, &count).await,
            Ok((_, 1))
        )
    };
    eventually("the channel's shard has the subscription", subscribed).await?;

    let mut publish = redis::cmd("SPUBLISH");
    publish.arg(&channel).arg(&b"\xffcluster"[..]);
    query::<i64>(channel_owner, &publish).await?;
    let mut range = redis::cmd("XRANGE");
    range.arg(STREAM).arg("-").arg("+");
    eventually("the entry is on the stream's shard", || async {
        matches!(query::<Vec<(String, Vec<Vec<u8>>)>>(stream_owner, &range).await, Ok(e) if e.len() == 1)
    })
    .await?;
    let entries: Vec<(String, Vec<Vec<u8>>)> = query(stream_owner, &range).await?;
    let fields = &entries[0].1;
    assert_eq!(
        fields[..4],
        [
            b"channel".to_vec(),
            channel.into_bytes(),
            b"reason".to_vec(),
            b"invalid_utf8".to_vec()
        ]
    );
    Ok(())
}
