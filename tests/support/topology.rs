//! Redis topologies for tests, as real processes on loopback ports: a Sentinel-managed primary
//! with replicas ([`TestSentinels`]) and a Redis Cluster ([`TestCluster`]), with the faults the
//! gateway must survive (a primary killed, a planned failover, a slot moved, a failover that
//! loses acknowledged writes).
//!
//! Owns the processes and their scratch directory; knows nothing about the gateway. Every wait
//! is bounded and reports what it last saw when it gives up.
//!
//! The processes are `std::process::Child`ren, not tokio ones: a topology may be shared by the
//! tests of one binary (each with its own runtime) and must be killable from any of them, or
//! from none. A shared topology lives in a static and is never dropped, so every node also gets
//! a watchdog shell that SIGKILLs it once the test process is gone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::FromRedisValue;
use tokio::time::{timeout, Instant};

use super::tls_redis::TestPki;
use super::{free_port, ScratchDir, TestResult};

/// The master name the sentinels monitor.
pub const MASTER_NAME: &str = "ssehub-primary";

/// How long topology changes (start, failover, resharding) may take before a wait gives up:
/// longer than [`super::PATIENCE`] because a failover is detection plus election plus gossip.
pub const TOPOLOGY_PATIENCE: Duration = Duration::from_secs(30);

/// How often the waits of this module poll.
const POLL: Duration = Duration::from_millis(100);

/// `cluster-node-timeout` and sentinel `down-after-milliseconds`: short, so a failover takes
/// a few seconds, yet long enough that a loaded 2-core machine does not fail nodes over by
/// itself.
pub const NODE_TIMEOUT_MS: u64 = 1000;

/// How the nodes of a topology are secured, and so how everyone (the nodes among themselves,
/// the harness, the gateway) reaches them. The default is neither password nor TLS.
#[derive(Clone, Default)]
pub struct TopologyOptions {
    /// `requirepass` and `masterauth` of every data node; for sentinels also their own
    /// `requirepass` (`sentinel sentinel-pass` between them) and `sentinel auth-pass`.
    pub password: Option<String>,
    /// Every node speaks only TLS (`port 0`), replication and the cluster bus included, with
    /// the PKI's server certificate; clients are not asked for one. Shared, so the files
    /// outlive every node restart.
    pub tls: Option<Arc<TestPki>>,
}

/// Neither password nor TLS: what the free functions of this module ([`query`], [`role`], ...)
/// reach nodes with.
static PLAIN: TopologyOptions = TopologyOptions {
    password: None,
    tls: None,
};

impl TopologyOptions {
    /// A random password and TLS with a fresh PKI.
    pub fn secured() -> TestResult<TopologyOptions> {
        Ok(TopologyOptions {
            password: Some(format!("topology-pw-{}", rand::random::<u64>())),
            tls: Some(Arc::new(TestPki::generate()?)),
        })
    }

    /// `redis://` or `rediss://`, with the password: `rediss://:<password>@127.0.0.1:<port>`.
    pub fn url(&self, port: u16) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        match &self.password {
            Some(password) => format!("{scheme}://:{password}@127.0.0.1:{port}"),
            None => format!("{scheme}://127.0.0.1:{port}"),
        }
    }

    /// The CA file clients must trust, with TLS.
    pub fn ca_file(&self) -> Option<&Path> {
        self.tls.as_ref().map(|pki| pki.ca_file.as_path())
    }

    /// Directives (`name`, value) every node gets, data node or sentinel: where it listens
    /// and with what, and the password it wants.
    fn listen_directives(&self, port: u16) -> Vec<(&'static str, String)> {
        let mut directives = Vec::new();
        match &self.tls {
            None => directives.push(("port", port.to_string())),
            Some(pki) => {
                let path = |p: &Path| p.display().to_string();
                directives.extend([
                    ("port", "0".to_string()),
                    ("tls-port", port.to_string()),
                    ("tls-cert-file", path(&pki.server_cert_file)),
                    ("tls-key-file", path(&pki.server_key_file)),
                    ("tls-ca-cert-file", path(&pki.ca_file)),
                    // The gateway presents no certificate (mutual TLS is tests/redis_tls.rs's).
                    ("tls-auth-clients", "no".to_string()),
                    // Replication and, in sentinels, every link to a node or a sentinel.
                    ("tls-replication", "yes".to_string()),
                ]);
            }
        }
        if let Some(password) = &self.password {
            directives.push(("requirepass", password.clone()));
        }
        directives
    }

    /// Directives of a data node on top of [`TopologyOptions::listen_directives`]: the password
    /// a replica gives its primary, and TLS on the cluster bus.
    fn data_node_directives(&self, port: u16) -> Vec<(&'static str, String)> {
        let mut directives = self.listen_directives(port);
        if let Some(password) = &self.password {
            directives.push(("masterauth", password.clone()));
        }
        if self.tls.is_some() {
            directives.push(("tls-cluster", "yes".to_string()));
        }
        directives
    }

    /// `redis-cli` arguments to reach a node: `-a`, `--tls --cacert`.
    fn cli_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(password) = &self.password {
            args.extend([
                "-a".to_string(),
                password.clone(),
                "--no-auth-warning".into(),
            ]);
        }
        if let Some(pki) = &self.tls {
            args.extend(["--tls".to_string(), "--cacert".into()]);
            args.push(pki.ca_file.display().to_string());
        }
        args
    }

    /// A client for the node on `port`, trusting the test CA with TLS.
    fn client(&self, port: u16) -> TestResult<redis::Client> {
        let Some(pki) = &self.tls else {
            return Ok(redis::Client::open(self.url(port))?);
        };
        // The redis crate's TLS takes rustls's process-wide provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certificates = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(&pki.ca_file)?),
        };
        Ok(redis::Client::build_with_tls(self.url(port), certificates)?)
    }

    /// One command against the node on `port` on a fresh connection, bounded in time.
    pub async fn query<T: FromRedisValue>(&self, port: u16, command: &redis::Cmd) -> TestResult<T> {
        Ok(self.try_query(port, command).await??)
    }

    /// Like [`TopologyOptions::query`], keeping the command's own outcome apart: the outer
    /// error is a failure to connect.
    pub async fn try_query<T: FromRedisValue>(
        &self,
        port: u16,
        command: &redis::Cmd,
    ) -> TestResult<redis::RedisResult<T>> {
        let client = self.client(port)?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)));
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(command.query_async(&mut connection).await)
    }

    /// The first element of `ROLE`: `"master"`, `"slave"` or `"sentinel"`.
    pub async fn role(&self, port: u16) -> TestResult<String> {
        let reply: Vec<redis::Value> = self.query(port, &redis::cmd("ROLE")).await?;
        let first = reply.first().ok_or("empty ROLE reply")?;
        Ok(String::from_redis_value(first.clone())?)
    }

    /// One `field:value` of `INFO <section>`.
    pub async fn info_field(&self, port: u16, section: &str, field: &str) -> TestResult<String> {
        let text: String = self.query(port, redis::cmd("INFO").arg(section)).await?;
        text.lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .map(|value| value.trim().to_string())
            .ok_or_else(|| format!("INFO {section} of :{port} has no {field}").into())
    }

    /// Waits until `replicas` replicas of the primary on `port` have acknowledged everything
    /// it has written so far, from any connection. (`WAIT` would not do: it waits only for the
    /// writes of its own connection, and answers at once on a fresh one.)
    pub async fn wait_replicated(&self, port: u16, replicas: usize) -> TestResult {
        let written: u64 = self
            .info_field(port, "replication", "master_repl_offset")
            .await?
            .parse()?;
        poll_until(
            "the replicas to acknowledge every write",
            super::PATIENCE,
            || async move {
                let info: String = self
                    .query(port, redis::cmd("INFO").arg("replication"))
                    .await
                    .map_err(|e| e.to_string())?;
                let acknowledged = info
                    .lines()
                    .filter(|line| line.starts_with("slave"))
                    .filter_map(|line| line.split(",offset=").nth(1)?.split(',').next())
                    .filter_map(|offset| offset.parse::<u64>().ok())
                    .filter(|&offset| offset >= written)
                    .count();
                if acknowledged >= replicas {
                    Ok(())
                } else {
                    Err(format!(
                        "{acknowledged} of {replicas} at offset {written}: {info}"
                    ))
                }
            },
        )
        .await
    }

    /// `CLUSTER NODES` of the node on `port`, parsed.
    pub async fn cluster_nodes(&self, port: u16) -> TestResult<Vec<ClusterNode>> {
        let text: String = self.query(port, redis::cmd("CLUSTER").arg("NODES")).await?;
        text.lines()
            .filter(|l| !l.is_empty())
            .map(parse_node_line)
            .collect()
    }

    /// Runs `commands` on `port`, one connection, replies in order.
    async fn run_commands(
        &self,
        port: u16,
        commands: &[redis::Cmd],
    ) -> TestResult<Vec<redis::Value>> {
        let mut connection = self
            .client(port)?
            .get_multiplexed_async_connection()
            .await?;
        let mut replies = Vec::with_capacity(commands.len());
        for command in commands {
            replies.push(command.query_async(&mut connection).await?);
        }
        Ok(replies)
    }
}

