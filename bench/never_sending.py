"""How long a new client waits behind connections that never send a byte:
one IP (127.0.0.1) opens N connections at once and leaves them silent, then
another (127.0.0.2) connects and sends one frame. Measured for the server
as started by default and with each protection given by --with (one run
each, in order); prints the wait and the connections closed by reason.

Usage:
  never_sending.py [--connections N] [--with ARGS]...
  never_sending.py -h | --help

Options:
  --connections N  Silent connections of the one IP. [default: 5000]
  --with ARGS      Server options of a protected run, in one argument
                   (e.g. "--max-conns-per-ip 20"); repeatable.
"""

from __future__ import annotations

import errno
import shlex
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.base import machine, raise_file_limit
from counter_server.common.cli import convert, parse_args
from counter_server.common.values import positive_int
from counter_server.protocol import decode_replies, encode_request
from testing.launcher import start_server

NEW_CLIENT_TIMEOUT = 120.0  # seconds the new client waits at most


def silent_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` connections from 127.0.0.1, connecting in the background
    (non-blocking: a full listen queue does not stop the next one)."""
    held = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
        code = sock.connect_ex(("127.0.0.1", port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            raise SystemExit(f"bench: connect failed: {errno.errorcode.get(code, code)}")
        held.append(sock)
    return held


def new_client_wait(port: int) -> float:
    """Seconds until a new client (127.0.0.2) has its reply."""
    started = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(NEW_CLIENT_TIMEOUT)
        sock.bind(("127.0.0.2", 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(encode_request(1))
        reply = sock.recv(8)
        if len(decode_replies(reply)) != 1:
            raise SystemExit(f"bench: no reply, got {reply!r}")
    return time.monotonic() - started


def closed_by_reason(metrics_url: str) -> str:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    counts = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "counter_server_connections_closed_total" and sample.value:
                counts.append(f"{sample.labels['reason']} {sample.value:.0f}")
    return ", ".join(counts) or "none"


def run(count: int, extra: list[str]) -> None:
    server = start_server("--metrics-port", "0", *extra)
    held: list[socket.socket] = []
    try:
        held = silent_connections(server.port, count)
        time.sleep(0.5)  # the queue fills as it would under a flood
        waited = new_client_wait(server.port)
        closed = closed_by_reason(server.metrics_url())
    finally:
        for sock in held:
            sock.close()
        server.stop()
    options = " ".join(extra) or "defaults"
    print(f"{options:<40} {waited:7.2f} s   closed: {closed}", flush=True)


def main() -> int:
    args = parse_args(__doc__)
    count = convert(__doc__, "--connections", args["--connections"], positive_int)
    raise_file_limit(count + 1024)
    print(f"{count} silent connections from 127.0.0.1, then one client from 127.0.0.2")
    print(machine(pinned_run=False))
    for extra in [[], *(shlex.split(each) for each in args["--with"])]:
        run(count, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
