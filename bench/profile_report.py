#!/usr/bin/env python3
"""Summarises the profiles that `bench/run-benchmarks --profile` leaves in bench/results/profile/
as Markdown (printed; run-benchmarks saves it as bench/results/profile.md, which report.py puts
into BENCHMARKS.md). Every number comes from the perf and heaptrack output. Stdlib only.

    python3 bench/profile_report.py bench/results/profile [bench/results] > bench/results/profile.md

The second argument (default: the profile directory's parent) holds the benchmark's results; with
them, the kernel share measured in each profile is also applied to the benchmark's median figures.
"""

from __future__ import annotations

import json
import os
import re
import sys

RUNS = ["ssehub-W1", "nchan-W1", "ssehub-W2", "nchan-W2", "ssehub-W4", "nchan-W4"]

# What known allocation sites are (text only; the sizes come from heaptrack).
SITE_NOTES = [
    (
        "proto/h1/io.rs",
        "hyper's HTTP/1 read buffer (`BytesMut`, sized by hyper's read strategy), kept for the life of the "
        "connection, although an SSE client sends nothing after its request",
    ),
    (
        "conn/auto/mod.rs",
        "hyper's HTTP/1 write buffer for response heads (8 KiB, `Vec::with_capacity`), made when "
        "hyper-util's auto (HTTP/1 or h2) builder has read the preface and kept while the stream lasts",
    ),
    ("server/conn/http1.rs", "hyper's HTTP/1 connection object (boxed)"),
    ("runtime/task/list.rs", "the tokio task holding the whole connection future"),
    ("task/core.rs", "the tokio task holding the connection future (the HTTP state machine and ssehub's stream, inline)"),
    ("io/registration_set.rs", "tokio's registration of the socket with the I/O driver"),
    ("hub/mod.rs", "ssehub's lease on its channels"),
    ("header/map.rs", "the request's header map (`http::HeaderMap`)"),
    ("fast_path.rs", "ssehub's HTTP/1.1 fast path for `GET /events` (request head, connection state)"),
    ("http/events.rs", "ssehub's `/events` handler (parsed query, channel names)"),
    ("http/stream.rs", "ssehub's event stream (cursor, wake-ups, heartbeat timer)"),
    ("hub/wakers.rs", "ssehub's wake-up lists (a slab entry per stream and channel)"),
    ("tokio-stream", "tokio-stream's watch wrapper (a boxed future per stream)"),
    ("sync/watch.rs", "tokio watch receiver"),
]


def read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def percent_lines(text: str):
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        yield line


def dso_shares(prof: str, name: str) -> dict[str, float]:
    shares = {}
    for line in percent_lines(read(os.path.join(prof, f"{name}-dso.txt"))):
        m = re.match(r"\s*([\d.]+)%\s+(\S.*?)\s*$", line)
        if m:
            shares[m.group(2)] = float(m.group(1))
    return shares


def kernel_children(prof: str, name: str) -> dict[str, float]:
    out = {}
    for line in percent_lines(read(os.path.join(prof, f"{name}-kernel.txt"))):
        m = re.match(r"\s*([\d.]+)%\s+([\d.]+)%\s+\[k\]\s+(\S+)", line)
        if m:
            out[m.group(3)] = max(out.get(m.group(3), 0.0), float(m.group(1)))
    return out


def shorten(symbol: str) -> str:
    # Drop generic parameters: a<b<c>>::d -> a<…>::d
    out, depth = [], 0
    for ch in symbol:
        if ch == "<":
            if depth == 0:
                out.append("<…>")
            depth += 1
        elif ch == ">" and depth > 0:
            depth -= 1
        elif depth == 0:
            out.append(ch)
    text = "".join(out)
    return text if len(text) <= 110 else text[:107] + "…"


def user_symbols(prof: str, name: str, limit: int = 14):
    rows = []
    for line in percent_lines(read(os.path.join(prof, f"{name}-symbols.txt"))):
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*?)\s*$", line)
        if not m or m.group(3) == "k":
            continue
        rows.append((float(m.group(1)), m.group(2), shorten(m.group(4))))
    return rows[:limit]


def kernel_symbols(prof: str, name: str, limit: int = 8):
    rows = []
    for line in percent_lines(read(os.path.join(prof, f"{name}-symbols.txt"))):
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*?)\s*$", line)
        if m and m.group(3) == "k":
            rows.append((float(m.group(1)), m.group(4)))
    return rows[:limit]


def loadgen(prof: str, name: str) -> dict | None:
    text = read(os.path.join(prof, f"{name}-loadgen.json"))
    return json.loads(text) if text else None


def fmt(v, digits=1, unit=""):
    return "–" if v is None else f"{v:.{digits}f}{unit}"


