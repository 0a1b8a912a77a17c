"""server.store.statefile: the state file format, exhaustively and without a
server; the group-commit logic of DurableCounterStore, in process with a
state file whose commits the test holds and releases (no disk, no timing
luck); and --state-file --fsync always when commits stall: a frozen
filesystem (a loop-mounted ext4 image under fsfreeze) and the state file's
lock held by someone else (as a stopped --processes worker would hold it).
Nothing is acknowledged meanwhile, /healthz says why within the documented
bound, and everything resumes when the stall ends."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import threading
from pathlib import Path

import gevent
import pytest
from hypothesis import given
from hypothesis import strategies as st

from counter_server.protocol import MAX_COUNTER
from counter_server.server.errors import StateFileError
from counter_server.server.store import MemoryCounterStore, StoreUnavailable
from counter_server.server.store.statefile import (
    COMMIT_STALL_SECONDS,
    FILE_SIZE,
    SLOT_SIZE,
    DurableCounterStore,
    Slot,
    StateFile,
    decode_file,
    decode_slot,
    encode_slot,
)
from support import (
    connect,
    frames,
    http_get,
    metric,
    recv_replies,
    start_server,
    state_on_disk,
    wait_until,
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


# --- the durable store's group commit (DurableCounterStore) ----------------


class HeldStateFile:
    """Commits block until ``release``d; the value is read late, as on disk."""

    path = "held.state"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.written: list[int] = []
        self.fail = False

    def commit(self, read_value, sync: bool) -> int:
        self.started.set()
        assert self.release.wait(10), "the test never released the commit"
        if self.fail:
            raise OSError(28, "No space left on device")
        value = read_value()
        self.written.append(value)
        return value

    def close(self) -> None:
        pass


def until_true(condition, seconds: float = 5.0) -> None:
    """Yield to the store's greenlets until ``condition`` holds."""
    with gevent.Timeout(seconds, AssertionError("condition never became true")):
        while not condition():
            gevent.sleep(0.01)


def test_waiters_covered_by_a_late_read_are_released():
    state = HeldStateFile()
    store = DurableCounterStore(state, MemoryCounterStore(), "always")
    first = gevent.spawn(store.apply, [1])
    until_true(state.started.is_set)  # a commit covering 1 is in flight
    second = gevent.spawn(store.apply, [1])  # 2: needs the next commit
    gevent.sleep(0.05)
    state.release.set()  # the in-flight commit reads 2 and writes it
    first.join(5)
    second.join(5)
    assert first.value == [1]
    assert second.value == [2], "a waiter already covered was never woken"
    assert state.written == [2]
    store.close()


def test_replies_wait_for_the_commit_and_fail_if_it_fails():
    state = HeldStateFile()
    store = DurableCounterStore(state, MemoryCounterStore(), "always")
    waiting = gevent.spawn(store.apply, [5])
    until_true(state.started.is_set)
    gevent.sleep(0.05)
    assert not waiting.ready(), "a reply went out before its value was durable"
    state.fail = True
    state.release.set()
    waiting.join(5)
    assert isinstance(waiting.exception, StoreUnavailable)
    state.fail = False
    assert store.apply([0]) == [5]  # the next commit succeeds and covers it
    store.close()
    with pytest.raises(StoreUnavailable):
        store.apply([1])


# --- commits that stall: a frozen filesystem, the lock held elsewhere ------


def stalled_increment(port: int, result: list) -> threading.Thread:
    """An increment sent now whose reply (or the error) lands in ``result``."""

    def run() -> None:
        try:
            with connect(port, timeout=30) as sock:
                sock.sendall(frames(1))
                result.append(recv_replies(sock, 1)[0])
        except (OSError, AssertionError) as exc:
            result.append(exc)

    thread = threading.Thread(daemon=True, target=run)
    thread.start()
    return thread


