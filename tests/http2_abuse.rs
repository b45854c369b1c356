//! HTTP/2 attacks on one connection (issue 13, item 1), spoken as raw frames over h2c because a
//! well-behaved client library cannot express them: rapid reset (CVE-2023-44487), CONTINUATION
//! floods (CVE-2024-27316 family), and more concurrent streams than the server allows. Each
//! must cost the attacker its connection or its extra streams, never the gateway its health.

mod support;

use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

const CANCEL: u32 = 0x8;
const REFUSED_STREAM: u32 = 0x7;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

/// One frame as read off the wire.
#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY frame.
    fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        let bytes = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes(bytes.try_into().ok()?))
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .to_be_bytes();
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&length[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with a `prefix`-bit prefix, the first byte's other bits set to `flags`.
fn hpack_integer(out: &mut Vec<u8>, value: usize, prefix: u32, flags: u8) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// An HPACK string literal, without Huffman coding.
fn hpack_string(out: &mut Vec<u8>, value: &[u8]) {
    hpack_integer(out, value.len(), 7, 0);
    out.extend_from_slice(value);
}

/// The header block of `GET <path>` over h2c, using only the static table and literals that
/// are not indexed (so no dynamic table state is needed).
fn get_request_block(path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86]; // :method GET, :scheme http
    hpack_integer(&mut block, 4, 4, 0); // :path, literal without indexing
    hpack_string(&mut block, path.as_bytes());
    hpack_integer(&mut block, 1, 4, 0); // :authority
    hpack_string(&mut block, b"localhost");
    block
}

fn get_request(stream: u32, path: &str) -> Vec<u8> {
    frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        stream,
        &get_request_block(path),
    )
}

/// A raw h2c connection: a task reads frames into a channel (answering SETTINGS), the test
/// writes what it likes.
struct RawH2 {
    writer: OwnedWriteHalf,
    frames: mpsc::UnboundedReceiver<Frame>,
}

impl RawH2 {
    /// Connects, sends the preface, an empty SETTINGS frame and a large connection window, and
    /// returns once the server's SETTINGS arrived, with that frame.
    async fn connect(addr: SocketAddr) -> TestResult<(RawH2, Frame)> {
        let (reader, mut writer) = TcpStream::connect(addr).await?.into_split();
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        hello.extend(frame(WINDOW_UPDATE, 0, 0, &(1u32 << 30).to_be_bytes()));
        writer.write_all(&hello).await?;
        let (sender, frames) = mpsc::unbounded_channel();
        tokio::spawn(read_frames(reader, sender));
        let mut connection = RawH2 { writer, frames };
        let settings = connection
            .next_matching(|f| f.kind == SETTINGS && f.flags & ACK == 0)
            .await?
            .ok_or("closed before its SETTINGS")?;
        connection.send(&frame(SETTINGS, ACK, 0, &[])).await?;
        Ok((connection, settings))
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes).await
    }

    /// The next frame, `None` once the server closed the connection.
    async fn next_frame(&mut self) -> TestResult<Option<Frame>> {
        tokio::time::timeout(PATIENCE, self.frames.recv())
            .await
            .map_err(|_| "no frame from the server".into())
    }

    /// The next frame that `wanted` accepts, skipping others; `None` once the server closed.
    async fn next_matching(
        &mut self,
        wanted: impl Fn(&Frame) -> bool,
    ) -> TestResult<Option<Frame>> {
        while let Some(frame) = self.next_frame().await? {
            if wanted(&frame) {
                return Ok(Some(frame));
            }
        }
        Ok(None)
    }

    /// Reads until the server closes the connection; the GOAWAY it sent, if any.
    async fn until_closed(&mut self) -> TestResult<Option<Frame>> {
        let mut goaway = None;
        while let Some(frame) = self.next_frame().await? {
            if frame.kind == GOAWAY {
                goaway = Some(frame);
            }
        }
        Ok(goaway)
    }
}