/// `redis://127.0.0.1:<port>`.
pub fn redis_url(port: u16) -> String {
    PLAIN.url(port)
}

/// One command against one node without password or TLS, on a fresh connection, bounded in
/// time.
pub async fn query<T: FromRedisValue>(port: u16, command: &redis::Cmd) -> TestResult<T> {
    PLAIN.query(port, command).await
}

/// Like [`query`], keeping the command's own outcome apart (for tests that pin a server error,
/// `RedisError::code()`): the outer error is a failure to connect.
pub async fn try_query<T: FromRedisValue>(
    port: u16,
    command: &redis::Cmd,
) -> TestResult<redis::RedisResult<T>> {
    PLAIN.try_query(port, command).await
}

/// The first element of `ROLE`: `"master"`, `"slave"` or `"sentinel"`.
pub async fn role(port: u16) -> TestResult<String> {
    PLAIN.role(port).await
}

/// One `field:value` of `INFO <section>`.
pub async fn info_field(port: u16, section: &str, field: &str) -> TestResult<String> {
    PLAIN.info_field(port, section, field).await
}

/// See [`TopologyOptions::wait_replicated`].
pub async fn wait_replicated(port: u16, replicas: usize) -> TestResult {
    PLAIN.wait_replicated(port, replicas).await
}

