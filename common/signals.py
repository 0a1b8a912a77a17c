"""SIGINT/SIGTERM handling for gevent programs: the first signal asks for a
graceful stop, a second one exits the process at once."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

import gevent
from gevent.event import Event

log = logging.getLogger("counter.signals")


class StopSignals:
    """Watches SIGINT and SIGTERM from creation on.

    The first signal sets the event ``wait()`` returns on and calls
    ``on_stop`` (if given); a second one calls ``on_force`` (if given) and
    exits with status 128 + signal.
    """

    def __init__(
        self,
        on_stop: Callable[[], None] | None = None,
        on_force: Callable[[], None] | None = None,
    ) -> None:
        self._requested = Event()
        self._on_stop = on_stop
        self._on_force = on_force
        # A watcher stops working once garbage-collected: keep references.
        self._watchers = [
            gevent.signal_handler(signum, self._on_signal, signum)
            for signum in (signal.SIGINT, signal.SIGTERM)
        ]

    def wait(self) -> None:
        """Block until the first stop signal."""
        self._requested.wait()

    def request(self) -> None:
        """Ask for the graceful stop from inside the program, as a signal would."""
        self._requested.set()

    def cancel(self) -> None:
        """Stop watching; the signals get their default behaviour back."""
        for watcher in self._watchers:
            watcher.cancel()

    def _on_signal(self, signum: int) -> None:
        if self._requested.is_set():
            name = signal.Signals(signum).name
            log.warning("second %s: exiting now without waiting for owed replies", name)
            if self._on_force is not None:
                self._on_force()
            os._exit(128 + signum)
        self._requested.set()
        if self._on_stop is not None:
            self._on_stop()
