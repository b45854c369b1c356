//! JWT channel authorization: token sources, verification, grants and expiry.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use ssehub::Settings;
use support::*;

const SECRET: &str = "test-secret-with-enough-entropy-0123456789";

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Claims valid for an hour granting `channels`.
fn claims(channels: &[&str]) -> Value {
    json!({ "exp": now() + 3600, "channels": channels })
}

fn hs256(claims: &Value) -> TestResult<String> {
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )?)
}

fn signed_with(algorithm: Algorithm, key_file: &str, claims: &Value) -> TestResult<String> {
    let pem = std::fs::read(fixture(key_file))?;
    let key = match algorithm {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem)?,
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem)?,
        _ => return Err("unsupported in tests".into()),
    };
    Ok(jsonwebtoken::encode(&Header::new(algorithm), claims, &key)?)
}

/// Public `news:*`, private everything else, HS256 secret, `user:{sub}` personal channels.
fn auth_settings(redis: &TestRedis) -> Settings {
    let mut settings = test_settings(redis);
    settings.channels.public = vec!["news:*".to_string()];
    settings.auth.jwt_secret = Some(serde_json::from_value(json!(SECRET)).unwrap_or_default());
    settings.auth.user_channel = Some("user:{sub}".to_string());
    settings.auth.leeway_secs = 0;
    settings
}

async fn status_of(
    gateway: &TestGateway,
    query: &str,
    headers: &[(&str, &str)],
) -> TestResult<u16> {
    let (status, body) = open_status(gateway.addr, &format!("/events?{query}"), headers).await?;
    if let Some(body) = body {
        let body: Value = serde_json::from_str(&body)?;
        assert!(body["error"].is_string(), "error body: {body}");
    }
    Ok(status)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
async fn each_token_source_grants_its_channels() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(auth_settings(&redis)).await?;
    let token = hs256(&claims(&["orders"]))?;

    let header = bearer(&token);
    let mut by_header = gateway
        .subscribe_with("channel=orders", &[("Authorization", &header)])
        .await?;
    let cookie = format!("other=1; ssehub_token={token}");
    let mut by_cookie = gateway
        .subscribe_with("channel=orders", &[("Cookie", &cookie)])
        .await?;
    let mut by_query = gateway
        .subscribe(&format!("channel=orders&token={token}"))
        .await?;
    for client in [&mut by_header, &mut by_cookie, &mut by_query] {
        client.next_block().await?;
    }
    redis.publish("orders", "private").await?;
    for client in [&mut by_header, &mut by_cookie, &mut by_query] {
        assert_eq!(client.next_data(1).await?, ["private"]);
    }
    gateway.stop().await
}

#[tokio::test]
async fn missing_token_for_a_private_channel_is_401_with_www_authenticate() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(auth_settings(&redis)).await?;
    let (status, client) = SseClient::open(gateway.addr, "/events?channel=orders", &[]).await?;
    assert_eq!(status, 401);
    assert_eq!(client.headers["www-authenticate"], "Bearer");
    // Public channels need no token.
    assert_eq!(status_of(&gateway, "channel=news:today", &[]).await?, 200);
    gateway.stop().await
}

#[tokio::test]
async fn an_invalid_token_is_401_even_for_public_channels() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(auth_settings(&redis)).await?;
    let auth = bearer("not.a.token");
    assert_eq!(
        status_of(&gateway, "channel=news:today", &[("Authorization", &auth)]).await?,
        401
    );
    assert_eq!(
        status_of(&gateway, "channel=news:today&token=garbage", &[]).await?,
        401
    );
    gateway.stop().await
}

#[tokio::test]
async fn the_first_source_present_is_the_token_without_fallback() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(auth_settings(&redis)).await?;
    let good = hs256(&claims(&["orders"]))?;
    let cookie = format!("ssehub_token={good}");
    let bad_header = bearer("broken");
    let headers = [
        ("Authorization", bad_header.as_str()),
        ("Cookie", cookie.as_str()),
    ];
    assert_eq!(status_of(&gateway, "channel=orders", &headers).await?, 401);
    let bad_cookie = "ssehub_token=broken";
    let query = format!("channel=orders&token={good}");
    assert_eq!(
        status_of(&gateway, &query, &[("Cookie", bad_cookie)]).await?,
        401
    );
    gateway.stop().await
}

