"""The counter in Redis, so any number of server instances on any machines
share it (``--backend redis://...``, or ``redis+sentinel://...`` to follow a
primary through failovers; see ``parse_backend``).

Batching: ``apply`` queues its increments and waits; one flusher greenlet
sends everything queued since the last round trip as one ``INCRBY`` of their
sum. Redis returns the total after it; the reads of a flush are in the
flusher's order, so every frame's reply follows from that total. INCRBY is
atomic and exact, so replies stay exact and distinct across instances.

Range: Redis integers are signed 64-bit, so this backend counts from 0 to
2^63 - 1. If the flush's INCRBY would pass it, Redis refuses it and the flush
falls back to one MULTI/EXEC of an INCRBY per read: the reads that fit are
applied, the read that would pass the limit applies the frames that still fit
(a second INCRBY) and is refused from there, like any overflow.

Replicas (``replicas=N``): the INCRBY is followed by ``WAIT N`` in the same
round trip, and no reply is sent unless N replicas have the increment; a
failover to one of them then cannot lose an acknowledged increment.

Outages: a reply is only sent for an increment Redis confirmed. If Redis cannot
be reached, queued reads wait while the flusher retries (bounded), then fail:
their connections are closed without replies, the server keeps running and
recovers when Redis returns. A command whose outcome is unknown (the
connection broke after it was sent, or WAIT fell short) is never retried, so
nothing is applied twice by us; its increments may or may not have been
applied, and are not acknowledged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import gevent
import redis
from gevent.event import Event
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from common.ratelog import RateLimitedLog
from server.store.base import Figure, StoreUnavailable, advance
from server.store.redis_url import Backend, BackendError

if TYPE_CHECKING:
    from server.outbox import Outbox

log = logging.getLogger("counter.redis")

REDIS_MAX = 2**63 - 1
CONNECT_RETRIES = 10  # PINGs before the queued reads are failed
RETRY_SECONDS = 0.5  # between those PINGs
SOCKET_TIMEOUT = 5.0  # connect and command timeout
FLUSHERS = 2  # round trips to Redis in flight at once


def client_for(backend: Backend) -> redis.Redis:
    """A redis-py client for ``backend``'s primary (found through the sentinels)."""
    options = {
        "db": backend.database,
        "username": backend.username,
        "password": backend.password,
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": SOCKET_TIMEOUT,
        "retry": Retry(NoBackoff(), 0),  # we decide what may be retried
    }
    if backend.tls:
        options.update(ssl=True, ssl_ca_certs=backend.ca)
    if backend.service is None:
        host, port = backend.hosts[0]
        return redis.Redis(host=host, port=port, **options)
    sentinel = Sentinel(
        list(backend.hosts),
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        sentinel_kwargs={
            "socket_timeout": SOCKET_TIMEOUT,
            "socket_connect_timeout": SOCKET_TIMEOUT,
            "retry": Retry(NoBackoff(), 0),  # ask the next sentinel instead
        },
    )
    return sentinel.master_for(backend.service, **options)


def check_backend(backend: Backend) -> None:
    """At start: BackendError (one line) if the password is refused or no
    sentinel knows the primary. A plain Redis that is merely down is not an
    error: the server starts and serves once it comes back."""
    client = client_for(backend)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise BackendError(f"Redis {backend.url}: authentication failed: {exc}") from None
    except redis.sentinel.MasterNotFoundError as exc:
        raise BackendError(
            f"Redis {backend.url}: no sentinel knows the primary {backend.service!r}: {exc}"
        ) from None
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
            raise BackendError(f"Redis {backend.url}: authentication failed: {exc}") from None
        raise BackendError(f"Redis {backend.url}: {exc}") from None
    except redis.ConnectionError as exc:
        if backend.tls and "SSL" in str(exc).upper():
            raise BackendError(f"Redis {backend.url}: TLS failed: {exc}") from None
        log.warning("Redis %s is not reachable yet (%s); serving once it is", backend.url, exc)
    finally:
        client.close()


class _Batch:
    """The reads queued for one round trip. Each read came with the outbox
    its replies go to (``submit``), or None if its caller waits on the
    batch's event (``apply``)."""

    __slots__ = ("done", "error", "finished", "outboxes", "reads", "replies")

    def __init__(self) -> None:
        self.reads: list[Sequence[int]] = []
        self.outboxes: list[Outbox | None] = []
        self.replies: list[list[int]] = []  # per read, once done
        self.error: str | None = None
        self.finished = False
        self.done = Event()


