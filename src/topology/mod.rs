//! Where the gateway's Redis is (`redis.mode`), and how it finds the node to talk to.
//!
//! - `standalone`: the one server at `redis.url`.
//! - `cluster`: the Redis Cluster that the seeds `redis.nodes` belong to, reached through the
//!   redis crate's cluster client ([`Topology::cluster`]), which routes each command to the
//!   owner of its key's slot and follows slot moves and failovers. There is no single primary.
//! - `sentinel`: the primary that the sentinels (`redis.nodes`) report for
//!   `redis.master_name`, reached with `redis.url`'s scheme, credentials and database. It is
//!   asked for whenever the gateway (re)connects, checked with `ROLE` (a demoted primary that
//!   comes back must not be mistaken for the current one), and followed through failovers:
//!   [`sentinel`] listens for `+switch-master`, and [`Topology::changes`] tells the upstream and
//!   the publisher to move at once instead of when their old connection times out.
//!
//! Every client is made by a [`NodeConnector`], so `rediss://` and the `redis.tls_*` files
//! apply to every connection, the sentinels' included (a sentinel's own URL decides whether
//! it is reached over TLS).
//!
//! The redis crate's own Sentinel client resolves the primary once and does not follow a
//! failover (redis-rs#1438), which is why following it is done here.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{redact_url, RedisMode, RedisSettings};

pub mod cluster;
mod connector;
mod sentinel;

pub use connector::NodeConnector;
use sentinel::Sentinels;

/// A node's `host:port`, as the topology names it.
pub type NodeAddress = (String, u16);

/// The node that takes writes and serves subscriptions, found by [`Topology::primary`].
#[derive(Debug)]
pub struct Primary {
    /// A client for it.
    pub client: redis::Client,
    /// Where it is (`None` for a Unix socket).
    pub address: Option<NodeAddress>,
}

/// The deployment the gateway talks to. Shared by the upstream and the publisher.
#[derive(Debug)]
pub struct Topology {
    /// How every data node is reached.
    connector: NodeConnector,
    /// Set in sentinel mode.
    sentinels: Option<Sentinels>,
    /// Cluster mode: the seed nodes, one connector each (empty otherwise).
    seeds: Vec<NodeConnector>,
    /// Set in cluster mode: the client for the cluster, for commands routed by key.
    cluster: Option<redis::cluster::ClusterClient>,
    /// The primary last announced by a sentinel (`None` until a failover is announced).
    announced: watch::Sender<Option<NodeAddress>>,
    connect_timeout: Duration,
}

impl Topology {
    /// The topology `settings` describe. Nothing is connected yet.
    pub fn new(settings: &RedisSettings) -> Result<Arc<Topology>, String> {
        let tls = settings.tls_certificates().map_err(|e| e.to_string())?;
        let seeds = match settings.mode {
            RedisMode::Cluster => settings
                .nodes
                .iter()
                .map(|node| NodeConnector::new(node, tls.as_ref()))
                .collect::<Result<Vec<_>, String>>()?,
            _ => Vec::new(),
        };
        // A cluster's nodes share their credentials and TLS: the first seed's apply to every
        // node the slot map names.
        let connector = match seeds.first() {
            Some(seed) => seed.clone(),
            None => NodeConnector::new(&settings.url, tls.as_ref())?,
        };
        let sentinels = match settings.mode {
            RedisMode::Standalone | RedisMode::Cluster => None,
            RedisMode::Sentinel => Some(Sentinels::new(
                &settings.nodes,
                &settings.master_name,
                &connector,
                tls.as_ref(),
            )?),
        };
        let cluster = (settings.mode == RedisMode::Cluster)
            .then(|| {
                connector::cluster_client(
                    &settings.nodes,
                    tls.as_ref(),
                    Duration::from_secs(settings.connect_timeout_secs),
                    Duration::from_secs(settings.command_timeout_secs),
                )
            })
            .transpose()?;
        Ok(Arc::new(Topology {
            connector,
            sentinels,
            seeds,
            cluster,
            announced: watch::channel(None).0,
            connect_timeout: Duration::from_secs(settings.connect_timeout_secs),
        }))
    }

    /// Starts following the deployment's changes (the sentinels' `+switch-master`) until
    /// `shutdown`. A no-op for a standalone server.
    pub fn start_watching(self: &Arc<Self>, shutdown: CancellationToken) {
        if let Some(sentinels) = &self.sentinels {
            sentinels.watch(self.announced.clone(), self.connect_timeout, shutdown);
        }
    }

    /// The node that takes writes and serves subscriptions now; an error in cluster mode,
    /// where every shard has its own (see [`Topology::cluster`]).
    pub async fn primary(&self) -> Result<Primary, String> {
        if self.cluster.is_some() {
            return Err("a Redis Cluster has no single primary".to_string());
        }
        match &self.sentinels {
            None => Ok(Primary {
                client: self.connector.client()?,
                address: self.connector.address(),
            }),
            Some(sentinels) => sentinels.primary(self.connect_timeout).await,
        }
    }

    /// Whether this is a Redis Cluster (the upstream then runs one subscription per shard).
    pub fn is_cluster(&self) -> bool {
        !self.seeds.is_empty()
    }

    /// A client for the node at `address`, reached like every node of the deployment.
    pub fn node(&self, address: &NodeAddress) -> Result<redis::Client, String> {
        self.connector.client_at(&address.0, address.1)
    }

    /// The cluster client, in cluster mode.
    pub fn cluster(&self) -> Option<&redis::cluster::ClusterClient> {
        self.cluster.as_ref()
    }

    /// Announcements of a new primary: a connection to any other node should be replaced.
    pub fn announcements(&self) -> watch::Receiver<Option<NodeAddress>> {
        self.announced.subscribe()
    }

    /// Whether a connection to `address` should be replaced: a newer primary was announced.
    pub fn moved_from(&self, address: &Option<NodeAddress>) -> bool {
        let announced = self.announced.borrow();
        announced.is_some() && *announced != *address
    }

    /// Says where Redis is, for the start-up log (passwords redacted).
    pub fn describe(settings: &RedisSettings) -> String {
        match settings.mode {
            RedisMode::Standalone => redact_url(&settings.url),
            RedisMode::Sentinel | RedisMode::Cluster => {
                let nodes: Vec<String> = settings.nodes.iter().map(|n| redact_url(n)).collect();
                let mode = match settings.mode {
                    RedisMode::Sentinel => format!("sentinel {}", settings.master_name),
                    _ => "cluster".to_string(),
                };
                format!("{mode} via {}", nodes.join(","))
            }
        }
    }
}
