//! The sentinel side of `redis.mode = "sentinel"`: asking the sentinels where the primary is,
//! and listening for their `+switch-master` announcements.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{NodeAddress, NodeConnector, Primary};
use crate::config::redact_url;

/// Pause before a sentinel whose subscription dropped is tried again.
const RESUBSCRIBE_DELAY: Duration = Duration::from_secs(1);
/// How often a sentinel subscription is PINGed.
const SENTINEL_PING: Duration = Duration::from_secs(5);

/// The sentinels of one primary.
#[derive(Debug)]
pub(super) struct Sentinels {
    /// Each sentinel with its URL as configured (for logs, redacted).
    nodes: Vec<(String, redis::Client)>,
    master_name: String,
    /// How the primary is reached once found.
    primary: NodeConnector,
}

impl Sentinels {
    pub(super) fn new(
        urls: &[String],
        master_name: &str,
        primary: &NodeConnector,
        tls: Option<&redis::TlsCertificates>,
    ) -> Result<Sentinels, String> {
        let nodes = urls
            .iter()
            .map(|url| {
                let client = NodeConnector::new(url, tls)
                    .and_then(|sentinel| sentinel.client())
                    .map_err(|e| format!("{}: {e}", redact_url(url)))?;
                Ok((redact_url(url), client))
            })
            .collect::<Result<_, String>>()?;
        Ok(Sentinels {
            nodes,
            master_name: master_name.to_string(),
            primary: primary.clone(),
        })
    }

    /// The primary's client: the first sentinel that answers names it, and the node itself
    /// confirms with `ROLE` that it is the primary (a sentinel can lag behind a failover).
    pub(super) async fn primary(&self, timeout: Duration) -> Result<Primary, String> {
        let mut failures = Vec::new();
        for (url, sentinel) in &self.nodes {
            match self.ask(sentinel, timeout).await {
                Ok((host, port)) => {
                    let client = self.primary.client_at(&host, port)?;
                    confirm_primary(&client, timeout)
                        .await
                        .map_err(|e| format!("{host}:{port}, named by sentinel {url}: {e}"))?;
                    return Ok(Primary {
                        client,
                        address: Some((host, port)),
                    });
                }
                Err(e) => failures.push(format!("{url}: {e}")),
            }
        }
        Err(format!(
            "no sentinel named the primary of {}: {}",
            self.master_name,
            failures.join("; ")
        ))
    }

    /// `SENTINEL get-master-addr-by-name` on one sentinel.
    async fn ask(
        &self,
        sentinel: &redis::Client,
        timeout: Duration,
    ) -> Result<(String, u16), String> {
        let ask = async {
            let mut connection = sentinel.get_multiplexed_async_connection().await?;
            redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&self.master_name)
                .query_async::<Option<(String, u16)>>(&mut connection)
                .await
        };
        match tokio::time::timeout(timeout, ask).await {
            Ok(Ok(Some(address))) => Ok(address),
            Ok(Ok(None)) => Err(format!("does not monitor {}", self.master_name)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    /// Listens on every sentinel for `+switch-master` of our primary and announces the new
    /// primary on `announced`, until `shutdown`. One listener per sentinel: any one of them announcing the
    /// failover is enough, and one sentinel down must not leave the gateway deaf.
    pub(super) fn watch(
        &self,
        announced: watch::Sender<Option<NodeAddress>>,
        timeout: Duration,
        shutdown: CancellationToken,
    ) {
        for (url, sentinel) in &self.nodes {
            tokio::spawn(listen(
                url.clone(),
                sentinel.clone(),
                self.master_name.clone(),
                announced.clone(),
                timeout,
                shutdown.clone(),
            ));
        }
    }
}

/// Checks with `ROLE` that the node behind `client` is a primary.
async fn confirm_primary(client: &redis::Client, timeout: Duration) -> Result<(), String> {
    let ask = async {
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("ROLE")
            .query_async::<redis::Value>(&mut connection)
            .await
    };
    let role = match tokio::time::timeout(timeout, ask).await {
        Ok(Ok(redis::Value::Array(reply))) => reply.into_iter().next(),
        Ok(Ok(other)) => return Err(format!("unexpected ROLE reply {other:?}")),
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("no answer to ROLE within {timeout:?}")),
    };
    match role {
        Some(redis::Value::BulkString(role)) if role == b"master" => Ok(()),
        Some(redis::Value::BulkString(role)) => Err(format!(
            "it is a {}, not the primary (yet)",
            String::from_utf8_lossy(&role)
        )),
        other => Err(format!("unexpected ROLE reply {other:?}")),
    }
}

/// One sentinel's `+switch-master` subscription, re-established whenever it drops.
async fn listen(
    url: String,
    sentinel: redis::Client,
    master_name: String,
    announced: watch::Sender<Option<NodeAddress>>,
    timeout: Duration,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let ended = tokio::select! {
            _ = shutdown.cancelled() => return,
            ended = follow(&sentinel, &master_name, &announced, timeout) => ended,
        };
        tracing::warn!(sentinel = %url, reason = %ended, "sentinel subscription down");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
        }
    }
}

