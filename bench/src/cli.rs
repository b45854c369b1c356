//! Command-line options, shared by the coordinating process and its client processes (the
//! coordinator starts each child with its own arguments plus `--child-index`/`--child-count`).

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use serde::Serialize;

/// SSE load generator: N raw HTTP/1.1 SSE clients, a rate-controlled publisher, and server
/// accounting from /proc. Prints one JSON document (see bench/README in BENCHMARKS.md).
#[derive(Debug, Clone, Parser, Serialize)]
#[command(name = "loadgen", version, about)]
pub(crate) struct Args {
    /// Server address, `host:port` (an `http://` prefix and a path are ignored). Several,
    /// comma-separated, spread the clients round-robin over them (client i on target i mod n).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub target: String,
    /// Resume mode: where the clients reconnect after the drop (default: where each was).
    #[arg(long)]
    pub resume_target: Option<String>,
    /// Resume mode: SIGKILL this process at `--drop-at` instead of closing the clients'
    /// sockets; every client that was connected then reconnects (to `--resume-target`) with its
    /// Last-Event-ID, as the clients of a lost gateway instance do.
    #[arg(long)]
    pub kill_pid: Option<i32>,
    /// Request path; `{ch}` is replaced by the channel name.
    #[arg(long, default_value = "/events?channel={ch}")]
    pub path: String,
    /// What the run measures.
    #[arg(long, value_enum, default_value_t = Mode::Fanout)]
    pub mode: Mode,
    /// Number of SSE clients.
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// `one`: every client on one channel; `per-client`: client i on its own channel i.
    #[arg(long, value_enum, default_value_t = Channels::One)]
    pub channels: Channels,
    /// Channel names are `<prefix><index>`; use a fresh prefix per run.
    #[arg(long, default_value = "bench")]
    pub channel_prefix: String,
    /// New connections per second (all processes together).
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Source addresses 127.0.<source-net>.1 ..= .N, round-robin; 0 = one per 5,000 clients.
    #[arg(long, default_value_t = 0)]
    pub source_addrs: usize,
    /// Third octet of the source addresses (vary it between runs to avoid TIME_WAIT reuse).
    #[arg(long, default_value_t = 0)]
    pub source_net: u8,
    /// How events are published.
    #[arg(long, value_enum, default_value_t = Publish::Redis)]
    pub publish: Publish,
    /// Redis URL for `--publish redis` and `--publish fcall`.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Publisher URL for `--publish http`; `{ch}` is replaced by the channel name.
    #[arg(long, default_value = "http://127.0.0.1:8081/pub?id={ch}")]
    pub publish_url: String,
    /// Messages per second (all channels together).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Seconds of publishing (fanout, resume) or of idle observation (idle).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Payloads shaped as an order (id, customer, status, timestamps, items of sku/qty/price:
    /// what `bench/order.schema.json` accepts) instead of a padded stamp, for measuring the cost
    /// of a `[[schemas]]` table.
    #[arg(long)]
    pub order_payload: bool,
    /// Connections that parse and verify every event (the rest only count).
    #[arg(long, default_value_t = 100)]
    pub sample: usize,
    /// Fanout mode: counting (non-verifying) connections set `SO_RCVLOWAT` to this many bytes,
    /// so the kernel wakes the generator once per several events. The default, 1, reads every
    /// event as it arrives, like a browser: lazy readers make the generator cheaper but change
    /// the servers' costs (fewer window updates, larger writes), so the benchmark does not.
    #[arg(long, default_value_t = 1)]
    pub count_lowat: i32,
    /// Seconds between the last connect and the start of the measurement window.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds to wait after publishing for the last deliveries.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Resume mode: seconds after the first publish at which every client drops.
    #[arg(long)]
    pub drop_at: Option<f64>,
    /// Seconds a connect (TCP + response head) may take.
    #[arg(long, default_value_t = 20.0)]
    pub connect_timeout: f64,
    /// Most clients per process; more are split over child processes.
    #[arg(long, default_value_t = 15_000)]
    pub max_per_process: usize,
    /// Server process ids for CPU and memory accounting (repeatable).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// Free-form labels recorded in the output, e.g. `--label server=ssehub`.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Write the JSON result here (it is always printed to stdout too).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Exit 1 when any event is lost, duplicated or out of order, or a client failed.
    #[arg(long)]
    pub check: bool,
    #[arg(long, hide = true)]
    pub child_index: Option<usize>,
    #[arg(long, hide = true, default_value_t = 1)]
    pub child_count: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Mode {
    /// Publish at a fixed rate; count and verify deliveries.
    Fanout,
    /// Hold idle connections; check that each receives a heartbeat during the window.
    Idle,
    /// Like fanout, but every client drops at `--drop-at` and reconnects with Last-Event-ID.
    Resume,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Channels {
    One,
    PerClient,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Publish {
    None,
    /// Redis `PUBLISH <channel> <payload>` (ssehub's `history.backend = "memory"`).
    Redis,
    /// Redis `FCALL ssehub_publish 1 <channel> <payload>`: through the gateway's Redis Function,
    /// the only way in with `history.backend = "redis"`.
    Fcall,
    Http,
}

impl Args {
    /// Every `--target`, in order.
    pub(crate) fn targets(&self) -> Result<Vec<Target>, String> {
        self.target.split(',').map(Target::parse).collect()
    }

    /// Where clients reconnect after a drop, when not where they were.
    pub(crate) fn resume_target(&self) -> Result<Option<Target>, String> {
        self.resume_target.as_deref().map(Target::parse).transpose()
    }

    pub(crate) fn channel_count(&self) -> usize {
        match self.channels {
            Channels::One => 1,
            Channels::PerClient => self.clients.max(1),
        }
    }

    pub(crate) fn channel_name(&self, channel: usize) -> String {
        format!("{}{}", self.channel_prefix, channel)
    }

    /// The channel client `client` (global index) reads.
    pub(crate) fn channel_of(&self, client: usize) -> usize {
        match self.channels {
            Channels::One => 0,
            Channels::PerClient => client,
        }
    }

    /// Channel and per-channel sequence of the `k`-th published message.
    pub(crate) fn message_target(&self, k: u64) -> (usize, u64) {
        let n = self.channel_count() as u64;
        ((k % n) as usize, k / n)
    }

    /// How many of the first `published` messages went to `channel`.
    pub(crate) fn expected_on(&self, channel: usize, published: u64) -> u64 {
        let n = self.channel_count() as u64;
        let channel = channel as u64;
        published / n + u64::from(channel < published % n)
    }

    pub(crate) fn source_count(&self) -> usize {
        if self.source_addrs > 0 {
            self.source_addrs.min(254)
        } else {
            self.clients.div_ceil(5000).clamp(1, 254)
        }
    }

    pub(crate) fn source_addr(&self, client: usize) -> Ipv4Addr {
        let host = (client % self.source_count()) as u8 + 1;
        Ipv4Addr::new(127, 0, self.source_net, host)
    }

    /// Whether client `client` (global index) verifies every event.
    pub(crate) fn is_sampled(&self, client: usize) -> bool {
        if self.sample == 0 || self.clients == 0 {
            return false;
        }
        if self.sample >= self.clients {
            return true;
        }
        let stride = self.clients / self.sample;
        client % stride == 0 && client / stride < self.sample
    }

    /// Number of client processes.
    pub(crate) fn process_count(&self) -> usize {
        self.clients.div_ceil(self.max_per_process.max(1)).max(1)
    }

    /// The global index range of the clients of child `index` of `count`.
    pub(crate) fn share(&self, index: usize, count: usize) -> std::ops::Range<usize> {
        let base = self.clients / count;
        let extra = self.clients % count;
        let start = index * base + index.min(extra);
        let len = base + usize::from(index < extra);
        start..start + len
    }

    pub(crate) fn drop_at(&self) -> f64 {
        self.drop_at.unwrap_or(self.duration / 2.0)
    }

    /// The request path of client `client`.
    pub(crate) fn request_path(&self, client: usize) -> String {
        self.path
            .replace("{ch}", &self.channel_name(self.channel_of(client)))
    }
}

/// A server address and the `Host` header that goes with it.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub addr: SocketAddr,
    pub host: String,
}

impl Target {
    fn parse(target: &str) -> Result<Target, String> {
        let host = authority_of(target.trim()).to_string();
        Ok(Target {
            addr: resolve(&host)?,
            host,
        })
    }
}

/// `host:port` of a URL or authority.
pub(crate) fn authority_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest)
}

