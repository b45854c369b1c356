// Real-client end-to-end tests for ssehub: headless Chromium's EventSource (driven with
// playwright-core) and one independent SSE client library (the npm `eventsource` package),
// against the real `ssehub` binary and a `redis-server` started here. Messages are published
// with the real `redis-cli`.
//
//   SSEHUB_BIN=target/debug/ssehub [SCREENSHOT=docs/demo.png] node tests/browser/run.mjs
//
// Environment:
//   SSEHUB_BIN   path of the built gateway binary (required)
//   SCREENSHOT   where to save a PNG of the demo page showing live events (optional)
//   CHROMIUM     Chromium executable (default /usr/bin/chromium)
//
// Prints one `ok - ...` / `not ok - ...` line per scenario (details as `#` lines) and exits
// non-zero when any failed. Only loopback addresses are used; every wait is bounded, and the
// whole run has a hard time limit. All child processes are killed on every exit path.

import { execFile, spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";

import { EventSource } from "eventsource";
import { chromium } from "playwright-core";

const HARD_TIMEOUT_MS = 120_000;
const SCENARIO_TIMEOUT_MS = 30_000;
const RETRY_MS = 500;
const HOST = "127.0.0.1";
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const JWT_SECRET = "browser-test-secret";
const TOKEN_COOKIE = "ssehub_token";
/// `<16 hex digit epoch>-<sequence>`, the gateway's id shape.
const ID_RE = /^([0-9a-f]{16})-(\d+)$/;

// ---------------------------------------------------------------------------------------------
// Process bookkeeping: every child is killed however this script ends.

const children = new Set();
let tempDir = null;

function killAllChildren() {
  for (const child of children) {
    if (child.exitCode === null && child.signalCode === null) {
      try {
        child.kill("SIGKILL");
      } catch {
        // already gone
      }
    }
  }
  children.clear();
  if (tempDir) {
    fs.rmSync(tempDir, { recursive: true, force: true });
    tempDir = null;
  }
}

process.on("exit", killAllChildren);
for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"]) {
  process.on(signal, () => {
    console.log(`# interrupted by ${signal}`);
    killAllChildren();
    process.exit(130);
  });
}
const hardTimer = setTimeout(() => {
  console.log(`not ok - hard timeout: the whole run exceeded ${HARD_TIMEOUT_MS / 1000} s`);
  killAllChildren();
  process.exit(3);
}, HARD_TIMEOUT_MS);
hardTimer.unref();

function track(child) {
  children.add(child);
  child.on("exit", () => children.delete(child));
  return child;
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/// Polls `check` (sync or async) every 50 ms until it returns a truthy value, at most `ms`.
async function waitFor(what, check, ms = 10_000, describe = null) {
  const deadline = Date.now() + ms;
  for (let attempt = 0; attempt < 10_000; attempt++) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) break;
    await sleep(50);
  }
  const detail = describe ? `; ${await describe()}` : "";
  throw new Error(`timed out after ${ms} ms waiting for ${what}${detail}`);
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} took longer than ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function assert(condition, message) {
  if (!condition) throw new Error(message);
}

function assertEqual(actual, expected, what) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  if (a !== e) throw new Error(`${what}:\n  expected ${e}\n  actual   ${a}`);
}

async function freePort() {
  const server = net.createServer();
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, HOST, resolve);
  });
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

function httpGet(port, urlPath, timeoutMs = 1000) {
  return new Promise((resolve) => {
    const req = http.get({ host: HOST, port, path: urlPath, timeout: timeoutMs }, (res) => {
      res.resume();
      res.on("end", () => resolve(res.statusCode));
      res.on("error", () => resolve(null));
    });
    req.on("timeout", () => req.destroy());
    req.on("error", () => resolve(null));
  });
}

