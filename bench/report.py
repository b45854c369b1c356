#!/usr/bin/env python3
"""Writes BENCHMARKS.md and the SVG plots from the load generator's JSON results.

    python3 bench/report.py [--results bench/results] [--out BENCHMARKS.md] [--plots bench/plots]

Every figure in the output comes from the JSON files (one per workload and server, written by
bench/run-benchmarks); nothing is typed by hand. Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import glob
import html
import json
import math
import os
import time

SERVERS = ("ssehub", "nchan")
COLORS = {"ssehub": "#c0392b", "nchan": "#2c6fbb"}
WORKLOADS = {
    "W1": "fan-out: one channel, 50 msgs/s, 256-byte payload",
    "W2": "wide fan-out: one channel, 5 msgs/s",
    "W3": "idle capacity: as many idle clients as one process may hold",
    "W4": "per-user channels: each client on its own channel",
    "W5": "max sustainable fan-out: the W1 rate stepped up",
    "W6": "reconnect storm: every client drops and resumes with Last-Event-ID",
}
# The fleet workloads (issue 14): ssehub only, two instances on one Redis; their sides are the
# history backends, not the servers.
FLEET = {
    "F1": "fleet CPU: W1's load over two instances, history backend redis against memory",
    "F2": "instance lost: every client on instance A, A SIGKILLed, each client resumes on B",
}
BACKENDS = ("memory", "redis")
F1_TARGET = 1.3
LATENCY_WORKLOADS = ("W1", "W2", "W4", "W5", "W6")
CPU_WORKLOADS = ("W1", "W2", "W4", "W5", "W6")


# --- loading -------------------------------------------------------------------------------------


def load(results_dir: str):
    runs: dict[str, dict[str, dict]] = {}
    w5: dict[str, list[dict]] = {s: [] for s in SERVERS}
    for path in sorted(glob.glob(os.path.join(results_dir, "W*.json"))):
        with open(path) as f:
            r = json.load(f)
        r["_file"] = os.path.relpath(path)
        labels = r.get("labels", {})
        workload, server = labels.get("workload"), labels.get("server")
        if not workload or server not in SERVERS:
            continue
        if workload == "W5":
            w5[server].append(r)
        else:
            runs.setdefault(workload, {})[server] = r
    for steps in w5.values():
        steps.sort(key=lambda r: r["args"]["rate"])
    run_meta = {}
    meta_path = os.path.join(results_dir, "run.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            run_meta = json.load(f)
    return runs, w5, run_meta


def load_fleet(results_dir: str) -> dict[str, dict[str, dict]]:
    """F*.json by workload and history backend."""
    fleet: dict[str, dict[str, dict]] = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "F*.json"))):
        with open(path) as f:
            r = json.load(f)
        r["_file"] = os.path.relpath(path)
        labels = r.get("labels", {})
        workload, backend = labels.get("workload"), labels.get("backend")
        if workload in FLEET and backend in BACKENDS:
            fleet.setdefault(workload, {})[backend] = r
    return fleet


def w5_passes(r: dict) -> bool:
    d = r["delivery"]
    p99 = r["latency_ms"].get("p99")
    return (
        d["lost"] == 0
        and d["duplicates_or_extra"] == 0
        and d["out_of_order"] == 0
        and r["connect"]["errors"] == 0
        and p99 is not None
        and p99 <= 100.0
    )


def w5_best(steps: list[dict]):
    """The highest passing step below the first failing one, and whether the ramp failed."""
    best = None
    for r in steps:
        if not w5_passes(r):
            return best, True
        best = r
    return best, False


# --- formatting ----------------------------------------------------------------------------------


def num(v, digits=2):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != 0 and abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def ratio(a, b, digits=2):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.{digits}f}"


def get(r: dict | None, *path):
    cur = r
    for key in path:
        if cur is None:
            return None
        if isinstance(cur, dict):
            cur = cur.get(key)
        elif isinstance(cur, list) and isinstance(key, int) and -len(cur) <= key < len(cur):
            cur = cur[key]
        else:
            return None
    return cur


def mib(kib):
    return None if kib is None else kib / 1024.0


def command_of(r: dict) -> str:
    """The load generator's command line, rebuilt from the recorded arguments."""
    a = r["args"]
    parts = ["loadgen", "--mode", a["mode"], "--clients", str(a["clients"]), "--channels", a["channels"]]
    if a["mode"] != "idle":
        parts += ["--rate", num(a["rate"], 0) if a["rate"] >= 1 else str(a["rate"])]
        parts += ["--payload", str(a["payload"])]
        parts += ["--publish", a["publish"]]
    parts += ["--duration", f"{a['duration']:g}", "--sample", str(a["sample"])]
    parts += ["--connect-rate", f"{a['connect_rate']:g}", "--warmup", f"{a['warmup']:g}"]
    if a["mode"] == "resume":
        parts += ["--drop-at", f"{a['drop_at'] if a['drop_at'] is not None else a['duration'] / 2:g}"]
    # Fleet runs: the ports and pids change every run, so they are named, not given.
    if a.get("kill_pid") is not None:
        parts += ["--target", "<A>", "--kill-pid", "<pid of A>", "--resume-target", "<B>"]
    elif "," in a.get("target", ""):
        parts += ["--target", "<A>;<B>"]
    if r["processes"] > 1:
        parts += ["--max-per-process", str(a["max_per_process"])]
    parts += ["--path", f"'{a['path']}'"]
    return " ".join(parts).replace(",", "").replace(";", ",")


# --- tables --------------------------------------------------------------------------------------


def table(rows: list[tuple], header=("", "ssehub", "nchan", "ssehub/nchan")) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        out.append("| " + " | ".join(row) + " |")
    return out


def other_cores(r: dict | None):
    """CPU used in the window by everything but the server and the generator, in cores."""
    busy = get(r, "system", "busy_cpu_s_window")
    if r is None or busy is None:
        return None
    window = r["delivery"]["window_s"] or 1e-9
    return max(0.0, busy - r["server"]["cpu_s"] - r["generator"]["cpu_s_window"]) / window


