"""Instances sharing a counter in Redis: one instance against two, each driven
by bench/loadgen.c (40 connections in all), ping-pong and 64 in flight; all
unpinned on this machine's cores, with redis-server (no persistence) beside
them. Median of --runs.

Usage:
  redis_backend.py [--duration SECS] [--runs N]
  redis_backend.py -h | --help

Options:
  --duration SECS  Seconds per run. [default: 5]
  --runs N         Runs per setting; the median is kept. [default: 3]
"""

from __future__ import annotations

import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.base import OurServer, build_loadgen, options, raise_file_limit
from bench.run import free_port


def run_instances(loadgen: str, workdir: str, url: str, count: int, depth: int, secs: int) -> float:
    servers = [OurServer(loadgen, ("--backend", url), pin=False) for _ in range(count)]
    for server in servers:
        server.start()
    try:
        loads = [
            subprocess.Popen(
                [loadgen, "127.0.0.1", str(s.server.port), str(40 // count), str(depth), str(secs)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for s in servers
        ]
        return sum(json.loads(p.communicate()[0])["replies_per_second"] for p in loads)
    finally:
        for server in servers:
            server.stop()


def main() -> int:
    _, duration, runs = options(__doc__)
    redis = shutil.which("redis-server")
    if redis is None:
        raise SystemExit("bench: redis-server not found; apt-get install redis-server")
    raise_file_limit()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    loadgen = build_loadgen(workdir)
    port = free_port()
    server = subprocess.Popen(
        [redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)
    try:
        print(f"unpinned, 40 connections in all, {duration}s per run, median of {runs}")
        for name, depth in (("ping-pong", 1), ("64 in flight", 64)):
            for count in (1, 2):
                rates = [
                    run_instances(loadgen, workdir, f"redis://127.0.0.1:{port}/0?key=bench",
                                  count, depth, duration)
                    for _ in range(runs)
                ]  # fmt: skip
                print(
                    f"{name:<14} {count} instance(s): {statistics.median(rates):>11,.0f} replies/s"
                )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
