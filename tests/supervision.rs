//! Supervision: a long-lived task that panics is never silent. The gateway logs it, answers
//! `/readyz` with `503`, drains its streams and returns an error within the shutdown grace
//! period (so the binary exits non-zero and its orchestrator restarts it).

mod support;

use std::time::Duration;

use support::*;
use tokio::time::Instant;

/// A stream whose client never reads, behind more data than the socket buffers hold.
async fn stuck_client(
    addr: std::net::SocketAddr,
    redis: &TestRedis,
) -> TestResult<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut stream = socket.connect(addr).await?;
    stream
        .write_all(b"GET /events?channel=stuck HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    eventually("the stuck stream is subscribed", || async {
        redis.publish("stuck", "x").await.is_ok_and(|n| n > 0)
    })
    .await?;
    let payload = "x".repeat(16 * 1024);
    for _ in 0..400 {
        redis.publish("stuck", payload.as_str()).await?;
    }
    Ok(stream)
}

#[tokio::test]
async fn a_task_that_panics_fails_readiness_drains_and_stops_the_gateway() -> TestResult {
    const GRACE_SECS: u64 = 2;
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.server.shutdown_grace_secs = GRACE_SECS;
    let listeners = ssehub::Listeners {
        public: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        admin: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    };
    let (addr, admin) = (
        listeners.public.local_addr()?,
        listeners.admin.local_addr()?,
    );
    let mut gateway = ssehub::Gateway::start(settings, listeners).await?;
    let (panic_now, panic_signal) = tokio::sync::oneshot::channel::<()>();
    gateway.supervise(
        "injected",
        tokio::spawn(async move {
            let _ = panic_signal.await;
            panic!("injected failure");
        }),
    );
    let served = tokio::spawn(gateway.serve(std::future::pending()));
    eventually("ready", || async move {
        matches!(get(admin, "/readyz", &[]).await, Ok((200, _)))
    })
    .await?;
    let (status, mut stream) = SseClient::open(addr, "/events?channel=a", &[]).await?;
    assert_eq!(status, 200);
    // A client that stopped reading keeps the drain busy for the whole grace period, so the
    // admin listener is seen answering while the gateway goes down.
    let stuck = stuck_client(addr, &redis).await?;

    let failed_at = Instant::now();
    let _ = panic_now.send(());
    // Readiness fails at once and names the task, while the admin listener still answers.
    eventually("/readyz reports the failure", || async move {
        matches!(get(admin, "/readyz", &[]).await,
            Ok((503, body)) if body.contains("injected"))
    })
    .await?;
    // The open stream ends cleanly, as in a shutdown.
    stream
        .expect_end(Duration::from_secs(GRACE_SECS + 2))
        .await?;
    drop(stuck);
    let result = tokio::time::timeout(Duration::from_secs(GRACE_SECS + 5), served).await??;
    let error = result
        .err()
        .ok_or("serve returned Ok after a task panicked")?;
    let message = error.to_string();
    assert!(
        message.contains("injected") && message.contains("injected failure"),
        "{message}"
    );
    assert!(failed_at.elapsed() <= Duration::from_secs(GRACE_SECS + 3));
    Ok(())
}