def metric_rows(runs: dict[str, dict], specs, sides=SERVERS) -> list[tuple]:
    """One row per spec, a column per side; the ratio is the first side over the second (with
    one side, there is no ratio column)."""
    rows = []
    for label, path, digits, with_ratio in specs:
        if path == ("other",):
            values = [other_cores(runs.get(s)) for s in sides]
        else:
            values = [get(runs.get(s), *path) for s in sides]
        cells = [num(v, digits) for v in values]
        if len(sides) == 2:
            cells.append(ratio(values[0], values[1]) if with_ratio else "")
        rows.append((label, *cells))
    return rows


COMMON = [
    ("clients", ("clients",), 0, False),
    ("connected", ("connect", "connected"), 0, False),
    ("connect errors", ("connect", "errors"), 0, False),
    ("messages published", ("delivery", "published"), 0, False),
    ("deliveries expected", ("delivery", "expected"), 0, False),
    ("deliveries received", ("delivery", "received"), 0, False),
    ("lost", ("delivery", "lost"), 0, False),
    ("duplicate or unexpected", ("delivery", "duplicates_or_extra"), 0, False),
    ("out of order (verified connections)", ("delivery", "out_of_order"), 0, False),
    ("verified connections", ("verified", "connections"), 0, False),
    ("delivered events/s", ("delivery", "delivered_per_s"), 0, True),
    ("latency p50 (ms)", ("latency_ms", "p50"), 2, True),
    ("latency p90 (ms)", ("latency_ms", "p90"), 2, True),
    ("latency p99 (ms)", ("latency_ms", "p99"), 2, True),
    ("latency p99.9 (ms)", ("latency_ms", "p999"), 2, True),
    ("latency max (ms)", ("latency_ms", "max"), 2, True),
    ("server CPU (s)", ("server", "cpu_s"), 2, True),
    ("**server CPU-s per million events**", ("server", "cpu_s_per_million_events"), 2, True),
    ("server CPU utilisation (cores)", ("server", "cpu_utilisation"), 2, True),
    ("server RSS idle (KiB)", ("server", "memory_kib", "idle", "rss_kib"), 0, True),
    ("server RSS connected (KiB)", ("server", "memory_kib", "connected", "rss_kib"), 0, True),
    ("server RSS end (KiB)", ("server", "memory_kib", "end", "rss_kib"), 0, True),
    ("**server KiB per connection**", ("server", "kib_per_connection"), 2, True),
    ("generator CPU utilisation (cores)", ("generator", "cpu_utilisation"), 2, False),
    ("generator CPU-s per million events", ("generator", "cpu_s_per_million_events"), 2, False),
    ("other processes (Redis, anything else) in the window (cores)", ("other",), 2, False),
    ("load average at start (1 min)", ("system", "load_average_start", 0), 2, False),
    ("accept-queue overflows (kernel)", ("kernel_tcp", "ListenOverflows"), 0, False),
]

IDLE = [
    ("clients", ("clients",), 0, False),
    ("connected", ("connect", "connected"), 0, False),
    ("connect errors", ("connect", "errors"), 0, False),
    ("client processes", ("processes",), 0, False),
    ("connect phase (s)", ("connect", "phase_s"), 1, True),
    ("open at the end", ("heartbeats", "open_at_end"), 0, False),
    ("clients with a heartbeat in the window", ("heartbeats", "clients_with_heartbeat"), 0, False),
    ("heartbeat window (s)", ("heartbeats", "window_s"), 0, False),
    ("server RSS idle (KiB)", ("server", "memory_kib", "idle", "rss_kib"), 0, True),
    ("server RSS connected (KiB)", ("server", "memory_kib", "connected", "rss_kib"), 0, True),
    ("  of which anonymous (KiB)", ("server", "memory_kib", "connected", "anon_kib"), 0, True),
    ("  of which shared memory (KiB)", ("server", "memory_kib", "connected", "shmem_kib"), 0, True),
    ("**server KiB per connection**", ("server", "kib_per_connection"), 2, True),
    ("projected RSS for 1M clients (GiB)", ("server", "projected_gib_for_1m_clients"), 1, True),
    ("server CPU in the window (s)", ("server", "cpu_s"), 2, True),
    ("other processes in the window (cores)", ("other",), 2, False),
    ("load average at start (1 min)", ("system", "load_average_start", 0), 2, False),
]

RESUME = [
    ("clients", ("clients",), 0, False),
    ("dropped at (s after first publish)", ("resume", "drop_at_s"), 1, False),
    ("published before the drop", ("resume", "published_before_drop"), 0, False),
    ("reconnected", ("resume", "reconnected"), 0, False),
    ("resumed (had every event up to the drop)", ("resume", "resumed"), 0, False),
    ("failed reconnects", ("resume", "failed"), 0, False),
    ("reconnect p50 (ms)", ("resume", "reconnect_ms", "p50"), 1, True),
    ("reconnect p99 (ms)", ("resume", "reconnect_ms", "p99"), 1, True),
    ("**all resumed after (s)**", ("resume", "all_resumed_s"), 2, True),
    ("accept-queue overflows (kernel)", ("kernel_tcp", "ListenOverflows"), 0, False),
    ("SYN cookies sent (kernel)", ("kernel_tcp", "SyncookiesSent"), 0, False),
]


# --- plots ---------------------------------------------------------------------------------------


def svg_header(width, height, title):
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
    ]


def nines(q: float) -> float:
    return 5.0 if q >= 1.0 else min(5.0, -math.log10(1.0 - q))


