"""Prometheus metrics and the health endpoint, served over HTTP by gevent.

Nothing here runs on the hot path: ``ServerCollector`` reads the server's
plain counters (``ServerStats``, the store, the pool) when Prometheus scrapes,
in the style of prometheus_client's custom collectors.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator

import gevent
from gevent.monkey import get_original
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    make_wsgi_app,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from counter_server.common.values import format_address
from counter_server.protocol import REPLY_SIZE
from counter_server.server.lifecycle import (
    ACCEPT_RETRY_SECONDS,
    OUT_OF_DESCRIPTORS,
    CounterServer,
    PausingAcceptor,
)

log = logging.getLogger("counter.metrics")

PREFIX = "counter_server"
# Histogram buckets of replies per write; the stats keep one slot per bit length.
WRITE_BUCKET_BITS = 13  # up to 8191 replies (a read holds at most 1024 frames)
CONNECTIONS = 16  # HTTP connections served at once; more wait in the listen queue
REQUEST_SECONDS = 5.0  # a metrics connection's whole life, request and response
# Descriptors held in reserve for the endpoint: when the process has run out
# (the moment the accept-error alert needs /metrics), they are given up to
# accept a scrape and taken back after it.
RESERVED_DESCRIPTORS = 2
# The reserve is never watched by the loop, so it is closed at once: gevent's
# os.close defers the close of a non-regular file to the next loop iteration.
_close_now = get_original("os", "close")


class ServerCollector(Collector):
    """Every server figure, read at scrape time."""

    def __init__(self, server: CounterServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        server, stats = self._server, self._server.stats

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def by_reason(name: str, doc: str, counts: dict[str, int]) -> CounterMetricFamily:
            family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["reason"])
            for reason, count in counts.items():
                family.add_metric([reason], count)
            return family

        yield counter(
            "requests_applied",
            "Frames applied to the counter (zero-increment reads included).",
            server.store.requests_applied,
        )
        yield by_reason(
            "rejected_frames",
            "Frames refused (checksum, overflow) or discarded (truncated), by reason.",
            {reason.value: count for reason, count in stats.rejected.items()},
        )
        yield gauge(
            "value",
            "The counter's current value (a float: exact only up to 2^53).",
            server.store.value,
        )
        yield gauge("connections_active", "Connections being served now.", stats.connections_active)
        yield counter(
            "connections_accepted", "Connections accepted since start.", stats.connections_accepted
        )
        yield by_reason(
            "connections_closed",
            "Connections closed, by reason.",
            {reason.value: count for reason, count in stats.connections_closed.items()},
        )
        yield gauge("pool_size", "Connections the pool can serve at once.", server.pool.size)
        yield gauge("pool_in_use", "Pool slots in use.", len(server.pool))
        yield gauge(
            "connections_waiting",
            "Connections waiting in the listen queue because the pool is full.",
            stats.connections_waiting,
        )
        yield counter(
            "pool_saturation_events",
            "Times the pool was full with connections waiting to be accepted.",
            stats.pool_saturation_events,
        )
        yield counter(
            "accept_errors",
            "Accept failures for lack of file descriptors or memory.",
            stats.accept_errors,
        )
        for figure in server.store.figures():
            make = counter if figure.kind == "counter" else gauge
            yield make(figure.name, figure.help, figure.value)
        yield gauge(
            "healthy",
            "1 while the server can acknowledge increments, 0 when /healthz says 503.",
            0 if health(server) else 1,
        )
        limits = server.limits
        yield counter(
            "throttled_seconds",
            "Time connections waited for rate-limit tokens (--rate), all clients together.",
            limits.throttled_seconds if limits is not None else 0.0,
        )
        bytes_out = server.bytes_out
        yield counter("received_bytes", "Bytes read from clients.", server.bytes_in)
        yield counter("sent_bytes", "Bytes written to clients.", bytes_out)
        yield _replies_per_write(stats.replies_per_write, bytes_out // REPLY_SIZE)


def _replies_per_write(slots: list[int], total_replies: int) -> HistogramMetricFamily:
    buckets, cumulative = [], 0
    for bits in range(1, WRITE_BUCKET_BITS + 1):
        cumulative += slots[bits]
        buckets.append((str(2**bits - 1), cumulative))
    buckets.append(("+Inf", sum(slots)))
    return HistogramMetricFamily(
        f"{PREFIX}_replies_per_write",
        "Replies sent per write (pipelining batches them).",
        buckets=buckets,
        sum_value=total_replies,
    )


def build_registry(collector: Collector) -> CollectorRegistry:
    """A registry with ``collector`` (the server's figures) and
    prometheus_client's process, platform and garbage-collector collectors."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


def health(server: CounterServer) -> str | None:
    """None while the server can acknowledge increments, else why not."""
    if server.stopping:
        return "stopping"
    return server.store.health()


WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


def make_app(registry: CollectorRegistry, health: Callable[[], str | None]) -> WSGIApp:
    """WSGI app: ``/metrics`` (Prometheus text format) and ``/healthz`` (200
    while ``health()`` is None, else 503 with its reason)."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path == "/healthz":
            problem = health()
            status = "200 OK" if problem is None else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [f"{problem or 'ok'}\n".encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics or /healthz\n"]

    return app


class _BoundedWSGIServer(PausingAcceptor, WSGIServer):
    """gevent's WSGI server with each connection's whole life bounded: a
    client that sends half a request and waits is closed after the limit;
    when every slot is taken, the connection waiting longest for a request
    gives its slot to the newcomer (so idle connections cannot keep a
    health probe out); and reachable when the process is out of descriptors
    (a reserve)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._reserve: list[int] = []
        self._refill()
        # Connections between requests, oldest first (dicts keep their order).
        self._waiting: dict[gevent.Greenlet, None] = {}
        self.application = self._tracked(self.application)

    def _tracked(self, app: WSGIApp) -> WSGIApp:
        def tracked(environ: dict, start_response: Callable) -> Iterable[bytes]:
            me = gevent.getcurrent()
            self._waiting.pop(me, None)  # a request came: busy
            try:
                return app(environ, start_response)
            finally:
                self._waiting[me] = None  # waiting for the next one (keep-alive)

        return tracked

    def do_read(self):
        try:
            return super().do_read()
        except OSError as exc:
            if exc.errno not in OUT_OF_DESCRIPTORS:
                raise
        while self._reserve:
            _close_now(self._reserve.pop())
        try:
            return super().do_read()
        except OSError as exc:
            if exc.errno not in OUT_OF_DESCRIPTORS:
                raise
            self.pause_accepting(ACCEPT_RETRY_SECONDS)
            return None

    def _refill(self) -> None:
        while len(self._reserve) < RESERVED_DESCRIPTORS:
            try:
                self._reserve.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return  # none free now: after the next scrape

    def handle(self, sock: socket.socket, address: tuple) -> None:
        me = gevent.getcurrent()
        if self.pool.full() and self._waiting:
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            oldest.kill(block=False)  # closes its socket on the way out
        self._waiting[me] = None
        try:
            with gevent.Timeout(REQUEST_SECONDS, False):  # False: end quietly
                super().handle(sock, address)
        finally:
            self._waiting.pop(me, None)
            sock.close()
            self._refill()

    def close(self) -> None:
        super().close()
        while self._reserve:
            _close_now(self._reserve.pop())


def serve_metrics(listener: socket.socket, server: CounterServer) -> MetricsServer:
    """The endpoint of one server process."""
    return MetricsServer(listener, ServerCollector(server), lambda: health(server))


class MetricsServer:
    """The HTTP endpoint, on its own listener (loopback by default), with a
    pool of its own so that scrapers, or anyone else reaching the port, can
    never hold more than ``CONNECTIONS`` descriptors of the server's."""

    def __init__(
        self,
        listener: socket.socket,
        collector: Collector,
        health: Callable[[], str | None],
    ) -> None:
        app = make_app(build_registry(collector), health)
        self._http = _BoundedWSGIServer(
            listener, app, spawn=Pool(CONNECTIONS), log=None, error_log=log
        )

    @property
    def address(self) -> str:
        return format_address(self._http.socket.getsockname())

    def start(self) -> None:
        self._http.start()

    def stop(self) -> None:
        self._http.stop(timeout=1)

    def drop_in_child(self) -> None:
        """In a process forked from the one serving: let go of the endpoint
        the fork copied (its accept watcher, scrapes in flight, descriptors),
        leaving the parent's untouched. Closing only the listener left the
        copied watcher to fail on its descriptor at the next scrape."""
        self._http.close()
        self._http.pool.kill(block=False)