function run(file, args, timeoutMs = 5000) {
  return new Promise((resolve, reject) => {
    execFile(file, args, { timeout: timeoutMs }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${file} ${args.join(" ")}: ${error.message} ${stderr}`));
      else resolve(stdout);
    });
  });
}

/// Parses ids of the gateway's shape; throws on anything else.
function parseId(id) {
  const m = ID_RE.exec(id ?? "");
  if (!m) throw new Error(`id ${JSON.stringify(id)} is not <16 hex epoch>-<sequence>`);
  return { epoch: m[1], seq: BigInt(m[2]) };
}

/// Asserts that ids share one epoch and strictly increase; returns the epoch.
function assertIncreasingIds(ids, what) {
  let previous = null;
  let epoch = null;
  for (const id of ids) {
    const parsed = parseId(id);
    if (epoch === null) epoch = parsed.epoch;
    assert(parsed.epoch === epoch, `${what}: id ${id} has another epoch than ${epoch}`);
    assert(previous === null || parsed.seq > previous, `${what}: ids do not increase: ${ids}`);
    previous = parsed.seq;
  }
  return epoch;
}

function base64url(text) {
  return Buffer.from(text).toString("base64url");
}

/// An HS256 JWT granting `channels` for an hour.
function jwt(claims) {
  const header = base64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = base64url(
    JSON.stringify({ exp: Math.floor(Date.now() / 1000) + 3600, ...claims }),
  );
  const signature = createHmac("sha256", JWT_SECRET).update(`${header}.${body}`).digest("base64url");
  return `${header}.${body}.${signature}`;
}

// ---------------------------------------------------------------------------------------------
// redis-server and the gateway.

class Redis {
  async start() {
    this.port = await freePort();
    this.child = track(
      spawn(
        "redis-server",
        ["--port", String(this.port), "--bind", HOST, "--save", "", "--appendonly", "no"],
        { stdio: "ignore" },
      ),
    );
    await waitFor("redis-server to answer PING", async () => {
      if (this.child.exitCode !== null) throw new Error("redis-server exited at start-up");
      return (await run("redis-cli", ["-p", String(this.port), "PING"]).catch(() => "")).trim() === "PONG";
    });
  }

  /// `redis-cli PUBLISH channel payload`; returns the number of receiving subscribers.
  async publish(channel, payload) {
    const out = await run("redis-cli", ["-p", String(this.port), "PUBLISH", channel, payload]);
    return Number(out.trim());
  }
}

class Gateway {
  constructor(bin, redis, env) {
    this.bin = bin;
    this.redis = redis;
    this.extraEnv = env;
    this.log = [];
    this.child = null;
    this.starts = 0;
  }

  async allocatePorts() {
    this.port = await freePort();
    this.adminPort = await freePort();
  }

  get origin() {
    return `http://${HOST}:${this.port}`;
  }

  async start() {
    this.starts += 1;
    const config = path.join(tempDir, "empty.toml");
    fs.writeFileSync(config, "# every setting comes from the environment\n");
    const env = {
      PATH: process.env.PATH,
      SSEHUB__REDIS__URL: `redis://${HOST}:${this.redis.port}`,
      SSEHUB__SERVER__LISTEN: `${HOST}:${this.port}`,
      SSEHUB__ADMIN__LISTEN: `${HOST}:${this.adminPort}`,
      SSEHUB__SSE__RETRY_MS: String(RETRY_MS),
      SSEHUB__SERVER__SHUTDOWN_RETRY_JITTER_MS: "0",
      SSEHUB__SERVER__SHUTDOWN_GRACE_SECS: "5",
      SSEHUB__LOG__LEVEL: "info",
      ...this.extraEnv,
    };
    const child = track(
      spawn(this.bin, ["--config", config], { env, stdio: ["ignore", "pipe", "pipe"] }),
    );
    this.child = child;
    const run = this.starts;
    for (const stream of [child.stdout, child.stderr]) {
      let partial = "";
      stream.setEncoding("utf8");
      stream.on("data", (chunk) => {
        const lines = (partial + chunk).split("\n");
        partial = lines.pop();
        for (const line of lines) this.log.push(`[run ${run}] ${line}`);
        if (this.log.length > 400) this.log.splice(0, this.log.length - 400);
      });
    }
    await waitFor(
      `gateway /readyz 200 on ${HOST}:${this.adminPort}`,
      async () => {
        if (child.exitCode !== null) {
          throw new Error(`the gateway exited at start-up with ${child.exitCode}`);
        }
        return (await httpGet(this.adminPort, "/readyz")) === 200;
      },
      15_000,
    );
  }

  running() {
    return this.child !== null && this.child.exitCode === null && this.child.signalCode === null;
  }

  /// SIGTERM and wait for the exit; returns the exit code.
  async stop() {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return child?.exitCode;
    const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
    child.kill("SIGTERM");
    const result = await withTimeout(exited, 15_000, "gateway exit after SIGTERM").catch((e) => {
      child.kill("SIGKILL");
      throw e;
    });
    this.child = null;
    if (result.signal) throw new Error(`the gateway died of ${result.signal}`);
    return result.code;
  }

  tail(lines = 25) {
    return this.log.slice(-lines);
  }
}

// ---------------------------------------------------------------------------------------------
// A TCP proxy in front of the gateway that can cut every connection and refuse new ones for a
// while (a network outage), records each HTTP request head it forwards, and optionally serves
// a few static pages itself (so a test page shares the proxied stream's origin).

class Front {
  constructor(name, targetPort, pages = {}) {
    this.name = name;
    this.targetPort = targetPort;
    this.pages = pages;
    this.requests = [];
    this.sockets = new Set();
    this.blockedUntil = 0;
    this.refused = 0;
  }

  get origin() {
    return `http://${HOST}:${this.port}`;
  }

  async start() {
    this.server = net.createServer((client) => this.#accept(client));
    await new Promise((resolve, reject) => {
      this.server.once("error", reject);
      this.server.listen(0, HOST, resolve);
    });
    this.port = this.server.address().port;
  }

  /// Cuts every open connection (TCP reset) and refuses new ones for `holdMs`.
  cut(holdMs) {
    this.blockedUntil = Date.now() + holdMs;
    for (const socket of this.sockets) {
      if (typeof socket.resetAndDestroy === "function") socket.resetAndDestroy();
      else socket.destroy();
    }
    this.sockets.clear();
  }

  async close() {
    this.cut(0);
    await new Promise((resolve) => this.server.close(resolve));
  }

  eventRequests() {
    return this.requests.filter((r) => r.path.startsWith("/events"));
  }

  #accept(client) {
    client.on("error", () => {});
    if (Date.now() < this.blockedUntil) {
      this.refused += 1;
      client.destroy();
      return;
    }
    this.sockets.add(client);
    client.on("close", () => this.sockets.delete(client));
    let upstream = null;
    let head = Buffer.alloc(0);
    let parsing = true;
    client.on("data", (chunk) => {
      if (parsing) {
        head = Buffer.concat([head, chunk]);
        for (let n = 0; n < 100; n++) {
          const end = head.indexOf("\r\n\r\n");
          if (end < 0) break;
          const request = parseRequestHead(head.subarray(0, end).toString("latin1"));
          head = head.subarray(end + 4);
          if (!request) {
            parsing = false;
            break;
          }
          this.requests.push({ at: Date.now(), ...request });
          const page = this.pages[request.path.split("?")[0]];
          if (page !== undefined && upstream === null) {
            const body = Buffer.from(page.body);
            client.end(
              `HTTP/1.1 ${page.status ?? 200} OK\r\nContent-Type: ${page.type ?? "text/html; charset=utf-8"}\r\n` +
                `Content-Length: ${body.length}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n` +
                body.toString("latin1"),
              "latin1",
            );
            return;
          }
          // Only bodiless requests (GET, OPTIONS) are expected; stop parsing otherwise.
          if (!["GET", "OPTIONS", "HEAD"].includes(request.method)) parsing = false;
        }
        if (head.length > 64 * 1024) parsing = false;
      }
      if (upstream === null) {
        upstream = net.connect(this.targetPort, HOST);
        this.sockets.add(upstream);
        upstream.on("error", () => client.destroy());
        upstream.on("close", () => {
          this.sockets.delete(upstream);
          client.destroy();
        });
        client.on("close", () => upstream.destroy());
        upstream.pipe(client);
      }
      upstream.write(chunk);
    });
  }
}

function parseRequestHead(text) {
  const [requestLine, ...lines] = text.split("\r\n");
  const m = /^([A-Z]+) (\S+) HTTP\/1\.[01]$/.exec(requestLine);
  if (!m) return null;
  const headers = {};
  for (const line of lines) {
    const colon = line.indexOf(":");
    if (colon > 0) headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
  }
  return { method: m[1], path: m[2], headers };
}

/// A plain HTTP server serving one page at every path: another origin for the CORS scenario.
async function pageServer(html) {
  const server = http.createServer((req, res) => {
    if (req.url.startsWith("/favicon")) {
      res.writeHead(204).end();
      return;
    }
    res.writeHead(200, { "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store" });
    res.end(html);
  });
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, HOST, resolve);
  });
  return { server, port: server.address().port, origin: `http://${HOST}:${server.address().port}` };
}