pub(crate) fn resolve(authority: &str) -> Result<SocketAddr, String> {
    authority
        .to_socket_addrs()
        .map_err(|e| format!("{authority}: {e}"))?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| format!("{authority}: no IPv4 address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["loadgen"];
        argv.extend_from_slice(extra);
        Args::parse_from(argv)
    }

    #[test]
    fn shares_cover_every_client_once() {
        let a = args(&["--clients", "19501", "--max-per-process", "15000"]);
        assert_eq!(a.process_count(), 2);
        let first = a.share(0, 2);
        let second = a.share(1, 2);
        assert_eq!(first, 0..9751);
        assert_eq!(second, 9751..19501);
    }

    #[test]
    fn per_client_expectations_add_up() {
        let a = args(&["--clients", "7", "--channels", "per-client"]);
        let total: u64 = (0..7).map(|c| a.expected_on(c, 100)).sum();
        assert_eq!(total, 100);
        assert_eq!(a.message_target(15), (1, 2));
        let one = args(&["--clients", "7"]);
        assert_eq!(one.expected_on(0, 100), 100);
    }

    #[test]
    fn sample_is_spread_and_sized() {
        let a = args(&["--clients", "1000", "--sample", "30"]);
        assert_eq!((0..1000).filter(|c| a.is_sampled(*c)).count(), 30);
        let all = args(&["--clients", "10", "--sample", "50"]);
        assert!((0..10).all(|c| all.is_sampled(c)));
    }

    #[test]
    fn targets_are_a_comma_separated_list() -> Result<(), String> {
        let two = args(&["--target", "127.0.0.1:81,http://127.0.0.1:82/x"]).targets()?;
        let hosts: Vec<&str> = two.iter().map(|t| t.host.as_str()).collect();
        assert_eq!(hosts, ["127.0.0.1:81", "127.0.0.1:82"]);
        assert_eq!(two[1].addr.port(), 82);
        assert!(args(&[]).resume_target()?.is_none());
        Ok(())
    }

    #[test]
    fn authority_strips_scheme_and_path() {
        assert_eq!(authority_of("http://127.0.0.1:81/pub?id=x"), "127.0.0.1:81");
        assert_eq!(authority_of("127.0.0.1:80"), "127.0.0.1:80");
    }
}
