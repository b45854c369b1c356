//! TLS to Redis (`rediss://`): the gateway binary against a TLS-only `redis-server` that wants
//! a password, with a test-made CA. Events flow with either history backend and `POST /publish`
//! works; mutual TLS needs the client certificate; a server certificate from another CA is
//! refused; and the password is in no log line.

mod support;

use std::time::Duration;

use support::tls_redis::TlsRedis;
use support::*;

const SECRET: &str = "redis-tls-test-secret-of-at-least-32-bytes";

/// The gateway binary against `redis` with the `(key, path)` TLS files and `extra` settings.
fn launch(
    redis: &TlsRedis,
    files: &[(&str, &std::path::Path)],
    extra: &[(&str, &str)],
) -> TestResult<GatewayProcess> {
    let files: Vec<(String, String)> = files
        .iter()
        .map(|(key, path)| (key.to_string(), path.display().to_string()))
        .collect();
    let mut env: Vec<(&str, &str)> = files
        .iter()
        .map(|(key, path)| (key.as_str(), path.as_str()))
        .collect();
    env.extend_from_slice(extra);
    GatewayProcess::launch(&redis.url(), &env, None)
}

async fn wait_ready(gateway: &GatewayProcess) -> TestResult {
    let admin = gateway.admin;
    eventually("the gateway is ready", || async move {
        matches!(get(admin, "/readyz", &[]).await, Ok((200, _)))
    })
    .await
    .map_err(|e| format!("{e}; gateway log:\n{}", gateway.log()).into())
}

/// Publishes `payload` until Redis reports a subscriber (the gateway's subscription is up),
/// so exactly one copy reaches the gateway.
async fn publish_once_subscribed(redis: &TlsRedis, channel: &str, payload: &str) -> TestResult {
    eventually("the gateway's subscription receives a PUBLISH", || async {
        matches!(redis.publish(channel, payload).await, Ok(n) if n > 0)
    })
    .await
}

/// Waits until the gateway logged `words` (all of them, on one line).
async fn wait_for_log(gateway: &GatewayProcess, words: &[&str]) -> TestResult {
    eventually(&format!("a log line with {words:?}"), || async {
        gateway
            .log()
            .lines()
            .any(|line| words.iter().all(|word| line.contains(word)))
    })
    .await
    .map_err(|e| format!("{e}; gateway log:\n{}", gateway.log()).into())
}

fn assert_password_not_logged(gateway: &GatewayProcess, redis: &TlsRedis) {
    let log = gateway.log();
    assert!(!log.is_empty(), "the gateway logged nothing");
    assert!(
        !log.contains(&redis.password),
        "the Redis password is in the log:\n{log}"
    );
}

#[tokio::test]
async fn events_reach_clients_through_a_tls_redis() -> TestResult {
    let redis = TlsRedis::start(false).await?;
    let ca = [("SSEHUB__REDIS__TLS_CA_FILE", redis.pki.ca_file.as_path())];
    let gateway = launch(&redis, &ca, &[])?;
    wait_ready(&gateway).await?;
    let mut client = gateway.subscribe_from("127.0.0.1", "channel=news").await?;
    publish_once_subscribed(&redis, "news", "over tls").await?;
    assert_eq!(client.next_event().await?.data(), "over tls");
    assert_password_not_logged(&gateway, &redis);
    Ok(())
}

#[tokio::test]
async fn redis_history_and_publish_work_over_tls() -> TestResult {
    let redis = TlsRedis::start(false).await?;
    let ca = [("SSEHUB__REDIS__TLS_CA_FILE", redis.pki.ca_file.as_path())];
    let settings = [
        ("SSEHUB__HISTORY__BACKEND", "redis"),
        ("SSEHUB__AUTH__JWT_SECRET", SECRET),
    ];
    let gateway = launch(&redis, &ca, &settings)?;
    wait_ready(&gateway).await?;
    let mut client = gateway
        .subscribe_from("127.0.0.1", "channel=orders")
        .await?;
    // The publisher's own TLS connection: FCALL ssehub_publish, broadcast to the subscription.
    let token = ssehub::auth::mint_token(
        SECRET,
        &[],
        &["orders".to_string()],
        None,
        Duration::from_secs(600),
    )?;
    let bearer = format!("Bearer {token}");
    let mut ids = Vec::new();
    for payload in ["first", "second"] {
        let response = send_body(
            gateway.addr,
            "POST",
            "/publish?channel=orders",
            &[("authorization", bearer.as_str())],
            payload.to_string(),
        )
        .await?;
        assert_eq!(response.status(), 200, "POST /publish {payload}");
        let event = client.next_event().await?;
        assert_eq!(event.data(), payload);
        ids.push(event.id.ok_or("an event without id")?);
    }
    // The history connection: a resumed client is served the second event from Redis.
    let path = "/events?channel=orders";
    let resume = [("Last-Event-ID", ids[0].as_str())];
    let (status, mut resumed) = SseClient::open(gateway.addr, path, &resume).await?;
    assert_eq!(status, 200);
    let replayed = resumed.next_event().await?;
    assert_eq!(
        (replayed.data(), replayed.id.as_deref()),
        ("second", Some(ids[1].as_str()))
    );
    assert_password_not_logged(&gateway, &redis);
    Ok(())
}

#[tokio::test]
async fn mutual_tls_needs_the_client_certificate() -> TestResult {
    let redis = TlsRedis::start(true).await?;
    let pki = &redis.pki;
    let with_certificate = [
        ("SSEHUB__REDIS__TLS_CA_FILE", pki.ca_file.as_path()),
        (
            "SSEHUB__REDIS__TLS_CERT_FILE",
            pki.client_cert_file.as_path(),
        ),
        ("SSEHUB__REDIS__TLS_KEY_FILE", pki.client_key_file.as_path()),
    ];
    let gateway = launch(&redis, &with_certificate, &[])?;
    wait_ready(&gateway).await?;
    let mut client = gateway.subscribe_from("127.0.0.1", "channel=mtls").await?;
    publish_once_subscribed(&redis, "mtls", "with a certificate").await?;
    assert_eq!(client.next_event().await?.data(), "with a certificate");
    assert_password_not_logged(&gateway, &redis);

    let without = launch(&redis, &with_certificate[..1], &[])?;
    // The server asks for a certificate the gateway does not have: TLS 1.3 says so with the
    // `certificate required` alert on the first read.
    wait_for_log(
        &without,
        &["redis subscription connection down", "CertificateRequired"],
    )
    .await?;
    let (status, _) = get(without.admin, "/readyz", &[]).await?;
    assert_eq!(status, 503, "{}", without.log());
    assert_password_not_logged(&without, &redis);
    Ok(())
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused() -> TestResult {
    let redis = TlsRedis::start(false).await?;
    let other = [(
        "SSEHUB__REDIS__TLS_CA_FILE",
        redis.pki.other_ca_file.as_path(),
    )];
    let gateway = launch(&redis, &other, &[])?;
    wait_for_log(
        &gateway,
        &[
            "redis subscription connection down",
            "invalid peer certificate: UnknownIssuer",
        ],
    )
    .await?;
    let (status, _) = get(gateway.admin, "/readyz", &[]).await?;
    assert_eq!(status, 503, "{}", gateway.log());
    assert_password_not_logged(&gateway, &redis);
    Ok(())
}
