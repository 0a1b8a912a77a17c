"""The benchmarks' shared harness: placement on CPUs, CPU and memory
accounting, the C load generator, our server under load, and the common
``--duration``/``--runs`` options. Every script in bench/ builds on it.

Servers are started through ``testing.launcher`` like everywhere else.
"""

from __future__ import annotations

import atexit
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from counter_server.common.cli import convert, parse_args  # noqa: E402
from counter_server.common.values import positive_int  # noqa: E402
from testing.launcher import ServerProcess, start_server  # noqa: E402
from testing.procinfo import children_of, context_switches, cpu_seconds, rss_kib  # noqa: E402
from testing.stores import RedisServer, free_port  # noqa: E402

__all__ = ["ROOT", "rss_kib"]

TASKSET = shutil.which("taskset")
SERVER_CPU, LOAD_CPU = 0, 1  # pinned runs: the server on one core, its load on the other


def work_folder(prefix: str) -> str:
    """A new folder for a run's builds, logs and store data (etcd's alone is
    about 190 MB), removed when the script exits, however it ends."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def options(doc: str) -> tuple[dict, int, int]:
    """Parse ``sys.argv`` against ``doc``: (all options, --duration, --runs)."""
    args = parse_args(doc)
    duration = convert(doc, "--duration", args["--duration"], positive_int)
    runs = convert(doc, "--runs", args["--runs"], positive_int)
    return args, duration, runs


def pinned(cpu: int, argv: Sequence[str]) -> list[str]:
    """``argv`` run on CPU ``cpu`` only (when taskset exists)."""
    return ["taskset", "-c", str(cpu), *argv] if TASKSET else list(argv)


def machine(pinned_run: bool = True) -> str:
    """One line naming the machine and the placement, for every table."""
    placement = "server on CPU 0, load on CPU 1" if TASKSET and pinned_run else "unpinned"
    return (
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}, {placement}"
    )


def children_cpu() -> float:
    """CPU seconds used by this process's finished children (load generators)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tree_total(figure: Callable[[int], float], pid: int) -> float:
    """``figure`` of ``pid`` plus its children's (the workers of --processes)."""
    total = figure(pid)
    for child in children_of(pid):
        try:
            total += figure(child)
        except OSError:
            continue  # exited meanwhile
    return total


def raise_file_limit(needed: int | None = None) -> None:
    """Raise this process's open-file limit (inherited by the servers) to
    ``needed``, or as far as the hard limit allows (up to 65536)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if needed is None:
        needed = min(hard, 65536)
    if hard < needed:
        raise SystemExit(f"bench: the open-file hard limit is {hard}; {needed} needed (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))


def need(tool: str, how: str) -> str:
    """The path of ``tool``, or exit with how to install it."""
    path = shutil.which(tool)
    if path is None:
        raise SystemExit(f"bench: {tool} not found; {how}")
    return path


def build_loadgen(workdir: str) -> str:
    """Compile bench/loadgen.c (a C epoll load generator) into ``workdir``."""
    compiler = shutil.which("cc") or need("gcc", "install a C compiler (apt-get install gcc)")
    binary = os.path.join(workdir, "loadgen")
    subprocess.run([compiler, "-O2", "-o", binary, str(ROOT / "bench" / "loadgen.c")], check=True)
    return binary


def start_redis(workdir: str, cpu: int | None = None, max_clients: int = 20000) -> RedisServer:
    """A redis-server without persistence on a free loopback port (on CPU
    ``cpu`` if given), once it answers PING; stop it with ``kill``."""
    need("redis-server", "install it: apt-get install redis-server")
    redis = RedisServer(workdir, "--maxclients", str(max_clients), durable=False,
                        run_in=pinned(cpu, []) if cpu is not None else ())  # fmt: skip
    redis.start()
    return redis


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM a server the benchmark started, and wait for it."""
    proc.terminate()
    proc.wait(60)


def median_of(runs: Iterable[dict]) -> dict:
    """Each figure's median over the runs."""
    runs = list(runs)
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def build_floor(workdir: str) -> str:
    """Compile bench/floor.c (the minimal C server, the physical floor) into
    ``workdir`` and check its checksums against the xxhash package."""
    import xxhash

    compiler = shutil.which("cc") or need("gcc", "install a C compiler (apt-get install gcc)")
    binary = os.path.join(workdir, "floor")
    subprocess.run([compiler, "-O2", "-o", binary, str(ROOT / "bench" / "floor.c")], check=True)
    numbers = ["0", "1", "9", "10", "42", "65535", "4294967296", "18446744073709551615"]
    printed = subprocess.run([binary, "--checksum", *numbers], capture_output=True, text=True,
                             check=True).stdout.split()  # fmt: skip
    if printed != [xxhash.xxh64_hexdigest(n.encode()) for n in numbers]:
        raise SystemExit(f"bench: {binary} computes wrong checksums: {printed}")
    return binary


