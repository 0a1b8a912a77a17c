"""Frame and reply codecs against the Go-checked vectors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from counter_server.protocol import (
    MAX_COUNTER,
    InvalidFrame,
    RejectReason,
    checksum,
    decode_replies,
    decode_reply,
    decode_request,
    encode_replies,
    encode_reply,
    encode_request,
)
from support import VECTORS

VALID = VECTORS["valid"]
TAMPERED = VECTORS["tampered"]


def test_vectors_file_has_cases():
    assert len(VALID) >= 10 and len(TAMPERED) >= 5


@pytest.mark.parametrize("case", VALID, ids=lambda c: c["decimal"])
def test_encode_matches_go_vector(case):
    n = int(case["increment"])
    assert checksum(n) == int(case["xxh64"], 16)
    assert encode_request(n).hex() == case["frame_hex"]


@pytest.mark.parametrize("case", VALID, ids=lambda c: c["decimal"])
def test_decode_go_vector(case):
    assert decode_request(bytes.fromhex(case["frame_hex"])) == int(case["increment"])


@pytest.mark.parametrize("case", TAMPERED, ids=lambda c: c["why"])
def test_tampered_vector_is_refused(case):
    with pytest.raises(InvalidFrame) as info:
        decode_request(bytes.fromhex(case["frame_hex"]))
    assert info.value.reason is RejectReason.CHECKSUM


@pytest.mark.parametrize("size", [0, 1, 15, 17, 32])
def test_decode_request_wrong_length(size):
    with pytest.raises(InvalidFrame) as info:
        decode_request(b"\0" * size)
    assert info.value.reason is RejectReason.TRUNCATED


@pytest.mark.parametrize("bad", [-1, MAX_COUNTER + 1])
def test_encode_request_out_of_range(bad):
    with pytest.raises(ValueError, match="outside"):
        encode_request(bad)


@given(st.integers(0, MAX_COUNTER))
def test_request_round_trip(n):
    assert decode_request(encode_request(n)) == n


@given(st.lists(st.integers(0, MAX_COUNTER), max_size=50))
def test_replies_round_trip(values):
    packed = encode_replies(values)
    assert len(packed) == 8 * len(values)
    assert packed == b"".join(encode_reply(v) for v in values)
    assert list(decode_replies(packed)) == values


def test_reply_is_big_endian():
    assert encode_reply(1) == b"\0\0\0\0\0\0\0\1"
    assert decode_reply(b"\x80" + b"\0" * 7) == 2**63


@pytest.mark.parametrize("size", [0, 7, 9])
def test_decode_reply_wrong_length(size):
    with pytest.raises(ValueError):
        decode_reply(b"\0" * size)


def test_decode_replies_partial():
    with pytest.raises(ValueError, match="whole number"):
        decode_replies(b"\0" * 12)
