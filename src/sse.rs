//! SSE wire encoding: the one place that turns events, resets and heartbeats into bytes.
//!
//! Owns event ids (`<epoch>-<sequence>`), the frame layout and the rule that a payload can never
//! inject a field or a second event: every line break (`\n`, `\r\n` or a lone `\r`) starts a new
//! `data:` line. It does not decide *what* to send; the hub and the HTTP stream do that.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::io::Write as _;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

/// The event name of the frame that tells a client it cannot be resumed seamlessly.
pub const RESET_EVENT: &str = "gateway.reset";

/// A heartbeat: an SSE comment line, ignored by clients, that keeps proxies from closing the
/// stream and lets the server notice dead peers through failed writes.
pub const HEARTBEAT: &[u8] = b":\n\n";

/// Identifies one gateway run. Ids carry it so that an id from another instance or from an
/// earlier run of this one is recognised as foreign instead of being misread as a position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Epoch(String);

impl Epoch {
    /// A fresh random epoch for this process run.
    pub fn random() -> Self {
        Epoch(format!("{:016x}", rand::random::<u64>()))
    }

    /// Formats the event id of position `seq` in this epoch.
    pub fn id(&self, seq: u64) -> EventId<'_> {
        EventId { epoch: self, seq }
    }

    /// Parses a client-supplied resume id. `None` when it is malformed or from another epoch.
    pub fn parse_position(&self, id: &str) -> Option<u64> {
        let (epoch, seq) = id.split_once('-')?;
        if epoch != self.0 || seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        seq.parse().ok()
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A position in the gateway's global event order, formatted as `<epoch>-<sequence>`.
#[derive(Clone, Copy, Debug)]
pub struct EventId<'a> {
    epoch: &'a Epoch,
    seq: u64,
}

impl fmt::Display for EventId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.epoch.0, self.seq)
    }
}

/// An SSE frame stored inside its HTTP/1.1 chunk (`<hex length>\r\n<frame>\r\n`).
///
/// An event is encoded once and sent to every HTTP/1.1 stream as this one shared buffer, so each
/// delivery is a single `send` of bytes already in place; HTTP/2 and TLS connections take the
/// bare frame, a slice of the same buffer.
#[derive(Clone, Debug)]
pub struct WireFrame {
    chunk: Bytes,
    /// Where the SSE frame starts inside `chunk` (after the chunk-size line).
    frame_start: usize,
    /// Where it ends (before the chunk's closing CRLF). A frame may also be the head or the
    /// rest of a chunk shared with another frame: see [`WireFrame::event_with_id`].
    frame_end: usize,
}

/// The heartbeat as a ready HTTP/1.1 chunk (`3` is `HEARTBEAT.len()` in hex).
const HEARTBEAT_CHUNK: &[u8] = b"3\r\n:\n\n\r\n";

/// Room for the longest chunk-size line: 16 hex digits of a `usize`, then CRLF.
const SIZE_LINE_ROOM: usize = 18;

impl WireFrame {
    /// Wraps an encoded SSE frame.
    pub fn new(frame: &[u8]) -> WireFrame {
        WireFrame::build(frame.len(), |out| out.put_slice(frame))
    }

    /// Encodes one event (see [`encode_event`]) straight into its chunk: one buffer, written
    /// once, for every stream that will send it.
    pub fn event(id: EventId<'_>, event_type: Option<&str>, data: &str) -> WireFrame {
        WireFrame::build(data.len() + 64, |out| put_event(out, id, event_type, data))
    }

