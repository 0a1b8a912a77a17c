"""Command line of the counter server: parse flags, open the listener, run
until SIGINT/SIGTERM, stop gracefully and print the totals."""

from __future__ import annotations

import errno
import logging
import math
import os
import signal
import socket
import ssl
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
    positive_float,
    positive_int,
    usage_exit,
)
from common.signals import StopSignals
from common.tls import TLSSetupError, server_context
from server.admission import Admission, Network, parse_network
from server.durable import FSYNC_MODES, DurableCounterStore
from server.lifecycle import CounterServer
from server.metrics import MetricsServer
from server.processes import Supervisor, reserve_port
from server.ratelimit import RateLimiter
from server.redis_store import RedisCounterStore, parse_backend
from server.shared import SharedCounter
from server.statefile import StateFile, StateFileError
from server.store import CounterStore, MemoryCounterStore
from server.timeouts import Timeouts

__doc__ = """Counter server: one shared 64-bit counter that many clients add to at
once, over a 16-byte checksummed TCP protocol (byte-compatible with the Go original).

Usage:
  server.py [options] [--allow CIDR]...
  server.py -h | --help

Options:
  --port PORT              TCP port: 8080 or :8080 (0 picks a free one). [default: 8080]
  --host HOST              Address to listen on: 0.0.0.0 is every IPv4
                           interface, :: every IPv6 and IPv4 one. [default: 0.0.0.0]
  --multiplier N           Serve at most NumCPU x N connections at once; more
                           wait until a slot frees. [default: 20]
  --processes N            Worker processes sharing the port (SO_REUSEPORT) and
                           one counter in shared memory, each with its own pool;
                           auto = NumCPU. [default: 1]
  --shutdown-timeout SECS  On SIGINT/SIGTERM, wait at most this long for owed
                           replies before closing connections. [default: 10]
  --idle-timeout SECS      Close a connection that sends nothing for this long
                           (0: never). [default: 300]
  --frame-timeout SECS     A frame whose first byte has arrived must be complete
                           within this long, against slowloris (0: never). [default: 10]
  --write-timeout SECS     Close a client that leaves its replies unread so that
                           sending blocks this long (0: never). [default: 30]
  --rate R                 Frames per second allowed per client IP; faster
                           clients are slowed down, not refused (off when not given).
  --burst B                Frames a client IP may send at full speed before the
                           rate applies (default: one second's worth).
  --max-conns-per-ip N     Close connections beyond N at once from one IP
                           (off when not given).
  --allow CIDR             Accept only peers in this network (IPv4 or IPv6);
                           repeat for more. Everyone when not given.
  --tls-cert FILE          Serve TLS with this certificate chain (PEM).
  --tls-key FILE           The private key of --tls-cert (PEM).
  --tls-client-ca FILE     Require client certificates signed by this CA
                           (mutual TLS).
  --backend URL            Keep the counter in Redis, shared by every instance
                           using it: redis://HOST:PORT/DB?key=NAME (default:
                           this process's memory).
  --state-file PATH        Keep the counter in this file so it survives restarts
                           and crashes (memory only when not given).
  --fsync MODE             With --state-file: always (a reply only once its
                           value is on disk), everysec (at most about a second
                           lost in a crash) or no (the OS decides). [default: everysec]
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
    timeouts: Timeouts
    rate: float | None
    burst: int | None
    max_conns_per_ip: int | None
    allow: tuple[Network, ...]
    tls_cert: str | None
    tls_key: str | None
    tls_client_ca: str | None
    state_file: str | None
    fsync: str
    processes: int
    backend: tuple[str, str] | None


def parse_settings(argv: list[str] | None = None) -> ServerSettings:
    """The settings for ``argv``; a usage error exits 2."""
    args = parse_args(__doc__, argv)

    def value(option: str, parser):
        return convert(__doc__, option, args[option], parser)

    def optional(option: str, parser):
        return None if args[option] is None else value(option, parser)

    def seconds_or_off(option: str) -> float | None:
        return value(option, non_negative_float) or None

    processes = cpu_count() if args["--processes"] == "auto" else value("--processes", positive_int)
    if processes > 1 and args["--metrics-port"] is not None:
        usage_exit(__doc__, "--metrics-port: not supported with --processes above 1 yet")
    rate = optional("--rate", positive_float)
    burst = optional("--burst", positive_int)
    if burst is not None and rate is None:
        usage_exit(__doc__, "--burst: needs --rate")
    if rate is not None and burst is None:
        burst = max(1, math.ceil(rate))
    if (args["--tls-cert"] is None) != (args["--tls-key"] is None):
        usage_exit(__doc__, "--tls-cert and --tls-key go together")
    if args["--backend"] is not None and args["--state-file"] is not None:
        usage_exit(__doc__, "--backend and --state-file: Redis keeps the counter, choose one")
    if args["--backend"] is not None and processes > 1:
        usage_exit(__doc__, "--backend: run one instance per core instead of --processes")
    if args["--fsync"] != "everysec" and args["--state-file"] is None:
        usage_exit(__doc__, "--fsync: needs --state-file")
    if args["--tls-client-ca"] is not None and args["--tls-cert"] is None:
        usage_exit(__doc__, "--tls-client-ca: needs --tls-cert and --tls-key")
    return ServerSettings(
        host=args["--host"],
        port=value("--port", port_number),
        multiplier=value("--multiplier", positive_int),
        shutdown_timeout=value("--shutdown-timeout", non_negative_float),
        metrics_host=args["--metrics-host"],
        metrics_port=optional("--metrics-port", port_number),
        log_level=value("--log-level", log_level),
        log_format=value("--log-format", log_format),
        timeouts=Timeouts(
            idle=seconds_or_off("--idle-timeout"),
            frame=seconds_or_off("--frame-timeout"),
            write=seconds_or_off("--write-timeout"),
        ),
        rate=rate,
        burst=burst,
        max_conns_per_ip=optional("--max-conns-per-ip", positive_int),
        allow=tuple(convert(__doc__, "--allow", raw, parse_network) for raw in args["--allow"]),
        tls_cert=args["--tls-cert"],
        tls_key=args["--tls-key"],
        tls_client_ca=args["--tls-client-ca"],
        state_file=args["--state-file"],
        fsync=value("--fsync", fsync_mode),
        processes=processes,
        backend=optional("--backend", parse_backend),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the server; returns the process exit status."""
    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    try:
        tls = None
        if settings.tls_cert:
            tls = server_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        if settings.processes > 1:
            return run_processes(settings, tls)
        listener = open_listener(settings.host, settings.port)
        metrics_listener = None
        if settings.metrics_port is not None:
            metrics_listener = open_listener(settings.metrics_host, settings.metrics_port)
        store, origin = open_store(settings)
    except (ListenError, TLSSetupError, StateFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    server = build_server(listener, store, settings, tls)
    metrics = MetricsServer(metrics_listener, server) if metrics_listener else None
    stop_signals = StopSignals()
    server.start()
    if metrics:
        metrics.start()
    print(
        f"Counter server listening on {server.address} "
        f"({describe_pool(settings)}, pid {os.getpid()}{origin})",
        flush=True,
    )
    log.info(
        "started: listening on %s%s, pool %d, pid %d%s",
        server.address,
        " (TLS)" if tls else "",
        server.pool.size,
        os.getpid(),
        f", metrics on http://{metrics.address}/metrics" if metrics else "",
    )

    stop_signals.wait()
    log.info("shutdown begun: no new connections or frames; sending owed replies")
    cut = server.stop(settings.shutdown_timeout)
    if metrics:
        metrics.stop()
    print_totals(store.requests_applied, store.value)  # close() re-read Redis's value
    log.info(
        "stopped: %d requests applied, final counter value %d, %d connections cut",
        store.requests_applied,
        store.value,
        cut,
    )
    return 0


def run_processes(settings: ServerSettings, tls: ssl.SSLContext | None) -> int:
    """The parent of ``--processes N`` workers; returns the exit status."""
    try:
        reservation, address = reserve_port(settings.host, settings.port)
    except OSError as exc:
        where = f"{settings.host}:{settings.port}"
        raise ListenError(f"cannot listen on {where}: {describe(exc)}") from None
    port = reservation.getsockname()[1]
    origin = ""
    if settings.state_file is None:
        shared = SharedCounter()
    else:
        parent_state = StateFile(settings.state_file)
        slot, existed = parent_state.load_or_create()
        shared = SharedCounter(slot.value)
        origin = describe_origin(settings, slot.value, existed)

    def worker(shared: SharedCounter, ready) -> int:
        listener = open_listener(settings.host, port, reuse_port=True)
        store: CounterStore = shared.open_store()
        if settings.state_file is not None:
            state = StateFile(settings.state_file)
            state.open()
            store = DurableCounterStore(state, store, settings.fsync)
        server = build_server(listener, store, settings, tls)
        stop_signals = StopSignals()
        server.start()
        ready()
        stop_signals.wait()
        server.stop(settings.shutdown_timeout)
        return 0

    supervisor = Supervisor(settings.processes, shared, worker)
    stop_signals = StopSignals(on_force=lambda: supervisor.signal_all(signal.SIGKILL))
    try:
        supervisor.start(stop_signals)
    except RuntimeError as exc:
        raise ListenError(f"cannot start the workers on {address}: {exc}") from None
    print(
        f"Counter server listening on {address} ({describe_pool(settings)} per process, "
        f"{settings.processes} processes, parent pid {os.getpid()}, workers {supervisor.pids}"
        f"{origin})",
        flush=True,
    )
    log.info(
        "started: %d worker processes on %s, parent pid %d",
        settings.processes,
        address,
        os.getpid(),
    )
    stop_signals.wait()
    log.info("shutdown begun: stopping %d workers", settings.processes)
    killed = supervisor.stop(settings.shutdown_timeout + 5)
    if settings.state_file is not None:  # the workers saved it; make sure of the last value
        parent_state.commit(lambda: shared.value, sync=True)
        parent_state.close()
    print_totals(shared.requests_applied, shared.value)
    log.info(
        "stopped: %d workers killed after the timeout, %d restarts", killed, supervisor.restarts
    )
    shared.remove()
    reservation.close()
    return 0


def build_server(
    listener: socket.socket, store: CounterStore, settings: ServerSettings, tls
) -> CounterServer:
    """A CounterServer with everything the settings ask for."""
    return CounterServer(
        listener,
        store,
        cpu_count() * settings.multiplier,
        timeouts=settings.timeouts,
        admission=Admission(settings.allow, settings.max_conns_per_ip),
        rate_limiter=RateLimiter(settings.rate, settings.burst) if settings.rate else None,
        tls=tls,
    )


def describe_pool(settings: ServerSettings) -> str:
    cpus = cpu_count()
    return f"pool {cpus * settings.multiplier} = {cpus} CPUs x {settings.multiplier}"


def print_totals(requests_applied: int, value: int) -> None:
    """The Go original's closing line, and the final value."""
    print(f"Server stopped after processing total requests: {requests_applied}")
    print(f"Final counter value: {value}", flush=True)


def open_store(settings: ServerSettings) -> tuple[CounterStore, str]:
    """The counter store the settings ask for, and how the start-up line
    describes where the counter came from ("" for memory)."""
    if settings.backend is not None:
        url, key = settings.backend
        store = RedisCounterStore(url, key)
        return store, f", counter {store.current_value()} in Redis {url} key {key}"
    if settings.state_file is None:
        return MemoryCounterStore(), ""
    state = StateFile(settings.state_file)
    slot, existed = state.load_or_create()
    store = DurableCounterStore(state, MemoryCounterStore(slot.value), settings.fsync)
    return store, describe_origin(settings, slot.value, existed)


def describe_origin(settings: ServerSettings, value: int, existed: bool) -> str:
    """How the start-up line says where the counter came from."""
    how = f"resumed at {value} from" if existed else "starts at 0 in new state file"
    return f", counter {how} {settings.state_file}, fsync {settings.fsync}"


def fsync_mode(raw: str) -> str:
    if raw not in FSYNC_MODES:
        raise ValueError(f"must be always, everysec or no, got {raw!r}")
    return raw


class ListenError(OSError):
    """A listener that could not be opened; the message is one line."""


def open_listener(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 if ``host`` has a colon);
    ListenError with a one-line reason if it cannot be opened."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server(
            (host, port),
            family=family,
            backlog=LISTEN_BACKLOG,
            dualstack_ipv6=host == "::",  # every interface means IPv4 too
            reuse_port=reuse_port,
        )
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {describe(exc)}") from None


def describe(exc: OSError) -> str:
    """A short human reason for a socket error ("address already in use")."""
    if exc.errno is not None and exc.errno in errno.errorcode:
        return os.strerror(exc.errno).lower()
    return str(exc)
