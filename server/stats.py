"""Plain counters of what the server did.

The hot path bumps plain integer attributes (no locks, no metric objects);
anything that reports on them (the shutdown summary, a metrics collector)
reads them when it needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from counter_server.protocol import RejectReason
from counter_server.server.errors import CloseReason

# replies_per_write[k] counts writes of n replies with n.bit_length() == k,
# i.e. n in [2^(k-1), 2^k - 1]; one C-level int method on the hot path.
WRITE_SIZE_SLOTS = 65


@dataclass(slots=True)
class ServerStats:
    connections_accepted: int = 0
    accept_errors: int = 0  # out of file descriptors or memory while accepting
    connections_waiting: int = 0  # in the listen queue while the pool is full
    pool_saturation_events: int = 0
    bytes_in: int = 0  # of closed connections; live ones keep their own count
    bytes_out: int = 0
    replies_per_write: list[int] = field(default_factory=lambda: [0] * WRITE_SIZE_SLOTS)
    connections_closed: dict[CloseReason, int] = field(
        default_factory=lambda: dict.fromkeys(CloseReason, 0)
    )
    rejected: dict[RejectReason, int] = field(
        default_factory=lambda: dict.fromkeys(RejectReason, 0)
    )

    @property
    def connections_active(self) -> int:
        """Accepted and not yet closed."""
        return self.connections_accepted - sum(self.connections_closed.values())