def latency_plot(series: dict[str, dict[str, dict]], path: str):
    """One panel per workload: latency (log ms) against percentile (log 'nines')."""
    names = [w for w in LATENCY_WORKLOADS if w in series]
    panel_w, panel_h, top, left = 260, 230, 40, 80
    width = max(1, len(names)) * (panel_w + 20) + 20
    height = top + panel_h + 70
    out = svg_header(width, height, "Fan-out latency distribution (publish to client read, sampled connections)")
    values = [
        ms
        for w in names
        for r in series[w].values()
        for _, ms in r["latency_ms"].get("quantiles", [])
        if ms and ms > 0
    ]
    lo = 10 ** math.floor(math.log10(min(values))) if values else 0.1
    hi = 10 ** math.ceil(math.log10(max(values))) if values else 1000
    if hi <= lo:
        hi = lo * 10

    def y_of(ms):
        ms = max(ms, lo)
        return top + panel_h - (math.log10(ms) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * panel_h

    for i, w in enumerate(names):
        x0 = 20 + i * (panel_w + 20) + left - 30
        pw = panel_w - left
        out.append(f'<rect x="{x0}" y="{top}" width="{pw}" height="{panel_h}" fill="none" stroke="#999"/>')
        runs_here = [series[w][s] for s in SERVERS if s in series[w]]
        a = runs_here[0]["args"]
        rates = sorted({r["args"]["rate"] for r in runs_here})
        if len(rates) == 1:
            rate = f"{a['clients']:,} clients, {a['rate']:g} msgs/s"
        else:
            rate = "best steps: " + ", ".join(f"{s} {series[w][s]['args']['rate']:g}" for s in SERVERS if s in series[w]) + " msgs/s"
        out.append(f'<text x="{x0 + pw / 2}" y="{top - 6}" text-anchor="middle">{w}: {html.escape(rate)}</text>')
        decade = lo
        while decade <= hi * 1.0001:
            y = y_of(decade)
            out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + pw}" y2="{y:.1f}" stroke="#eee"/>')
            if i == 0:
                out.append(f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end">{decade:g}</text>')
            decade *= 10
        for n, label in enumerate(["0", "90", "99", "99.9", "99.99", "max"]):
            x = x0 + n / 5 * pw
            out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + panel_h}" stroke="#eee"/>')
            out.append(f'<text x="{x:.1f}" y="{top + panel_h + 14}" text-anchor="middle">{label}</text>')
        for server in SERVERS:
            r = series[w].get(server)
            if not r or not r["latency_ms"].get("quantiles"):
                continue
            pts = " ".join(
                f"{x0 + nines(q) / 5 * pw:.1f},{y_of(ms):.1f}" for q, ms in r["latency_ms"]["quantiles"]
            )
            out.append(f'<polyline points="{pts}" fill="none" stroke="{COLORS[server]}" stroke-width="2"/>')
        if i == 0:
            out.append(
                f'<text x="{x0 - 40}" y="{top + panel_h / 2}" transform="rotate(-90 {x0 - 40} {top + panel_h / 2})" '
                f'text-anchor="middle">latency (ms, log)</text>'
            )
    out.append(f'<text x="{width / 2}" y="{top + panel_h + 32}" text-anchor="middle">percentile</text>')
    for n, server in enumerate(SERVERS):
        x = width / 2 - 80 + n * 110
        y = top + panel_h + 52
        out.append(f'<line x1="{x}" y1="{y - 4}" x2="{x + 24}" y2="{y - 4}" stroke="{COLORS[server]}" stroke-width="3"/>')
        out.append(f'<text x="{x + 30}" y="{y}">{server}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def cpu_plot(series: dict[str, dict[str, dict]], path: str):
    names = [w for w in CPU_WORKLOADS if w in series]
    left, top, plot_h, group_w = 60, 40, 260, 120
    width = left + max(1, len(names)) * group_w + 40
    height = top + plot_h + 70
    out = svg_header(width, height, "Server CPU-seconds per million delivered events (lower is better)")
    values = [get(r, "server", "cpu_s_per_million_events") or 0 for w in names for r in series[w].values()]
    vmax = max(values) if values else 1
    step = 10 ** math.floor(math.log10(vmax)) if vmax > 0 else 1
    while vmax / step > 8:
        step *= 2
    ymax = math.ceil(vmax / step) * step if vmax > 0 else 1
    out.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 20}" y2="{top + plot_h}" stroke="#333"/>')
    tick = 0.0
    while tick <= ymax + 1e-9:
        y = top + plot_h - tick / ymax * plot_h
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 20}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
        tick += step
    for i, w in enumerate(names):
        gx = left + 10 + i * group_w
        for n, server in enumerate(SERVERS):
            v = get(series[w].get(server), "server", "cpu_s_per_million_events")
            if v is None:
                continue
            h = v / ymax * plot_h
            x = gx + n * 48
            out.append(
                f'<rect x="{x}" y="{top + plot_h - h:.1f}" width="44" height="{h:.1f}" fill="{COLORS[server]}"/>'
            )
            out.append(f'<text x="{x + 22}" y="{top + plot_h - h - 4:.1f}" text-anchor="middle">{v:.1f}</text>')
        label = w if w != "W5" else "W5 (best)"
        out.append(f'<text x="{gx + 46}" y="{top + plot_h + 16}" text-anchor="middle">{label}</text>')
    out.append(
        f'<text x="16" y="{top + plot_h / 2}" transform="rotate(-90 16 {top + plot_h / 2})" '
        f'text-anchor="middle">CPU-s per million events</text>'
    )
    for n, server in enumerate(SERVERS):
        x = width / 2 - 80 + n * 110
        y = top + plot_h + 44
        out.append(f'<rect x="{x}" y="{y - 10}" width="14" height="12" fill="{COLORS[server]}"/>')
        out.append(f'<text x="{x + 20}" y="{y}">{server}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


# --- the document --------------------------------------------------------------------------------


def verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("**pass**" if ok else "**miss**")


def clean(r: dict | None) -> bool | None:
    """Whether delivery was perfect: in every run, when the workload was repeated."""
    if r is None:
        return None
    d = r["delivery"]
    ok = d["lost"] == 0 and d["duplicates_or_extra"] == 0 and d["out_of_order"] == 0 and r["connect"]["errors"] == 0
    for run in repeat_runs(r):
        ok = ok and all(run.get(k) == 0 for k in ("lost", "duplicates_or_extra", "out_of_order", "connect_errors"))
    return ok


def repeat_runs(r: dict | None) -> list[dict]:
    """Every run's summary of a repeated workload (bench/median_run.py), else nothing."""
    return get(r, "repeats", "runs") or []


def spread(r: dict | None, key: str, digits=2) -> str:
    """`lo–hi` of one figure over a repeated workload's runs, or '' when it ran once."""
    values = [run.get(key) for run in repeat_runs(r)]
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return ""
    return f"{num(min(values), digits)}–{num(max(values), digits)}"


def spread_note(runs: dict, key: str, lead: str, unit="", sides=SERVERS) -> str:
    """' (LEAD N runs ranged ssehub lo–hi, nchan lo–hi)' for a target row, or ''."""
    parts = [f"{s} {spread(runs.get(s), key)}{unit}" for s in sides if spread(runs.get(s), key)]
    counts = {len(repeat_runs(runs.get(s))) for s in sides if repeat_runs(runs.get(s))}
    if not parts or len(counts) != 1:
        return ""
    return f" ({lead} {counts.pop()} runs ranged {', '.join(parts)})"


def every_run_lines(per: dict, sides=SERVERS) -> list[str]:
    """A repeated workload's figures of every run, under its table."""
    lines = []
    for server in sides:
        runs = repeat_runs(per.get(server))
        if not runs:
            continue
        cpu = ", ".join(num(run.get("cpu_s_per_million_events")) for run in runs)
        p99 = ", ".join(num(run.get("p99_ms")) for run in runs)
        lines.append(f"- {server}, runs in order: CPU-s per million events {cpu}; p99 {p99} ms")
    if lines:
        lines.insert(
            0,
            f"The table shows each {'server' if sides == SERVERS else 'backend'}'s median run by CPU-s "
            "per million events; every run "
            f"({'servers' if sides == SERVERS else 'backends'} alternating, each on a freshly started "
            f"{'server' if sides == SERVERS else 'pair of instances'}):",
        )
        lines.insert(1, "")
        lines.append("")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--results", default=os.path.join(here, "results"))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(here), "BENCHMARKS.md"))
    parser.add_argument("--plots", default=os.path.join(here, "plots"))
    args = parser.parse_args()

    runs, w5, meta = load(args.results)
    fleet = load_fleet(args.results)
    os.makedirs(args.plots, exist_ok=True)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    plot_rel = os.path.relpath(os.path.abspath(args.plots), out_dir)

    # Series for the plots: W5 contributes its best passing step.
    series: dict[str, dict[str, dict]] = {w: dict(v) for w, v in runs.items()}
    w5_best_runs = {}
    w5_failed = {}
    for server in SERVERS:
        best, failed = w5_best(w5[server])
        w5_failed[server] = failed
        if best is not None:
            w5_best_runs[server] = best
    if w5_best_runs:
        series["W5"] = w5_best_runs
    latency_plot(series, os.path.join(args.plots, "latency.svg"))
    cpu_plot(series, os.path.join(args.plots, "cpu_per_million.svg"))

    L: list[str] = []
    L.append("# Benchmarks: ssehub against nchan")
    L.append("")
    L.append(
        "Generated by `bench/report.py` from `bench/results/*.json`, which `bench/run-benchmarks` "
        "writes; do not edit by hand. Every number below comes from those files."
    )
    L.append("")
    L.append(
        "Regenerate everything (build, run W1–W6 against both servers and the fleet workloads F1–F2 "
        "against ssehub, write this file and the plots):"
    )
    L.append("")
    L.append("```sh")
    L.append("bench/run-benchmarks            # full run, about 15 minutes")
    L.append("bench/run-benchmarks --only F1,F2   # only the fleet workloads (issue 14), about 3 minutes")
    L.append("python3 bench/report.py         # only this file and bench/plots/, from the existing results")
    L.append("```")
    L.append("")

    # Machine
    m = meta.get("machine", {})
    v = meta.get("versions", {})
    L.append("## Machine and run")
    L.append("")
    L.append(f"- CPU: {m.get('cpu_model', '?')}, {m.get('nproc', '?')} cores (`nproc`), {m.get('memory_gib', '?')} GiB")
    L.append(f"- OS: {m.get('os', '?')}, kernel {m.get('kernel', '?')}, hard RLIMIT_NOFILE {m.get('rlimit_nofile_hard', '?')}")
    L.append(f"- {v.get('rustc', '?')}; {v.get('nginx', '?')} with nchan {v.get('nchan', '?')} (Debian); {v.get('redis', '?')}")
    L.append(f"- ssehub at `{v.get('ssehub_commit', '?')}`, release profile")
    if meta.get("started_unix"):
        start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(meta["started_unix"]))
        took = (meta.get("finished_unix", meta["started_unix"]) - meta["started_unix"]) / 60
        L.append(f"- run: `{meta.get('command', 'bench/run-benchmarks')}` started {start}, took {took:.1f} minutes")
    la_start, la_end = meta.get("load_average_start"), meta.get("load_average_end")
    others = [
        (f"{w} {s}", other_cores(r))
        for w, per in list(runs.items()) + [("W5", {s: r for s in SERVERS for r in w5[s][:1]})]
        for s, r in per.items()
        if other_cores(r) is not None
    ]
    busiest = max(others, key=lambda x: x[1]) if others else None
    if la_start:
        L.append(
            f"- load average (1/5/15 min) before the run {', '.join(f'{x:.2f}' for x in la_start)}"
            + (f", after it {', '.join(f'{x:.2f}' for x in la_end)} (the run's own load included)" if la_end else "")
        )
    if busiest is not None:
        if busiest[1] > 0.15:
            L.append(
                f"- **other processes were busy during some workloads** (at most {busiest[1]:.2f} cores, in "
                f"{busiest[0]}; this includes Redis for ssehub): see the row \"other processes\" in each table"
            )
        else:
            L.append(
                f"- the machine was otherwise quiet: other processes (Redis included) used at most "
                f"{busiest[1]:.2f} cores in any workload's window"
            )
    L.append("")
    L.append("## Method")
    L.append("")
    L.append(
        "- Each server runs pinned to core 0 (`taskset -c 0`); the load generator (`bench/`, binary "
        "`loadgen`) and Redis are pinned to core 1. ssehub gets events by Redis `PUBLISH`; nchan (one "
        "nginx worker, `worker_rlimit_nofile 20000`, eventsource-only "
        "subscriber location, HTTP publisher location, `nchan_message_buffer_length 1000` like ssehub's "
        "`history.capacity`, listen backlog 16384 like ssehub's, both capped by `net.core.somaxconn`) "
        "gets them by HTTP `POST` on one "
        "keep-alive connection. Both servers are restarted for every workload (W5's steps share one "
        "server per side). nginx runs with `worker_connections 22000`: with 20000 it refused "
        "clients past about 19,100 in W3 (\"worker_connections are not enough\"), as nchan uses "
        "connection slots beyond its sockets; its descriptors stay limited to 20,000 like ssehub's."
    )
    L.append(
        "- Each payload is JSON `{\"s\":<seq>,\"t\":<send time, ns>,\"p\":\"xx…\"}` padded to the "
        "payload size. Clients are raw HTTP/1.1 sockets, spread over several loopback source addresses. "
        "Every client reads each event as it arrives, as a browser does. Most only count `\\ndata:` "
        "markers (memchr) after de-chunking; a sample of connections (all of "
        "them in W6) parses every block and checks order, duplicates, completeness and latency "
        "(latency = client read time − send time, so it includes Redis or the HTTP publish, the server, "
        "and the generator's own queueing)."
    )
    L.append(
        "- Server CPU = utime+stime (+ children) from `/proc/<pid>/stat` of the server processes (nginx: "
        "master + worker) over the window from the first publish until every client has its events (or "
        "the drain timeout); CPU-s per million = that ÷ delivered events. Memory = VmRSS from "
        "`/proc/<pid>/status`; KiB per connection = (RSS after connecting − RSS before any client) ÷ "
        "clients. The generator's own CPU is reported so a reader can tell which side saturated."
    )
    repeated = sorted(w for w, per in runs.items() if any(repeat_runs(r) for r in per.values()))
    if repeated:
        L.append(
            f"- CPU figures on this virtual machine drift by 15–20 % from run to run, so "
            f"{', '.join(repeated)} run several times per server, the servers alternating in every round "
            "(each run on a freshly started server); each side's median run by CPU-s per million events "
            "is reported, with every run's figures under its table. Delivery is checked in every run."
        )
    L.append("")

    # Targets
    L.append("## Targets (issue 6)")
    L.append("")
    rows = []
    # zero loss
    for server in SERVERS:
        checks = []
        for w in ("W1", "W2", "W3", "W4", "W6"):
            c = clean(runs.get(w, {}).get(server))
            if c is not None:
                checks.append((w, c))
        best = w5_best_runs.get(server)
        if best is not None:
            checks.append(("W5", True))
        bad = [w for w, c in checks if not c]
        text = "none in " + ", ".join(w for w, _ in checks) if not bad else "problems in " + ", ".join(bad)
        if server == "ssehub":
            rows.append(("Zero lost, duplicated or reordered events (ssehub)", text, "", verdict(not bad if checks else None)))
        else:
            rows.append(("Zero lost, duplicated or reordered events (nchan, checked alike)", text, "", ""))
    for w in ("W1", "W2", "W4"):
        a = get(runs.get(w, {}).get("ssehub"), "server", "cpu_s_per_million_events")
        b = get(runs.get(w, {}).get("nchan"), "server", "cpu_s_per_million_events")
        ok = None if a is None or b is None else a <= b / 2
        note = spread_note(runs.get(w, {}), "cpu_s_per_million_events", "medians; the")
        rows.append(
            (f"{w}: CPU-s per million events ≤ ½ nchan's", f"{num(a)} vs {num(b)}{note}", ratio(a, b), verdict(ok))
        )
    a = get(runs.get("W3", {}).get("ssehub"), "server", "kib_per_connection")
    b = get(runs.get("W3", {}).get("nchan"), "server", "kib_per_connection")
    r3 = runs.get("W3", {}).get("ssehub")
    established = None
    if r3 is not None:
        established = (
            r3["connect"]["connected"] == r3["clients"]
            and get(r3, "heartbeats", "clients_with_heartbeat") == r3["clients"]
        )
    ok = None if a is None or b is None else a < b and bool(established)
    rows.append(
        (
            "W3: KiB per idle client below nchan's (aim: half), every client established with a heartbeat",
            f"{num(a)} vs {num(b)} KiB; {num(get(r3, 'connect', 'connected'))} of {num(get(r3, 'clients'))} "
            f"established, {num(get(r3, 'heartbeats', 'clients_with_heartbeat'))} with a heartbeat",
            ratio(a, b),
            verdict(ok) + ("" if ok is None or a is None or b is None or a <= b / 2 else " (half: miss)"),
        )
    )
    a = get(w5_best_runs.get("ssehub"), "delivery", "delivered_per_s")
    b = get(w5_best_runs.get("nchan"), "delivery", "delivered_per_s")
    ok = None if a is None or b is None else a >= 2 * b
    suffix = ""
    if not w5_failed.get("ssehub", True) and a is not None:
        suffix = " (ssehub never failed: the ramp's top step, a lower bound)"
    rows.append(("W5: sustainable delivered events/s ≥ 2× nchan's", f"{num(a)} vs {num(b)}{suffix}", ratio(a, b), verdict(ok)))
    for w in ("W1", "W2"):
        a = get(runs.get(w, {}).get("ssehub"), "latency_ms", "p99")
        b = get(runs.get(w, {}).get("nchan"), "latency_ms", "p99")
        note = spread_note(runs.get(w, {}), "p99_ms", "from the median-CPU run; the", " ms")
        rows.append(
            (
                f"{w}: p99 fan-out latency < 20 ms",
                f"{num(a)} ms (nchan {num(b)} ms){note}",
                ratio(a, b),
                verdict(None if a is None else a < 20),
            )
        )
    r6 = runs.get("W6", {}).get("ssehub")
    n6 = runs.get("W6", {}).get("nchan")
    if r6 is not None:
        resumed, clients = get(r6, "resume", "resumed"), r6["clients"]
        secs, lost = get(r6, "resume", "all_resumed_s"), r6["delivery"]["lost"]
        ok = resumed == clients and lost == 0 and secs is not None and secs <= 10
        rows.append(
            (
                "W6: all clients resumed, nothing lost, within 10 s",
                f"{num(resumed)} of {num(clients)} in {num(secs)} s, {num(lost)} lost "
                f"(nchan: {num(get(n6, 'resume', 'resumed'))} in {num(get(n6, 'resume', 'all_resumed_s'))} s, "
                f"{num(get(n6, 'delivery', 'lost'))} lost)",
                ratio(secs, get(n6, "resume", "all_resumed_s")),
                verdict(ok),
            )
        )
    rows += fleet_target_rows(fleet)
    L += table(
        rows,
        header=("target", "measured (ssehub vs nchan)", "ratio ssehub/nchan (fleet: redis/memory)", "result"),
    )
    L.append("")
    saturated = [
        f"{w} {s}"
        for w, per in series.items()
        for s, r in per.items()
        if (get(r, "generator", "cpu_utilisation") or 0) > 0.85
    ]
    if saturated:
        L.append(
            "Load generator near saturation (more than 0.85 of its core) in: "
            + ", ".join(saturated)
            + ". There, latency includes the generator's own queueing; CPU-s per million and memory are unaffected."
        )
        L.append("")

    L.append("## Plots")
    L.append("")
    L.append(f"![latency distribution]({plot_rel}/latency.svg)")
    L.append("")
    L.append(f"![CPU per million events]({plot_rel}/cpu_per_million.svg)")
    L.append("")

    for w, title in WORKLOADS.items():
        L.append(f"## {w} — {title}")
        L.append("")
        if w == "W5":
            L += w5_section(w5, w5_best_runs, w5_failed)
            continue
        per = runs.get(w, {})
        if not per:
            L.append("Not run.")
            L.append("")
            continue
        specs = IDLE if w == "W3" else COMMON
        L += table(metric_rows(per, specs))
        if w == "W6":
            L.append("")
            L += table(metric_rows(per, RESUME))
            L.append("")
            L.append(
                "W6 latency includes the events replayed after the reconnect (they were published "
                "while the client was away), so it is not a fan-out latency."
            )
        L.append("")
        L += every_run_lines(per)
        L.append("Commands (core 1; server on core 0):")
        L.append("")
        for server in SERVERS:
            if server in per:
                L.append(f"- {server}: `{command_of(per[server])}`")
        problems = [f"{s}: {'; '.join(per[s]['problems'])}" for s in SERVERS if s in per and per[s]["problems"]]
        if problems:
            L.append("")
            L.append("Problems reported by the load generator: " + " — ".join(problems))
        L.append("")

    L += fleet_section(fleet, fleet_run_lines(args.results))
    L += schema_section(os.path.join(here, "results-schema"))

    profile = os.path.join(args.results, "profile.md")
    if os.path.exists(profile):
        L.append("## Where ssehub's time and memory go")
        L.append("")
        with open(profile) as f:
            L.append(f.read().rstrip())
        L.append("")

    with open(args.out, "w") as f:
        f.write("\n".join(L) + "\n")


