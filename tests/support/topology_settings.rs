//! What the topology tests (sentinel, cluster, their facts and their write side) share on the
//! gateway's side: settings that follow a failover quickly, and the one cluster the tests of a
//! binary share.
//!
//! The topologies themselves live in [`super::topology`], which knows nothing about the
//! gateway.

use ssehub::config::{HistoryBackend, RedisMode, Settings};
use tokio::sync::{Mutex, MutexGuard, OnceCell};

use super::topology::{TestCluster, TestSentinels};
use super::TestResult;

/// The JWT secret of the topology tests that publish over HTTP.
pub const TOPOLOGY_SECRET: &str = "topology-test-secret-of-at-least-32-bytes";

static CLUSTER: OnceCell<Mutex<TestCluster>> = OnceCell::const_new();

/// The cluster the tests of this binary share: started on first use, healed from the previous
/// test's faults (every node running and agreeing), held exclusively until the guard drops.
pub async fn shared_cluster() -> TestResult<MutexGuard<'static, TestCluster>> {
    let cell = CLUSTER
        .get_or_try_init(|| async { TestCluster::start().await.map(Mutex::new) })
        .await?;
    let mut cluster = cell.lock().await;
    cluster.heal().await?;
    Ok(cluster)
}

/// A gateway on `cluster`'s seed nodes, with `backend` and the publish secret.
pub fn cluster_settings(cluster: &TestCluster, backend: HistoryBackend) -> Settings {
    quick_to_follow(RedisMode::Cluster, cluster.seed_urls(), backend)
}

/// A gateway asking `sentinels` for the primary, with `backend` and the publish secret.
pub fn sentinel_settings(sentinels: &TestSentinels, backend: HistoryBackend) -> Settings {
    let mut settings = quick_to_follow(RedisMode::Sentinel, sentinels.sentinel_urls(), backend);
    settings.redis.master_name = sentinels.master_name().to_string();
    settings
}

/// Settings that notice a fault within a second and reconnect within half a second (the
/// figures the README's operations section quotes), every channel public.
fn quick_to_follow(mode: RedisMode, nodes: Vec<String>, backend: HistoryBackend) -> Settings {
    let mut settings = Settings::default();
    settings.redis.mode = mode;
    settings.redis.nodes = nodes;
    settings.redis.reconnect_initial_ms = 50;
    settings.redis.reconnect_max_ms = 500;
    settings.redis.ping_interval_secs = 1;
    settings.redis.command_timeout_secs = 2;
    settings.redis.connect_timeout_secs = 2;
    settings.channels.public = vec!["*".to_string()];
    settings.server.shutdown_grace_secs = 5;
    settings.history.backend = backend;
    settings.auth.jwt_secret = serde_json::from_value(serde_json::json!(TOPOLOGY_SECRET)).ok();
    settings
}