class RedisCounterStore:
    """``CounterStore`` whose counter is one Redis key."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.key = backend.key
        self._redis = client_for(backend)
        self._pool = self._redis.connection_pool
        self._connections: dict = {}  # flusher greenlet -> its own connection
        self._open = _Batch()  # the reads waiting for the next round trip
        self._wake = Event()
        self._in_flight = 0
        self._suspect = True  # check the connection before the next transaction
        self._unhealthy: str | None = None  # why increments cannot be confirmed now
        self._last_value = 0
        self._applied = 0
        self.round_trips = 0
        self.reads_batched = 0
        self.errors = 0
        self.replica_shortfalls = 0
        self._events = RateLimitedLog(log)  # an outage fails every batch
        # Two flushers: while one waits for Redis, the other can send the
        # reads queued meanwhile (each INCRBY is atomic, so replies stay exact).
        self._flushers = [gevent.spawn(self._run) for _ in range(FLUSHERS)]

    @property
    def value(self) -> int:
        """The last value Redis confirmed to this instance."""
        return self._last_value

    @property
    def requests_applied(self) -> int:
        return self._applied

    def current_value(self) -> int:
        """Ask Redis (for the start-up and stop lines); the last known value if it is down."""
        try:
            self._last_value = int(self._redis.get(self.key) or 0)
        except redis.RedisError as exc:
            log.warning("Redis: cannot read %s: %s", self.key, exc)
        return self._last_value

    def submit(self, increments: Sequence[int], outbox: Outbox) -> None:
        """Queue a read for the next round trip; its replies go to ``outbox``
        (``DeferringStore``)."""
        batch = self._open
        batch.reads.append(increments)
        batch.outboxes.append(outbox)
        self._wake.set()

    def apply(self, increments: Sequence[int]) -> Sequence[int]:
        batch = self._open
        index = len(batch.reads)
        batch.reads.append(increments)
        batch.outboxes.append(None)
        self._wake.set()
        batch.done.wait()
        if batch.error is not None:
            raise StoreUnavailable(batch.error)
        return batch.replies[index]

    def _run(self) -> None:
        while True:
            # While unhealthy, look again now and then even without traffic,
            # so /healthz recovers by itself.
            self._wake.wait(timeout=None if self._unhealthy is None else RETRY_SECONDS)
            self._wake.clear()
            batch = self._open
            if not batch.reads:
                if self._unhealthy is not None:
                    self._reachable(attempts=1)
                continue
            self._open = _Batch()
            self._in_flight += 1
            try:
                self._flush(batch)
            except Exception:  # never let a flusher die: fail this batch
                log.exception(
                    "Redis: unexpected error; %d reads not acknowledged", len(batch.reads)
                )
                self._finish(batch, error="internal error")
            finally:
                self._in_flight -= 1

    def _flush(self, batch: _Batch) -> None:
        """One round trip for the whole batch: INCRBY of the sum (and WAIT)."""
        sums = [sum(increments) for increments in batch.reads]
        try:
            if not self._reachable():
                raise StoreUnavailable("Redis unreachable")
            results = self._incrby(sum(sums))
            self.round_trips += 1
            self.reads_batched += len(sums)
            after = results[0]
            if isinstance(after, redis.ResponseError) and "overflow" in str(after):
                self._flush_per_read(batch, sums)
                return
            if isinstance(after, Exception):
                raise after
            self._check_wait(results[1:])
        except (redis.RedisError, StoreUnavailable) as exc:
            self._fail(batch, exc)
            return
        self._healthy()
        value = after - sum(sums)
        for increments, total in zip(batch.reads, sums, strict=True):
            batch.replies.append(advance(value, increments, REDIS_MAX))
            value += total
        self._last_value = max(self._last_value, after)
        self._finish(batch)

    def _flush_per_read(self, batch: _Batch, sums: list[int]) -> None:
        """The batch's sum would pass 2^63 - 1: one MULTI/EXEC of an INCRBY per
        read, so the reads that fit are applied and the one that would pass the
        limit applies the frames that still fit."""
        pipe = self._redis.pipeline(transaction=True)
        for total in sums:
            pipe.incrby(self.key, total)
        results = pipe.execute(raise_on_error=False)
        self.round_trips += 1
        for increments, total, result in zip(batch.reads, sums, results, strict=True):
            if isinstance(result, Exception):
                batch.replies.append(self._apply_prefix(increments))
            else:
                batch.replies.append(advance(result - total, increments, REDIS_MAX))
                self._last_value = max(self._last_value, result)
        if self.backend.replicas:
            self._check_wait([self._redis.execute_command("WAIT", *self._wait_args())])
        self._finish(batch)

    def _finish(self, batch: _Batch, error: str | None = None) -> None:
        """Hand every read its replies, or the error for all (once per batch)."""
        if batch.finished:
            return
        batch.finished = True
        if error is not None:
            batch.error = error
            for outbox in batch.outboxes:
                if outbox is not None:
                    outbox.fail(StoreUnavailable(error))
        else:
            self._applied += sum(len(replies) for replies in batch.replies)
            value = self._last_value
            for increments, replies, outbox in zip(
                batch.reads, batch.replies, batch.outboxes, strict=True
            ):
                if outbox is not None:
                    outbox.deliver(increments, replies, value)
        if None in batch.outboxes:
            batch.done.set()

    def _incrby(self, total: int) -> list:
        """[the total after INCRBY (or the error Redis answered), WAIT's count]."""
        if not self.backend.replicas:
            # Straight on this flusher's own connection, kept between round
            # trips: far less client work per round trip (often one read's
            # worth) than Redis.execute_command, the pool or a pipeline.
            connection = self._connection()
            try:
                connection.send_command("INCRBY", self.key, total)
                return [connection.read_response()]
            except redis.ResponseError as exc:
                return [exc]
            except BaseException:
                self._drop_connections()
                raise
        pipe = self._redis.pipeline(transaction=False)
        pipe.incrby(self.key, total)
        self._queue_wait(pipe)
        return pipe.execute(raise_on_error=False)

    def _connection(self):
        """The calling flusher's connection. Dropped after any failure, so a
        Redis that went away costs the round trip that found out, like any
        outage (not acknowledged, never retried)."""
        flusher = gevent.getcurrent()
        connection = self._connections.get(flusher)
        if connection is None:
            connection = self._connections[flusher] = self._pool.make_connection()
            connection.connect()
        return connection

    def _drop_connections(self) -> None:
        """After any failure: the next round trips start on new connections
        (a failover may have moved the primary)."""
        for connection in self._connections.values():
            connection.disconnect()
        self._connections.clear()

    def _wait_args(self) -> tuple[int, int]:
        return self.backend.replicas, self.backend.replica_timeout_ms

    def _queue_wait(self, pipe) -> None:
        if self.backend.replicas:
            pipe.execute_command("WAIT", *self._wait_args())

    def _check_wait(self, results: list) -> None:
        """StoreUnavailable unless WAIT saw enough replicas (the increment is
        applied on the primary, but not acknowledged: a failover could lose it)."""
        if not self.backend.replicas:
            return
        copies = results[0]
        if isinstance(copies, Exception):
            raise copies
        if copies < self.backend.replicas:
            self.replica_shortfalls += 1
            raise StoreUnavailable(
                f"only {copies} of {self.backend.replicas} replicas confirmed within "
                f"{self.backend.replica_timeout_ms} ms"
            )

    def _fail(self, batch: _Batch, exc: Exception) -> None:
        self._suspect = True
        self._drop_connections()
        self._unhealthy = f"Redis: {exc}"
        self.errors += 1
        self._events.log(
            "failed",
            logging.ERROR,
            "Redis: %s; %d reads not acknowledged",
            exc,
            len(batch.reads),
            extra={"error": str(exc), "reads": len(batch.reads)},
        )
        self._finish(batch, error=f"Redis: {exc}")

    def _healthy(self) -> None:
        if self._unhealthy is not None:
            log.warning("Redis: confirming increments again")
        self._unhealthy = None

    def _reachable(self, attempts: int = CONNECT_RETRIES) -> bool:
        """After a failure, wait (bounded) until Redis answers PING."""
        if not self._suspect:
            return True
        for attempt in range(attempts):
            try:
                self._redis.ping()
            except redis.RedisError as exc:
                if attempt == 0 and self._unhealthy is None:
                    log.warning("Redis: %s; retrying", exc)
                self._unhealthy = f"Redis unreachable: {exc}"
                if attempts > 1:
                    gevent.sleep(RETRY_SECONDS)
                continue
            if self._unhealthy is not None:
                log.warning("Redis: reachable again")
            self._suspect = False
            self._unhealthy = None
            return True
        return False

    def _apply_prefix(self, increments: Sequence[int]) -> list[int]:
        """A read whose total would overflow: apply the frames that fit."""
        value = int(self._redis.get(self.key) or 0)
        prefix = advance(value, increments, REDIS_MAX)
        if not prefix:
            return []
        total = prefix[-1] - value
        try:
            after = self._redis.incrby(self.key, total)
        except redis.ResponseError:  # another instance got there first
            return []
        self._last_value = max(self._last_value, after)
        return advance(after - total, increments[: len(prefix)], REDIS_MAX)

    def health(self) -> str | None:
        return self._unhealthy

    def figures(self) -> list[Figure]:
        return [
            Figure("backend_round_trips", "Round trips to Redis (one INCRBY each).",
                   self.round_trips),
            Figure("backend_reads_batched",
                   "Connection reads carried by those transactions (÷ round trips = batch).",
                   self.reads_batched),
            Figure("backend_errors", "Failed Redis round trips.", self.errors),
            Figure("backend_replica_shortfalls",
                   "Round trips whose WAIT saw fewer replicas than replicas= asks.",
                   self.replica_shortfalls),
        ]  # fmt: skip

    def close(self) -> bool:
        started = time.monotonic()
        while (self._open.reads or self._in_flight) and (
            time.monotonic() - started < SOCKET_TIMEOUT
        ):
            gevent.sleep(0.01)
        gevent.killall(self._flushers)
        self._drop_connections()
        self.current_value()
        self._redis.close()
        return True