# --- the fleet (issue 14) ------------------------------------------------------------------------


def f1_figures(fleet: dict):
    """F1's CPU-s per million delivered events, redis and memory backends (median runs)."""
    per = fleet.get("F1", {})
    return (
        get(per.get("redis"), "server", "cpu_s_per_million_events"),
        get(per.get("memory"), "server", "cpu_s_per_million_events"),
    )


def f2_figures(r: dict | None):
    """F2's clients, resumed, seconds from the kill until all resumed, lost, duplicated."""
    return (
        get(r, "clients"),
        get(r, "resume", "resumed"),
        get(r, "resume", "kill_to_all_resumed_s"),
        get(r, "delivery", "lost"),
        get(r, "delivery", "duplicates_or_extra"),
    )


def fleet_target_rows(fleet: dict) -> list[tuple]:
    rows = []
    per = fleet.get("F1", {})
    if per:
        redis, memory = f1_figures(fleet)
        delivered = all(clean(per.get(b)) for b in BACKENDS)
        ok = None if redis is None or memory is None else redis <= F1_TARGET * memory and delivered
        note = spread_note(per, "cpu_s_per_million_events", "medians; the", sides=BACKENDS)
        rows.append(
            (
                f"F1 (issue 14): two instances, CPU-s per million delivered events with backend redis "
                f"≤ {F1_TARGET}× memory's, nothing lost",
                f"{num(redis)} vs {num(memory)}{note}; delivery "
                + ("clean in every run" if delivered else "**with problems**"),
                ratio(redis, memory),
                verdict(ok),
            )
        )
    r = fleet.get("F2", {}).get("redis")
    if r is not None:
        clients, resumed, secs, lost, extra = f2_figures(r)
        ok = resumed == clients and lost == 0 and extra == 0 and secs is not None and secs < 10
        rows.append(
            (
                "F2 (issue 14): instance A SIGKILLed, every client resumed on B in under 10 s, "
                "nothing lost or duplicated",
                f"{num(resumed)} of {num(clients)} in {num(secs)} s after the kill, {num(lost)} lost, "
                f"{num(extra)} duplicated",
                "",
                verdict(ok),
            )
        )
    return rows


