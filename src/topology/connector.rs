//! How the gateway opens a connection to one Redis node: the scheme, credentials and database
//! of a configured URL, applied to whichever address the topology names (the primary the
//! sentinels report, a cluster node the slot map names).

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo};

/// Makes `redis::Client`s for the nodes of one deployment.
#[derive(Clone, Debug)]
pub struct NodeConnector {
    /// The configured URL, parsed: its address is replaced per node.
    template: ConnectionInfo,
}

impl NodeConnector {
    /// A connector speaking to nodes the way `url` says (scheme, credentials, database).
    pub fn new(url: &str) -> Result<NodeConnector, String> {
        let template = url
            .into_connection_info()
            .map_err(|e| format!("not a valid Redis URL: {e}"))?;
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

    /// A client for the node at `host:port`, reached like the URL's own node (TLS if the URL
    /// is `rediss://`).
    pub fn client_at(&self, host: &str, port: u16) -> Result<redis::Client, String> {
        let addr = match self.template.addr() {
            ConnectionAddr::TcpTls { insecure, .. } => ConnectionAddr::TcpTls {
                host: host.to_string(),
                port,
                insecure: *insecure,
                tls_params: None,
            },
            _ => ConnectionAddr::Tcp(host.to_string(), port),
        };
        redis::Client::open(self.template.clone().set_addr(addr)).map_err(|e| e.to_string())
    }
}
