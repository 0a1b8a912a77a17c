"""Scaling across cores: our server with --processes 1 and 2 (unpinned, all
cores shared with the C load generator), 40 connections, ping-pong and 64 in
flight; alternating runs, median of --runs. With --against, also the server
of another checkout (the parent commit, from `git worktree add`).

Usage:
  processes.py [--duration SECS] [--runs N] [--against DIR]
  processes.py -h | --help

Options:
  --duration SECS  Seconds per run. [default: 8]
  --runs N         Runs per setting; the median is kept. [default: 3]
  --against DIR    Another checkout of this repository (it must know --ready-file).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.base import OurServer, build_loadgen, measure, options, raise_file_limit, work_folder


def main() -> int:
    args, duration, runs = options(__doc__)
    raise_file_limit()
    workdir = work_folder("bench-processes-")
    loadgen = build_loadgen(workdir)
    settings = {
        f"--processes {n}": OurServer(loadgen, ("--processes", str(n)), pin=False) for n in (1, 2)
    }
    if args["--against"]:
        other = Path(args["--against"]).resolve() / "server" / "server.py"
        if not other.is_file():
            raise SystemExit(f"bench: no server/server.py in {args['--against']}")
        for n in (1, 2):
            settings[f"--processes {n}, {args['--against']}"] = OurServer(
                loadgen, ("--processes", str(n)), pin=False, script=other
            )
    print(f"unpinned, 40 connections, {duration}s per run, median of {runs}", flush=True)
    for name, depth in (("ping-pong", 1), ("64 in flight", 64)):
        results: dict[str, list[dict]] = {n: [] for n in settings}
        for _ in range(runs):
            for n, server in settings.items():
                results[n].append(measure(server, 40, depth, duration))
        for n, measured in results.items():
            rate = statistics.median(r["replies_per_second"] for r in measured)
            cpu = statistics.median(r["server_us_per_request"] for r in measured)
            switches = statistics.median(r["server_switches_per_request"] for r in measured)
            print(
                f"{name:<14} {n}: {rate:>11,.0f} replies/s, {cpu:5.1f} us CPU/request,"
                f" {switches:.2f} context switches/request"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