def floor_verdict(kernel: float, user: float, half: float) -> str:
    """What ssehub's kernel time per event says about reaching half of nchan's total."""
    if kernel > half:
        return (
            "more than half of nchan's whole cost: the target is out of reach whatever user space does, "
            "unless the kernel's own work per event (a loopback send per client, the wake-ups) shrinks"
        )
    allowed = half - kernel
    if user <= allowed:
        return "below half of nchan's whole cost"
    return (
        "below half of nchan's whole cost, so the target would take cutting ssehub's user space "
        f"from {user:.2f} to at most {allowed:.2f} µs per event ({(1 - allowed / user) * 100:.0f} % less) "
        "with the kernel work unchanged"
    )


def benchmark_cpu(results: str | None, workload: str, server: str) -> float | None:
    """CPU-s per million events of the benchmark's (median) run, if its results are there."""
    if not results:
        return None
    text = read(os.path.join(results, f"{workload}-{server}.json"))
    if not text:
        return None
    return json.loads(text).get("server", {}).get("cpu_s_per_million_events")


def cpu_section(prof: str, results: str | None) -> list[str]:
    present = [n for n in RUNS if os.path.exists(os.path.join(prof, f"{n}-dso.txt"))]
    if not present:
        return []
    data = {}
    for name in present:
        dso = dso_shares(prof, name)
        kernel = sum(v for k, v in dso.items() if k.startswith("[kernel"))
        children = kernel_children(prof, name)
        run = loadgen(prof, name)
        us = run["server"]["cpu_s_per_million_events"] if run else None
        data[name] = {
            "kernel": kernel,
            "user": 100.0 - kernel,
            "syscalls": children.get("do_syscall_64"),
            # ssehub sends with send(2)/sendmsg(2), nginx with writev(2).
            "writev": sum(
                children.get(k) or 0.0 for k in ("do_writev", "vfs_write", "__sys_sendto", "__sys_sendmsg")
            )
            or None,
            "softirq": children.get("handle_softirqs"),
            "epoll": children.get("do_epoll_wait"),
            "us": us,
            "workload": run["args"] if run else None,
        }
    L = ["### CPU: where the time of a delivery goes", ""]
    L.append(
        "`perf record -e cpu-clock -g` on the server process (for nchan: the nginx worker) in the "
        "middle of a W1-, W2- and W4-like run (the load is the benchmark's; perf's own overhead "
        "raises the CPU figures a little, so the benchmark tables above are the reference). Shares "
        "are of the server's CPU samples; kernel rows overlap (the loopback receive work runs inside "
        "the sender's system call). Since CPU-s per million events equals microseconds per event, the "
        "last rows split each event's cost into kernel and user space."
    )
    L.append("")
    header = ["share of server CPU"] + present
    L.append("| " + " | ".join(header) + " |")
    L.append("|---" + "|---:" * len(present) + "|")

    def row(label, key, unit="%", digits=1):
        L.append("| " + label + " | " + " | ".join(fmt(data[n][key], digits, unit) for n in present) + " |")

    row("user space (the server's own code and libraries)", "user")
    row("kernel", "kernel")
    row("  system calls (all)", "syscalls")
    row("  `send`/`sendmsg`/`writev`/`write`: sending events", "writev")
    row("  loopback receive processing (softirq), mostly inside the sends", "softirq")
    row("  `epoll_wait` (idle and wake-ups)", "epoll")
    L.append(
        "| CPU-s per million events during the profile (= µs per event) | "
        + " | ".join(fmt(data[n]["us"], 2) for n in present)
        + " |"
    )
    L.append(
        "| of which kernel (µs per event) | "
        + " | ".join(
            fmt(None if data[n]["us"] is None else data[n]["us"] * data[n]["kernel"] / 100, 2) for n in present
        )
        + " |"
    )
    L.append(
        "| of which user space (µs per event) | "
        + " | ".join(
            fmt(None if data[n]["us"] is None else data[n]["us"] * data[n]["user"] / 100, 2) for n in present
        )
        + " |"
    )
    L.append("")
    for w in ("W1", "W2", "W4"):
        s, n = data.get(f"ssehub-{w}"), data.get(f"nchan-{w}")
        if not s or not n or s["us"] is None or n["us"] is None:
            continue
        s_kernel = s["us"] * s["kernel"] / 100
        s_user = s["us"] * s["user"] / 100
        line = (
            f"- {w}: in the profile run ssehub's kernel work alone is {s_kernel:.2f} µs per event against "
            f"half of nchan's total, {n['us'] / 2:.2f} µs — {floor_verdict(s_kernel, s_user, n['us'] / 2)}. "
            f"ssehub's user space costs {s_user:.2f} µs per event, nchan's {n['us'] * n['user'] / 100:.2f} µs."
        )
        bench_s, bench_n = benchmark_cpu(results, w, "ssehub"), benchmark_cpu(results, w, "nchan")
        if bench_s is not None and bench_n is not None:
            # One profile run is noisier than the benchmark's median: apply its kernel share there.
            b_kernel = bench_s * s["kernel"] / 100
            b_user = bench_s - b_kernel
            line += (
                f" With that kernel share ({s['kernel']:.0f} %) applied to the benchmark's figures above "
                f"({bench_s:.2f} vs {bench_n:.2f}), the kernel work is {b_kernel:.2f} µs against "
                f"{bench_n / 2:.2f} µs — {floor_verdict(b_kernel, b_user, bench_n / 2)}."
            )
        L.append(line)
    L.append("")
    for name in [n for n in present if n.startswith("ssehub")]:
        rows = user_symbols(prof, name)
        if not rows:
            continue
        L.append(f"Top user-space symbols, {name} (self time, % of the server's samples):")
        L.append("")
        L.append("| % | object | symbol |")
        L.append("|---:|---|---|")
        for pct, dso, sym in rows:
            L.append(f"| {pct:.2f} | {dso} | `{sym}` |")
        L.append("")
    for name in [n for n in present if n.startswith("nchan")][:1]:
        rows = user_symbols(prof, name, 8)
        if rows:
            L.append(f"For comparison, top user-space symbols of {name}:")
            L.append("")
            L.append("| % | object | symbol |")
            L.append("|---:|---|---|")
            for pct, dso, sym in rows:
                L.append(f"| {pct:.2f} | {dso} | `{sym}` |")
            L.append("")
    return L


