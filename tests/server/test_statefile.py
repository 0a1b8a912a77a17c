"""The state file format: exhaustively, without a server."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import MAX_COUNTER
from server.statefile import (
    FILE_SIZE,
    SLOT_SIZE,
    Slot,
    StateFile,
    StateFileError,
    decode_file,
    decode_slot,
    encode_slot,
)

u64 = st.integers(0, MAX_COUNTER)


@given(u64, u64)
def test_slot_round_trip(sequence, value):
    raw = encode_slot(sequence, value)
    assert len(raw) == SLOT_SIZE
    assert decode_slot(raw) == Slot(sequence, value)


@given(u64, u64, st.integers(0, SLOT_SIZE - 1), st.integers(1, 255))
def test_any_flipped_byte_is_detected(sequence, value, index, flip):
    raw = bytearray(encode_slot(sequence, value))
    raw[index] ^= flip
    assert not isinstance(decode_slot(bytes(raw)), Slot)


def test_newest_valid_slot_wins_and_a_torn_slot_falls_back():
    new, old = encode_slot(8, 80), encode_slot(7, 70)
    assert decode_file("f", old + new) == Slot(8, 80)
    assert decode_file("f", new + old) == Slot(8, 80)
    torn = new[:10] + b"\0" * 22  # the machine died while writing slot 8
    assert decode_file("f", old + torn) == Slot(7, 70)


def test_unknown_version_and_bad_magic_are_named():
    import struct

    import xxhash

    body = struct.pack(">4sHHQQ", b"CNTR", 2, 0, 1, 1)
    future = body + struct.pack(">Q", xxhash.xxh64_intdigest(body))
    with pytest.raises(StateFileError, match="unknown format version 2"):
        decode_file("f", future + future)
    with pytest.raises(StateFileError, match="bad magic"):
        decode_file("f", b"x" * FILE_SIZE)


@pytest.mark.parametrize("size", [0, 1, 32, 63, 65, 4096])
def test_wrong_size_is_refused(size):
    with pytest.raises(StateFileError, match=f"wrong size \\({size} bytes"):
        decode_file("/var/lib/c.state", b"\0" * size)


def test_both_slots_corrupt_is_refused():
    raw = bytearray(encode_slot(1, 5) + encode_slot(2, 6))
    raw[30] ^= 1
    raw[62] ^= 1
    with pytest.raises(StateFileError, match="corrupt, no valid slot \\(checksum mismatch\\)"):
        decode_file("f", bytes(raw))


def test_create_write_sync_reload(tmp_path):
    path = str(tmp_path / "counter.state")
    state = StateFile(path)
    slot, existed = state.load_or_create()
    assert (slot, existed) == (Slot(1, 0), False)
    assert os.path.getsize(path) == FILE_SIZE
    assert not os.path.exists(path + ".new")
    assert state.commit(lambda: 41, sync=True) == 41
    assert state.commit(lambda: 42, sync=False) == 42
    state.close()
    again = StateFile(path)
    assert again.load_or_create() == (Slot(3, 42), True)
    again.close()


def test_commits_from_two_openers_take_turns_and_number_after_the_newest(tmp_path):
    path = str(tmp_path / "counter.state")
    first = StateFile(path)
    first.load_or_create()
    second = StateFile(path)
    second.open()
    first.commit(lambda: 10, sync=True)  # sequence 2
    second.commit(lambda: 20, sync=True)  # sequence 3, not 2: numbered after the file
    first.commit(lambda: 30, sync=True)  # sequence 4
    with open(path, "rb") as f:
        assert decode_file(path, f.read()) == Slot(4, 30)
    first.close()
    second.close()


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(StateFileError, match="cannot create it: no such file or directory"):
        StateFile(str(tmp_path / "missing" / "c.state")).load_or_create()