    /// Builds a chunk around the frame that `write` appends. The size line is only known once
    /// the frame is written, so room for the longest one is left in front and the real one is
    /// written right before the frame; the unused room is skipped without a copy.
    fn build(frame_capacity: usize, write: impl FnOnce(&mut BytesMut)) -> WireFrame {
        let mut chunk = BytesMut::with_capacity(SIZE_LINE_ROOM + frame_capacity + 2);
        chunk.put_bytes(0, SIZE_LINE_ROOM);
        write(&mut chunk);
        let frame_len = chunk.len() - SIZE_LINE_ROOM;
        chunk.put_slice(b"\r\n");
        let mut line = [0u8; SIZE_LINE_ROOM];
        let mut cursor = &mut line[..];
        // 16 hex digits and CRLF always fit in the room.
        let _ = write!(cursor, "{frame_len:x}\r\n");
        let line_len = SIZE_LINE_ROOM - cursor.len();
        let start = SIZE_LINE_ROOM - line_len;
        chunk[start..SIZE_LINE_ROOM].copy_from_slice(&line[..line_len]);
        chunk.advance(start);
        let chunk = chunk.freeze();
        WireFrame {
            frame_end: chunk.len() - 2,
            chunk,
            frame_start: line_len,
        }
    }

    /// Encodes one event with the `id:` line `id` (redis backend). Streams over one channel send
    /// it whole. A stream over several channels has an id of its own: it sends
    /// [`WireFrame::id_chunk_head`] and then [`WireFrame::after_id_line`] of this frame, the same
    /// bytes without the id line, so the event is still encoded once for all its readers and
    /// the client still sees one event (dispatched only at the blank line at its end).
    pub fn event_with_id(id: &str, event_type: Option<&str>, data: &str) -> WireFrame {
        WireFrame::build(data.len() + id.len() + 64, |out| {
            put_id_line(out, id);
            put_event_body(out, event_type, data);
        })
    }

    /// The rest of an [`WireFrame::event_with_id`] frame after its `id: <id_len bytes>` line:
    /// the end of a chunk whose head is an [`WireFrame::id_chunk_head`].
    pub fn after_id_line(&self, id_len: usize) -> WireFrame {
        let body_start = (self.frame_start + ID_LINE_OVERHEAD + id_len).min(self.frame_end);
        let chunk = self.chunk.slice(body_start..);
        WireFrame {
            frame_start: 0,
            frame_end: chunk.len() - 2,
            chunk,
        }
    }

    /// The start of a chunk that holds the id line `id` and `body_len` more bytes of frame:
    /// sent before [`WireFrame::after_id_line`] of a shared event.
    pub fn id_chunk_head(id: &str, body_len: usize) -> WireFrame {
        let frame_len = ID_LINE_OVERHEAD + id.len() + body_len;
        let mut chunk = BytesMut::with_capacity(SIZE_LINE_ROOM + ID_LINE_OVERHEAD + id.len());
        // Writing into a `BytesMut` cannot fail.
        let _ = write!(chunk, "{frame_len:x}\r\n");
        let frame_start = chunk.len();
        put_id_line(&mut chunk, id);
        let chunk = chunk.freeze();
        WireFrame {
            frame_end: chunk.len(),
            chunk,
            frame_start,
        }
    }

    /// The heartbeat comment, without allocating.
    pub fn heartbeat() -> WireFrame {
        WireFrame {
            chunk: Bytes::from_static(HEARTBEAT_CHUNK),
            frame_start: HEARTBEAT_CHUNK.len() - HEARTBEAT.len() - 2,
            frame_end: HEARTBEAT_CHUNK.len() - 2,
        }
    }

    /// The bare SSE frame (shares the buffer).
    pub fn frame(&self) -> Bytes {
        self.chunk.slice(self.frame_start..self.frame_end)
    }

    /// Length of the bare SSE frame.
    pub fn frame_len(&self) -> usize {
        self.frame_end - self.frame_start
    }

    /// The frame as one complete HTTP/1.1 chunk.
    pub fn http1_chunk(&self) -> &Bytes {
        &self.chunk
    }

    /// Like [`WireFrame::http1_chunk`], without touching the reference count.
    pub fn into_http1_chunk(self) -> Bytes {
        self.chunk
    }
}

