//! `POST /publish` against a real redis-server and real gateways: every refusal with its status
//! and JSON error (the publish-only ones byte for byte), delivery to `/events` subscribers (memory backend), events stored with their
//! ids in Redis (redis backend), idempotency on the same and on another instance, the library
//! reloaded after `FUNCTION FLUSH`, `503` while Redis is down, and `ssehub token --publish`.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use ssehub::config::HistoryBackend;
use ssehub::Settings;
use support::*;

const SECRET: &str = "publish-test-secret-of-at-least-32-bytes";

/// Settings with a token key, every channel readable without a token.
fn publish_settings(redis: &TestRedis, backend: HistoryBackend) -> Settings {
    let mut settings = test_settings(redis);
    settings.auth.jwt_secret = serde_json::from_value(serde_json::json!(SECRET)).ok();
    settings.history.backend = backend;
    settings
}

/// A token that may publish to `patterns` (and read nothing beyond the public channels).
fn publisher_token(patterns: &[&str]) -> TestResult<String> {
    let publish: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
    Ok(ssehub::auth::mint_token(
        SECRET,
        &[],
        &publish,
        None,
        Duration::from_secs(600),
    )?)
}

/// A memory-backend gateway that takes payloads of up to `max_payload_bytes`, its Redis (keep
/// it for as long as the gateway) and a token that may publish to `orders:*`.
async fn limited_gateway(max_payload_bytes: usize) -> TestResult<(TestRedis, TestGateway, String)> {
    let redis = TestRedis::start().await?;
    let mut settings = publish_settings(&redis, HistoryBackend::Memory);
    settings.limits.max_payload_bytes = max_payload_bytes;
    let gateway = TestGateway::start_ready(settings).await?;
    let token = publisher_token(&["orders:*"])?;
    Ok((redis, gateway, token))
}

/// An answer of `/publish`.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: hyper::HeaderMap,
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

    fn error(&self) -> &str {
        self.json["error"].as_str().unwrap_or_default()
    }
}

/// Sends `method path` with `body` and returns the answer, its body parsed as JSON.
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> TestResult<Answer> {
    let response = send_body(addr, method, path, headers, body).await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = tokio::time::timeout(PATIENCE, response.into_body().collect())
        .await??
        .to_bytes();
    let json = serde_json::from_slice(&body)
        .map_err(|e| format!("{status}: body {body:?} is not JSON: {e}"))?;
    Ok(Answer {
        status,
        headers,
        json,
    })
}

/// `POST /publish?channel=<channel>` with a bearer `token` and optional `Idempotency-Key`.
async fn publish(
    addr: SocketAddr,
    channel: &str,
    token: &str,
    key: Option<&str>,
    payload: &str,
) -> TestResult<Answer> {
    let bearer = format!("Bearer {token}");
    let mut headers = vec![("authorization", bearer.as_str())];
    if let Some(key) = key {
        headers.push(("idempotency-key", key));
    }
    let path = format!("/publish?channel={channel}");
    send(addr, "POST", &path, &headers, payload.to_string()).await
}

