"""Side-by-side benchmark: our server against Redis (INCR) and the physical
floor (bench/floor.c, a minimal C epoll server), same machine, same run.

Each server is pinned to CPU 0 and its load generator to CPU 1 (when taskset
exists). Our server is driven by bench/loadgen.c (C, epoll, built here with cc)
and Redis by redis-benchmark, so the load generator is never the bottleneck;
its CPU is reported too. The 40-connection ping-pong scenario also measures
our server driven by our Python client (its CPU in the load column) and our
server with --processes 2 (all its processes on CPU 0). Runs alternate
between the targets and the median of --runs is printed, with our ratios to
Redis and to the floor, and written as results.md (and results.png when
matplotlib is installed) to a new folder under bench/out/ (not tracked; the
path is printed at the end), or over the committed bench/results.md and
results.png with --update.

Needs: cc (gcc), redis-server and redis-benchmark (Debian: apt-get install
redis-server); for the chart, matplotlib (pip install -r requirements-bench.txt).

Usage:
  run.py [--duration SECS] [--runs N] [--only NAME] [--update]
  run.py -h | --help

Options:
  --duration SECS  Seconds per run. [default: 8]
  --runs N         Runs per scenario and server; the median is kept. [default: 3]
  --only NAME      Run only the scenarios whose name contains NAME.
  --update         Write over the committed bench/results.md and results.png.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.base import (
    LOAD_CPU,
    ROOT,
    SERVER_CPU,
    FloorServer,
    OurServer,
    OurServerPythonClient,
    build_floor,
    build_loadgen,
    machine,
    measure,
    median_of,
    need,
    options,
    pinned,
    raise_file_limit,
    start_redis,
    work_folder,
)

SCENARIOS = (  # name, connections, frames in flight per connection
    ("40 conns ping-pong", 40, 1),
    ("40 conns x 64 in flight", 40, 64),
    ("1 conn ping-pong", 1, 1),
    ("1000 conns ping-pong", 1000, 1),
)
# Targets measured in every scenario, and the extra ones measured only in the
# first (they compare with "ours" in the same run).
EVERYWHERE = ("ours", "redis", "floor")
EXTRA_IN = {"40 conns ping-pong": ("ours, Python client", "ours, --processes 2")}


class RedisServer:
    name = "redis"

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.benchmark = need("redis-benchmark", "install it: apt-get install redis-server")
        self.rate_guess: dict[tuple[int, int], float] = {}

    def start(self) -> None:
        self.redis = start_redis(self.workdir, SERVER_CPU)
        self.port = self.redis.port

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
        return self.redis.proc.pid

    def stop(self) -> None:
        self.redis.kill()


def main() -> int:
    args, duration, runs = options(__doc__)
    scenarios = [s for s in SCENARIOS if not args["--only"] or args["--only"] in s[0]]
    raise_file_limit()
    workdir = work_folder("bench-")
    loadgen = build_loadgen(workdir)
    targets = {
        "ours": OurServer(loadgen),
        "redis": RedisServer(workdir),
        "floor": FloorServer(loadgen, build_floor(workdir)),
        "ours, Python client": OurServerPythonClient(loadgen, name="ours, Python client"),
        "ours, --processes 2": OurServer(loadgen, ("--processes", "2"),
                                         name="ours, --processes 2"),
    }  # fmt: skip
    where = machine()
    print(f"{where}; {duration}s per run, median of {runs}", flush=True)
    rows = []
    for name, connections, depth in scenarios:
        chosen = [targets[t] for t in EVERYWHERE + EXTRA_IN.get(name, ())]
        measured: dict[str, list[dict]] = {t.name: [] for t in chosen}
        for _ in range(runs):  # alternate, so a slow spell of the host hits every target
            for target in chosen:
                measured[target.name].append(measure(target, connections, depth, duration))
        medians = {target: median_of(runs_) for target, runs_ in measured.items()}
        rows.append((name, medians))
        print_rows(name, medians)
    write_results(rows, where, duration, runs, output_folder(args["--update"]))
    return 0


def ratios(name: str, medians: dict) -> tuple[float, float, float] | None:
    """Target ``name`` against Redis and the floor of the same scenario:
    replies/s / Redis's, CPU per request / Redis's, CPU per request / the floor's
    (None for Redis and the floor themselves)."""
    if name in ("redis", "floor"):
        return None
    m, redis, floor = medians[name], medians["redis"], medians["floor"]
    cpu = m["server_us_per_request"]
    return (
        m["replies_per_second"] / redis["replies_per_second"],
        cpu / redis["server_us_per_request"],
        cpu / floor["server_us_per_request"],
    )


def print_rows(scenario: str, medians: dict) -> None:
    for target, m in medians.items():
        against = ratios(target, medians)
        versus = ""
        if against is not None:
            versus = (
                f" | vs redis {against[0]:.2f}x replies/s, {against[1]:.2f}x CPU/req;"
                f" vs floor {against[2]:.1f}x CPU/req"
            )
        print(
            f"{scenario:<24} {target:<20} {m['replies_per_second']:>11,.0f}/s"
            f" server {m['server_us_per_request']:6.1f} us/req"
            f" {m['server_switches_per_request']:5.2f} switches/req"
            f" load {m['client_us_per_request']:6.1f} us/req"
            f" p99 {m['p99_ms']:6.2f} ms{versus}",
            flush=True,
        )


def output_folder(update: bool) -> Path:
    """bench/ itself with --update, else a new bench/out/<time>/ (untracked)."""
    if update:
        return ROOT / "bench"
    folder = ROOT / "bench" / "out" / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_results(rows: list, machine: str, duration: int, runs: int, folder: Path) -> None:
    lines = [
        "# Benchmark: our server vs Redis INCR and the C floor",
        "",
        f"`.venv/bin/python bench/run.py --duration {duration} --runs {runs}`, "
        f"{time.strftime('%Y-%m-%d')}; {machine}.",
        "Load: bench/loadgen.c for ours and the floor (bench/floor.c, a minimal C epoll server",
        "speaking the protocol), redis-benchmark for Redis, our client/client.py where named.",
        "Median of the runs; the load column is the load generator's (or client's) CPU.",
        "",
        "| scenario | server | replies/s | server CPU µs/request | server context switches"
        "/request | load CPU µs/request | p99 ms | ours / Redis replies/s | ours / Redis CPU "
        "| ours / floor CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, medians in rows:
        for target, m in medians.items():
            against = ratios(target, medians)
            versus = "| | |"
            if against is not None:
                versus = f"{against[0]:.2f} | {against[1]:.2f} | {against[2]:.1f} |"
            lines.append(
                f"| {name} | {target} | {m['replies_per_second']:,.0f} | "
                f"{m['server_us_per_request']:.1f} | {m['server_switches_per_request']:.2f} | "
                f"{m['client_us_per_request']:.1f} | "
                f"{m['p99_ms']:.2f} | {versus}"
            )
    (folder / "results.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
    except ImportError:
        print(f"wrote {folder / 'results.md'} (no chart: pip install -r requirements-bench.txt)",
              flush=True)  # fmt: skip
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4.5))
    names = [name for name, _ in rows]
    positions = range(len(names))
    for offset, target in ((-0.27, "ours"), (0.0, "redis"), (0.27, "floor")):
        values = [medians[target]["replies_per_second"] for _, medians in rows]
        axis.bar([p + offset for p in positions], values, width=0.27, label=target)
    axis.set_xticks(list(positions), names)
    axis.set_yscale("log")
    axis.set_ylabel("replies/s (log scale)")
    axis.set_title("Counter server vs Redis INCR and a C floor, server pinned to one CPU")
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / "results.png", dpi=100)
    print(f"wrote {folder / 'results.md'} and {folder / 'results.png'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
