"""From settings to what a server instance owns and runs: its listeners,
its state file, its TLS context, its store stack and its ``CounterServer``.

This is the one place stores are stacked; the single-process server and
every ``--processes`` worker build theirs through ``open_store``.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from counter_server.common.cli import cpu_count
from counter_server.common.tls import TLSSetupError, server_context
from counter_server.common.values import format_address, phrase
from counter_server.server.banner import Ready
from counter_server.server.cli import ServerSettings
from counter_server.server.errors import ListenError, SetupError
from counter_server.server.limits import PeerTable
from counter_server.server.store import CounterStore, MemoryCounterStore
from counter_server.server.store.shared import SharedCounter
from counter_server.server.store.statefile import DurableCounterStore, StateFile
from counter_server.server.store.urls import AnyBackend, EtcdBackend

if TYPE_CHECKING:
    from counter_server.server.metrics import MetricsServer

LISTEN_BACKLOG = 1024  # connections the kernel queues while the pool is full
# Why "::" cannot be opened on a machine without IPv6: then IPv4 only.
_NO_IPV6 = (os.strerror(errno.EAFNOSUPPORT).lower(), os.strerror(errno.EADDRNOTAVAIL).lower())


@dataclass
class Claimed:
    """What one server instance owns for its whole life; its worker
    processes inherit it. Nobody else can hold the port or the state file
    while any process of the instance lives."""

    listener: socket.socket
    metrics_listener: socket.socket | None
    tls: ssl.SSLContext | None
    state: StateFile | None
    initial: int  # the counter at start, from the state file or the backend
    state_existed: bool


def claim(settings: ServerSettings) -> Claimed:
    """Take the port, the metrics port and the state file; a ``SetupError``
    (and nothing left open) if any is taken or unusable."""
    tls = None
    if settings.tls_cert:
        try:
            tls = server_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        except TLSSetupError as exc:
            raise SetupError(str(exc)) from None
    opened: list = []
    try:
        listener = open_listener(settings.host, settings.port)
        opened.append(listener)
        metrics_listener = None
        if settings.metrics_port is not None:
            metrics_listener = open_listener(settings.metrics_host, settings.metrics_port)
            opened.append(metrics_listener)
        state, initial, existed = None, 0, False
        if settings.backend is not None:
            initial = backend_module(settings.backend).check_backend(settings.backend) or 0
        if settings.state_file is not None:
            state = StateFile(settings.state_file)
            slot, existed = state.claim()
            initial = slot.value
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    return Claimed(listener, metrics_listener, tls, state, initial, existed)


def open_store(
    settings: ServerSettings, claimed: Claimed, shared: SharedCounter | None = None
) -> CounterStore:
    """The store stack the settings ask for: Redis; or memory (this
    process's, or ``shared`` by the workers), made durable by the state file."""
    if settings.backend is not None:
        return backend_module(settings.backend).open_store(settings.backend)
    if shared is None:
        core: CounterStore = MemoryCounterStore(claimed.initial)
        on_disk = claimed.initial
    else:
        core = shared.open_store()
        on_disk = claimed.state.newest().value if claimed.state is not None else 0
    if claimed.state is None:
        return core
    return DurableCounterStore(claimed.state, core, settings.fsync, on_disk=on_disk)


def backend_module(backend: AnyBackend):
    """``server.store.redis_backend`` or ``etcd_backend``, imported on first
    use: loading redis-py takes a seventh of a second, which instances
    without ``--backend`` skip."""
    if isinstance(backend, EtcdBackend):
        from counter_server.server.store import etcd_backend as module
    else:
        from counter_server.server.store import redis_backend as module
    return module


def describe_origin(settings: ServerSettings, claimed: Claimed, store: CounterStore) -> str:
    """Where the counter came from, for the start-up line ("" for memory);
    with a backend, ``store`` is asked for its value."""
    if settings.backend is not None:
        backend = settings.backend
        value = store.current_value()
        if value is None:
            return (
                f"{backend.kind} {backend.url} not reachable yet: serving once it is{backend.terms}"
            )
        blocker = store.blocker()
        but = f"; but {blocker}" if blocker else ""
        return f"counter {value} in {backend.kind} {backend.url}{backend.terms}{but}"
    if claimed.state is None:
        return ""
    how = (
        f"resumed at {claimed.initial} from"
        if claimed.state_existed
        else "starts at 0 in new state file"
    )
    return f"counter {how} {settings.state_file}, fsync {settings.fsync}"


def shared_peer_table(settings: ServerSettings) -> PeerTable | None:
    """For ``--processes``: the table that per-IP limits share, if any is set."""
    if settings.rate is None and settings.max_conns_per_ip is None:
        return None
    capacity = settings.pool_size * settings.processes
    return PeerTable(capacity, settings.processes, settings.rate, settings.burst)


def open_listener(host: str | None, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 if ``host`` has a colon;
    None: every interface, IPv4 and IPv6 on one dual-stack socket where the
    machine has IPv6, else IPv4 only); ListenError with a one-line reason if
    it cannot be opened. Never SO_REUSEPORT: a port already served by anyone
    is refused."""
    if host is None:
        if socket.has_dualstack_ipv6():
            try:
                return open_listener("::", port)
            except ListenError as exc:
                if not any(why in str(exc) for why in _NO_IPV6):
                    raise
        host = "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server(
            (host, port),
            family=family,
            backlog=LISTEN_BACKLOG,
            dualstack_ipv6=host == "::",  # every interface means IPv4 too
        )
    except OSError as exc:
        where = format_address((host, port))
        raise ListenError(f"cannot listen on {where}: {phrase(exc)}") from None


def ready_facts(
    settings: ServerSettings,
    claimed: Claimed,
    origin: str,
    metrics: MetricsServer | None,
    workers: list[int] | None = None,
) -> Ready:
    """The facts of this started instance (``workers``: their pids), for its
    start-up line and ready file; ``origin``: where its counter came from."""
    listener = claimed.listener
    host, port = listener.getsockname()[:2]
    dual_stack = listener.family == socket.AF_INET6 and not listener.getsockopt(
        socket.IPPROTO_IPV6, socket.IPV6_V6ONLY
    )
    return Ready(
        host=host,
        port=port,
        dual_stack=dual_stack,
        pool=settings.pool_size,
        cpus=cpu_count(),
        multiplier=settings.multiplier,
        pid=os.getpid(),
        tls=claimed.tls is not None,
        metrics_url=f"http://{metrics.address}/metrics" if metrics else None,
        workers=workers or [],
        initial=claimed.initial,
        origin=origin,
    )
