//! Byte-level handling of an SSE response: the HTTP/1.1 response head, the chunked transfer
//! coding, a cheap event counter (memchr over `\ndata:`) and a full SSE line parser for the
//! connections that verify every event.

use std::sync::LazyLock;

use memchr::memmem::Finder;

/// The marker counted on most connections: every event of our payloads has exactly one
/// `data:` line, and it always follows a line break (the `id:` line, or the body start).
const DATA_MARK: &[u8] = b"\ndata:";
const CARRY: usize = DATA_MARK.len() - 1;

static DATA_FINDER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(DATA_MARK));
static HEAD_END: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\r\n\r\n"));

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    pub status: u16,
    pub chunked: bool,
    pub content_length: Option<u64>,
    /// Bytes of the head including the blank line.
    pub len: usize,
}

/// Parses a response head at the start of `buf`. `Ok(None)` while incomplete.
pub(crate) fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let Some(end) = HEAD_END.find(buf) else {
        if buf.len() > 16 * 1024 {
            return Err("response head longer than 16 KiB".to_string());
        }
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| "response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x response: {status_line:?}"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut content_length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            content_length = value.parse().ok();
        }
    }
    Ok(Some(Head {
        status,
        chunked,
        content_length,
        len: end + 4,
    }))
}

/// Incremental decoder of the chunked transfer coding (or identity when not chunked).
#[derive(Debug, Clone)]
pub(crate) struct Dechunker {
    chunked: bool,
    state: ChunkState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size {
        value: u64,
        digits: u8,
    },
    Extension {
        value: u64,
    },
    SizeLf {
        value: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// The last chunk was seen (trailers are ignored).
    End,
}

impl Dechunker {
    pub(crate) fn new(chunked: bool) -> Dechunker {
        Dechunker {
            chunked,
            state: ChunkState::Size {
                value: 0,
                digits: 0,
            },
        }
    }

    /// True after the terminating zero-size chunk.
    pub(crate) fn ended(&self) -> bool {
        self.state == ChunkState::End
    }

    /// Feeds raw body bytes; passes the decoded payload slices to `sink`.
    pub(crate) fn feed(
        &mut self,
        mut input: &[u8],
        mut sink: impl FnMut(&[u8]),
    ) -> Result<(), String> {
        if !self.chunked {
            if !input.is_empty() {
                sink(input);
            }
            return Ok(());
        }
        while !input.is_empty() {
            match self.state {
                ChunkState::Data { left } => {
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                    sink(&input[..take]);
                    input = &input[take..];
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data { left }
                    };
                    continue;
                }
                ChunkState::End => return Ok(()),
                _ => {}
            }
            let byte = input[0];
            input = &input[1..];
            self.state = match (self.state, byte) {
                (ChunkState::Size { value, digits }, b) if b.is_ascii_hexdigit() => {
                    if digits >= 15 {
                        return Err("chunk size too large".to_string());
                    }
                    let digit = (b as char).to_digit(16).unwrap_or(0);
                    ChunkState::Size {
                        value: value * 16 + u64::from(digit),
                        digits: digits + 1,
                    }
                }
                (ChunkState::Size { value, digits }, b'\r') if digits > 0 => {
                    ChunkState::SizeLf { value }
                }
                (ChunkState::Size { value, digits }, b';') if digits > 0 => {
                    ChunkState::Extension { value }
                }
                (ChunkState::Extension { value }, b'\r') => ChunkState::SizeLf { value },
                (ChunkState::Extension { value }, _) => ChunkState::Extension { value },
                (ChunkState::SizeLf { value: 0 }, b'\n') => ChunkState::End,
                (ChunkState::SizeLf { value }, b'\n') => ChunkState::Data { left: value },
                (ChunkState::DataCr, b'\r') => ChunkState::DataLf,
                (ChunkState::DataLf, b'\n') => ChunkState::Size {
                    value: 0,
                    digits: 0,
                },
                (state, b) => {
                    return Err(format!("bad chunked framing: byte {b:#04x} in {state:?}"));
                }
            };
        }
        Ok(())
    }
}

/// Counts `\ndata:` markers across arbitrarily split input.
#[derive(Debug, Clone)]
pub(crate) struct EventCounter {
    carry: [u8; CARRY],
    carry_len: usize,
}

impl Default for EventCounter {
    fn default() -> Self {
        // The body starts at a line start: a leading `data:` counts as well.
        let mut carry = [0u8; CARRY];
        carry[0] = b'\n';
        EventCounter {
            carry,
            carry_len: 1,
        }
    }
}

