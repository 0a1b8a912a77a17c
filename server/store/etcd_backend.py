"""The counter in etcd (v3), so instances share it and keep it through
partitions: etcd commits through Raft, so a write it confirms is on a
majority of the cluster, and a member cut off from the majority cannot
confirm anything (``--backend etcd://HOST:PORT[,HOST:PORT...]/KEY``).

Client: etcd's JSON gateway (its gRPC API over HTTP/1.1, a documented part
of etcd v3) through urllib3 connection pools, which gevent's monkey-patching
makes cooperative. The gRPC clients need grpcio, which does not cooperate
with gevent; etcd3gw (the maintained JSON-gateway client) goes through
requests, whose machinery cost 1.1 ms of CPU per transaction here against
0.3 ms for urllib3 alone, at every flush (docs/performance.md).

Batching as for Redis (``server.store.batching``): each flush is one
compare-and-swap transaction carrying the flush's sum: "if the key still
holds the value we last saw, set it to that value plus the sum; otherwise
tell us what it holds". Replies are computed from the value the swap
replaced. A failed compare means another instance (or worker) wrote first:
the flush retries at once from the value etcd returned, so nothing is
acknowledged twice and nothing is lost. Comparing the value (not the
revision) is safe because the counter only rises; a value below the one
confirmed here is the lost-increments case.

Retries are idempotent. Each store (each server process) owns a second key,
``KEY/writers/ID`` (ID random per process, removed when it stops), and every
swap also writes a token of its own there and compares that key's revision
with the one last seen. Only this process writes it, one swap at a time, so
when a request's answer is lost and the same transaction is re-sent to the
next endpoint, the re-send's answer tells whose write the key holds: the
token of this swap means the first send committed (its replies stand, and
nothing is applied again); another token means it did not and never can
(the revision it compares has moved on). A writers key that is gone by then
(deleted by hand) leaves the outcome unknown: not acknowledged, not retried.

Range: the key holds the decimal value, 0 to 2^64 - 1, as the protocol.

Outages: the endpoints are tried in turn; a request that fails or times out
(a member cut off from the majority cannot commit) moves to the next
endpoint. When no endpoint answers, a swap's outcome is unknown: not
acknowledged, and not retried (the next flush starts from what etcd holds).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
from collections.abc import Sequence
from typing import NamedTuple

import urllib3

from counter_server.common.tls import (
    CA_HINT,
    TLSSetupError,
    client_context,
    speaks_plain,
    speaks_tls,
)
from counter_server.common.values import format_address, phrase
from counter_server.protocol import MAX_COUNTER
from counter_server.server.errors import (
    BackendError,
    EtcdAnswer,
    EtcdUnavailable,
    StoreUnavailable,
    WentBack,
)
from counter_server.server.store.base import Figure, advance
from counter_server.server.store.batching import Batch, BatchingStore
from counter_server.server.store.urls import EtcdBackend

log = logging.getLogger("counter.etcd")

# An etcd request unanswered within this is given up and the next endpoint
# tried: a commit takes milliseconds; an election about a second.
REQUEST_TIMEOUT = 1.0
SWAP_ATTEMPTS = 64  # compares lost to other writers in a row before a flush gives up
PLAIN_HELLO = b"GET /version HTTP/1.0\r\n\r\n"  # asks a port whether it speaks plain HTTP


class Seen(NamedTuple):
    """The key and this store's writers key, as one answer of etcd's showed them."""

    value: int | None  # the counter (None: the key does not exist)
    writer_revision: int  # the writers key's mod_revision (0: it does not exist)
    writer_token: str | None  # what the writers key holds


UNKNOWN = None  # what _seen is before the key is read and after an unknown outcome
SWAPPED, RECOGNISED, FAILED = "swapped", "recognised", "failed"  # a swap's outcomes


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class EtcdCluster:
    """The cluster's endpoints, used in turn through urllib3 connection
    pools: a request that fails or times out moves to the next endpoint.
    With a user, an auth token is taken (and taken again when etcd says it
    is no longer valid)."""

    def __init__(self, backend: EtcdBackend, timeout: float = REQUEST_TIMEOUT) -> None:
        self.backend = backend
        context = client_context(backend.ca) if backend.tls else None
        pool_class = urllib3.HTTPSConnectionPool if backend.tls else urllib3.HTTPConnectionPool
        extra = {"ssl_context": context} if backend.tls else {}
        self._pools = [
            pool_class(host, port, maxsize=4, timeout=urllib3.Timeout(timeout), retries=False,
                       **extra)
            for host, port in backend.hosts
        ]  # fmt: skip
        self._current = 0
        self._token: str | None = None
        self._key = _b64(backend.key)
        self.writer = f"{backend.key}/writers/{secrets.token_hex(8)}"
        self._writer = _b64(self.writer)

    @property
    def endpoint(self) -> str:
        pool = self._pools[self._current]
        return format_address((pool.host, pool.port))

    def _request(self, pool, path: str, body: dict | None) -> dict:
        """One request to one endpoint: etcd's JSON answer; EtcdAnswer for an
        error etcd sent, urllib3's HTTPError when the request failed."""
        headers = {"Content-Type": "application/json"}
        if self._token and path != "/v3/auth/authenticate":
            headers["Authorization"] = self._token
        if body is None:
            response = pool.urlopen("GET", path, headers=headers, retries=False)
        else:
            response = pool.urlopen("POST", path, body=json.dumps(body), headers=headers,
                                    retries=False)  # fmt: skip
        try:
            answer = json.loads(response.data or b"{}")
        except ValueError:
            answer = {"error": response.data[:200].decode(errors="replace")}
        if response.status == 404:  # etcd's client port knows every /v3 path
            where = format_address((pool.host, pool.port))
            raise EtcdAnswer(f"{where} answers 404 for {path}: not an etcd v3 client endpoint "
                             "(a peer port?)")  # fmt: skip
        if response.status != 200:
            error = answer.get("error") or answer.get("message") or f"HTTP {response.status}"
            if response.status >= 500 and not _definitive(error):
                raise urllib3.exceptions.HTTPError(f"etcd: {error}")  # try another endpoint
            raise EtcdAnswer(error.removeprefix("etcdserver: "))
        return answer

    def _post(self, path: str, body: dict | None = None) -> dict:
        """``path`` on the current endpoint, then the others in turn;
        EtcdUnavailable when none could answer, EtcdAnswer when etcd refused."""
        return self._send(path, body)[0]

    def _send(self, path: str, body: dict | None) -> tuple[dict, bool]:
        """``_post``, and whether the answer came from a re-send (an earlier
        send of the same request failed after it may have reached etcd)."""
        problems = []
        for attempt in range(len(self._pools)):
            pool = self._pools[self._current]
            try:
                return self._authorized(pool, path, body), attempt > 0
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                problems.append(f"{format_address((pool.host, pool.port))}: {_describe(exc)}")
            self._current = (self._current + 1) % len(self._pools)
        raise EtcdUnavailable("; ".join(problems))

    def _authorized(self, pool, path: str, body: dict | None) -> dict:
        if self.backend.username and self._token is None:
            self._authenticate(pool)
        try:
            return self._request(pool, path, body)
        except EtcdAnswer as exc:
            if not self.backend.username or "auth token" not in str(exc):
                raise
        self._authenticate(pool)  # the token expired: once more with a new one
        return self._request(pool, path, body)

    def _authenticate(self, pool) -> None:
        credentials = {"name": self.backend.username, "password": self.backend.password}
        answer = self._request(pool, "/v3/auth/authenticate", credentials)
        self._token = answer["token"]

    def read(self) -> int | None:
        """The key's value (linearizable: only a majority can answer), None
        if it does not exist; ValueError if it holds something else."""
        return self.state().value

    def state(self) -> Seen:
        """The key and the writers key, read together (linearizable)."""
        answer = self._post("/v3/kv/txn", {"success": self._ranges()})
        return self._seen_in(answer)

    def swap(self, expected: Seen, new: int, token: str) -> tuple[str, Seen]:
        """Set the key to ``new`` and the writers key to ``token`` if both
        are as ``expected`` shows them, and what they hold then: SWAPPED;
        RECOGNISED (a re-send failed its compare because an earlier send of
        it committed); or FAILED (it did not commit and never can).
        EtcdUnavailable when that cannot be told."""
        if expected.value is None:
            compare = {"key": self._key, "result": "EQUAL", "target": "VERSION", "version": "0"}
        else:
            compare = {"key": self._key, "result": "EQUAL", "target": "VALUE",
                       "value": _b64(str(expected.value))}  # fmt: skip
        writer = {"key": self._writer, "result": "EQUAL", "target": "MOD",
                  "mod_revision": str(expected.writer_revision)}  # fmt: skip
        answer, resent = self._send("/v3/kv/txn", {
            "compare": [compare, writer],
            "success": [{"request_put": {"key": self._key, "value": _b64(str(new))}},
                        {"request_put": {"key": self._writer, "value": _b64(token)}}],
            "failure": self._ranges(),
        })  # fmt: skip
        if answer.get("succeeded"):
            return SWAPPED, Seen(new, int(answer["header"]["revision"]), token)
        seen = self._seen_in(answer)
        if not resent or seen.writer_token not in (token, None):
            # Answered at the first send, or the writers key holds another
            # swap's token: this one's revision compare can never hold again.
            return FAILED, seen
        if seen.writer_token == token:
            return RECOGNISED, seen
        raise EtcdUnavailable(
            f"the writers key {self.writer!r} is gone: whether a swap whose answer was lost "
            "committed cannot be told; not acknowledged"
        )

    def forget_writer(self) -> None:
        """Remove the writers key (at a clean stop)."""
        self._post("/v3/kv/deleterange", {"key": self._writer})

    def _ranges(self) -> list[dict]:
        return [{"request_range": {"key": self._key}},
                {"request_range": {"key": self._writer}}]  # fmt: skip

    def _seen_in(self, answer: dict) -> Seen:
        counter, writer = (
            response["response_range"].get("kvs") or [] for response in answer["responses"]
        )
        value = _counter(self.backend.key, counter[0]) if counter else None
        if not writer:
            return Seen(value, 0, None)
        token = base64.b64decode(writer[0].get("value", "")).decode(errors="replace")
        return Seen(value, int(writer[0]["mod_revision"]), token)

    def unanswered(self) -> list[str] | None:
        """None if an endpoint answers /version as etcd does (no auth, no
        quorum needed); else why each did not, one phrase each."""
        problems = []
        for pool in self._pools:
            where = format_address((pool.host, pool.port))
            try:
                answer = self._request(pool, "/version", None)
                if "etcdserver" in answer:
                    return None
                problems.append(f"{where}: answers /version, but not as etcd")
            except (urllib3.exceptions.HTTPError, OSError, EtcdAnswer) as exc:
                problems.append(f"{where}: {_describe(exc)}")
        return problems


