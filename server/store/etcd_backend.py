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

Range: the key holds the decimal value, 0 to 2^64 - 1, as the protocol.

Outages: the endpoints are tried in turn; a request that fails or times out
(a member cut off from the majority cannot commit) moves to the next
endpoint. A transaction whose answer was lost may or may not have been
applied: not acknowledged, and the next flush learns the truth from the
compare.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
from collections.abc import Sequence

import urllib3
from counter_server.protocol import MAX_COUNTER
from counter_server.server.store.base import Figure, StoreUnavailable, advance
from counter_server.server.store.batching import Batch, BatchingStore, WentBack
from counter_server.server.store.etcd_url import EtcdBackend
from counter_server.server.store.urls import BackendError

log = logging.getLogger("counter.etcd")

# An etcd request unanswered within this is given up and the next endpoint
# tried: a commit takes milliseconds; an election about a second.
REQUEST_TIMEOUT = 1.0
SWAP_ATTEMPTS = 64  # compares lost to other writers in a row before a flush gives up
UNKNOWN = object()  # what the key holds, before it is read and after an unknown outcome


class EtcdUnavailable(Exception):
    """No endpoint could confirm the request; the message says why (one line)."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class EtcdAnswer(Exception):
    """etcd answered the request with an error (not a failed request): its
    own message, one line (authentication, permissions, a bad request)."""


class EtcdCluster:
    """The cluster's endpoints, used in turn through urllib3 connection
    pools: a request that fails or times out moves to the next endpoint.
    With a user, an auth token is taken (and taken again when etcd says it
    is no longer valid)."""

    def __init__(self, backend: EtcdBackend, timeout: float = REQUEST_TIMEOUT) -> None:
        self.backend = backend
        context = ssl.create_default_context(cafile=backend.ca) if backend.tls else None
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

    @property
    def endpoint(self) -> str:
        pool = self._pools[self._current]
        return f"{pool.host}:{pool.port}"

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
        if response.status != 200:
            error = answer.get("error") or answer.get("message") or f"HTTP {response.status}"
            if response.status >= 500 and not _definitive(error):
                raise urllib3.exceptions.HTTPError(f"etcd: {error}")  # try another endpoint
            raise EtcdAnswer(error.removeprefix("etcdserver: "))
        return answer

    def _post(self, path: str, body: dict | None = None) -> dict:
        """``path`` on the current endpoint, then the others in turn;
        EtcdUnavailable when none could answer, EtcdAnswer when etcd refused."""
        problems = []
        for _ in range(len(self._pools)):
            pool = self._pools[self._current]
            try:
                return self._authorized(pool, path, body)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                problems.append(f"{pool.host}:{pool.port}: {_describe(exc)}")
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
        answer = self._post("/v3/kv/range", {"key": self._key})
        kvs = answer.get("kvs") or []
        return _counter(self.backend.key, kvs[0]) if kvs else None

    def swap(self, expected: int | None, new: int) -> tuple[bool, int | None]:
        """Set the key to ``new`` if it holds ``expected`` (None: absent).
        (True, new) if it did; (False, what it holds) if not."""
        if expected is None:
            compare = {"key": self._key, "result": "EQUAL", "target": "VERSION", "version": "0"}
        else:
            compare = {"key": self._key, "result": "EQUAL", "target": "VALUE",
                       "value": _b64(str(expected))}  # fmt: skip
        answer = self._post("/v3/kv/txn", {
            "compare": [compare],
            "success": [{"request_put": {"key": self._key, "value": _b64(str(new))}}],
            "failure": [{"request_range": {"key": self._key}}],
        })  # fmt: skip
        if answer.get("succeeded"):
            return True, new
        kvs = answer["responses"][0]["response_range"].get("kvs") or []
        return False, _counter(self.backend.key, kvs[0]) if kvs else None

    def versions(self) -> list[str]:
        """Each endpoint's answer to /version (no auth, no quorum needed)."""
        found = []
        for pool in self._pools:
            try:
                answer = self._request(pool, "/version", None)
                found.append(f"{pool.host}:{pool.port} etcd {answer['etcdserver']}")
            except (urllib3.exceptions.HTTPError, OSError, EtcdAnswer, KeyError) as exc:
                found.append(f"{pool.host}:{pool.port}: {_describe(exc)}")
        return found