#[tokio::test]
async fn wrong_signature_expired_and_unsigned_tokens_are_rejected() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(auth_settings(&redis)).await?;
    let wrong_key = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(&["orders"]),
        &EncodingKey::from_secret(b"another-secret"),
    )?;
    let expired = hs256(&json!({ "exp": now() - 120, "channels": ["orders"] }))?;
    let no_exp = hs256(&json!({ "channels": ["orders"] }))?;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let alg_none = format!(
        "{}.{}.",
        b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims(&["orders"]).to_string())
    );
    for token in [wrong_key, expired, no_exp, alg_none] {
        let auth = bearer(&token);
        assert_eq!(
            status_of(&gateway, "channel=orders", &[("Authorization", &auth)]).await?,
            401,
            "{token}"
        );
    }
    gateway.stop().await
}

#[tokio::test]
async fn the_algorithm_follows_the_configured_key_not_the_token() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.channels.public = vec![];
    settings.auth.jwt_public_key_file = Some(fixture("rsa_public.pem").into());
    let gateway = TestGateway::start_ready(settings).await?;

    let rs256 = signed_with(Algorithm::RS256, "rsa_private.pem", &claims(&["orders"]))?;
    let auth = bearer(&rs256);
    assert_eq!(
        status_of(&gateway, "channel=orders", &[("Authorization", &auth)]).await?,
        200
    );

    // Algorithm confusion: HS256 "signed" with the RSA public key as the HMAC secret.
    let public_pem = std::fs::read(fixture("rsa_public.pem"))?;
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(&["orders"]),
        &EncodingKey::from_secret(&public_pem),
    )?;
    let auth = bearer(&confused);
    assert_eq!(
        status_of(&gateway, "channel=orders", &[("Authorization", &auth)]).await?,
        401
    );
    // An ES256 token is not accepted by an RSA key either.
    let es256 = signed_with(Algorithm::ES256, "ec_private.pem", &claims(&["orders"]))?;
    let auth = bearer(&es256);
    assert_eq!(
        status_of(&gateway, "channel=orders", &[("Authorization", &auth)]).await?,
        401
    );
    gateway.stop().await
}

#[tokio::test]
async fn es256_public_keys_are_accepted() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.channels.public = vec![];
    settings.auth.jwt_public_key_file = Some(fixture("ec_public.pem").into());
    let gateway = TestGateway::start_ready(settings).await?;
    let es256 = signed_with(Algorithm::ES256, "ec_private.pem", &claims(&["orders"]))?;
    let auth = bearer(&es256);
    assert_eq!(
        status_of(&gateway, "channel=orders", &[("Authorization", &auth)]).await?,
        200
    );
    let rs256 = signed_with(Algorithm::RS256, "rsa_private.pem", &claims(&["orders"]))?;
    let auth = bearer(&rs256);
    assert_eq!(
        status_of(&gateway, "channel=orders", &[("Authorization", &auth)]).await?,
        401
    );
    gateway.stop().await
}