def _counter(key: str, kv: dict) -> int:
    raw = base64.b64decode(kv.get("value", ""))
    if not raw.isdigit() or int(raw) > MAX_COUNTER:
        raise ValueError(f"etcd key {key!r} holds {raw[:40]!r}, not a counter (0..2^64 - 1)")
    return int(raw)


def _describe(exc: BaseException) -> str:
    """One line: what urllib3's error (which wraps the cause) means for an
    etcd endpoint, else the error's phrase."""
    text = str(exc)
    reason = getattr(exc, "reason", None)  # urllib3 wraps the cause
    if reason is not None:
        text = f"{text} {reason}"
    low = text.lower()
    if "certificate_verify_failed" in low or "certificate verify failed" in low:
        return "TLS failed: the server's certificate does not verify"
    if "ssl" in low and ("wrong version" in low or "record layer" in low or "eof" in low):
        return "TLS failed (is it a TLS endpoint?)"
    if "timed out" in low or "timeout" in low:
        return "timed out"
    if "connection refused" in low:
        return "connection refused"
    if "remotedisconnected" in low or "connection aborted" in low:
        return "closed the connection without an answer (not an etcd client endpoint?)"
    if "max retries exceeded" in low or "failed to establish" in low or "newconnection" in low:
        return "cannot connect"
    return phrase(exc)[:300]