def _counter(key: str, kv: dict) -> int:
    raw = base64.b64decode(kv.get("value", ""))
    if not raw.isdigit() or int(raw) > MAX_COUNTER:
        raise ValueError(f"etcd key {key!r} holds {raw[:40]!r}, not a counter (0..2^64 - 1)")
    return int(raw)


def _describe(exc: BaseException) -> str:
    """One line: etcd's own error text where it sent one, else what failed."""
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
    if "max retries exceeded" in low or "failed to establish" in low or "newconnection" in low:
        return "cannot connect"
    return text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__


def _definitive(text: str) -> bool:
    """An answer another endpoint would give too (authentication, rights)."""
    low = text.lower()
    return any(word in low for word in ("auth", "permission denied", "user name"))


def check_backend(backend: EtcdBackend) -> None:
    """At start: BackendError (one line) if no endpoint answers, TLS does not
    verify, the password is refused, or the key holds something that is not
    a counter. A cluster that answers but has no quorum yet is not an error:
    the server starts and acknowledges once it has one."""
    try:
        cluster = EtcdCluster(backend)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise BackendError(f"etcd {backend.url}: cannot load ca={backend.ca}: {reason}") from None
    answers = cluster.versions()
    if not any(" etcd " in answer for answer in answers):
        raise BackendError(f"etcd {backend.url}: no endpoint answers ({'; '.join(answers)})")
    try:
        cluster.read()
    except EtcdUnavailable as exc:
        log.warning("etcd %s cannot confirm reads yet (%s); serving once it can", backend.url, exc)
    except EtcdAnswer as exc:
        raise BackendError(f"etcd {backend.url}: {_auth_message(backend, exc)}") from None
    except ValueError as exc:
        raise BackendError(str(exc)) from None


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

    def __init__(self, backend: EtcdBackend) -> None:
        super().__init__(backend.key, log)
        self.backend = backend
        self._cluster = EtcdCluster(backend)
        # What the key held when last seen (None: absent), or UNKNOWN.
        self._seen: object = UNKNOWN
        self.conflicts = 0
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

    def _ping(self) -> None:
        self._read_value()

    def _read_value(self) -> int:
        value = self._cluster.read()
        if self._in_flight == 0:  # what the next swap compares against
            self._seen = value
        return value or 0

    def _restore_hint(self, value: int) -> str:
        return f"etcdctl put {self.key} {value}"

    def _flush(self, batch: Batch) -> None:
        """One compare-and-swap for the whole batch, retried from the value
        etcd returns while other writers win the compare. A swap that
        succeeds proves the value it replaced, so the replies computed from
        it are exact. Whether the key went back is judged only from etcd's
        answers, against the value confirmed here before the request was sent."""
        try:
            if self._lost is not None and not self._restored():
                self._finish(batch, error=self._lost)
                return
            if self._seen is UNKNOWN:
                confirmed = self._last_value
                self._seen = self._cluster.read()
                if (self._seen or 0) < confirmed:
                    raise WentBack(self._seen or 0)
            for _ in range(SWAP_ATTEMPTS):
                confirmed = self._last_value  # before this request is sent
                expected, self._seen = self._seen, UNKNOWN  # until etcd answers
                replies, after = self._replies(batch.reads, expected or 0)
                self.round_trips += 1
                swapped, holds = self._cluster.swap(expected, after)
                self._seen = holds
                if swapped:
                    break
                if (holds or 0) < confirmed:
                    raise WentBack(holds or 0)
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
        ]  # fmt: skip

    def close(self) -> bool:
        self._drain()
        self.current_value()
        return True


def open_store(backend: EtcdBackend) -> EtcdCounterStore:
    """The store of an instance (``server.wiring`` calls it)."""
    return EtcdCounterStore(backend)