/// Polls `probe` every [`POLL`] until it returns `Ok`; on timeout the error names `what` and
/// the last thing `probe` saw.
pub async fn poll_until<T, F, Fut>(what: &str, patience: Duration, mut probe: F) -> TestResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + patience;
    loop {
        let seen = match timeout(patience, probe()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(seen)) => seen,
            Err(_) => "the probe itself timed out".to_string(),
        };
        if Instant::now() > deadline {
            return Err(format!(
                "timed out after {patience:?} waiting for {what}; last seen: {seen}"
            )
            .into());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A scratch directory name unique to this process and call.
fn scratch_dir(kind: &str) -> std::io::Result<ScratchDir> {
    static MADE: AtomicUsize = AtomicUsize::new(0);
    let made = MADE.fetch_add(1, Ordering::Relaxed);
    ScratchDir::create(&format!("ssehub-{kind}-{}-{made}", std::process::id()))
}

/// One `redis-server` process (a data node or a sentinel), restartable with the same arguments.
struct Node {
    port: u16,
    /// Everything after `redis-server`, so a restart is the same node again.
    args: Vec<String>,
    /// Where stdout and stderr go: the first place to look when a topology test fails.
    log: PathBuf,
    /// `None` while the node is killed.
    child: Option<Child>,
    /// How the harness reaches it (to see it answer after a start).
    reach: TopologyOptions,
}

impl Node {
    fn new(port: u16, args: Vec<String>, dir: &Path, reach: &TopologyOptions) -> Node {
        Node {
            port,
            args,
            log: dir.join(format!("node-{port}.log")),
            child: None,
            reach: reach.clone(),
        }
    }

    /// Spawns the process and waits until it answers `PING`; fails early if it exits.
    async fn spawn(&mut self) -> TestResult {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start redis-server (is it installed?): {e}"))?;
        spawn_watchdog(child.id());
        self.child = Some(child);
        let port = self.port;
        let deadline = Instant::now() + super::PATIENCE;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "redis-server on :{port} exited ({status}); see {}",
                    self.log.display()
                )
                .into());
            }
            if self
                .reach
                .query::<String>(port, &redis::cmd("PING"))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("redis-server on :{port} does not answer PING").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, then reaps the process: it is gone when this returns.
    fn kill(&mut self) -> TestResult {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGSTOP (`"-STOP"`) or SIGCONT (`"-CONT"`).
    async fn signal(&self, signal: &str) -> TestResult {
        let pid = self
            .child
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| format!("redis-server on :{} is not running", self.port))?;
        let status = tokio::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .await?;
        if !status.success() {
            return Err(format!("kill {signal} {pid} failed").into());
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// A shell that SIGKILLs `pid` once this test process is gone, and ends by itself when `pid`
/// does. Keeps a topology held in a static (never dropped) from outliving the test binary.
fn spawn_watchdog(pid: u32) {
    let script =
        "while kill -0 \"$0\" 2>/dev/null && kill -0 \"$1\" 2>/dev/null; do sleep 0.5; done; \
                  kill -0 \"$0\" 2>/dev/null || kill -9 \"$1\" 2>/dev/null";
    let _ = Command::new("/bin/sh")
        .args(["-c", script])
        .arg(std::process::id().to_string())
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

/// Arguments every data node gets: loopback only, no persistence, its files in `dir`, secured
/// as `options` say.
fn data_node_args(port: u16, dir: &Path, options: &TopologyOptions) -> Vec<String> {
    let mut args: Vec<String> = options
        .data_node_directives(port)
        .into_iter()
        .flat_map(|(name, value)| [format!("--{name}"), value])
        .collect();
    args.extend(["--bind", "127.0.0.1"].map(String::from));
    // No delay before a full sync (the default waits 5 s for more replicas): a replica must
    // hold the primary's data before a test fails the primary over.
    args.extend(
        [
            "--save",
            "",
            "--appendonly",
            "no",
            "--repl-diskless-sync-delay",
            "0",
            "--dir",
        ]
        .map(String::from),
    );
    args.push(dir.display().to_string());
    args
}

/// Starts a node on a fresh port from `pick_port`, retrying with another port when the one
/// picked was taken meanwhile (the port is only probed, not held).
async fn start_node<P, A>(
    dir: &Path,
    options: &TopologyOptions,
    mut pick_port: P,
    args_for: A,
) -> TestResult<Node>
where
    P: FnMut() -> TestResult<u16>,
    A: Fn(u16) -> TestResult<Vec<String>>,
{
    let mut last_error = String::new();
    for _ in 0..5 {
        let port = pick_port()?;
        let mut node = Node::new(port, args_for(port)?, dir, options);
        match node.spawn().await {
            Ok(()) => return Ok(node),
            Err(e) => last_error = e.to_string(),
        }
    }
    Err(format!("no node started after 5 ports: {last_error}").into())
}

/// Cuts every replica of `primary` off it, so that what it is sent next is acknowledged but
/// replicated nowhere: the replicas are frozen first (SIGSTOP) so they cannot reconnect, then
/// the primary drops their links (`CLIENT KILL TYPE replica`), checked with `connected_slaves:0`.
///
/// Freezing alone is not enough: the kernel keeps receiving (and acknowledging) replication
/// bytes for a stopped process, which would apply them on SIGCONT.
async fn cut_off_replicas(
    options: &TopologyOptions,
    primary: u16,
    replicas: &[&Node],
) -> TestResult {
    for replica in replicas {
        replica.signal("-STOP").await?;
    }
    options
        .query::<i64>(
            primary,
            redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("replica"),
        )
        .await?;
    poll_until(
        "the primary to have no replica",
        super::PATIENCE,
        || async move {
            match options
                .info_field(primary, "replication", "connected_slaves")
                .await
            {
                Ok(count) if count == "0" => Ok(()),
                Ok(count) => Err(format!("connected_slaves:{count}")),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await
}

/// One primary, two replicas and three sentinels monitoring it as [`MASTER_NAME`] (quorum 2),
/// all killed on drop.
pub struct TestSentinels {
    /// The data nodes: the first primary, then its replicas. Roles change with failovers; ask
    /// [`TestSentinels::primary`].
    nodes: Vec<Node>,
    sentinels: Vec<Node>,
    /// Holds the sentinels' config files and the logs; removed on drop (after the nodes, as
    /// fields drop in order).
    dir: ScratchDir,
    options: TopologyOptions,
}

impl TestSentinels {
    /// Without password or TLS.
    pub async fn start() -> TestResult<TestSentinels> {
        Self::start_with(TopologyOptions::default()).await
    }

    /// Secured as `options` say: data nodes and sentinels alike.
    pub async fn start_with(options: TopologyOptions) -> TestResult<TestSentinels> {
        let dir = scratch_dir("sentinel")?;
        let path = dir.0.clone();
        let primary = start_node(&path, &options, free_port, |port| {
            Ok(data_node_args(port, &path, &options))
        })
        .await?;
        let primary_port = primary.port;
        let mut nodes = vec![primary];
        for _ in 0..2 {
            let replica = start_node(&path, &options, free_port, |port| {
                let mut args = data_node_args(port, &path, &options);
                args.extend(["--replicaof".to_string(), "127.0.0.1".to_string()]);
                args.push(primary_port.to_string());
                Ok(args)
            })
            .await?;
            nodes.push(replica);
        }
        // Sentinels list replicas from the primary's INFO: start them once both are linked.
        let reach = &options;
        poll_until(
            "both replicas in sync with the primary",
            TOPOLOGY_PATIENCE,
            || async move {
                let text: String = reach
                    .query(primary_port, redis::cmd("INFO").arg("replication"))
                    .await
                    .map_err(|e| e.to_string())?;
                let online = text.lines().filter(|l| l.contains("state=online")).count();
                if online == 2 {
                    Ok(())
                } else {
                    Err(format!("{online} replicas online"))
                }
            },
        )
        .await?;
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let sentinel = start_node(&path, &options, free_port, |port| {
                let file = path.join(format!("sentinel-{port}.conf"));
                std::fs::write(&file, sentinel_config(port, primary_port, &path, &options))?;
                Ok(vec![file.display().to_string(), "--sentinel".to_string()])
            })
            .await?;
            sentinels.push(sentinel);
        }
        let topology = TestSentinels {
            nodes,
            sentinels,
            dir,
            options,
        };
        topology.wait_until_sentinels_know_everyone().await?;
        Ok(topology)
    }

    /// Every sentinel knows both replicas and the two other sentinels.
    async fn wait_until_sentinels_know_everyone(&self) -> TestResult {
        let reach = &self.options;
        for port in self.sentinel_ports() {
            poll_until(
                "a sentinel to know 2 replicas and 2 sentinels",
                TOPOLOGY_PATIENCE,
                || async move {
                    let replicas = reach
                        .query::<Vec<redis::Value>>(
                            port,
                            redis::cmd("SENTINEL").arg("REPLICAS").arg(MASTER_NAME),
                        )
                        .await;
                    let peers = reach
                        .query::<Vec<redis::Value>>(
                            port,
                            redis::cmd("SENTINEL").arg("SENTINELS").arg(MASTER_NAME),
                        )
                        .await;
                    match (replicas, peers) {
                        (Ok(r), Ok(s)) if r.len() == 2 && s.len() == 2 => Ok(()),
                        (Ok(r), Ok(s)) => Err(format!(
                            "sentinel :{port} knows {} replicas, {} sentinels",
                            r.len(),
                            s.len()
                        )),
                        (r, s) => Err(format!("sentinel :{port}: {:?} {:?}", r.err(), s.err())),
                    }
                },
            )
            .await?;
        }
        Ok(())
    }

    pub fn master_name(&self) -> &'static str {
        MASTER_NAME
    }

    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// The URL of every sentinel (see [`TopologyOptions::url`]).
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| self.options.url(s.port))
            .collect()
    }

    /// How the nodes are secured, and reached.
    pub fn options(&self) -> &TopologyOptions {
        &self.options
    }

    /// Ports of the data nodes (primary and replicas), in start order.
    pub fn data_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    pub fn redis_url_of(&self, port: u16) -> String {
        self.options.url(port)
    }

    /// The primary as the first sentinel that answers reports it
    /// (`SENTINEL GET-MASTER-ADDR-BY-NAME`).
    pub async fn primary(&self) -> TestResult<u16> {
        let mut last_error = String::from("no sentinel running");
        for port in self.sentinel_ports() {
            match primary_by_sentinel(&self.options, port).await {
                Ok(primary) => return Ok(primary),
                Err(e) => last_error = e.to_string(),
            }
        }
        Err(last_error.into())
    }

    /// The data nodes that are not the primary and are running.
    pub async fn replicas(&self) -> TestResult<Vec<u16>> {
        let primary = self.primary().await?;
        Ok(self
            .nodes
            .iter()
            .filter(|n| n.port != primary && n.is_running())
            .map(|n| n.port)
            .collect())
    }

    fn node(&self, port: u16) -> TestResult<&Node> {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .ok_or_else(|| format!("no data node on :{port}").into())
    }

    fn node_mut(&mut self, port: u16) -> TestResult<&mut Node> {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .ok_or_else(|| format!("no data node on :{port}").into())
    }

    /// SIGKILLs the primary; returns its port once the process is gone.
    pub async fn kill_primary(&mut self) -> TestResult<u16> {
        let primary = self.primary().await?;
        self.node_mut(primary)?.kill()?;
        Ok(primary)
    }

    /// Starts a killed data node again, as a replica of the current primary (sentinels would
    /// reconfigure a returning old primary anyway; starting it as a replica avoids a window
    /// with two primaries).
    pub async fn restart_node(&mut self, port: u16) -> TestResult {
        let primary = self.primary().await?;
        let mut args = data_node_args(port, &self.dir.0, &self.options);
        let node = self.node_mut(port)?;
        if node.is_running() {
            return Err(format!("data node :{port} is running").into());
        }
        if primary != port {
            args.extend([
                "--replicaof".to_string(),
                "127.0.0.1".to_string(),
                primary.to_string(),
            ]);
        }
        node.args = args;
        node.spawn().await
    }

    /// `SENTINEL FAILOVER ssehub-primary` on a sentinel; returns the primary it replaces. Retried
    /// while the sentinel answers that no replica is ready yet or a failover is in progress
    /// (right after a previous failover).
    pub async fn sentinel_failover(&self) -> TestResult<u16> {
        let old = self.primary().await?;
        let sentinel = *self.sentinel_ports().first().ok_or("no sentinel")?;
        let reach = &self.options;
        poll_until(
            "SENTINEL FAILOVER to be accepted",
            TOPOLOGY_PATIENCE,
            || async move {
                reach
                    .query::<String>(
                        sentinel,
                        redis::cmd("SENTINEL").arg("FAILOVER").arg(MASTER_NAME),
                    )
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            },
        )
        .await?;
        Ok(old)
    }

    /// Waits until every sentinel reports a primary other than `old` and that node answers
    /// `ROLE` as master; returns its port.
    pub async fn wait_for_primary_change(&self, old: u16, patience: Duration) -> TestResult<u16> {
        let sentinels = self.sentinel_ports();
        let reach = &self.options;
        poll_until(
            "every sentinel to report a new primary that is master",
            patience,
            || {
                let sentinels = sentinels.clone();
                async move {
                    let mut reported = Vec::new();
                    for sentinel in sentinels {
                        reported.push(
                            primary_by_sentinel(reach, sentinel)
                                .await
                                .map_err(|e| e.to_string())?,
                        );
                    }
                    let new = reported[0];
                    if new == old || reported.iter().any(|&p| p != new) {
                        return Err(format!(
                            "sentinels report {reported:?} (old primary :{old})"
                        ));
                    }
                    match reach.role(new).await {
                        Ok(role) if role == "master" => Ok(new),
                        Ok(role) => Err(format!("sentinels report :{new}, which says ROLE {role}")),
                        Err(e) => Err(format!("sentinels report :{new}, ROLE failed: {e}")),
                    }
                }
            },
        )
        .await
    }

    /// A LOSSY failover: runs `commands` on the primary after cutting both replicas off it (see
    /// [`cut_off_replicas`]), SIGKILLs the primary, then lets the replicas run again. What the
    /// commands wrote was acknowledged and exists nowhere any more; the sentinels promote a
    /// replica without it. Returns the old primary's port and the commands' replies; follow
    /// with [`TestSentinels::wait_for_primary_change`].
    pub async fn kill_primary_losing(
        &mut self,
        commands: &[redis::Cmd],
    ) -> TestResult<(u16, Vec<redis::Value>)> {
        let primary = self.primary().await?;
        let replicas: Vec<&Node> = self
            .nodes
            .iter()
            .filter(|n| n.port != primary && n.is_running())
            .collect();
        cut_off_replicas(&self.options, primary, &replicas).await?;
        let written = self.options.run_commands(primary, commands).await;
        self.node_mut(primary)?.kill()?;
        for node in self
            .nodes
            .iter()
            .filter(|n| n.port != primary && n.is_running())
        {
            node.signal("-CONT").await?;
        }
        Ok((primary, written?))
    }

    /// SIGSTOP or SIGCONT of a data node (a frozen node keeps its sockets open).
    pub async fn signal_node(&self, port: u16, signal: &str) -> TestResult {
        self.node(port)?.signal(signal).await
    }
}

/// The primary `sentinel` reports for [`MASTER_NAME`].
async fn primary_by_sentinel(options: &TopologyOptions, sentinel: u16) -> TestResult<u16> {
    let (_ip, port): (String, String) = options
        .query(
            sentinel,
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(MASTER_NAME),
        )
        .await?;
    Ok(port.parse()?)
}

/// A sentinel's config file: it must be a writable file, the sentinel rewrites it. With a
/// password, the sentinel wants it too and gives it to the nodes (`auth-pass`) and to the
/// other sentinels (`sentinel-pass`); with TLS, it speaks only TLS, to everyone.
fn sentinel_config(port: u16, primary: u16, dir: &Path, options: &TopologyOptions) -> String {
    let mut config: String = options
        .listen_directives(port)
        .into_iter()
        .map(|(name, value)| format!("{name} {value}\n"))
        .collect();
    config.push_str(&format!(
        "bind 127.0.0.1\n\
         dir {dir}\n\
         sentinel resolve-hostnames no\n\
         sentinel announce-ip 127.0.0.1\n\
         sentinel monitor {MASTER_NAME} 127.0.0.1 {primary} 2\n\
         sentinel down-after-milliseconds {MASTER_NAME} {NODE_TIMEOUT_MS}\n\
         sentinel failover-timeout {MASTER_NAME} 5000\n\
         sentinel parallel-syncs {MASTER_NAME} 2\n",
        dir = dir.display()
    ));
    if let Some(password) = &options.password {
        config.push_str(&format!(
            "sentinel auth-pass {MASTER_NAME} {password}\n\
             sentinel sentinel-pass {password}\n"
        ));
    }
    config
}

/// The number of hash slots of a Redis Cluster.
pub use ssehub::topology::cluster::SLOTS;

/// The hash slot of `key`, as Redis computes it (the gateway's own computation: the tests
/// that pin it against Redis are in `ssehub::topology::cluster`).
pub fn key_slot(key: &str) -> u16 {
    ssehub::topology::cluster::slot_of(key.as_bytes())
}

/// A free loopback port for a cluster node: below 55535 and with its bus port (+10000) free too.
pub fn cluster_port() -> TestResult<u16> {
    for _ in 0..1000 {
        let port = free_port()?;
        if port < 55535 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return Ok(port);
        }
    }
    Err("no port with a free cluster bus port".into())
}

/// One line of `CLUSTER NODES`: a node as one member sees it.
#[derive(Clone, Debug)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    /// `myself`, `master`, `slave`, `fail?`, `fail`, `handshake`, `noaddr`, ...
    pub flags: Vec<String>,
    /// The id of the primary this node replicates, for a replica.
    pub primary_id: Option<String>,
    /// Owned slot ranges, inclusive (migration markers `[...]` left out).
    pub slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    pub fn is_primary(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }

    /// Flagged as failing (`fail` or `fail?`) or not yet fully known (`handshake`, `noaddr`).
    pub fn is_suspect(&self) -> bool {
        self.flags
            .iter()
            .any(|f| matches!(f.as_str(), "fail" | "fail?" | "handshake" | "noaddr"))
    }

    pub fn owns(&self, slot: u16) -> bool {
        self.slots
            .iter()
            .any(|&(from, to)| (from..=to).contains(&slot))
    }
}