#[tokio::test]
async fn every_refusal_has_its_status_and_a_json_error() -> TestResult {
    let (_redis, gateway, token) = limited_gateway(1024).await?;
    let addr = gateway.addr;
    let bearer = format!("Bearer {token}");
    let auth = [("authorization", bearer.as_str())];
    let reader = ssehub::auth::mint_token(
        SECRET,
        &["*".to_string()],
        &[],
        None,
        Duration::from_secs(600),
    )?;
    let reader = format!("Bearer {reader}");
    let long_key = "k".repeat(129);

    /// Method, path, headers, body, expected status.
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, Bytes, u16);
    let cases: Vec<Case> = vec![
        // No token, a broken one, one without the publish grant for this channel.
        ("POST", "/publish?channel=orders:1", vec![], "x".into(), 401),
        (
            "POST",
            "/publish?channel=orders:1",
            vec![("authorization", "Bearer not.a.token")],
            "x".into(),
            401,
        ),
        (
            "POST",
            "/publish?channel=orders:1",
            vec![("authorization", reader.as_str())],
            "x".into(),
            403,
        ),
        (
            "POST",
            "/publish?channel=news",
            auth.to_vec(),
            "x".into(),
            403,
        ),
        // Channel names as for /events, exactly one of them.
        ("POST", "/publish", auth.to_vec(), "x".into(), 400),
        (
            "POST",
            "/publish?channel=a+b",
            auth.to_vec(),
            "x".into(),
            400,
        ),
        (
            "POST",
            "/publish?channel=orders:1&channel=orders:2",
            auth.to_vec(),
            "x".into(),
            400,
        ),
        // Idempotency-Key: visible ASCII, 1 to 128.
        (
            "POST",
            "/publish?channel=orders:1",
            [auth.to_vec(), vec![("idempotency-key", "two words")]].concat(),
            "x".into(),
            400,
        ),
        (
            "POST",
            "/publish?channel=orders:1",
            [auth.to_vec(), vec![("idempotency-key", long_key.as_str())]].concat(),
            "x".into(),
            400,
        ),
        // Too large (declared and streamed), not UTF-8.
        (
            "POST",
            "/publish?channel=orders:1",
            auth.to_vec(),
            vec![b'x'; 1025].into(),
            413,
        ),
        (
            "POST",
            "/publish?channel=orders:1",
            auth.to_vec(),
            Bytes::from_static(b"\xff\xfe"),
            422,
        ),
        (
            "GET",
            "/publish?channel=orders:1",
            auth.to_vec(),
            "".into(),
            405,
        ),
        (
            "PUT",
            "/publish?channel=orders:1",
            auth.to_vec(),
            "x".into(),
            405,
        ),
    ];
    for (method, path, headers, body, expected) in cases {
        let answer = send(addr, method, path, &headers, body).await?;
        assert_eq!(
            answer.status, expected,
            "{method} {path} {headers:?}: {answer:?}"
        );
        assert!(!answer.error().is_empty(), "{answer:?}");
        if expected == 405 {
            assert_eq!(answer.headers["allow"], "POST");
        }
        if expected == 401 {
            assert_eq!(answer.headers["www-authenticate"], "Bearer");
        }
    }
    // Exactly the limit is accepted.
    let answer = send(
        addr,
        "POST",
        "/publish?channel=orders:1",
        &auth,
        vec![b'x'; 1024],
    )
    .await?;
    assert_eq!(answer.status, 200, "{answer:?}");
    gateway.stop().await
}

