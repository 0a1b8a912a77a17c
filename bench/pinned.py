"""Pinned throughput run: our server on one CPU, our load client on another.

Prints replies/s, server CPU per request (user+sys from /proc/PID/stat) and the
client's CPU per request, for each scenario. Figures are for orientation on a
shared machine: compare rows of the same run, not runs of different days.

Usage:
  pinned.py [--duration SECS] [--connections N] [--runs N]
  pinned.py -h | --help

Options:
  --duration SECS    Seconds per scenario run. [default: 10]
  --connections N    Client connections (the Go original's default on 2 CPUs is 40). [default: 40]
  --runs N           Runs per scenario; the median is printed. [default: 3]
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.cli import convert, cpu_count, parse_args, positive_int  # noqa: E402

SCENARIOS = (("ping-pong", 1), ("64 in flight", 64))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def pinned(cpu: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if shutil.which("taskset") else argv


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def run_once(pipeline: int, duration: float, connections: int) -> dict:
    with tempfile.TemporaryFile("w+") as out:
        return _run_once(out, pipeline, duration, connections)


def _run_once(out, pipeline: int, duration: float, connections: int) -> dict:
    # The client opens NumCPU x multiplier connections, NumCPU being the CPUs it may use.
    client_cpus = 1 if shutil.which("taskset") else cpu_count()
    multiplier = max(1, connections // client_cpus)
    server = subprocess.Popen(
        pinned(0, [sys.executable, str(ROOT / "server/server.py"), "--host", "127.0.0.1",
                   "--port", "0", "--log-level", "warning", "--multiplier", "50"]),
        stdout=out, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port = None
        for _ in range(200):
            out.seek(0)
            match = re.search(r"listening on \S+:(\d+)", out.read())
            if match:
                port = match[1]
                break
            time.sleep(0.05)
        if port is None:
            raise SystemExit("the server did not start")
        before_server = cpu_seconds(server.pid)
        before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
        client = subprocess.run(
            pinned(1, [sys.executable, str(ROOT / "client/client.py"), "--serverAddress",
                       f"127.0.0.1:{port}", "--duration", str(duration), "--pipeline",
                       str(pipeline), "--multiplier", str(multiplier), "--json"]),
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        server_cpu = cpu_seconds(server.pid) - before_server
        after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    report = json.loads(client.stdout)
    client_cpu = (after_children.ru_utime + after_children.ru_stime) - (
        before_children.ru_utime + before_children.ru_stime
    )
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
    args = parse_args(__doc__)
    duration = convert(__doc__, "--duration", args["--duration"], positive_int)
    connections = convert(__doc__, "--connections", args["--connections"], positive_int)
    runs = convert(__doc__, "--runs", args["--runs"], positive_int)
    placement = "server on CPU 0, client on CPU 1" if shutil.which("taskset") else "unpinned"
    print(f"{placement}; {duration}s per run, median of {runs}")
    header = f"{'scenario':<14}{'conns':>6}{'replies/s':>12}{'server us/req':>15}"
    print(header + f"{'client us/req':>15}{'p99 ms':>9}{'errors':>8}")
    for name, pipeline in SCENARIOS:
        results = [run_once(pipeline, duration, connections) for _ in range(runs)]
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        print(
            f"{name:<14}{int(med['connections']):>6}{med['replies_per_second']:>12,.0f}"
            f"{med['server_us_per_request']:>15.1f}{med['client_us_per_request']:>15.1f}"
            f"{med['p99_ms']:>9.2f}{int(med['errors']):>8}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
