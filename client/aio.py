"""``AsyncCounterClient``: the client library for asyncio (no gevent): the
same calls, errors and connection pool as ``CounterClient``, with
``asyncio`` streams. One connection carries one call at a time, so replies
never cross between tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterable
from types import TracebackType

from counter_server.protocol import REPLY_SIZE, encode_request

from .calls import (
    DEFAULT_POOL_SIZE,
    DEFAULT_TIMEOUT,
    READ_ATTEMPTS,
    Target,
    check_pool_size,
    decode_call,
    encode_call,
    ended_early,
    target,
)
from .errors import CounterError, Unavailable

_READ_FRAME = encode_request(0)
_Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _ConnectionEnded(Exception):
    def __init__(self, why: str, data: bytes) -> None:
        super().__init__(why)
        self.why, self.data = why, data


async def _connect(where: Target) -> _Stream:
    try:
        return await asyncio.wait_for(
            asyncio.open_connection(
                where.host, where.port, ssl=where.tls, server_hostname=where.server_hostname
            ),
            where.timeout,
        )
    except asyncio.TimeoutError:
        raise Unavailable(f"cannot connect to {where.address}: timed out") from None
    except ssl.SSLError as exc:
        raise Unavailable(f"TLS with {where.address} failed: {_reason(exc)}") from None
    except OSError as exc:
        raise Unavailable(f"cannot connect to {where.address}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)


async def _exchange(stream: _Stream, frames: bytes, expected: int, timeout: float) -> bytes:
    reader, writer = stream
    try:
        writer.write(frames)
        await asyncio.wait_for(writer.drain(), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise _ConnectionEnded(f"sending failed ({_reason(exc) or 'timed out'})", b"") from None
    try:
        return await asyncio.wait_for(reader.readexactly(expected), timeout)
    except asyncio.IncompleteReadError as exc:
        raise _ConnectionEnded("the server closed the connection", exc.partial) from None
    except asyncio.TimeoutError:
        raise _ConnectionEnded("no reply within the timeout", b"") from None
    except OSError as exc:
        raise _ConnectionEnded(f"the connection broke ({_reason(exc)})", b"") from None


def _close(stream: _Stream) -> None:
    stream[1].close()


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
        self._idle: list[_Stream] = []
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
        where = self._target
        async with self._slots:
            stream = await self._borrow()
            try:
                data = await _exchange(stream, frames, len(checked) * REPLY_SIZE, where.timeout)
            except _ConnectionEnded as ended:
                _close(stream)
                replies = decode_call(ended.data)
                value = await self._value_now(checked, replies)
                raise ended_early(where.address, checked, replies, value, ended.why) from None
            except BaseException:  # cancelled mid-call: the connection is out of step
                _close(stream)
                raise
            self._give_back(stream)
        return decode_call(data)

    async def _value_now(self, increments: list[int], replies: list[int]) -> int | None:
        if increments[len(replies)] == 0:
            return None
        try:
            stream = await _connect(self._target)
        except Unavailable:
            return None
        try:
            reply = await _exchange(stream, _READ_FRAME, REPLY_SIZE, self._target.timeout)
            return decode_call(reply)[0]
        except _ConnectionEnded:
            return None
        finally:
            _close(stream)

    async def _borrow(self) -> _Stream:
        while True:
            if self._closed:
                raise Unavailable(f"the client of {self.address} is closed")
            if not self._idle:
                return await _connect(self._target)
            stream = self._idle.pop()
            reader, writer = stream
            if not (reader.at_eof() or writer.is_closing()):  # closed by the server
                return stream
            _close(stream)

    def _give_back(self, stream: _Stream) -> None:
        if self._closed:
            _close(stream)
        else:
            self._idle.append(stream)

    async def close(self) -> None:
        """Close every idle connection; calls after it raise ``Unavailable``."""
        self._closed = True
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
        for _, writer in idle:
            with contextlib.suppress(OSError):  # ssl.SSLError is an OSError
                await writer.wait_closed()

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
