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
applied, and are not acknowledged. Health, the prober and the lost-increments
rule are ``server.store.batching``'s; a primary that stops answering is
noticed within ``COMMAND_TIMEOUT``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import gevent
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from counter_server.common.tls import (
    CA_HINT,
    TLSSetupError,
    client_context,
    speaks_plain,
    speaks_tls,
)
from counter_server.common.values import format_address, phrase
from counter_server.server.errors import BackendError, StoreUnavailable, WentBack
from counter_server.server.store.base import Figure, advance
from counter_server.server.store.batching import Batch, BatchingStore
from counter_server.server.store.urls import RedisBackend

if TYPE_CHECKING:
    pass

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
FLUSHERS = 2  # round trips to Redis in flight at once
REPLICA_SET_SECONDS = 1.0  # replicas=all: how often the sentinels are asked for the set
# How a plain Redis answers an unencrypted PING, password or not.
PLAIN_ANSWERS = (b"+PONG", b"-NOAUTH", b"-ERR", b"-WRONGPASS")


def client_for(backend: RedisBackend, with_wait: bool = True) -> redis.Redis:
    """A redis-py client for ``backend``'s primary (found through the
    sentinels). Its command timeout allows for WAIT (``replicas=``) unless
    ``with_wait`` is False: the client that only PINGs and GETs."""
    waits = with_wait and backend.waits
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
    return sentinels_for(backend).master_for(backend.service, **options)


def sentinels_for(backend: RedisBackend) -> Sentinel:
    """redis-py's Sentinel over the URL's sentinels."""
    return Sentinel(
        list(backend.hosts),
        sentinel_kwargs={
            "socket_timeout": SENTINEL_TIMEOUT,
            "socket_connect_timeout": SENTINEL_TIMEOUT,
            "retry": Retry(NoBackoff(), 0),  # ask the next sentinel instead
        },
    )


def check_backend(backend: RedisBackend) -> int | None:
    """At start: the counter as Redis holds it (0 for no key; None while
    Redis does not answer); BackendError (one line) for what waiting will
    not heal: a CA
    file that cannot be loaded, TLS spoken to a plain Redis or plain Redis to
    a TLS port, a sentinel's port given as a Redis server, a password
    refused, no sentinel knowing the primary, a key that holds no counter.
    A Redis that is merely down (refused, timed out) is not an error: the
    server starts and serves once it answers."""
    if backend.tls and backend.ca:
        try:
            client_context(backend.ca)
        except TLSSetupError as exc:
            raise BackendError(f"Redis {backend.url}: ca=: {exc}") from None
    client = client_for(backend, with_wait=False)
    try:
        held = client.get(backend.key)
    except redis.sentinel.MasterNotFoundError:
        raise BackendError(
            f"Redis {backend.url}: no sentinel knows the primary {backend.service!r} "
            f"({'; '.join(_ask_each_sentinel(backend))})"
        ) from None
    except (redis.AuthenticationError, redis.ResponseError) as exc:
        raise BackendError(f"Redis {backend.url}: {_refusal(backend, client, exc)}") from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        mismatch = _tls_mismatch(backend)
        if mismatch:
            raise BackendError(f"Redis {backend.url}: {mismatch}") from None
        if backend.tls and "SSL" in str(exc).upper():
            raise BackendError(f"Redis {backend.url}: TLS failed: {phrase(exc)}") from None
        log.warning(
            "Redis %s is not reachable yet (%s); serving once it is",
            backend.url,
            phrase(exc),
        )
        return None
    finally:
        client.close()
    if held is None:
        return 0
    if not (held.isdigit() and int(held) <= REDIS_MAX):
        shown = held[:40].decode(errors="replace")
        raise BackendError(
            f"Redis {backend.url}: key {backend.key!r} holds {shown!r}, not a counter "
            f"(0..2^63 - 1); choose another key= or set it (SET {backend.key} 0)"
        )
    return int(held)