impl EventCounter {
    /// Counts the markers that end in `input`.
    pub(crate) fn count(&mut self, input: &[u8]) -> u64 {
        if input.is_empty() {
            return 0;
        }
        let mut found = 0u64;
        // Markers straddling the previous input and this one.
        if self.carry_len > 0 {
            let mut joint = [0u8; 2 * CARRY];
            let head = input.len().min(CARRY);
            joint[..self.carry_len].copy_from_slice(&self.carry[..self.carry_len]);
            joint[self.carry_len..self.carry_len + head].copy_from_slice(&input[..head]);
            let joint = &joint[..self.carry_len + head];
            for start in 0..self.carry_len {
                if joint[start..].starts_with(DATA_MARK) {
                    found += 1;
                }
            }
        }
        found += DATA_FINDER.find_iter(input).count() as u64;
        // Keep the last CARRY bytes of everything seen so far.
        if input.len() >= CARRY {
            self.carry.copy_from_slice(&input[input.len() - CARRY..]);
            self.carry_len = CARRY;
        } else {
            let mut joint = [0u8; 2 * CARRY];
            joint[..self.carry_len].copy_from_slice(&self.carry[..self.carry_len]);
            joint[self.carry_len..self.carry_len + input.len()].copy_from_slice(input);
            let total = self.carry_len + input.len();
            let keep = total.min(CARRY);
            self.carry[..keep].copy_from_slice(&joint[total - keep..total]);
            self.carry_len = keep;
        }
        found
    }
}

/// One dispatched SSE block.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Block<'a> {
    /// An event with data (the joined `data:` lines).
    Event { data: &'a [u8] },
    /// A comment line (`:` ...), e.g. a heartbeat.
    Comment,
}

/// A full EventSource-style line parser.
#[derive(Debug, Default, Clone)]
pub(crate) struct SseParser {
    line: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    id_buffer: Option<String>,
    /// The last event id committed by a dispatched block (what a browser would resume from).
    pub last_event_id: Option<String>,
}

impl SseParser {
    /// Forgets a partly received block (the connection it came from is gone); keeps the last
    /// event id, as a browser does across reconnects.
    pub(crate) fn reset_stream(&mut self) {
        self.line.clear();
        self.data.clear();
        self.has_data = false;
        self.id_buffer = self.last_event_id.clone();
    }

    /// Feeds decoded body bytes, calling `on_block` for each dispatched event and comment.
    pub(crate) fn feed(&mut self, input: &[u8], mut on_block: impl FnMut(Block<'_>)) {
        let mut rest = input;
        while let Some(at) = memchr::memchr(b'\n', rest) {
            if self.line.is_empty() {
                self.handle_line(&rest[..at], &mut on_block);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&rest[..at]);
                self.handle_line(&line, &mut on_block);
                line.clear();
                self.line = line;
            }
            rest = &rest[at + 1..];
        }
        self.line.extend_from_slice(rest);
    }