F2_ROWS = [
    ("clients (all on instance A)", ("clients",), 0, False),
    ("connected", ("connect", "connected"), 0, False),
    ("connect errors", ("connect", "errors"), 0, False),
    ("A killed at (s after first publish)", ("resume", "drop_at_s"), 1, False),
    ("published before the kill", ("resume", "published_before_drop"), 0, False),
    ("messages published", ("delivery", "published"), 0, False),
    ("reconnected to B", ("resume", "reconnected"), 0, False),
    ("resumed on B (had every event up to the kill)", ("resume", "resumed"), 0, False),
    ("failed reconnects", ("resume", "failed"), 0, False),
    ("reconnect p50 (ms after the kill)", ("resume", "reconnect_ms", "p50"), 1, False),
    ("reconnect p99 (ms after the kill)", ("resume", "reconnect_ms", "p99"), 1, False),
    ("resumed p99 (ms after the kill)", ("resume", "resume_ms", "p99"), 1, False),
    ("**all resumed, from the kill (s)**", ("resume", "kill_to_all_resumed_s"), 2, False),
    ("deliveries expected", ("delivery", "expected"), 0, False),
    ("deliveries received", ("delivery", "received"), 0, False),
    ("**lost**", ("delivery", "lost"), 0, False),
    ("**duplicate or unexpected**", ("delivery", "duplicates_or_extra"), 0, False),
    ("out of order", ("delivery", "out_of_order"), 0, False),
    ("verified connections (every client)", ("verified", "connections"), 0, False),
    ("instance B CPU in the window (s)", ("server", "cpu_s"), 2, False),
    ("instance B RSS at the end (KiB)", ("server", "memory_kib", "end", "rss_kib"), 0, False),
    ("generator CPU utilisation (cores)", ("generator", "cpu_utilisation"), 2, False),
    ("other processes (Redis, anything else) in the window (cores)", ("other",), 2, False),
    ("load average at start (1 min)", ("system", "load_average_start", 0), 2, False),
    ("accept-queue overflows (kernel)", ("kernel_tcp", "ListenOverflows"), 0, False),
]


