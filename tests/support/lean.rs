//! A lean SSE reader for tests with thousands of clients: one task and one socket per client,
//! HTTP/1.1 written and read by hand (chunked bodies decoded here), no hyper connection task
//! in between. On a 2-core CI runner in a debug build the full [`super::SseClient`] costs more
//! than the gateway it tests once a few thousand of them read at once.
//!
//! It finds a block's end by the gateway's own framing (`\n` line ends), where
//! [`super::SseClient`] accepts any line end; both parse the block with [`SseBlock::parse`].

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{SseBlock, TestResult, PATIENCE};

/// Longest response head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Bytes read from the socket at a time.
const READ_SIZE: usize = 16 * 1024;

/// One SSE stream over a raw HTTP/1.1 connection.
pub struct LeanSseReader {
    stream: TcpStream,
    /// Bytes read but not yet decoded from the chunked body.
    raw: Vec<u8>,
    /// Decoded body bytes; those from `parsed` on are not yet parsed into blocks.
    text: Vec<u8>,
    parsed: usize,
    /// Where the chunked decoder stands.
    chunk: Chunk,
    /// The last event id a browser would hold (updated by every block with `id:`).
    pub last_event_id: Option<String>,
}

/// The chunked decoder's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Expecting a size line.
    Size,
    /// This many data bytes of the current chunk are still to come.
    Data(usize),
    /// Expecting the line break after a chunk's data.
    End,
    /// The last chunk was read: the response is over.
    Done,
}

impl LeanSseReader {
    /// Sends `GET path` with `headers` and reads the response head; returns its status and,
    /// for `200`, the reader.
    pub async fn open(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> TestResult<(u16, Option<LeanSseReader>)> {
        let mut stream = tokio::time::timeout(PATIENCE, TcpStream::connect(addr)).await??;
        let mut request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::with_capacity(READ_SIZE);
        let head_end = tokio::time::timeout(PATIENCE, read_head(&mut stream, &mut raw))
            .await
            .map_err(|_| "timed out waiting for the response head")??;
        let head = std::str::from_utf8(&raw[..head_end])?.to_ascii_lowercase();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .ok_or("no status in the response")?
            .parse()?;
        if status != 200 {
            return Ok((status, None));
        }
        if !head
            .split("\r\n")
            .any(|line| line == "transfer-encoding: chunked")
        {
            return Err(format!("expected a chunked stream, got {head:?}").into());
        }
        raw.drain(..head_end + 4);
        let reader = LeanSseReader {
            stream,
            raw,
            text: Vec::new(),
            parsed: 0,
            chunk: Chunk::Size,
            last_event_id: None,
        };
        Ok((status, Some(reader)))
    }

    /// The next block that carries data (skips heartbeats and id-only blocks).
    pub async fn next_event(&mut self) -> TestResult<SseBlock> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let block = self.next_block(deadline).await?;
            if block.is_event() {
                return Ok(block);
            }
        }
    }

    async fn next_block(&mut self, deadline: Instant) -> TestResult<SseBlock> {
        let mut buffer = [0u8; READ_SIZE];
        loop {
            if let Some(block) = self.take_block()? {
                if block.id.is_some() {
                    self.last_event_id = block.id.clone();
                }
                return Ok(block);
            }
            if self.chunk == Chunk::Done {
                return Err("stream ended".into());
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read(&mut buffer))
                .await
                .map_err(|_| "timed out waiting for an SSE block")??;
            if read == 0 {
                return Err("connection closed".into());
            }
            self.raw.extend_from_slice(&buffer[..read]);
            self.decode()?;
        }
    }

    /// Moves what can be decoded of the chunked body from `raw` to `text`.
    fn decode(&mut self) -> TestResult {
        // Parsed blocks are dropped once per read, not once per block.
        self.text.drain(..self.parsed);
        self.parsed = 0;
        let mut at = 0;
        loop {
            let rest = &self.raw[at..];
            match self.chunk {
                Chunk::Done => break,
                Chunk::Data(left) => {
                    if rest.is_empty() {
                        break;
                    }
                    let take = left.min(rest.len());
                    self.text.extend_from_slice(&rest[..take]);
                    at += take;
                    self.chunk = if take == left {
                        Chunk::End
                    } else {
                        Chunk::Data(left - take)
                    };
                }
                Chunk::End => {
                    if rest.len() < 2 {
                        break;
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err("a chunk did not end with CRLF".into());
                    }
                    at += 2;
                    self.chunk = Chunk::Size;
                }
                Chunk::Size => {
                    let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
                        break;
                    };
                    let line = std::str::from_utf8(&rest[..end])?;
                    let size = line.split(';').next().unwrap_or(line).trim();
                    let size = usize::from_str_radix(size, 16)?;
                    at += end + 2;
                    self.chunk = if size == 0 {
                        Chunk::Done
                    } else {
                        Chunk::Data(size)
                    };
                }
            }
        }
        self.raw.drain(..at);
        Ok(())
    }

    /// Splits off one complete block (up to a blank line), if there is one.
    fn take_block(&mut self) -> TestResult<Option<SseBlock>> {
        loop {
            let rest = &self.text[self.parsed..];
            let Some(end) = rest.windows(2).position(|w| w == b"\n\n") else {
                return Ok(None);
            };
            let block = SseBlock::parse(std::str::from_utf8(&rest[..end])?);
            self.parsed += end + 2;
            if block != SseBlock::default() {
                return Ok(Some(block));
            }
        }
    }
}

/// Reads until the end of the response head; returns where it ends (the `\r\n\r\n`).
async fn read_head(stream: &mut TcpStream, raw: &mut Vec<u8>) -> TestResult<usize> {
    let mut buffer = [0u8; READ_SIZE];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(end);
        }
        if raw.len() > MAX_HEAD {
            return Err("response head too long".into());
        }
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            return Err("connection closed before the response head".into());
        }
        raw.extend_from_slice(&buffer[..read]);
    }
}
