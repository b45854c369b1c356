//! CORS: allowed origins get the headers a browser needs, others get none.

mod support;

use support::*;

const APP: &str = "https://app.example";
const EVIL: &str = "https://evil.example";

async fn gateway_with_cors(
    redis: &TestRedis,
    origins: &[&str],
    credentials: bool,
) -> TestResult<TestGateway> {
    let mut settings = test_settings(redis);
    settings.server.cors_origins = origins.iter().map(|o| o.to_string()).collect();
    settings.server.cors_credentials = credentials;
    TestGateway::start_ready(settings).await
}

fn header<'a>(headers: &'a hyper::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn preflight_from_an_allowed_origin_is_answered_204_with_cors_headers() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = gateway_with_cors(&redis, &[APP], true).await?;
    let preflight = [
        ("Origin", APP),
        ("Access-Control-Request-Method", "GET"),
        (
            "Access-Control-Request-Headers",
            "last-event-id, authorization",
        ),
    ];
    let (status, headers) =
        response_head(gateway.addr, "OPTIONS", "/events?channel=a", &preflight).await?;
    assert_eq!(status, 204);
    assert_eq!(header(&headers, "access-control-allow-origin"), Some(APP));
    assert_eq!(
        header(&headers, "access-control-allow-credentials"),
        Some("true")
    );
    assert_eq!(
        header(&headers, "access-control-allow-methods"),
        Some("GET")
    );
    let allowed = header(&headers, "access-control-allow-headers")
        .unwrap_or("")
        .to_lowercase();
    assert!(allowed.contains("last-event-id") && allowed.contains("authorization"));
    assert_eq!(header(&headers, "vary"), Some("Origin"));

    let evil = [("Origin", EVIL), ("Access-Control-Request-Method", "GET")];
    let (status, headers) =
        response_head(gateway.addr, "OPTIONS", "/events?channel=a", &evil).await?;
    assert_eq!(status, 204);
    assert!(headers.get("access-control-allow-origin").is_none());
    assert!(headers.get("access-control-allow-methods").is_none());
    gateway.stop().await
}

#[tokio::test]
async fn actual_requests_carry_cors_headers_only_for_allowed_origins() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = gateway_with_cors(&redis, &[APP, "http://localhost:3000"], true).await?;
    let mut stream = gateway
        .subscribe_with("channel=a", &[("Origin", APP)])
        .await?;
    assert_eq!(
        header(&stream.headers, "access-control-allow-origin"),
        Some(APP)
    );
    assert_eq!(
        header(&stream.headers, "access-control-allow-credentials"),
        Some("true")
    );
    assert_eq!(header(&stream.headers, "vary"), Some("Origin"));
    stream.next_block().await?;

    let other = gateway
        .subscribe_with("channel=a", &[("Origin", EVIL)])
        .await?;
    assert!(other.headers.get("access-control-allow-origin").is_none());
    assert!(other
        .headers
        .get("access-control-allow-credentials")
        .is_none());

    // Errors are readable by an allowed origin too.
    let (status, headers) =
        response_head(gateway.addr, "GET", "/events", &[("Origin", APP)]).await?;
    assert_eq!(status, 400);
    assert_eq!(header(&headers, "access-control-allow-origin"), Some(APP));
    gateway.stop().await
}

#[tokio::test]
async fn a_wildcard_without_credentials_allows_any_origin() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = gateway_with_cors(&redis, &["*"], false).await?;
    let stream = gateway
        .subscribe_with("channel=a", &[("Origin", EVIL)])
        .await?;
    assert_eq!(
        header(&stream.headers, "access-control-allow-origin"),
        Some("*")
    );
    assert!(stream
        .headers
        .get("access-control-allow-credentials")
        .is_none());
    gateway.stop().await
}

#[tokio::test]
async fn a_wildcard_with_credentials_is_a_start_up_error() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.server.cors_origins = vec!["*".to_string()];
    settings.server.cors_credentials = true;
    let listeners = ssehub::Listeners {
        public: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        admin: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    };
    match ssehub::run(settings, listeners, std::future::pending()).await {
        Err(e) => assert!(e.to_string().contains("server.cors_origins"), "{e}"),
        Ok(()) => return Err("started with `*` and credentials".into()),
    }
    Ok(())
}
