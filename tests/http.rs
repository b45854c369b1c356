//! The HTTP surface: request validation, errors as JSON, admin endpoints, shutdown, start-up.

mod support;

use std::time::Duration;

use support::*;

async fn expect_error(gateway: &TestGateway, path: &str, status: u16) -> TestResult<String> {
    let (got, body) = get(gateway.addr, path, &[]).await?;
    assert_eq!(got, status, "{path}: {body}");
    let body: serde_json::Value = serde_json::from_str(&body)?;
    let message = body["error"].as_str().ok_or("error body without message")?;
    Ok(message.to_string())
}

#[tokio::test]
async fn malformed_requests_get_400_with_a_json_error() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.channels.max_per_connection = 2;
    let gateway = TestGateway::start_ready(settings).await?;
    let long = format!("/events?channel={}", "x".repeat(257));
    for path in [
        "/events",
        "/events?channel=",
        "/events?channel=a%20b",
        "/events?channel=%C3%A9",
        long.as_str(),
        "/events?channel=a&channel=b&channel=c",
        "/events?channel=a&unknown=1",
    ] {
        expect_error(&gateway, path, 400).await?;
    }
    // Repeated names count once against the limit.
    let mut ok = gateway.subscribe("channel=a&channel=b&channel=a").await?;
    ok.next_block().await?;
    gateway.stop().await
}

#[tokio::test]
async fn channels_outside_the_public_patterns_get_403() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.channels.public = vec!["orders".to_string(), "user:*".to_string()];
    let gateway = TestGateway::start_ready(settings).await?;
    let message = expect_error(&gateway, "/events?channel=orders&channel=secret", 403).await?;
    assert!(message.contains("secret"));
    expect_error(&gateway, "/events?channel=*", 403).await?;
    expect_error(&gateway, "/events?channel=orders2", 403).await?;
    // Validation comes first: a bad request is 400 even when a channel is also forbidden.
    expect_error(&gateway, "/events?channel=secret&bogus=1", 400).await?;
    let mut ok = gateway
        .subscribe("channel=orders&channel=user%3A42")
        .await?;
    ok.next_block().await?;
    gateway.stop().await
}

#[tokio::test]
async fn unknown_paths_and_methods_get_json_errors() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    expect_error(&gateway, "/nope", 404).await?;
    let (status, body) = request(gateway.addr, "POST", "/events?channel=a", &[]).await?;
    assert_eq!(status, 405);
    assert!(body.contains("error"));
    let (status, _) = get(gateway.admin, "/nope", &[]).await?;
    assert_eq!(status, 404);
    gateway.stop().await
}

#[tokio::test]
async fn healthz_and_readyz_answer_on_the_admin_listener() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let (status, body) = get(gateway.admin, "/healthz", &[]).await?;
    assert_eq!((status, body.contains("ok")), (200, true));
    let (status, _) = get(gateway.admin, "/readyz", &[]).await?;
    assert_eq!(status, 200);
    // The subscription connection exists before any client asked for a channel.
    let mut conn = redis.connection().await?;
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await?;
    let others = clients
        .lines()
        .filter(|l| !l.contains("cmd=client|list"))
        .count();
    assert_eq!(others, 1, "expected the gateway's connection in: {clients}");
    gateway.stop().await
}

/// The `/readyz` body, parsed, after waiting for `status`.
async fn readyz_body(gateway: &TestGateway, status: u16) -> TestResult<serde_json::Value> {
    gateway.wait_ready(status).await?;
    let (got, body) = get(gateway.admin, "/readyz", &[]).await?;
    assert_eq!(got, status, "{body}");
    Ok(serde_json::from_str(&body)?)
}

#[tokio::test]
async fn readyz_describes_the_redis_topology_while_redis_is_up_and_down() -> TestResult {
    let mut redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let ready = readyz_body(&gateway, 200).await?;
    assert_eq!(
        ready,
        serde_json::json!({
            "status": "ready",
            "redis": { "mode": "standalone", "shards_known": 1, "shards_up": 1 },
        })
    );
    redis.kill().await?;
    let down = readyz_body(&gateway, 503).await?;
    assert_eq!(
        down,
        serde_json::json!({
            "status": "not ready",
            "reason": "redis subscription down",
            "redis": { "mode": "standalone", "shards_known": 1, "shards_up": 0 },
        })
    );
    redis.restart().await?;
    let back = readyz_body(&gateway, 200).await?;
    assert_eq!(back["redis"]["shards_up"], 1, "{back}");
    gateway.stop().await
}

