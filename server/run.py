"""Run a server instance: claim its port and state file, start it (one
process, or ``--processes`` workers), announce it, wait for SIGINT/SIGTERM,
stop it gracefully and print the totals. Exit status: 0, 1 if it could not
start or could not save its final value, 2 for a usage error.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time

import gevent

from counter_server.common.cli import configure_logging, cpu_count
from counter_server.common.gevent_errors import log_gevent_errors
from counter_server.common.ratelog import flush_all
from counter_server.common.signals import StopSignals
from counter_server.server.balance import AcceptBalance
from counter_server.server.banner import Ready, startup_line, totals_lines, write_ready_file
from counter_server.server.board import Board, BoardCollector
from counter_server.server.cli import ServerSettings, parse_settings
from counter_server.server.errors import SetupError, StateFileError, WorkersFailed
from counter_server.server.lifecycle import CounterServer
from counter_server.server.metrics import MetricsServer, ServerCollector, health, serve_metrics
from counter_server.server.processes import Supervisor
from counter_server.server.store import CounterStore
from counter_server.server.store.shared import SharedCounter
from counter_server.server.wiring import (
    Claimed,
    build_server,
    claim,
    describe_origin,
    open_store,
    pool_size,
    shared_peer_table,
)

log = logging.getLogger("counter.server")

PUBLISH_SECONDS = 0.5  # how often a --processes worker publishes its figures


def main(argv: list[str] | None = None) -> int:
    """Run the server; returns the process exit status."""
    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    log_gevent_errors()
    try:
        claimed = claim(settings)
        instance = (
            Workers(settings, claimed) if settings.processes > 1 else Single(settings, claimed)
        )
        stop_signals = StopSignals(on_force=instance.force_stop)
        ready = instance.start(stop_signals)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(startup_line(ready), flush=True)
    log.info(
        "started: listening on %s%s, pool %d, pid %d%s",
        ready.address,
        " (TLS)" if ready.tls else "",
        ready.pool,
        ready.pid,
        f", metrics on {ready.metrics_url}" if ready.metrics_url else "",
        extra={
            "address": ready.address,
            "pool_size": ready.pool,
            "pid": ready.pid,
            "workers": ready.workers,
            "tls": ready.tls,
            "metrics_url": ready.metrics_url,
            "initial_value": ready.initial,
        },
    )
    cap = settings.max_conns_per_ip
    if cap is not None and cap >= ready.total_pool:
        log.warning(
            "--max-conns-per-ip %d is not below the pool of %d: one client can still take "
            "every slot; use at most %d (half the pool)",
            cap,
            ready.total_pool,
            max(1, ready.total_pool // 2),
            extra={"max_conns_per_ip": cap, "pool_size": ready.total_pool},
        )
    if settings.ready_file:
        write_ready_file(settings.ready_file, ready)

    stop_signals.wait()
    stopping_at = time.monotonic()
    log.info("shutdown begun: no new connections or frames; sending owed replies")
    saved = instance.stop()
    print(totals_lines(instance.requests_applied, instance.value), flush=True)
    log.info(
        "stopped: %d requests applied, final counter value %d",
        instance.requests_applied,
        instance.value,
        extra={
            "requests_applied": instance.requests_applied,
            "value": instance.value,
            "saved": saved,
            "seconds": round(time.monotonic() - stopping_at, 3),
        },
    )
    flush_all()
    if not saved:  # the store logged why
        return 1
    return 0 if not instance.failed else 1


class Single:
    """The whole server in this process."""

    def __init__(self, settings: ServerSettings, claimed: Claimed) -> None:
        self.settings = settings
        self.claimed = claimed
        self.failed = False
        self.store: CounterStore = open_store(settings, claimed)
        self.server: CounterServer = build_server(
            claimed.listener, self.store, settings, claimed.tls
        )
        self.metrics: MetricsServer | None = None
        if claimed.metrics_listener is not None:
            self.metrics = serve_metrics(claimed.metrics_listener, self.server)

    def start(self, stop_signals: StopSignals) -> Ready:
        self.server.start()
        if self.metrics is not None:
            self.metrics.start()
        return _ready(self.settings, self.claimed, self.store, os.getpid(), [], self.metrics)

    def stop(self) -> bool:
        """Stop gracefully; False if the final value could not be saved."""
        self.server.stop(self.settings.shutdown_timeout)
        if self.metrics is not None:
            self.metrics.stop()
        return self.store.close()

    def force_stop(self) -> None:
        pass  # the second signal exits this process, which is everything

    @property
    def requests_applied(self) -> int:
        return self.store.requests_applied

    @property
    def value(self) -> int:
        return self.store.value


class Workers:
    """``--processes N``: this process supervises N workers sharing one counter."""

    def __init__(self, settings: ServerSettings, claimed: Claimed) -> None:
        self.settings = settings
        self.claimed = claimed
        self.failed = False
        self.shared = SharedCounter(claimed.initial)
        self.peers = shared_peer_table(settings)
        self.board = Board(settings.processes)
        self.balance = AcceptBalance(settings.processes)
        self.stopping = False
        self._signals: StopSignals | None = None
        self.supervisor = Supervisor(
            settings.processes, self._worker, self._give_up, on_death=self._worker_died
        )
        self.metrics: MetricsServer | None = None
        if claimed.metrics_listener is not None:
            self.metrics = MetricsServer(
                claimed.metrics_listener, BoardCollector(self.board), self._health
            )

    def start(self, stop_signals: StopSignals) -> Ready:
        self._signals = stop_signals
        try:
            self.supervisor.start(in_child=self._in_worker)
        except WorkersFailed:
            self._release()
            raise
        if self.metrics is not None:
            self.metrics.start()
        store = open_store(self.settings, self.claimed) if self.settings.backend else None
        origin = describe_origin(self.settings, self.claimed, store)  # asks Redis
        ready = _ready(
            self.settings, self.claimed, store, os.getpid(), self.supervisor.pids, self.metrics,
            origin,
        )  # fmt: skip
        if store is not None:
            store.close()
        return ready

    def _in_worker(self) -> None:
        """First thing in a new worker: drop what only the parent uses."""
        self._signals.cancel()
        if self.metrics is not None:
            self.metrics.drop_in_child()

    def _health(self) -> str | None:
        return "stopping" if self.stopping else self.board.health()

    def _worker(self, index: int, ready) -> int:
        """One worker process: serve on the inherited listener until SIGTERM."""
        store = open_store(self.settings, self.claimed, self.shared)
        if self.peers is not None:
            self.peers.open()
        server = build_server(
            self.claimed.listener, store, self.settings, self.claimed.tls, self.peers, index,
            self.balance,
        )  # fmt: skip
        stop_signals = StopSignals()
        server.start()
        publisher = gevent.spawn(self._publish_every, PUBLISH_SECONDS, index, server)
        ready()
        stop_signals.wait()
        server.stop(self.settings.shutdown_timeout)
        saved = store.close()
        publisher.kill()
        self._publish(index, server)  # the final figures, for the parent's totals
        flush_all()
        return 0 if saved else 1

    def _publish_every(self, seconds: float, index: int, server: CounterServer) -> None:
        while True:
            self._publish(index, server)
            gevent.sleep(seconds)

    def _publish(self, index: int, server: CounterServer) -> None:
        self.board.publish(index, ServerCollector(server).collect(), health(server))

    def _worker_died(self, index: int, pid: int) -> None:
        if pid > 0:
            self.shared.release_if_held_by(pid)
        self.board.retire(index)
        self.balance.absent(index)
        if self.peers is not None:
            self.peers.forget_worker(index)

    def _give_up(self, why: str) -> None:
        self.failed = True
        if self._signals is not None:
            self._signals.request()

    def stop(self) -> bool:
        self.stopping = True
        killed = self.supervisor.stop(self.settings.shutdown_timeout + 5)
        if self.metrics is not None:
            self.metrics.stop()
        if killed:
            log.warning("%d workers did not stop in time and were killed", killed)
        saved = True
        state = self.claimed.state
        if state is not None:  # the workers saved it; make sure of the last value
            try:
                state.commit(lambda: self.shared.value, sync=True)
            except (OSError, StateFileError) as exc:
                log.error("state file %s: the final value was not saved: %s", state.path, exc)
                saved = False
        self._release()
        return saved

    def _release(self) -> None:
        if self.claimed.state is not None:
            self.claimed.state.close()
        if self.peers is not None:
            self.peers.remove()
        self.claimed.listener.close()

    def force_stop(self) -> None:
        self.supervisor.signal_all(signal.SIGKILL)

    @property
    def requests_applied(self) -> int:
        """Every worker's, dead ones' included (as they last published)."""
        if self.settings.backend is None:
            return self.shared.requests_applied
        return int(self.board.total("counter_server_requests_applied"))

    @property
    def value(self) -> int:
        if self.settings.backend is None:
            return self.shared.value
        family = self.board.merged().get("counter_server_value")
        return int(max(family[2].values())) if family else 0


def _ready(
    settings: ServerSettings,
    claimed: Claimed,
    store: CounterStore | None,
    pid: int,
    workers: list[int],
    metrics: MetricsServer | None,
    origin: str | None = None,
) -> Ready:
    host, port = claimed.listener.getsockname()[:2]
    if origin is None:
        origin = describe_origin(settings, claimed, store)  # asks Redis for its value
    listener = claimed.listener
    dual_stack = listener.family == socket.AF_INET6 and not listener.getsockopt(
        socket.IPPROTO_IPV6, socket.IPV6_V6ONLY
    )
    return Ready(
        host=host,
        port=port,
        dual_stack=dual_stack,
        pool=pool_size(settings),
        cpus=cpu_count(),
        multiplier=settings.multiplier,
        pid=pid,
        tls=claimed.tls is not None,
        metrics_url=f"http://{metrics.address}/metrics" if metrics else None,
        workers=workers,
        initial=store.value if store is not None else claimed.initial,
        origin=origin,
    )