def _tls_mismatch(backend: RedisBackend) -> str | None:
    """Why a Redis that cut or ignored us will not answer however long we
    wait, if the reason is TLS: it speaks TLS and the URL does not, or the
    other way round. None when it looks merely down."""
    if backend.service is None:
        host, port = backend.hosts[0]
    else:
        try:
            host, port = sentinels_for(backend).discover_master(backend.service)
        except redis.RedisError:
            return None
    where = format_address((host, port))
    if backend.tls and speaks_plain(host, port, b"PING\r\n", PLAIN_ANSWERS, CONNECT_TIMEOUT):
        return f"{where} speaks plain Redis, not TLS: use redis:// (or redis+sentinel://)"
    if not backend.tls and speaks_tls(host, port, CONNECT_TIMEOUT):
        return f"{where} speaks TLS: use rediss:// (or rediss+sentinel://), {CA_HINT}"
    return None


def _refusal(backend: RedisBackend, client: redis.Redis, exc: Exception) -> str:
    """What Redis's refusal at start means, in one phrase."""
    text = str(exc)
    if "NOAUTH" in text or "HELLO must be called" in text or "Authentication required" in text:
        return "Redis requires a password (redis://:PASSWORD@HOST:PORT/DB, or USER:PASSWORD@)"
    if "WRONGPASS" in text or "invalid password" in text or "invalid username" in text:
        who = f"user {backend.username!r}" if backend.username else "the password"
        return f"authentication failed: Redis refused {who}"
    if "unknown command" in text.lower() and backend.service is None:
        sentinel = _as_sentinel(backend, client)
        if sentinel:
            return sentinel
    return phrase(exc)


def _as_sentinel(backend: RedisBackend, client: redis.Redis) -> str | None:
    """If the URL's server is a Redis Sentinel: say so, with the URL to use."""
    try:
        if client.info("server").get("redis_mode") != "sentinel":
            return None
        services = sorted(client.sentinel_masters())
    except redis.RedisError:
        return None
    where = format_address(backend.hosts[0])
    key = f"?key={backend.key}" if backend.key != "counter" else ""
    scheme = "rediss+sentinel" if backend.tls else "redis+sentinel"
    service = services[0] if len(services) == 1 else "SERVICE"
    monitors = f" (it monitors {', '.join(services)})" if services else " (it monitors nothing)"
    return (
        f"{where} is a Redis Sentinel, not a Redis server: use "
        f"{scheme}://{where}/{service}/{backend.database}{key}{monitors}"
    )


def _ask_each_sentinel(backend: RedisBackend) -> list[str]:
    """Why each sentinel of the URL gave no primary, one phrase each."""
    answers = []
    for host, port in backend.hosts:
        where = format_address((host, port))
        sentinel = redis.Redis(host=host, port=port, socket_timeout=SENTINEL_TIMEOUT,
                               socket_connect_timeout=SENTINEL_TIMEOUT,
                               retry=Retry(NoBackoff(), 0))  # fmt: skip
        try:
            known = sentinel.sentinel_get_master_addr_by_name(backend.service)
            answers.append(f"{where}: " + ("has it" if known else "does not monitor it"))
        except redis.ConnectionError as exc:
            reason = "connection refused" if "refused" in str(exc).lower() else "unreachable"
            answers.append(f"{where}: {reason}")
        except redis.RedisError as exc:
            answers.append(f"{where}: {str(exc).splitlines()[0][:80]}")
        finally:
            sentinel.close()
    return answers