def fleet_run_lines(results_dir: str) -> list[str]:
    """The fleet's own run (run-fleet.json, written by a run of F1/F2 alone), or a pointer to the
    run described at the top."""
    path = os.path.join(results_dir, "run-fleet.json")
    if not os.path.exists(path):
        return ["- Measured in the run described under \"Machine and run\"."]
    with open(path) as f:
        meta = json.load(f)
    lines = []
    v = meta.get("versions", {})
    if meta.get("started_unix"):
        start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(meta["started_unix"]))
        took = (meta.get("finished_unix", meta["started_unix"]) - meta["started_unix"]) / 60
        lines.append(
            f"- Run apart from W1–W6, on the same machine: `{meta.get('command', '?')}` started {start}, "
            f"took {took:.1f} minutes; ssehub at `{v.get('ssehub_commit', '?')}`, {v.get('redis', '?')}"
        )
    la_start, la_end = meta.get("load_average_start"), meta.get("load_average_end")
    if la_start:
        lines.append(
            f"- load average (1/5/15 min) before the run {', '.join(f'{x:.2f}' for x in la_start)}"
            + (f", after it {', '.join(f'{x:.2f}' for x in la_end)} (the run's own load included)" if la_end else "")
        )
    return lines


def schema_section(schema_dir: str) -> list[str]:
    """W1 with order-shaped payloads, without and with a `[[schemas]]` table checking them
    (issue 16): bench/results-schema/{none,schema}/W1-ssehub.json."""
    L = ["## W1 with a JSON Schema — the cost of `[[schemas]]`", ""]
    per = {}
    for side in ("none", "schema"):
        path = os.path.join(schema_dir, side, "W1-ssehub.json")
        if os.path.exists(path):
            with open(path) as f:
                per[side] = json.load(f)
    if len(per) < 2:
        return L + ["Not run (`bench/run-benchmarks --only W1 --servers ssehub --order-payload`, then the same with `--schema`).", ""]
    none, schema = per["none"], per["schema"]
    L.append(
        "W1's load (ssehub only, one run per side, back to back) with 256-byte payloads shaped as "
        "orders (id, customer, status, two timestamps, two items of sku/qty/price) instead of a padded "
        "stamp: without a schema, and with a `[[schemas]]` table checking every channel against "
        "[`bench/order.schema.json`](bench/order.schema.json) (draft 2020-12: required fields, an enum, "
        "two patterns, bounds, `additionalProperties: false`). The schema is checked once per message "
        "received from Redis, not per client: W1 fans each message out to 1,000 clients, so per delivered "
        "event the check costs a thousandth of its own time."
    )
    L.append("")
    rows = [
        ("deliveries received", lambda r: f"{get(r, 'delivery', 'received'):,}"),
        ("lost", lambda r: str(get(r, "delivery", "lost"))),
        ("duplicate or unexpected", lambda r: str(get(r, "delivery", "duplicates_or_extra"))),
        ("latency p99 (ms)", lambda r: num(get(r, "latency_ms", "p99"))),
        ("server CPU (s)", lambda r: num(get(r, "server", "cpu_s"))),
        ("**server CPU-s per million events**", lambda r: num(get(r, "server", "cpu_s_per_million_events"))),
    ]
    L.append("|  | no schema | schema | schema/none |")
    L.append("|---|---:|---:|---:|")
    for label, value in rows:
        cpu = label.startswith("**") or label.startswith("server CPU")
        key = "cpu_s_per_million_events" if "million" in label else "cpu_s"
        rel = ratio(get(schema, "server", key), get(none, "server", key)) if cpu else ""
        L.append(f"| {label} | {value(none)} | {value(schema)} | {rel} |")
    L.append("")
    L.append(f"- load generator: `{command_of(none)} --order-payload`")
    L.append("- runs: `bench/run-benchmarks --only W1 --servers ssehub --order-payload`, then `... --schema`")
    for side in ("none", "schema"):
        path = os.path.join(schema_dir, side, "run.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            run = json.load(f)
        start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(run.get("started_unix", 0)))
        la = run.get("load_average_start") or []
        L.append(
            f"- {side}: started {start}, ssehub at `{get(run, 'versions', 'ssehub_commit')}`, load average "
            f"(1/5/15 min) before it {', '.join(f'{x:.2f}' for x in la)}"
        )
    L.append(
        "- both runs shared the machine with other work (the load averages above): their CPU figures "
        "are above the W1 table's, and only their ratio to each other means something."
    )
    L.append(
        "- one run per side on a VM whose CPU figures drift 15–20 % between runs (see Method): a "
        "difference smaller than that is noise."
    )
    L.append("")
    return L


