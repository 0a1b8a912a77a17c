"""``AsyncCounterClient``: the client library for asyncio (no gevent): the
same calls, errors and connection pool as ``CounterClient``, over asyncio
protocols. One connection carries one call at a time, so replies never cross
between tasks.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterable
from types import TracebackType

from counter_server.common.tls import probe_context
from counter_server.protocol import FRAME_SIZE, REPLY_SIZE

from .calls import (
    DEFAULT_POOL_SIZE,
    DEFAULT_TIMEOUT,
    HTTP_NUDGE,
    IN_FLIGHT_FRAMES,
    PROCESS,
    READ_ATTEMPTS,
    READ_FRAME,
    ConnectionEnded,
    Deadline,
    Target,
    can_classify,
    check_pool_size,
    decode_call,
    encode_call,
    ended_early,
    foreign,
    may_want_tls,
    not_served,
    nudge_margin,
    outgoing,
    reason,
    speaks_tls,
    split_probe,
    target,
)
from .errors import CounterError, Unavailable


class _Connection(asyncio.Protocol):
    """One connection, carrying one call at a time: the replies arrive in
    ``buffer`` and wake the call once all of them are there (a protocol
    rather than streams: no task or stream machinery per call)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.ended: str | None = None  # why the connection is unusable
        self.cause: BaseException | None = None  # the error that ended it, if one did
        self._waiter: asyncio.Future | None = None
        self._expected = 0
        self.deadline: Deadline | None = None  # of the call in progress, for the watchdog
        self._out = memoryview(b"")  # the call's frames not yet written
        self.fresh = True  # no call has finished on it yet
        self.nudged = False  # HTTP_NUDGE went out: closed after its call
        self._nudge: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.fresh and (wrong := foreign(self.buffer, self._expected)):
            self.ended, self.cause = str(wrong), wrong
            self.buffer.clear()
            self._wake()
        elif self._waiter is None:
            self.ended = "the server sent bytes nobody asked for"
        elif len(self.buffer) >= self._expected:
            self._wake()
        else:
            self.deadline.progressed()
            if self._out:
                self._feed()

    def _feed(self) -> None:
        """Write the call's next frames, keeping at most ``IN_FLIGHT_FRAMES``
        unanswered (as ``CounterClient`` does): a batch of any size streams,
        and a server that stops finds little unread."""
        written = self._expected // REPLY_SIZE - len(self._out) // FRAME_SIZE
        room = IN_FLIGHT_FRAMES - (written - len(self.buffer) // REPLY_SIZE)
        if room > 0:
            piece, self._out = self._out[: room * FRAME_SIZE], self._out[room * FRAME_SIZE :]
            self.transport.write(piece)

    def eof_received(self) -> bool:
        self.ended = self.ended or "the server closed the connection"
        self._wake()  # nothing more will come, even while frames are still being sent
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.cause = self.cause or exc
        if self.ended is None:
            self.ended = (
                "the server closed the connection"
                if exc is None
                else f"the connection broke ({reason(exc)})"
            )
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def time_out(self) -> None:
        """The watchdog's verdict: no reply by the call's deadline."""
        if self._waiter is not None:
            self.ended = "no reply within the timeout"
            self.cause = TimeoutError(self.ended)
            self._wake()

    def _send_nudge(self) -> None:
        """A new connection silent until near the deadline: see HTTP_NUDGE."""
        if (
            self._waiter is not None
            and not self.buffer
            and not self._out  # sent whole: no frame follows the nudge
            and not self.transport.is_closing()
        ):
            self.transport.write(HTTP_NUDGE)
            self.nudged = True

    @property
    def usable(self) -> bool:
        return self.ended is None and not self.nudged and not self.transport.is_closing()

    async def call(self, frames: bytes, expected: int, deadline: Deadline) -> bytes:
        """Send ``frames`` and wait for ``expected`` reply bytes within
        ``deadline`` (kept by the client's watchdog); ConnectionEnded (with
        what arrived) if the connection ends first."""
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._expected, self.deadline = expected, deadline
        if self.fresh:
            margin = nudge_margin(deadline.timeout)
            self._nudge = loop.call_later(max(deadline.left() - margin, 0), self._send_nudge)
        self._out = memoryview(frames)
        self._feed()
        try:
            await self._waiter
        finally:
            self._waiter = None
            if self._nudge is not None:
                self._nudge.cancel()
                self._nudge = None
            self._out = memoryview(b"")
            self.fresh = False
        data = bytes(self.buffer)
        self.buffer.clear()
        if len(data) < expected:
            raise ConnectionEnded(self.ended or "the connection ended", data, self.cause)
        return data

    def close(self) -> None:
        self.ended = self.ended or "closed"
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # frames never sent: nobody will read their replies
        else:
            self.transport.close()


async def _connect(where: Target, deadline: Deadline) -> _Connection:
    loop = asyncio.get_running_loop()
    try:
        _, connection = await asyncio.wait_for(
            loop.create_connection(
                _Connection, where.host, where.port, ssl=where.tls,
                server_hostname=where.server_hostname,
            ),
            deadline.left(),
        )  # fmt: skip
    except asyncio.TimeoutError:
        raise Unavailable(f"cannot connect to {where.address}: timed out") from None
    except ssl.SSLError as exc:
        raise Unavailable(f"TLS with {where.address} failed: {reason(exc)}") from None
    except OSError as exc:
        raise Unavailable(f"cannot connect to {where.address}: {reason(exc)}") from None
    return connection


async def _speaks_tls(where: Target, deadline: Deadline) -> bool:
    """Whether the server completes a TLS handshake (within ``deadline``)."""
    loop = asyncio.get_running_loop()
    try:
        transport, _ = await asyncio.wait_for(
            loop.create_connection(
                asyncio.Protocol, where.host, where.port, ssl=probe_context(),
                server_hostname=where.host,
            ),
            deadline.left(),
        )  # fmt: skip
    except (OSError, asyncio.TimeoutError):  # ssl.SSLError included
        return False
    transport.close()
    return True


class AsyncCounterClient:
    """A client of one counter server for asyncio tasks; the arguments and
    every call's contract are those of ``CounterClient`` (calls are
    coroutines). Use ``async with``, or ``await client.close()``."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        pool_size: int = DEFAULT_POOL_SIZE,
        tls: ssl.SSLContext | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self._target = target(address, timeout, tls, tls_ca, tls_cert, tls_key, server_hostname)
        self._pool_size = check_pool_size(pool_size)
        self._closed = False
        self._floor: int | None = None  # the highest value seen: the counter is at least that
        self._owner: tuple[int, asyncio.AbstractEventLoop] | None = None  # pid, loop
        self._slots: asyncio.Semaphore | None = None
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()  # carrying a call: watched for its deadline
        self._deadlines: set[Deadline] = set()  # of calls in progress, connecting ones too
        self._watchdog: asyncio.Task | None = None

    def _own(self, owner: tuple[int, asyncio.AbstractEventLoop]) -> None:
        """Bind the pool to this process (``PROCESS.generation``) and running
        loop: a forked child, or a new loop after the first one closed, starts
        a pool of its own and never touches the old connections. A second loop
        while the first still runs is a mistake: RuntimeError, before anything
        is sent."""
        old = self._owner
        if old is not None and old[0] == owner[0] and not old[1].is_closed():
            raise RuntimeError(
                f"this AsyncCounterClient of {self.address} is used by another event loop "
                "that is still open: make one client per event loop"
            )
        self._owner = owner
        self._slots = asyncio.Semaphore(self._pool_size)
        self._idle = []  # the old loop's or the parent's: dropped, never used or closed here
        self._busy = set()
        self._watchdog = None

    @property
    def address(self) -> str:
        return self._target.address

    async def increment(self, n: int = 1) -> int:
        """Add ``n``; the counter right after it (see ``CounterClient.increment``)."""
        return (await self._call([n]))[0]

    async def increment_many(self, increments: Iterable[int]) -> list[int]:
        """Pipelined in one round trip (see ``CounterClient.increment_many``)."""
        return await self._call(increments)

    async def read(self) -> int:
        """The counter's value, retried (see ``CounterClient.read``)."""
        failure: CounterError | None = None
        for _ in range(READ_ATTEMPTS):
            try:
                return (await self._call([0]))[0]
            except CounterError as exc:
                failure = exc
                if self._closed:
                    break
        raise Unavailable(f"cannot read the counter: {failure}") from None

    async def _call(self, increments: Iterable[int]) -> list[int]:
        checked, frames = encode_call(increments)
        if not checked:
            return []
        owner = (PROCESS.generation, asyncio.get_running_loop())
        if self._owner != owner:
            self._own(owner)
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.ensure_future(self._watch())
        where, floor = self._target, self._floor
        frames = outgoing(where.address, floor, checked, frames)
        expected = len(frames) // FRAME_SIZE * REPLY_SIZE
        deadline = Deadline(where.timeout)
        slots = self._slots
        if slots.locked():
            try:
                await asyncio.wait_for(slots.acquire(), deadline.left())
            except asyncio.TimeoutError:
                raise Unavailable(
                    f"no connection to {where.address} free within the timeout"
                ) from None
        else:
            await slots.acquire()
        self._deadlines.add(deadline)
        try:
            connection, fresh = await self._borrow(deadline)
            if not deadline.left():
                self._give_back(connection)
                raise Unavailable(f"{where.address}: timed out before sending")
            self._busy.add(connection)
            try:
                data = await connection.call(frames, expected, deadline)
            except ConnectionEnded as ended:
                connection.close()
                raise await self._outcome(ended, fresh, checked, floor, deadline) from None
            except BaseException:  # cancelled mid-call: the connection is out of step
                connection.close()
                raise
            finally:
                self._busy.discard(connection)
            self._give_back(connection)
        finally:
            self._deadlines.discard(deadline)
            slots.release()
        _, replies = split_probe(decode_call(data), floor)
        if floor is None or replies[-1] > floor:
            self._floor = replies[-1]
        return replies

    async def _watch(self) -> None:
        """Ends calls past their deadline: one timer for the client rather
        than one per call. It sleeps until the earliest deadline of the calls
        in progress, or one timeout when there are none (a call started
        meanwhile has a later deadline), and runs while any call does, so a
        call in progress when ``close()`` runs still ends within its timeout."""
        while not self._closed or self._deadlines:
            now = time.monotonic()
            soonest = min((d.at for d in self._deadlines), default=now + self._target.timeout)
            if soonest > now:
                await asyncio.sleep(soonest - now)
                continue
            for connection in list(self._busy):
                if connection.deadline.at <= now:
                    connection.time_out()
            await asyncio.sleep(0)
        self._watchdog = None

    async def _outcome(
        self,
        ended: ConnectionEnded,
        fresh: bool,
        checked: list[int],
        floor: int | None,
        deadline: Deadline,
    ) -> CounterError:
        """What became of a call whose connection ended early (see
        ``CounterClient._outcome``)."""
        where = self._target
        unserved = not_served(where.address, fresh, ended)
        if unserved is not None:
            return unserved
        floor, replies = split_probe(decode_call(ended.data), floor)
        now = await self._value_now(deadline) if can_classify(checked, replies) else None
        if isinstance(now, ConnectionEnded):
            cut = may_want_tls(where, fresh, ended) and may_want_tls(where, True, now)
            if cut and await _speaks_tls(where, deadline):
                return speaks_tls(where.address)
            now = None
        self._saw(now, *replies[-1:], floor)
        return ended_early(where.address, checked, replies, floor, now, ended.why)

    def _saw(self, *values: int | None) -> None:
        """Raise the floor to the highest of ``values`` (None: not known)."""
        known = [v for v in values if v is not None]
        if known and (self._floor is None or max(known) > self._floor):
            self._floor = max(known)

    async def _value_now(self, deadline: Deadline) -> int | ConnectionEnded | None:
        """The counter, read on a fresh connection within what is left of the
        call's deadline (see ``CounterClient._value_now``)."""
        if not deadline.left():
            return None
        try:
            connection = await _connect(self._target, deadline)
        except Unavailable:
            return None
        try:
            return decode_call(await connection.call(READ_FRAME, REPLY_SIZE, deadline))[0]
        except ConnectionEnded as ended:
            return ended
        finally:
            connection.close()

    async def _borrow(self, deadline: Deadline) -> tuple[_Connection, bool]:
        """An idle connection still open, or a new one; and whether it is new."""
        while True:
            if self._closed:
                raise Unavailable(f"the client of {self.address} is closed")
            if not self._idle:
                return await _connect(self._target, deadline), True
            connection = self._idle.pop()
            if connection.usable:  # not closed by the server while idle
                return connection, False
            connection.close()

    def _give_back(self, connection: _Connection) -> None:
        if self._closed:
            connection.close()
        else:
            self._idle.append(connection)

    async def close(self) -> None:
        """Close every idle connection; calls after it raise ``Unavailable``."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
        await asyncio.sleep(0)  # let the transports finish closing

    async def __aenter__(self) -> AsyncCounterClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncCounterClient({self.address!r})"