def assert_stall_reported(server, result: list) -> None:
    healthz = server.metrics_url("/healthz")
    # Reported once a commit has run COMMIT_STALL_SECONDS; the rest is a
    # loaded machine's margin.
    wait_until(lambda: http_get(healthz)[0] == 503, COMMIT_STALL_SECONDS + 3, "503")
    assert "a commit has not finished for" in http_get(healthz)[1]
    assert metric(server.metrics_url(), "counter_server_state_commit_running_seconds") > 2
    assert result == [], "acknowledged before it was on disk"


def test_a_commit_held_up_by_the_files_lock_is_reported_and_then_completes(tmp_path):
    path = tmp_path / "counter.state"
    with start_server(
        "--state-file", str(path), "--fsync", "always", "--metrics-port", "0",
        "--processes", "2",
    ) as server:  # fmt: skip
        assert recv_one(server.port) == 1
        # A POSIX record lock on the file, as a worker stopped in the middle
        # of its commit holds it (the instance's own flock is separate).
        holder = os.open(path, os.O_RDWR)
        fcntl.lockf(holder, fcntl.LOCK_EX)
        result: list = []
        try:
            thread = stalled_increment(server.port, result)
            assert_stall_reported(server, result)
        finally:
            fcntl.lockf(holder, fcntl.LOCK_UN)
            os.close(holder)
        thread.join(10)
        assert result == [2]
        wait_until(lambda: http_get(server.metrics_url("/healthz"))[0] == 200, 3, "200")
        assert metric(server.metrics_url(), "counter_server_state_lock_wait_seconds_total") > 2
    assert "Traceback" not in server.stderr


def recv_one(port: int) -> int:
    with connect(port) as sock:
        sock.sendall(frames(1))
        return recv_replies(sock, 1)[0]


def _freezable_filesystem(tmp_path):
    """A mounted ext4 image of the test's own, or the reason there is none."""
    if os.geteuid() != 0:
        return None, "needs root (mount, fsfreeze)"
    for tool in ("mkfs.ext4", "fsfreeze", "mount", "umount"):
        if shutil.which(tool) is None:
            return None, f"{tool} is not installed"
    image, mountpoint = tmp_path / "disk.img", tmp_path / "mnt"
    mountpoint.mkdir()
    with image.open("wb") as f:
        f.truncate(16 * 1024 * 1024)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    if made.returncode:
        return None, f"mkfs.ext4 failed: {made.stderr.strip()}"
    mounted = subprocess.run(
        ["mount", "-o", "loop", str(image), str(mountpoint)], capture_output=True, text=True
    )
    if mounted.returncode:
        return None, f"the kernel refused a loop mount: {mounted.stderr.strip()}"
    return mountpoint, None


@pytest.fixture
def freezable(tmp_path):
    mountpoint, why = _freezable_filesystem(tmp_path)
    if mountpoint is None:
        pytest.skip(why)
    try:
        yield mountpoint
    finally:
        subprocess.run(["fsfreeze", "-u", str(mountpoint)], capture_output=True)
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def test_a_frozen_disk_is_reported_and_the_reply_waits_for_it(freezable):
    server = start_server(
        "--state-file", str(freezable / "counter.state"), "--fsync", "always",
        "--metrics-port", "0",
    )  # fmt: skip
    frozen = False
    try:
        assert recv_one(server.port) == 1
        frozen = subprocess.run(["fsfreeze", "-f", str(freezable)], capture_output=True)
        if frozen.returncode:
            pytest.skip(f"fsfreeze refused: {frozen.stderr.decode().strip()}")
        frozen = True
        result: list = []
        thread = stalled_increment(server.port, result)
        assert_stall_reported(server, result)
        subprocess.run(["fsfreeze", "-u", str(freezable)], check=True)
        frozen = False
        thread.join(10)
        assert result == [2]
        wait_until(lambda: http_get(server.metrics_url("/healthz"))[0] == 200, 3, "200")
    finally:
        if frozen:
            subprocess.run(["fsfreeze", "-u", str(freezable)])
        server.stop()
    assert "the commit finished after" in server.stderr
    assert "Traceback" not in server.stderr
