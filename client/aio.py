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
from counter_server.common.values import phrase

from .calls import (
    HTTP_NUDGE,
    PROCESS,
    READ_ATTEMPTS,
    READ_FRAME,
    READ_NOW,
    RECV_BYTES,
    ClientCore,
    ConnectionEnded,
    Deadline,
    NotACounterServer,
    Target,
    decode_call,
    encode_call,
    encode_one,
    nudge_margin,
    outcome,
)
from .errors import CounterError, Unavailable
from .pipeline import Pending, Pipeline, choose


class _Connection(asyncio.BufferedProtocol):
    """One connection shared by the calls of many tasks (auto-pipelining):
    calls added in one turn of the loop go out in one write, and the replies
    that arrive complete them in order (a protocol rather than streams: no
    task or stream machinery per call). See ``client.pipeline``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pipeline = Pipeline()
        self.ended: str | None = None  # why the connection is unusable
        self.cause: BaseException | None = None  # the error that ended it, if one did
        self.usable = True  # takes new calls: not ended, closed, nudged, nor a call timed out
        self._flushing = False  # a write of the calls added this turn is scheduled
        self._nudge: asyncio.TimerHandle | None = None
        self._cut: list[Pending] = []  # the calls its end ended
        # Read into one buffer of its own: a plain protocol's transport
        # allocates a new 256 KiB buffer for each read.
        self._buffer = memoryview(bytearray(RECV_BYTES))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def submit(self, call: Pending) -> None:
        """Add ``call``: its frames go out with those of the other calls
        added in this turn of the loop."""
        self.pipeline.add(call)
        if not self._flushing:
            self._flushing = True
            loop = asyncio.get_running_loop()
            loop.call_soon(self._flush)
            if self._nudge is None and not self.pipeline.replied:
                at = loop.time() + call.deadline.left() - nudge_margin(call.deadline.timeout)
                self._nudge = loop.call_at(at, self._send_nudge)

    def _flush(self) -> None:
        self._flushing = False
        if self.ended is None:
            out = self.pipeline.to_send()
            if out:
                self.transport.write(out)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._buffer[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        try:
            done = self.pipeline.received(data)
        except NotACounterServer as wrong:
            self._end(str(wrong), wrong)
            self.transport.abort()
            return
        for call in done:
            if not call.waiter.done():
                call.waiter.set_result(None)
        if self.pipeline.unsent:
            self._flush()  # the window has room again

    def eof_received(self) -> bool:
        self._end("the server closed the connection", None)
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self._end("the server closed the connection", None)
        else:
            self._end(f"the connection broke ({phrase(exc)})", exc)

    def _end(self, why: str, cause: BaseException | None) -> None:
        """Nothing more will come: every call still owed replies ends. The
        error that follows an end of file (a TLS alert: a refused client
        certificate) becomes the cause of the calls it ended, for their
        callers, who look once their task runs."""
        if self.ended is None:
            self.ended, self.cause = why, cause
        elif self.cause is None and cause is not None:
            self.cause = cause
            for call in self._cut:
                if call.ended.cause is None:
                    call.ended.cause = cause
        self.usable = False
        if self._nudge is not None:
            self._nudge.cancel()
        self._cut = self.pipeline.cut() or self._cut
        for call in self._cut:
            if call.ended is None:
                call.ended = ConnectionEnded(self.ended, call.data, self.cause)
            if not call.waiter.done():
                call.waiter.set_result(None)

    def expire(self, now: float) -> None:
        """The watchdog's verdict: each call past its deadline ends (nothing
        of it is sent afterwards), and the connection takes no new call; its
        other calls go on, and replies to the expired ones are dropped."""
        for call in list(self.pipeline.owed):
            if not call.abandoned and call.deadline.at <= now:
                call.abandoned, self.usable = True, False
                self.pipeline.withdraw(call)
                why = "no reply within the timeout"
                call.ended = ConnectionEnded(why, call.data, TimeoutError(why))
                if not call.waiter.done():
                    call.waiter.set_result(None)

    def _send_nudge(self) -> None:
        """A new connection silent until near the deadline: see HTTP_NUDGE."""
        pipeline = self.pipeline
        if not pipeline.replied and not pipeline.unsent and pipeline.live and self.usable:
            self.transport.write(HTTP_NUDGE)
            self.usable = False  # no frame follows it

    def close(self) -> None:
        self.ended = self.ended or "closed"
        self.usable = False
        if self._nudge is not None:
            self._nudge.cancel()
        transport = self.transport
        if transport.is_closing():
            return  # closed already (a TLS transport fails if asked again)
        if transport.get_write_buffer_size():
            transport.abort()  # frames never sent: nobody will read their replies
        else:
            transport.close()


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
        raise Unavailable(f"TLS with {where.address} failed: {phrase(exc)}") from None
    except OSError as exc:
        raise Unavailable(f"cannot connect to {where.address}: {phrase(exc)}") from None
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


class AsyncCounterClient(ClientCore):
    """A client of one counter server for asyncio tasks; the arguments and
    every call's contract are those of ``CounterClient`` (calls are
    coroutines). Use ``async with``, or ``await client.close()``."""

    _generation = -1  # PROCESS.generation and running loop the pool belongs to
    _loop: asyncio.AbstractEventLoop | None = None

    def _reset_pool(self) -> None:
        self._open: list[_Connection] = []  # connected, shared by the calls in progress
        self._opening = 0  # connections being opened
        self._waiting: list[asyncio.Future] = []  # calls waiting for a connection being opened
        self._deadlines: set[Deadline] = set()  # of calls in progress, connecting ones too
        self._watchdog: asyncio.Task | None = None

    def _own(self, generation: int, loop: asyncio.AbstractEventLoop) -> None:
        """Bind the pool to this process (``PROCESS.generation``) and running
        loop: a forked child, or a new loop after the first one closed, starts
        a pool of its own and never touches the old connections. A second loop
        while the first still runs is a mistake: RuntimeError, before anything
        is sent."""
        old = self._loop
        if old is not None and self._generation == generation and not old.is_closed():
            raise RuntimeError(
                f"this AsyncCounterClient of {self.address} is used by another event loop "
                "that is still open: make one client per event loop"
            )
        self._generation, self._loop = generation, loop
        self._reset_pool()  # the old loop's or the parent's: dropped, never used or closed here

    async def increment(self, n: int = 1) -> int:
        """Add ``n``; the counter right after it (see ``CounterClient.increment``)."""
        return (await self._call([n], encode_one(n)))[0]

    async def increment_many(self, increments: Iterable[int]) -> list[int]:
        """Pipelined in one round trip (see ``CounterClient.increment_many``)."""
        checked, frames = encode_call(increments)
        return await self._call(checked, frames) if checked else []

    async def read(self) -> int:
        """The counter's value, retried (see ``CounterClient.read``)."""
        failure: CounterError | None = None
        for _ in range(READ_ATTEMPTS):
            try:
                return (await self._call([0], READ_FRAME))[0]
            except CounterError as exc:
                failure = exc
                if self._closed:
                    break
        raise Unavailable(f"cannot read the counter: {failure}") from None

    async def _call(self, checked: list[int], frames: bytes) -> list[int]:
        loop = asyncio.get_running_loop()
        if self._generation != PROCESS.generation or self._loop is not loop:
            self._own(PROCESS.generation, loop)
        if self._watchdog is None:
            self._watchdog = loop.create_task(self._watch())
        frames, floor, deadline = self._begin(checked, frames)
        call = Pending(frames, deadline, loop.create_future())
        self._deadlines.add(deadline)
        try:
            connection = self._shared()
            if connection is None:
                connection = await self._connection(deadline)
                if not deadline.left():
                    raise Unavailable(f"{self.address}: timed out before sending")
            connection.submit(call)
            try:
                await call.waiter
            except BaseException:  # cancelled: its replies, if sent, are read and dropped
                call.abandoned = True
                connection.pipeline.withdraw(call)
                raise
            finally:
                if self._closed or not connection.usable:
                    self._settle(connection)
        finally:
            self._deadlines.discard(deadline)
        if call.ended is not None:
            raise await self._outcome(call, connection, checked, floor, deadline) from None
        return self._replies(call.data, floor)

    def _shared(self) -> _Connection | None:
        """The connection a new call goes to (``pipeline.choose``); None to
        open another."""
        may_open = len(self._open) + self._opening < self._pool_size
        return choose(self._open, may_open) if self._open else None

    async def _connection(self, deadline: Deadline) -> _Connection:
        """A connection to share, opening one if the pool has room, else
        waiting for one being opened (within ``deadline``)."""
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise Unavailable(f"the client of {self.address} is closed")
            connection = self._shared()
            if connection is not None:
                return connection
            for connection in [c for c in self._open if not c.usable]:
                self._settle(connection)  # an ended or retired one no call waits on
            if len(self._open) + self._opening < self._pool_size:
                break
            waiter = loop.create_future()
            self._waiting.append(waiter)
            try:
                await asyncio.wait_for(waiter, deadline.left())
            except asyncio.TimeoutError:
                raise Unavailable(
                    f"no connection to {self.address} opened within the timeout"
                ) from None
        self._opening += 1
        try:
            connection = await _connect(self._target, deadline)
        finally:
            self._opening -= 1
            waiting, self._waiting = self._waiting, []
            for waiter in waiting:
                if not waiter.done():
                    waiter.set_result(None)
        self._open.append(connection)  # closed after its call if close() ran meanwhile
        return connection

    def _settle(self, connection: _Connection) -> None:
        """Close a connection no caller waits on any more, once it is
        unusable or the client is closed."""
        if not connection.pipeline.live:
            connection.close()
            if connection in self._open:
                self._open.remove(connection)

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
            for connection in list(self._open):
                connection.expire(now)
            await asyncio.sleep(0)
        self._watchdog = None

    async def _outcome(
        self,
        call: Pending,
        connection: _Connection,
        checked: list[int],
        floor: int | None,
        deadline: Deadline,
    ) -> CounterError:
        """What became of a call that ended early (see ``CounterClient._outcome``)."""
        where, answer = self._target, None
        steps = outcome(where, call.sent > 0, not connection.pipeline.replied, call.ended,
                        checked, floor)  # fmt: skip
        while True:
            try:
                ask = steps.send(answer)
            except StopIteration as done:
                error, seen = done.value
                break
            if ask is READ_NOW:
                answer = await self._value_now(deadline)
            else:
                answer = await _speaks_tls(where, deadline)
        self._saw(seen)
        return error

    async def _value_now(self, deadline: Deadline) -> int | ConnectionEnded | None:
        """The counter, read on a new connection of its own within what is
        left of the call's deadline (see ``CounterClient._value_now``)."""
        if not deadline.left():
            return None
        try:
            connection = await _connect(self._target, deadline)
        except Unavailable:
            return None
        call = Pending(READ_FRAME, deadline, asyncio.get_running_loop().create_future())
        try:
            connection.submit(call)
            await asyncio.wait_for(asyncio.shield(call.waiter), deadline.left())
        except asyncio.TimeoutError:
            why = "no reply within the timeout"
            return ConnectionEnded(why, b"", TimeoutError(why))
        finally:
            connection.close()
        if call.ended is not None:
            return call.ended
        return decode_call(call.data)[0]

    async def close(self) -> None:
        """Close every idle connection; calls after it raise ``Unavailable``
        (calls in progress finish, then their connection closes)."""
        self._closed = True
        for connection in list(self._open):
            self._settle(connection)
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