#[tokio::test]
async fn audience_and_issuer_are_enforced_when_configured() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = auth_settings(&redis);
    settings.auth.audience = Some("ssehub".to_string());
    settings.auth.issuer = Some("https://auth.example".to_string());
    let gateway = TestGateway::start_ready(settings).await?;
    let exp = now() + 3600;
    let cases = [
        (
            json!({"exp": exp, "channels": ["o"], "aud": "ssehub", "iss": "https://auth.example"}),
            200,
        ),
        (
            json!({"exp": exp, "channels": ["o"], "aud": "other", "iss": "https://auth.example"}),
            401,
        ),
        (
            json!({"exp": exp, "channels": ["o"], "aud": "ssehub", "iss": "https://evil.example"}),
            401,
        ),
        (
            json!({"exp": exp, "channels": ["o"], "iss": "https://auth.example"}),
            401,
        ),
        (json!({"exp": exp, "channels": ["o"], "aud": "ssehub"}), 401),
        // One issuer, as a string: an array naming it among others is not that.
        (
            json!({"exp": exp, "channels": ["o"], "aud": "ssehub",
                   "iss": ["https://evil.example", "https://auth.example"]}),
            401,
        ),
        (
            json!({"exp": exp, "channels": ["o"], "aud": "ssehub", "iss": ["https://auth.example"]}),
            401,
        ),
    ];
    for (claims, expected) in cases {
        let auth = bearer(&hs256(&claims)?);
        let status = status_of(&gateway, "channel=o", &[("Authorization", &auth)]).await?;
        assert_eq!(status, expected, "{claims}");
    }
    gateway.stop().await
}

#[tokio::test]
async fn grants_are_globs_and_the_user_channel_follows_sub() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(auth_settings(&redis)).await?;
    let token = hs256(&json!({ "exp": now() + 3600, "sub": "42", "channels": ["tenant:7:*"] }))?;
    let auth = bearer(&token);
    let headers = [("Authorization", auth.as_str())];
    let cases = [
        ("channel=tenant:7:billing", 200),
        (
            "channel=tenant:7:billing&channel=user:42&channel=news:x",
            200,
        ),
        ("channel=tenant:8:billing", 403),
        ("channel=user:43", 403),
        ("channel=*", 403),
        ("channel=tenant:7:billing&channel=secret", 403),
    ];
    for (query, expected) in cases {
        assert_eq!(
            status_of(&gateway, query, &headers).await?,
            expected,
            "{query}"
        );
    }
    gateway.stop().await
}

#[tokio::test]
async fn an_open_stream_ends_cleanly_when_its_token_expires() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(auth_settings(&redis)).await?;
    let token = hs256(&json!({ "exp": now() + 2, "channels": ["orders"] }))?;
    let auth = bearer(&token);
    let mut client = gateway
        .subscribe_with("channel=orders", &[("Authorization", &auth)])
        .await?;
    client.next_block().await?;
    redis.publish("orders", "while valid").await?;
    assert_eq!(client.next_data(1).await?, ["while valid"]);
    client.expect_end(Duration::from_secs(6)).await?;
    gateway.stop().await
}

#[tokio::test]
async fn only_the_bearer_scheme_is_a_token_source() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(auth_settings(&redis)).await?;
    let token = hs256(&claims(&["orders"]))?;
    let cookie = format!("ssehub_token={token}");
    let basic = [
        ("Authorization", "Basic dXNlcjpwYXNz"),
        ("Cookie", cookie.as_str()),
    ];
    assert_eq!(status_of(&gateway, "channel=orders", &basic).await?, 200);
    let basic_only = [("Authorization", "Basic dXNlcjpwYXNz")];
    assert_eq!(
        status_of(&gateway, "channel=orders", &basic_only).await?,
        401
    );
    // Empty cookie and query values are absent, not invalid.
    let empty = [("Cookie", "ssehub_token=")];
    assert_eq!(
        status_of(&gateway, "channel=news:x&token=", &empty).await?,
        200
    );
    gateway.stop().await
}

#[tokio::test]
async fn tokens_are_ignored_when_no_key_is_configured() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.channels.public = vec!["news:*".to_string()];
    let gateway = TestGateway::start_ready(settings).await?;
    let garbage = [("Authorization", "Bearer garbage")];
    assert_eq!(status_of(&gateway, "channel=news:x", &garbage).await?, 200);
    assert_eq!(status_of(&gateway, "channel=secret", &garbage).await?, 403);
    gateway.stop().await
}

