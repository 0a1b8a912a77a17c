"""The client library from one process against our server, beside the load
client (client/client.py) in the same run: 40 connections ping-pong, and
``increment_many`` of 64 frames; AsyncCounterClient with 40 tasks,
the same under uvloop (requirements-bench.txt), CounterClient with 40 threads
and with 40 greenlets (gevent monkey-patched), each library client with its
default pool (4 connections, shared by its callers).
The server on CPU 0, each client process on CPU 1; alternating runs, median
of --runs.

Usage:
  library.py [--duration SECS] [--runs N]
  library.py --worker MODE --address ADDR --duration SECS --depth N
  library.py -h | --help

Options:
  --duration SECS  Seconds per run. [default: 4]
  --runs N         Runs per client; the median is kept. [default: 3]
  --worker MODE    (internal) one client process: asyncio, uvloop, threads or greenlets.
  --address ADDR   (internal) the server.
  --depth N        (internal) frames per call: 1 is increment(), more increment_many().
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONCURRENCY = 40  # tasks, threads or greenlets, sharing the client's default pool (4 connections)


def worker(mode: str, address: str, duration: float, depth: int) -> dict:
    """One client process: replies acknowledged in ``duration`` seconds."""
    if mode == "greenlets":
        from gevent import monkey

        monkey.patch_all()
    if mode in ("asyncio", "uvloop"):
        return _asyncio(address, duration, depth, mode == "uvloop")
    import threading

    from counter_server.client import CounterClient

    client = CounterClient(address)
    counts = [0] * CONCURRENCY
    deadline = time.monotonic() + duration
    batch = [1] * depth

    def loop(index: int) -> None:
        while time.monotonic() < deadline:
            if depth == 1:
                client.increment()
            else:
                client.increment_many(batch)
            counts[index] += depth

    threads = [threading.Thread(daemon=True, target=loop, args=(i,)) for i in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client.close()
    return {"replies": sum(counts), "seconds": duration}


def _asyncio(address: str, duration: float, depth: int, uvloop: bool = False) -> dict:
    import asyncio

    if uvloop:
        import uvloop as module

        asyncio.set_event_loop_policy(module.EventLoopPolicy())

    from counter_server.client import AsyncCounterClient

    async def main() -> int:
        async with AsyncCounterClient(address) as client:
            deadline = time.monotonic() + duration
            batch = [1] * depth

            async def loop() -> int:
                done = 0
                while time.monotonic() < deadline:
                    if depth == 1:
                        await client.increment()
                    else:
                        await client.increment_many(batch)
                    done += depth
                return done

            return sum(await asyncio.gather(*(loop() for _ in range(CONCURRENCY))))

    return {"replies": asyncio.run(main()), "seconds": duration}


def main() -> int:
    from bench.base import (
        LOAD_CPU,
        OurServer,
        OurServerPythonClient,
        measure,
        options,
        pinned,
        raise_file_limit,
    )

    args, duration, runs = options(__doc__)
    if args["--worker"]:
        print(json.dumps(worker(args["--worker"], args["--address"], float(duration),
                                int(args["--depth"]))))  # fmt: skip
        return 0

    class LibraryClient(OurServer):
        def __init__(self, mode: str) -> None:
            super().__init__(loadgen="")
            self.mode = mode

        def load(self, connections: int, depth: int, seconds: float) -> dict:
            argv = [sys.executable, __file__, "--worker", self.mode, "--address",
                    f"127.0.0.1:{self.port}", "--duration", str(seconds),
                    "--depth", str(depth)]  # fmt: skip
            result = subprocess.run(pinned(LOAD_CPU, argv), capture_output=True, text=True)
            if result.returncode:
                raise SystemExit(f"bench: the {self.mode} client failed: {result.stderr}")
            report = json.loads(result.stdout)
            return {"requests": report["replies"], "rps": report["replies"] / seconds,
                    "p99_ms": 0.0}  # fmt: skip

    raise_file_limit()
    clients = {
        "load client (client.py)": OurServerPythonClient(loadgen=""),
        "AsyncCounterClient, 40 tasks": LibraryClient("asyncio"),
        "AsyncCounterClient, uvloop": LibraryClient("uvloop"),
        "CounterClient, 40 threads": LibraryClient("threads"),
        "CounterClient, 40 greenlets": LibraryClient("greenlets"),
    }
    print(f"server on CPU 0, one client process on CPU 1, {duration}s per run, median of {runs}")
    for shape, depth in (("ping-pong", 1), ("64 per call", 64)):
        results: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(runs):
            for name, client in clients.items():
                results[name].append(
                    measure(client, CONCURRENCY, depth, duration)["replies_per_second"]
                )
        reference = statistics.median(results["load client (client.py)"])
        for name, rates in results.items():
            rate = statistics.median(rates)
            print(f"{shape:<12} {name:<30} {rate:>11,.0f} replies/s  {rate / reference:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
