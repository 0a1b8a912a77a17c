"""Memory per connection: 10,000 concurrent connections to our server, to the
bare gevent loop of bench/echo.py (a greenlet and a gevent socket, nothing
else) and to Redis, each having made one request, and the server's RSS
before and after.

Needs a file-descriptor limit above the connection count for this process and
the servers (raised here up to the hard limit; as root, `ulimit -Hn 65536`
first if the hard limit is lower), and redis-server (apt-get install redis-server).

With --never-read, each of our connections instead pipelines frames and never
reads a reply, until the server is blocked writing to it (ours only: the
question is what such a client costs us).

Usage:
  memory.py [--connections N] [--never-read]
  memory.py -h | --help

Options:
  --connections N  Concurrent connections to hold open. [default: 10000]
  --never-read     Clients that pipeline and never read their replies.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.base import raise_file_limit, rss_kib, start_redis, work_folder
from counter_server.common.cli import convert, cpu_count, parse_args
from counter_server.common.values import positive_int
from counter_server.protocol import REPLY_SIZE, encode_request
from testing.launcher import start_server

PING = b"*1\r\n$4\r\nPING\r\n"


def hold(port: int, count: int, request: bytes, reply_size: int) -> list[socket.socket]:
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(request)
        got = b""
        while len(got) < reply_size:
            chunk = sock.recv(reply_size - len(got))
            if not chunk:
                raise SystemExit(f"bench: connection {len(held)} closed by the server")
            got += chunk
        held.append(sock)
    return held


def never_reading(port: int, count: int) -> list[socket.socket]:
    """``count`` connections, each flooding frames without ever reading, until
    no connection can send any more: the server is then stuck writing to all."""
    held = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        held.append(sock)
    flood = memoryview(encode_request(1) * 8192)  # 128 KiB
    offsets = [0] * count  # where each stream is in the flood, so frames stay whole
    idle_rounds = 0
    while idle_rounds < 3:  # nothing could be sent three rounds in a row
        sent = 0
        for i, sock in enumerate(held):
            with contextlib.suppress(BlockingIOError):
                n = sock.send(flood[offsets[i] :])
                offsets[i] = (offsets[i] + n) % len(flood)
                sent += n
        idle_rounds = idle_rounds + 1 if not sent else 0
        time.sleep(0.2)
    return held


def measure_never_reading(pid: int, port: int, count: int) -> tuple:
    never_reading(port, 5)  # warm up
    time.sleep(0.5)
    before = rss_kib(pid)
    held = never_reading(port, count)
    time.sleep(1.0)
    after = rss_kib(pid)
    for sock in held:
        sock.close()
    return (after - before) / count, before, after


def measure(pid: int, port: int, count: int, request: bytes, size: int) -> tuple:
    hold(port, 10, request, size)  # warm up allocators and code paths
    time.sleep(0.5)
    before = rss_kib(pid)
    held = hold(port, count, request, size)
    time.sleep(1.0)
    after = rss_kib(pid)
    for sock in held:
        sock.close()
    return (after - before) / count, before, after


def main() -> int:
    args = parse_args(__doc__)
    count = convert(__doc__, "--connections", args["--connections"], positive_int)
    raise_file_limit(count + 1000)
    workdir = work_folder("bench-memory-")
    results = {}

    multiplier = math.ceil((count + 100) / cpu_count())
    ours = start_server(
        "--multiplier", str(multiplier), "--log-level", "warning", "--write-timeout", "0"
    )  # fmt: skip
    try:
        if args["--never-read"]:
            results["ours"] = measure_never_reading(ours.pid, ours.port, count)
        else:
            results["ours"] = measure(ours.pid, ours.port, count, encode_request(0), REPLY_SIZE)
    finally:
        ours.stop(60)
    if args["--never-read"]:
        per, before, after = results["ours"]
        print(f"{count:,} connections pipelining and never reading their replies:")
        print(f"  ours   RSS {before / 1024:7.1f} MiB -> {after / 1024:7.1f} MiB: "
              f"{per:.2f} KiB per connection")  # fmt: skip
        return 0

    echo = start_server(
        "--multiplier", str(multiplier), script=Path(__file__).resolve().parent / "echo.py"
    )  # fmt: skip
    try:  # the bare gevent loop: what a greenlet and a gevent socket cost by themselves
        results["gevent"] = measure(echo.pid, echo.port, count, encode_request(0), REPLY_SIZE)
    finally:
        echo.stop(60)

    if shutil.which("redis-server"):
        redis = start_redis(workdir, max_clients=count + 100)
        try:
            results["redis"] = measure(redis.proc.pid, redis.port, count, PING, len(b"+PONG\r\n"))
        finally:
            redis.kill()
    else:
        print("bench: redis-server not found (apt-get install redis-server); ours only")

    print(f"{count:,} concurrent connections, each after one request:")
    for name, (per, before, after) in results.items():
        print(f"  {name:<6} RSS {before / 1024:7.1f} MiB -> {after / 1024:7.1f} MiB: "
              f"{per:.2f} KiB per connection")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
