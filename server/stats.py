"""Plain counters of what the server did.

The hot path bumps plain integer attributes (no locks, no metric objects);
anything that reports on them (the shutdown summary, a metrics collector)
reads them when it needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol import RejectReason


@dataclass(slots=True)
class ServerStats:
    connections_accepted: int = 0
    connections_active: int = 0
    connections_reset: int = 0
    accept_errors: int = 0  # out of file descriptors or memory while accepting
    connections_waiting: int = 0  # in the listen queue while the pool is full
    pool_saturation_events: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    reply_writes: int = 0
    rejected: dict[RejectReason, int] = field(
        default_factory=lambda: dict.fromkeys(RejectReason, 0)
    )
