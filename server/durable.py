"""A counter store that survives restarts and crashes: the in-memory store
plus a state file, with a choice of guarantees like Redis's appendfsync.

- ``always``: ``apply`` returns (and so replies go out) only once the value it
  reports is on disk. Group commit: a committer greenlet writes and syncs in a
  worker thread, and every frame applied by any connection while a sync is in
  flight shares the next one; the server keeps serving meanwhile.
- ``everysec``: the committer writes and syncs about once a second; a crash
  loses at most the last second or so of acknowledged increments.
- ``no``: written about once a second without syncing (the OS flushes when it
  likes); synced at graceful shutdown.

``close`` always writes and syncs the final value.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import gevent
from gevent.event import Event

from server.statefile import StateFile
from server.store import MemoryCounterStore

log = logging.getLogger("counter.state")

FSYNC_MODES = ("always", "everysec", "no")
PERIODIC_SECONDS = 1.0
RETRY_SECONDS = 1.0


class StoreUnavailable(OSError):
    """The state could not be made durable; no reply may be sent."""


class DurableCounterStore:
    """``CounterStore`` backed by a ``StateFile`` (see the module docstring)."""

    def __init__(self, state: StateFile, initial: int, sequence: int, fsync: str) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {FSYNC_MODES}, got {fsync!r}")
        self._state = state
        self._memory = MemoryCounterStore(initial)
        self._fsync = fsync
        self._sequence = sequence  # of the last commit written
        self._version = 0  # bumped by every apply that changed the value
        self._durable = 0  # the version the disk holds
        self._in_flight: tuple[int, Event] | None = None
        self._next_commit = Event()
        self._wake = Event()
        self._failure: str | None = None
        self._closed = False
        self.commits = 0
        self.commit_seconds = 0.0
        self.batches_committed = 0  # applies (one per connection read) covered by commits
        self._committer = gevent.spawn(self._run)

    @property
    def value(self) -> int:
        return self._memory.value

    @property
    def requests_applied(self) -> int:
        return self._memory.requests_applied

    @property
    def durable_value_lag(self) -> int:
        """Applies not yet on disk (0 when everything is durable)."""
        return self._version - self._durable

    def apply(self, increments: Sequence[int]) -> Sequence[int]:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        before = self._memory.value
        replies = self._memory.apply(increments)
        if replies and replies[-1] != before:
            self._version += 1
        if self._fsync == "always" and replies and self._version > self._durable:
            self._wait_durable(self._version)
        return replies

    def _wait_durable(self, version: int) -> None:
        if self._in_flight is not None and version <= self._in_flight[0]:
            done = self._in_flight[1]
        else:
            done = self._next_commit
            self._wake.set()
        done.wait()
        if self._durable < version:
            raise StoreUnavailable(f"state file {self._state.path}: {self._failure}")

    def _run(self) -> None:
        while True:
            if self._fsync == "always":
                self._wake.wait()
            else:
                self._wake.wait(timeout=PERIODIC_SECONDS)
            self._wake.clear()
            if self._version == self._durable:
                continue
            if not self._commit(sync=self._fsync != "no"):
                gevent.sleep(RETRY_SECONDS)

    def _commit(self, sync: bool) -> bool:
        """Write (and sync) the current value; wake everyone it covers."""
        done, self._next_commit = self._next_commit, Event()
        version, value = self._version, self._memory.value
        self._in_flight = (version, done)
        started = time.perf_counter()
        try:
            self._sequence += 1
            threadpool = gevent.get_hub().threadpool
            threadpool.apply(self._state.write, (self._sequence, value))
            if sync:
                threadpool.apply(self._state.sync)
        except OSError as exc:
            self._failure = f"cannot write: {exc.strerror or exc}"
            log.error("state file %s: %s; replies wait until it works", self._state.path, exc)
            ok = False
        else:
            if self._failure is not None:
                log.warning("state file %s: writable again", self._state.path)
            self._failure = None
            self.batches_committed += version - self._durable
            self._durable = version
            self.commits += 1
            self.commit_seconds += time.perf_counter() - started
            ok = True
        finally:
            self._in_flight = None
            done.set()
        return ok

    def close(self) -> None:
        """Write and sync the final value; further applies are refused."""
        self._closed = True
        if self._in_flight is not None:
            self._in_flight[1].wait()
        self._committer.kill()
        self._version += 1  # force one last write even if nothing changed
        if not self._commit(sync=True):
            log.error(
                "state file %s: the final value %d was not saved", self._state.path, self.value
            )
        self._state.close()
