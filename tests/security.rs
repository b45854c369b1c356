//! Security edges: client addresses behind proxies (forwarding headers, IPv4-mapped peers),
//! Redis's own channels, and CORS answers that caches cannot mix up.

mod support;

use std::net::IpAddr;

use redis::AsyncCommands;
use ssehub::config::ForwardedHeader;
use support::*;

const PROXY: &str = "127.0.0.3";

/// Streams may be opened three per client address; `127.0.0.3` is a trusted proxy.
fn behind_a_proxy(redis: &TestRedis, header: ForwardedHeader) -> ssehub::Settings {
    let mut settings = test_settings(redis);
    settings.limits.max_connections_per_ip = 3;
    settings.limits.trusted_proxies = vec![PROXY.parse().unwrap_or(IpAddr::from([127, 0, 0, 3]))];
    settings.limits.forwarded_header = header;
    settings
}

/// Opens one stream per header value from the proxy; returns the statuses, keeping the streams
/// open so each counts against its address.
async fn statuses_through_the_proxy(
    addr: std::net::SocketAddr,
    header: &str,
    values: &[String],
) -> TestResult<(Vec<u16>, Vec<SseClient>)> {
    let mut statuses = Vec::new();
    let mut open = Vec::new();
    for value in values {
        let (status, client) = SseClient::open_from(
            Some(PROXY.parse()?),
            addr,
            "/events?channel=orders",
            &[(header, value)],
        )
        .await?;
        statuses.push(status);
        open.push(client);
    }
    Ok((statuses, open))
}

#[tokio::test]
async fn forwarded_for_hops_a_client_wrote_past_an_unreadable_hop_are_not_believed() -> TestResult {
    let redis = TestRedis::start().await?;
    let settings = behind_a_proxy(&redis, ForwardedHeader::XForwardedFor);
    let gateway = TestGateway::start_ready(settings).await?;

    // The proxy appended `unknown`: what is left of it was written by the client.
    let spoofed: Vec<String> = (1..=5).map(|i| format!("6.6.6.{i}, unknown")).collect();
    let (statuses, _spoofed) =
        statuses_through_the_proxy(gateway.addr, "x-forwarded-for", &spoofed).await?;
    assert_eq!(statuses, [200, 200, 200, 429, 429]);

    // Real clients, written with ports and brackets, each get their own count (the spoofed
    // streams above stay open, counted against the proxy's own address).
    let distinct: Vec<String> = (1..=2)
        .flat_map(|i| {
            [
                format!("7.7.7.{i}:4711"),
                format!("[2001:db8::{i}]"),
                format!("[2001:db8::a{i}]:443"),
            ]
        })
        .collect();
    let (statuses, _open) =
        statuses_through_the_proxy(gateway.addr, "x-forwarded-for", &distinct).await?;
    assert_eq!(statuses, [200; 6]);
    gateway.stop().await
}

#[tokio::test]
async fn the_forwarded_header_is_read_when_configured_and_x_forwarded_for_is_then_ignored(
) -> TestResult {
    let redis = TestRedis::start().await?;
    let settings = behind_a_proxy(&redis, ForwardedHeader::Forwarded);
    let gateway = TestGateway::start_ready(settings).await?;

    let clients: Vec<String> = (1..=5)
        .map(|i| format!("for=\"[2001:db8::{i}]:4711\";proto=http"))
        .collect();
    let (statuses, _forwarded) =
        statuses_through_the_proxy(gateway.addr, "forwarded", &clients).await?;
    assert_eq!(statuses, [200; 5]);

    // X-Forwarded-For is not the configured header: all five are the proxy itself.
    let ignored: Vec<String> = (1..=5).map(|i| format!("8.8.8.{i}")).collect();
    let (statuses, _open) =
        statuses_through_the_proxy(gateway.addr, "x-forwarded-for", &ignored).await?;
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    gateway.stop().await
}

