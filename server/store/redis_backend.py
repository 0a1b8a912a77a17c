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
applied, and are not acknowledged. A prober greenlet PINGs Redis whenever no
round trip has answered for ``PROBE_SECONDS``, so health follows Redis with
or without traffic, and a primary that stops answering is noticed within
``COMMAND_TIMEOUT``.

Lost increments: the counter only rises, so a round trip whose result, less
its own sum, is below the value this instance had confirmed when it sent the
round trip means Redis lost acknowledged increments (restarted empty, the key
set lower, a failover to a replica without them). Its replies would repeat
values already handed out: nothing is acknowledged from then on (health says
why) until the key holds at least that value again; the prober then resumes
by itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import gevent
import redis
from counter_server.common.ratelog import RateLimitedLog
from counter_server.server.store.base import Figure, StoreUnavailable, advance
from counter_server.server.store.redis_url import Backend, BackendError
from gevent.event import Event
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

if TYPE_CHECKING:
    from counter_server.server.outbox import Outbox

log = logging.getLogger("counter.redis")

REDIS_MAX = 2**63 - 1
CONNECT_RETRIES = 10  # PINGs before the queued reads are failed
RETRY_SECONDS = 0.5  # between those PINGs (the first retry, on a new connection, at once)
# A command Redis has not answered within this is taken as lost (a round trip
# on loopback or a LAN takes well under 10 ms): a hung primary costs one
# second, not five. WAIT's own timeout is added to it for round trips with WAIT.
COMMAND_TIMEOUT = 1.0
CONNECT_TIMEOUT = 1.0  # to Redis
# Per sentinel asked for the primary: a sentinel on a host that is cut off
# costs this before the next one is asked (they answer in milliseconds).
SENTINEL_TIMEOUT = 0.3
PROBE_SECONDS = 0.5  # PING Redis when no round trip has answered for this long
CLOSE_SECONDS = 5.0  # at shutdown, for the round trips in flight
FLUSHERS = 2  # round trips to Redis in flight at once


