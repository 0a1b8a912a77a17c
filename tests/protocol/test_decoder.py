"""The incremental decoder: any split of any stream, and hostile bytes."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from counter_server.protocol import (
    FRAME_SIZE,
    MAX_COUNTER,
    FrameDecoder,
    RejectReason,
    checksum,
    encode_request,
)
from support import VECTORS

increments = st.one_of(st.integers(0, 20), st.integers(0, MAX_COUNTER))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def decode_all(chunks: list[bytes]) -> tuple[list[int], FrameDecoder]:
    decoder = FrameDecoder()
    out: list[int] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
        if decoder.error:
            break
    return out, decoder


@given(st.lists(increments, max_size=60), st.lists(st.integers(0, 10_000), max_size=30))
def test_any_split_of_a_valid_stream_decodes_the_same(values, cuts):
    stream = b"".join(encode_request(v) for v in values)
    decoded, decoder = decode_all(split(stream, cuts))
    assert decoded == values
    assert decoder.error is None
    assert decoder.close() is None


@given(st.binary(max_size=400), st.lists(st.integers(0, 1000), max_size=10))
def test_random_bytes_never_yield_a_frame_with_a_wrong_checksum(data, cuts):
    decoded, decoder = decode_all(split(data, cuts))
    # Every increment yielded is the frame at its position, with a valid checksum.
    for index, n in enumerate(decoded):
        frame = data[index * FRAME_SIZE : (index + 1) * FRAME_SIZE]
        assert frame == encode_request(n)
    if decoder.error is None:
        assert len(decoded) == len(data) // FRAME_SIZE
    else:
        assert decoder.error.reason is RejectReason.CHECKSUM


@given(
    st.lists(increments, max_size=20),
    st.sampled_from(VECTORS["tampered"]),
    st.lists(increments, min_size=1, max_size=5),
    st.lists(st.integers(0, 1000), max_size=6),
)
def test_decoding_stops_at_the_first_tampered_frame(before, tampered, after, cuts):
    stream = (
        b"".join(encode_request(v) for v in before)
        + bytes.fromhex(tampered["frame_hex"])
        + b"".join(encode_request(v) for v in after)
    )
    decoded, decoder = decode_all(split(stream, cuts))
    assert decoded == before
    assert decoder.error is not None and decoder.error.reason is RejectReason.CHECKSUM


def test_one_byte_at_a_time():
    stream = b"".join(encode_request(v) for v in (1, 2, 3, 2**64 - 1))
    decoded, _ = decode_all([stream[i : i + 1] for i in range(len(stream))])
    assert decoded == [1, 2, 3, 2**64 - 1]


def test_identical_frames_in_bulk():
    decoder = FrameDecoder()
    assert list(decoder.feed(encode_request(1) * 2000)) == [1] * 2000


def test_bulk_batch_with_one_bad_frame_in_the_middle():
    good = encode_request(7)
    bad = bytes.fromhex(VECTORS["tampered"][0]["frame_hex"])
    decoder = FrameDecoder()
    assert list(decoder.feed(good * 5 + bad + good * 5)) == [7] * 5
    assert decoder.error.reason is RejectReason.CHECKSUM


def test_truncated_stream_is_reported_on_close():
    decoder = FrameDecoder()
    assert list(decoder.feed(encode_request(5) + b"\0" * 7)) == [5]
    assert decoder.pending_bytes == 7
    error = decoder.close()
    assert error is not None and error.reason is RejectReason.TRUNCATED
    assert "7 bytes" in str(error)


def test_close_on_a_frame_boundary_is_clean():
    decoder = FrameDecoder()
    decoder.feed(encode_request(5))
    assert decoder.close() is None


def test_feed_after_an_error_is_refused():
    decoder = FrameDecoder()
    decoder.feed(b"\0" * 16)
    assert decoder.error is not None
    with pytest.raises(RuntimeError):
        decoder.feed(encode_request(1))


def test_many_distinct_values_keep_the_checksum_cache_bounded():
    from counter_server.protocol import decoder as module

    stream = b"".join(encode_request(n) for n in range(10_000))
    assert list(FrameDecoder().feed(stream)) == list(range(10_000))
    assert len(module._known_checksums) <= module._KNOWN_CHECKSUMS_MAX
    assert all(checksum(n) == c for n, c in module._known_checksums.items())
