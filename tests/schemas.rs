//! `[[schemas]]` against a real redis-server and real gateways, with both history backends:
//! valid payloads pass verbatim, invalid and non-JSON ones are not delivered (and the next valid
//! one is), unmatched channels are untouched, the first matching table applies, `POST /publish`
//! answers `422` with the errors' paths and publishes nothing. The real binary shows that drops
//! and `422`s are counted, that a relative `file` is found next to the configuration file, and
//! that a bad schema file stops start-up naming it.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::BodyExt;
use ssehub::config::{HistoryBackend, SchemaSettings};
use ssehub::Settings;
use support::*;

const SECRET: &str = "schemas-test-secret-of-at-least-32-bytes";

/// A realistic order: what the benchmark's schema checks too.
const ORDER_SCHEMA: &str = r#"{
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["id", "customer", "items", "status"],
    "properties": {
        "id": {"type": "string", "minLength": 1},
        "customer": {"type": "string"},
        "status": {"enum": ["created", "paid", "shipped"]},
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["sku", "qty"],
                "properties": {
                    "sku": {"type": "string"},
                    "qty": {"type": "integer", "minimum": 1},
                    "price": {"type": "number", "minimum": 0}
                }
            }
        }
    }
}"#;

/// Valid against [`ORDER_SCHEMA`], spaced oddly: delivery must keep it byte for byte.
const VALID_ORDER: &str =
    r#"{"id":"o-1", "customer":"c-9","status":"paid","items":[ {"sku":"A-1","qty":2} ]}"#;
/// Invalid at `/items/0/qty` only.
const ZERO_QTY: &str =
    r#"{"id":"o-2","customer":"c-9","status":"paid","items":[{"sku":"A","qty":0}]}"#;

/// A scratch folder holding schema files.
struct SchemaFolder(ScratchDir);

impl SchemaFolder {
    fn create(name: &str) -> TestResult<SchemaFolder> {
        let dir = ScratchDir::create(&format!("ssehub-schemas-{}-{name}", std::process::id()))?;
        Ok(SchemaFolder(dir))
    }

    /// Writes `document` as `name` and returns its path.
    fn write(&self, name: &str, document: &str) -> TestResult<PathBuf> {
        let path = self.0 .0.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, document)?;
        Ok(path)
    }
}

fn table(channels: &[&str], file: &Path) -> SchemaSettings {
    SchemaSettings {
        channels: channels.iter().map(|c| c.to_string()).collect(),
        file: file.to_path_buf(),
    }
}

/// Every channel public, a key for publish tokens, and `schemas`.
fn schema_settings(
    redis: &TestRedis,
    backend: HistoryBackend,
    schemas: Vec<SchemaSettings>,
) -> Settings {
    let mut settings = test_settings(redis);
    settings.history.backend = backend;
    settings.auth.jwt_secret = serde_json::from_value(serde_json::json!(SECRET)).ok();
    settings.schemas = schemas;
    settings
}

/// Publishes `payload` on `channel` the way the backend is fed: `PUBLISH` for the memory one,
/// `FCALL ssehub_publish` for the redis one.
async fn publish(
    redis: &TestRedis,
    backend: HistoryBackend,
    channel: &str,
    payload: &str,
) -> TestResult {
    match backend {
        HistoryBackend::Memory => drop(redis.publish(channel, payload).await?),
        HistoryBackend::Redis => drop(redis.publish_stored(channel, payload).await?),
    }
    Ok(())
}

/// A token that may publish anywhere.
fn publisher_token() -> TestResult<String> {
    Ok(ssehub::auth::mint_token(
        SECRET,
        &[],
        &["*".to_string()],
        None,
        Duration::from_secs(600),
    )?)
}

/// `POST /publish?channel=<channel>` with `body`: the status and the body as JSON.
async fn http_publish(
    addr: SocketAddr,
    token: &str,
    channel: &str,
    body: &str,
) -> TestResult<(u16, serde_json::Value)> {
    let bearer = format!("Bearer {token}");
    let path = format!("/publish?channel={channel}");
    let response = send_body(
        addr,
        "POST",
        &path,
        &[("authorization", &bearer)],
        body.to_string(),
    )
    .await?;
    let status = response.status().as_u16();
    let bytes = tokio::time::timeout(PATIENCE, response.into_body().collect())
        .await??
        .to_bytes();
    Ok((status, serde_json::from_slice(&bytes)?))
}