/// Encodes one event: `id:`, optional `event:`, then the payload as `data:` lines.
pub fn encode_event(id: impl fmt::Display, event_type: Option<&str>, data: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 64);
    put_event(&mut out, id, event_type, data);
    out.freeze()
}

fn put_event(out: &mut BytesMut, id: impl fmt::Display, event_type: Option<&str>, data: &str) {
    // Writing into a `BytesMut` cannot fail.
    let _ = writeln!(out, "id: {id}");
    put_event_body(out, event_type, data);
}

/// `id: ` and the line break around an id.
const ID_LINE_OVERHEAD: usize = 5;

fn put_id_line(out: &mut BytesMut, id: &str) {
    out.put_slice(b"id: ");
    out.put_slice(id.as_bytes());
    out.put_u8(b'\n');
}

/// An event's fields after its `id:` line, and the blank line that ends it.
fn put_event_body(out: &mut BytesMut, event_type: Option<&str>, data: &str) {
    if let Some(event_type) = event_type {
        put_field(out, "event", event_type);
    }
    for line in split_lines(data) {
        put_field(out, "data", line);
    }
    out.put_u8(b'\n');
}

/// The first frame of every stream: the reconnection delay and the position the stream starts
/// from, as an id-only frame (sets the client's last event id without firing an event).
pub fn encode_preamble(retry_ms: u64, id: impl fmt::Display) -> Bytes {
    Bytes::from(format!("retry: {retry_ms}\nid: {id}\n\n"))
}

/// Why a `gateway.reset` was sent: its `reason` field, and the `reason` label of
/// `ssehub_resets_total`. The strings are part of the public contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetReason {
    /// The resume id is malformed, from another epoch, or ahead of the head.
    UnknownPosition,
    /// The ring no longer reaches back to the client's position.
    HistoryExpired,
    /// The Redis subscription was down; messages in that window are lost.
    UpstreamInterrupted,
}

impl ResetReason {
    /// Every reason, for registering metric series at zero.
    pub const ALL: [ResetReason; 3] = [
        ResetReason::UnknownPosition,
        ResetReason::HistoryExpired,
        ResetReason::UpstreamInterrupted,
    ];

    /// The wire and metric label spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ResetReason::UnknownPosition => "unknown_position",
            ResetReason::HistoryExpired => "history_expired",
            ResetReason::UpstreamInterrupted => "upstream_interrupted",
        }
    }
}

/// Encodes a `gateway.reset` event for `channels`, positioned at `id`.
pub fn encode_reset(id: impl fmt::Display, reason: ResetReason, channels: &[&str]) -> Bytes {
    #[derive(serde::Serialize)]
    struct Reset<'a> {
        reason: &'a str,
        channels: &'a [&'a str],
    }
    let reason = reason.as_str();
    // Serializing two strings cannot fail; the fallback only keeps the frame well-formed.
    let data = serde_json::to_string(&Reset { reason, channels })
        .unwrap_or_else(|_| format!("{{\"reason\":\"{reason}\"}}"));
    encode_event(id, Some(RESET_EVENT), &data)
}

fn put_field(out: &mut BytesMut, name: &str, value: &str) {
    out.put_slice(name.as_bytes());
    out.put_slice(b": ");
    out.put_slice(value.as_bytes());
    out.put_u8(b'\n');
}

/// Splits on `\r\n`, `\n` and lone `\r`, exactly as an EventSource parser ends lines, so each
/// piece becomes its own `data:` line. A trailing line break yields a trailing empty line, which
/// keeps the break in the data the client reassembles.
fn split_lines(data: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let text = rest?;
        match text.find(['\r', '\n']) {
            None => {
                rest = None;
                Some(text)
            }
            Some(at) => {
                let skip = if text[at..].starts_with("\r\n") { 2 } else { 1 };
                rest = Some(&text[at + skip..]);
                Some(&text[..at])
            }
        }
    })
}