#[tokio::test]
async fn a_trusted_proxy_is_recognised_when_the_listener_sees_ipv4_mapped_peers() -> TestResult {
    let redis = TestRedis::start().await?;
    let settings = behind_a_proxy(&redis, ForwardedHeader::XForwardedFor);
    // An IPv6 socket bound to a mapped address: IPv4 peers appear as ::ffff:a.b.c.d.
    let public = tokio::net::TcpListener::bind("[::ffff:127.0.0.1]:0").await?;
    let port = public.local_addr()?.port();
    assert!(public.local_addr()?.is_ipv6());
    let gateway = TestGateway::start_on(settings, public).await?;
    gateway.wait_ready(200).await?;

    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let clients: Vec<String> = (1..=5).map(|i| format!("9.9.9.{i}")).collect();
    let (statuses, _open) = statuses_through_the_proxy(addr, "x-forwarded-for", &clients).await?;
    assert_eq!(statuses, [200; 5]);
    gateway.stop().await
}

/// Status and JSON error of `/events?channel=<channel>`.
async fn open_channel(gateway: &TestGateway, channel: &str) -> TestResult<u16> {
    let (status, body) =
        open_status(gateway.addr, &format!("/events?channel={channel}"), &[]).await?;
    if let Some(body) = body {
        let body: serde_json::Value = serde_json::from_str(&body)?;
        assert!(body["error"].is_string(), "{body}");
    }
    Ok(status)
}

#[tokio::test]
async fn redis_keyspace_notifications_are_served_only_when_their_prefix_is_named() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut connection = redis.connection().await?;
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("KEA")
        .query_async::<()>(&mut connection)
        .await?;

    // `public = ["*"]` (the test default) does not reach Redis's own channels.
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    for channel in [
        "__keyevent@0__:set",
        "__keyspace@0__:session",
        "__redis__:invalidate",
    ] {
        assert_eq!(open_channel(&gateway, channel).await?, 403, "{channel}");
    }
    gateway.stop().await?;

    // Written out, the prefix is served.
    let mut settings = test_settings(&redis);
    settings.channels.public = vec!["*".to_string(), "__keyevent@0__:*".to_string()];
    let gateway = TestGateway::start_ready(settings).await?;
    let mut client = gateway.subscribe("channel=__keyevent@0__:set").await?;
    client.next_block().await?;
    eventually("the gateway subscribed", || async {
        redis
            .subscribed_channels()
            .await
            .is_ok_and(|c| c.iter().any(|c| c == "__keyevent@0__:set"))
    })
    .await?;
    connection
        .set::<_, _, ()>("session:alice:token", "secret")
        .await?;
    assert_eq!(client.next_data(1).await?, ["session:alice:token"]);
    gateway.stop().await
}

fn header<'a>(headers: &'a hyper::HeaderMap, name: &str) -> Vec<&'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect()
}

#[tokio::test]
async fn a_wildcard_cors_answer_varies_on_origin_on_both_http1_paths() -> TestResult {
    let redis = TestRedis::start().await?;
    for fast_path in [true, false] {
        let mut settings = test_settings(&redis);
        settings.server.cors_origins = vec!["*".to_string()];
        settings.server.http1_fast_path = fast_path;
        let gateway = TestGateway::start_ready(settings).await?;
        let origin = [("Origin", "https://app.example.com")];
        for (path, status) in [("/events?channel=orders", 200), ("/events", 400)] {
            for headers in [&origin[..], &[]] {
                let (got, answer) = response_head(gateway.addr, "GET", path, headers).await?;
                let case = format!("fast path {fast_path}, {path}, headers {headers:?}");
                assert_eq!(got, status, "{case}");
                assert!(
                    header(&answer, "vary").contains(&"Origin"),
                    "{case}: {answer:?}"
                );
                let allowed = header(&answer, "access-control-allow-origin");
                let expected: &[&str] = if headers.is_empty() { &[] } else { &["*"] };
                assert_eq!(allowed, expected, "{case}");
            }
        }
        gateway.stop().await?;
    }
    Ok(())
}
