"""Per-IP limits across ``--processes`` workers: one table in shared memory,
created by the parent before it forks, holding for each peer key (an IPv4
address or an IPv6 prefix) its connections per worker and its token bucket.

Every operation takes an exclusive ``flock`` on a lock file that each worker
opens for itself (the kernel releases it if a worker dies). Connection
counts are kept per worker so that the parent can drop a dead worker's
connections (``forget_worker``). An entry lives while its peer has
connections, and after that while its bucket is in debt (until it would be
full again), so that reconnecting does not forget the debt. The table is an
open-addressing hash with linear probing and backward-shift deletion, sized
at twice the connections the server can serve at once; entries of peers
that are gone and rested are swept when a probe grows long.
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
from collections.abc import Iterator, Sequence

from counter_server.server.admission import Admission, Network
from counter_server.server.errors import CloseReason, TurnedAway

_EMPTY = bytes(16)
# A probe this long for a new entry sweeps out the rested ones first: with
# live entries at most half the table, longer probes mean stale entries.
LONG_PROBE = 32


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
        if not create:
            return self._probe(digest, False, self.size)
        index = self._probe(digest, True, LONG_PROBE)
        if index is None:  # a long probe: sweep out the rested entries first
            self._sweep()
            index = self._probe(digest, True, self.size)
        return index

    def _probe(self, digest: bytes, create: bool, limit: int) -> int | None:
        """The slot of ``digest``, looking at most ``limit`` slots; with
        ``create``, a new entry in the first free one (None if there is none)."""
        index = self._home(digest)
        for _ in range(min(limit, self.size)):
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
        return None  # full, or past the limit

    def _rested(self, fields: Sequence, now: float) -> bool:
        """An entry with no connection whose bucket is full again (or no rate)."""
        if sum(fields[3:]):
            return False
        return self.rate is None or fields[1] + (now - fields[2]) * self.rate >= self.burst

    def _sweep(self) -> None:
        """Delete every rested entry (backward shift may move another entry
        into the slot just emptied: look at it again)."""
        now, index = time.monotonic(), 0
        while index < self.size:
            fields = self._read(index)
            if fields[0] != _EMPTY and self._rested(fields, now):
                self._delete(index)
                continue
            index += 1

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
        """Count a connection of ``key`` on ``worker``; TurnedAway if ``key``
        already has ``limit`` connections across all workers (or the table is full)."""
        digest = _digest(key)
        with self._locked():
            index = self._find(digest, create=True)
            if index is None:
                raise TurnedAway(CloseReason.PER_IP_LIMIT)
            fields = self._read(index)
            if limit is not None and sum(fields[3:]) >= limit:
                raise TurnedAway(CloseReason.PER_IP_LIMIT)
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
            if self._rested(fields, time.monotonic()):
                self._delete(index)
            else:
                self._write(index, fields)

    def forget_worker(self, worker: int) -> None:
        """A worker died: its connections are gone (the parent calls this)."""
        with self._locked():
            for index in range(self.size):
                fields = self._read(index)
                if fields[0] != _EMPTY and fields[3 + worker]:
                    fields[3 + worker] = 0
                    self._write(index, fields)
            self._sweep()

    def connections(self, key: str) -> int:
        """Connections of ``key`` across every worker."""
        with self._locked():
            index = self._find(_digest(key), create=False)
            return 0 if index is None else sum(self._read(index)[3:])

    # --- token buckets -----------------------------------------------------------

    def take(self, key: str, frames: int) -> tuple[int, float]:
        """Take up to ``frames`` whole tokens from ``key``'s bucket (0: only
        look); returns how many were taken and the tokens left."""
        with self._locked():
            index = self._find(_digest(key), create=False)
            if index is None:  # not admitted through the table: not limited
                return frames, float(self.burst or 0)
            fields = self._read(index)
            now = time.monotonic()
            tokens = min(self.burst, fields[1] + (now - fields[2]) * self.rate)
            taken = min(frames, int(tokens))
            fields[1], fields[2] = tokens - taken, now
            self._write(index, fields)
        return taken, tokens - taken

    def __len__(self) -> int:
        """Peers with an entry (connected, or in debt)."""
        with self._locked():
            return sum(
                self.memory[i * self._slot.size : i * self._slot.size + 16] != _EMPTY
                for i in range(self.size)
            )


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
            raise TurnedAway(CloseReason.NOT_ALLOWED)
        self._table.enter(key, self._worker, self._limit)

    def release(self, key: str) -> None:
        self._table.leave(key, self._worker)


class SharedBucket:
    """A peer's token bucket in the table, with ``TokenBucket``'s interface."""

    __slots__ = ("_key", "_limiter", "rate")

    def __init__(self, limiter: SharedRateLimiter, key: str) -> None:
        self._limiter, self._key = limiter, key
        self.rate = limiter.table.rate

    def take(self, frames: int) -> tuple[int, float]:
        return self._limiter.table.take(self._key, frames)

    def waited(self, seconds: float) -> None:
        self._limiter.throttled_seconds += seconds


class SharedRateLimiter:
    """``RateLimiter`` whose buckets live in a ``PeerTable`` (whose entries
    ``SharedAdmission`` creates), so the rate holds across every worker."""

    def __init__(self, table: PeerTable) -> None:
        self.table = table
        self.throttled_seconds = 0.0  # this worker's waits

    def acquire(self, key: str) -> SharedBucket:
        return SharedBucket(self, key)

    def release(self, key: str) -> None:
        pass  # the admission's release leaves the table, which keeps a debt
