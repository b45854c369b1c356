//! The publisher: a fixed message rate to Redis (`PUBLISH`, or `FCALL ssehub_publish` for
//! ssehub's redis history backend) or to an HTTP publisher location (nchan), each message
//! stamped with its per-channel sequence and send time.

use std::cell::Cell;
use std::time::Duration;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::cli::{authority_of, resolve, Args, Publish};
use crate::wire::{self, Stamp};

/// How the publishing went.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct PublishStats {
    pub mode: String,
    pub planned: u64,
    pub published: u64,
    pub errors: u64,
    pub elapsed_s: f64,
    pub achieved_rate: f64,
    /// Round trips used (several due messages go in one pipeline).
    pub batches: u64,
    pub max_batch: u64,
    /// How far behind schedule the publisher fell at worst.
    pub max_lag_ms: f64,
}

pub(crate) enum Sink {
    Redis(redis::aio::MultiplexedConnection),
    /// `FCALL ssehub_publish 1 <channel> <payload>` on this connection.
    Fcall(redis::aio::MultiplexedConnection),
    Http(HttpPublisher),
}

impl Sink {
    pub(crate) async fn connect(args: &Args) -> Result<Sink, String> {
        match args.publish {
            Publish::None => Err("no publisher configured".to_string()),
            Publish::Redis => Ok(Sink::Redis(redis_connection(args).await?)),
            Publish::Fcall => Ok(Sink::Fcall(redis_connection(args).await?)),
            Publish::Http => Ok(Sink::Http(HttpPublisher::connect(&args.publish_url).await?)),
        }
    }

    /// Sends one batch; returns the number of messages that failed.
    async fn send(&mut self, batch: &[(String, Vec<u8>)]) -> Result<u64, String> {
        match self {
            Sink::Redis(connection) => {
                let mut pipe = redis::pipe();
                for (channel, payload) in batch {
                    pipe.cmd("PUBLISH").arg(channel).arg(payload.as_slice());
                }
                let receivers: Vec<i64> =
                    tokio::time::timeout(Duration::from_secs(10), pipe.query_async(connection))
                        .await
                        .map_err(|_| "redis: PUBLISH timed out".to_string())?
                        .map_err(|e| format!("redis: {e}"))?;
                Ok(batch.len() as u64 - receivers.len() as u64)
            }
            Sink::Fcall(connection) => {
                let mut pipe = redis::pipe();
                for (channel, payload) in batch {
                    pipe.cmd("FCALL")
                        .arg("ssehub_publish")
                        .arg(1)
                        .arg(channel)
                        .arg(payload.as_slice());
                }
                // Each reply is the event's position, "<epoch> <id>"; a failed call fails the
                // whole pipeline (counted as the batch failing).
                let positions: Vec<String> =
                    tokio::time::timeout(Duration::from_secs(10), pipe.query_async(connection))
                        .await
                        .map_err(|_| "redis: FCALL ssehub_publish timed out".to_string())?
                        .map_err(|e| format!("redis: FCALL ssehub_publish: {e}"))?;
                Ok(batch.len() as u64 - positions.len() as u64)
            }
            Sink::Http(http) => http.send(batch).await,
        }
    }
}

async fn redis_connection(args: &Args) -> Result<redis::aio::MultiplexedConnection, String> {
    let client =
        redis::Client::open(args.redis_url.as_str()).map_err(|e| format!("redis url: {e}"))?;
    tokio::time::timeout(
        Duration::from_secs(10),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| "redis: connect timed out".to_string())?
    .map_err(|e| format!("redis: {e}"))
}

