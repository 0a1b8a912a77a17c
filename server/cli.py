"""Command line of the counter server: parse flags, open the listener, run
until SIGINT/SIGTERM, stop gracefully and print the totals."""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys

from common.cli import (
    configure_logging,
    convert,
    cpu_count,
    log_level,
    non_negative_float,
    parse_args,
    port_number,
    positive_int,
)
from common.signals import StopSignals
from server.lifecycle import CounterServer
from server.store import MemoryCounterStore

__doc__ = """Counter server: one shared 64-bit counter that many clients add to at
once, over a 16-byte checksummed TCP protocol (byte-compatible with the Go original).

Usage:
  server.py [options]
  server.py -h | --help

Options:
  --port PORT              TCP port: 8080 or :8080 (0 picks a free one). [default: 8080]
  --host HOST              Address to listen on: 0.0.0.0 is every IPv4
                           interface, :: every IPv6 one. [default: 0.0.0.0]
  --multiplier N           Serve at most NumCPU x N connections at once; more
                           wait until a slot frees. [default: 20]
  --shutdown-timeout SECS  On SIGINT/SIGTERM, wait at most this long for owed
                           replies before closing connections. [default: 10]
  --log-level LEVEL        debug, info, warning or error. [default: info]
  -h --help                Show this help.
"""

LISTEN_BACKLOG = 1024
log = logging.getLogger("counter.server")


def main(argv: list[str] | None = None) -> int:
    """Run the server; returns the process exit status."""
    args = parse_args(__doc__, argv)
    port = convert(__doc__, "--port", args["--port"], port_number)
    host = args["--host"]
    multiplier = convert(__doc__, "--multiplier", args["--multiplier"], positive_int)
    shutdown_timeout = convert(
        __doc__, "--shutdown-timeout", args["--shutdown-timeout"], non_negative_float
    )
    configure_logging(convert(__doc__, "--log-level", args["--log-level"], log_level))

    cpus = cpu_count()
    pool_size = cpus * multiplier
    try:
        listener = open_listener(host, port)
    except OSError as exc:
        print(f"error: cannot listen on {host}:{port}: {describe(exc)}", file=sys.stderr)
        return 1

    store = MemoryCounterStore()
    server = CounterServer(listener, store, pool_size)
    stop_signals = StopSignals()
    server.start()
    print(
        f"Counter server listening on {server.address} "
        f"(pool {pool_size} = {cpus} CPUs x {multiplier}, pid {os.getpid()})",
        flush=True,
    )

    stop_signals.wait()
    log.info("shutdown begun: no new connections or frames; sending owed replies")
    server.stop(shutdown_timeout)
    print(f"Server stopped after processing total requests: {store.requests_applied}")
    print(f"Final counter value: {store.value}", flush=True)
    return 0


def open_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 if ``host`` has a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)


def describe(exc: OSError) -> str:
    """A short human reason for a socket error ("address already in use")."""
    if exc.errno is not None and exc.errno in errno.errorcode:
        return os.strerror(exc.errno).lower()
    return str(exc)
