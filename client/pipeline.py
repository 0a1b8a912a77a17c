"""The calls one shared connection carries, with no I/O (auto-pipelining).

Calls from many callers go out on one connection in the order they were
added, the frames of several calls in one write; the server answers in
order (one 8-byte reply per frame), so each reply byte belongs to the oldest
call still owed one. A call whose caller gave up (cancelled, timed out) keeps
its place: its replies are read and dropped, and the connection stays in
step. Both front ends drive a ``Pipeline``: ``add`` a call, write what
``to_send`` returns, hand what arrives to ``received``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Protocol, TypeVar

from counter_server.protocol import FRAME_SIZE, REPLY_SIZE

from .calls import IN_FLIGHT_FRAMES, SHARE_DEPTH, Deadline, NotACounterServer, foreign


class Pending:
    """One call on a shared connection: its frames, how many of their bytes
    went out, the replies that came back, and its deadline. ``waiter`` is the
    front end's own (a future, a lock); ``ended`` is set if the connection
    ended first, ``abandoned`` once its caller gave up."""

    __slots__ = (
        "abandoned",
        "deadline",
        "ended",
        "expected",
        "frames",
        "got",
        "parts",
        "sent",
        "waiter",
    )  # fmt: skip

    def __init__(self, frames: bytes, deadline: Deadline, waiter: object = None) -> None:
        self.frames = frames
        self.expected = len(frames) // FRAME_SIZE * REPLY_SIZE  # reply bytes owed
        self.sent = 0  # bytes of frames handed to the connection
        self.parts: list[bytes] = []
        self.got = 0  # reply bytes received
        self.deadline = deadline
        self.waiter = waiter
        self.ended: Exception | None = None  # calls.ConnectionEnded, set by the front end
        self.abandoned = False

    @property
    def data(self) -> bytes:
        """The reply bytes that arrived."""
        if len(self.parts) != 1:
            self.parts = [b"".join(self.parts)]
        return self.parts[0]

    @property
    def complete(self) -> bool:
        return self.got == self.expected


class Pipeline:
    """The calls of one connection in the order their frames go out, with at
    most ``IN_FLIGHT_FRAMES`` frames unanswered (a batch of any size streams;
    the replies owed always fit in the socket buffers, so the server never
    stops reading for replies not read yet)."""

    __slots__ = ("bytes_received", "frames_added", "frames_sent", "owed", "unsent")

    def __init__(self) -> None:
        self.owed: deque[Pending] = deque()  # added and not yet fully answered, in order
        self.unsent: deque[Pending] = deque()  # added and not yet fully sent, in order
        self.frames_added = 0
        self.frames_sent = 0
        self.bytes_received = 0

    @property
    def replied(self) -> bool:
        """Whether any reply came: the peer is a counter server serving us."""
        return self.bytes_received > 0

    @property
    def load(self) -> int:
        """Frames added and not yet answered: how busy the connection is."""
        return self.frames_added - self.bytes_received // REPLY_SIZE

    @property
    def live(self) -> bool:
        """Whether a caller still waits on this connection."""
        return any(not call.abandoned for call in self.owed)

    def add(self, call: Pending) -> None:
        self.owed.append(call)
        self.unsent.append(call)
        self.frames_added += call.expected // REPLY_SIZE

    def withdraw(self, call: Pending) -> None:
        """Forget an abandoned call none of whose frames went out."""
        if call.sent == 0 and call in self.unsent:
            self.owed.remove(call)
            self.unsent.remove(call)
            self.frames_added -= call.expected // REPLY_SIZE

    def to_send(self) -> bytes:
        """The frames to write now, of as many calls as fit in the window
        (b"" when nothing can go)."""
        room = (
            IN_FLIGHT_FRAMES - self.frames_sent + self.bytes_received // REPLY_SIZE
        ) * FRAME_SIZE
        pieces = []
        unsent = self.unsent
        while unsent and room > 0:
            call = unsent[0]
            piece = (
                call.frames[call.sent : call.sent + room]
                if call.sent or room < len(call.frames)
                else call.frames
            )
            pieces.append(piece)
            call.sent += len(piece)
            room -= len(piece)
            if call.sent == len(call.frames):
                unsent.popleft()
        out = b"".join(pieces) if len(pieces) != 1 else pieces[0]
        self.frames_sent += len(out) // FRAME_SIZE
        return out

    def received(self, data: bytes) -> list[Pending]:
        """Give ``data`` to the calls it answers; the calls it completes, in
        order (a call that received part of its replies has its deadline
        renewed). Raises NotACounterServer for bytes no frame asked for, or
        an HTTP answer on a connection that has had no reply yet."""
        owed_bytes = self.frames_sent * REPLY_SIZE - self.bytes_received
        if len(data) > owed_bytes or not self.bytes_received:
            wrong = foreign(data, owed_bytes) if not self.bytes_received else None
            if wrong is not None or len(data) > owed_bytes:
                raise wrong or NotACounterServer(http=False)
        self.bytes_received += len(data)
        done = []
        owed = self.owed
        start, size = 0, len(data)
        while start < size:
            call = owed[0]
            take = min(call.expected - call.got, size - start)
            call.parts.append(data[start : start + take] if take != size else data)
            call.got += take
            start += take
            if call.got == call.expected:
                owed.popleft()
                done.append(call)
            else:
                call.deadline.progressed()
        return done

    def cut(self) -> list[Pending]:
        """The connection ended: every call still owed replies, in order."""
        ended = list(self.owed)
        self.owed.clear()
        self.unsent.clear()
        return ended


class Shared(Protocol):
    """What ``choose`` asks of a front end's connection."""

    usable: bool
    pipeline: Pipeline


Connection = TypeVar("Connection", bound=Shared)


def choose(connections: Iterable[Connection], may_open: bool) -> Connection | None:
    """Where a new call goes (both front ends): the first usable connection
    with fewer than ``SHARE_DEPTH`` frames in flight; when every one has
    that many, None if another may be opened (``may_open``), else the least
    busy. Runs for every call: the load is computed inline."""
    best, least = None, 0
    for connection in connections:
        pipeline = connection.pipeline
        load = pipeline.frames_added - pipeline.bytes_received // REPLY_SIZE
        if not connection.usable:
            continue
        if load < SHARE_DEPTH:
            return connection
        if best is None or load < least:
            best, least = connection, load
    return None if may_open else best
