"""Per-IP limits across ``--processes`` workers: one table in shared memory,
created by the parent before it forks, holding for each peer key (an IPv4
address or an IPv6 prefix) its connections per worker and its token bucket.

Every operation takes an exclusive ``flock`` on a lock file that each worker
opens for itself (the kernel releases it if a worker dies). Connection
counts are kept per worker so that the parent can drop a dead worker's
connections (``forget_worker``). An entry lives while its peer has
connections; the table is an open-addressing hash with linear probing and
backward-shift deletion, sized at twice the connections the server can
serve at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

import gevent
from counter_server.protocol import FRAME_SIZE
from counter_server.server.admission import Admission, Network
from counter_server.server.close import CloseReason, Refused

_EMPTY = bytes(16)


def _digest(key: str) -> bytes:
    digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
    return digest if digest != _EMPTY else b"\x01" + digest[1:]


class PeerTable:
    """The shared table; create in the parent, ``open`` in each worker."""

    def __init__(self, capacity: int, workers: int, rate: float | None, burst: int | None) -> None:
        self.size = 1 << max(10, (2 * capacity - 1).bit_length())
        self.workers = workers
        self.rate, self.burst = rate, burst
        # digest, tokens, updated, then one connection count per worker
        self._slot = struct.Struct(f"=16sdd{workers}I")
        self.memory = mmap.mmap(-1, self.size * self._slot.size)
        handle, self.lock_path = tempfile.mkstemp(prefix="counter-peers-")
        os.close(handle)
        self._lock_fd = -1

    def open(self) -> None:
        """In a worker, after the fork: a lock descriptor of its own."""
        self._lock_fd = os.open(self.lock_path, os.O_RDWR)

    def remove(self) -> None:
        """Delete the lock file (the parent, at exit)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.lock_path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = self._lock_fd if self._lock_fd >= 0 else os.open(self.lock_path, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            if fd != self._lock_fd:
                os.close(fd)

    # --- slots -----------------------------------------------------------------

    def _read(self, index: int) -> list:
        return list(self._slot.unpack_from(self.memory, index * self._slot.size))

    def _write(self, index: int, fields: Sequence) -> None:
        self._slot.pack_into(self.memory, index * self._slot.size, *fields)

    def _home(self, digest: bytes) -> int:
        return int.from_bytes(digest[:8], "little") % self.size

    def _find(self, digest: bytes, create: bool) -> int | None:
        index = self._home(digest)
        for _ in range(self.size):
            stored = self.memory[index * self._slot.size : index * self._slot.size + 16]
            if stored == digest:
                return index
            if stored == _EMPTY:
                if not create:
                    return None
                burst = float(self.burst or 0)
                self._write(index, [digest, burst, time.monotonic(), *([0] * self.workers)])
                return index
            index = (index + 1) % self.size
        return None  # full

    def _delete(self, index: int) -> None:
        """Backward-shift deletion: keeps every other key reachable."""
        hole, probe = index, index
        while True:
            probe = (probe + 1) % self.size
            fields = self._read(probe)
            if fields[0] == _EMPTY:
                break
            home = self._home(fields[0])
            # Does its home lie after the hole (cyclically, up to the probe)?
            stays = hole < home <= probe if hole < probe else not probe < home <= hole
            if stays:
                continue  # its home is after the hole: it must not move before it
            self._write(hole, fields)
            hole = probe
        self._write(hole, [_EMPTY, 0.0, 0.0, *([0] * self.workers)])

    # --- connections -------------------------------------------------------------

    def enter(self, key: str, worker: int, limit: int | None) -> None:
        """Count a connection of ``key`` on ``worker``; Refused if ``key``
        already has ``limit`` connections across all workers (or the table is full)."""
        digest = _digest(key)
        with self._locked():
            index = self._find(digest, create=True)
            if index is None:
                raise Refused(CloseReason.PER_IP_LIMIT)
            fields = self._read(index)
            if limit is not None and sum(fields[3:]) >= limit:
                raise Refused(CloseReason.PER_IP_LIMIT)
            fields[3 + worker] += 1
            self._write(index, fields)

    def leave(self, key: str, worker: int) -> None:
        """A connection of ``key`` on ``worker`` closed."""
        with self._locked():
            index = self._find(_digest(key), create=False)
            if index is None:
                return
            fields = self._read(index)
            fields[3 + worker] = max(0, fields[3 + worker] - 1)
            if sum(fields[3:]):
                self._write(index, fields)
            else:
                self._delete(index)

    def forget_worker(self, worker: int) -> None:
        """A worker died: its connections are gone (the parent calls this)."""
        with self._locked():
            index = 0
            while index < self.size:
                fields = self._read(index)
                if fields[0] != _EMPTY and fields[3 + worker]:
                    fields[3 + worker] = 0
                    if not sum(fields[3:]):
                        self._delete(index)
                        continue  # another entry may have moved here
                    self._write(index, fields)
                index += 1

    def connections(self, key: str) -> int:
        """Connections of ``key`` across every worker."""
        with self._locked():
            index = self._find(_digest(key), create=False)
            return 0 if index is None else sum(self._read(index)[3:])

    # --- token buckets -----------------------------------------------------------

    def take_budget(self, key: str, pending_bytes: int) -> tuple[int, float]:
        """(bytes the key may read now, seconds to wait first): refills the
        key's bucket and, when it is empty, says how long until one token."""
        with self._locked():
            index = self._find(_digest(key), create=False)
            if index is None:
                return FRAME_SIZE - pending_bytes, 0.0
            fields = self._read(index)
            now = time.monotonic()
            tokens = min(self.burst, fields[1] + (now - fields[2]) * self.rate)
            fields[1], fields[2] = tokens, now
            self._write(index, fields)
        wait = (1 - tokens) / self.rate if tokens < 1 else 0.0
        return max(1, int(tokens)) * FRAME_SIZE - pending_bytes, wait

    def spend(self, key: str, frames: int) -> None:
        with self._locked():
            index = self._find(_digest(key), create=False)
            if index is not None:
                fields = self._read(index)
                fields[1] -= frames
                self._write(index, fields)


class SharedAdmission(Admission):
    """``Admission`` whose per-IP counts live in a ``PeerTable``: the cap
    holds across every worker. Every admitted connection is counted, so
    the table also pins the peer's shared token bucket."""

    def __init__(
        self, table: PeerTable, worker: int, allow: Sequence[Network], max_per_ip: int | None
    ) -> None:
        super().__init__(allow, None)
        self._table, self._worker, self._limit = table, worker, max_per_ip

    @property
    def active(self) -> bool:
        return True

    def admit(self, ip: str, key: str) -> None:
        if self._allow and not self.allowed(ip):
            raise Refused(CloseReason.NOT_ALLOWED)
        self._table.enter(key, self._worker, self._limit)

    def release(self, key: str) -> None:
        self._table.leave(key, self._worker)


class SharedBucket:
    """A peer's token bucket in the table, with ``TokenBucket``'s interface."""

    __slots__ = ("_key", "_limiter")

    def __init__(self, limiter: SharedRateLimiter, key: str) -> None:
        self._limiter, self._key = limiter, key

    def read_budget(self, pending_bytes: int) -> int:
        table = self._limiter.table
        budget, wait = table.take_budget(self._key, pending_bytes)
        if wait:
            self._limiter.throttled_seconds += wait
            self._limiter.sleep(wait)
            budget, _ = table.take_budget(self._key, pending_bytes)
        return budget

    def spend(self, frames: int) -> None:
        self._limiter.table.spend(self._key, frames)


class SharedRateLimiter:
    """``RateLimiter`` whose buckets live in a ``PeerTable`` (pinned by
    ``SharedAdmission``), so the rate holds across every worker."""

    def __init__(self, table: PeerTable, sleep: Callable[[float], None] = gevent.sleep) -> None:
        self.table = table
        self.sleep = sleep
        self.throttled_seconds = 0.0  # this worker's waits

    def acquire(self, key: str) -> SharedBucket:
        return SharedBucket(self, key)

    def release(self, key: str) -> None:
        pass  # the admission's release drops the entry with the last connection
