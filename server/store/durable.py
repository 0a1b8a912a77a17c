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

Stalls: a commit that has not finished within ``COMMIT_STALL_SECONDS`` (a
frozen or failing disk; with ``--processes``, another worker stopped while it
holds the state file's lock) makes ``health`` say so until it finishes; the
replies waiting for it go out then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import gevent
from gevent.event import Event

from counter_server.common.ratelog import RateLimitedLog
from counter_server.common.values import phrase
from counter_server.server.errors import StateFileError, StoreUnavailable
from counter_server.server.store.base import CounterStore, Figure, LayeredStore
from counter_server.server.store.statefile import StateFile

log = logging.getLogger("counter.state")

FSYNC_MODES = ("always", "everysec", "no")
PERIODIC_SECONDS = 1.0
RETRY_SECONDS = 1.0
# A commit (write and fdatasync of 64 bytes) running longer than this means
# the disk or the lock is stuck: a healthy disk takes milliseconds.
COMMIT_STALL_SECONDS = 2.0


class DurableCounterStore(LayeredStore):
    """``CounterStore`` that makes ``core``'s value durable in a ``StateFile``.

    Durability is tracked by value: the counter only rises, so a reply value v
    is durable once a commit has written a value >= v. That holds whether the
    core is this process's memory or a counter shared by several processes
    (each process's committer writes the shared value, which covers its own).
    """

    def __init__(
        self, state: StateFile, core: CounterStore, fsync: str, on_disk: int | None = None
    ) -> None:
        """``on_disk``: the value the file is known to hold (the newest slot
        read at start); a worker restarted beside running ones must pass it,
        since the shared counter may be ahead of the disk."""
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {FSYNC_MODES}, got {fsync!r}")
        super().__init__(core)
        self._state = state
        self._fsync = fsync
        self._durable_value = core.value if on_disk is None else on_disk
        self._in_flight: tuple[int, Event] | None = None  # (value it covers, done)
        self._next_commit = Event()
        self._wake = Event()
        self._failure: str | None = None
        self._closed = False
        self._events = RateLimitedLog(log)  # a failing disk fails every second
        self.commits = 0
        self.commit_failures = 0
        self.commit_seconds = 0.0
        self.batches_committed = 0  # applies (one per connection read) that waited on commits
        self._waiting = 0
        self._commit_started: float | None = None  # monotonic start of the running commit
        self._committer = gevent.spawn(self._run)

    def apply(self, increments: Sequence[int]) -> Sequence[int]:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        replies = self._core.apply(increments)
        if self._fsync == "always" and replies and replies[-1] > self._durable_value:
            self._wait_durable(replies[-1])
        return replies

    def _wait_durable(self, value: int) -> None:
        if self._in_flight is not None and value <= self._in_flight[0]:
            done = self._in_flight[1]
        else:
            done = self._next_commit
            self._wake.set()
        self._waiting += 1
        done.wait()
        if self._durable_value < value:
            raise StoreUnavailable(f"state file {self._state.path}: {self._failure}")

    def _run(self) -> None:
        while True:
            if self._fsync == "always" and self._failure is None:
                self._wake.wait()
            else:  # periodic, and failing commits are retried until one works
                self._wake.wait(timeout=PERIODIC_SECONDS)
            self._wake.clear()
            if self._core.value <= self._durable_value and self._failure is None:
                # A commit that finished meanwhile already wrote what they
                # wait for (it reads the value late): release the waiters.
                done, self._next_commit = self._next_commit, Event()
                done.set()
                continue
            if not self._commit(sync=self._fsync != "no"):
                gevent.sleep(RETRY_SECONDS)

    def _commit(self, sync: bool) -> bool:
        """Write (and sync) the current value; wake everyone it covers."""
        done, self._next_commit = self._next_commit, Event()
        covers = self._core.value  # every apply so far; the file gets at least this
        self._in_flight = (covers, done)
        waiting, self._waiting = self._waiting, 0
        started = time.perf_counter()
        self._commit_started = time.monotonic()
        try:
            written = gevent.get_hub().threadpool.apply(self._write, (sync,))
            if isinstance(written, Exception):
                raise written
        except (OSError, StateFileError) as exc:
            self._failure = self._describe(exc)
            self.commit_failures += 1
            self._events.log(
                "commit-failed",
                logging.ERROR,
                "state file %s: %s; replies wait until it works",
                self._state.path,
                self._failure,
                extra={"path": self._state.path, "error": self._failure},
            )
            self._waiting += waiting
            ok = False
        else:
            if self._failure is not None:
                log.warning("state file %s: writable again", self._state.path)
            self._failure = None
            self._durable_value = max(self._durable_value, written)
            self.commits += 1
            self.commit_seconds += time.perf_counter() - started
            self.batches_committed += waiting
            ok = True
        finally:
            self._in_flight = None
            if self._commit_started is not None and self._stalled_for() > COMMIT_STALL_SECONDS:
                log.warning(
                    "state file %s: the commit finished after %.1f s",
                    self._state.path,
                    self._stalled_for(),
                )
            self._commit_started = None
            done.set()
        return ok

    def _stalled_for(self) -> float:
        """Seconds the running commit has taken so far (0 when none runs)."""
        started = self._commit_started
        return 0.0 if started is None else time.monotonic() - started

    def _write(self, sync: bool) -> int | Exception:
        """The commit, in a worker thread. An expected failure is returned,
        not raised, so the thread pool does not report it as a crash."""
        try:
            return self._state.commit(lambda: self._core.value, sync)
        except (OSError, StateFileError) as exc:
            return exc

    def _describe(self, exc: Exception) -> str:
        """A failure as a phrase, without the path the log line already names."""
        if isinstance(exc, OSError):
            return f"cannot write: {phrase(exc)}"
        return str(exc).removeprefix(f"state file {self._state.path}").lstrip(": ")

    def health(self) -> str | None:
        stalled = self._stalled_for()
        if stalled > COMMIT_STALL_SECONDS:
            return (
                f"state file {self._state.path}: a commit has not finished for {stalled:.1f} s "
                "(disk stalled, or another worker holds the file's lock); replies wait for it"
            )
        if self._failure is not None:
            return f"state file {self._state.path}: {self._failure}"
        return self._core.health()

    def figures(self) -> list[Figure]:
        return [
            Figure("state_commits", "Writes of the state file.", self.commits),
            Figure("state_commit_seconds", "Time spent writing (and syncing) the state file.",
                   self.commit_seconds),
            Figure("state_batches_committed",
                   "Applies (one per connection read) that waited for a commit (fsync always);"
                   " divided by commits, the group-commit batch.", self.batches_committed),
            Figure("state_commit_failures", "State file commits that failed.",
                   self.commit_failures),
            Figure("state_commit_running_seconds",
                   "How long the commit running now has taken (0 when none runs); over "
                   f"{COMMIT_STALL_SECONDS:g} s /healthz says 503.", self._stalled_for(), "gauge"),
            Figure("state_lock_wait_seconds",
                   "Time commits waited for the state file's lock held by another worker"
                   " (--processes).", self._state.lock_wait_seconds),
            Figure("state_restores",
                   "Times the state file was found deleted, replaced or damaged and restored.",
                   self._state.restored),
            *self._core.figures(),
        ]  # fmt: skip

    def close(self) -> bool:
        """Write and sync the final value; further applies are refused.
        False (and an error logged) if it could not be saved."""
        self._closed = True
        if self._in_flight is not None:
            self._in_flight[1].wait()
        self._committer.kill()
        saved = self._commit(sync=True)
        if not saved:
            log.error(
                "state file %s: the final value %d was not saved", self._state.path, self.value
            )
        self._state.close()
        return self._core.close() and saved
