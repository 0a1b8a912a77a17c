"""The state file format: exhaustively, without a server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from counter_server.protocol import MAX_COUNTER
from counter_server.server.errors import StateFileError
from counter_server.server.store.statefile import (
    FILE_SIZE,
    SLOT_SIZE,
    Slot,
    StateFile,
    decode_file,
    decode_slot,
    encode_slot,
)
from support import state_on_disk

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
    slot, existed = state.claim()
    assert (slot, existed) == (Slot(1, 0), False)
    assert os.path.getsize(path) == FILE_SIZE
    assert os.listdir(tmp_path) == ["counter.state"]  # no temporary left
    assert state.commit(lambda: 41, sync=True) == 41
    assert state.commit(lambda: 42, sync=False) == 42
    state.close()
    again = StateFile(path)
    assert again.claim() == (Slot(3, 42), True)
    again.close()


def test_a_second_instance_cannot_claim_a_claimed_file(tmp_path):
    path = str(tmp_path / "counter.state")
    first = StateFile(path)
    first.claim()
    with pytest.raises(StateFileError, match="in use by another server instance"):
        StateFile(path).claim()
    first.close()
    second = StateFile(path)
    assert second.claim() == (Slot(1, 0), True)
    second.close()


def test_worker_processes_share_the_claim_and_take_turns(tmp_path):
    path = str(tmp_path / "counter.state")
    parent = StateFile(path)
    parent.claim()
    pid = os.fork()
    if pid == 0:  # a worker: inherits the claim, commits numbered after the file
        status = 0
        try:
            for value in range(10, 60, 10):
                parent.commit(lambda value=value: value, sync=False)
        except BaseException:
            status = 1
        os._exit(status)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert parent.commit(lambda: 60, sync=True) == 60
    assert state_on_disk(path) == Slot(7, 60)
    with pytest.raises(StateFileError, match="in use"):
        StateFile(path).claim()
    parent.close()


def test_a_commit_never_writes_below_the_newest_value_on_disk(tmp_path):
    path = str(tmp_path / "counter.state")
    state = StateFile(path)
    state.claim()
    state.commit(lambda: 500, sync=True)
    with open(path, "r+b") as f:  # someone else writes 600 behind our back
        f.seek(SLOT_SIZE * (3 % 2))
        f.write(encode_slot(3, 600))
    with pytest.raises(StateFileError, match="holds 600, above this server's 500"):
        state.commit(lambda: 500, sync=True)
    assert state_on_disk(path) == Slot(3, 600)
    state.close()


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (os.unlink, "was deleted"),
        (lambda p: Path(p).write_bytes(b""), "was damaged"),
        (lambda p: Path(p).write_bytes(b"garbage!" * 8), "was damaged"),
        (lambda p: (os.unlink(p), Path(p).write_bytes(encode_slot(0, 7) * 2)), "was replaced"),
    ],
    ids=["deleted", "truncated", "garbage", "replaced"],
)
def test_a_deleted_or_damaged_file_is_restored_from_the_live_value(
    tmp_path, caplog, damage, problem
):
    path = str(tmp_path / "counter.state")
    state = StateFile(path)
    state.claim()
    state.commit(lambda: 1000, sync=True)
    damage(path)
    assert state.commit(lambda: 1234, sync=True) == 1234
    assert problem in caplog.text
    assert "restoring it from the live value 1234" in caplog.text
    assert state_on_disk(path).value == 1234
    assert state.restored == 1
    assert state.commit(lambda: 1300, sync=True) == 1300  # and it goes on normally
    assert state_on_disk(path).value == 1300
    state.close()
    again = StateFile(path)
    assert again.claim()[0].value == 1300
    again.close()


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(StateFileError, match="cannot create it: no such file or directory"):
        StateFile(str(tmp_path / "missing" / "c.state")).claim()


def test_a_file_restored_by_another_worker_is_followed_not_restored_again(tmp_path, caplog):
    path = str(tmp_path / "counter.state")
    parent = StateFile(path)
    parent.claim()
    parent.commit(lambda: 10, sync=True)
    pid = os.fork()
    if pid == 0:  # a worker finds the file deleted and restores it
        status = 1
        try:
            os.unlink(path)
            parent.commit(lambda: 20, sync=True)
            status = 0
        finally:
            os._exit(status)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    caplog.clear()
    assert parent.commit(lambda: 30, sync=True) == 30
    assert "restoring" not in caplog.text and parent.restored == 0
    assert state_on_disk(path).value == 30
    parent.close()
