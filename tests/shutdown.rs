//! Graceful shutdown of the real binary: SIGTERM ends every stream with a spread-out final
//! `retry:`, readiness fails while draining, and the process exits within the grace period.

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use support::*;
use tokio::process::{Child, Command};
use tokio::time::Instant;

const RETRY_MS: u64 = 3000;
const JITTER_MS: u64 = 5000;
const GRACE_SECS: u64 = 5;

struct Binary {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
}

async fn start_binary(redis: &TestRedis) -> TestResult<Binary> {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let config = std::env::temp_dir().join(format!("ssehub-shutdown-{}.toml", admin.port()));
    std::fs::write(&config, "# all settings from the environment\n")?;
    let child = Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .env_clear()
        .env("SSEHUB__REDIS__URL", redis.url())
        .env("SSEHUB__SERVER__LISTEN", addr.to_string())
        .env("SSEHUB__ADMIN__LISTEN", admin.to_string())
        .env("SSEHUB__CHANNELS__PUBLIC", "*")
        .env("SSEHUB__SSE__RETRY_MS", RETRY_MS.to_string())
        .env(
            "SSEHUB__SERVER__SHUTDOWN_RETRY_JITTER_MS",
            JITTER_MS.to_string(),
        )
        .env(
            "SSEHUB__SERVER__SHUTDOWN_GRACE_SECS",
            GRACE_SECS.to_string(),
        )
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let binary = Binary { child, addr, admin };
    eventually("the binary is ready", || async move {
        matches!(get(admin, "/readyz", &[]).await, Ok((200, _)))
    })
    .await?;
    Ok(binary)
}

async fn sigterm(child: &Child) -> TestResult {
    let pid = child.id().ok_or("no pid")?;
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    if !status.success() {
        return Err("kill -TERM failed".into());
    }
    Ok(())
}

/// Reads blocks until the stream ends; returns the `retry:` values seen after `skip` blocks.
async fn retries_until_end(mut client: SseClient) -> TestResult<Vec<u64>> {
    let mut retries = Vec::new();
    loop {
        match client
            .next_block_within(Duration::from_secs(GRACE_SECS + 5))
            .await
        {
            Ok(block) => retries.extend(block.retry),
            Err(_) if client.ended => return Ok(retries),
            Err(e) => return Err(e),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_every_client_a_spread_retry_and_exits_within_grace() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut binary = start_binary(&redis).await?;
    let mut clients = Vec::new();
    for n in 0..500 {
        let (status, mut client) =
            SseClient::open(binary.addr, &format!("/events?channel=c{}", n % 10), &[]).await?;
        assert_eq!(status, 200);
        let preamble = client.next_block().await?;
        assert_eq!(preamble.retry, Some(RETRY_MS));
        clients.push(client);
    }
    let readers: Vec<_> = clients
        .into_iter()
        .map(|client| tokio::spawn(retries_until_end(client)))
        .collect();

    let signalled = Instant::now();
    sigterm(&binary.child).await?;
    let status = tokio::time::timeout(Duration::from_secs(GRACE_SECS + 2), binary.child.wait())
        .await
        .map_err(|_| "the process did not exit within the grace period")??;
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(GRACE_SECS), "exit took {took:?}");

    let mut finals = Vec::new();
    for reader in readers {
        let retries = reader.await??;
        let last = *retries.last().ok_or("a client got no final retry")?;
        finals.push(last);
    }
    assert_eq!(finals.len(), 500);
    assert!(finals
        .iter()
        .all(|r| (RETRY_MS..=RETRY_MS + JITTER_MS).contains(r)));
    let mean = finals.iter().sum::<u64>() as f64 / finals.len() as f64;
    let variance = finals
        .iter()
        .map(|r| (*r as f64 - mean).powi(2))
        .sum::<f64>()
        / 500.0;
    // A uniform spread over 5000 ms has a standard deviation of about 1443 ms.
    assert!(
        variance.sqrt() > 1000.0,
        "retries not spread: sd {}",
        variance.sqrt()
    );
    let mut distinct = finals.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(
        distinct.len() > 300,
        "only {} distinct retry values",
        distinct.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_as_soon_as_draining_starts() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut binary = start_binary(&redis).await?;
    // A client that never reads: once its socket buffers fill, its stream cannot finish, so
    // the drain lasts until the grace period ends.
    let stuck = tokio::net::TcpStream::connect(binary.addr).await?;
    {
        use tokio::io::AsyncWriteExt;
        let mut stuck = stuck;
        stuck
            .write_all(b"GET /events?channel=flood HTTP/1.1\r\nHost: x\r\n\r\n")
            .await?;
        let big = "x".repeat(512 * 1024);
        for _ in 0..40 {
            redis.publish("flood", &big).await?;
        }
        sigterm(&binary.child).await?;
        let admin = binary.admin;
        eventually("/readyz answers 503 while draining", || async move {
            matches!(get(admin, "/readyz", &[]).await, Ok((503, body)) if body.contains("draining"))
        })
        .await?;
        // The admin listener is still up (liveness answers) until the process exits.
        let (health, _) = get(binary.admin, "/healthz", &[]).await?;
        assert_eq!(health, 200);
        let status = tokio::time::timeout(Duration::from_secs(GRACE_SECS + 3), binary.child.wait())
            .await
            .map_err(|_| "no exit after the grace period")??;
        assert!(status.success());
        drop(stuck);
    }
    Ok(())
}
