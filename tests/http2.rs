//! HTTP/2: prior-knowledge h2c on the plain port, and h2 or HTTP/1.1 over TLS via ALPN.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use support::*;
use tokio::net::TcpStream;

fn fixture(name: &str) -> std::path::PathBuf {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR")).into()
}

async fn h2c(addr: SocketAddr) -> TestResult<SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn open_h2(sender: &mut SendRequest<Empty<Bytes>>, uri: &str) -> TestResult<SseClient> {
    let request = hyper::Request::get(uri).body(Empty::new())?;
    let response = sender.send_request(request).await?;
    let (status, client) = SseClient::from_response(response);
    assert_eq!(status, 200);
    Ok(client)
}

#[tokio::test]
async fn many_streams_share_one_h2c_connection_and_end_cleanly_on_shutdown() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let mut sender = h2c(gateway.addr).await?;
    let uri = format!("http://{}/events?channel=h2", gateway.addr);
    let mut streams = Vec::new();
    for _ in 0..20 {
        let mut client = open_h2(&mut sender, &uri).await?;
        client.next_block().await?;
        streams.push(client);
    }
    redis.publish("h2", "over http/2").await?;
    for client in &mut streams {
        assert_eq!(client.next_data(1).await?, ["over http/2"]);
    }
    gateway.stop().await?;
    for client in &mut streams {
        // A RST_STREAM would surface as an error here: the end must be END_STREAM.
        client.expect_end(Duration::from_secs(2)).await?;
    }
    Ok(())
}

fn tls_client(alpn: &[u8]) -> TestResult<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(fixture("tls_ca.pem"))? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

async fn tls_stream(
    addr: SocketAddr,
    alpn: &[u8],
) -> TestResult<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost")?;
    let tls = tls_client(alpn)?.connect(name, tcp).await?;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
    Ok(tls)
}

#[tokio::test]
async fn tls_serves_http2_and_http1_by_alpn() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.server.tls = Some(ssehub::config::TlsSettings {
        cert_file: fixture("tls_cert.pem"),
        key_file: fixture("tls_key.pem"),
    });
    let gateway = TestGateway::start_ready(settings).await?;
    let uri = format!(
        "https://localhost:{}/events?channel=secure",
        gateway.addr.port()
    );

    let tls = tls_stream(gateway.addr, b"h2").await?;
    let (mut h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let mut over_h2 = open_h2(&mut h2, &uri).await?;
    over_h2.next_block().await?;

    let tls = tls_stream(gateway.addr, b"http/1.1").await?;
    let (mut h1, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::get("/events?channel=secure")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())?;
    let (status, mut over_h1) = SseClient::from_response(h1.send_request(request).await?);
    assert_eq!(status, 200);
    over_h1.next_block().await?;

    redis.publish("secure", "encrypted").await?;
    assert_eq!(over_h2.next_data(1).await?, ["encrypted"]);
    assert_eq!(over_h1.next_data(1).await?, ["encrypted"]);

    // Plain HTTP on the TLS port is not served.
    assert!(get(gateway.addr, "/events?channel=secure", &[])
        .await
        .is_err());
    gateway.stop().await
}

#[tokio::test]
async fn a_bad_tls_key_file_stops_start_up_naming_the_key() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.server.tls = Some(ssehub::config::TlsSettings {
        cert_file: fixture("tls_cert.pem"),
        key_file: fixture("README"),
    });
    let listeners = ssehub::Listeners {
        public: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        admin: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    };
    match ssehub::run(settings, listeners, std::future::pending()).await {
        Err(e) => assert!(e.to_string().contains("server.tls.key_file"), "{e}"),
        Ok(()) => return Err("started with a bad key".into()),
    }
    Ok(())
}
