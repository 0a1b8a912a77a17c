"""Who may connect: an allowlist of networks and a cap on connections per IP,
checked when a connection is accepted."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from counter_server.server.errors import CloseReason, TurnedAway

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(raw: str) -> Network:
    """A CIDR such as ``10.0.0.0/8``, ``2001:db8::/32`` or a single address."""
    try:
        return ipaddress.ip_network(raw, strict=False)
    except ValueError:
        raise ValueError(f"not an IPv4 or IPv6 network (CIDR), got {raw!r}") from None


def peer_key(ip: str, ipv6_prefix: int = 64) -> str:
    """What the per-IP limits count ``ip`` as: an IPv4 address is itself; an
    IPv6 one is its /``ipv6_prefix`` network, since a host gets a whole /64
    (or more) of addresses for free."""
    if ":" not in ip:
        return ip
    return str(ipaddress.ip_network(f"{ip}/{ipv6_prefix}", strict=False))


def client_ip(address: tuple) -> str:
    """The peer's IP as text; IPv4-mapped IPv6 (``::ffff:1.2.3.4``) as IPv4."""
    ip = ipaddress.ip_address(address[0].split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


class Admission:
    """Decides at accept time; ``admit`` and ``release`` pair up per connection."""

    def __init__(self, allow: Sequence[Network] = (), max_per_ip: int | None = None) -> None:
        self._allow = tuple(allow)
        self._max_per_ip = max_per_ip
        self._per_ip: dict[str, int] = {}

    @property
    def active(self) -> bool:
        return bool(self._allow) or self._max_per_ip is not None

    def admit(self, ip: str, key: str) -> None:
        """Count a connection from ``ip`` under its peer ``key``; ``TurnedAway``
        with the reason if it may not connect."""
        if self._allow and not self.allowed(ip):
            raise TurnedAway(CloseReason.NOT_ALLOWED)
        if self._max_per_ip is not None:
            count = self._per_ip.get(key, 0)
            if count >= self._max_per_ip:
                raise TurnedAway(CloseReason.PER_IP_LIMIT)
            self._per_ip[key] = count + 1

    def allowed(self, ip: str) -> bool:
        """Whether ``ip`` is in an allowed network. An IPv4 client also
        matches IPv4-mapped IPv6 networks (``::ffff:10.0.0.0/104``)."""
        address = ipaddress.ip_address(ip)
        mapped = ipaddress.IPv6Address(f"::ffff:{ip}") if address.version == 4 else None
        return any(
            address in network or (mapped is not None and mapped in network)
            for network in self._allow
        )

    def release(self, key: str) -> None:
        """An admitted connection counted under ``key`` has closed."""
        if self._max_per_ip is not None:
            count = self._per_ip[key] - 1
            if count:
                self._per_ip[key] = count
            else:
                del self._per_ip[key]
