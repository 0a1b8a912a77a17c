"""``--processes N``: N worker processes accept on one port (SO_REUSEPORT),
each a full gevent server with its own pool, all sharing one counter in
shared memory. The parent starts them, restarts any that dies while the others
keep serving, and on SIGINT/SIGTERM stops them all and prints the totals once.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

import gevent
from gevent import os as gevent_os

from common.cli import format_address
from common.signals import StopSignals
from server.shared import SharedCounter

log = logging.getLogger("counter.processes")

READY_TIMEOUT = 30.0
PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.2

# Builds and runs one worker's server until it is told to stop; returns the
# exit status. Arguments: the shared counter, and a callback to call once the
# worker is listening.
WorkerMain = Callable[[SharedCounter, Callable[[], None]], int]


class Supervisor:
    """Forks and watches the workers (the parent process)."""

    def __init__(self, count: int, shared: SharedCounter, worker_main: WorkerMain) -> None:
        self.count = count
        self.shared = shared
        self._worker_main = worker_main
        self._workers: set[int] = set()
        self._stopping = False
        self._ready_read, self._ready_write = os.pipe()
        os.set_blocking(self._ready_read, False)
        self.restarts = 0
        self._signals: StopSignals | None = None

    def start(self, signals: StopSignals) -> None:
        """Fork every worker and wait until each is listening."""
        self._signals = signals
        for _ in range(self.count):
            self._fork()
        ready = 0
        try:
            with gevent.Timeout(READY_TIMEOUT):
                while ready < self.count:
                    ready += len(gevent_os.nb_read(self._ready_read, self.count - ready))
        except gevent.Timeout:
            self.stop(timeout=1.0)
            raise RuntimeError(f"only {ready} of {self.count} workers started") from None
        gevent.spawn(self._watch)

    def _fork(self) -> None:
        pid = gevent_os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                _die_with_parent()
                if self._signals is not None:
                    self._signals.cancel()  # the parent's watchers came along
                status = self._worker_main(self.shared, lambda: os.write(self._ready_write, b"."))
            except BaseException:
                log.exception("worker %d failed", os.getpid())
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        self._workers.add(pid)

    def _watch(self) -> None:
        while True:
            gevent.sleep(POLL_SECONDS)
            for pid in list(self._workers):
                done, status = os.waitpid(pid, os.WNOHANG)
                if not done:
                    continue
                self._workers.discard(pid)
                if not self._stopping:
                    self.restarts += 1
                    log.warning("worker %d exited (%s); starting a new one", pid, _describe(status))
                    self._fork()

    def stop(self, timeout: float) -> int:
        """SIGTERM every worker, wait up to ``timeout`` s, SIGKILL the rest;
        returns how many had to be killed."""
        self._stopping = True
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self._workers and time.monotonic() < deadline:
            gevent.sleep(POLL_SECONDS)
        killed = len(self._workers)
        self.signal_all(signal.SIGKILL)
        for pid in list(self._workers):
            os.waitpid(pid, 0)
        self._workers.clear()
        return killed

    def signal_all(self, signum: int) -> None:
        for pid in list(self._workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    @property
    def pids(self) -> list[int]:
        return sorted(self._workers)


def reserve_port(host: str, port: int) -> tuple[socket.socket, str]:
    """Bind (without listening) a SO_REUSEPORT socket on ``host:port`` so the
    port is ours and known (``port`` 0 picks one); workers bind the same."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if host == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock, format_address(sock.getsockname())


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker if the parent dies (even by SIGKILL),
    so no orphan keeps serving the port."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the parent's stop still stops the workers


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