/// Publishes `--rate` messages per second for `--duration` seconds. `published` is updated
/// after each batch (the resume-mode drop reads it).
pub(crate) async fn run(args: &Args, sink: &mut Sink, published: &Cell<u64>) -> PublishStats {
    let planned = (args.rate * args.duration).round().max(0.0) as u64;
    let mut stats = PublishStats {
        mode: format!("{:?}", args.publish).to_lowercase(),
        planned,
        ..PublishStats::default()
    };
    let rate = args.rate.max(0.001);
    let started = Instant::now();
    // Bounded: never publish past the planned count nor past twice the planned time + 30 s.
    let give_up = started + Duration::from_secs_f64(args.duration * 2.0 + 30.0);
    let mut sent = 0u64;
    let mut batch = Vec::new();
    while sent < planned {
        let due_at = started + Duration::from_secs_f64(sent as f64 / rate);
        tokio::time::sleep_until(due_at).await;
        let now = Instant::now();
        if now > give_up {
            eprintln!("loadgen: publisher gave up after {sent} of {planned} messages");
            break;
        }
        let lag = now.saturating_duration_since(due_at).as_secs_f64() * 1000.0;
        stats.max_lag_ms = stats.max_lag_ms.max(lag);
        let due = ((now - started).as_secs_f64() * rate).floor() as u64 + 1;
        let due = due.clamp(sent + 1, planned);
        let sent_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        batch.clear();
        for k in sent..due {
            let (channel, seq) = args.message_target(k);
            let stamp = Stamp { seq, sent_ns };
            let payload = if args.order_payload {
                wire::make_order_payload(stamp, args.payload)
            } else {
                wire::make_payload(stamp, args.payload)
            };
            batch.push((args.channel_name(channel), payload));
        }
        match sink.send(&batch).await {
            Ok(failed) => stats.errors += failed,
            Err(e) => {
                eprintln!("loadgen: publish failed: {e}");
                stats.errors += batch.len() as u64;
            }
        }
        stats.batches += 1;
        stats.max_batch = stats.max_batch.max(batch.len() as u64);
        sent = due;
        published.set(sent);
    }
    stats.published = sent;
    stats.elapsed_s = started.elapsed().as_secs_f64();
    stats.achieved_rate = sent as f64 / stats.elapsed_s.max(1e-9);
    stats
}

/// A keep-alive HTTP/1.1 connection that POSTs each message (pipelined per batch).
pub(crate) struct HttpPublisher {
    stream: TcpStream,
    authority: String,
    path: String,
    buf: Vec<u8>,
}

impl HttpPublisher {
    async fn connect(url: &str) -> Result<HttpPublisher, String> {
        let authority = authority_of(url).to_string();
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        let path = rest
            .find('/')
            .map_or("/".to_string(), |at| rest[at..].to_string());
        let addr = resolve(&authority)?;
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .map_err(|_| format!("publisher {authority}: connect timed out"))?
            .map_err(|e| format!("publisher {authority}: {e}"))?;
        let _ = stream.set_nodelay(true);
        Ok(HttpPublisher {
            stream,
            authority,
            path,
            buf: Vec::new(),
        })
    }

    async fn send(&mut self, batch: &[(String, Vec<u8>)]) -> Result<u64, String> {
        let mut request = Vec::with_capacity(batch.len() * 400);
        for (channel, payload) in batch {
            let path = self.path.replace("{ch}", channel);
            request.extend_from_slice(
                format!(
                    "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
                    self.authority,
                    payload.len()
                )
                .as_bytes(),
            );
            request.extend_from_slice(payload);
        }
        let io = async {
            self.stream
                .write_all(&request)
                .await
                .map_err(|e| format!("publisher write: {e}"))?;
            let mut failed = 0;
            for _ in batch {
                let status = self.read_response().await?;
                if !(200..300).contains(&status) {
                    failed += 1;
                }
            }
            Ok(failed)
        };
        tokio::time::timeout(Duration::from_secs(10), io)
            .await
            .map_err(|_| "publisher: response timed out".to_string())?
    }

    /// Reads one response (Content-Length bodies only); returns its status.
    async fn read_response(&mut self) -> Result<u16, String> {
        loop {
            if let Some(head) = wire::parse_head(&self.buf)? {
                if head.chunked {
                    return Err("publisher: chunked responses are not supported".to_string());
                }
                let total = head.len
                    + usize::try_from(head.content_length.unwrap_or(0))
                        .map_err(|_| "publisher: body too large".to_string())?;
                if self.buf.len() >= total {
                    self.buf.drain(..total);
                    return Ok(head.status);
                }
            }
            self.stream
                .readable()
                .await
                .map_err(|e| format!("publisher read: {e}"))?;
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.try_read(&mut chunk) {
                Ok(0) => return Err("publisher: connection closed".to_string()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("publisher read: {e}")),
            }
        }
    }
}