/// Reads frames until the connection ends (the channel closes with it).
async fn read_frames(
    mut reader: tokio::net::tcp::OwnedReadHalf,
    frames: mpsc::UnboundedSender<Frame>,
) {
    let mut buffer = BytesMut::with_capacity(64 * 1024);
    loop {
        while buffer.len() >= 9 {
            let length = u32::from_be_bytes([0, buffer[0], buffer[1], buffer[2]]) as usize;
            if buffer.len() < 9 + length {
                break;
            }
            let head = buffer.split_to(9);
            let frame = Frame {
                kind: head[3],
                flags: head[4],
                stream: (&head[5..9]).get_u32() & 0x7fff_ffff,
                payload: buffer.split_to(length).to_vec(),
            };
            if frames.send(frame).is_err() {
                return;
            }
        }
        match reader.read_buf(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

async fn open_streams(admin: SocketAddr) -> TestResult<f64> {
    metric(admin, "ssehub_connections").await
}

/// Whether the gateway still serves: a fresh stream gets a published event.
async fn still_serves(redis: &TestRedis, gateway: &TestGateway, channel: &str) -> TestResult {
    let mut client = gateway.subscribe(&format!("channel={channel}")).await?;
    redis.publish(channel, "still served").await?;
    assert_eq!(client.next_data(1).await?, ["still served"]);
    Ok(())
}

#[tokio::test]
async fn rapid_reset_ends_the_connection_and_leaks_no_stream() -> TestResult {
    const BATCHES: u32 = 100;
    const PER_BATCH: u32 = 100;
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let (mut attacker, _) = RawH2::connect(gateway.addr).await?;

    // Open a stream and cancel it at once, 10 000 times, without waiting for any answer.
    let mut streams_sent = 0u32;
    'flood: for batch in 0..BATCHES {
        let mut bytes = Vec::new();
        for i in 0..PER_BATCH {
            let stream = 2 * (batch * PER_BATCH + i) + 1;
            bytes.extend(get_request(stream, "/events?channel=rapid"));
            bytes.extend(frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
        }
        if attacker.send(&bytes).await.is_err() {
            break 'flood;
        }
        streams_sent += PER_BATCH;
    }
    let goaway = attacker
        .until_closed()
        .await?
        .ok_or("the connection closed without GOAWAY")?;
    // ENHANCE_YOUR_CALM, with the last stream it processed far below what was sent.
    assert_eq!(goaway.error_code(), Some(0xb), "{goaway:?}");
    let last_stream = u32::from_be_bytes(goaway.payload[..4].try_into()?) & 0x7fff_ffff;
    assert!(
        last_stream < 2 * BATCHES * PER_BATCH / 10,
        "the server processed streams up to {last_stream} of {streams_sent} sent"
    );

    eventually("no stream is left open", || async {
        matches!(open_streams(gateway.admin).await, Ok(open) if open == 0.0)
    })
    .await?;
    still_serves(&redis, &gateway, "after-rapid-reset").await?;
    gateway.stop().await
}

#[tokio::test]
async fn a_continuation_flood_is_cut_off_at_the_header_limit() -> TestResult {
    /// The flood offered: far beyond any header limit.
    const FLOOD_BYTES: usize = 10 * 1024 * 1024;
    /// One CONTINUATION frame's header block: a single header field, under the default
    /// SETTINGS_MAX_FRAME_SIZE of 16 KiB.
    const FIELD_BYTES: usize = 16_000;
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let (mut attacker, _) = RawH2::connect(gateway.addr).await?;

    let opening = frame(
        HEADERS,
        END_STREAM,
        1,
        &get_request_block("/events?channel=c"),
    );
    attacker.send(&opening).await?;
    let mut sent = 0;
    let mut cut_off = false;
    for i in 0..FLOOD_BYTES / FIELD_BYTES {
        let mut field = vec![0x00]; // literal without indexing, new name
        hpack_string(&mut field, format!("x-flood-{i}").as_bytes());
        hpack_string(&mut field, &vec![b'a'; FIELD_BYTES - 32]);
        let continuation = frame(CONTINUATION, 0, 1, &field);
        if attacker.send(&continuation).await.is_err() {
            cut_off = true;
            break;
        }
        sent += continuation.len();
    }
    let goaway = attacker.until_closed().await?;
    let error = goaway.as_ref().and_then(Frame::error_code);
    // Either the writes failed part way (the server had closed), or the server said why it
    // closed: anything but NO_ERROR.
    assert!(
        cut_off || error.is_some_and(|code| code != 0),
        "sent {sent} bytes of CONTINUATION without an error: {goaway:?}"
    );
    assert!(
        goaway.is_some(),
        "the connection closed without GOAWAY after {sent} bytes"
    );
    still_serves(&redis, &gateway, "after-continuation-flood").await?;
    gateway.stop().await
}

#[tokio::test]
async fn streams_beyond_the_per_connection_limit_are_refused() -> TestResult {
    let redis = TestRedis::start().await?;
    let gateway = TestGateway::start_ready(test_settings(&redis)).await?;
    let (mut client, settings) = RawH2::connect(gateway.addr).await?;
    let advertised = settings
        .payload
        .chunks(6)
        .find(|s| {
            s.len() == 6 && u16::from_be_bytes([s[0], s[1]]) == SETTINGS_MAX_CONCURRENT_STREAMS
        })
        .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]))
        .ok_or("no SETTINGS_MAX_CONCURRENT_STREAMS advertised")?;
    // The gateway's own setting (MAX_STREAMS_PER_CONNECTION), not hyper's default of 200.
    assert_eq!(advertised, 256, "SETTINGS_MAX_CONCURRENT_STREAMS");

    // Open as many streams as allowed, each an SSE stream that stays open.
    let mut requests = Vec::new();
    for n in 0..advertised {
        requests.extend(get_request(2 * n + 1, "/events?channel=many"));
    }
    client.send(&requests).await?;
    let mut answered = 0;
    while answered < advertised {
        let frame = client
            .next_frame()
            .await?
            .ok_or("closed while opening the allowed streams")?;
        assert_ne!(
            frame.kind, RST_STREAM,
            "an allowed stream was reset: {frame:?}"
        );
        assert_ne!(frame.kind, GOAWAY, "{frame:?}");
        if frame.kind == HEADERS {
            answered += 1;
        }
    }

    // One more, ignoring the limit the server advertised.
    let extra = 2 * advertised + 1;
    client
        .send(&get_request(extra, "/events?channel=many"))
        .await?;
    let refused = client
        .next_matching(|f| f.kind == RST_STREAM || f.kind == GOAWAY)
        .await?
        .ok_or("closed instead of refusing the extra stream")?;
    assert_eq!(refused.kind, RST_STREAM, "{refused:?}");
    assert_eq!(refused.stream, extra);
    assert_eq!(refused.error_code(), Some(REFUSED_STREAM));
    assert_eq!(open_streams(gateway.admin).await?, f64::from(advertised));

    // The connection and every allowed stream keep working.
    redis.publish("many", "to every stream").await?;
    let mut delivered = std::collections::HashSet::new();
    while delivered.len() < advertised as usize {
        let frame = client
            .next_frame()
            .await?
            .ok_or("closed after refusing a stream")?;
        let text = String::from_utf8_lossy(&frame.payload);
        if frame.kind == DATA && text.contains("to every stream") {
            delivered.insert(frame.stream);
        }
    }
    // A slot freed by the client can be used again.
    client
        .send(&frame(RST_STREAM, 0, 1, &CANCEL.to_be_bytes()))
        .await?;
    let again = extra + 2;
    client
        .send(&get_request(again, "/events?channel=many"))
        .await?;
    let answer = client
        .next_matching(|f| f.stream == again)
        .await?
        .ok_or("closed instead of answering a stream in a freed slot")?;
    assert_eq!(answer.kind, HEADERS, "{answer:?}");

    drop(client);
    eventually("every stream closed with the connection", || async {
        matches!(open_streams(gateway.admin).await, Ok(open) if open == 0.0)
    })
    .await?;
    gateway.stop().await
}