def client_for(backend: Backend, with_wait: bool = True) -> redis.Redis:
    """A redis-py client for ``backend``'s primary (found through the
    sentinels). Its command timeout allows for WAIT (``replicas=``) unless
    ``with_wait`` is False: the client that only PINGs and GETs."""
    waits = with_wait and backend.replicas
    options = {
        "db": backend.database,
        "username": backend.username,
        "password": backend.password,
        "socket_timeout": COMMAND_TIMEOUT + (backend.replica_timeout_ms / 1000 if waits else 0),
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "retry": Retry(NoBackoff(), 0),  # we decide what may be retried
    }
    if backend.tls:
        options.update(ssl=True, ssl_ca_certs=backend.ca)
    if backend.service is None:
        host, port = backend.hosts[0]
        return redis.Redis(host=host, port=port, **options)
    sentinel = Sentinel(
        list(backend.hosts),
        sentinel_kwargs={
            "socket_timeout": SENTINEL_TIMEOUT,
            "socket_connect_timeout": SENTINEL_TIMEOUT,
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


class _WentBack(Exception):
    """Redis answered below the value this instance had confirmed."""

    def __init__(self, before: int) -> None:
        super().__init__(before)
        self.before = before  # what the key held before this round trip's increments


class RedisCounterStore:
    """``CounterStore`` whose counter is one Redis key."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.key = backend.key
        self._redis = client_for(backend)
        self._pool = self._redis.connection_pool
        # PINGs and GETs never wait for replicas: a hung primary costs them
        # COMMAND_TIMEOUT, whatever WAIT's timeout.
        self._checks = client_for(backend, with_wait=False) if backend.replicas else self._redis
        self._connections: dict = {}  # flusher greenlet -> its own connection
        self._open = _Batch()  # the reads waiting for the next round trip
        self._wake = Event()
        self._in_flight = 0
        self._suspect = True  # check the connection before the next transaction
        self._unhealthy: str | None = None  # why increments cannot be confirmed now
        self._lost: str | None = None  # why Redis's value cannot be trusted, until restored
        self._last_value = 0  # the highest value Redis confirmed to this instance
        self._last_answer = time.monotonic()  # when Redis last answered a round trip
        self._applied = 0
        self.round_trips = 0
        self.reads_batched = 0
        self.errors = 0
        self.replica_shortfalls = 0
        self.went_back = 0
        self._events = RateLimitedLog(log)  # an outage fails every batch
        # Two flushers: while one waits for Redis, the other can send the
        # reads queued meanwhile (each INCRBY is atomic, so replies stay exact).
        self._flushers = [gevent.spawn(self._run) for _ in range(FLUSHERS)]
        self._prober = gevent.spawn(self._probe)

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
            self._last_value = int(self._checks.get(self.key) or 0)
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
            self._wake.wait()
            self._wake.clear()
            batch = self._open
            if not batch.reads:
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
            if self._lost is not None and not self._restored():
                self._finish(batch, error=self._lost)
                return
            confirmed = self._last_value  # before this round trip is sent
            results = self._incrby(sum(sums))
            self.round_trips += 1
            self.reads_batched += len(sums)
            after = results[0]
            if isinstance(after, redis.ResponseError) and "overflow" in str(after):
                self._flush_per_read(batch, sums, confirmed)
                return
            if isinstance(after, Exception):
                raise after
            if after - sum(sums) < confirmed:
                raise _WentBack(after - sum(sums))
            self._check_wait(results[1:])
        except _WentBack as exc:
            self._went_back(batch, exc.before, confirmed)
            return
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

    def _flush_per_read(self, batch: _Batch, sums: list[int], confirmed: int) -> None:
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
                batch.replies.append(self._apply_prefix(increments, confirmed))
            else:
                if result - total < confirmed:
                    raise _WentBack(result - total)
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
            # Taken from the pool and given back when dropped: the pool
            # counts the connections it made, up to its max_connections.
            connection = self._connections[flusher] = self._pool.get_connection()
        return connection

    def _drop_connections(self) -> None:
        """After any failure: the next round trips start on new connections
        (a failover may have moved the primary)."""
        connections, self._connections = list(self._connections.values()), {}
        for connection in connections:
            connection.disconnect()
            self._pool.release(connection)

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

    def _went_back(self, batch: _Batch, before: int, confirmed: int) -> None:
        """Redis holds less than this instance confirmed: refuse this batch
        and everything after it until the key is restored."""
        self.went_back += 1
        self._lost = (
            f"Redis key {self.key!r} went back to {before}, below {confirmed}, the last value "
            f"this server confirmed: acknowledged increments were lost in Redis; nothing is "
            f"acknowledged until the key holds at least {confirmed}"
        )
        log.error(
            "%s (restore it with SET %s %d, or higher if other instances confirmed more)",
            self._lost,
            self.key,
            confirmed,
            extra={"key": self.key, "redis_value": before, "confirmed": confirmed},
        )
        self._finish(batch, error=self._lost)

    def _restored(self) -> bool:
        """While Redis's value is not trusted: True (and trusted again) once
        the key holds at least the last value this instance confirmed."""
        try:
            value = int(self._checks.get(self.key) or 0)
        except (redis.RedisError, ValueError):
            return False
        if value < self._last_value:
            return False
        log.warning(
            "Redis key %r holds %d again, at least the last confirmed %d: acknowledging again",
            self.key,
            value,
            self._last_value,
        )
        self._lost = None
        return True

    def _healthy(self) -> None:
        self._last_answer = time.monotonic()
        if self._unhealthy is not None:
            log.warning("Redis: confirming increments again")
        self._unhealthy = None

    def _probe(self) -> None:
        """Whenever no round trip has answered for ``PROBE_SECONDS``: PING
        Redis (and, while its value is not trusted, see whether the key was
        restored), so health follows Redis without traffic."""
        while True:
            gevent.sleep(PROBE_SECONDS)
            if time.monotonic() - self._last_answer < PROBE_SECONDS:
                continue
            try:
                self._checks.ping()
            except redis.RedisError as exc:
                if self._unhealthy is None:
                    log.warning("Redis: %s; retrying", exc)
                self._unhealthy = f"Redis unreachable: {exc}"
                self._suspect = True
                continue
            self._last_answer = time.monotonic()
            if self._lost is not None:
                self._restored()
            if self._unhealthy is not None:
                log.warning("Redis: reachable again")
                self._unhealthy = None

    def _reachable(self, attempts: int = CONNECT_RETRIES) -> bool:
        """After a failure, wait (bounded) until Redis answers PING."""
        if not self._suspect:
            return True
        for attempt in range(attempts):
            try:
                self._checks.ping()
            except redis.RedisError as exc:
                if attempt == 0 and self._unhealthy is None:
                    log.warning("Redis: %s; retrying", exc)
                self._unhealthy = f"Redis unreachable: {exc}"
                if attempt:  # the first retry is on a new connection: at once
                    gevent.sleep(RETRY_SECONDS)
                continue
            if self._unhealthy is not None:
                log.warning("Redis: reachable again")
            self._suspect = False
            self._unhealthy = None
            return True
        return False

    def _apply_prefix(self, increments: Sequence[int], confirmed: int) -> list[int]:
        """A read whose total would overflow: apply the frames that fit."""
        value = int(self._redis.get(self.key) or 0)
        if value < confirmed:
            raise _WentBack(value)
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
        return self._lost or self._unhealthy

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
            Figure("backend_went_back",
                   "Times Redis answered below the value this server had confirmed"
                   " (acknowledged increments lost in Redis).", self.went_back),
            Figure("backend_value_lost",
                   "1 while Redis holds less than this server confirmed (nothing is"
                   " acknowledged until the key is restored), else 0.",
                   int(self._lost is not None), "gauge"),
        ]  # fmt: skip

    def close(self) -> bool:
        started = time.monotonic()
        while (self._open.reads or self._in_flight) and (
            time.monotonic() - started < CLOSE_SECONDS
        ):
            gevent.sleep(0.01)
        gevent.killall([*self._flushers, self._prober])
        self._drop_connections()
        self.current_value()
        self._redis.close()
        self._checks.close()
        return True
