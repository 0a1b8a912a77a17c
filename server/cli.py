"""Command line of the counter server: parse flags, open the listener, run
until SIGINT/SIGTERM, stop gracefully and print the totals."""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from dataclasses import dataclass

from common.cli import (
    configure_logging,
    convert,
    cpu_count,
    log_format,
    log_level,
    non_negative_float,
    parse_args,
    port_number,
    positive_int,
)
from common.signals import StopSignals
from server.lifecycle import CounterServer
from server.metrics import MetricsServer
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
  --metrics-port PORT      Serve Prometheus /metrics and /healthz over HTTP on
                           this port (off when not given).
  --metrics-host HOST      Address for the metrics endpoint. [default: 127.0.0.1]
  --log-level LEVEL        debug, info, warning or error. [default: info]
  --log-format FORMAT      text, or json (one object per line). [default: text]
  -h --help                Show this help.
"""

LISTEN_BACKLOG = 1024
log = logging.getLogger("counter.server")


@dataclass(frozen=True)
class ServerSettings:
    """Everything the command line decides."""

    host: str
    port: int
    multiplier: int
    shutdown_timeout: float
    metrics_host: str
    metrics_port: int | None
    log_level: int
    log_format: str


def parse_settings(argv: list[str] | None = None) -> ServerSettings:
    """The settings for ``argv``; a usage error exits 2."""
    args = parse_args(__doc__, argv)

    def value(option: str, parser):
        return convert(__doc__, option, args[option], parser)

    return ServerSettings(
        host=args["--host"],
        port=value("--port", port_number),
        multiplier=value("--multiplier", positive_int),
        shutdown_timeout=value("--shutdown-timeout", non_negative_float),
        metrics_host=args["--metrics-host"],
        metrics_port=None
        if args["--metrics-port"] is None
        else value("--metrics-port", port_number),
        log_level=value("--log-level", log_level),
        log_format=value("--log-format", log_format),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the server; returns the process exit status."""
    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    cpus = cpu_count()
    pool_size = cpus * settings.multiplier
    try:
        listener = open_listener(settings.host, settings.port)
        metrics_listener = None
        if settings.metrics_port is not None:
            metrics_listener = open_listener(settings.metrics_host, settings.metrics_port)
    except ListenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    store = MemoryCounterStore()
    server = CounterServer(listener, store, pool_size)
    metrics = MetricsServer(metrics_listener, server) if metrics_listener else None
    stop_signals = StopSignals()
    server.start()
    if metrics:
        metrics.start()
    print(
        f"Counter server listening on {server.address} "
        f"(pool {pool_size} = {cpus} CPUs x {settings.multiplier}, pid {os.getpid()})",
        flush=True,
    )
    log.info(
        "started: listening on %s, pool %d, pid %d%s",
        server.address,
        pool_size,
        os.getpid(),
        f", metrics on http://{metrics.address}/metrics" if metrics else "",
    )

    stop_signals.wait()
    log.info("shutdown begun: no new connections or frames; sending owed replies")
    cut = server.stop(settings.shutdown_timeout)
    if metrics:
        metrics.stop()
    print(f"Server stopped after processing total requests: {store.requests_applied}")
    print(f"Final counter value: {store.value}", flush=True)
    log.info(
        "stopped: %d requests applied, final counter value %d, %d connections cut",
        store.requests_applied,
        store.value,
        cut,
    )
    return 0


class ListenError(OSError):
    """A listener that could not be opened; the message is one line."""


def open_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 if ``host`` has a colon);
    ListenError with a one-line reason if it cannot be opened."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {describe(exc)}") from None


def describe(exc: OSError) -> str:
    """A short human reason for a socket error ("address already in use")."""
    if exc.errno is not None and exc.errno in errno.errorcode:
        return os.strerror(exc.errno).lower()
    return str(exc)