/// Subscribes to `+switch-master` and announces each new primary of `master_name` (once:
/// every sentinel announces the same switch). Returns why the subscription ended.
async fn follow(
    sentinel: &redis::Client,
    master_name: &str,
    announced: &watch::Sender<Option<NodeAddress>>,
    timeout: Duration,
) -> String {
    let subscribe = async {
        let mut pubsub = sentinel.get_async_pubsub().await?;
        pubsub.subscribe("+switch-master").await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    let pubsub = match tokio::time::timeout(timeout, subscribe).await {
        Ok(Ok(pubsub)) => pubsub,
        Ok(Err(e)) => return format!("subscribe failed: {e}"),
        Err(_) => return format!("subscribe timed out after {timeout:?}"),
    };
    let (mut sink, mut messages) = pubsub.split();
    // PINGed, so a half-open connection to a sentinel is noticed and replaced.
    let mut ping = tokio::time::interval_at(Instant::now() + SENTINEL_PING, SENTINEL_PING);
    loop {
        let message = tokio::select! {
            message = messages.next() => match message {
                Some(message) => message,
                None => break,
            },
            _ = ping.tick() => {
                match tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => return format!("PING failed: {e}"),
                    Err(_) => return format!("PING timed out after {timeout:?}"),
                }
            }
        };
        let text = String::from_utf8_lossy(message.get_payload_bytes()).into_owned();
        let Some(primary) = switched_to(&text, master_name) else {
            continue;
        };
        let is_new = announced.send_if_modified(|current| {
            if current.as_ref() == Some(&primary) {
                return false;
            }
            *current = Some(primary.clone());
            true
        });
        if is_new {
            tracing::info!(switch = %text, "sentinel announced a new primary");
        }
    }
    "connection closed".to_string()
}

/// The new primary in a `+switch-master` message of `master_name`:
/// `"<name> <old ip> <old port> <new ip> <new port>"`.
fn switched_to(message: &str, master_name: &str) -> Option<NodeAddress> {
    let fields: Vec<&str> = message.split(' ').collect();
    match fields.as_slice() {
        [name, _, _, host, port] if *name == master_name => {
            Some((host.to_string(), port.parse().ok()?))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_names_the_new_primary_of_its_master_only() {
        let message = "main 127.0.0.1 6379 127.0.0.1 6380";
        assert_eq!(
            switched_to(message, "main"),
            Some(("127.0.0.1".to_string(), 6380))
        );
        assert_eq!(switched_to(message, "other"), None);
        assert_eq!(switched_to("main 127.0.0.1 6379 127.0.0.1", "main"), None);
        assert_eq!(switched_to("main a 1 b port", "main"), None);
    }
}
