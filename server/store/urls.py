"""``--backend URL``: which shared store keeps the counter, parsed without
importing any client library (``redis_url`` for Redis and Sentinel,
``etcd_url`` for etcd)."""

from __future__ import annotations

from counter_server.server.store.etcd_url import SCHEMES as ETCD_SCHEMES
from counter_server.server.store.etcd_url import USAGE as ETCD_USAGE
from counter_server.server.store.etcd_url import EtcdBackend, parse_etcd
from counter_server.server.store.redis_url import SCHEMES as REDIS_SCHEMES
from counter_server.server.store.redis_url import USAGE as REDIS_USAGE
from counter_server.server.store.redis_url import Backend, parse_redis, redact

AnyBackend = Backend | EtcdBackend


def parse_backend(raw: str) -> AnyBackend:
    """The ``--backend`` URL; ValueError (one line) if it is not usable."""
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
