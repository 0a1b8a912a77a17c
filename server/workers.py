"""``--processes N``: the workers, their supervisor, and what they share.

N worker processes accept on one listening socket that the parent opened (so
the port belongs to this one instance), each a full gevent server with its
own pool, all sharing one counter in shared memory. The parent forks them,
restarts any that dies while the others keep serving (with exponential
backoff when they keep dying young, giving up after ``GIVE_UP_AFTER`` such
deaths in a row), and stops them all on request. Each worker tells the
parent it is ready, or why it failed, through a pipe of its own that is
closed right after: nothing accumulates over a long life.

**Spreading connections** (``AcceptBalance``): all workers accept on the one
listening socket, and the kernel wakes them all for each new connection:
whichever runs first takes it, so a burst tends to go to one worker while
the others sit idle. Each worker therefore writes how many connections it
is serving into its slot of a shared array (one writer per slot: no lock),
and before accepting, a worker more than ``SLACK`` connections ahead of the
least busy live worker steps back for ``PAUSE`` seconds so that one can take
the connection. After a pause it accepts the next connection whatever the
counts say, so a worker that is slow to accept costs a new client at most
``PAUSE`` of waiting, never a refusal.

**Metrics** (``Board``): each worker publishes a snapshot of its own
collector (``ServerCollector``) and its ``Totals`` into its slot of a shared
memory board twice a second and once more when it stops; the parent's
``BoardCollector`` reads every slot at scrape time and merges them, in the
style of prometheus_client's multiprocess mode: counters and histograms are
summed, and so are the pool gauges; the counter value is the largest any
worker saw; health is the worst. When a worker dies, its last counters are
kept (``retire``), so no counter ever goes backwards. A slot is written
under a sequence number (odd while writing), so a reader never takes a
half-written snapshot.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import mmap
import os
import signal
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import gevent
from gevent import os as gevent_os
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from counter_server.common.ratelog import flush_all
from counter_server.common.signals import StopSignals
from counter_server.server.banner import Ready
from counter_server.server.cli import ServerSettings
from counter_server.server.errors import StateFileError, WorkersFailed
from counter_server.server.lifecycle import CounterServer
from counter_server.server.limits import PeerTable
from counter_server.server.metrics import MetricsServer, ServerCollector, health
from counter_server.server.store.shared import SharedCounter
from counter_server.server.wiring import (
    Claimed,
    describe_origin,
    open_store,
    ready_facts,
    shared_peer_table,
)

log = logging.getLogger("counter.processes")

PUBLISH_SECONDS = 0.5  # how often a worker publishes its figures and totals

READY_TIMEOUT = 30.0  # seconds for every worker to start at launch
PR_SET_PDEATHSIG = 1  # prctl option: a signal for this process when its parent dies
POLL_SECONDS = 0.2  # how often the parent looks for exited workers
STABLE_SECONDS = 10.0  # a worker that served this long did not die young
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 30.0  # restart delay after young deaths, doubling
GIVE_UP_AFTER = 10  # young deaths in a row before the supervisor gives up
READY = b"."  # what a worker writes once it is listening, before its note

# Runs one worker until it is told to stop; returns its exit status. Its
# arguments: the worker's index (0..N-1; a replacement takes the index of the
# worker it replaces) and the callback to call once the worker is serving,
# with a note for the parent (where its counter came from).
WorkerMain = Callable[[int, Callable[[str], None]], int]


SLACK = 1  # connections a worker may be ahead of the least busy one
PAUSE = 0.005  # seconds a worker that is ahead stops accepting
ABSENT = 2**62  # the count of a worker that is not accepting (dead, or stopping)
_SLOT = struct.Struct("=q")


SLOT_SIZE = 256 * 1024  # bytes per worker: a snapshot is a few KiB of JSON
_HEADER = struct.Struct("=QI")  # sequence number, length of the JSON that follows
# Gauges that are not summed across workers: name -> how they merge.
_GAUGE_MERGE = {"counter_server_value": max, "counter_server_healthy": min}
_PER_PROCESS = ("process_", "python_")  # each worker's own; the parent exports its own
_EMPTY = {"health": None, "totals": [0, 0], "families": []}


class Totals(NamedTuple):
    """What the parent prints at the end, as a worker last published it."""

    requests_applied: int
    value: int  # the counter as this worker last saw it


@dataclass
class _Worker:
    pid: int
    index: int
    started: float
    ready_fd: int  # the pipe it reports on; -1 once it has said all
    message: bytes = b""
    ready: bool = False
    note: str = ""  # what the worker said when it was ready
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

    @property
    def first_note(self) -> str:
        """What the worker of the lowest index said when it was ready."""
        return min(self._workers.values(), key=lambda w: w.index).note

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

        def ready(note: str) -> None:
            nonlocal told
            os.write(ready_write, READY + note.encode()[:4000])
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
        if worker.message.startswith(READY):
            worker.ready = True
            worker.note = worker.message[len(READY) :].decode(errors="replace")
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


@dataclass(frozen=True)
class Seat:
    """Worker number ``index``'s place among the workers: its slot in the
    accept balance and the limits table they share (None without limits)."""

    index: int
    balance: AcceptBalance
    peers: PeerTable | None

    @property
    def pause(self) -> float:
        return self.balance.pause

    def serving(self, count: int) -> None:
        self.balance.serving(self.index, count)

    def absent(self) -> None:
        self.balance.absent(self.index)

    def ahead(self) -> bool:
        return self.balance.ahead(self.index)


class AcceptBalance:
    """Per-worker connection counts in shared memory; create in the parent
    before forking, one slot per worker index."""

    pause = PAUSE  # how long a worker ahead of the others stops accepting

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.memory = mmap.mmap(-1, _SLOT.size * workers)
        self._format = struct.Struct(f"={workers}q")
        self._format.pack_into(self.memory, 0, *([ABSENT] * workers))

    def serving(self, index: int, count: int) -> None:
        """Worker ``index`` now serves ``count`` connections."""
        _SLOT.pack_into(self.memory, index * _SLOT.size, count)

    def absent(self, index: int) -> None:
        """Worker ``index`` accepts nothing (it died or is stopping)."""
        self.serving(index, ABSENT)

    def ahead(self, index: int) -> bool:
        """Whether worker ``index`` should let a less busy worker accept."""
        counts = self._format.unpack_from(self.memory)
        mine = counts[index]
        others = [c for i, c in enumerate(counts) if i != index and c != ABSENT]
        return bool(others) and mine > min(others) + SLACK


def _snapshot(families: Iterable[Metric], health: str | None, totals: Totals) -> bytes:
    return json.dumps({"health": health, "totals": list(totals), "families": [
        [f.name, f.type, f.documentation, [[s.name, s.labels, s.value] for s in f.samples]]
        for f in families
        if not f.name.startswith(_PER_PROCESS)
    ]}).encode()  # fmt: skip


class Board:
    """The shared memory; create in the parent before forking."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.memory = mmap.mmap(-1, workers * SLOT_SIZE)
        self._retired: dict[str, list] = {}  # family -> [kind, doc, {(sample, labels): value}]
        self._retired_totals = Totals(0, 0)

    def publish(
        self, index: int, families: Iterable[Metric], health: str | None, totals: Totals
    ) -> None:
        """In worker ``index``: replace its snapshot (its figures, its health:
        None, or why it cannot acknowledge increments, and its totals)."""
        data = _snapshot(families, health, totals)[: SLOT_SIZE - _HEADER.size]
        base = index * SLOT_SIZE
        sequence = _HEADER.unpack_from(self.memory, base)[0]
        _HEADER.pack_into(self.memory, base, sequence + 1, 0)  # odd: being written
        self.memory[base + _HEADER.size : base + _HEADER.size + len(data)] = data
        _HEADER.pack_into(self.memory, base, sequence + 2, len(data))

    def read(self, index: int) -> dict:
        """Worker ``index``'s last snapshot: {"health", "totals", "families"}."""
        base = index * SLOT_SIZE
        for _ in range(100):
            before, length = _HEADER.unpack_from(self.memory, base)
            if before % 2:
                time.sleep(0.001)
                continue
            data = bytes(self.memory[base + _HEADER.size : base + _HEADER.size + length])
            if _HEADER.unpack_from(self.memory, base)[0] == before:
                try:
                    return json.loads(data) if data else _EMPTY
                except ValueError:  # larger than a slot (cut short): skip it
                    return _EMPTY
        return _EMPTY

    def retire(self, index: int) -> None:
        """In the parent, when worker ``index`` has died: keep its counters."""
        last = self.read(index)
        applied, value = last["totals"]
        self._retired_totals = Totals(
            self._retired_totals.requests_applied + applied, max(self._retired_totals.value, value)
        )
        for name, kind, doc, samples in last["families"]:
            if kind in ("counter", "histogram"):
                values = self._retired.setdefault(name, [kind, doc, {}])[2]
                for sample, labels, value in samples:
                    key = (sample, tuple(sorted(labels.items())))
                    values[key] = values.get(key, 0.0) + value
        base = index * SLOT_SIZE
        sequence = _HEADER.unpack_from(self.memory, base)[0]
        _HEADER.pack_into(self.memory, base, sequence + 2, 0)

    def merged(self) -> dict[str, list]:
        """name -> [kind, doc, {(sample, labels): value}] over every worker."""
        merged = {
            name: [kind, doc, dict(values)] for name, (kind, doc, values) in self._retired.items()
        }
        for index in range(self.workers):
            for name, kind, doc, samples in self.read(index)["families"]:
                family = merged.setdefault(name, [kind, doc, {}])
                combine = _GAUGE_MERGE.get(name, lambda a, b: a + b)
                for sample, labels, value in samples:
                    key = (sample, tuple(sorted(labels.items())))
                    values = family[2]
                    values[key] = combine(values[key], value) if key in values else value
        return merged

    def health(self) -> str | None:
        """None while every worker can acknowledge increments, else the first reason."""
        for index in range(self.workers):
            problem = self.read(index)["health"]
            if problem is not None:
                return problem
        return None

    def totals(self) -> Totals:
        """Requests applied by every worker, dead ones' included, and the
        largest value any saw."""
        applied, value = self._retired_totals
        for index in range(self.workers):
            worker_applied, worker_value = self.read(index)["totals"]
            applied, value = applied + worker_applied, max(value, worker_value)
        return Totals(applied, value)


class BoardCollector(Collector):
    """The parent's collector: every worker's figures, merged."""

    def __init__(self, board: Board) -> None:
        self._board = board

    def collect(self) -> Iterator[Metric]:
        for name, (kind, doc, samples) in self._board.merged().items():
            family = Metric(name, doc, kind)
            for (sample, labels), value in sorted(samples.items()):
                family.add_sample(sample, dict(labels), value)
            yield family


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
        origin = self.supervisor.first_note  # no store of its own to ask
        return ready_facts(self.settings, self.claimed, origin, self.metrics, self.supervisor.pids)

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
        seat = Seat(index, self.balance, self.peers)
        server = CounterServer(self.claimed.listener, store, self.settings, self.claimed.tls, seat)
        stop_signals = StopSignals()
        server.start()
        publisher = gevent.spawn(self._publish_every, PUBLISH_SECONDS, index, server)
        ready(describe_origin(self.settings, self.claimed, store))
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
        totals = Totals(server.store.requests_applied, server.store.value)
        self.board.publish(index, ServerCollector(server).collect(), health(server), totals)

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
        return self.board.totals().requests_applied

    @property
    def value(self) -> int:
        if self.settings.backend is None:
            return self.shared.value
        return self.board.totals().value