// ---------------------------------------------------------------------------------------------
// The page every browser scenario drives: opens EventSources and records what they deliver.

const HARNESS_HTML = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ssehub browser test</title></head>
<body><p>ssehub browser test harness</p>
<script>
"use strict";
window.streams = {};
window.openStream = (name, url, types, init) => {
  const es = new EventSource(url, init || {});
  const s = { es, events: [], errors: [], opens: 0 };
  es.onopen = () => { s.opens += 1; };
  es.onerror = () => { s.errors.push({ at: Date.now(), readyState: es.readyState }); };
  // conn: which connection (1 = first, 2 = after the first reconnect, ...) delivered it.
  const record = (e) =>
    s.events.push({ type: e.type, data: e.data, lastEventId: e.lastEventId, conn: s.opens });
  es.onmessage = record;
  for (const type of types) es.addEventListener(type, record);
  window.streams[name] = s;
  return es.url;
};
window.snapshot = (name) => {
  const s = window.streams[name];
  return { events: s.events, errors: s.errors, opens: s.opens, readyState: s.es.readyState };
};
window.closeStream = (name) => window.streams[name].es.close();
</script></body></html>`;

const FAVICON = { status: 204, type: "image/x-icon", body: "" };

async function openStream(page, name, url, types = [], init = undefined) {
  return page.evaluate(([n, u, t, i]) => window.openStream(n, u, t, i), [name, url, types, init]);
}

async function snapshot(page, name) {
  return page.evaluate((n) => window.snapshot(n), name);
}

/// Waits until the page's stream `name` has delivered at least `count` events.
async function pageEvents(page, name, count, ms = 10_000) {
  const snap = await waitFor(
    `${count} events on page stream ${name}`,
    async () => {
      const s = await snapshot(page, name);
      return s.events.length >= count ? s : null;
    },
    ms,
    async () => JSON.stringify(await snapshot(page, name)),
  );
  return snap;
}

// ---------------------------------------------------------------------------------------------
// The Node `eventsource` package (independent client): records like the page does.

function nodeStream(url, types = [], init = undefined) {
  const es = new EventSource(url, init);
  const s = { es, events: [], errors: [], opens: 0 };
  es.onopen = () => {
    s.opens += 1;
  };
  es.onerror = (e) => {
    s.errors.push({ at: Date.now(), readyState: es.readyState, message: e.message, code: e.code });
  };
  const record = (e) =>
    s.events.push({ type: e.type, data: e.data, lastEventId: e.lastEventId, conn: s.opens });
  es.onmessage = record;
  for (const type of types) es.addEventListener(type, record);
  return s;
}

async function nodeEvents(s, count, what, ms = 10_000) {
  await waitFor(`${count} events on ${what}`, () => s.events.length >= count, ms, () =>
    JSON.stringify({ events: s.events, errors: s.errors, opens: s.opens }),
  );
  return s.events;
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

async function main() {
  const bin = process.env.SSEHUB_BIN;
  if (!bin || !fs.existsSync(bin)) {
    console.log(`not ok - setup: SSEHUB_BIN must name the built ssehub binary (got ${bin})`);
    process.exit(2);
  }
  if (!fs.existsSync(CHROMIUM)) {
    console.log(`not ok - setup: ${CHROMIUM} is missing (apt-get install -y chromium)`);
    process.exit(2);
  }
  tempDir = fs.mkdtempSync(path.join(os.tmpdir(), "ssehub-browser-"));
  const started = Date.now();

  // Pages on two more origins for the CORS scenario; their ports go into the gateway's config.
  const allowedSite = await pageServer(HARNESS_HTML);
  const otherSite = await pageServer(HARNESS_HTML);

  const redis = new Redis();
  await redis.start();
  const gateway = new Gateway(bin, redis, {
    // Everything the tests use is public except `private:*`, readable only with a token.
    SSEHUB__CHANNELS__PUBLIC: "pub:*,demo:*,orders",
    SSEHUB__AUTH__JWT_SECRET: JWT_SECRET,
    SSEHUB__AUTH__COOKIE_NAME: TOKEN_COOKIE,
    SSEHUB__SERVER__CORS_ORIGINS: allowedSite.origin,
    SSEHUB__SERVER__CORS_CREDENTIALS: "true",
  });
  await gateway.allocatePorts();
  await gateway.start();

  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
    timeout: 30_000,
  });
  const pageLog = [];
  const results = [];

  async function newPage(contextOptions = {}) {
    const context = await browser.newContext(contextOptions);
    const page = await context.newPage();
    page.on("console", (m) => pageLog.push(`console.${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => pageLog.push(`pageerror: ${e.message}`));
    page.setDefaultTimeout(10_000);
    return { context, page };
  }

  async function scenario(name, body) {
    const t0 = Date.now();
    pageLog.length = 0;
    const cleanups = [];
    try {
      if (!gateway.running()) await gateway.start();
      await withTimeout(body(cleanups), SCENARIO_TIMEOUT_MS, name);
      results.push({ name, ok: true });
      console.log(`ok - ${name} (${Date.now() - t0} ms)`);
    } catch (error) {
      results.push({ name, ok: false });
      console.log(`not ok - ${name} (${Date.now() - t0} ms)`);
      for (const line of String(error?.stack ?? error).split("\n")) console.log(`#   ${line}`);
      for (const line of pageLog.slice(-15)) console.log(`#   page: ${line}`);
      for (const line of gateway.tail()) console.log(`#   gateway: ${line}`);
    } finally {
      for (const cleanup of cleanups.reverse()) {
        await Promise.resolve()
          .then(cleanup)
          .catch(() => {});
      }
    }
  }

  // 1. Two channels at once: event types, data and ids.
  await scenario("browser: EventSource receives events on two channels with type, data and lastEventId", async (cleanups) => {
    const front = new Front("s1", gateway.port, { "/test.html": { body: HARNESS_HTML }, "/favicon.ico": FAVICON });
    await front.start();
    cleanups.push(() => front.close());
    const { context, page } = await newPage();
    cleanups.push(() => context.close());
    await page.goto(`${front.origin}/test.html`);
    await openStream(page, "s1", "/events?channel=pub:s1a&channel=pub:s1b", ["OrderPlaced", "gateway.reset"]);
    await waitFor("the stream to open", async () => (await snapshot(page, "s1")).opens === 1);
    const published = [
      ["pub:s1a", '{"type":"OrderPlaced","data":{"orderId":"o-1"}}', "OrderPlaced"],
      ["pub:s1b", "plain text on b", "message"],
      ["pub:s1a", "plain text on a", "message"],
      ["pub:s1b", '{"type":"OrderPlaced","data":{"orderId":"o-2"}}', "OrderPlaced"],
      ["pub:s1a", '{"kind":"no type field"}', "message"],
      ["pub:s1b", '["a","json","array"]', "message"],
    ];
    for (const [channel, payload] of published) {
      const receivers = await redis.publish(channel, payload);
      assert(receivers === 1, `PUBLISH ${channel} reached ${receivers} subscribers, expected the gateway`);
    }
    const snap = await pageEvents(page, "s1", published.length);
    await sleep(300);
    const events = (await snapshot(page, "s1")).events;
    assertEqual(
      events.map((e) => [e.type, e.data]),
      published.map(([, payload, type]) => [type, payload]),
      "events (type, data) in publish order",
    );
    assertIncreasingIds(events.map((e) => e.lastEventId), "lastEventId");
    assert(snap.errors.length === 0, `unexpected errors: ${JSON.stringify(snap.errors)}`);
  });

  // 4. Field injection through a payload.
  await scenario("browser: payloads with \\n, \\r and \\r\\n cannot inject fields: one message event each", async (cleanups) => {
    const front = new Front("s4", gateway.port, { "/test.html": { body: HARNESS_HTML }, "/favicon.ico": FAVICON });
    await front.start();
    cleanups.push(() => front.close());
    const { context, page } = await newPage();
    cleanups.push(() => context.close());
    await page.goto(`${front.origin}/test.html`);
    await openStream(page, "s4", "/events?channel=pub:s4", ["evil", "gateway.reset"]);
    await waitFor("the stream to open", async () => (await snapshot(page, "s4")).opens === 1);
    const payloads = [
      "a\n\nevent: evil\ndata: x",
      "a\r\revent: evil\rdata: x",
      "a\r\n\r\nevent: evil\r\ndata: x",
      "id: 999\nretry: 1\nevent: evil",
      "end",
    ];
    for (const payload of payloads) await redis.publish("pub:s4", payload);
    await pageEvents(page, "s4", payloads.length);
    await sleep(300);
    const snap = await snapshot(page, "s4");
    // EventSource joins data lines with LF, so CR and CRLF come back as LF.
    const expected = payloads.map((p) => ["message", p.replace(/\r\n|\r/g, "\n")]);
    assertEqual(snap.events.map((e) => [e.type, e.data]), expected, "events (type, data)");
    assert(!snap.events.some((e) => e.type === "evil"), "an `evil` event fired");
    assertIncreasingIds(snap.events.map((e) => e.lastEventId), "lastEventId");
  });

  // 2. A network cut while publishing continues: reconnect with Last-Event-ID, no loss, no dup.
  await scenario("browser: after a TCP cut EventSource reconnects with Last-Event-ID and gets every event once, in order", async (cleanups) => {
    const front = new Front("s2", gateway.port, { "/test.html": { body: HARNESS_HTML }, "/favicon.ico": FAVICON });
    await front.start();
    cleanups.push(() => front.close());
    const { context, page } = await newPage();
    cleanups.push(() => context.close());
    await page.goto(`${front.origin}/test.html`);
    await openStream(page, "s2", "/events?channel=pub:s2", ["gateway.reset"]);
    await waitFor("the stream to open", async () => (await snapshot(page, "s2")).opens === 1);
    const expected = [];
    const publishedAt = [];
    let cutAt = null;
    for (let n = 1; n <= 30; n++) {
      if (n === 10) {
        cutAt = Date.now();
        front.cut(1000);
      }
      const payload = `s2 event ${n}`;
      expected.push(payload);
      await redis.publish("pub:s2", payload);
      publishedAt.push(Date.now());
      await sleep(100);
    }
    await pageEvents(page, "s2", expected.length, 15_000);
    await sleep(300);
    const snap = await snapshot(page, "s2");
    assertEqual(snap.events.map((e) => e.data), expected, "data of every event, once, in order");
    assert(snap.events.every((e) => e.type === "message"), "a gateway.reset or other type arrived");
    assertIncreasingIds(snap.events.map((e) => e.lastEventId), "lastEventId");
    assert(snap.opens >= 2, `the page did not reconnect (opens ${snap.opens})`);
    const resumes = front.eventRequests().filter((r) => r.at > cutAt);
    assert(resumes.length >= 1, "no /events request after the cut");
    const lastEventId = resumes[0].headers["last-event-id"];
    assert(lastEventId, `the reconnect carried no Last-Event-ID: ${JSON.stringify(resumes[0].headers)}`);
    const before = snap.events.filter((e) => e.conn === 1).pop();
    assert(
      lastEventId === before.lastEventId,
      `Last-Event-ID ${lastEventId} is not the id of the last event before the cut (${before.lastEventId})`,
    );
    const duringOutage = publishedAt.filter((t) => t > cutAt && t < resumes[0].at).length;
    assert(duringOutage >= 3, `only ${duringOutage} events were published during the outage`);
    const replayed = snap.events.filter((e) => e.conn > 1).length;
    console.log(
      `#   outage of ${resumes[0].at - cutAt} ms: ${front.refused} reconnect(s) refused, ` +
        `${duringOutage} events published meanwhile; resumed from ${lastEventId} (${snap.events.length - replayed} events before the cut)`,
    );
  });

  // 3. Gateway restart: foreign epoch -> gateway.reset(unknown_position), then live events.
  await scenario("browser: after a gateway restart the page gets gateway.reset (unknown_position) then live events", async (cleanups) => {
    const front = new Front("s3", gateway.port, { "/test.html": { body: HARNESS_HTML }, "/favicon.ico": FAVICON });
    await front.start();
    cleanups.push(() => front.close());
    const { context, page } = await newPage();
    cleanups.push(() => context.close());
    await page.goto(`${front.origin}/test.html`);
    await openStream(page, "s3", "/events?channel=pub:s3a&channel=pub:s3b", ["gateway.reset"]);
    await waitFor("the stream to open", async () => (await snapshot(page, "s3")).opens === 1);
    await redis.publish("pub:s3a", "before restart");
    const [before] = (await pageEvents(page, "s3", 1)).events;
    const oldEpoch = parseId(before.lastEventId).epoch;

    const restartedAt = Date.now();
    const code = await gateway.stop();
    assert(code === 0, `the gateway exited with ${code} on SIGTERM`);
    await gateway.start(); // same ports
    const snap = await pageEvents(page, "s3", 2, 15_000);
    const reset = snap.events[1];
    assert(reset.type === "gateway.reset", `expected gateway.reset after the restart, got ${JSON.stringify(reset)}`);
    const data = JSON.parse(reset.data);
    assert(data.reason === "unknown_position", `reset reason ${data.reason}`);
    assertEqual([...data.channels].sort(), ["pub:s3a", "pub:s3b"], "reset channels");
    const newEpoch = parseId(reset.lastEventId).epoch;
    assert(newEpoch !== oldEpoch, "the restarted gateway kept its epoch");
    const resumes = front.eventRequests().filter((r) => r.at > restartedAt);
    assert(
      resumes.some((r) => r.headers["last-event-id"] === before.lastEventId),
      `no reconnect carried Last-Event-ID ${before.lastEventId}`,
    );

    await redis.publish("pub:s3b", "after restart on b");
    await redis.publish("pub:s3a", "after restart on a");
    await pageEvents(page, "s3", 4);
    await sleep(300);
    const after = (await snapshot(page, "s3")).events.slice(2);
    assertEqual(
      after.map((e) => [e.type, e.data]),
      [
        ["message", "after restart on b"],
        ["message", "after restart on a"],
      ],
      "live events after the reset",
    );
    assertIncreasingIds([reset.lastEventId, ...after.map((e) => e.lastEventId)], "ids after the restart");
    assert(after.every((e) => parseId(e.lastEventId).epoch === newEpoch), "live events carry the new epoch");
  });

  // 5. CORS with credentials: allowed origin works (the cookie reaches the gateway), others fail.
  await scenario("browser: cross-origin EventSource withCredentials works from an allowed origin, fails from another", async (cleanups) => {
    const { context, page } = await newPage();
    cleanups.push(() => context.close());
    const token = jwt({ sub: "browser-test", channels: ["private:*"] });
    const url = `${gateway.origin}/events?channel=private:s5&channel=pub:s5`;
    // The credentialed stream goes through a cuttable proxy (still cross-origin: another port),
    // which also shows what the browser sent: Origin, the cookie, the preflight, Last-Event-ID.
    const front = new Front("s5", gateway.port);
    await front.start();
    cleanups.push(() => front.close());
    const credsUrl = `${front.origin}/events?channel=private:s5&channel=pub:s5`;

    // Another origin, not on the list: the credentialed stream must fail without any event.
    const other = await context.newPage();
    const otherConsole = [];
    other.on("console", (m) => otherConsole.push(m.text()));
    await other.goto(`${otherSite.origin}/`);
    await other.evaluate(([name, value]) => {
      document.cookie = `${name}=${value}; path=/`;
    }, [TOKEN_COOKIE, token]);
    await openStream(other, "denied", url, ["gateway.reset"], { withCredentials: true });
    await waitFor(
      "the disallowed origin's EventSource to fail (readyState CLOSED)",
      async () => (await snapshot(other, "denied")).readyState === 2,
      10_000,
      async () => JSON.stringify(await snapshot(other, "denied")),
    );

    // The allowed origin; the cookie (set for host 127.0.0.1, any port) is the only credential.
    await page.goto(`${allowedSite.origin}/`);
    await openStream(page, "nocreds", url, ["gateway.reset"]);
    await openStream(page, "creds", credsUrl, ["gateway.reset", "OrderPlaced"], { withCredentials: true });
    await waitFor(
      "the allowed origin's credentialed EventSource to open",
      async () => (await snapshot(page, "creds")).opens === 1,
      10_000,
      async () => JSON.stringify(await snapshot(page, "creds")),
    );
    await waitFor(
      "the allowed origin's stream without credentials to be refused (no cookie, private channel)",
      async () => (await snapshot(page, "nocreds")).readyState === 2,
      10_000,
      async () => JSON.stringify(await snapshot(page, "nocreds")),
    );
    await redis.publish("private:s5", '{"type":"OrderPlaced","data":{"orderId":"p-1"}}');
    await redis.publish("pub:s5", "public on s5");
    const creds = await pageEvents(page, "creds", 2);
    await sleep(300);
    assertEqual(
      creds.events.map((e) => [e.type, e.data]),
      [
        ["OrderPlaced", '{"type":"OrderPlaced","data":{"orderId":"p-1"}}'],
        ["message", "public on s5"],
      ],
      "events on the allowed origin's credentialed stream",
    );
    const denied = await snapshot(other, "denied");
    assert(denied.events.length === 0, `the disallowed origin got events: ${JSON.stringify(denied.events)}`);
    assert(denied.errors.length >= 1 && denied.opens === 0, `disallowed origin: ${JSON.stringify(denied)}`);
    assert(
      otherConsole.some((text) => /blocked by CORS policy/.test(text)),
      `the disallowed origin failed, but not because of CORS: ${JSON.stringify(otherConsole)}`,
    );
    const nocreds = await snapshot(page, "nocreds");
    assert(nocreds.events.length === 0 && nocreds.opens === 0, `no-credentials stream: ${JSON.stringify(nocreds)}`);

    // The credentialed cross-origin stream also resumes after a cut (a CORS reconnect).
    const cutAt = Date.now();
    front.cut(700);
    await redis.publish("private:s5", '{"type":"OrderPlaced","data":{"orderId":"p-2"}}');
    await redis.publish("pub:s5", "public on s5 during the outage");
    await pageEvents(page, "creds", 4);
    await sleep(300);
    const resumed = await snapshot(page, "creds");
    assertEqual(
      resumed.events.map((e) => [e.type, e.data]),
      [
        ["OrderPlaced", '{"type":"OrderPlaced","data":{"orderId":"p-1"}}'],
        ["message", "public on s5"],
        ["OrderPlaced", '{"type":"OrderPlaced","data":{"orderId":"p-2"}}'],
        ["message", "public on s5 during the outage"],
      ],
      "events on the credentialed stream across a cut",
    );
    assert(resumed.opens >= 2, `no reconnect (opens ${resumed.opens})`);
    const gets = front.requests.filter((r) => r.method === "GET");
    for (const r of gets) {
      assert(r.headers.origin === allowedSite.origin, `Origin ${r.headers.origin}`);
      assert((r.headers.cookie ?? "").includes(`${TOKEN_COOKIE}=${token}`), `no token cookie: ${JSON.stringify(r.headers)}`);
    }
    const resume = gets.find((r) => r.at > cutAt);
    assert(resume, "no GET after the cut");
    assert(
      resume.headers["last-event-id"] === creds.events[1].lastEventId,
      `cross-origin reconnect: Last-Event-ID ${resume.headers["last-event-id"]}, expected ${creds.events[1].lastEventId}`,
    );
    const preflights = front.requests.filter((r) => r.method === "OPTIONS");
    console.log(
      `#   cross-origin requests seen by the proxy: ${front.requests.map((r) => r.method).join(", ")}` +
        (preflights.length
          ? ` (preflight asked for: ${preflights[0].headers["access-control-request-headers"]})`
          : " (no preflight: Chromium sends Last-Event-ID on a CORS reconnect without one)"),
    );
  });

  // Independent client library: the npm `eventsource` package.
  await scenario("eventsource (npm): receives events on two channels with types and data", async (cleanups) => {
    const s = nodeStream(`${gateway.origin}/events?channel=pub:i1a&channel=pub:i1b`, ["OrderPlaced", "gateway.reset"]);
    cleanups.push(() => s.es.close());
    await waitFor("the stream to open", () => s.opens === 1, 10_000, () => JSON.stringify(s.errors));
    const published = [
      ["pub:i1a", '{"type":"OrderPlaced","data":{"orderId":"n-1"}}', "OrderPlaced"],
      ["pub:i1b", "plain on b", "message"],
      ["pub:i1a", "two\nlines", "message"],
      ["pub:i1b", '{"type":"OrderPlaced","data":{"orderId":"n-2"}}', "OrderPlaced"],
    ];
    for (const [channel, payload] of published) await redis.publish(channel, payload);
    await nodeEvents(s, published.length, "the eventsource stream");
    await sleep(300);
    assertEqual(
      s.events.map((e) => [e.type, e.data]),
      published.map(([, payload, type]) => [type, payload]),
      "events (type, data)",
    );
    assertIncreasingIds(s.events.map((e) => e.lastEventId), "lastEventId");
  });

  await scenario("eventsource (npm): after a TCP cut it reconnects with Last-Event-ID and gets the missed events once, in order", async (cleanups) => {
    const front = new Front("i2", gateway.port);
    await front.start();
    cleanups.push(() => front.close());
    const s = nodeStream(`${front.origin}/events?channel=pub:i2`, ["gateway.reset"]);
    cleanups.push(() => s.es.close());
    await waitFor("the stream to open", () => s.opens === 1, 10_000, () => JSON.stringify(s.errors));
    const expected = [];
    let cutAt = null;
    for (let n = 1; n <= 20; n++) {
      if (n === 6) {
        cutAt = Date.now();
        front.cut(800);
      }
      expected.push(`i2 event ${n}`);
      await redis.publish("pub:i2", `i2 event ${n}`);
      await sleep(100);
    }
    await nodeEvents(s, expected.length, "the eventsource stream", 15_000);
    await sleep(300);
    assertEqual(s.events.map((e) => e.data), expected, "data of every event, once, in order");
    assert(s.events.every((e) => e.type === "message"), "a gateway.reset or other type arrived");
    assertIncreasingIds(s.events.map((e) => e.lastEventId), "lastEventId");
    assert(s.opens >= 2, `no reconnect (opens ${s.opens})`);
    const resume = front.eventRequests().find((r) => r.at > cutAt);
    assert(resume, "no /events request after the cut");
    const before = s.events.filter((e) => e.conn === 1).pop();
    assert(
      resume.headers["last-event-id"] === before.lastEventId,
      `the reconnect's Last-Event-ID ${resume.headers["last-event-id"]} is not ${before.lastEventId}`,
    );
  });

  await scenario("eventsource (npm): a new client resuming from an id (lastEventId query, Last-Event-ID header) gets exactly the later events", async (cleanups) => {
    const first = nodeStream(`${gateway.origin}/events?channel=pub:i3`);
    cleanups.push(() => first.es.close());
    await waitFor("the stream to open", () => first.opens === 1, 10_000, () => JSON.stringify(first.errors));
    const all = [];
    for (let n = 1; n <= 6; n++) {
      all.push(`i3 event ${n}`);
      await redis.publish("pub:i3", `i3 event ${n}`);
    }
    await nodeEvents(first, 6, "the first stream");
    first.es.close();
    const from = first.events[2]; // "i3 event 3"
    // Published while nobody is connected: still replayed from the channel's history.
    for (let n = 7; n <= 8; n++) {
      all.push(`i3 event ${n}`);
      await redis.publish("pub:i3", `i3 event ${n}`);
    }
    const expected = all.slice(3);

    const byQuery = nodeStream(
      `${gateway.origin}/events?channel=pub:i3&lastEventId=${encodeURIComponent(from.lastEventId)}`,
      ["gateway.reset"],
    );
    cleanups.push(() => byQuery.es.close());
    const byHeader = nodeStream(`${gateway.origin}/events?channel=pub:i3`, ["gateway.reset"], {
      fetch: (input, init) =>
        fetch(input, { ...init, headers: { ...init.headers, "Last-Event-ID": from.lastEventId } }),
    });
    cleanups.push(() => byHeader.es.close());
    for (const [s, what] of [
      [byQuery, "lastEventId query parameter"],
      [byHeader, "Last-Event-ID header"],
    ]) {
      await nodeEvents(s, expected.length, `the stream resumed by ${what}`);
    }
    await sleep(300);
    for (const [s, what] of [
      [byQuery, "lastEventId query parameter"],
      [byHeader, "Last-Event-ID header"],
    ]) {
      assertEqual(s.events.map((e) => [e.type, e.data]), expected.map((d) => ["message", d]), `resume by ${what}`);
      const ids = [from.lastEventId, ...s.events.map((e) => e.lastEventId)];
      assertIncreasingIds(ids, `ids resumed by ${what}`);
      assertEqual(
        s.events.slice(0, 3).map((e) => e.lastEventId),
        first.events.slice(3).map((e) => e.lastEventId),
        `resume by ${what}: ids of the events the first client also saw`,
      );
    }
  });

  // The demo page at / with live events (and the README screenshot).
  await scenario("demo page: GET / shows live events with ids, types and latency", async (cleanups) => {
    const { context, page } = await newPage({ viewport: { width: 1100, height: 600 } });
    cleanups.push(() => context.close());
    await page.goto(`${gateway.origin}/?channel=demo:ticker&channel=orders`);
    await waitFor("the demo page to show State: open", async () => (await page.textContent("#state")) === "open");
    const payloads = [
      ["demo:ticker", () => JSON.stringify({ type: "tick", n: 1, ts: Date.now() })],
      ["orders", () => JSON.stringify({ type: "OrderPlaced", data: { orderId: "o-1001", total: 42.5 }, ts: Date.now() })],
      ["demo:ticker", () => JSON.stringify({ type: "tick", n: 2, ts: Date.now() })],
      ["orders", () => "plain text: order o-1001 is being packed"],
      ["demo:ticker", () => JSON.stringify({ type: "tick", n: 3, ts: Date.now() })],
      ["orders", () => JSON.stringify({ type: "OrderShipped", data: { orderId: "o-1001", carrier: "DHL" }, ts: Date.now() })],
      ["demo:ticker", () => JSON.stringify({ type: "tick", n: 4, ts: Date.now() })],
    ];
    for (const [channel, payload] of payloads) {
      await redis.publish(channel, payload());
      await sleep(150);
    }
    await waitFor(
      `${payloads.length} rows on the demo page`,
      async () => (await page.locator("#events tr").count()) === payloads.length,
      10_000,
      async () => `rows: ${await page.locator("#events tr").count()}`,
    );
    const rows = await page.$$eval("#events tr", (trs) =>
      trs.map((tr) => [...tr.children].map((td) => td.textContent)),
    );
    // Newest first: [arrived, id, type, latency, data].
    assertEqual(
      rows.map((r) => r[2]).reverse(),
      ["tick", "OrderPlaced", "tick", "message", "tick", "OrderShipped", "tick"],
      "types shown on the demo page",
    );
    assertIncreasingIds(rows.map((r) => r[1]).reverse(), "ids shown on the demo page");
    assert(rows.filter((r) => /^\d+ ms$/.test(r[3])).length === 6, `latency column: ${JSON.stringify(rows)}`);
    assert((await page.textContent("#count")) === String(payloads.length), "event count");
    if (process.env.SCREENSHOT) {
      fs.mkdirSync(path.dirname(path.resolve(process.env.SCREENSHOT)), { recursive: true });
      await page.screenshot({ path: process.env.SCREENSHOT });
      console.log(`#   screenshot written to ${process.env.SCREENSHOT}`);
    }
  });

  await browser.close().catch(() => {});
  const code = await gateway.stop().catch((e) => `error: ${e.message}`);
  allowedSite.server.close();
  otherSite.server.close();
  const failed = results.filter((r) => !r.ok).length;
  if (code !== 0) console.log(`# the gateway's final SIGTERM exit: ${code}`);
  console.log(
    `# ${results.length - failed}/${results.length} scenarios passed in ${((Date.now() - started) / 1000).toFixed(1)} s`,
  );
  return failed === 0 && code === 0 ? 0 : 1;
}

main()
  .then((code) => {
    killAllChildren();
    process.exit(code);
  })
  .catch((error) => {
    console.log(`not ok - setup: ${error?.stack ?? error}`);
    killAllChildren();
    process.exit(1);
  });