/// `CLUSTER NODES` of the node on `port`, parsed.
pub async fn cluster_nodes(port: u16) -> TestResult<Vec<ClusterNode>> {
    PLAIN.cluster_nodes(port).await
}

fn parse_node_line(line: &str) -> TestResult<ClusterNode> {
    let fields: Vec<&str> = line.split(' ').collect();
    if fields.len() < 8 {
        return Err(format!("short CLUSTER NODES line: {line}").into());
    }
    // `ip:port@cport[,hostname]`
    let address = fields[1].split(['@', ',']).next().unwrap_or_default();
    let port = address.rsplit(':').next().unwrap_or_default().parse()?;
    let mut slots = Vec::new();
    for range in fields[8..].iter().filter(|r| !r.starts_with('[')) {
        let (from, to) = range.split_once('-').unwrap_or((range, range));
        slots.push((from.parse()?, to.parse()?));
    }
    Ok(ClusterNode {
        id: fields[0].to_string(),
        port,
        flags: fields[2].split(',').map(String::from).collect(),
        primary_id: (fields[3] != "-").then(|| fields[3].to_string()),
        slots,
    })
}

/// Slot ranges to the port of their owner, as one node sees them.
type SlotMap = Vec<(u16, u16, u16)>;

fn slot_map(view: &[ClusterNode]) -> SlotMap {
    let mut map: SlotMap = view
        .iter()
        .flat_map(|n| n.slots.iter().map(move |&(from, to)| (from, to, n.port)))
        .collect();
    map.sort_unstable();
    map
}

