"""--state-file --fsync always when commits stall: a frozen filesystem (a
loop-mounted ext4 image under fsfreeze) and the state file's lock held by
someone else (as a stopped --processes worker would hold it). Nothing is
acknowledged meanwhile, /healthz says why within the documented bound, and
everything resumes when the stall ends."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import threading

import pytest

from counter_server.server.store.statefile import COMMIT_STALL_SECONDS
from support import connect, frames, http_get, metric, recv_replies, start_server, wait_until


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
    server = start_server(
        "--state-file", str(path), "--fsync", "always", "--metrics-port", "0",
        "--processes", "2",
    )  # fmt: skip
    try:
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
    finally:
        server.stop()
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