def _definitive(text: str) -> bool:
    """An answer another endpoint would give too (authentication, rights)."""
    low = text.lower()
    return any(word in low for word in ("auth", "permission denied", "user name"))


def check_backend(backend: EtcdBackend) -> int | None:
    """At start: the counter as etcd holds it (0 for no key; None when it
    cannot confirm reads yet); BackendError (one line) if no endpoint
    answers, TLS does not verify, the password is refused, or the key holds
    something that is not a counter. A cluster that answers but has no
    quorum yet is not an error: the server starts and acknowledges once it
    has one."""
    try:
        cluster = EtcdCluster(backend)
    except TLSSetupError as exc:
        raise BackendError(f"etcd {backend.url}: ca=: {exc}") from None
    problems = cluster.unanswered()
    if problems is not None:
        for host, port in backend.hosts:
            mismatch = _tls_mismatch(backend, host, port)
            if mismatch:
                raise BackendError(f"etcd {backend.url}: {mismatch}")
        raise BackendError(f"etcd {backend.url}: no endpoint answers ({'; '.join(problems)})")
    try:
        return cluster.read() or 0
    except EtcdUnavailable as exc:
        log.warning("etcd %s cannot confirm reads yet (%s); serving once it can", backend.url, exc)
        return None
    except EtcdAnswer as exc:
        raise BackendError(f"etcd {backend.url}: {_auth_message(backend, exc)}") from None
    except ValueError as exc:
        raise BackendError(str(exc)) from None


