"""Redis ``--backend`` URLs: ``redis://``, ``rediss://`` and their
``+sentinel`` forms, parsed into a ``Backend`` without importing redis-py
(only an instance that uses Redis loads the client,
``server.store.redis_backend``). ``server.store.urls`` dispatches on the
scheme."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import parse_qs, unquote, urlsplit

WAIT_TIMEOUT_MS = 1000  # default longest WAIT for replicas
SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel")
USAGE = (
    "redis://[USER:PASSWORD@]HOST:PORT/DB?key=NAME (rediss:// for TLS) or "
    "redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE/DB?key=NAME"
    " (&replicas=N, or all: the default with sentinels)"
)


@dataclass(frozen=True)
class Backend:
    """A parsed ``--backend`` URL."""

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


def parse_hosts(hostlist: str, default_port: int, raw: str, usage: str) -> list[tuple[str, int]]:
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
    return hosts


def parse_redis(raw: str) -> Backend:
    """A Redis ``--backend`` URL; ValueError (one line, no password) if it is
    not usable."""
    shown = redact(raw)
    parts = urlsplit(raw)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {parts.scheme + '://' if parts.scheme else ''!r}: "
                         f"expected {USAGE}")  # fmt: skip
    sentinel = parts.scheme.endswith("+sentinel")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    hosts = parse_hosts(hostlist, 26379 if sentinel else 6379, shown, USAGE)
    if not sentinel and len(hosts) != 1:
        raise ValueError("several hosts need redis+sentinel://")
    path = parts.path.split("/")[1:]  # "/SERVICE/DB" or "/DB"
    if path and not path[-1]:
        path.pop()  # a trailing slash
    service = None
    if sentinel:
        if not path or not path[0]:
            raise ValueError(f"the Sentinel service name is missing: expected {USAGE}")
        service, path = path[0], path[1:]
    database = path[0] if path else "0"
    if len(path) > 1 or not database.isdigit():
        raise ValueError(f"the database must be a number, got {'/'.join(path)!r}")
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    unknown = set(query) - {"key", "ca", "replicas", "replica_timeout_ms"}
    if unknown:
        raise ValueError(f"unknown option {sorted(unknown)[0]}= in {USAGE}")
    key = query.get("key", "counter")
    if not key:
        raise ValueError("key= must not be empty")
    # Sentinel's default is the setting that survives a planned failover and
    # a partition (docs/operations.md, "What each replicas= survives").
    replicas = query.get("replicas", "all" if sentinel else "0")
    timeout = query.get("replica_timeout_ms", str(WAIT_TIMEOUT_MS))
    all_replicas = replicas == "all"
    if all_replicas:
        if not sentinel:
            raise ValueError("replicas=all needs redis+sentinel:// (the sentinels know the set)")
        replicas = "0"
    if not replicas.isdigit() or not timeout.isdigit() or int(timeout) < 1:
        raise ValueError("replicas= (a whole number or all) and replica_timeout_ms= "
                         "(a whole number) are not usable")  # fmt: skip
    tls = parts.scheme.startswith("rediss")
    if "ca" in query and not tls:
        raise ValueError("ca= needs rediss:// (or rediss+sentinel://)")
    return Backend(
        url=shown, key=key, database=int(database), hosts=tuple(hosts), service=service,
        username=unquote(username) or None, password=unquote(password) or None, tls=tls,
        ca=query.get("ca"), replicas=int(replicas), replica_timeout_ms=int(timeout),
        all_replicas=all_replicas,
    )  # fmt: skip
