//! A client that stops reading is closed after `limits.write_stall_secs` and counted as
//! `stalled`, on the HTTP/1.1 fast path and through hyper alike; when it comes back it resumes
//! normally. One scenario per path, run one after the other: the metrics are process-wide.

mod support;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

const STALLED: &str = "ssehub_connections_closed_total{reason=\"stalled\"}";

/// Opens a stream on a socket with a small receive buffer, reads until the first event's id,
/// then stops reading. Returns the socket and that id.
async fn stop_reading_after_first_event(
    gateway: &TestGateway,
    redis: &TestRedis,
) -> TestResult<(tokio::net::TcpStream, String)> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut stream = socket.connect(gateway.addr).await?;
    stream
        .write_all(b"GET /events?channel=slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let mut seen = String::new();
    let mut buffer = [0u8; 1024];
    let mut published = false;
    let id = tokio::time::timeout(PATIENCE, async {
        loop {
            if !published && seen.contains("\r\n\r\n") {
                redis.publish("slow", "first").await?;
                published = true;
            }
            let n = stream.read(&mut buffer).await?;
            if n == 0 {
                return Err::<String, Box<dyn std::error::Error + Send + Sync>>(
                    "stream ended".into(),
                );
            }
            seen.push_str(&String::from_utf8_lossy(&buffer[..n]));
            if let Some(at) = seen.find("data: first") {
                let before = &seen[..at];
                let id_line = before.rfind("id: ").ok_or("no id before the event")?;
                let id = before[id_line + 4..].lines().next().unwrap_or("").trim();
                return Ok(id.to_string());
            }
        }
    })
    .await??;
    Ok((stream, id))
}

async fn stalled_client_is_closed_and_resumes(fast_path: bool) -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.limits.write_stall_secs = 1;
    settings.server.http1_fast_path = fast_path;
    let gateway = TestGateway::start_ready(settings).await?;
    let before = metric(gateway.admin, STALLED).await?;
    let mut reader = gateway.subscribe("channel=slow").await?;
    let (stuck, id) = stop_reading_after_first_event(&gateway, &redis).await?;

    // A client that reads gets everything meanwhile (read as it comes, so it never stalls).
    let reading = tokio::spawn(async move {
        assert_eq!(reader.next_data(1).await?, ["first"]);
        for i in 0..600 {
            let event = reader.next_event().await?;
            assert!(event.data().starts_with(&format!("{i}:")), "event {i}");
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    });
    // Far more than the socket buffers hold: the writes block.
    let payload = "x".repeat(16 * 1024);
    for i in 0..600 {
        redis.publish("slow", format!("{i}:{payload}")).await?;
    }
    reading.await??;
    eventually("the stuck stream is closed as stalled", || async {
        metric(gateway.admin, STALLED)
            .await
            .is_ok_and(|n| n >= before + 1.0)
    })
    .await?;
    assert_eq!(get(gateway.admin, "/readyz", &[]).await?.0, 200);
    drop(stuck);

    // It comes back and resumes from where it was.
    let mut back = gateway
        .subscribe_with("channel=slow", &[("Last-Event-ID", &id)])
        .await?;
    let first = back.next_event().await?;
    assert!(first.data().starts_with("0:"), "{:.20}", first.data());
    gateway.stop().await
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_as_stalled_and_resumes() -> TestResult {
    stalled_client_is_closed_and_resumes(true).await?;
    stalled_client_is_closed_and_resumes(false).await
}