def fleet_section(fleet: dict, run_lines: list[str]) -> list[str]:
    L = ["## Fleet (issue 14): two ssehub instances on one Redis", ""]
    if not fleet:
        return L + ["Not run (`bench/run-benchmarks --only F1,F2`).", ""]
    L += run_lines
    L.append(
        "- Two ssehub instances, A and B, on one Redis, both pinned to core 0 (the load generator "
        "and Redis on core 1, as above), both started with the same settings as in W1–W6 plus "
        "`history.backend`. With `redis`, events go in only through the gateway's Redis Function, "
        "`FCALL ssehub_publish 1 <channel> <payload>` (one call per message, pipelined like the "
        "`PUBLISH`es); with `memory`, by plain `PUBLISH`. Payloads, rates and checks are W1's and "
        "W6's."
    )
    L.append("")
    for w, title in FLEET.items():
        L.append(f"### {w} — {title}")
        L.append("")
        per = fleet.get(w, {})
        if not per:
            L.append("Not run.")
            L.append("")
            continue
        if w == "F1":
            L.append(
                "Clients alternate between A and B (client i on instance i mod 2); the server CPU "
                "is both instances' together, so the redis backend pays for its reads of Redis on "
                "either instance. The two backends alternate in every round, each on a freshly "
                "started pair of instances; each backend's median run is shown."
            )
            L.append("")
            L += table(metric_rows(per, COMMON, sides=BACKENDS), header=("", "memory (PUBLISH)", "redis (FCALL)", "redis/memory"))
            L.append("")
            L += every_run_lines(per, sides=BACKENDS)
            redis, memory = f1_figures(fleet)
            runs = {b: repeat_runs(per.get(b)) for b in BACKENDS}
            if runs["redis"] and len(runs["redis"]) == len(runs["memory"]):
                by_round = ", ".join(
                    ratio(a.get("cpu_s_per_million_events"), b.get("cpu_s_per_million_events"))
                    for a, b in zip(runs["redis"], runs["memory"])
                )
                L.append(f"Ratio redis/memory of the medians: **{ratio(redis, memory)}**; round by round: {by_round}.")
                L.append("")
        else:
            L.append(
                "All clients read one channel on instance A while events are published. At the "
                "drop time the load generator SIGKILLs A and every client that was connected "
                "reconnects at once to B with its own `Last-Event-ID` (W6's resume machinery; "
                "clients that already saw A's sockets close are included). A client counts as "
                "resumed once it holds every event published before the kill; every client "
                "verifies every event (order, duplicates, completeness) until the end. "
                "\"All resumed\" is timed by the load generator from its `kill(2)` until every client "
                "process reported its clients resumed; the per-client reconnect and resume times count from "
                "the moment the client process got the word (right after the kill)."
            )
            L.append("")
            L += table(metric_rows(per, F2_ROWS, sides=("redis",)), header=("", "backend redis"))
            L.append("")
        L.append("Commands (core 1; both instances on core 0; `<A>`, `<B>`: their addresses):")
        L.append("")
        for b in BACKENDS:
            if b in per:
                L.append(f"- {b}: `{command_of(per[b])}`")
        problems = [f"{b}: {'; '.join(per[b]['problems'])}" for b in BACKENDS if b in per and per[b]["problems"]]
        if problems:
            L.append("")
            L.append("Problems reported by the load generator: " + " — ".join(problems))
        L.append("")
    return L