SIZE = re.compile(r"^\s*([\d.]+)([KMGT]?)B?\s+(peak memory )?consumed over (\d+) calls from:?\s*$")
UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
# Frames that only say "memory was allocated": skipped to find who asked for it.
PLUMBING = (
    "/rustc/", "library/std/", "library/alloc/", "library/core/", "/bytes-", "bytes_mut.rs", "alloc.rs", "raw_vec",
)


def meaningful_frames(frames, count=2):
    where = []
    for func, loc in frames:
        if not loc or any(p in loc for p in PLUMBING) or func.startswith("_R"):
            continue
        loc = re.sub(r"^.*?/registry/src/[^/]+/", "", loc)
        where.append(f"`{shorten(func)}` ({loc})")
        if len(where) == count:
            break
    return where


def heap_section(prof: str) -> list[str]:
    text = read(os.path.join(prof, "heaptrack-peaks.txt"))
    clients_text = read(os.path.join(prof, "heaptrack-clients.txt")).strip()
    if not text or not clients_text:
        return []
    clients = int(clients_text)
    lines = text.splitlines()
    try:
        start = lines.index("PEAK MEMORY CONSUMERS")
    except ValueError:
        return []
    subs, cur = [], None
    for line in lines[start + 1 :]:
        if line.isupper() or line.startswith("total runtime"):
            break
        m = SIZE.match(line)
        if m:
            cur = None
            if not m.group(3):  # a call path below an allocation function
                cur = {"bytes": float(m.group(1)) * UNITS[m.group(2)], "calls": int(m.group(4)), "frames": []}
                subs.append(cur)
            continue
        stripped = line.strip()
        if cur is None or not stripped:
            continue
        if stripped.startswith("at "):
            if cur["frames"]:
                cur["frames"][-1][1] = stripped[3:]
        elif not stripped.startswith("in "):
            cur["frames"].append([stripped, ""])
    # Group call paths by the first frame that is not allocation plumbing.
    groups: dict[str, dict] = {}
    for sub in subs:
        where = meaningful_frames(sub["frames"])
        key = where[0] if where else "(allocator)"
        g = groups.setdefault(key, {"bytes": 0.0, "calls": 0, "where": where, "frames": sub["frames"]})
        g["bytes"] += sub["bytes"]
        g["calls"] += sub["calls"]
    sites = []
    for g in groups.values():
        if g["calls"] < clients * 0.9:
            continue
        note = next((n for key, n in SITE_NOTES if g["where"] and key in g["where"][0]), "")
        sites.append((g["bytes"] / clients, g["calls"] / clients, " ← ".join(g["where"]), note))
    if not sites:
        return []
    sites.sort(reverse=True)
    total = sum(s[0] for s in sites)
    L = ["### Memory: ssehub's heap per idle connection", ""]
    L.append(
        f"heaptrack's peak heap consumers with {clients:,} idle clients connected (one channel, "
        "default settings), grouped by the code that asked for the memory and divided by the number "
        "of clients; only sites called about once per connection or more are listed. Heap bytes are "
        "not all resident: pages of a buffer that are never written stay out of RSS, which is why "
        "the W3 figure (RSS) can be lower than the sum."
    )
    L.append("")
    L.append("| heap bytes per connection | allocations per connection | allocated by | what it is |")
    L.append("|---:|---:|---|---|")
    for per, calls, where, note in sites:
        L.append(f"| {per:,.0f} | {calls:.1f} | {where} | {note} |")
    L.append(f"| **{total:,.0f}** | | total of the sites above | |")
    L.append("")
    return L


def main():
    prof = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results", "profile")
    # The benchmark's results sit next to the profile directory (bench/results/W1-ssehub.json, ...).
    results = sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(os.path.abspath(prof))
    L = cpu_section(prof, results) + heap_section(prof)
    print("\n".join(L).rstrip())


if __name__ == "__main__":
    main()