/// Six nodes (3 primaries, 3 replicas) of a Redis Cluster with a short `cluster-node-timeout`,
/// all killed on drop.
pub struct TestCluster {
    nodes: Vec<Node>,
    /// The slots each killed primary owned when it was killed, for
    /// [`TestCluster::wait_for_failover_of`].
    killed_primary_slots: BTreeMap<u16, Vec<(u16, u16)>>,
    /// Nodes joined by [`TestCluster::add_primary`]: primaries that may own no slot and have
    /// no replica.
    added: Vec<u16>,
    /// Node configs (`nodes-<port>.conf`) and logs; removed on drop, after the nodes.
    dir: ScratchDir,
    options: TopologyOptions,
}

impl TestCluster {
    /// Without password or TLS.
    pub async fn start() -> TestResult<TestCluster> {
        Self::start_with(TopologyOptions::default()).await
    }

    /// Secured as `options` say, the cluster bus included.
    pub async fn start_with(options: TopologyOptions) -> TestResult<TestCluster> {
        let dir = scratch_dir("cluster")?;
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let path = dir.0.clone();
            nodes.push(
                start_node(&dir.0, &options, cluster_port, |port| {
                    Ok(cluster_node_args(port, &path, &options))
                })
                .await?,
            );
        }
        let mut create = tokio::process::Command::new("redis-cli");
        create
            .args(options.cli_args())
            .arg("--cluster")
            .arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let output = timeout(
            TOPOLOGY_PATIENCE,
            create
                .args(["--cluster-replicas", "1", "--cluster-yes"])
                .stdin(Stdio::null())
                .output(),
        )
        .await
        .map_err(|_| "redis-cli --cluster create did not finish")??;
        if !output.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
            .into());
        }
        let cluster = TestCluster {
            nodes,
            killed_primary_slots: BTreeMap::new(),
            added: Vec::new(),
            dir,
            options,
        };
        cluster.wait_healthy().await?;
        cluster.wait_roles_settled().await?;
        cluster.wait_replicas_synced().await?;
        Ok(cluster)
    }

    fn running_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| n.port)
            .collect()
    }

    fn node_mut(&mut self, port: u16) -> TestResult<&mut Node> {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .ok_or_else(|| format!("no cluster node on :{port}").into())
    }

    fn node(&self, port: u16) -> TestResult<&Node> {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .ok_or_else(|| format!("no cluster node on :{port}").into())
    }

    /// Waits until every running node says `cluster_state:ok`, sees no running node as failing
    /// and reports the same slot map, covering all 16384 slots; returns that map.
    pub async fn wait_healthy(&self) -> TestResult<SlotMap> {
        let reach = &self.options;
        let running = self.running_ports();
        poll_until(
            "a healthy cluster on which every node agrees",
            TOPOLOGY_PATIENCE,
            || {
                let running = running.clone();
                async move { agreed_slot_map(reach, &running).await }
            },
        )
        .await
    }

    /// The URL of every running node (see [`TopologyOptions::url`]).
    pub fn seed_urls(&self) -> Vec<String> {
        self.running_ports()
            .into_iter()
            .map(|port| self.options.url(port))
            .collect()
    }

    /// How the nodes are secured, and reached.
    pub fn options(&self) -> &TopologyOptions {
        &self.options
    }

    /// How a running node sees the cluster.
    pub async fn view(&self) -> TestResult<Vec<ClusterNode>> {
        let reach = &self.options;
        let mut last_error = String::from("no node running");
        for port in self.running_ports() {
            match reach.cluster_nodes(port).await {
                Ok(view) => return Ok(view),
                Err(e) => last_error = e.to_string(),
            }
        }
        Err(last_error.into())
    }

    /// Ports of the primaries that own slots and are not failing, by their first slot.
    pub async fn primaries(&self) -> TestResult<Vec<u16>> {
        let mut primaries: Vec<(u16, u16)> = self
            .view()
            .await?
            .iter()
            .filter(|n| n.is_primary() && !n.is_suspect())
            .filter_map(|n| Some((n.slots.first()?.0, n.port)))
            .collect();
        primaries.sort_unstable();
        Ok(primaries.into_iter().map(|(_, port)| port).collect())
    }

    pub async fn owner_of_slot(&self, slot: u16) -> TestResult<u16> {
        self.view()
            .await?
            .iter()
            .find(|n| n.owns(slot))
            .map(|n| n.port)
            .ok_or_else(|| format!("no node owns slot {slot}").into())
    }

    pub fn slot_of(&self, key: &str) -> u16 {
        key_slot(key)
    }

    /// A running, not failing replica of `primary`.
    pub async fn replica_of(&self, primary: u16) -> TestResult<u16> {
        let view = self.view().await?;
        let id = &view
            .iter()
            .find(|n| n.port == primary)
            .ok_or_else(|| format!("no node :{primary} in the view"))?
            .id;
        view.iter()
            .find(|n| n.primary_id.as_ref() == Some(id) && !n.is_suspect())
            .map(|n| n.port)
            .ok_or_else(|| format!("no healthy replica of :{primary}").into())
    }

    /// `n` channel names per slot-owning primary: `(primary, names whose slots it owns)`.
    pub async fn channels_on_each_shard(&self, n: usize) -> TestResult<Vec<(u16, Vec<String>)>> {
        let view = self.view().await?;
        let mut shards = Vec::new();
        for primary in self.primaries().await? {
            let node = view
                .iter()
                .find(|v| v.port == primary)
                .ok_or("primary left the view")?;
            let names: Vec<String> = (0..2_000_000)
                .map(|i| format!("shard-{primary}-{i}"))
                .filter(|name| node.owns(key_slot(name)))
                .take(n)
                .collect();
            if names.len() < n {
                return Err(format!("found only {} channels on :{primary}", names.len()).into());
            }
            shards.push((primary, names));
        }
        Ok(shards)
    }

    /// SIGKILLs a node; returns once the process is gone.
    pub async fn kill_node(&mut self, port: u16) -> TestResult {
        let owned = self
            .view()
            .await?
            .into_iter()
            .find(|n| n.port == port && !n.slots.is_empty())
            .map(|n| n.slots);
        if let Some(slots) = owned {
            self.killed_primary_slots.insert(port, slots);
        }
        self.node_mut(port)?.kill()
    }

    /// Starts a killed node again with its own `nodes.conf` (same id) and waits until the
    /// cluster is healthy with it. A returning old primary rejoins as a replica of its
    /// successor.
    pub async fn restart_node(&mut self, port: u16) -> TestResult {
        let node = self.node_mut(port)?;
        if node.is_running() {
            return Err(format!("cluster node :{port} is running").into());
        }
        node.spawn().await?;
        self.wait_healthy().await?;
        Ok(())
    }

    /// Restarts every killed node and resumes every frozen one, then waits until healthy:
    /// what a shared cluster needs before each test, whatever the previous one left behind.
    pub async fn heal(&mut self) -> TestResult {
        for node in &mut self.nodes {
            if node.is_running() {
                let _ = node.signal("-CONT").await;
            } else {
                node.spawn().await?;
            }
        }
        self.killed_primary_slots.clear();
        self.wait_healthy().await?;
        self.wait_roles_settled().await?;
        self.wait_replicas_synced().await
    }

    /// Waits until every running replica has finished its sync with its primary. Until then a
    /// replica may hold nothing yet (it empties itself to load the primary's snapshot), while
    /// `WAIT` already counts it when the primary has not propagated a write yet.
    async fn wait_replicas_synced(&self) -> TestResult {
        let reach = &self.options;
        let running = self.running_ports();
        poll_until("every replica to be in sync", TOPOLOGY_PATIENCE, || {
            let running = running.clone();
            async move {
                for &port in &running {
                    let info: String = reach
                        .query(port, redis::cmd("INFO").arg("replication"))
                        .await
                        .map_err(|e| e.to_string())?;
                    let field = |name: &str| {
                        info.lines()
                            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                            .map(str::trim)
                    };
                    let synced = field("master_link_status") == Some("up")
                        && field("master_sync_in_progress") == Some("0");
                    if field("role") == Some("slave") && !synced {
                        return Err(format!(":{port} is a replica not in sync yet:\n{info}"));
                    }
                }
                Ok(())
            }
        })
        .await
    }

    /// Waits until every running node (but those added empty) owns slots or is a replica: a
    /// returning old primary is a slotless master until it learns its successor.
    async fn wait_roles_settled(&self) -> TestResult {
        let reach = &self.options;
        let running = self.running_ports();
        let added = self.added.clone();
        poll_until(
            "every node to be a slot owner or a replica",
            TOPOLOGY_PATIENCE,
            || {
                let (running, added) = (running.clone(), added.clone());
                async move {
                    for &port in &running {
                        let view = reach.cluster_nodes(port).await.map_err(|e| e.to_string())?;
                        let unsettled = view.iter().find(|n| {
                            running.contains(&n.port)
                                && !added.contains(&n.port)
                                && (n.is_suspect() || (n.is_primary() && n.slots.is_empty()))
                        });
                        if let Some(node) = unsettled {
                            return Err(format!(
                                ":{port} sees :{} as {:?} with {:?}",
                                node.port, node.flags, node.slots
                            ));
                        }
                    }
                    Ok(())
                }
            },
        )
        .await
    }

    /// `CLUSTER FAILOVER` on `replica`: a planned failover; returns when it is primary and
    /// every node agrees.
    pub async fn failover(&self, replica: u16) -> TestResult {
        let reach = &self.options;
        reach
            .query::<()>(replica, redis::cmd("CLUSTER").arg("FAILOVER"))
            .await?;
        self.wait_promoted(replica).await
    }

    /// Waits until `node` answers `ROLE` master and every running node agrees on a healthy
    /// slot map in which it owns slots.
    async fn wait_promoted(&self, node: u16) -> TestResult {
        let reach = &self.options;
        let running = self.running_ports();
        poll_until(
            "the promoted node to own slots everywhere",
            TOPOLOGY_PATIENCE,
            || {
                let running = running.clone();
                async move {
                    match reach.role(node).await {
                        Ok(role) if role == "master" => {}
                        other => return Err(format!(":{node} ROLE {other:?}")),
                    }
                    let map = agreed_slot_map(reach, &running).await?;
                    if map.iter().any(|&(_, _, owner)| owner == node) {
                        Ok(())
                    } else {
                        Err(format!("slot map {map:?} has no slot on :{node}"))
                    }
                }
            },
        )
        .await
    }

    /// After [`TestCluster::kill_node`] of a primary: waits until another node owns its slots,
    /// with `cluster_state:ok` and agreement on every running node; returns the new primary.
    pub async fn wait_for_failover_of(&self, dead: u16) -> TestResult<u16> {
        let reach = &self.options;
        let slot = self
            .killed_primary_slots
            .get(&dead)
            .and_then(|slots| slots.first())
            .map(|&(from, _)| from)
            .ok_or_else(|| format!(":{dead} was not a primary killed with kill_node"))?;
        let running = self.running_ports();
        poll_until(
            "a replica to take over the killed primary's slots",
            TOPOLOGY_PATIENCE,
            || {
                let running = running.clone();
                async move {
                    let map = agreed_slot_map(reach, &running).await?;
                    let owner = map
                        .iter()
                        .find(|&&(from, to, _)| (from..=to).contains(&slot))
                        .map(|&(_, _, owner)| owner)
                        .ok_or("slot not covered")?;
                    if owner == dead {
                        Err(format!("slot {slot} still on :{dead}"))
                    } else {
                        Ok(owner)
                    }
                }
            },
        )
        .await
    }

    /// Moves `slot`, keys included, to `to` with the real resharding steps: SETSLOT IMPORTING
    /// on the target, MIGRATING on the source, MIGRATE of its keys in batches, then SETSLOT
    /// NODE on the target, the source and every other primary. Returns when every node agrees.
    pub async fn migrate_slot(&self, slot: u16, to: u16) -> TestResult {
        let reach = &self.options;
        let view = self.view().await?;
        let source = view.iter().find(|n| n.owns(slot)).ok_or("slot not owned")?;
        let target = view
            .iter()
            .find(|n| n.port == to)
            .ok_or("target not in the view")?;
        if source.port == to {
            return Ok(());
        }
        let setslot = |state: &str, id: &str| {
            let mut command = redis::cmd("CLUSTER");
            command.arg("SETSLOT").arg(slot).arg(state).arg(id);
            command
        };
        reach
            .query::<()>(to, &setslot("IMPORTING", &source.id))
            .await?;
        reach
            .query::<()>(source.port, &setslot("MIGRATING", &target.id))
            .await?;
        for _ in 0..10_000 {
            let keys: Vec<String> = reach
                .query(
                    source.port,
                    redis::cmd("CLUSTER")
                        .arg("GETKEYSINSLOT")
                        .arg(slot)
                        .arg(100),
                )
                .await?;
            if keys.is_empty() {
                break;
            }
            let mut migrate = redis::cmd("MIGRATE");
            migrate.arg("127.0.0.1").arg(to).arg("").arg(0).arg(5000);
            if let Some(password) = &reach.password {
                migrate.arg("AUTH").arg(password);
            }
            migrate.arg("KEYS").arg(&keys);
            reach.query::<()>(source.port, &migrate).await?;
        }
        reach.query::<()>(to, &setslot("NODE", &target.id)).await?;
        reach
            .query::<()>(source.port, &setslot("NODE", &target.id))
            .await?;
        for other in view.iter().filter(|n| {
            n.is_primary()
                && !n.slots.is_empty()
                && n.port != to
                && n.port != source.port
                && !n.is_suspect()
        }) {
            reach
                .query::<()>(other.port, &setslot("NODE", &target.id))
                .await?;
        }
        let running = self.running_ports();
        poll_until(
            "every node to agree on the migrated slot",
            TOPOLOGY_PATIENCE,
            || {
                let running = running.clone();
                async move {
                    let map = agreed_slot_map(reach, &running).await?;
                    match map
                        .iter()
                        .find(|&&(from, end, _)| (from..=end).contains(&slot))
                    {
                        Some(&(_, _, owner)) if owner == to => Ok(()),
                        other => Err(format!("slot {slot} at {other:?}")),
                    }
                }
            },
        )
        .await
    }

    /// Starts an empty node, joins it with `CLUSTER MEET` and waits until every node knows it;
    /// returns its port. It owns no slot until one is migrated to it.
    pub async fn add_primary(&mut self) -> TestResult<u16> {
        let reach = &self.options;
        let node = start_node(&self.dir.0, reach, cluster_port, |port| {
            Ok(cluster_node_args(port, &self.dir.0, reach))
        })
        .await?;
        let port = node.port;
        self.nodes.push(node);
        self.added.push(port);
        let seed = *self.running_ports().first().ok_or("no node running")?;
        reach
            .query::<()>(
                seed,
                redis::cmd("CLUSTER").arg("MEET").arg("127.0.0.1").arg(port),
            )
            .await?;
        let running = self.running_ports();
        poll_until(
            "every node to know the new primary",
            TOPOLOGY_PATIENCE,
            || {
                let running = running.clone();
                async move {
                    for member in &running {
                        let view = reach
                            .cluster_nodes(*member)
                            .await
                            .map_err(|e| e.to_string())?;
                        let known = view
                            .iter()
                            .filter(|n| running.contains(&n.port) && !n.is_suspect())
                            .count();
                        if known != running.len() {
                            return Err(format!(
                                ":{member} knows {known} of {} nodes",
                                running.len()
                            ));
                        }
                    }
                    agreed_slot_map(reach, &running).await.map(|_| ())
                }
            },
        )
        .await?;
        Ok(port)
    }

    /// A LOSSY failover: runs `commands` on `primary` after cutting its replica off (see
    /// [`cut_off_replicas`]), freezes the primary, and has the replica take over with
    /// `CLUSTER FAILOVER TAKEOVER` (no agreement from the frozen primary needed). The old
    /// primary, resumed, learns it lost its slots, becomes a replica of the new one and drops
    /// what only it had. Returns the new primary and the commands' replies once every node
    /// agrees.
    pub async fn takeover_losing(
        &self,
        primary: u16,
        commands: &[redis::Cmd],
    ) -> TestResult<(u16, Vec<redis::Value>)> {
        let reach = &self.options;
        let replica = self.replica_of(primary).await?;
        cut_off_replicas(reach, primary, &[self.node(replica)?]).await?;
        let written = reach.run_commands(primary, commands).await;
        self.node(primary)?.signal("-STOP").await?;
        self.node(replica)?.signal("-CONT").await?;
        let takeover = reach
            .query::<()>(
                replica,
                redis::cmd("CLUSTER").arg("FAILOVER").arg("TAKEOVER"),
            )
            .await;
        let promoted = match takeover {
            Ok(()) => {
                poll_until(
                    "the replica to take over",
                    TOPOLOGY_PATIENCE,
                    || async move {
                        match reach.role(replica).await {
                            Ok(role) if role == "master" => Ok(()),
                            other => Err(format!("{other:?}")),
                        }
                    },
                )
                .await
            }
            Err(e) => Err(e),
        };
        // Resume the old primary whatever happened, so the cluster can heal.
        self.node(primary)?.signal("-CONT").await?;
        promoted?;
        self.wait_promoted(replica).await?;
        // The old primary must have resynchronised from the new one before it counts as gone.
        poll_until(
            "the old primary to replicate the new one",
            TOPOLOGY_PATIENCE,
            || async move {
                match reach
                    .info_field(primary, "replication", "master_link_status")
                    .await
                {
                    Ok(status) if status == "up" => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await?;
        Ok((replica, written?))
    }

    /// SIGSTOP or SIGCONT of a node (a frozen node keeps its sockets open).
    pub async fn signal_node(&self, port: u16, signal: &str) -> TestResult {
        self.node(port)?.signal(signal).await
    }
}

/// The slot map every node in `ports` agrees on, if they all say `cluster_state:ok`, see none
/// of `ports` as failing and cover all slots; otherwise what is wrong.
async fn agreed_slot_map(options: &TopologyOptions, ports: &[u16]) -> Result<SlotMap, String> {
    let mut agreed: Option<SlotMap> = None;
    for &port in ports {
        let state = info_cluster_state(options, port).await?;
        if state != "ok" {
            return Err(format!(":{port} cluster_state:{state}"));
        }
        let view = options
            .cluster_nodes(port)
            .await
            .map_err(|e| format!(":{port}: {e}"))?;
        if let Some(suspect) = view
            .iter()
            .find(|n| ports.contains(&n.port) && n.is_suspect())
        {
            return Err(format!(
                ":{port} sees :{} as {:?}",
                suspect.port, suspect.flags
            ));
        }
        let map = slot_map(&view);
        let covered: u32 = map
            .iter()
            .map(|&(from, to, _)| u32::from(to - from) + 1)
            .sum();
        if covered != u32::from(SLOTS) {
            return Err(format!(":{port} covers {covered} slots"));
        }
        match &agreed {
            Some(first) if *first != map => {
                return Err(format!("nodes disagree: {first:?} vs :{port} {map:?}"))
            }
            _ => agreed = Some(map),
        }
    }
    agreed.ok_or_else(|| "no node running".to_string())
}

async fn info_cluster_state(options: &TopologyOptions, port: u16) -> Result<String, String> {
    let text: String = options
        .query(port, redis::cmd("CLUSTER").arg("INFO"))
        .await
        .map_err(|e| format!(":{port}: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("cluster_state:"))
        .map(|s| s.trim().to_string())
        .ok_or_else(|| format!(":{port} CLUSTER INFO without cluster_state"))
}

fn cluster_node_args(port: u16, dir: &Path, options: &TopologyOptions) -> Vec<String> {
    let mut args = data_node_args(port, dir, options);
    args.extend(["--cluster-enabled", "yes", "--cluster-config-file"].map(String::from));
    args.push(dir.join(format!("nodes-{port}.conf")).display().to_string());
    args.extend([
        "--cluster-node-timeout".to_string(),
        NODE_TIMEOUT_MS.to_string(),
    ]);
    args
}