#[tokio::test]
async fn shutdown_ends_open_streams_cleanly_and_returns() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut client = gateway.subscribe("channel=bye").await?;
        client.next_block().await?;
        clients.push(client);
    }
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), gateway.stop()).await??;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    for client in &mut clients {
        // `expect_end` fails on a reset or truncated chunked body: the end must be clean.
        client.expect_end(Duration::from_secs(2)).await?;
    }
    Ok(())
}

fn run_binary(args: &[&str], env: &[(&str, &str)]) -> TestResult<std::process::Output> {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ssehub"));
    command.args(args).env_clear();
    for (key, value) in env {
        command.env(key, value);
    }
    Ok(command.output()?)
}

#[test]
fn bad_configuration_stops_start_up_naming_the_key() -> TestResult {
    let dir = ScratchDir::create(&format!("ssehub-http-test-{}", std::process::id()))?;
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 5] = [
        ("[server]\nlisten = \"not an address\"\n", &[], "listen"),
        ("[history]\ncapacity = 0\n", &[], "history.capacity"),
        ("[sse]\nheartbeat = 3\n", &[], "heartbeat"),
        ("", &[("SSEHUB__REDIS__URL", "ftp://nowhere")], "redis.url"),
        // Below hyper's minimum read buffer: refused at start-up, not a panic in the listener.
        (
            "[limits]\nmax_header_bytes = 4096\n",
            &[],
            "limits.max_header_bytes",
        ),
    ];
    for (toml, env, key) in cases {
        let path = dir.0.join("config.toml");
        std::fs::write(&path, toml)?;
        let path = path.to_string_lossy().into_owned();
        let output = run_binary(&["--config", &path], env)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "started with {toml:?}");
        assert!(stderr.contains(key), "{key} not named in: {stderr}");
    }
    let output = run_binary(&["--config", "/nonexistent/ssehub.toml"], &[])?;
    assert!(!output.status.success());
    Ok(())
}

#[tokio::test]
async fn the_healthcheck_subcommand_probes_the_admin_listener() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let admin = gateway.admin.to_string();
    // The probe blocks; run it off the runtime that serves the gateway.
    let probe = |admin: String| {
        tokio::task::spawn_blocking(move || {
            run_binary(&["healthcheck"], &[("SSEHUB__ADMIN__LISTEN", &admin)])
        })
    };
    let output = probe(admin.clone()).await??;
    assert!(output.status.success(), "{output:?}");
    gateway.stop().await?;
    let output = probe(admin).await??;
    assert!(!output.status.success());
    Ok(())
}

#[test]
fn the_token_subcommand_mints_a_token_only_with_a_secret() -> TestResult {
    let output = run_binary(&["token", "--channel", "orders"], &[])?;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("auth.jwt_secret"));
    let env = [("SSEHUB__AUTH__JWT_SECRET", "s3cret")];
    let output = run_binary(&["token", "--channel", "orders", "--sub", "42"], &env)?;
    assert!(output.status.success());
    let token = String::from_utf8(output.stdout)?;
    assert_eq!(token.trim().split('.').count(), 3);
    Ok(())
}

#[tokio::test]
async fn the_demo_page_is_served_at_the_root_unless_disabled() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let (status, body) = get(gateway.addr, "/", &[]).await?;
    assert_eq!(status, 200);
    assert!(body.contains("new EventSource"));
    gateway.stop().await?;

    let mut settings = test_settings(&redis);
    settings.server.demo_page = false;
    let gateway = TestGateway::start_ready(settings).await?;
    let (status, _) = get(gateway.addr, "/", &[]).await?;
    assert_eq!(status, 404);
    gateway.stop().await
}
