//! Resilience under abuse, with the real binary where the process's own limits are the point:
//! connection caps counted at accept, deadlines that close connections doing nothing, clients
//! that stop reading, malformed heads. Normal clients and the admin listener keep working
//! throughout.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

/// An HTTP/2 client preface followed by an empty SETTINGS frame: all an idle HTTP/2 client sends.
const H2_PREFACE_AND_SETTINGS: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

async fn connect_from(source: IpAddr, addr: SocketAddr) -> TestResult<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    Ok(socket.connect(addr).await?)
}

/// Opens `count` connections from `source` that each send only the HTTP/2 preface.
async fn idle_http2_clients(
    source: &str,
    addr: SocketAddr,
    count: usize,
) -> TestResult<Vec<TcpStream>> {
    let source: IpAddr = source.parse()?;
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        let mut client = connect_from(source, addr).await?;
        // A refused connection may already be closed: a failed write is part of the answer.
        let _ = client.write_all(H2_PREFACE_AND_SETTINGS).await;
        clients.push(client);
    }
    Ok(clients)
}

/// Splits `clients` into those the server closed within `patience` (with what they were told)
/// and those still open.
async fn closed_by_server(
    clients: Vec<TcpStream>,
    patience: Duration,
) -> (Vec<String>, Vec<TcpStream>) {
    let mut tasks = JoinSet::new();
    for mut client in clients {
        tasks.spawn(async move {
            let mut answer = Vec::new();
            let mut buffer = [0u8; 4096];
            let read_to_end = async {
                loop {
                    match client.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => answer.extend_from_slice(&buffer[..n]),
                    }
                }
            };
            match tokio::time::timeout(patience, read_to_end).await {
                Ok(()) => Err(String::from_utf8_lossy(&answer).into_owned()),
                Err(_) => Ok(client),
            }
        });
    }
    let (mut closed, mut open) = (Vec::new(), Vec::new());
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(Ok(client)) => open.push(client),
            Ok(Err(answer)) => closed.push(answer),
            Err(_) => {}
        }
    }
    (closed, open)
}

async fn admin_answers(admin: SocketAddr) -> TestResult {
    let (status, _) = get(admin, "/readyz", &[]).await?;
    assert_eq!(status, 200, "/readyz");
    let (status, _) = get(admin, "/metrics", &[]).await?;
    assert_eq!(status, 200, "/metrics");
    Ok(())
}

#[tokio::test]
async fn idle_http2_connections_cannot_exhaust_descriptors() -> TestResult {
    const DESCRIPTORS: u32 = 512;
    const PER_ADDRESS: usize = 50;
    let redis = TestRedis::start().await?;
    let gateway = GatewayProcess::start(
        &redis,
        &[
            ("SSEHUB__LIMITS__MAX_CONNECTIONS_PER_IP", "50"),
            // Long enough that only the caps act during the test.
            ("SSEHUB__LIMITS__HEADER_READ_TIMEOUT_SECS", "120"),
            ("SSEHUB__LIMITS__IDLE_TIMEOUT_SECS", "120"),
        ],
        Some(DESCRIPTORS),
    )
    .await?;

    // One address: the per-address cap holds at the connection level.
    let attack = idle_http2_clients("127.0.0.2", gateway.addr, 600).await?;
    let (refused, held) = closed_by_server(attack, Duration::from_secs(3)).await;
    assert_eq!(held.len(), PER_ADDRESS, "connections left open");
    assert_eq!(refused.len(), 600 - PER_ADDRESS);
    // Each refusal is answered 429, or closed at once while many refusals are still being
    // written (refusing a flood must not cost descriptors itself): never left hanging.
    let answered = refused
        .iter()
        .filter(|answer| answer.starts_with("HTTP/1.1 429"))
        .count();
    assert!(
        refused
            .iter()
            .all(|answer| answer.is_empty() || answer.starts_with("HTTP/1.1 429")),
        "unexpected answers: {refused:?}"
    );
    assert!(answered >= 64, "only {answered} refusals answered 429");
    let mut client = gateway.subscribe_from("127.0.0.1", "channel=a").await?;
    redis.publish("a", "still served").await?;
    assert_eq!(client.next_data(1).await?, ["still served"]);
    admin_answers(gateway.admin).await?;
    let open = metric(gateway.admin, "ssehub_tcp_connections{listener=\"public\"}").await?;
    assert_eq!(open, (PER_ADDRESS + 1) as f64);

    // Many addresses: the total stays inside the descriptor limit, the admin listener answers.
    let mut held = held;
    for i in 3..=14 {
        let more = idle_http2_clients(&format!("127.0.0.{i}"), gateway.addr, PER_ADDRESS).await?;
        held.extend(closed_by_server(more, Duration::from_millis(300)).await.1);
    }
    assert!(
        held.len() < DESCRIPTORS as usize,
        "{} connections held under a limit of {DESCRIPTORS} descriptors",
        held.len()
    );
    admin_answers(gateway.admin).await?;
    let refused_total = metric(
        gateway.admin,
        "ssehub_tcp_connections_refused_total{listener=\"public\",reason=\"max_connections\"}",
    )
    .await?;
    assert!(refused_total > 0.0, "the total cap refused nothing");
    let log = gateway.log();
    assert!(log.contains("ssehub started"), "{log}");
    assert!(!log.contains("Too many open files"), "{log}");
    // Written to a file, not a terminal: no colour codes.
    assert!(!log.contains('\u{1b}'), "{log}");

    // The attackers leave: new clients are served again.
    drop(held);
    drop(client);
    eventually("a new stream is accepted", || async {
        matches!(
            SseClient::open(gateway.addr, "/events?channel=a", &[]).await,
            Ok((200, _))
        )
    })
    .await?;
    Ok(())
}