def _tls_mismatch(backend: EtcdBackend, host: str, port: int) -> str | None:
    """Why an endpoint that did not answer never will, if the reason is TLS:
    it speaks TLS and the URL does not, or the other way round."""
    where = format_address((host, port))
    if backend.tls and speaks_plain(host, port, PLAIN_HELLO, (b"HTTP/",), REQUEST_TIMEOUT):
        return f"{where} speaks plain HTTP, not TLS: use etcd://"
    if not backend.tls and speaks_tls(host, port, REQUEST_TIMEOUT):
        return f"{where} speaks TLS: use etcds://, {CA_HINT}"
    return None


def _auth_message(backend: EtcdBackend, exc: EtcdAnswer) -> str:
    text = str(exc)
    if "user name is empty" in text:
        return "etcd requires a user and password (etcd://USER:PASSWORD@...)"
    if "authentication is not enabled" in text:
        return "a user and password were given but etcd has no authentication enabled"
    if "authentication failed" in text:
        return f"authentication failed for user {backend.username!r}"
    return text


class EtcdCounterStore(BatchingStore):
    """``CounterStore`` whose counter is one etcd key."""

    service = "etcd"
    # One commit in flight: a second flusher swapping from the value the
    # first is about to write measured slower here (7.6k against 11.4k
    # ping-pong replies/s on a 3-member cluster): its guesses lose to
    # reordering and each lost compare is a Raft round of its own.
    flushers = 1
    errors_caught = (EtcdUnavailable, EtcdAnswer, ValueError)
    refusals = (EtcdAnswer, ValueError)

    def __init__(self, backend: EtcdBackend) -> None:
        super().__init__(backend.key, log)
        self.backend = backend
        self._cluster = EtcdCluster(backend)
        self._seen: Seen | None = UNKNOWN  # what the next swap compares against
        self._swaps = 0  # numbers each swap's token
        self.conflicts = 0
        self.recognised = 0
        self._start()

    def current_value(self) -> int | None:
        """Ask etcd (for the start-up and stop lines); None if it cannot answer."""
        try:
            value = self._read_value()
        except self.errors_caught as exc:
            log.warning("etcd: cannot read %s: %s", self.key, exc)
            return None
        self._last_value = max(self._last_value, value)
        return self._last_value

    def _read_value(self) -> int:
        seen = self._cluster.state()
        # What the next swap compares against, when nothing is known: a
        # read that overlapped a swap may be older than what that swap set.
        if self._in_flight == 0 and self._seen is UNKNOWN:
            self._seen = seen
        return seen.value or 0

    def _restore_hint(self, value: int) -> str:
        return f"etcdctl put {self.key} {value}"

    def _flush(self, batch: Batch) -> None:
        """One compare-and-swap for the whole batch, retried from what etcd
        returns while other writers win the compare. A swap that succeeds
        proves the value it replaced, so the replies computed from it are
        exact. Whether the key went back is judged only from etcd's answers,
        against the value confirmed here before the request was sent."""
        try:
            if self._lost is not None and not self._restored():
                self._finish(batch, error=self._lost)
                return
            if self._seen is UNKNOWN:
                confirmed = self._last_value
                self._seen = self._cluster.state()
                if (self._seen.value or 0) < confirmed:
                    raise WentBack(self._seen.value or 0)
            for _ in range(SWAP_ATTEMPTS):
                confirmed = self._last_value  # before this request is sent
                expected, self._seen = self._seen, UNKNOWN  # until etcd answers
                replies, after = self._replies(batch.reads, expected.value or 0)
                self.round_trips += 1
                self._swaps += 1
                token = f"{self._swaps} {after}"
                outcome, self._seen = self._cluster.swap(expected, after, token)
                if outcome == RECOGNISED:
                    self.recognised += 1
                    log.info("etcd: a swap whose answer was lost had committed; not applied again")
                if outcome != FAILED:
                    break
                if (self._seen.value or 0) < confirmed:
                    raise WentBack(self._seen.value or 0)
                self.conflicts += 1
            else:
                raise StoreUnavailable(f"lost the compare to other writers {SWAP_ATTEMPTS} times")
        except WentBack as exc:
            self._went_back(batch, exc.before, self._last_value)
            return
        except (*self.errors_caught, StoreUnavailable) as exc:
            self._fail(batch, exc)
            return
        self.reads_batched += len(batch.reads)
        self._healthy()
        batch.replies.extend(replies)
        self._last_value = max(self._last_value, after)
        self._finish(batch)

    @staticmethod
    def _replies(reads: Sequence[Sequence[int]], value: int) -> tuple[list[list[int]], int]:
        """Each read's replies from ``value`` (a read that would pass 2^64 - 1
        gets the frames that fit, and is refused from there), and the value
        after them all."""
        replies = []
        for increments in reads:
            applied = advance(value, increments)
            replies.append(applied)
            if applied:
                value = applied[-1]
        return replies, value

    def figures(self) -> list[Figure]:
        return [
            *super().figures(),
            Figure("backend_compare_conflicts",
                   "Compare-and-swaps lost to another writer and retried (etcd).",
                   self.conflicts),
            Figure("backend_resent_swaps_recognised",
                   "Swaps whose answer was lost, found committed when re-sent (etcd):"
                   " applied once, acknowledged.", self.recognised),
        ]  # fmt: skip

    def close(self) -> bool:
        self._drain()
        if self.current_value() is None:
            return True  # no endpoint answers: do not spend another timeout on each
        try:
            self._cluster.forget_writer()
        except self.errors_caught as exc:
            log.warning("etcd: cannot remove %s: %s", self._cluster.writer, exc)
        return True


def open_store(backend: EtcdBackend) -> EtcdCounterStore:
    """The store of an instance (``server.wiring`` calls it)."""
    return EtcdCounterStore(backend)