#[tokio::test]
async fn a_token_expiring_beyond_what_the_clock_holds_is_401_not_a_crash() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = auth_settings(&redis);
    // With a leeway, `exp + leeway` overflowed the clock and panicked the request.
    settings.auth.leeway_secs = 60;
    let gateway = TestGateway::start_ready(settings).await?;
    for exp in [
        i64::MAX as u64,
        i64::MAX as u64 - 30,
        u64::MAX,
        253_402_300_800,
    ] {
        let token = hs256(&json!({"exp": exp, "channels": ["orders"]}))?;
        let auth = bearer(&token);
        let status = status_of(&gateway, "channel=orders", &[("Authorization", &auth)]).await?;
        assert_eq!(status, 401, "exp {exp}");
    }
    // A far but representable expiry is fine, and the gateway is still serving.
    let token = hs256(&json!({"exp": now() + 100 * 365 * 86_400, "channels": ["orders"]}))?;
    let auth = bearer(&token);
    let mut client = gateway
        .subscribe_with("channel=orders", &[("Authorization", &auth)])
        .await?;
    client.next_block().await?;
    gateway.stop().await
}

#[tokio::test]
async fn a_token_naming_critical_header_extensions_is_401() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(auth_settings(&redis)).await?;
    let mut header = Header::new(Algorithm::HS256);
    header.crit = Some(vec!["x-unknown".to_string()]);
    let token = jsonwebtoken::encode(
        &header,
        &claims(&["orders"]),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )?;
    let auth = bearer(&token);
    let (status, body) = open_status(
        gateway.addr,
        "/events?channel=orders",
        &[("Authorization", &auth)],
    )
    .await?;
    assert_eq!(status, 401);
    assert!(body.unwrap_or_default().contains("crit"));
    // The same claims without `crit` are accepted.
    let plain = bearer(&hs256(&claims(&["orders"]))?);
    let status = status_of(&gateway, "channel=orders", &[("Authorization", &plain)]).await?;
    assert_eq!(status, 200);
    gateway.stop().await
}

/// Sends a raw HTTP/1.1 request head (bytes a typed client refuses to send) and returns the
/// status code.
async fn raw_status(addr: std::net::SocketAddr, head: &[u8]) -> TestResult<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(head).await?;
    let mut answer = [0u8; 12];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut answer)).await??;
    let status = std::str::from_utf8(&answer[9..12])?.parse()?;
    Ok(status)
}

#[tokio::test]
async fn a_non_ascii_cookie_does_not_hide_the_token_cookie_on_either_path() -> TestResult {
    let redis = TestRedis::start().await?;
    let token = hs256(&claims(&["orders"]))?;
    for fast_path in [true, false] {
        let mut settings = auth_settings(&redis);
        settings.server.http1_fast_path = fast_path;
        let gateway = TestGateway::start_ready(settings).await?;
        let mut head =
            b"GET /events?channel=orders HTTP/1.1\r\nHost: gw\r\nCookie: pref=caf".to_vec();
        head.extend_from_slice("é".as_bytes());
        head.extend_from_slice(format!("; ssehub_token={token}\r\n\r\n").as_bytes());
        assert_eq!(
            raw_status(gateway.addr, &head).await?,
            200,
            "fast path {fast_path}"
        );
        gateway.stop().await?;
    }
    Ok(())
}

#[tokio::test]
async fn the_first_token_wins_in_every_source() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(auth_settings(&redis)).await?;
    let good = hs256(&claims(&["orders"]))?;
    let first_good = format!("channel=orders&token={good}&token=garbage");
    assert_eq!(status_of(&gateway, &first_good, &[]).await?, 200);
    let first_bad = format!("channel=orders&token=garbage&token={good}");
    assert_eq!(status_of(&gateway, &first_bad, &[]).await?, 401);
    let cookies = format!("ssehub_token={good}; ssehub_token=garbage");
    let by_cookie = [("Cookie", cookies.as_str())];
    assert_eq!(
        status_of(&gateway, "channel=orders", &by_cookie).await?,
        200
    );
    gateway.stop().await
}