/// The SSE event type for a payload: the string at `field` when the payload is a JSON object
/// holding a non-empty string there without CR or LF. Anything else yields `None` (the client
/// then sees a default `message` event).
pub fn event_type_of(payload: &str, field: &str) -> Option<String> {
    if !payload.trim_start().starts_with('{') {
        return None;
    }
    // A key decodes to `field` only if `field` appears verbatim or the payload uses escapes;
    // payloads with neither (most, in a fleet that sends no types) skip the JSON parse.
    if !payload.contains(field) && !payload.contains('\\') {
        return None;
    }
    let mut deserializer = serde_json::Deserializer::from_str(payload);
    let found = TypeField(field).deserialize(&mut deserializer).ok()?;
    deserializer.end().ok()?;
    found.filter(|t| !t.is_empty() && !t.contains(['\r', '\n']) && !is_reserved_type(t))
}

/// Event types a payload may not claim: `error` and `open` would fire EventSource's own
/// handlers, and `gateway.*` is the gateway's namespace (a publisher must not fake a
/// `gateway.reset`). Such payloads are delivered as plain `message` events.
fn is_reserved_type(event_type: &str) -> bool {
    matches!(event_type, "error" | "open") || event_type.starts_with("gateway.")
}

/// Reads one field of a JSON object and skips everything else without building a tree.
struct TypeField<'f>(&'f str);

