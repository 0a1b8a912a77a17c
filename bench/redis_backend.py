"""Instances sharing a counter in Redis (and, with --etcd, in etcd): one
instance against two, each driven by bench/loadgen.c (40 connections in all),
ping-pong and 64 in flight, and one instance with the memory store as the
reference of the same run; all unpinned on this machine's cores, with
redis-server (no persistence) and the etcd members beside them. Runs
alternate; median of --runs. Prints replies/s, the instances' CPU per reply
and how busy the machine was, and the ratios: Redis backend / memory store,
two instances / one, and etcd / Redis.

Usage:
  redis_backend.py [--duration SECS] [--runs N] [--etcd MEMBERS]
  redis_backend.py -h | --help

Options:
  --duration SECS  Seconds per run. [default: 5]
  --runs N         Runs per setting; the median is kept. [default: 3]
  --etcd MEMBERS   Also an etcd cluster of this many members on loopback.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.base import (
    OurServer,
    build_loadgen,
    options,
    raise_file_limit,
    start_redis,
    work_folder,
)
from counter_server.common.cli import convert
from counter_server.common.values import positive_int
from testing.procinfo import cpu_seconds
from testing.stores import EtcdCluster


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of every CPU so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def run_instances(
    loadgen: str, url: str | None, count: int, depth: int, secs: int
) -> tuple[float, float]:
    """Replies/s of ``count`` instances (on Redis ``url``, or in memory if
    None), and the instances' CPU per reply in microseconds."""
    extra = ("--backend", url) if url else ()
    servers = [OurServer(loadgen, extra, pin=False) for _ in range(count)]
    for server in servers:
        server.start()
    try:
        before = sum(cpu_seconds(s.pid) for s in servers)
        loads = [
            subprocess.Popen(
                [loadgen, "127.0.0.1", str(s.server.port), str(40 // count), str(depth), str(secs)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for s in servers
        ]
        reports = [json.loads(p.communicate()[0]) for p in loads]
        cpu = sum(cpu_seconds(s.pid) for s in servers) - before
        replies = sum(r["replies"] for r in reports)
        return sum(r["replies_per_second"] for r in reports), cpu / max(1, replies) * 1e6
    finally:
        for server in servers:
            server.stop()


def main() -> int:
    args, duration, runs = options(__doc__)
    members = convert(__doc__, "--etcd", args["--etcd"], positive_int) if args["--etcd"] else 0
    raise_file_limit()
    workdir = work_folder("bench-redis-")
    loadgen = build_loadgen(workdir)
    redis = start_redis(workdir)
    etcd = EtcdCluster(workdir, members)
    try:
        print(f"unpinned, 40 connections in all, {duration}s per run, median of {runs}")
        url = redis.url("bench")
        settings = {"memory, 1 instance": (None, 1), "Redis, 1 instance": (url, 1),
                    "Redis, 2 instances": (url, 2)}  # fmt: skip
        if members:
            etcd.start()
            etcd.wait_healthy()
            etcd_url = etcd.url("bench")
            settings.update({"etcd, 1 instance": (etcd_url, 1), "etcd, 2 instances": (etcd_url, 2)})
        for name, depth in (("ping-pong", 1), ("64 in flight", 64)):
            rates: dict[str, list[float]] = {label: [] for label in settings}
            costs: dict[str, list[float]] = {label: [] for label in settings}
            busy: dict[str, list[float]] = {label: [] for label in settings}
            for _ in range(runs):  # alternate, so drift hits every setting alike
                for label, (backend, count) in settings.items():
                    before = machine_busy()
                    rate, cost = run_instances(loadgen, backend, count, depth, duration)
                    after = machine_busy()
                    rates[label].append(rate)
                    costs[label].append(cost)
                    busy[label].append((after[0] - before[0]) / max(1, after[1] - before[1]))
            medians = {label: statistics.median(values) for label, values in rates.items()}
            for label, rate in medians.items():
                load = statistics.median(busy[label])
                cost = statistics.median(costs[label])
                print(
                    f"{name:<14} {label:<20} {rate:>11,.0f} replies/s, {cost:5.1f} us server CPU"
                    f"/reply, machine {load:.0%} busy"
                )
            redis_one, redis_two = medians["Redis, 1 instance"], medians["Redis, 2 instances"]
            print(
                f"{name:<14} Redis / memory {redis_one / medians['memory, 1 instance']:.2f}x, "
                f"2 instances / 1 {redis_two / redis_one:.2f}x"
                + (
                    f", etcd / Redis {medians['etcd, 1 instance'] / redis_one:.2f}x (1 instance),"
                    f" {medians['etcd, 2 instances'] / redis_two:.2f}x (2)"
                    if members
                    else ""
                ),
                flush=True,
            )
    finally:
        redis.kill()
        etcd.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