/// The `path`s of a `422` body's `errors`.
fn error_paths(body: &serde_json::Value) -> Vec<String> {
    body["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["path"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[tokio::test]
async fn invalid_and_non_json_payloads_are_not_delivered_and_valid_ones_pass_verbatim() -> TestResult
{
    for backend in [HistoryBackend::Memory, HistoryBackend::Redis] {
        let folder = SchemaFolder::create(&format!("deliver-{backend:?}"))?;
        let order = folder.write("order.json", ORDER_SCHEMA)?;
        let redis = TestRedis::start().await?;
        let settings = schema_settings(&redis, backend, vec![table(&["orders:*"], &order)]);
        let gateway = TestGateway::start_ready(settings).await?;
        let mut client = gateway.subscribe("channel=orders:1").await?;
        for payload in [ZERO_QTY, "not json", r#"{"id":"o-3"}"#, VALID_ORDER] {
            publish(&redis, backend, "orders:1", payload).await?;
        }
        let event = client.next_event().await?;
        assert_eq!(event.data(), VALID_ORDER, "{backend:?}");
        // The channel stays healthy: the next valid one arrives too.
        publish(&redis, backend, "orders:1", VALID_ORDER).await?;
        assert_eq!(
            client.next_event().await?.data(),
            VALID_ORDER,
            "{backend:?}"
        );
        gateway.stop().await?;
    }
    Ok(())
}

#[tokio::test]
async fn channels_no_table_matches_are_not_validated() -> TestResult {
    let folder = SchemaFolder::create("unmatched")?;
    let order = folder.write("order.json", ORDER_SCHEMA)?;
    let redis = TestRedis::start().await?;
    let settings = schema_settings(
        &redis,
        HistoryBackend::Memory,
        vec![table(&["orders:*"], &order)],
    );
    let gateway = TestGateway::start_ready(settings).await?;
    let mut client = gateway.subscribe("channel=news&channel=orders").await?;
    // `orders` itself is not matched by `orders:*`.
    redis.publish("news", "not json").await?;
    redis.publish("orders", "{broken").await?;
    assert_eq!(client.next_data(2).await?, ["not json", "{broken"]);
    gateway.stop().await?;
    Ok(())
}

#[tokio::test]
async fn the_first_matching_table_applies() -> TestResult {
    let folder = SchemaFolder::create("first")?;
    let order = folder.write("order.json", ORDER_SCHEMA)?;
    let note = folder.write(
        "note.json",
        r#"{"type": "object", "required": ["note"], "properties": {"note": {"type": "string"}}}"#,
    )?;
    let redis = TestRedis::start().await?;
    let settings = schema_settings(
        &redis,
        HistoryBackend::Memory,
        vec![
            table(&["orders:notes:*"], &note),
            table(&["orders:*"], &order),
            table(&["orders:*"], &note),
        ],
    );
    let gateway = TestGateway::start_ready(settings).await?;
    let mut notes = gateway.subscribe("channel=orders:notes:1").await?;
    let mut orders = gateway.subscribe("channel=orders:1").await?;
    let a_note = r#"{"note":"left at the door"}"#;
    // On orders:1 the order schema applies, not the note schema of the third table.
    redis.publish("orders:1", a_note).await?;
    redis.publish("orders:1", VALID_ORDER).await?;
    assert_eq!(orders.next_event().await?.data(), VALID_ORDER);
    // On orders:notes:1 the first table wins over the broader second.
    redis.publish("orders:notes:1", VALID_ORDER).await?;
    redis.publish("orders:notes:1", a_note).await?;
    assert_eq!(notes.next_event().await?.data(), a_note);
    gateway.stop().await?;
    Ok(())
}

#[tokio::test]
async fn http_publish_answers_422_with_the_error_paths_and_publishes_nothing() -> TestResult {
    for backend in [HistoryBackend::Memory, HistoryBackend::Redis] {
        let folder = SchemaFolder::create(&format!("http-{backend:?}"))?;
        let order = folder.write("order.json", ORDER_SCHEMA)?;
        let redis = TestRedis::start().await?;
        let settings = schema_settings(&redis, backend, vec![table(&["orders:*"], &order)]);
        let gateway = TestGateway::start_ready(settings).await?;
        let token = publisher_token()?;
        let mut client = gateway.subscribe("channel=orders:1").await?;

        let (status, body) = http_publish(gateway.addr, &token, "orders:1", ZERO_QTY).await?;
        assert_eq!(status, 422, "{backend:?}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains("Schema")),
            "{body}"
        );
        assert_eq!(error_paths(&body), ["/items/0/qty"], "{body}");
        assert!(body["errors"][0]["message"].as_str().is_some(), "{body}");

        let (status, body) = http_publish(gateway.addr, &token, "orders:1", "nope").await?;
        assert_eq!(
            (status, error_paths(&body)),
            (422, vec![String::new()]),
            "{body}"
        );

        // 25 bad items, 2 errors each: at most 10 listed.
        let items = vec![r#"{"sku":7,"qty":"x"}"#; 25].join(",");
        let many = format!(r#"{{"id":"o","customer":"c","status":"paid","items":[{items}]}}"#);
        let (status, body) = http_publish(gateway.addr, &token, "orders:1", &many).await?;
        assert_eq!(status, 422, "{body}");
        let paths = error_paths(&body);
        assert_eq!(paths.len(), 10, "{body}");
        assert!(paths.iter().all(|p| p.starts_with("/items/")), "{body}");

        // A channel without a schema takes anything UTF-8.
        let (status, body) = http_publish(gateway.addr, &token, "news", "nope").await?;
        assert_eq!(status, 200, "{body}");

        // Nothing of the refused bodies was published: the valid one is the first event.
        let (status, body) = http_publish(gateway.addr, &token, "orders:1", VALID_ORDER).await?;
        assert_eq!(status, 200, "{backend:?}: {body}");
        assert_eq!(
            client.next_event().await?.data(),
            VALID_ORDER,
            "{backend:?}"
        );
        gateway.stop().await?;
    }
    Ok(())
}

/// The binary with a configuration file `config.toml` in `folder` holding `schemas_toml`, the
/// rest from the environment.
fn launch_with_schemas(
    redis: &TestRedis,
    folder: &SchemaFolder,
    schemas_toml: &str,
    env: &[(&str, &str)],
) -> TestResult<GatewayProcess> {
    let config = folder.write("config.toml", schemas_toml)?;
    GatewayProcess::launch_configured(config, free_port()?, &redis.url(), env, None)
}

#[tokio::test]
async fn a_relative_file_is_found_next_to_the_config_and_drops_and_422s_are_counted() -> TestResult
{
    for (backend, name) in [
        (HistoryBackend::Memory, "memory"),
        (HistoryBackend::Redis, "redis"),
    ] {
        let folder = SchemaFolder::create(&format!("relative-{name}"))?;
        folder.write("schemas/orders.json", ORDER_SCHEMA)?;
        let redis = TestRedis::start().await?;
        // The binary runs in the crate's folder, which has no schemas/ of its own.
        assert!(!Path::new("schemas/orders.json").exists());
        let toml = "[[schemas]]\nchannels = [\"orders:*\"]\nfile = \"schemas/orders.json\"\n";
        let env = [
            ("SSEHUB__HISTORY__BACKEND", name),
            ("SSEHUB__AUTH__JWT_SECRET", SECRET),
        ];
        let gateway = launch_with_schemas(&redis, &folder, toml, &env)?;
        let admin = gateway.admin;
        eventually("the gateway binary is ready", || async move {
            matches!(get(admin, "/readyz", &[]).await, Ok((200, _)))
        })
        .await?;
        assert_eq!(
            metric(
                admin,
                "ssehub_payloads_dropped_total{reason=\"schema_invalid\"}"
            )
            .await?,
            0.0,
            "registered at zero"
        );
        let mut client = gateway
            .subscribe_from("127.0.0.1", "channel=orders:1")
            .await?;
        publish(&redis, backend, "orders:1", ZERO_QTY).await?;
        publish(&redis, backend, "orders:1", "not json").await?;
        publish(&redis, backend, "orders:1", VALID_ORDER).await?;
        assert_eq!(client.next_event().await?.data(), VALID_ORDER, "{name}");
        assert_eq!(
            metric(
                admin,
                "ssehub_payloads_dropped_total{reason=\"schema_invalid\"}"
            )
            .await?,
            2.0,
            "{name}"
        );
        let log = gateway.log();
        assert!(
            log.contains("schema_invalid") && log.contains("/items/0/qty"),
            "{log}"
        );

        let token = publisher_token()?;
        let (status, _) = http_publish(gateway.addr, &token, "orders:1", ZERO_QTY).await?;
        assert_eq!(status, 422);
        assert_eq!(
            metric(admin, "ssehub_publish_requests_total{status=\"422\"}").await?,
            1.0,
            "{name}"
        );
        gateway.terminate().await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_bad_or_missing_schema_file_stops_start_up_naming_it() -> TestResult {
    let redis = TestRedis::start().await?;
    let cases = [
        ("missing", None, "cannot read the file"),
        ("not-json", Some("{\"type\": "), "not JSON"),
        (
            "not-a-schema",
            Some(r#"{"type": "object", "properties": {"id": {"minLength": -1}}}"#),
            "not a valid JSON Schema",
        ),
        (
            "remote-ref",
            Some(r#"{"$ref": "https://example.com/orders.json"}"#),
            "not a valid JSON Schema",
        ),
    ];
    for (name, document, problem) in cases {
        let folder = SchemaFolder::create(&format!("bad-{name}"))?;
        let file = format!("{name}.json");
        if let Some(document) = document {
            folder.write(&file, document)?;
        }
        let toml = format!(
            "[[schemas]]\nchannels = [\"news\"]\nfile = \"news.json\"\n\n\
             [[schemas]]\nchannels = [\"orders:*\"]\nfile = \"{file}\"\n"
        );
        folder.write("news.json", "true")?;
        let mut gateway = launch_with_schemas(&redis, &folder, &toml, &[])?;
        let status = gateway.exit_within(PATIENCE).await?;
        assert_eq!(status.code(), Some(2), "{name}: {}", gateway.log());
        let log = gateway.log();
        let resolved = folder.0 .0.join(&file).display().to_string();
        for words in ["schemas[1].file", resolved.as_str(), problem] {
            assert!(log.contains(words), "{name}: `{words}` missing from: {log}");
        }
        assert_eq!(log.matches(problem).count(), 1, "said once: {log}");
    }
    Ok(())
}