class LoadgenLoad:
    """Load from the C load generator against ``self.port``."""

    loadgen: str
    pin: bool = True

    def load(self, connections: int, depth: int, duration: float) -> dict:
        import json

        argv = [self.loadgen, "127.0.0.1", str(self.port), str(connections), str(depth),
                str(duration)]  # fmt: skip
        result = subprocess.run(
            pinned(LOAD_CPU, argv) if self.pin else argv,
            capture_output=True,
            text=True,
            check=False,
        )
        report = json.loads(result.stdout)
        if report["errors"]:
            raise SystemExit(f"bench: loadgen saw {report['errors']} errors: {result.stderr}")
        return {"requests": report["replies"], "rps": report["replies_per_second"],
                "p99_ms": report["p99_us"] / 1000}  # fmt: skip


class OurServer(LoadgenLoad):
    """Our server (or a stand-in script speaking its ready file) driven by
    the C load generator."""

    def __init__(
        self,
        loadgen: str,
        extra: Sequence[str] = (),
        pin: bool = True,
        script: Path | None = None,
        name: str = "ours",
    ) -> None:
        self.loadgen, self.extra, self.pin, self.script = loadgen, list(extra), pin, script
        self.name = name
        self.server: ServerProcess | None = None

    def start(self) -> None:
        self.server = start_server(
            "--multiplier", "1100", "--log-level", "warning", *self.extra,
            script=self.script, prefix=pinned(SERVER_CPU, []) if self.pin else (),
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.server.pid

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self) -> None:
        self.server.stop(30)


class OurServerPythonClient(OurServer):
    """Our server driven by our own Python client (client/client.py), pinned
    like the load generator: what one client process costs per request."""

    def load(self, connections: int, depth: int, duration: float) -> dict:
        import json

        multiplier = max(1, round(connections / (os.cpu_count() or 1)))
        argv = [sys.executable, str(ROOT / "client" / "client.py"), "--serverAddress",
                f"127.0.0.1:{self.port}", "--multiplier", str(multiplier), "--pipeline",
                str(depth), "--duration", str(duration), "--json"]  # fmt: skip
        result = subprocess.run(pinned(LOAD_CPU, argv), capture_output=True, text=True)
        report = json.loads(result.stdout)
        if report["errors_total"]:
            raise SystemExit(f"bench: the Python client saw errors: {report['errors']}")
        return {"requests": report["requests_acknowledged"],
                "rps": report["replies_per_second"],
                "p99_ms": report["latency_us"]["p99"] / 1000}  # fmt: skip


class FloorServer(LoadgenLoad):
    """bench/floor.c, the minimal C epoll server, driven by the load generator."""

    name = "floor"

    def __init__(self, loadgen: str, floor: str) -> None:
        self.loadgen, self.floor = loadgen, floor

    def start(self) -> None:
        import socket
        import time

        self.port = free_port()
        self.proc = subprocess.Popen(pinned(SERVER_CPU, [self.floor, str(self.port)]),
                                     stdout=subprocess.DEVNULL)  # fmt: skip
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("bench: the floor server did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)


def measure(server, connections: int, depth: int, duration: float) -> dict:
    """Start ``server``, load it, stop it: replies/s, server and load CPU
    per request, the server's context switches per request, p99 latency."""
    import time

    server.start()
    try:
        time.sleep(0.5)
        before_server, before_client = tree_total(cpu_seconds, server.pid), children_cpu()
        before_switches = tree_total(context_switches, server.pid)
        result = server.load(connections, depth, duration)
        server_cpu = tree_total(cpu_seconds, server.pid) - before_server
        client_cpu = children_cpu() - before_client
        switches = tree_total(context_switches, server.pid) - before_switches
    finally:
        server.stop()
    n = result["requests"]
    return {
        "replies_per_second": result["rps"],
        "server_us_per_request": server_cpu / n * 1e6,
        "client_us_per_request": client_cpu / n * 1e6,
        "server_switches_per_request": switches / n,
        "p99_ms": result["p99_ms"],
    }
