//! How the gateway opens a connection to one Redis node: the scheme, credentials, database and
//! TLS material of a configured URL, applied to whichever address the topology names (the
//! primary the sentinels report, a cluster node the slot map names).
//!
//! Every Redis client of the gateway is made here, so that `redis.tls_*` applies to every
//! connection (subscription, history, publisher, sentinels, the cluster client).

use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo};

/// Makes `redis::Client`s for the nodes of one deployment.
#[derive(Clone, Debug)]
pub struct NodeConnector {
    /// The configured URL, parsed, with the TLS material attached when it is `rediss://`: its
    /// address is replaced per node.
    template: ConnectionInfo,
}

impl NodeConnector {
    /// A connector speaking to nodes the way `url` says (scheme, credentials, database), with
    /// `tls` (CA, client certificate) applied when `url` is `rediss://`.
    pub fn new(url: &str, tls: Option<&redis::TlsCertificates>) -> Result<NodeConnector, String> {
        let info = url
            .into_connection_info()
            .map_err(|e| format!("not a valid Redis URL: {e}"))?;
        let template = match (info.addr(), tls) {
            (ConnectionAddr::TcpTls { .. }, tls) => {
                install_crypto_provider();
                match tls {
                    // Parsed once here; `client_at` copies the parsed material.
                    Some(tls) => redis::Client::build_with_tls(info, tls.clone())
                        .map_err(|e| format!("TLS settings: {e}"))?
                        .get_connection_info()
                        .clone(),
                    None => info,
                }
            }
            _ => info,
        };
        Ok(NodeConnector { template })
    }

    /// A client for the URL's own address.
    pub fn client(&self) -> Result<redis::Client, String> {
        redis::Client::open(self.template.clone()).map_err(|e| e.to_string())
    }

    /// The URL's own `host:port` (`None` for a Unix socket).
    pub fn address(&self) -> Option<(String, u16)> {
        match self.template.addr() {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                Some((host.clone(), *port))
            }
            _ => None,
        }
    }

    /// A client for the node at `host:port`, reached like the URL's own node (TLS, with the
    /// same CA and client certificate, if the URL is `rediss://`).
    pub fn client_at(&self, host: &str, port: u16) -> Result<redis::Client, String> {
        let addr = match self.template.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: host.to_string(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host.to_string(), port),
        };
        redis::Client::open(self.template.clone().set_addr(addr)).map_err(|e| e.to_string())
    }
}

/// A client for the Redis Cluster the `seeds` belong to (`redis.nodes`): it discovers the
/// cluster from them and routes each command to the node that owns its key's slot. The seeds'
/// scheme and credentials apply to every node (the redis crate takes them from the first seed
/// and refuses seeds that differ); with `rediss://`, so does `tls` (CA, client certificate).
/// `connect_timeout` and `response_timeout` bound each node connection and each reply.
/// Connects nothing yet.
pub(super) fn cluster_client(
    seeds: &[String],
    tls: Option<&redis::TlsCertificates>,
    connect_timeout: Duration,
    response_timeout: Duration,
) -> Result<ClusterClient, String> {
    let seeds = seeds
        .iter()
        .map(|seed| seed.as_str().into_connection_info())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a valid Redis URL: {e}"))?;
    let first_tls = seeds.first().and_then(|seed| match seed.addr() {
        ConnectionAddr::TcpTls { insecure, .. } => Some(*insecure),
        _ => None,
    });
    let mut builder = ClusterClientBuilder::new(seeds)
        .connection_timeout(connect_timeout)
        .response_timeout(response_timeout);
    if let Some(insecure) = first_tls {
        install_crypto_provider();
        // Set before `certs`, which would otherwise make the mode `Secure` whatever the URL says.
        builder = builder.tls(if insecure {
            redis::TlsMode::Insecure
        } else {
            redis::TlsMode::Secure
        });
        if let Some(tls) = tls {
            builder = builder.certs(tls.clone());
        }
    }
    builder.build().map_err(|e| e.to_string())
}

/// Makes ring, the provider the gateway's own HTTPS uses, the process-wide rustls default:
/// the redis crate builds its TLS configuration from that default, and would fail (or pick
/// another provider compiled in by some other crate) without it.
fn install_crypto_provider() {
    // An error means a default is installed already, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn seeds(urls: &[&str]) -> Vec<String> {
        urls.iter().map(|url| url.to_string()).collect()
    }

    #[test]
    fn a_cluster_client_takes_tls_seeds_with_the_configured_certificates() {
        let tls = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(include_bytes!("../../tests/fixtures/tls_ca.pem").to_vec()),
        };
        let tls_seeds = seeds(&["rediss://:pw@127.0.0.1:7000", "rediss://:pw@127.0.0.1:7001"]);
        assert!(cluster_client(&tls_seeds, Some(&tls), SECOND, SECOND).is_ok());
        let plain = seeds(&["redis://127.0.0.1:7000"]);
        assert!(cluster_client(&plain, None, SECOND, SECOND).is_ok());
    }

    /// Every node is reached with the first seed's scheme and credentials, so seeds that
    /// differ are a configuration mistake the crate refuses (and start-up reports).
    #[test]
    fn a_cluster_client_refuses_seeds_that_differ_in_scheme_or_credentials() {
        for urls in [
            ["redis://127.0.0.1:7000", "rediss://127.0.0.1:7001"],
            ["redis://:one@127.0.0.1:7000", "redis://:two@127.0.0.1:7001"],
        ] {
            let refused = cluster_client(&seeds(&urls), None, SECOND, SECOND);
            let message = refused.err().unwrap_or_default();
            assert!(
                message.contains("Cannot use different"),
                "{urls:?}: {message}"
            );
            assert!(
                !message.contains("one") && !message.contains("two"),
                "{message}"
            );
        }
    }
}