#[tokio::test]
async fn pings_do_not_keep_a_connection_without_requests_open() -> TestResult {
    let redis = TestRedis::start().await?;
    let mut settings = test_settings(&redis);
    settings.limits.idle_timeout_secs = 1;
    let gateway = TestGateway::start_ready(settings).await?;
    let (mut client, _) = RawH2::connect(gateway.addr).await?;
    client.send(&get_request(1, "/nowhere")).await?;
    let answer = client
        .next_matching(|f| f.stream == 1 && f.flags & END_STREAM != 0)
        .await?
        .ok_or("closed before answering")?;
    assert!(matches!(answer.kind, HEADERS | DATA), "{answer:?}");

    // A PING every 200 ms keeps bytes moving both ways, but no request comes: still idle.
    let started = tokio::time::Instant::now();
    let mut closed = false;
    while !closed && started.elapsed() < PATIENCE {
        if client.send(&frame(PING, 0, 0, b"keepopen")).await.is_err() {
            closed = true;
            break;
        }
        let pause = tokio::time::sleep(std::time::Duration::from_millis(200));
        tokio::pin!(pause);
        loop {
            tokio::select! {
                _ = &mut pause => break,
                frame = client.frames.recv() => if frame.is_none() {
                    closed = true;
                    break;
                },
            }
        }
    }
    assert!(
        closed,
        "a connection kept busy with PINGs stayed open for {:?}",
        started.elapsed()
    );
    let idle = expired_connections(gateway.admin, "idle").await?;
    assert!(idle >= 1.0, "{idle}");
    gateway.stop().await
}
