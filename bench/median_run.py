#!/usr/bin/env python3
"""Keeps the median of a workload's repeated runs, for bench/run-benchmarks.

CPU figures on a virtual machine drift by 15-20 % from one run to the next, so the CPU workloads
run several times, the servers alternating (for the fleet workload F1: the history backends,
memory and redis). For each workload and server (or backend) found, this reads
RESULTS/repeats/<W>-<server>-<round>.json, picks the run with the median CPU-s per million events
(the lower middle one for an even count) and writes it as RESULTS/<W>-<server>.json, adding a
`repeats` section with every run's figures, so the report can show the spread and check every
run's delivery, not only the median one's.

    bench/median_run.py RESULTS W1 W2 W4 F1
"""

import glob
import json
import os
import sys


def summary(path: str, run: dict) -> dict:
    delivery = run.get("delivery", {})
    return {
        "file": os.path.relpath(path),
        "cpu_s_per_million_events": run.get("server", {}).get("cpu_s_per_million_events"),
        "p99_ms": run.get("latency_ms", {}).get("p99"),
        "lost": delivery.get("lost"),
        "duplicates_or_extra": delivery.get("duplicates_or_extra"),
        "out_of_order": delivery.get("out_of_order"),
        "connect_errors": run.get("connect", {}).get("errors"),
        "ok": run.get("ok"),
    }


def round_of(path: str) -> int:
    stem = os.path.splitext(os.path.basename(path))[0]
    return int(stem.rsplit("-", 1)[1])


def sides(results: str, workload: str) -> list[str]:
    """The servers (or backends) with repeated runs of `workload`: the middle of each file name."""
    found = set()
    for path in glob.glob(os.path.join(results, "repeats", f"{workload}-*-*.json")):
        stem = os.path.splitext(os.path.basename(path))[0]
        found.add(stem[len(workload) + 1 :].rsplit("-", 1)[0])
    return sorted(found)


def combine(results: str, workload: str, server: str) -> str | None:
    paths = sorted(glob.glob(os.path.join(results, "repeats", f"{workload}-{server}-*.json")), key=round_of)
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append((path, json.load(f)))
    if not runs:
        return None
    # A run without a CPU figure (it failed early) sorts last: it is never the median of good runs.
    def cpu(item):
        value = item[1].get("server", {}).get("cpu_s_per_million_events")
        return float("inf") if value is None else value

    ordered = sorted(runs, key=cpu)
    chosen_path, chosen = ordered[(len(ordered) - 1) // 2]
    chosen["repeats"] = {
        "of": len(runs),
        "chosen": os.path.relpath(chosen_path),
        "rule": "median CPU-s per million events (lower middle for an even count)",
        "runs": [summary(path, run) for path, run in runs],
    }
    out = os.path.join(results, f"{workload}-{server}.json")
    with open(out, "w") as f:
        json.dump(chosen, f, indent=2, sort_keys=True)
        f.write("\n")
    return out


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    results, workloads = sys.argv[1], sys.argv[2:]
    for workload in workloads:
        for server in sides(results, workload):
            out = combine(results, workload, server)
            if out is not None:
                with open(out) as f:
                    runs = json.load(f)["repeats"]["runs"]
                figures = ", ".join(str(r["cpu_s_per_million_events"]) for r in runs)
                print(f"{workload} {server}: CPU-s per million events {figures} -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
