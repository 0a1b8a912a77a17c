"""Admission at accept time: the allowlist and the per-IP cap, in process."""

from __future__ import annotations

import pytest

from counter_server.server.admission import Admission, client_ip, parse_network, peer_key
from counter_server.server.errors import CloseReason, TurnedAway


def refusal(admission: Admission, ip: str, prefix: int = 64) -> CloseReason | None:
    try:
        admission.admit(ip, peer_key(ip, prefix))
    except TurnedAway as exc:
        return exc.reason
    return None


def test_nobody_is_refused_without_rules():
    admission = Admission()
    assert not admission.active
    assert refusal(admission, "203.0.113.9") is None


def test_the_allowlist_admits_its_networks_only():
    admission = Admission([parse_network("10.0.0.0/8"), parse_network("2001:db8::/32")])
    assert refusal(admission, "10.1.2.3") is None
    assert refusal(admission, "2001:db8::1") is None
    assert refusal(admission, "192.0.2.1") is CloseReason.NOT_ALLOWED


def test_the_per_ip_cap_counts_and_releases():
    admission = Admission(max_per_ip=2)
    assert refusal(admission, "192.0.2.1") is None
    assert refusal(admission, "192.0.2.1") is None
    assert refusal(admission, "192.0.2.1") is CloseReason.PER_IP_LIMIT
    assert refusal(admission, "192.0.2.2") is None  # another IP has its own count
    admission.release("192.0.2.1")
    assert refusal(admission, "192.0.2.1") is None


def test_a_refused_connection_is_not_counted():
    admission = Admission(max_per_ip=1)
    admission.admit("192.0.2.1", "192.0.2.1")
    for _ in range(3):
        assert refusal(admission, "192.0.2.1") is CloseReason.PER_IP_LIMIT
    admission.release("192.0.2.1")  # the one admitted: the IP is free again
    assert refusal(admission, "192.0.2.1") is None


def test_ipv4_mapped_peers_are_seen_as_ipv4():
    assert client_ip(("::ffff:192.0.2.7", 5000, 0, 0)) == "192.0.2.7"
    assert client_ip(("fe80::1%eth0", 5000, 0, 2)) == "fe80::1"


def test_a_bad_network_is_named():
    with pytest.raises(ValueError, match="not an IPv4 or IPv6 network"):
        parse_network("10.0.0.0/33")


def test_ipv6_peers_are_counted_by_prefix():
    admission = Admission(max_per_ip=2)
    assert refusal(admission, "2001:db8:1:2::1") is None
    assert refusal(admission, "2001:db8:1:2:ffff::9") is None  # same /64
    assert refusal(admission, "2001:db8:1:2::abcd") is CloseReason.PER_IP_LIMIT
    assert refusal(admission, "2001:db8:1:3::1") is None  # the next /64
    admission.release(peer_key("2001:db8:1:2::1", 64))
    assert refusal(admission, "2001:db8:1:2::77") is None


def test_the_prefix_is_configurable():
    assert peer_key("2001:db8:1:2::1", 48) == peer_key("2001:db8:1:ffff::1", 48)
    assert peer_key("2001:db8:1:2::1", 128) != peer_key("2001:db8:1:2::2", 128)
    assert peer_key("192.0.2.1", 64) == "192.0.2.1"


def test_ipv4_mapped_networks_match_ipv4_clients():
    admission = Admission([parse_network("::ffff:127.0.0.0/104")])
    assert refusal(admission, "127.0.0.1") is None
    assert refusal(admission, "10.0.0.1") is CloseReason.NOT_ALLOWED
    everyone_v6 = Admission([parse_network("::/0")])
    assert refusal(everyone_v6, "192.0.2.1") is None  # ::/0 holds the mapped range