#[tokio::test]
async fn refusals_only_publish_makes_have_exact_bodies_and_headers() -> TestResult {
    let (_redis, gateway, token) = limited_gateway(4).await?;
    let bearer = format!("Bearer {token}");
    let auth = [("authorization", bearer.as_str())];
    /// Method, body, expected status, `Allow`, exact JSON body.
    type Case = (&'static str, Bytes, u16, Option<&'static str>, &'static str);
    let cases: [Case; 3] = [
        (
            "DELETE",
            Bytes::new(),
            405,
            Some("POST"),
            r#"{"error":"method not allowed"}"#,
        ),
        (
            "POST",
            Bytes::from_static(b"12345"),
            413,
            None,
            r#"{"error":"the payload is larger than 4 bytes (limits.max_payload_bytes)"}"#,
        ),
        (
            "POST",
            Bytes::from_static(b"\xff"),
            422,
            None,
            r#"{"error":"the payload is not UTF-8"}"#,
        ),
    ];
    for (method, body, status, allow, expected) in cases {
        let response = send_body(
            gateway.addr,
            method,
            "/publish?channel=orders:1",
            &auth,
            body,
        )
        .await?;
        let headers = response.headers().clone();
        assert_eq!(response.status().as_u16(), status, "{method}: {headers:?}");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(
            headers.get("allow").map(|v| v.as_bytes()),
            allow.map(str::as_bytes)
        );
        assert!(headers.get("retry-after").is_none(), "{headers:?}");
        let body = tokio::time::timeout(PATIENCE, response.into_body().collect())
            .await??
            .to_bytes();
        assert_eq!(
            String::from_utf8_lossy(&body),
            expected,
            "{method} answered {status}"
        );
    }
    gateway.stop().await
}

#[tokio::test]
async fn a_body_larger_than_the_limit_is_refused_without_a_content_length() -> TestResult {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_redis, gateway, token) = limited_gateway(1024).await?;
    // Chunked: the size is only known by reading, which stops at the limit.
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await?;
    let head = format!(
        "POST /publish?channel=orders:1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    let chunk = format!("400\r\n{}\r\n", "x".repeat(1024));
    stream.write_all(chunk.as_bytes()).await?;
    stream.write_all(chunk.as_bytes()).await?;
    // No final chunk: the answer must not wait for the rest of the body.
    let mut answer = vec![0u8; 1024];
    let read = tokio::time::timeout(PATIENCE, stream.read(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    gateway.stop().await
}

#[tokio::test]
async fn without_a_token_key_nobody_may_publish() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let answer = send(gateway.addr, "POST", "/publish?channel=news", &[], "x").await?;
    assert_eq!(answer.status, 401, "{answer:?}");
    assert!(
        answer.error().contains("no token key is configured"),
        "{answer:?}"
    );
    gateway.stop().await
}

#[tokio::test]
async fn a_published_payload_reaches_subscribers_of_every_memory_instance() -> TestResult {
    let redis = TestRedis::start().await?;
    let first = TestGateway::start_ready(publish_settings(&redis, HistoryBackend::Memory)).await?;
    let second = TestGateway::start_ready(publish_settings(&redis, HistoryBackend::Memory)).await?;
    let mut on_first = first.subscribe("channel=orders:1").await?;
    let mut on_second = second.subscribe("channel=orders:1").await?;
    on_first.next_block().await?;
    on_second.next_block().await?;
    let token = publisher_token(&["orders:*"])?;
    let payload = "{\"type\":\"created\",\"n\":1} é";
    let id = publish(first.addr, "orders:1", &token, None, payload)
        .await?
        .id()?;
    assert!(id.starts_with('m'), "{id}");
    assert_eq!(on_first.next_event().await?.data(), payload);
    assert_eq!(on_second.next_event().await?.data(), payload);
    let other = publish(second.addr, "orders:1", &token, None, payload)
        .await?
        .id()?;
    assert_ne!(id, other);
    first.stop().await?;
    second.stop().await
}

#[tokio::test]
async fn a_repeated_idempotency_key_publishes_once_per_channel_on_any_memory_instance() -> TestResult
{
    let redis = TestRedis::start().await?;
    let first = TestGateway::start_ready(publish_settings(&redis, HistoryBackend::Memory)).await?;
    let second = TestGateway::start_ready(publish_settings(&redis, HistoryBackend::Memory)).await?;
    let mut client = first.subscribe("channel=orders:1&channel=orders:2").await?;
    client.next_block().await?;
    let token = publisher_token(&["orders:*"])?;

    let id = publish(first.addr, "orders:1", &token, Some("k-1"), "once")
        .await?
        .id()?;
    let again = publish(first.addr, "orders:1", &token, Some("k-1"), "once")
        .await?
        .id()?;
    let elsewhere = publish(second.addr, "orders:1", &token, Some("k-1"), "once")
        .await?
        .id()?;
    assert_eq!((&again, &elsewhere), (&id, &id));
    // The same key on another channel is another publish.
    let other_channel = publish(second.addr, "orders:2", &token, Some("k-1"), "other")
        .await?
        .id()?;
    assert_ne!(other_channel, id);
    publish(first.addr, "orders:1", &token, None, "marker")
        .await?
        .id()?;
    // In Redis' order: one "once", then "other" and "marker".
    assert_eq!(client.next_data(3).await?, ["once", "other", "marker"]);
    client.expect_no_event(Duration::from_millis(300)).await?;
    first.stop().await?;
    second.stop().await
}

/// The ssehub function library's keys of `channel` (no hash tag).
fn history_key(channel: &str) -> String {
    format!("ssehub:{{{channel}}}:h")
}

/// `(stream id, payload)` of every entry of `channel`'s history in Redis.
async fn stored_events(redis: &TestRedis, channel: &str) -> TestResult<Vec<(String, String)>> {
    let mut connection = redis.connection().await?;
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(history_key(channel))
        .arg("-")
        .arg("+")
        .query_async(&mut connection)
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

/// The channel's epoch in Redis.
async fn epoch(redis: &TestRedis, channel: &str) -> TestResult<String> {
    let mut connection = redis.connection().await?;
    let epoch: Option<String> = redis::cmd("HGET")
        .arg(format!("ssehub:{{{channel}}}:m"))
        .arg("e")
        .query_async(&mut connection)
        .await?;
    Ok(epoch.ok_or("the channel has no epoch")?)
}

#[tokio::test]
async fn the_redis_backend_stores_the_event_and_answers_its_stream_id() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(publish_settings(&redis, HistoryBackend::Redis)).await?;
    let token = publisher_token(&["orders:*"])?;
    let id = publish(gateway.addr, "orders:1", &token, None, "stored é")
        .await?
        .id()?;
    let stored = stored_events(&redis, "orders:1").await?;
    assert_eq!(stored.len(), 1, "{stored:?}");
    let (stream_id, payload) = &stored[0];
    assert_eq!(payload, "stored é");
    let epoch = epoch(&redis, "orders:1").await?;
    assert_eq!(id, ssehub::position::single_channel_id(&epoch, stream_id));
    gateway.stop().await
}

#[tokio::test]
async fn a_repeated_idempotency_key_stores_once_on_any_redis_instance() -> TestResult {
    let redis = TestRedis::start().await?;
    let first = TestGateway::start_ready(publish_settings(&redis, HistoryBackend::Redis)).await?;
    let second = TestGateway::start_ready(publish_settings(&redis, HistoryBackend::Redis)).await?;
    let token = publisher_token(&["orders:*"])?;
    let id = publish(first.addr, "orders:1", &token, Some("k-1"), "once")
        .await?
        .id()?;
    for gateway in [&first, &second] {
        let again = publish(gateway.addr, "orders:1", &token, Some("k-1"), "once")
            .await?
            .id()?;
        assert_eq!(again, id);
    }
    assert_eq!(stored_events(&redis, "orders:1").await?.len(), 1);
    let other = publish(second.addr, "orders:2", &token, Some("k-1"), "other")
        .await?
        .id()?;
    assert_ne!(other, id);
    assert_eq!(stored_events(&redis, "orders:2").await?.len(), 1);
    first.stop().await?;
    second.stop().await
}

#[tokio::test]
async fn the_redis_backend_reloads_the_library_after_function_flush() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(publish_settings(&redis, HistoryBackend::Redis)).await?;
    let token = publisher_token(&["orders:*"])?;
    publish(gateway.addr, "orders:1", &token, None, "before")
        .await?
        .id()?;
    let mut connection = redis.connection().await?;
    redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async::<()>(&mut connection)
        .await?;
    publish(gateway.addr, "orders:1", &token, None, "after")
        .await?
        .id()?;
    let payloads: Vec<String> = stored_events(&redis, "orders:1")
        .await?
        .into_iter()
        .map(|(_, payload)| payload)
        .collect();
    assert_eq!(payloads, ["before", "after"]);
    gateway.stop().await
}

#[tokio::test]
async fn redis_payload_limits_of_another_instance_answer_413() -> TestResult {
    let redis = TestRedis::start().await?;
    // A library loaded with a smaller payload limit than this instance's own.
    let mut small = publish_settings(&redis, HistoryBackend::Redis);
    small.limits.max_payload_bytes = 8;
    let bounds = ssehub::functions::LibraryBounds::from_settings(&small);
    let gateway = TestGateway::start_ready(publish_settings(&redis, HistoryBackend::Redis)).await?;
    // Loaded after this instance loaded its own, as by an instance started later.
    let mut connection = redis.connection().await?;
    ssehub::functions::load_library(&mut connection, &bounds).await?;
    let token = publisher_token(&["orders:*"])?;
    let answer = publish(gateway.addr, "orders:1", &token, None, "more than eight").await?;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert!(
        answer.error().contains("limits.max_payload_bytes"),
        "{answer:?}"
    );
    gateway.stop().await
}

#[tokio::test]
async fn publishing_answers_503_while_redis_is_down_and_recovers() -> TestResult {
    for backend in [HistoryBackend::Memory, HistoryBackend::Redis] {
        let mut redis = TestRedis::start().await?;
        let gateway = TestGateway::start_ready(publish_settings(&redis, backend)).await?;
        let token = publisher_token(&["orders:*"])?;
        publish(gateway.addr, "orders:1", &token, None, "up")
            .await?
            .id()?;
        redis.kill().await?;
        let answer = publish(gateway.addr, "orders:1", &token, None, "down").await?;
        assert_eq!(answer.status, 503, "{backend:?}: {answer:?}");
        assert!(!answer.error().is_empty());
        redis.restart().await?;
        let addr = gateway.addr;
        let token = token.as_str();
        eventually("publishing works again after Redis is back", || async move {
            matches!(publish(addr, "orders:1", token, None, "back").await, Ok(a) if a.status == 200)
        })
        .await?;
        gateway.stop().await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_frozen_redis_answers_503_within_the_timeouts() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = publish_settings(&redis, HistoryBackend::Memory);
    settings.redis.connect_timeout_secs = 1;
    settings.redis.command_timeout_secs = 1;
    let gateway = TestGateway::start_ready(settings).await?;
    let token = publisher_token(&["orders:*"])?;
    publish(gateway.addr, "orders:1", &token, None, "up")
        .await?
        .id()?;
    redis.freeze().await?;
    let started = tokio::time::Instant::now();
    let answer = publish(gateway.addr, "orders:1", &token, None, "frozen").await;
    redis.thaw().await?;
    assert_eq!(answer?.status, 503);
    assert!(started.elapsed() < PATIENCE, "{:?}", started.elapsed());
    gateway.stop().await
}

#[tokio::test]
async fn a_token_minted_with_publish_may_publish_but_not_read() -> TestResult {
    let redis = TestRedis::start().await?;
    let dir = ScratchDir::create(&format!("ssehub-publish-test-{}", std::process::id()))?;
    let config = dir.0.join("config.toml");
    std::fs::write(&config, "")?;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .arg("--config")
        .arg(&config)
        .args(["token", "--publish", "orders:*", "--publish", "audit"])
        .env_clear()
        .env("SSEHUB__AUTH__JWT_SECRET", SECRET)
        .output()?;
    assert!(output.status.success(), "{output:?}");
    let token = String::from_utf8(output.stdout)?.trim().to_string();

    let mut settings = publish_settings(&redis, HistoryBackend::Memory);
    settings.channels.public.clear();
    let gateway = TestGateway::start_ready(settings).await?;
    publish(gateway.addr, "orders:1", &token, None, "ok")
        .await?
        .id()?;
    publish(gateway.addr, "audit", &token, None, "ok")
        .await?
        .id()?;
    let answer = publish(gateway.addr, "news", &token, None, "no").await?;
    assert_eq!(answer.status, 403);
    let bearer = format!("Bearer {token}");
    let (status, _) = open_status(
        gateway.addr,
        "/events?channel=orders:1",
        &[("authorization", bearer.as_str())],
    )
    .await?;
    assert_eq!(status, 403, "a publish grant is no read grant");
    gateway.stop().await
}
