"""Every exception the server raises, under one base (``ServerError``, like
redis-py's ``exceptions.py``), and why a connection ended (``CloseReason``,
one enum value per reason with its log level).

``SetupError``: the instance cannot start (one line, exit 1).
``ConnectionEnded``: ends one connection, carrying its ``CloseReason``; every
connection ends with one (the peer closing, a refused frame, a timeout,
shutdown), which ``server.lifecycle`` counts, logs and closes in one place.
Everything that counts, logs or exports close reasons reads them from here,
so a new reason is one new line and can never be missing from a table.
"""

from __future__ import annotations

import logging
from enum import Enum

from counter_server.protocol import InvalidFrame, RejectReason


class CloseReason(Enum):
    """``value`` is the label in logs and metrics; ``level`` the log level."""

    PEER_CLOSED = "peer_closed", logging.DEBUG  # a client leaving is not news
    RESET = "reset", logging.INFO
    REFUSED = "refused", logging.WARNING
    IDLE_TIMEOUT = "idle_timeout", logging.WARNING
    FRAME_TIMEOUT = "frame_timeout", logging.WARNING
    WRITE_TIMEOUT = "write_timeout", logging.WARNING
    HANDSHAKE_TIMEOUT = "handshake_timeout", logging.WARNING
    IDLE_EVICTED = "idle_evicted", logging.INFO
    NOT_ALLOWED = "not_allowed", logging.WARNING
    PER_IP_LIMIT = "per_ip_limit", logging.WARNING
    TLS_FAILED = "tls_failed", logging.WARNING
    BACKEND_UNAVAILABLE = "backend_unavailable", logging.WARNING
    SHUTDOWN = "shutdown", logging.INFO
    SHUTDOWN_TIMEOUT = "shutdown_timeout", logging.WARNING
    ERROR = "error", logging.ERROR

    def __new__(cls, label: str, level: int) -> CloseReason:
        member = object.__new__(cls)
        member._value_ = label
        member.level = level
        return member

    @property
    def words(self) -> str:
        """The label as words for a log line ("idle timeout")."""
        return self.value.replace("_", " ")


class ServerError(Exception):
    """Base of every exception the server raises; the message is one line."""


# What stops an instance from starting: main prints the message, exits 1.


class SetupError(ServerError):
    """The instance cannot start as configured (a TLS file, a flag's value)."""


class ListenError(SetupError):
    """A listener that could not be opened."""


class StateFileError(SetupError):
    """The state file cannot be used; the message names the file and the problem."""


class BackendError(SetupError):
    """The backend cannot be used at start (bad password, nobody answers,
    TLS that does not verify)."""


class WorkersFailed(SetupError):
    """The ``--processes`` workers could not be started or kept running."""


# What ends one connection; the reason says how it is counted and logged.


class ConnectionEnded(ServerError):
    """How a connection ended: ``reason`` says how it is counted and logged
    (given, or the class's), the message adds the detail."""

    reason: CloseReason = CloseReason.ERROR
    rejected: RejectReason | None = None  # a frame refused: counted under it too

    def __init__(self, detail: str = "", reason: CloseReason | None = None) -> None:
        super().__init__(detail)
        if reason is not None:
            self.reason = reason

    @property
    def label(self) -> str:
        """What the log line's ``reason`` field says."""
        return self.reason.value

    @property
    def event(self) -> str:
        """The log's rate-limiting key: lines of one event are limited together."""
        return f"closed:{self.reason.value}"

    @property
    def level(self) -> int:
        return self.reason.level

    def describe(self, peer: str) -> str:
        """The log line for this end of the connection from ``peer``."""
        detail = str(self)
        return f"connection from {peer} closed: {self.reason.words}" + (
            f" ({detail})" if detail else ""
        )


class FrameRefused(ConnectionEnded):
    """A frame was refused (bad checksum, overflow): the replies owed before
    it were sent, then the connection is closed. A frame cut short by the
    peer's close (truncated) is discarded the same way, the connection
    counted as closed by its peer. Both are counted under ``rejected`` too."""

    def __init__(self, refusal: InvalidFrame) -> None:
        self.truncated = refusal.reason is RejectReason.TRUNCATED
        reason = CloseReason.PEER_CLOSED if self.truncated else CloseReason.REFUSED
        super().__init__(str(refusal), reason)
        self.refusal = refusal
        self.rejected = refusal.reason

    @property
    def label(self) -> str:
        return self.rejected.value

    event = label  # refused frames are rate-limited per kind of refusal

    @property
    def level(self) -> int:
        return logging.INFO if self.truncated else logging.WARNING

    def describe(self, peer: str) -> str:
        if self.truncated:
            return f"discarded partial frame from {peer} (truncated): {self}; peer had closed"
        return f"refused frame from {peer} ({self.rejected.value}): {self}; connection closed"


class ClientTimeout(ConnectionEnded):
    """The client broke one of the time limits."""

    def __init__(self, reason: CloseReason, seconds: float) -> None:
        super().__init__(f"{reason.words} after {seconds:g}s", reason)


class Evicted(ConnectionEnded):
    """Closed because the pool was full, connections waited, and this one
    held its slot without using it: idle, or in a TLS handshake or a frame
    for as long (a trickle)."""

    reason = CloseReason.IDLE_EVICTED

    def __init__(self, idle_for: float) -> None:
        super().__init__(f"no whole frame for {idle_for:g}s or more while the pool was full")


class PeerClosed(ConnectionEnded):
    """The client closed its side. While its frames waited for rate tokens
    (the reaper saw it leave), the frames not yet applied are dropped: they
    were never acknowledged."""

    reason = CloseReason.PEER_CLOSED


class Stopped(ConnectionEnded):
    """Shutdown ended the connection: it stopped reading frames (or its TLS
    handshake, or its wait for rate tokens) and sent the replies it owed."""

    reason = CloseReason.SHUTDOWN


class HandshakeFailed(ConnectionEnded):
    """The TLS handshake did not complete (bad certificate, not TLS)."""

    reason = CloseReason.TLS_FAILED


class TurnedAway(ConnectionEnded):
    """Admission turned the connection away at accept time (not allowed, or
    over the per-IP cap): ``reason`` says which."""

    def __init__(self, reason: CloseReason) -> None:
        super().__init__("", reason)


class StoreUnavailable(ConnectionEnded):
    """The store cannot confirm these increments; no reply may be sent."""

    reason = CloseReason.BACKEND_UNAVAILABLE


# Inside the shared stores: how a round trip went, never seen outside them.


class WentBack(ServerError):
    """The service answered below the value this instance had confirmed."""

    def __init__(self, before: int) -> None:
        super().__init__(before)
        self.before = before  # what the key held before this round trip's increments


class EtcdUnavailable(ServerError):
    """No etcd endpoint could confirm the request; the message says why."""


class EtcdAnswer(ServerError):
    """etcd answered the request with an error (not a failed request): its
    own message (authentication, permissions, a bad request)."""