class RedisCounterStore(BatchingStore):
    """``CounterStore`` whose counter is one Redis key."""

    service = "Redis"
    # Two flushers: while one waits for Redis, the other can send the reads
    # queued meanwhile (each INCRBY is atomic, so replies stay exact).
    flushers = FLUSHERS
    errors_caught = (redis.RedisError,)
    refusals = (redis.AuthenticationError, redis.ResponseError)

    def __init__(self, backend: RedisBackend) -> None:
        super().__init__(backend.key, log)
        self.backend = backend
        self._redis = client_for(backend)
        self._pool = self._redis.connection_pool
        # PINGs and GETs never wait for replicas: a hung primary costs them
        # COMMAND_TIMEOUT, whatever WAIT's timeout.
        self._checks = client_for(backend, with_wait=False) if backend.waits else self._redis
        # replicas=all: every replica any sentinel has listed for a primary.
        self._sentinels = sentinels_for(backend) if backend.all_replicas else None
        self._replica_sets: dict[tuple[str, int], set[tuple[str, int]]] = {}
        self._replicas_asked = 0.0  # when the sentinels were last asked
        self._primary: tuple[str, int] | None = None  # as the sentinels named it then
        self._connections: dict = {}  # flusher greenlet -> its own connection
        self.replica_shortfalls = 0
        self._start()

    def current_value(self) -> int | None:
        """Ask Redis (for the start-up and stop lines); None if it cannot answer."""
        try:
            self._last_value = max(self._last_value, int(self._checks.get(self.key) or 0))
        except redis.RedisError as exc:
            log.warning("Redis: cannot read %s: %s", self.key, exc)
            return None
        return self._last_value

    def _flush(self, batch: Batch) -> None:
        """One round trip for the whole batch: INCRBY of the sum (and WAIT)."""
        sums = [sum(increments) for increments in batch.reads]
        try:
            if not self._reachable():
                raise StoreUnavailable("Redis unreachable")
            if self._lost is not None and not self._restored():
                self._finish(batch, error=self._lost)
                return
            confirmed = self._last_value  # before this round trip is sent
            batch_sum = sum(sums)
            if batch_sum > REDIS_MAX:  # not even an argument Redis accepts
                self._flush_per_read(batch, sums, confirmed)
                return
            results = self._incrby(batch_sum)
            self.round_trips += 1
            self.reads_batched += len(sums)
            after = results[0]
            if isinstance(after, redis.ResponseError) and "overflow" in str(after):
                self._flush_per_read(batch, sums, confirmed)
                return
            if isinstance(after, Exception):
                raise after
            if after - batch_sum < confirmed:
                raise WentBack(after - batch_sum)
            self._check_wait(results[1:], results[-1] if self.backend.waits else 0)
        except WentBack as exc:
            self._went_back(batch, exc.before, confirmed)
            return
        except (redis.RedisError, StoreUnavailable) as exc:
            self._fail(batch, exc)
            return
        self._healthy()
        value = after - batch_sum
        for increments, total in zip(batch.reads, sums, strict=True):
            batch.replies.append(advance(value, increments, REDIS_MAX))
            value += total
        self._last_value = max(self._last_value, after)
        self._finish(batch)

    def _flush_per_read(self, batch: Batch, sums: list[int], confirmed: int) -> None:
        """The batch's sum would pass 2^63 - 1: one MULTI/EXEC of an INCRBY per
        read, so the reads that fit are applied and a read that would pass the
        limit (or whose own sum Redis cannot even take) applies the frames
        that still fit and is refused from there."""
        pipe = self._redis.pipeline(transaction=True)
        for total in sums:
            if total <= REDIS_MAX:  # a larger one is refused before it is sent
                pipe.incrby(self.key, total)
        answers = iter(pipe.execute(raise_on_error=False))
        self.round_trips += 1
        for increments, total in zip(batch.reads, sums, strict=True):
            result = next(answers) if total <= REDIS_MAX else None
            if result is None or isinstance(result, Exception):
                batch.replies.append(self._apply_prefix(increments, confirmed))
            else:
                if result - total < confirmed:
                    raise WentBack(result - total)
                batch.replies.append(advance(result - total, increments, REDIS_MAX))
                self._last_value = max(self._last_value, result)
        if self.backend.waits:
            needed = self._needed_replicas()
            self._check_wait([self._redis.execute_command("WAIT", *self._wait_args(needed))],
                             needed)  # fmt: skip
        self._finish(batch)

    def _incrby(self, total: int) -> list:
        """[the total after INCRBY (or the error Redis answered), WAIT's
        count, the replicas WAIT asked for]."""
        if not self.backend.waits:
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
        needed = self._needed_replicas()  # before anything is sent
        pipe = self._redis.pipeline(transaction=False)
        pipe.incrby(self.key, total)
        pipe.execute_command("WAIT", *self._wait_args(needed))
        return [*pipe.execute(raise_on_error=False), needed]

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

    def _wait_args(self, needed: int) -> tuple[int, int]:
        return needed, self.backend.replica_timeout_ms

    def _needed_replicas(self) -> int:
        """How many replicas WAIT must count: ``replicas=N``; with
        ``replicas=all``, every replica the sentinels have listed for the
        current primary (the largest set seen, so a replica cut off and
        dropped from the primary's own list still counts). StoreUnavailable
        if the sentinels cannot be asked or know no replica."""
        if not self.backend.all_replicas:
            return self.backend.replicas
        now = time.monotonic()
        if now - self._replicas_asked >= REPLICA_SET_SECONDS or not self._replica_sets:
            self._ask_sentinels()
            self._replicas_asked = now
        primary = self._primary
        known = self._replica_sets.get(primary, set()) - {primary}
        if not known:
            raise StoreUnavailable(
                f"replicas=all: the sentinels know no replica of {self.backend.service!r}"
            )
        return len(known)

    def _ask_sentinels(self) -> None:
        """Add what each sentinel lists as the primary's replicas to the set."""
        try:
            self._primary = self._sentinels.discover_master(self.backend.service)
        except redis.RedisError as exc:
            raise StoreUnavailable(f"replicas=all: cannot ask the sentinels: {exc}") from None
        answered = 0
        for sentinel in self._sentinels.sentinels:
            try:
                listed = sentinel.sentinel_slaves(self.backend.service)
            except redis.RedisError:
                continue
            answered += 1
            known = self._replica_sets.setdefault(self._primary, set())
            known.update((replica["ip"], int(replica["port"])) for replica in listed)
        if not answered:
            raise StoreUnavailable("replicas=all: no sentinel lists the replicas")

    def _check_wait(self, results: list, needed: int) -> None:
        """StoreUnavailable unless WAIT saw ``needed`` replicas (the increment
        is applied on the primary, but not acknowledged: a failover could lose it)."""
        if not self.backend.waits:
            return
        copies = results[0]
        if isinstance(copies, Exception):
            raise copies
        if copies < needed:
            self.replica_shortfalls += 1
            raise StoreUnavailable(
                f"only {copies} of {needed} replicas confirmed within "
                f"{self.backend.replica_timeout_ms} ms"
            )

    def _fail(self, batch: Batch, exc: Exception) -> None:
        self._drop_connections()
        super()._fail(batch, exc)

    def _read_value(self) -> int:
        return int(self._checks.get(self.key) or 0)

    def _restore_hint(self, value: int) -> str:
        return f"SET {self.key} {value}"

    def _reachable(self, attempts: int = CONNECT_RETRIES) -> bool:
        """After a failure, wait (bounded) until Redis answers PING."""
        if not self._suspect:
            return True
        for attempt in range(attempts):
            try:
                self._checks.ping()
            except redis.RedisError as exc:
                self._no_answer(exc)
                if attempt:  # the first retry is on a new connection: at once
                    gevent.sleep(RETRY_SECONDS)
                continue
            if self._unreachable:
                self._answered()
            self._suspect = False
            return True
        return False

    def _blocker(self) -> str | None:
        """With replicas=: fewer replicas attached to the primary than a
        reply waits for (WAIT cannot be satisfied until more attach)."""
        if not self.backend.waits:
            return None
        asked = f"replicas={'all' if self.backend.all_replicas else self.backend.replicas}"
        try:
            needed = self._needed_replicas()
        except StoreUnavailable as exc:
            return f"{exc}; increments are not acknowledged until one is known"
        try:
            replication = self._checks.info("replication")
        except redis.RedisError:
            return None  # unreachable: the caller's read tells
        online = sum(
            1
            for name, replica in replication.items()
            if name.startswith("slave") and isinstance(replica, dict)
            and replica.get("state") == "online"
        )  # fmt: skip
        if online >= needed:
            return None
        return (
            f"only {online} of the {needed} replicas a reply waits for are attached to the "
            f"primary ({asked}); increments are not acknowledged until they are"
        )

    def _apply_prefix(self, increments: Sequence[int], confirmed: int) -> list[int]:
        """A read whose total would overflow: apply the frames that fit."""
        value = int(self._redis.get(self.key) or 0)
        if value < confirmed:
            raise WentBack(value)
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

    def figures(self) -> list[Figure]:
        return [
            *super().figures(),
            Figure("backend_replica_shortfalls",
                   "Round trips whose WAIT saw fewer replicas than replicas= asks.",
                   self.replica_shortfalls),
        ]  # fmt: skip

    def close(self) -> bool:
        self._drain()
        self._drop_connections()
        self.current_value()
        self._redis.close()
        self._checks.close()
        return True


def open_store(backend: RedisBackend) -> RedisCounterStore:
    """The store of an instance (``server.wiring`` calls it)."""
    return RedisCounterStore(backend)
