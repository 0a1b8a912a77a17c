"""``--processes N``: N worker processes accept on one listening socket that
the parent opened (so the port belongs to this one instance), each a full
gevent server with its own pool, all sharing one counter in shared memory.

The parent forks them, restarts any that dies while the others keep serving
(with exponential backoff when they keep dying young, giving up after
``GIVE_UP_AFTER`` such deaths in a row), and stops them all on request.
Each worker tells the parent it is ready, or why it failed, through a pipe of
its own that is closed right after: nothing accumulates over a long life.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent
from gevent import os as gevent_os

from counter_server.server.errors import WorkersFailed

log = logging.getLogger("counter.processes")

READY_TIMEOUT = 30.0  # seconds for every worker to start at launch
PR_SET_PDEATHSIG = 1  # prctl option: a signal for this process when its parent dies
POLL_SECONDS = 0.2  # how often the parent looks for exited workers
STABLE_SECONDS = 10.0  # a worker that served this long did not die young
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 30.0  # restart delay after young deaths, doubling
GIVE_UP_AFTER = 10  # young deaths in a row before the supervisor gives up
READY = b"."  # what a worker writes once it is listening

# Runs one worker until it is told to stop; returns its exit status. Its
# arguments: the worker's index (0..N-1; a replacement takes the index of the
# worker it replaces) and the callback to call once the worker is serving.
WorkerMain = Callable[[int, Callable[[], None]], int]


@dataclass
class _Worker:
    pid: int
    index: int
    started: float
    ready_fd: int  # the pipe it reports on; -1 once it has said all
    message: bytes = b""
    ready: bool = False
    failure: str = ""  # what the worker said before it exited, if it failed at start


class Supervisor:
    """Forks and watches the workers (the parent process)."""

    def __init__(
        self,
        count: int,
        worker_main: WorkerMain,
        on_give_up: Callable[[str], None],
        on_death: Callable[[int, int], None] = lambda index, pid: None,
    ) -> None:
        """``on_death(index, pid)`` runs in the parent when a worker has
        exited, before it is replaced (to drop state the dead worker held)."""
        self.count = count
        self._worker_main = worker_main
        self._on_give_up = on_give_up
        self._on_death = on_death
        self._workers: dict[int, _Worker] = {}
        self._stopping = False
        self._young_deaths = 0
        self.restarts = 0
        self._in_child: Callable[[], None] = lambda: None
        self._watcher: gevent.Greenlet | None = None

    def start(self, in_child: Callable[[], None] = lambda: None) -> None:
        """Fork every worker and wait until each is serving; WorkersFailed if
        not. ``in_child`` runs first in each worker (to drop parent-only state)."""
        self._in_child = in_child
        for index in range(self.count):
            self._fork(index)
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(w.ready for w in self._workers.values()):
            for worker in self._workers.values():
                self._hear_from(worker)
            failed = [w for w in self._workers.values() if w.failure]
            if failed or time.monotonic() > deadline:
                ready = sum(w.ready for w in self._workers.values())
                cause = failed[0].failure if failed else "timed out"
                self.stop(timeout=1.0)
                raise WorkersFailed(f"only {ready} of {self.count} workers started: {cause}")
            gevent.sleep(0.01)
        self._watcher = gevent.spawn(self._watch)

    @property
    def pids(self) -> list[int]:
        return sorted(self._workers)

    def stop(self, timeout: float) -> int:
        """SIGTERM every worker, wait up to ``timeout`` s, SIGKILL the rest;
        returns how many had to be killed."""
        self._stopping = True
        if self._watcher is not None:
            self._watcher.kill()
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self._workers and time.monotonic() < deadline:
            for worker, _ in self._reap():
                self._hear_from(worker)  # closes its pipe
            if self._workers:
                gevent.sleep(0.05)
        killed = len(self._workers)
        self.signal_all(signal.SIGKILL)
        for pid in list(self._workers):
            os.waitpid(pid, 0)
        for worker in self._workers.values():
            if worker.ready_fd >= 0:
                os.close(worker.ready_fd)
        self._workers.clear()
        return killed

    def signal_all(self, signum: int) -> None:
        for pid in list(self._workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _fork(self, index: int) -> None:
        ready_read, ready_write = os.pipe()
        pid = gevent_os.fork()
        if pid == 0:  # the worker
            os.close(ready_read)
            self._forget_parent_state()
            os._exit(self._run_worker(index, ready_write))
        os.close(ready_write)
        os.set_blocking(ready_read, False)
        self._workers[pid] = _Worker(pid, index, time.monotonic(), ready_read)

    def _forget_parent_state(self) -> None:
        """In a new worker: drop the copies of the parent's watcher and of
        the other workers' pipes, which are the parent's business."""
        if self._watcher is not None:
            self._watcher.kill(block=False)
        for worker in self._workers.values():
            if worker.ready_fd >= 0:
                os.close(worker.ready_fd)
        self._workers.clear()

    def _run_worker(self, index: int, ready_write: int) -> int:
        status = 1
        told = False

        def ready() -> None:
            nonlocal told
            os.write(ready_write, READY)
            os.close(ready_write)
            told = True

        try:
            _die_with_parent()
            self._in_child()
            status = self._worker_main(index, ready)
        except BaseException as exc:
            if told:  # a bug while serving: the traceback helps
                log.exception("worker %d failed", os.getpid())
            else:  # failed at start: the parent logs it, once per restart
                with contextlib.suppress(OSError):
                    os.write(ready_write, f"{type(exc).__name__}: {exc}".encode()[:4000])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        return status

    def _hear_from(self, worker: _Worker) -> None:
        """Read what the worker said so far (never blocks); at end of file,
        settle whether it is ready or failed and close the pipe. Polled, not
        left to a greenlet: a worker forked later would inherit the greenlet
        and read the message meant for the parent."""
        if worker.ready_fd < 0:
            return
        try:
            while chunk := os.read(worker.ready_fd, 4096):
                worker.message += chunk
        except BlockingIOError:
            return
        except OSError as exc:
            worker.message = worker.message or f"cannot hear from it: {exc}".encode()
        os.close(worker.ready_fd)
        worker.ready_fd = -1
        if worker.message == READY:
            worker.ready = True
        else:
            worker.failure = worker.message.decode(errors="replace") or "exited before it was ready"

    def _watch(self) -> None:
        while True:
            gevent.sleep(POLL_SECONDS)
            for worker in self._workers.values():
                self._hear_from(worker)
            for worker, status in self._reap():
                self._replace(worker, status)

    def _reap(self) -> list[tuple[_Worker, int]]:
        exited = []
        for pid in list(self._workers):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                exited.append((self._workers.pop(pid), status))
        return exited

    def _replace(self, worker: _Worker, status: int) -> None:
        self._hear_from(worker)  # it has exited: the pipe is at its end
        self._on_death(worker.index, worker.pid)
        cause = (_describe(status) if worker.pid > 0 else "not started") + (
            f": {worker.failure}" if worker.failure else ""
        )
        young = not worker.ready or time.monotonic() - worker.started < STABLE_SECONDS
        self._young_deaths = self._young_deaths + 1 if young else 0
        if self._young_deaths >= GIVE_UP_AFTER:
            message = (
                f"worker {worker.pid} {cause}; {self._young_deaths} workers in a row died "
                "young: giving up"
            )
            log.error("%s", message)
            self._on_give_up(message)
            return
        delay = BACKOFF_FIRST * 2 ** (self._young_deaths - 1) if self._young_deaths else 0.0
        delay = min(delay, BACKOFF_MAX)
        self.restarts += 1
        log.warning(
            "worker %s %s; starting a new one in %.1fs (restart %d)",
            worker.pid,
            cause,
            delay,
            self.restarts,
            extra={"worker": worker.pid, "cause": cause, "delay": delay, "restart": self.restarts},
        )
        gevent.spawn_later(delay, self._fork_unless_stopping, worker.index)

    def _fork_unless_stopping(self, index: int) -> None:
        if self._stopping:
            return
        try:
            self._fork(index)
        except OSError as exc:  # no descriptors or memory for a new process
            failed = _Worker(-1, index, time.monotonic(), -1, failure=f"cannot fork: {exc}")
            self._replace(failed, 0)


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
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"
