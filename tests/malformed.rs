//! Heads that are not HTTP, or too large, get a JSON error on both listeners and both code paths,
//! and are counted in `ssehub_requests_rejected_total`.

mod support;

use std::net::SocketAddr;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `raw` and returns the status line and body of the answer.
async fn answer_to(addr: SocketAddr, raw: &[u8]) -> TestResult<(String, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(raw).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").ok_or("no complete answer")?;
    let status = head.lines().next().unwrap_or("").to_string();
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    Ok((status, body.to_string()))
}

#[tokio::test]
async fn malformed_and_oversized_heads_get_json_errors_and_are_counted() -> TestResult {
    let redis = TestRedis::start().await?;
    for fast_path in [true, false] {
        let mut settings = test_settings(&redis);
        settings.server.http1_fast_path = fast_path;
        let gateway = TestGateway::start_ready(settings).await?;
        let mut reader = gateway.subscribe("channel=calm").await?;
        let rejected = "ssehub_requests_rejected_total{status=\"400\"}";
        let too_large = "ssehub_requests_rejected_total{status=\"431\"}";
        let (before_400, before_431) = (
            metric(gateway.admin, rejected).await?,
            metric(gateway.admin, too_large).await?,
        );
        let garbage: [&[u8]; 5] = [
            b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
            b"GET /\r\n\r\n",
            b"GET /events?channel=a HTTP/1.1\r\nNoColonHere\r\n\r\n",
            b"GET /ev\0ents HTTP/1.1\r\n\r\n",
            b"GET /events?channel=a HTTP/9.9\r\n\r\n",
        ];
        for addr in [gateway.addr, gateway.admin] {
            for raw in garbage {
                let (status, body) = answer_to(addr, raw).await?;
                assert!(status.starts_with("HTTP/1.1 400"), "{raw:?}: {status}");
                let json: serde_json::Value = serde_json::from_str(&body)?;
                assert!(json["error"].is_string(), "{body}");
            }
            let huge = format!(
                "GET /events?channel=a HTTP/1.1\r\nX-Big: {}\r\n\r\n",
                "y".repeat(20_000)
            );
            let (status, body) = answer_to(addr, huge.as_bytes()).await?;
            assert!(status.starts_with("HTTP/1.1 431"), "{status}");
            assert!(body.contains("max_header_bytes"), "{body}");
        }
        assert_eq!(
            metric(gateway.admin, rejected).await?,
            before_400 + 10.0,
            "fast path {fast_path}"
        );
        assert_eq!(metric(gateway.admin, too_large).await?, before_431 + 2.0);
        // Nothing of this disturbed a normal client or readiness.
        redis.publish("calm", "unbothered").await?;
        assert_eq!(reader.next_data(1).await?, ["unbothered"]);
        assert_eq!(get(gateway.admin, "/readyz", &[]).await?.0, 200);
        gateway.stop().await?;
    }
    Ok(())
}
