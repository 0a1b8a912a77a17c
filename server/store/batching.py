"""What every store over a network service shares (Redis, etcd): reads
queued by the connections, flushed by flusher greenlets as one round trip
each, replies handed out only for what the service confirmed; a prober that
keeps health current without traffic; and the lost-increments rule.

Lost increments: the counter only rises, so a round trip whose result, less
its own sum, is below the value this instance had confirmed when it sent
the round trip means the service lost acknowledged increments (restarted
empty, the key set lower, a failover to a replica without them). Its replies
would repeat values already handed out: nothing is acknowledged from then
on (health says why) until the key holds at least that value again; the
prober then resumes by itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import gevent
from gevent.event import Event

from counter_server.common.ratelog import RateLimitedLog
from counter_server.server.errors import StoreUnavailable
from counter_server.server.store.base import Figure

if TYPE_CHECKING:
    from counter_server.server.connection import Outbox

PROBE_SECONDS = 0.5  # ask the service when no round trip has answered for this long
CLOSE_SECONDS = 5.0  # at shutdown, for the round trips in flight


class Batch:
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


class BatchingStore:
    """``CounterStore`` and ``DeferringStore`` over a remote counter. A
    subclass sets ``service`` (its name in messages) and ``key``, and
    implements ``_flush(batch)`` (one round trip; then ``_finish``,
    ``_fail`` or ``_went_back``) and ``_read_value()`` (the key's value now;
    raises one of ``errors_caught`` if the service cannot answer)."""

    service = "the store"
    flushers = 1  # round trips in flight at once
    errors_caught: tuple[type[BaseException], ...] = ()  # what _read_value raises on failure
    # Those of errors_caught that the service sent (a refused password): it
    # answers, so it is not called unreachable.
    refusals: tuple[type[BaseException], ...] = ()

    def __init__(self, key: str, log: logging.Logger) -> None:
        self.key = key
        self._log = log
        self._open = Batch()  # the reads waiting for the next round trip
        self._wake = Event()
        self._in_flight = 0
        self._unhealthy: str | None = None  # why increments cannot be confirmed now
        self._unreachable = False  # the service did not answer when last asked
        self._lost: str | None = None  # why the service's value cannot be trusted
        self._last_value = 0  # the highest value the service confirmed to this instance
        self._last_answer = time.monotonic()  # when the service last answered
        self._suspect = True  # check the service before the next round trip
        self._applied = 0
        self.round_trips = 0
        self.reads_batched = 0
        self.errors = 0
        self.went_back = 0
        self._events = RateLimitedLog(log)  # an outage fails every batch
        self._greenlets: list[gevent.Greenlet] = []

    def _start(self) -> None:
        """Start the flushers and the prober (once the subclass is ready)."""
        self._greenlets = [gevent.spawn(self._run) for _ in range(self.flushers)]
        self._greenlets.append(gevent.spawn(self._probe))

    @property
    def value(self) -> int:
        """The last value the service confirmed to this instance."""
        return self._last_value

    @property
    def requests_applied(self) -> int:
        return self._applied

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
            self._open = Batch()
            self._in_flight += 1
            try:
                self._flush(batch)
            except Exception:  # never let a flusher die: fail this batch
                self._log.exception(
                    "%s: unexpected error; %d reads not acknowledged",
                    self.service,
                    len(batch.reads),
                )
                self._finish(batch, error="internal error")
            finally:
                self._in_flight -= 1

    def _flush(self, batch: Batch) -> None:
        raise NotImplementedError

    def _read_value(self) -> int:
        raise NotImplementedError

    def _finish(self, batch: Batch, error: str | None = None) -> None:
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

    def _fail(self, batch: Batch, exc: Exception) -> None:
        """The round trip failed (or its outcome is unknown): nothing of the
        batch is acknowledged."""
        self._suspect = True
        self._unhealthy = f"{self.service}: {exc}"
        self.errors += 1
        self._events.log(
            "failed",
            logging.ERROR,
            "%s: %s; %d reads not acknowledged",
            self.service,
            exc,
            len(batch.reads),
            extra={"error": str(exc), "reads": len(batch.reads)},
        )
        self._finish(batch, error=f"{self.service}: {exc}")

    def _went_back(self, batch: Batch, before: int, confirmed: int) -> None:
        """The service holds less than this instance confirmed: refuse this
        batch and everything after it until the key is restored."""
        self._lose(before, confirmed)
        self._finish(batch, error=self._lost)

    def _lose(self, before: int, confirmed: int) -> None:
        """Stop trusting the service's value (``before``, below ``confirmed``)."""
        self.went_back += 1
        self._lost = (
            f"{self.service} key {self.key!r} went back to {before}, below {confirmed}, the last "
            f"value this server confirmed: acknowledged increments were lost in "
            f"{self.service}; nothing is acknowledged until the key holds at least {confirmed}"
        )
        self._log.error(
            "%s (restore it with %s, or higher if other instances confirmed more)",
            self._lost,
            self._restore_hint(confirmed),
            extra={"key": self.key, "store_value": before, "confirmed": confirmed},
        )

    def _restore_hint(self, value: int) -> str:
        return f"the key set to {value}"

    def _restored(self, value: int | None = None) -> bool:
        """While the service's value is not trusted: True (and trusted
        again) once the key holds at least the last value confirmed here
        (``value``, or read now)."""
        if value is None:
            try:
                value = self._read_value()
            except (*self.errors_caught, ValueError):
                return False
        if value < self._last_value:
            return False
        self._log.warning(
            "%s key %r holds %d again, at least the last confirmed %d: acknowledging again",
            self.service,
            self.key,
            value,
            self._last_value,
        )
        self._lost = None
        return True

    def _healthy(self) -> None:
        """A round trip was confirmed."""
        self._last_answer = time.monotonic()
        if self._unhealthy is not None:
            self._log.warning("%s: confirming increments again", self.service)
        self._unreachable = False
        self._unhealthy = None

    def _probe(self) -> None:
        """Whenever no round trip has answered for ``PROBE_SECONDS``: read the
        key, so health follows the service without traffic: unreachable, the
        key gone or below the value confirmed here (lost increments), or
        restored."""
        while True:
            gevent.sleep(PROBE_SECONDS)
            if time.monotonic() - self._last_answer < PROBE_SECONDS:
                continue
            confirmed = self._last_value  # before the read is sent
            try:
                value = self._read_value()
            except ValueError as exc:  # the key holds something that is not a counter
                self._unhealthy = f"{self.service}: {exc}"
                self._suspect = True
                continue
            except self.errors_caught as exc:
                self._no_answer(exc)
                continue
            self._last_answer = time.monotonic()
            if self._lost is None and value < confirmed:
                self._lose(value, confirmed)
            elif self._lost is not None:
                self._restored(value)
            if self.blocker() is None and self._unhealthy is not None:
                self._answered()

    def _no_answer(self, exc: BaseException) -> None:
        """A check (a PING, a read) failed: no answer, or a refusal."""
        if isinstance(exc, self.refusals):
            reason = f"{self.service}: {exc}"
            if reason != self._unhealthy:
                self._log.warning("%s; retrying", reason)
            self._unhealthy = reason
        else:
            if not self._unreachable:
                self._log.warning("%s: %s; retrying", self.service, exc)
            self._unreachable = True
            self._unhealthy = f"{self.service} unreachable: {exc}"
        self._suspect = True

    def _answered(self) -> None:
        """A check was answered and nothing known stands in the way: healthy
        until a round trip says otherwise. Only a service that had stopped
        answering is said to be reachable again."""
        if self._unreachable:
            self._log.warning("%s: reachable again", self.service)
        elif self._unhealthy is not None:
            self._log.warning("%s: answering again", self.service)
        self._unreachable = False
        self._unhealthy = None

    def blocker(self) -> str | None:
        """Why increments cannot be acknowledged although the service answers
        (replicas missing, say), as the store's health, logged when it
        changes; None when nothing is known to stand in the way. Asks the
        service: for the start-up line and the prober."""
        reason = self._blocker()
        if reason is not None:
            if f"{self.service}: {reason}" != self._unhealthy:
                self._log.warning("%s: %s", self.service, reason)
            self._unhealthy = f"{self.service}: {reason}"
            self._unreachable = False
        return reason

    def _blocker(self) -> str | None:
        return None

    def health(self) -> str | None:
        return self._lost or self._unhealthy

    def figures(self) -> list[Figure]:
        service = self.service
        return [
            Figure("backend_round_trips", f"Round trips to {service} (one per flush).",
                   self.round_trips),
            Figure("backend_reads_batched",
                   "Connection reads carried by those round trips (÷ round trips = batch).",
                   self.reads_batched),
            Figure("backend_errors", f"Failed {service} round trips.", self.errors),
            Figure("backend_went_back",
                   f"Times {service} answered below the value this server had confirmed"
                   f" (acknowledged increments lost in {service}).", self.went_back),
            Figure("backend_value_lost",
                   f"1 while {service} holds less than this server confirmed (nothing is"
                   " acknowledged until the key is restored), else 0.",
                   int(self._lost is not None), "gauge"),
        ]  # fmt: skip

    def _drain(self) -> None:
        """At shutdown: wait (bounded) for the reads queued and in flight,
        then stop the greenlets."""
        started = time.monotonic()
        while (self._open.reads or self._in_flight) and (
            time.monotonic() - started < CLOSE_SECONDS
        ):
            gevent.sleep(0.01)
        gevent.killall(self._greenlets)
