//! `ssehub_publish_requests_total{status}`: registered at zero at start-up, with the series for
//! the history backend, then counting every `POST /publish` answer by its status.
//!
//! One test on purpose: the metrics recorder is process-wide, so this binary runs a single
//! scenario and can assert exact values.

mod support;

use std::time::Duration;

use support::*;

const SECRET: &str = "publish-metrics-secret-of-at-least-32-bytes";
const STATUSES: [u16; 8] = [200, 400, 401, 403, 405, 413, 422, 503];

fn publish_series(status: u16) -> String {
    format!("ssehub_publish_requests_total{{status=\"{status}\"}}")
}

/// Sends one request with a body; returns the status.
async fn send(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &'static [u8],
) -> TestResult<u16> {
    use http_body_util::BodyExt;
    let response = send_body(addr, method, path, headers, body).await?;
    let status = response.status().as_u16();
    tokio::time::timeout(PATIENCE, response.into_body().collect()).await??;
    Ok(status)
}

#[tokio::test]
async fn every_publish_answer_is_counted_by_status() -> TestResult {
    let mut redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.auth.jwt_secret = serde_json::from_value(serde_json::json!(SECRET)).ok();
    settings.limits.max_payload_bytes = 4;
    let gateway = TestGateway::start_ready(settings).await?;
    let (addr, admin) = (gateway.addr, gateway.admin);

    let start = scrape(admin).await?;
    for status in STATUSES {
        assert_eq!(start.get(&publish_series(status)), Some(&0.0), "{status}");
    }
    for outcome in ["ok", "history_expired", "unknown_position", "error"] {
        let series = format!("ssehub_history_reads_total{{outcome=\"{outcome}\"}}");
        assert_eq!(start.get(&series), Some(&0.0), "{series}");
    }
    assert_eq!(
        start.get("ssehub_upstream_recovered_events_total"),
        Some(&0.0)
    );

    let token = ssehub::auth::mint_token(
        SECRET,
        &[],
        &["orders:*".to_string()],
        None,
        Duration::from_secs(600),
    )?;
    let bearer = format!("Bearer {token}");
    let auth = [("authorization", bearer.as_str())];
    let to_orders = "/publish?channel=orders:1";
    let sent = [
        send(addr, "POST", to_orders, &auth, b"ok").await?,
        send(addr, "POST", to_orders, &auth, b"ok").await?,
        send(addr, "POST", "/publish?channel=", &auth, b"x").await?,
        send(addr, "POST", to_orders, &[], b"x").await?,
        send(addr, "POST", "/publish?channel=news", &auth, b"x").await?,
        send(addr, "GET", to_orders, &auth, b"").await?,
        send(addr, "POST", to_orders, &auth, b"too large").await?,
        send(addr, "POST", to_orders, &auth, b"\xff").await?,
    ];
    assert_eq!(sent, [200, 200, 400, 401, 403, 405, 413, 422]);
    redis.kill().await?;
    assert_eq!(send(addr, "POST", to_orders, &auth, b"down").await?, 503);

    let after = scrape(admin).await?;
    for (status, expected) in STATUSES
        .into_iter()
        .zip([2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    {
        assert_eq!(
            after.get(&publish_series(status)),
            Some(&expected),
            "{status}"
        );
    }
    // Refusals are rejected requests too, 413 and 422 included.
    for status in [413, 422] {
        let series = format!("ssehub_requests_rejected_total{{status=\"{status}\"}}");
        assert_eq!(after.get(&series), Some(&1.0), "{series}");
    }
    gateway.stop().await
}
