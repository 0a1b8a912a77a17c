"""Run a server instance: claim its port and state file, start it (one
process, or ``--processes`` workers), announce it, wait for SIGINT/SIGTERM,
stop it gracefully and print the totals. Exit status: 0, 1 if it could not
start or could not save its final value, 2 for a usage error.
"""

from __future__ import annotations

import logging
import sys
import time

from counter_server.common.cli import configure_logging
from counter_server.common.gevent_errors import log_gevent_errors
from counter_server.common.ratelog import flush_all
from counter_server.common.signals import StopSignals
from counter_server.server.banner import Ready, startup_line, totals_lines, write_ready_file
from counter_server.server.cli import ServerSettings, parse_settings
from counter_server.server.errors import SetupError
from counter_server.server.lifecycle import CounterServer
from counter_server.server.metrics import MetricsServer, serve_metrics
from counter_server.server.store import CounterStore
from counter_server.server.wiring import Claimed, claim, describe_origin, open_store, ready_facts
from counter_server.server.workers import Workers

log = logging.getLogger("counter.server")


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
        self.server = CounterServer(claimed.listener, self.store, settings, claimed.tls)
        self.metrics: MetricsServer | None = None
        if claimed.metrics_listener is not None:
            self.metrics = serve_metrics(claimed.metrics_listener, self.server)

    def start(self, stop_signals: StopSignals) -> Ready:
        self.server.start()
        if self.metrics is not None:
            self.metrics.start()
        origin = describe_origin(self.settings, self.claimed, self.store)  # may ask Redis
        return ready_facts(self.settings, self.claimed, origin, self.metrics)

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
