"""``AsyncCounterClient``: the client library for asyncio (no gevent): the
same calls, errors and connection pool as ``CounterClient``, over asyncio
protocols. One connection carries one call at a time, so replies never cross
between tasks.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from types import TracebackType

from counter_server.protocol import REPLY_SIZE

from .calls import (
    DEFAULT_POOL_SIZE,
    DEFAULT_TIMEOUT,
    READ_ATTEMPTS,
    READ_FRAME,
    ConnectionEnded,
    Target,
    check_pool_size,
    decode_call,
    encode_call,
    ended_early,
    reason,
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
        self._waiter: asyncio.Future | None = None
        self._expected = 0
        self.deadline = 0.0  # loop time by which the call in progress must be answered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self._waiter is None:
            self.ended = "the server sent bytes nobody asked for"
        elif len(self.buffer) >= self._expected:
            self._wake()

    def eof_received(self) -> bool:
        self.ended = self.ended or "the server closed the connection"
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
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
        """The watchdog's verdict: no reply by the deadline."""
        self.ended = "no reply within the timeout"
        self._wake()

    @property
    def waiting(self) -> bool:
        return self._waiter is not None

    @property
    def usable(self) -> bool:
        return self.ended is None and not self.transport.is_closing()

    async def call(self, frames: bytes, expected: int, deadline: float) -> bytes:
        """Send ``frames`` and wait for ``expected`` reply bytes until the
        watchdog's ``deadline`` (loop time); ConnectionEnded (with what
        arrived) if the connection ends first."""
        self._waiter = asyncio.get_running_loop().create_future()
        self._expected, self.deadline = expected, deadline
        self.transport.write(frames)
        try:
            await self._waiter
        finally:
            self._waiter = None
        data = bytes(self.buffer)
        self.buffer.clear()
        if len(data) < expected:
            raise ConnectionEnded(self.ended or "the connection ended", data)
        return data

    def close(self) -> None:
        self.ended = self.ended or "closed"
        self.transport.close()


async def _connect(where: Target) -> _Connection:
    loop = asyncio.get_running_loop()
    try:
        _, connection = await asyncio.wait_for(
            loop.create_connection(
                _Connection, where.host, where.port, ssl=where.tls,
                server_hostname=where.server_hostname,
            ),
            where.timeout,
        )  # fmt: skip
    except asyncio.TimeoutError:
        raise Unavailable(f"cannot connect to {where.address}: timed out") from None
    except ssl.SSLError as exc:
        raise Unavailable(f"TLS with {where.address} failed: {reason(exc)}") from None
    except OSError as exc:
        raise Unavailable(f"cannot connect to {where.address}: {reason(exc)}") from None
    return connection


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
        self._slots: asyncio.Semaphore | None = None  # made in the running loop
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._watchdog: asyncio.Task | None = None
        self._closed = False

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
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._pool_size)
        if self._watchdog is None:
            self._watchdog = asyncio.ensure_future(self._watch())
        where = self._target
        async with self._slots:
            connection = await self._borrow()
            self._busy.add(connection)
            deadline = asyncio.get_running_loop().time() + where.timeout
            try:
                data = await connection.call(frames, len(checked) * REPLY_SIZE, deadline)
            except ConnectionEnded as ended:
                connection.close()
                replies = decode_call(ended.data)
                value = await self._value_now(checked, replies)
                raise ended_early(where.address, checked, replies, value, ended.why) from None
            except BaseException:  # cancelled mid-call: the connection is out of step
                connection.close()
                raise
            finally:
                self._busy.discard(connection)
            self._give_back(connection)
        return decode_call(data)

    async def _watch(self) -> None:
        """Times out calls past their deadline: one timer for the client
        instead of one per call."""
        loop = asyncio.get_running_loop()
        period = min(self._target.timeout / 4, 0.25)
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            for connection in list(self._busy):
                if connection.waiting and connection.deadline <= now:
                    connection.time_out()

    async def _value_now(self, increments: list[int], replies: list[int]) -> int | None:
        if increments[len(replies)] == 0:
            return None
        try:
            connection = await _connect(self._target)
        except Unavailable:
            return None
        self._busy.add(connection)
        deadline = asyncio.get_running_loop().time() + self._target.timeout
        try:
            return decode_call(await connection.call(READ_FRAME, REPLY_SIZE, deadline))[0]
        except ConnectionEnded:
            return None
        finally:
            self._busy.discard(connection)
            connection.close()

    async def _borrow(self) -> _Connection:
        while True:
            if self._closed:
                raise Unavailable(f"the client of {self.address} is closed")
            if not self._idle:
                return await _connect(self._target)
            connection = self._idle.pop()
            if connection.usable:  # not closed by the server while idle
                return connection
            connection.close()

    def _give_back(self, connection: _Connection) -> None:
        if self._closed:
            connection.close()
        else:
            self._idle.append(connection)

    async def close(self) -> None:
        """Close every idle connection; calls after it raise ``Unavailable``."""
        self._closed = True
        if self._watchdog is not None and not self._busy:
            self._watchdog.cancel()
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
