"""etcd ``--backend`` URLs, parsed into an ``EtcdBackend`` without importing
the etcd client (``server.store.etcd_backend`` loads it):

    etcd://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/KEY
    etcds://...?ca=FILE        (TLS to the cluster, verified against FILE)

The same conventions as the Redis URLs: user and password in the URL (never
printed), ``ca=`` for TLS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import parse_qs, unquote, urlsplit

from counter_server.server.store.redis_url import parse_hosts, redact

SCHEMES = ("etcd", "etcds")
DEFAULT_PORT = 2379
USAGE = "etcd://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/KEY (etcds://...?ca=FILE for TLS)"


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


def parse_etcd(raw: str) -> EtcdBackend:
    """An etcd ``--backend`` URL; ValueError (one line, no password) if it is
    not usable."""
    shown = redact(raw)
    parts = urlsplit(raw)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"expected {USAGE}, got {shown!r}")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    if username and not password:
        raise ValueError(f"a user needs a password (USER:PASSWORD@) in {USAGE}")
    hosts = parse_hosts(hostlist, DEFAULT_PORT, shown, USAGE)
    key = unquote(parts.path.lstrip("/"))
    if not key:
        raise ValueError(f"the key is missing: expected {USAGE}")
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    unknown = set(query) - {"ca"}
    if unknown:
        raise ValueError(f"unknown option {sorted(unknown)[0]}= in {USAGE}")
    tls = parts.scheme == "etcds"
    if "ca" in query and not tls:
        raise ValueError("ca= needs etcds://")
    return EtcdBackend(
        url=shown, key=key, hosts=tuple(hosts), username=unquote(username) or None,
        password=unquote(password) or None, tls=tls, ca=query.get("ca"),
    )  # fmt: skip
