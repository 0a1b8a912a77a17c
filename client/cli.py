"""Command line of the load client: run a load and report, or read the counter."""

from __future__ import annotations

import json
import socket
import sys
import time

import gevent

from counter_server.client.load import LoadRun, LoadSettings, read_counter
from counter_server.client.report import format_text, summarize
from counter_server.common import DISTRIBUTION, __version__
from counter_server.common.cli import convert, cpu_count, parse_args, usage_exit
from counter_server.common.signals import StopSignals
from counter_server.common.tls import TLSSetupError, client_context
from counter_server.common.values import (
    format_address,
    host_port,
    non_negative_float,
    phrase,
    positive_float,
    positive_int,
)
from counter_server.protocol import MAX_COUNTER

__doc__ = """Load client for the counter server: many persistent connections send
increments for a while, every reply is checked, and a report is printed.

Usage:
  client.py [options]
  client.py --get [options]
  client.py -h | --help
  client.py --version

Options:
  --serverAddress HOST:PORT  Server to drive ([::1]:PORT for IPv6). [default: 127.0.0.1:8080]
  --multiplier M             Open NumCPU x M connections. [default: 20]
  --duration SECS            Send for this long, then collect owed replies. [default: 60]
  --pipeline D               Frames kept in flight on each connection (1 is
                             ping-pong, like the Go original). [default: 1]
  --value V                  Increment each frame carries. [default: 1]
  --timeout SECS             Longest wait to connect or for a reply. [default: 10]
  --tls                      Connect with TLS.
  --tls-ca FILE              Trust server certificates signed by this CA (PEM);
                             the system store when not given.
  --tls-cert FILE            Present this client certificate (mutual TLS).
  --tls-key FILE             The private key of --tls-cert.
  --json                     Print the report as one JSON object instead of text.
  --get                      Print the current counter value (sends a zero
                             increment) and exit.
  --version                  Show the version.
  -h --help                  Show this help.

SIGINT/SIGTERM stops sending early, collects the replies owed and reports; a
second one exits at once.

Exit status: 0 when every request was acknowledged correctly, 1 when anything
went wrong, 2 for a usage error, 130 when interrupted without errors.
"""


def main(argv: list[str] | None = None) -> int:
    """Run the client; returns the process exit status."""
    args = parse_args(__doc__, argv, version=f"{DISTRIBUTION} {__version__}")
    host, port = convert(__doc__, "--serverAddress", args["--serverAddress"], host_port)
    timeout = convert(__doc__, "--timeout", args["--timeout"], positive_float)
    tls = _tls_context(args)
    if tls is _TLS_ERROR:
        return 1
    if args["--get"]:
        return _print_counter(host, port, timeout, tls, args["--json"])
    settings = LoadSettings(
        host=host,
        port=port,
        connections=cpu_count()
        * convert(__doc__, "--multiplier", args["--multiplier"], positive_int),
        duration=convert(__doc__, "--duration", args["--duration"], non_negative_float),
        pipeline=convert(__doc__, "--pipeline", args["--pipeline"], positive_int),
        increment=convert(__doc__, "--value", args["--value"], _increment),
        timeout=timeout,
        tls=tls,
    )
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        print(f"error: cannot resolve {host}: {phrase(exc)}", file=sys.stderr)
        return 1

    run = LoadRun(settings)
    stop_signals = StopSignals(on_stop=run.interrupt)  # Ctrl-C: stop sending, collect, report
    progress = gevent.spawn(_progress, run) if sys.stderr.isatty() else None
    try:
        run.run()
    finally:
        stop_signals.cancel()
        if progress is not None:
            progress.kill()
    summary = summarize(run)
    if summary["requests_acknowledged"] == 0 and summary["first_error"]:
        print(f"error: {args['--serverAddress']}: {summary['first_error']}", file=sys.stderr)
    print(json.dumps(summary) if args["--json"] else format_text(summary), flush=True)
    if summary["errors_total"] or summary["connections_failed"]:
        return 1
    return 130 if run.interrupted else 0


_TLS_ERROR = object()


def _tls_context(args: dict):
    """The client TLS context the flags ask for, None for plain TCP, or
    _TLS_ERROR after printing why the files could not be loaded."""
    wanted = [f for f in ("--tls-ca", "--tls-cert", "--tls-key") if args[f] is not None]
    if not args["--tls"]:
        if wanted:
            usage_exit(__doc__, f"{wanted[0]}: needs --tls")
        return None
    if (args["--tls-cert"] is None) != (args["--tls-key"] is None):
        usage_exit(__doc__, "--tls-cert and --tls-key go together")
    try:
        return client_context(args["--tls-ca"], args["--tls-cert"], args["--tls-key"])
    except TLSSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return _TLS_ERROR


def _print_counter(host: str, port: int, timeout: float, tls, as_json: bool) -> int:
    where = format_address((host, port))
    try:
        value = read_counter(host, port, timeout, tls)
        print(json.dumps({"server": where, "value": value}) if as_json else value)
    except OSError as exc:
        print(f"error: cannot read the counter from {where}: {phrase(exc)}", file=sys.stderr)
        return 1
    return 0


def _progress(run: LoadRun) -> None:
    previous = 0
    while True:
        gevent.sleep(1.0)
        acknowledged = run.acknowledged
        elapsed = time.perf_counter() - run.started_at if run.started_at else 0.0
        print(
            f"[{elapsed:5.1f}s] {acknowledged - previous:,} replies/s, "
            f"{acknowledged:,} acknowledged, {run.errors:,} errors",
            file=sys.stderr,
            flush=True,
        )
        previous = acknowledged


def _increment(raw: str) -> int:
    try:
        value = int(raw, 10)
    except ValueError:
        raise ValueError(f"must be an integer from 0 to 2^64-1, got {raw!r}") from None
    if not 0 <= value <= MAX_COUNTER:
        raise ValueError(f"must be an integer from 0 to 2^64-1, got {raw!r}")
    return value
