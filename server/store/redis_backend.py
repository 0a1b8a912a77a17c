"""The counter in Redis, so any number of server instances on any machines
share it (``--backend redis://HOST:PORT/DB?key=NAME``).

Batching: ``apply`` queues its increments and waits; one flusher greenlet
sends everything queued since the last round trip as one MULTI/EXEC of INCRBY
commands (one per connection read, so each read's total comes back), and
derives every frame's reply from its read's returned total. INCRBY is atomic
and exact, so replies stay exact and distinct across instances.

Range: Redis integers are signed 64-bit, so this backend counts from 0 to
2^63 - 1; an increment past that is refused like any overflow (Redis itself
refuses the INCRBY, and the frames of the read that still fit are applied with
a second INCRBY).

Outages: a reply is only sent for an increment Redis confirmed. If Redis cannot
be reached, queued reads wait while the flusher retries (bounded), then fail:
their connections are closed without replies, the server keeps running and
recovers when Redis returns. A transaction whose outcome is unknown (the
connection broke after it was sent) is never retried, so nothing is applied
twice by us; its increments may or may not have been applied, and are not
acknowledged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from urllib.parse import parse_qs, urlsplit

import gevent
import redis
from gevent.event import Event
from redis.backoff import NoBackoff
from redis.retry import Retry

from server.store.base import Figure, StoreUnavailable, advance

log = logging.getLogger("counter.redis")

REDIS_MAX = 2**63 - 1
CONNECT_RETRIES = 10
RETRY_SECONDS = 0.5
SOCKET_TIMEOUT = 5.0


def parse_backend(url: str) -> tuple[str, str]:
    """``redis://HOST:PORT/DB?key=NAME`` -> (connection URL, key); ValueError if not."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"expected redis://HOST:PORT/DB?key=NAME, got {url!r}")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    database = parts.path.lstrip("/") or "0"
    if not database.isdigit():
        raise ValueError(f"the database must be a number, got {database!r}")
    key = parse_qs(parts.query).get("key", ["counter"])[0]
    if not key:
        raise ValueError("key= must not be empty")
    connection = f"{parts.scheme}://{parts.netloc}/{database}"
    return connection, key


class _Pending:
    __slots__ = ("done", "error", "increments", "replies")

    def __init__(self, increments: Sequence[int]) -> None:
        self.increments = increments
        self.replies: list[int] = []
        self.error: str | None = None
        self.done = Event()


class RedisCounterStore:
    """``CounterStore`` whose counter is one Redis key."""

    def __init__(self, url: str, key: str) -> None:
        self.key = key
        self._redis = redis.Redis.from_url(
            url,
            retry=Retry(NoBackoff(), 0),  # we decide what may be retried
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
        )
        self._queue: list[_Pending] = []
        self._wake = Event()
        self._suspect = True  # check the connection before the next transaction
        self._unhealthy: str | None = None  # why increments cannot be confirmed now
        self._last_value = 0
        self._applied = 0
        self.round_trips = 0
        self.reads_batched = 0
        self.errors = 0
        self._flusher = gevent.spawn(self._run)

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

    def apply(self, increments: Sequence[int]) -> Sequence[int]:
        pending = _Pending(increments)
        self._queue.append(pending)
        self._wake.set()
        pending.done.wait()
        if pending.error is not None:
            raise StoreUnavailable(pending.error)
        return pending.replies

    def _run(self) -> None:
        while True:
            # While unhealthy, look again now and then even without traffic,
            # so /healthz recovers by itself.
            self._wake.wait(timeout=None if self._unhealthy is None else RETRY_SECONDS)
            self._wake.clear()
            batch, self._queue = self._queue, []
            if not batch and self._unhealthy is not None:
                self._reachable(attempts=1)
            elif batch:
                try:
                    self._flush(batch)
                except Exception:  # never let the flusher die: fail this batch
                    log.exception("Redis: unexpected error; %d reads not acknowledged", len(batch))
                    for pending in batch:
                        if not pending.done.is_set():
                            pending.error = "internal error"
                            pending.done.set()

    def _flush(self, batch: list[_Pending]) -> None:
        try:
            if not self._reachable():
                raise StoreUnavailable("Redis unreachable")
            sums = [sum(p.increments) for p in batch]
            pipe = self._redis.pipeline(transaction=True)
            for total in sums:
                pipe.incrby(self.key, total)
            results = pipe.execute(raise_on_error=False)
        except (redis.RedisError, StoreUnavailable) as exc:
            self._suspect = True
            self._unhealthy = f"Redis: {exc}"
            self.errors += 1
            log.error("Redis: %s; %d reads not acknowledged", exc, len(batch))
            for pending in batch:
                pending.error = f"Redis: {exc}"
                pending.done.set()
            return
        self.round_trips += 1
        self.reads_batched += len(batch)
        for pending, total, result in zip(batch, sums, results, strict=True):
            if isinstance(result, Exception):
                try:
                    pending.replies = self._apply_prefix(pending.increments)
                except redis.RedisError as exc:
                    self._suspect = True
                    pending.error = f"Redis: {exc}"
                    pending.done.set()
                    continue
            else:
                pending.replies = advance(result - total, pending.increments, REDIS_MAX)
                self._last_value = max(self._last_value, result)
            self._applied += len(pending.replies)
            pending.done.set()

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
            Figure("backend_round_trips", "Transactions sent to Redis.", self.round_trips),
            Figure("backend_reads_batched",
                   "Connection reads carried by those transactions (÷ round trips = batch).",
                   self.reads_batched),
            Figure("backend_errors", "Failed Redis round trips.", self.errors),
        ]  # fmt: skip

    def close(self) -> bool:
        started = time.monotonic()
        while self._queue and time.monotonic() - started < SOCKET_TIMEOUT:
            gevent.sleep(0.01)
        self._flusher.kill()
        self.current_value()
        self._redis.close()
        return True
