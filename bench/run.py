"""Side-by-side benchmark: our server against Redis (INCR), same machine, same run.

Each server is pinned to CPU 0 and its load generator to CPU 1 (when taskset
exists). Our server is driven by bench/loadgen.c (C, epoll, built here with cc)
and Redis by redis-benchmark, so the load generator is never the bottleneck;
its CPU is reported too. Runs alternate between the two servers and the median
of --runs is printed, with our ratio to Redis, and written to bench/results.md
and bench/results.png.

Needs: cc (gcc), redis-server and redis-benchmark (Debian: apt-get install
redis-server), matplotlib (pip install -r requirements-bench.txt).

Usage:
  run.py [--duration SECS] [--runs N] [--only NAME]
  run.py -h | --help

Options:
  --duration SECS  Seconds per run. [default: 8]
  --runs N         Runs per scenario and server; the median is kept. [default: 3]
  --only NAME      Run only the scenarios whose name contains NAME.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.base import (
    LOAD_CPU,
    ROOT,
    SERVER_CPU,
    OurServer,
    build_loadgen,
    machine,
    measure,
    median_of,
    need,
    options,
    pinned,
    raise_file_limit,
)

SCENARIOS = (  # name, connections, frames in flight per connection
    ("40 conns ping-pong", 40, 1),
    ("40 conns x 64 in flight", 40, 64),
    ("1 conn ping-pong", 1, 1),
    ("1000 conns ping-pong", 1000, 1),
)


class RedisServer:
    name = "redis"

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.server = need("redis-server", "install it: apt-get install redis-server")
        self.benchmark = need("redis-benchmark", "install it: apt-get install redis-server")
        self.rate_guess: dict[tuple[int, int], float] = {}

    def start(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            pinned(SERVER_CPU, [self.server, "--port", str(self.port), "--bind", "127.0.0.1",
                       "--save", "", "--appendonly", "no", "--maxclients", "20000",
                       "--dir", self.workdir]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(200):
            probe = subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True
            )
            if probe.stdout.strip() == "PONG":
                return
            time.sleep(0.05)
        raise SystemExit("bench: redis-server did not start")

    def load(self, connections: int, depth: int, duration: float) -> dict:
        key = (connections, depth)
        if key not in self.rate_guess:  # redis-benchmark counts requests, not seconds
            self.rate_guess[key] = self._run(connections, depth, 20_000 * depth)["rps"]
        return self._run(connections, depth, int(self.rate_guess[key] * duration))

    def _run(self, connections: int, depth: int, requests: int) -> dict:
        result = subprocess.run(
            pinned(LOAD_CPU, [self.benchmark, "-p", str(self.port), "-t", "incr", "-c",
                              str(connections), "-P", str(depth), "-n",
                              str(max(requests, connections * depth)), "--csv"]),
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        row = result.stdout.strip().splitlines()[-1].replace('"', "").split(",")
        return {"requests": max(requests, connections * depth), "rps": float(row[1]),
                "p99_ms": float(row[6])}  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def free_port() -> int:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


def main() -> int:
    args, duration, runs = options(__doc__)
    scenarios = [s for s in SCENARIOS if not args["--only"] or args["--only"] in s[0]]
    raise_file_limit()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(
            "bench: matplotlib missing: pip install -r requirements-bench.txt"
        ) from None
    workdir = tempfile.mkdtemp(prefix="bench-")
    servers = [OurServer(build_loadgen(workdir)), RedisServer(workdir)]
    where = machine()
    print(f"{where}; {duration}s per run, median of {runs}", flush=True)
    rows = []
    for name, connections, depth in scenarios:
        measured: dict[str, list[dict]] = {s.name: [] for s in servers}
        for _ in range(runs):
            for server in servers:
                measured[server.name].append(measure(server, connections, depth, duration))
        medians = {target: median_of(runs_) for target, runs_ in measured.items()}
        rows.append((name, medians))
        print_row(name, medians)
    write_results(rows, where, duration, runs)
    return 0


COLUMNS = ("replies_per_second", "server_us_per_request", "client_us_per_request", "p99_ms")


def print_row(name: str, medians: dict) -> None:
    ours, redis = medians["ours"], medians["redis"]

    def side(label: str, m: dict) -> str:
        return (
            f"{label} {m['replies_per_second']:>11,.0f}/s {m['server_us_per_request']:6.1f} us/req"
            f" p99 {m['p99_ms']:6.2f} ms"
        )

    rate = ours["replies_per_second"] / redis["replies_per_second"]
    cpu = ours["server_us_per_request"] / redis["server_us_per_request"]
    print(
        f"{name:<26} {side('ours', ours)} | {side('redis', redis)} | ratio {rate:.2f}x replies/s,"
        f" {cpu:.2f}x CPU/req",
        flush=True,
    )


def write_results(rows: list, machine: str, duration: int, runs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "# Benchmark: our server vs Redis INCR",
        "",
        f"`.venv/bin/python bench/run.py --duration {duration} --runs {runs}`, "
        f"{time.strftime('%Y-%m-%d')}; {machine}.",
        "Load: bench/loadgen.c for ours, redis-benchmark for Redis. Median of the runs.",
        "",
        "| scenario | server | replies/s | server CPU µs/request | load-generator CPU µs/request "
        "| p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, medians in rows:
        for target in ("ours", "redis"):
            m = medians[target]
            lines.append(
                f"| {name} | {target} | {m['replies_per_second']:,.0f} | "
                f"{m['server_us_per_request']:.1f} | {m['client_us_per_request']:.1f} | "
                f"{m['p99_ms']:.2f} |"
            )
    lines += ["", "| scenario | ours / Redis replies/s | ours / Redis server CPU per request |",
              "|---|---|---|"]  # fmt: skip
    for name, medians in rows:
        ours, redis = medians["ours"], medians["redis"]
        lines.append(
            f"| {name} | {ours['replies_per_second'] / redis['replies_per_second']:.2f} | "
            f"{ours['server_us_per_request'] / redis['server_us_per_request']:.2f} |"
        )
    (ROOT / "bench" / "results.md").write_text("\n".join(lines) + "\n")

    figure, axis = plt.subplots(figsize=(9, 4.5))
    names = [name for name, _ in rows]
    positions = range(len(names))
    for offset, target in ((-0.2, "ours"), (0.2, "redis")):
        values = [medians[target]["replies_per_second"] for _, medians in rows]
        axis.bar([p + offset for p in positions], values, width=0.4, label=target)
    axis.set_xticks(list(positions), names)
    axis.set_yscale("log")
    axis.set_ylabel("replies/s (log scale)")
    axis.set_title("Counter server vs Redis INCR, server pinned to one CPU")
    axis.legend()
    figure.tight_layout()
    figure.savefig(ROOT / "bench" / "results.png", dpi=100)
    print("wrote bench/results.md and bench/results.png", flush=True)


if __name__ == "__main__":
    sys.exit(main())