impl<'de> DeserializeSeed<'de> for TypeField<'_> {
    type Value = Option<String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TypeField<'_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == self.0 {
                // Later duplicates win, as in JavaScript's JSON.parse.
                found = match map.next_value::<serde_json::Value>()? {
                    serde_json::Value::String(s) => Some(s),
                    _ => None,
                };
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch() -> Epoch {
        Epoch("e".to_string())
    }

    fn encoded(data: &str) -> String {
        String::from_utf8_lossy(&encode_event(epoch().id(7), None, data)).into_owned()
    }

    #[test]
    fn single_line_payload_is_one_data_line() {
        assert_eq!(encoded("hello"), "id: e-7\ndata: hello\n\n");
    }

    #[test]
    fn every_kind_of_line_break_starts_a_new_data_line() {
        assert_eq!(
            encoded("a\nb\r\nc\rd"),
            "id: e-7\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
        );
    }

    #[test]
    fn injection_attempt_stays_inside_data_lines() {
        let out = encoded("a\n\nevent: evil\ndata: x\r\rid: 9");
        assert_eq!(
            out,
            "id: e-7\ndata: a\ndata: \ndata: event: evil\ndata: data: x\ndata: \ndata: id: 9\n\n"
        );
    }

    #[test]
    fn empty_payload_is_an_event_with_empty_data() {
        assert_eq!(encoded(""), "id: e-7\ndata: \n\n");
    }

    #[test]
    fn trailing_newline_is_kept_as_an_empty_last_line() {
        assert_eq!(encoded("x\n"), "id: e-7\ndata: x\ndata: \n\n");
    }

    #[test]
    fn event_type_comes_from_the_configured_json_field() {
        let payload = r#"{"data":{"type":"inner"},"type":"OrderPlaced"}"#;
        assert_eq!(
            event_type_of(payload, "type").as_deref(),
            Some("OrderPlaced")
        );
        assert_eq!(event_type_of(payload, "kind"), None);
        let out = encode_event(epoch().id(1), Some("OrderPlaced"), payload);
        assert!(out.starts_with(b"id: e-1\nevent: OrderPlaced\ndata: {"));
    }

    #[test]
    fn event_type_key_spelled_with_escapes_still_counts() {
        // The shortcut that skips parsing payloads without the field name must not skip this.
        let payload = r#"{"\u0074ype":"Escaped","p":"x"}"#;
        assert_eq!(event_type_of(payload, "type").as_deref(), Some("Escaped"));
        assert_eq!(event_type_of(r#"{"s":1,"p":"no field"}"#, "type"), None);
    }

    #[test]
    fn event_type_is_ignored_when_unusable() {
        for payload in [
            r#"{"type":""}"#,
            r#"{"type":"a\nb"}"#,
            r#"{"type":"a\rb"}"#,
            r#"{"type":5}"#,
            r#"{"type":"x"} trailing"#,
            r#"["type"]"#,
            r#"{"type":"x""#,
            r#"{"type":"error"}"#,
            r#"{"type":"open"}"#,
            r#"{"type":"gateway.reset","reason":"fake"}"#,
            "plain text",
        ] {
            assert_eq!(event_type_of(payload, "type"), None, "{payload}");
        }
    }

    #[test]
    fn positions_round_trip_and_foreign_ids_are_rejected() {
        let epoch = epoch();
        assert_eq!(epoch.parse_position(&epoch.id(42).to_string()), Some(42));
        for foreign in ["f-42", "e-", "e-x", "e-+1", "42", "", "e-1-2", "e- 1"] {
            assert_eq!(epoch.parse_position(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn reset_lists_channels_as_json() {
        let out = encode_reset(epoch().id(3), ResetReason::HistoryExpired, &["a", "b\"c"]);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "id: e-3\nevent: gateway.reset\ndata: {\"reason\":\"history_expired\",\"channels\":[\"a\",\"b\\\"c\"]}\n\n"
        );
    }

    #[test]
    fn wire_frame_is_the_frame_inside_one_http1_chunk() {
        let frame = encode_event(epoch().id(12), Some("t"), &"x".repeat(300));
        let wire = WireFrame::new(&frame);
        assert_eq!(wire.frame(), frame);
        assert_eq!(wire.frame_len(), frame.len());
        let expected = format!(
            "{:x}\r\n{}\r\n",
            frame.len(),
            String::from_utf8_lossy(&frame)
        );
        assert_eq!(wire.http1_chunk().as_ref(), expected.as_bytes());
    }

    #[test]
    fn event_wire_frame_is_the_encoded_event_in_its_chunk() {
        // Payload lengths around the points where the chunk-size line gains a hex digit.
        for len in [0, 1, 200, 230, 240, 4070, 4080, 70_000] {
            let data = "y".repeat(len);
            let encoded = encode_event(epoch().id(5), Some("t"), &data);
            let wire = WireFrame::event(epoch().id(5), Some("t"), &data);
            assert_eq!(wire.frame(), encoded, "payload of {len} bytes");
            assert_eq!(
                wire.http1_chunk(),
                WireFrame::new(&encoded).http1_chunk(),
                "payload of {len} bytes"
            );
        }
    }

    #[test]
    fn a_shared_event_is_sent_with_another_id_as_one_chunk_in_two_pieces() {
        for len in [0, 1, 230, 4080, 70_000] {
            let data = "z".repeat(len);
            let shared = WireFrame::event_with_id("e.1", Some("t"), &data);
            assert_eq!(shared.frame(), encode_event("e.1", Some("t"), &data));
            let own_id = "e.1,f.2,g.";
            let rest = shared.after_id_line("e.1".len());
            let head = WireFrame::id_chunk_head(own_id, rest.frame_len());
            let mut frame = head.frame().to_vec();
            frame.extend_from_slice(&rest.frame());
            assert_eq!(frame, encode_event(own_id, Some("t"), &data));
            let mut chunk = head.http1_chunk().to_vec();
            chunk.extend_from_slice(rest.http1_chunk());
            let expected = WireFrame::new(&encode_event(own_id, Some("t"), &data));
            assert_eq!(
                chunk,
                expected.http1_chunk().to_vec(),
                "payload of {len} bytes"
            );
        }
    }

    #[test]
    fn heartbeat_wire_frame_matches_a_built_one() {
        let built = WireFrame::new(HEARTBEAT);
        let fixed = WireFrame::heartbeat();
        assert_eq!(fixed.http1_chunk(), built.http1_chunk());
        assert_eq!(fixed.frame(), Bytes::from_static(HEARTBEAT));
    }
}
