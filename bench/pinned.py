"""Pinned throughput run: our server on one CPU, our load client on another.

Prints replies/s, server CPU per request (user+sys from /proc/PID/stat) and the
client's CPU per request, for each scenario. With --metrics every scenario also
runs with the metrics endpoint on and scraped once a second, alternating with
metrics off, so the overhead is measured side by side. Figures are for
orientation on a shared machine: compare rows of one run, not separate runs.

Usage:
  pinned.py [--duration SECS] [--connections N] [--runs N] [--metrics] [--timeouts-off]
            [--fsync-modes]
  pinned.py -h | --help

Options:
  --duration SECS    Seconds per scenario run. [default: 10]
  --connections N    Client connections (the Go original's default on 2 CPUs is 40). [default: 40]
  --runs N           Runs per scenario; the median is printed. [default: 3]
  --metrics          Also run each scenario with /metrics on and scraped every second.
  --timeouts-off     Also run each scenario with --idle/--frame/--write-timeout 0.
  --fsync-modes      Also run each scenario with --state-file and --fsync always,
                     everysec and no; prints state-file commits and batches per commit.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.base import LOAD_CPU, SERVER_CPU, TASKSET, options, pinned
from counter_server.common.cli import convert, cpu_count
from counter_server.common.values import positive_int
from testing.launcher import start_server
from testing.procinfo import cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = (("ping-pong", 1), ("64 in flight", 64))


def scrape_every_second(url: str, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        with urllib.request.urlopen(url, timeout=5) as response:
            response.read()


def final_metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        lines = response.read().decode().splitlines()
    return {
        line.split()[0]: float(line.split()[1])
        for line in lines
        if line.startswith("counter_server_") and "{" not in line
    }


def run_once(pipeline: int, duration: float, connections: int, variant: tuple) -> dict:
    _, extra_args, metrics = variant
    with tempfile.TemporaryDirectory() as tmp:
        server_args = ["--multiplier", "50", *(a.replace("{tmp}", tmp) for a in extra_args)]
        state = "--state-file" in extra_args
        if metrics or state:
            server_args += ["--metrics-port", "0"]
        server = start_server(*server_args, prefix=pinned(SERVER_CPU, []))
        try:
            stop_scraping = threading.Event()
            url = server.metrics_url() if metrics or state else ""
            if metrics:
                threading.Thread(
                    daemon=True, target=scrape_every_second, args=(url, stop_scraping)
                ).start()
            result = measure(server.pid, server.port, pipeline, duration, connections)
            stop_scraping.set()
            if state:
                figures = final_metrics(url)
                commits = figures["counter_server_state_commits_total"]
                result["commits_per_second"] = commits / duration
                batches = figures["counter_server_state_batches_committed_total"]
                result["frames_per_commit"] = figures[
                    "counter_server_requests_applied_total"
                ] / max(commits, 1)
                result["reads_per_commit"] = batches / max(commits, 1)
        finally:
            server.stop(30)
    return result


def measure(server_pid: int, port: int, pipeline: int, duration: float, connections: int) -> dict:
    # The client opens NumCPU x multiplier connections, NumCPU being the CPUs it may use.
    client_cpus = 1 if TASKSET else cpu_count()
    multiplier = max(1, connections // client_cpus)
    before_server = cpu_seconds(server_pid)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = subprocess.run(
        pinned(LOAD_CPU, [sys.executable, str(ROOT / "client/client.py"), "--serverAddress",
                   f"127.0.0.1:{port}", "--duration", str(duration), "--pipeline",
                   str(pipeline), "--multiplier", str(multiplier), "--json"]),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    server_cpu = cpu_seconds(server_pid) - before_server
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    report = json.loads(client.stdout)
    n = report["requests_acknowledged"]
    return {
        "replies_per_second": report["replies_per_second"],
        "server_us_per_request": server_cpu / n * 1e6,
        "client_us_per_request": client_cpu / n * 1e6,
        "p99_ms": report["latency_us"]["p99"] / 1000,
        "errors": report["errors_total"],
        "connections": report["connections"],
    }


def main() -> int:
    args, duration, runs = options(__doc__)
    connections = convert(__doc__, "--connections", args["--connections"], positive_int)
    # (label, extra server flags, scrape /metrics every second)
    variants = [("defaults", [], False)]
    if args["--metrics"]:
        variants.append(("metrics on, scraped 1/s", [], True))
    if args["--timeouts-off"]:
        off = ["--idle-timeout", "0", "--frame-timeout", "0", "--write-timeout", "0"]
        variants.append(("timeouts off", off, False))
    if args["--fsync-modes"]:
        for mode in ("always", "everysec", "no"):
            state = ["--state-file", "{tmp}/counter.state", "--fsync", mode]
            variants.append((f"fsync {mode}", state, False))
    placement = "server on CPU 0, client on CPU 1" if TASKSET else "unpinned"
    print(f"{placement}; {duration}s per run, median of {runs}")
    header = f"{'scenario':<36}{'conns':>6}{'replies/s':>12}{'server us/req':>15}"
    print(header + f"{'client us/req':>15}{'p99 ms':>9}{'errors':>8}")
    for name, pipeline in SCENARIOS:
        results: list[list[dict]] = [[] for _ in variants]
        for _ in range(runs):  # alternate the variants so drift hits them alike
            for i, variant in enumerate(variants):
                results[i].append(run_once(pipeline, duration, connections, variant))
        for variant, measured in zip(variants, results, strict=True):
            med = {k: statistics.median(r[k] for r in measured) for k in measured[0]}
            label = f"{name}, {variant[0]}"
            print(
                f"{label:<36}{int(med['connections']):>6}{med['replies_per_second']:>12,.0f}"
                f"{med['server_us_per_request']:>15.1f}{med['client_us_per_request']:>15.1f}"
                f"{med['p99_ms']:>9.2f}{int(med['errors']):>8}"
                + (
                    f"   commits/s {med['commits_per_second']:,.0f}, frames/commit "
                    f"{med['frames_per_commit']:,.1f}, reads/commit {med['reads_per_commit']:.1f}"
                    if "commits_per_second" in med
                    else ""
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
