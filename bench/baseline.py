"""How much of a ping-pong request is gevent and how much is our protocol:
bench/echo.py (a bare gevent loop) beside our server, each pinned to CPU 0 and
driven by bench/loadgen.c on CPU 1, 40 connections, one frame in flight;
alternating runs, median of --runs. With --against, also the server of
another checkout (say the commit before a change, from `git worktree add`),
so a change is measured against its parent in the same run. With --redis,
our server (and the other checkout's) keep the counter in a redis-server
started here on CPU 1 beside the load generator (--backend), and our server
with the memory store is measured too, as the reference. With --rate, our
servers (ours and the other checkout's) limit each client to R frames per
second with a burst of --burst (default R): set R above what the run reaches
to measure what the token bucket costs a client it never slows.

Usage:
  baseline.py [--duration SECS] [--runs N] [--depth N] [--against DIR] [--redis]
              [--rate R [--burst B]]
  baseline.py -h | --help

Options:
  --duration SECS  Seconds per run. [default: 8]
  --runs N         Runs per server; the median is kept. [default: 3]
  --depth N        Frames in flight per connection (1: ping-pong). [default: 1]
  --against DIR    Another checkout of this repository (it must know --ready-file).
  --redis          The servers count in Redis (--backend) instead of in memory.
  --rate R         Our servers run with --rate R.
  --burst B        With --rate: their --burst (default: R).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.base import (
    LOAD_CPU,
    ROOT,
    OurServer,
    build_loadgen,
    measure,
    options,
    raise_file_limit,
    start_redis,
    work_folder,
)
from counter_server.common.cli import convert
from counter_server.common.values import positive_int


def main() -> int:
    args, duration, runs = options(__doc__)
    depth = convert(__doc__, "--depth", args["--depth"], positive_int)
    raise_file_limit()
    workdir = work_folder("bench-baseline-")
    loadgen = build_loadgen(workdir)
    redis = start_redis(workdir, LOAD_CPU) if args["--redis"] else None
    backend = ("--backend", redis.url("baseline")) if redis else ()
    if args["--rate"]:
        rate = str(convert(__doc__, "--rate", args["--rate"], positive_int))
        burst = str(convert(__doc__, "--burst", args["--burst"] or rate, positive_int))
        backend = (*backend, "--rate", rate, "--burst", burst)
    servers = {
        "bare gevent loop (bench/echo.py)": OurServer(loadgen, script=ROOT / "bench" / "echo.py"),
        "our server" + (", Redis" if redis else ""): OurServer(loadgen, backend),
    }
    if redis:
        servers["our server, memory"] = OurServer(loadgen)
    if args["--against"]:
        other = Path(args["--against"]).resolve() / "server" / "server.py"
        if not other.is_file():
            raise SystemExit(f"bench: no server/server.py in {args['--against']}")
        name = f"server in {args['--against']}" + (", Redis" if redis else "")
        servers[name] = OurServer(loadgen, backend, script=other)
    results: dict[str, list[dict]] = {name: [] for name in servers}
    try:
        for _ in range(runs):
            for name, server in servers.items():
                results[name].append(measure(server, 40, depth, duration))
    finally:
        if redis:
            redis.kill()
    shape = "ping-pong" if depth == 1 else f"x {depth} frames in flight"
    limited = f", {' '.join(backend[-4:])}" if args["--rate"] else ""
    print(f"40 connections {shape}{limited}, pinned, {duration}s per run, median of {runs}")
    for name, measured in results.items():
        rate = statistics.median(r["replies_per_second"] for r in measured)
        cpu = statistics.median(r["server_us_per_request"] for r in measured)
        print(f"{name:<40} {rate:>9,.0f} replies/s  {cpu:5.1f} us CPU/request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