def w5_section(w5, best_runs, failed) -> list[str]:
    L = []
    rates = sorted({r["args"]["rate"] for s in SERVERS for r in w5[s]})
    if not rates:
        return ["Not run.", ""]
    by_rate = {s: {r["args"]["rate"]: r for r in w5[s]} for s in SERVERS}
    header = ("msgs/s", "ssehub delivered/s", "ssehub p99 ms", "ssehub CPU-s/M", "ssehub", "nchan delivered/s", "nchan p99 ms", "nchan CPU-s/M", "nchan", "generator CPU (ssehub / nchan)")
    rows = []
    for rate in rates:
        row = [num(rate, 0)]
        gens = []
        for s in SERVERS:
            r = by_rate[s].get(rate)
            if r is None:
                row += ["–", "–", "–", "not run"]
                gens.append("–")
                continue
            row += [
                num(r["delivery"]["delivered_per_s"], 0),
                num(r["latency_ms"].get("p99")),
                num(get(r, "server", "cpu_s_per_million_events")),
                "pass" if w5_passes(r) else "**fail**" + (f" ({'; '.join(r['problems'])})" if r["problems"] else " (p99 > 100 ms)"),
            ]
            gens.append(num(get(r, "generator", "cpu_utilisation")))
        row.append(" / ".join(gens))
        rows.append(tuple(row))
    L += table(rows, header=header)
    L.append("")
    for s in SERVERS:
        best = best_runs.get(s)
        if best is None:
            L.append(f"- {s}: no step passed.")
            continue
        note = "" if failed.get(s) else " (no step failed: the highest step run, a lower bound)"
        L.append(
            f"- {s}: highest passing step {num(best['args']['rate'], 0)} msgs/s × {best['clients']:,} clients = "
            f"**{num(best['delivery']['delivered_per_s'], 0)} delivered events/s**{note}"
        )
    a = get(best_runs.get("ssehub"), "delivery", "delivered_per_s")
    b = get(best_runs.get("nchan"), "delivery", "delivered_per_s")
    L.append(f"- ratio ssehub/nchan: {ratio(a, b)}")
    L.append("")
    any_run = next(r for s in SERVERS for r in w5[s])
    L.append(
        f"Each step: `{command_of(any_run)}` with the rate above, on a fresh channel; a step passes when every "
        "event arrived exactly once and in order and p99 ≤ 100 ms; the ramp stops at the first failing step."
    )
    L.append("")
    return L


if __name__ == "__main__":
    main()
