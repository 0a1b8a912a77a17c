"""The state file and the durable store over it: the counter survives
restarts and crashes.

**The file** (``StateFile``): a tiny, versioned, checksummed format that a
crash at any instant leaves readable.

The file is 64 bytes: two 32-byte slots, written alternately. Each slot is

    magic  b"CNTR"                      4 bytes
    format version (1), big-endian      2 bytes
    reserved, zero                      2 bytes
    sequence number, big-endian u64     8 bytes   (higher = newer)
    counter value, big-endian u64       8 bytes
    XXH64 (seed 0) of the 24 bytes above, big-endian u64

A commit overwrites the older slot (sequence n goes to slot n % 2) and syncs,
holding a lock so that writers in several processes take turns.
If the machine dies mid-write, that slot fails its checksum and the other one
still holds the previous commit, so loading takes the newest valid slot. A
new file is written whole to a temporary name, synced, renamed into place and
its directory synced, so it never exists half-written.

**The store** (``DurableCounterStore``): the in-memory store plus the state
file, with a choice of guarantees like Redis's appendfsync.

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

import fcntl
import logging
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import gevent
import xxhash
from gevent.event import Event

from counter_server.common.files import replace_file
from counter_server.common.ratelog import RateLimitedLog
from counter_server.common.values import phrase
from counter_server.server.errors import StateFileError, StoreUnavailable
from counter_server.server.store.base import CounterStore, Figure, LayeredStore

log = logging.getLogger("counter.state")

FSYNC_MODES = ("always", "everysec", "no")  # --fsync, as Redis's appendfsync
PERIODIC_SECONDS = 1.0  # everysec and no (and while failing): how often the committer writes
RETRY_SECONDS = 1.0  # after a failed commit, how long before the next try
# A commit (write and fdatasync of 64 bytes) running longer than this means
# the disk or the lock is stuck: a healthy disk takes milliseconds.
COMMIT_STALL_SECONDS = 2.0

MAGIC = b"CNTR"
VERSION = 1
SLOT_SIZE = 32
FILE_SIZE = 2 * SLOT_SIZE
_BODY = struct.Struct(">4sHHQQ")
_CHECKSUM = struct.Struct(">Q")


@dataclass(frozen=True)
class Slot:
    sequence: int
    value: int


def encode_slot(sequence: int, value: int) -> bytes:
    """One 32-byte slot."""
    body = _BODY.pack(MAGIC, VERSION, 0, sequence, value)
    return body + _CHECKSUM.pack(xxhash.xxh64_intdigest(body))


def decode_slot(raw: bytes) -> Slot | str:
    """The slot in ``raw``, or why it is not usable (a short phrase)."""
    if len(raw) != SLOT_SIZE:
        return f"slot is {len(raw)} bytes, expected {SLOT_SIZE}"
    body, (checksum,) = raw[:24], _CHECKSUM.unpack(raw[24:])
    magic, version, _, sequence, value = _BODY.unpack(body)
    if magic != MAGIC:
        return "not a counter state file (bad magic)"
    if xxhash.xxh64_intdigest(body) != checksum:
        return "checksum mismatch"
    if version != VERSION:
        return f"unknown format version {version}"
    return Slot(sequence, value)


def decode_file(path: str, raw: bytes) -> Slot:
    """The newest valid slot of a whole file; StateFileError if there is none."""
    if len(raw) != FILE_SIZE:
        raise StateFileError(
            f"state file {path}: wrong size ({len(raw)} bytes, expected {FILE_SIZE})"
        )
    slots = [decode_slot(raw[:SLOT_SIZE]), decode_slot(raw[SLOT_SIZE:])]
    valid = [s for s in slots if isinstance(s, Slot)]
    if not valid:
        problems = "; ".join(dict.fromkeys(str(s) for s in slots))
        raise StateFileError(f"state file {path}: corrupt, no valid slot ({problems})")
    return max(valid, key=lambda s: s.sequence)


class StateFile:
    """A state file owned by one server instance: ``claim``, then ``commit``.

    Ownership: ``claim`` takes an exclusive ``flock`` on the file, held on an
    open file description that worker processes inherit, so it lasts until
    the last process of the instance exits; a second instance is refused.

    Commits from the instance's worker processes take turns under a POSIX
    record lock (per process, released if a worker dies) on that same
    description. Each commit first checks that the file at the path is still
    the one it holds and still holds what was written; if it was deleted,
    replaced or damaged, it is restored from the live value with the same
    crash-safe write as creation, and ``restored`` is counted. A commit never
    writes a value below the newest one on disk.

    The locks assume a local filesystem (flock and POSIX locks are
    independent there, not on NFS).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._owner_fd = -1  # claimed, never replaced: the instance's locks
        self._fd = -1  # the file at the path, as far as we know
        self._last: Slot | None = None  # what this process last wrote or read
        self.restored = 0
        self.lock_wait_seconds = 0.0  # waiting for another worker's commit to finish
        self._events = RateLimitedLog(log)

    def claim(self) -> tuple[Slot, bool]:
        """Open the file, creating it (value 0) if missing, and take ownership.
        Returns the newest slot and whether the file existed. StateFileError
        if it is unusable or another server instance owns it."""
        existed = True
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            self._create(0)
            fd = os.open(self.path, os.O_RDWR)
            existed = False
        except OSError as exc:
            raise StateFileError(f"state file {self.path}: {phrase(exc)}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateFileError(
                    f"state file {self.path} is in use by another server instance; "
                    "stop it first (it holds the file until its last process exits)"
                ) from None
            slot = decode_file(self.path, os.pread(fd, FILE_SIZE + 1, 0))
        except BaseException:
            os.close(fd)
            raise
        self._owner_fd = self._fd = fd
        self._last = slot
        return slot, existed

    def newest(self) -> Slot:
        """The newest slot on disk (a worker reads it when it starts)."""
        slot = decode_file(self.path, os.pread(self._fd, FILE_SIZE + 1, 0))
        self._last = slot
        return slot

    def commit(self, read_value: Callable[[], int], sync: bool) -> int:
        """Write the value ``read_value()`` returns, read under the lock so that
        later commits never carry a smaller value, and sync it if ``sync``;
        returns the value written. Restores a deleted, replaced or damaged
        file (logging an error). Blocking: run it in a worker thread.

        The lock is held across the sync: a later commit may overwrite only
        a slot whose sync has finished, so one valid slot at least is always
        on disk. A worker stopped while it holds the lock holds up the
        others' commits (``lock_wait_seconds``; health reports a stall)."""
        try:
            fcntl.lockf(self._owner_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another worker's commit runs: wait for it
            started = time.perf_counter()
            fcntl.lockf(self._owner_fd, fcntl.LOCK_EX)
            self.lock_wait_seconds += time.perf_counter() - started
        try:
            value = read_value()
            problem = self._problem()
            if problem is not None:
                self._restore(value, problem)
                return value
            newest = self._last
            if newest.value > value:
                raise StateFileError(
                    f"state file {self.path} holds {newest.value}, above this server's "
                    f"{value}: another server wrote to it; not writing a smaller value"
                )
            sequence = newest.sequence + 1
            os.pwrite(self._fd, encode_slot(sequence, value), (sequence % 2) * SLOT_SIZE)
            if sync:
                os.fdatasync(self._fd)
            self._last = Slot(sequence, value)
            return value
        finally:
            fcntl.lockf(self._owner_fd, fcntl.LOCK_UN)

    def _problem(self) -> str | None:
        """Why the file at the path is not the one this instance wrote, or
        None; sets ``_last`` to its newest slot when it is fine."""
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return "was deleted"
        held = os.fstat(self._fd)
        if (at_path.st_dev, at_path.st_ino) != (held.st_dev, held.st_ino):
            return self._follow_replacement()
        try:
            newest = decode_file(self.path, os.pread(self._fd, FILE_SIZE + 1, 0))
        except StateFileError as exc:
            return f"was damaged ({str(exc).split(': ', 1)[-1]})"
        if self._last is not None and newest.sequence < self._last.sequence:
            return "was overwritten with older contents"
        self._last = newest
        return None

    def _follow_replacement(self) -> str | None:
        """The path holds another file. If it is a valid state file that
        another worker of this instance restored (numbered after everything
        this process saw), continue in it; otherwise it must be restored."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return "was deleted"
        try:
            newest = decode_file(self.path, os.pread(fd, FILE_SIZE + 1, 0))
        except StateFileError:
            os.close(fd)
            return "was replaced by another file"
        if self._last is not None and newest.sequence <= self._last.sequence:
            os.close(fd)
            return "was replaced by another file"
        if self._fd != self._owner_fd:
            os.close(self._fd)
        self._fd, self._last = fd, newest
        return None

    def _restore(self, value: int, problem: str) -> None:
        self._events.log(
            "restore",
            logging.ERROR,
            "state file %s %s; restoring it from the live value %d",
            self.path,
            problem,
            value,
            extra={"path": self.path, "problem": problem, "value": value},
        )
        # Numbered after everything seen, so other workers see it as newer.
        sequence = (self._last.sequence if self._last else 0) + 2
        self._create(value, sequence)
        fd = os.open(self.path, os.O_RDWR)
        if self._fd != self._owner_fd:
            os.close(self._fd)
        self._fd = fd
        self._last = Slot(sequence, value)
        self.restored += 1

    def _create(self, value: int, sequence: int = 1) -> None:
        """Write a whole new file holding ``value`` (both slots, the newer one
        numbered ``sequence``) under a temporary name, sync it, rename it into
        place and sync the directory."""
        newer, older = encode_slot(sequence, value), encode_slot(sequence - 1, value)
        try:
            replace_file(self.path, older + newer if sequence % 2 else newer + older, durable=True)
        except OSError as exc:
            raise StateFileError(
                f"state file {self.path}: cannot create it: {phrase(exc)}"
            ) from None

    def close(self) -> None:
        """Close this process's descriptors (ownership ends when every
        process of the instance has closed or exited)."""
        for fd in {self._fd, self._owner_fd} - {-1}:
            os.close(fd)
        self._fd = self._owner_fd = -1


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
