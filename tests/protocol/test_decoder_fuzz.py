"""The decoder under a large hypothesis budget: ``pytest -m fuzz`` (about a
minute; the default run deselects it and keeps test_decoder.py's budget).
The property is the one the coverage-guided target checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))

from decoder_property import check

from counter_server.protocol import encode_request

pytestmark = pytest.mark.fuzz

frames_and_noise = st.lists(
    st.one_of(
        st.integers(0, 2**64 - 1).map(encode_request),
        st.sampled_from([encode_request(1), encode_request(0)]),
        st.binary(min_size=1, max_size=40),
    ),
    max_size=30,
).map(b"".join)


@settings(max_examples=20_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 255), frames_and_noise)
def test_decoder_survives_a_large_budget(cuts, stream):
    check(bytes([cuts]) + stream)


def test_property_catches_a_broken_decoder(monkeypatch):
    """The property can fail: a decoder that skips verification is caught."""
    from counter_server.protocol import decoder

    monkeypatch.setattr(decoder, "_is_valid", lambda increment, received: True)
    with pytest.raises(AssertionError):
        check(b"\x00" + b"a" * 16)
