"""Spreading new connections over the ``--processes`` workers.

All workers accept on the one listening socket, and the kernel wakes them all
for each new connection: whichever runs first takes it, so a burst tends to
go to one worker while the others sit idle. Each worker therefore writes how
many connections it is serving into its slot of a shared array (one writer
per slot: no lock), and before accepting, a worker more than ``SLACK``
connections ahead of the least busy live worker steps back for ``PAUSE``
seconds so that one can take the connection. After a pause it accepts the
next connection whatever the counts say, so a worker that is slow to accept
costs a new client at most ``PAUSE`` of waiting, never a refusal.
"""

from __future__ import annotations

import mmap
import struct

SLACK = 1  # connections a worker may be ahead of the least busy one
PAUSE = 0.005  # seconds a worker that is ahead stops accepting
ABSENT = 2**62  # the count of a worker that is not accepting (dead, or stopping)
_SLOT = struct.Struct("=q")


class AcceptBalance:
    """Per-worker connection counts in shared memory; create in the parent
    before forking, one slot per worker index."""

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
