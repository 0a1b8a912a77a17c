"""Admission at accept time: the allowlist and the per-IP cap, in process."""

from __future__ import annotations

import pytest

from server.admission import Admission, client_ip, parse_network
from server.close import CloseReason, Refused


def refusal(admission: Admission, ip: str) -> CloseReason | None:
    try:
        admission.admit(ip)
    except Refused as exc:
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
    admission.admit("192.0.2.1")
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
