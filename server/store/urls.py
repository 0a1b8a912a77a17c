"""``--backend URL``: which shared store keeps the counter, parsed without
importing any client library (only an instance that uses Redis or etcd loads
its client, ``server.store.redis_backend`` or ``.etcd_backend``)::

    redis://[USER:PASSWORD@]HOST:PORT/DB?key=NAME         (rediss:// for TLS)
    redis+sentinel://[USER:PASSWORD@]HOST:PORT[,...]/SERVICE/DB?key=NAME
    etcd://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/KEY    (etcds://...?ca=FILE)

User and password in the URL (never printed: ``redact``), ``ca=`` for TLS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

WAIT_TIMEOUT_MS = 1000  # default longest WAIT for replicas
REDIS_SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel")
REDIS_USAGE = (
    "redis://[USER:PASSWORD@]HOST:PORT/DB?key=NAME (rediss:// for TLS) or "
    "redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE/DB?key=NAME"
    " (&replicas=N, or all: the default with sentinels)"
)
ETCD_SCHEMES = ("etcd", "etcds")
ETCD_PORT = 2379  # etcd's client port, when the URL names none
ETCD_USAGE = "etcd://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/KEY (etcds://...?ca=FILE for TLS)"


@dataclass(frozen=True)
class RedisBackend:
    """A parsed Redis ``--backend`` URL."""

    url: str  # as given, password hidden, for logs
    key: str
    database: int
    hosts: tuple[tuple[str, int], ...]  # the server, or the sentinels
    service: str | None  # the Sentinel service (primary) name
    username: str | None
    password: str | None
    tls: bool
    ca: str | None  # CA file for TLS
    replicas: int  # WAIT for this many replicas before replying
    replica_timeout_ms: int
    all_replicas: bool = False  # replicas=all: every replica the sentinels know

    @property
    def waits(self) -> bool:
        """True if replies wait for replicas (WAIT after each INCRBY)."""
        return self.replicas > 0 or self.all_replicas

    kind: ClassVar[str] = "Redis"  # in messages

    @property
    def terms(self) -> str:
        """What the start-up line adds about this store: its range, and what
        a reply waits for beyond the primary."""
        terms = ", counts up to 2^63 - 1 (Redis's integer range)"
        if self.all_replicas:
            return terms + ", replies wait for every replica the sentinels know (replicas=all)"
        if self.replicas:
            return terms + f", replies wait for {self.replicas} replicas (replicas={self.replicas})"
        return terms


@dataclass(frozen=True)
class EtcdBackend:
    """A parsed etcd ``--backend`` URL."""

    url: str  # as given, password hidden, for logs
    key: str
    hosts: tuple[tuple[str, int], ...]  # the cluster's client endpoints
    username: str | None
    password: str | None
    tls: bool
    ca: str | None

    kind: ClassVar[str] = "etcd"  # in messages
    terms: ClassVar[str] = ""  # the start-up line's note: the protocol's range, nothing to add


AnyBackend = RedisBackend | EtcdBackend


def parse_backend(raw: str) -> AnyBackend:
    """The ``--backend`` URL; ValueError (one line, no password) if it is not usable."""
    if "://" not in raw:
        raise ValueError(
            f"{redact(raw)!r} is not a URL (SCHEME://...), nor memory: expected "
            f"{REDIS_USAGE}, or {ETCD_USAGE}"
        )
    scheme = raw.partition("://")[0]
    if scheme in ETCD_SCHEMES:
        return parse_etcd(raw)
    if scheme in REDIS_SCHEMES:
        return parse_redis(raw)
    raise ValueError(f"unknown scheme {scheme + '://'!r}: expected {REDIS_USAGE}, or {ETCD_USAGE}")


def redact(raw: str) -> str:
    """``raw`` as it may be shown: a password in it replaced by ``***``."""
    scheme, sep, rest = raw.partition("://")
    if not sep:  # not a URL: whatever comes before an @ may be a secret
        return f"***@{raw.rpartition('@')[2]}" if "@" in raw else raw
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return raw
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{hosts}{slash}{tail}"


class _Parts(NamedTuple):
    """What the two kinds of URL share, split out."""

    shown: str  # the URL, password hidden
    parts: SplitResult
    username: str | None
    password: str | None
    hostlist: str
    query: dict[str, str]


def _split(raw: str, usage: str, options: set[str]) -> _Parts:
    """``raw`` split into its shared parts; ValueError for an option not in ``options``."""
    parts = urlsplit(raw)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    unknown = set(query) - options
    if unknown:
        raise ValueError(f"unknown option {sorted(unknown)[0]}= in {usage}")
    return _Parts(
        redact(raw), parts, unquote(username) or None, unquote(password) or None, hostlist, query
    )


def _hosts(hostlist: str, default_port: int, raw: str, usage: str) -> tuple[tuple[str, int], ...]:
    """``HOST[:PORT],...`` (``[IPv6]:PORT``) of a backend URL; ValueError
    naming the URL ``raw`` and the ``usage`` if a host or port is unusable."""
    hosts = []
    for item in hostlist.split(","):
        host, sep, port = item.rpartition(":")
        host = host.strip("[]") if sep else item
        if not host:
            raise ValueError(f"a host is missing in {raw!r}: expected {usage}")
        if sep and not port.isdigit():
            raise ValueError(f"bad port {port!r} in {raw!r}")
        hosts.append((host, int(port) if sep else default_port))
    return tuple(hosts)


def parse_redis(raw: str) -> RedisBackend:
    """A Redis ``--backend`` URL; ValueError (one line, no password) if it is
    not usable."""
    scheme = urlsplit(raw).scheme
    if scheme not in REDIS_SCHEMES:
        raise ValueError(f"unknown scheme {scheme + '://' if scheme else ''!r}: "
                         f"expected {REDIS_USAGE}")  # fmt: skip
    url = _split(raw, REDIS_USAGE, {"key", "ca", "replicas", "replica_timeout_ms"})
    sentinel = scheme.endswith("+sentinel")
    hosts = _hosts(url.hostlist, 26379 if sentinel else 6379, url.shown, REDIS_USAGE)
    if not sentinel and len(hosts) != 1:
        raise ValueError("several hosts need redis+sentinel://")
    path = url.parts.path.split("/")[1:]  # "/SERVICE/DB" or "/DB"
    if path and not path[-1]:
        path.pop()  # a trailing slash
    service = None
    if sentinel:
        if not path or not path[0]:
            raise ValueError(f"the Sentinel service name is missing: expected {REDIS_USAGE}")
        service, path = path[0], path[1:]
    database = path[0] if path else "0"
    if len(path) > 1 or not database.isdigit():
        raise ValueError(f"the database must be a number, got {'/'.join(path)!r}")
    key = url.query.get("key", "counter")
    if not key:
        raise ValueError("key= must not be empty")
    # Sentinel's default is the setting that survives a planned failover and
    # a partition (docs/operations.md, "What each replicas= survives").
    replicas = url.query.get("replicas", "all" if sentinel else "0")
    timeout = url.query.get("replica_timeout_ms", str(WAIT_TIMEOUT_MS))
    all_replicas = replicas == "all"
    if all_replicas:
        if not sentinel:
            raise ValueError("replicas=all needs redis+sentinel:// (the sentinels know the set)")
        replicas = "0"
    if not replicas.isdigit() or not timeout.isdigit() or int(timeout) < 1:
        raise ValueError("replicas= (a whole number or all) and replica_timeout_ms= "
                         "(a whole number) are not usable")  # fmt: skip
    tls = scheme.startswith("rediss")
    if "ca" in url.query and not tls:
        raise ValueError("ca= needs rediss:// (or rediss+sentinel://)")
    return RedisBackend(
        url=url.shown, key=key, database=int(database), hosts=hosts, service=service,
        username=url.username, password=url.password, tls=tls, ca=url.query.get("ca"),
        replicas=int(replicas), replica_timeout_ms=int(timeout), all_replicas=all_replicas,
    )  # fmt: skip


def parse_etcd(raw: str) -> EtcdBackend:
    """An etcd ``--backend`` URL; ValueError (one line, no password) if it is
    not usable."""
    scheme = urlsplit(raw).scheme
    if scheme not in ETCD_SCHEMES:
        raise ValueError(f"expected {ETCD_USAGE}, got {redact(raw)!r}")
    url = _split(raw, ETCD_USAGE, {"ca"})
    if url.username and not url.password:
        raise ValueError(f"a user needs a password (USER:PASSWORD@) in {ETCD_USAGE}")
    hosts = _hosts(url.hostlist, ETCD_PORT, url.shown, ETCD_USAGE)
    key = unquote(url.parts.path.lstrip("/"))
    if not key:
        raise ValueError(f"the key is missing: expected {ETCD_USAGE}")
    tls = scheme == "etcds"
    if "ca" in url.query and not tls:
        raise ValueError("ca= needs etcds://")
    return EtcdBackend(
        url=url.shown, key=key, hosts=hosts, username=url.username, password=url.password,
        tls=tls, ca=url.query.get("ca"),
    )  # fmt: skip