    fn handle_line(&mut self, line: &[u8], on_block: &mut impl FnMut(Block<'_>)) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if let Some(id) = &self.id_buffer {
                if self.last_event_id.as_ref() != Some(id) {
                    self.last_event_id = Some(id.clone());
                }
            }
            if self.has_data {
                on_block(Block::Event { data: &self.data });
                self.data.clear();
                self.has_data = false;
            }
            return;
        }
        if line[0] == b':' {
            on_block(Block::Comment);
            return;
        }
        let (name, value) = match memchr::memchr(b':', line) {
            Some(at) => {
                let value = &line[at + 1..];
                (&line[..at], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match name {
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"id" if !value.contains(&0) => {
                self.id_buffer = Some(String::from_utf8_lossy(value).into_owned());
            }
            _ => {}
        }
    }
}

/// The fields the load generator embeds in every payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    /// Per-channel sequence number, from 0.
    pub seq: u64,
    /// Send time, Unix nanoseconds.
    pub sent_ns: u64,
}

/// Builds a payload `{"s":<seq>,"t":<ns>,"p":"xxx"}` padded to `size` bytes (at least the
/// unpadded length).
pub(crate) fn make_payload(stamp: Stamp, size: usize) -> Vec<u8> {
    let mut out = format!("{{\"s\":{},\"t\":{},\"p\":\"", stamp.seq, stamp.sent_ns).into_bytes();
    let pad = size.saturating_sub(out.len() + 2);
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
    out
}

/// Builds an order, valid against `bench/order.schema.json`, that starts with the stamp as
/// [`make_payload`]'s does (so [`parse_stamp`] reads it) and is padded to `size` bytes in a
/// trailing `"p"` field (at least the unpadded length).
pub(crate) fn make_order_payload(stamp: Stamp, size: usize) -> Vec<u8> {
    let mut out = format!(
        "{{\"s\":{},\"t\":{},\"id\":\"o-{}\",\"customer\":\"c-1042\",\"status\":\"paid\",\
         \"created_at\":\"2026-11-29T07:00:00Z\",\"updated_at\":\"2026-11-29T07:00:01Z\",\
         \"items\":[{{\"sku\":\"SKU-0001\",\"qty\":2,\"price\":19.99}},\
         {{\"sku\":\"SKU-0002\",\"qty\":1,\"price\":5.5}}],\"p\":\"",
        stamp.seq, stamp.sent_ns, stamp.seq
    )
    .into_bytes();
    let pad = size.saturating_sub(out.len() + 2);
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
    out
}

/// Reads the stamp from a payload made by [`make_payload`] or [`make_order_payload`].
pub(crate) fn parse_stamp(data: &[u8]) -> Option<Stamp> {
    let seq = number_after(data, b"{\"s\":")?;
    let rest = data.get(5..)?;
    let at = memchr::memmem::find(rest, b",\"t\":")?;
    let sent_ns = number_after(&rest[at..], b",\"t\":")?;
    Some(Stamp { seq, sent_ns })
}

fn number_after(data: &[u8], prefix: &[u8]) -> Option<u64> {
    let digits = data.strip_prefix(prefix)?;
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    if end == 0 || end > 20 {
        return None;
    }
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked(parts: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for part in parts {
            out.extend_from_slice(format!("{:x}\r\n{part}\r\n", part.len()).as_bytes());
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    #[test]
    fn head_is_parsed_when_complete() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\nabc";
        assert_eq!(parse_head(&raw[..20]), Ok(None));
        let head = parse_head(raw).expect("valid").expect("complete");
        assert_eq!(head.status, 200);
        assert!(head.chunked);
        assert_eq!(&raw[head.len..], b"abc");
        assert!(parse_head(b"SSH-2.0\r\n\r\n").is_err());
    }

    #[test]
    fn counting_survives_every_split_of_a_chunked_stream() {
        let events = [
            "retry: 3000\nid: e-0\n\n",
            "id: e-1\ndata: {\"s\":0}\n\n",
            ":\n\n",
            "id: e-2\ndata: {\"s\":1}\n\n",
            "data: x\n\n",
        ];
        let raw = chunked(&events);
        for step in 1..raw.len() {
            let mut dechunk = Dechunker::new(true);
            let mut counter = EventCounter::default();
            let mut parser = SseParser::default();
            let mut count = 0;
            let mut parsed = Vec::new();
            for piece in raw.chunks(step) {
                dechunk
                    .feed(piece, |body| {
                        count += counter.count(body);
                        parser.feed(body, |block| {
                            parsed.push(match block {
                                Block::Event { data } => String::from_utf8_lossy(data).into_owned(),
                                Block::Comment => ":".to_string(),
                            })
                        });
                    })
                    .expect("valid framing");
            }
            assert!(dechunk.ended(), "step {step}");
            assert_eq!(count, 3, "step {step}");
            assert_eq!(
                parsed,
                vec!["{\"s\":0}", ":", "{\"s\":1}", "x"],
                "step {step}"
            );
            assert_eq!(parser.last_event_id.as_deref(), Some("e-2"));
        }
    }

    #[test]
    fn a_leading_data_line_counts() {
        let mut counter = EventCounter::default();
        assert_eq!(counter.count(b"data: a\n\ndata: b\n\n"), 2);
    }

    #[test]
    fn bad_framing_is_an_error() {
        let mut dechunk = Dechunker::new(true);
        assert!(dechunk.feed(b"zz\r\n", |_| {}).is_err());
    }

    #[test]
    fn id_only_blocks_commit_the_last_event_id() {
        let mut parser = SseParser::default();
        let mut events = 0;
        parser.feed(b"retry: 10\nid: a-5\n\n", |_| events += 1);
        assert_eq!(events, 0);
        assert_eq!(parser.last_event_id.as_deref(), Some("a-5"));
        // An id whose block is not complete is not committed.
        parser.feed(b"id: a-6\ndata: x", |_| events += 1);
        assert_eq!(parser.last_event_id.as_deref(), Some("a-5"));
        parser.feed(b"\n\n", |_| events += 1);
        assert_eq!(events, 1);
        assert_eq!(parser.last_event_id.as_deref(), Some("a-6"));
    }

    #[test]
    fn payload_round_trips_at_the_requested_size() {
        let stamp = Stamp {
            seq: 42,
            sent_ns: 1_700_000_000_123_456_789,
        };
        let payload = make_payload(stamp, 256);
        assert_eq!(payload.len(), 256);
        assert_eq!(parse_stamp(&payload), Some(stamp));
        let order = make_order_payload(stamp, 256);
        assert_eq!(order.len(), 256);
        assert_eq!(parse_stamp(&order), Some(stamp));
        let small = make_payload(stamp, 1);
        assert_eq!(parse_stamp(&small), Some(stamp));
        assert_eq!(parse_stamp(b"{\"type\":\"x\"}"), None);
    }
}
