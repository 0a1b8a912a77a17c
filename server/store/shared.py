"""A counter shared by several worker processes of one machine.

The value and the count of applied frames live in an anonymous shared memory
mapping created by the parent before it forks the workers. Each batch is
applied under an exclusive ``flock`` on a lock file that every worker opens
for itself: the kernel releases it if a worker dies holding it, so a crashed
worker can never wedge the others. Replies stay exact and distinct across all
processes (docs/protocol.md, rule 3).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import tempfile
from collections.abc import Sequence

from server.store.base import PlainStore, advance

_LAYOUT = struct.Struct("=QQ")  # value, frames applied


class SharedCounter:
    """The shared memory and lock file; create in the parent before forking."""

    def __init__(self, initial: int = 0) -> None:
        self.memory = mmap.mmap(-1, _LAYOUT.size)
        _LAYOUT.pack_into(self.memory, 0, initial, 0)
        handle, self.lock_path = tempfile.mkstemp(prefix="counter-lock-")
        os.close(handle)

    @property
    def value(self) -> int:
        return _LAYOUT.unpack_from(self.memory)[0]

    @property
    def requests_applied(self) -> int:
        return _LAYOUT.unpack_from(self.memory)[1]

    def open_store(self) -> SharedCounterStore:
        """The store a worker uses (call it in the worker, after the fork)."""
        return SharedCounterStore(self)

    def remove(self) -> None:
        """Delete the lock file (the parent, at exit)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.lock_path)


class SharedCounterStore(PlainStore):
    """``CounterStore`` over a ``SharedCounter``, for one worker process."""

    def __init__(self, shared: SharedCounter) -> None:
        self._shared = shared
        self._memory = shared.memory
        self._lock = os.open(shared.lock_path, os.O_RDWR)
        self._applied = 0  # by this worker (the shared count holds every worker's)

    @property
    def value(self) -> int:
        return self._shared.value

    @property
    def requests_applied(self) -> int:
        """Frames this worker applied (metrics sum the workers)."""
        return self._applied

    def apply(self, increments: Sequence[int]) -> Sequence[int]:
        memory = self._memory
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            value, applied = _LAYOUT.unpack_from(memory)
            replies = advance(value, increments)
            if replies:
                _LAYOUT.pack_into(memory, 0, replies[-1], applied + len(replies))
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._applied += len(replies)
        return replies

    def close(self) -> bool:
        os.close(self._lock)
        return True
