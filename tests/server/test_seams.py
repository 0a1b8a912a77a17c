"""Where features meet: one owner per port and per state file, restarts
under --fsync always, a state file deleted or damaged while the server runs,
honest /healthz, a crash-looping worker, and JSON-only logs. Each case runs
a real server on loopback."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from counter_server.server.cli import parse_settings
from counter_server.server.errors import StateFileError
from counter_server.server.store.shared import SharedCounter
from counter_server.server.store.statefile import FILE_SIZE, StateFile
from counter_server.server.wiring import claim, open_store
from support import (
    Load,
    assert_exact,
    exchange,
    free_port,
    http_get,
    read_counter,
    run_server_command,
    stall_server,
    start_server,
    state_on_disk,
    wait_until,
)
from testing.launcher import SERVER_SCRIPT
from testing.procinfo import children_of


def on_disk(path: Path) -> int:
    return state_on_disk(path).value


def on_disk_or_none(path: Path) -> int | None:
    try:
        return on_disk(path)
    except (OSError, StateFileError):
        return None


# --- one server per port ----------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (["--processes", "2"], ["--processes", "2"]),
        (["--processes", "2"], []),
        ([], ["--processes", "2"]),
    ],
    ids=["processes-processes", "processes-single", "single-processes"],
)
def test_a_second_instance_on_a_served_port_is_refused(first, second):
    with start_server(*first) as owner:
        before = exchange(owner.port, 1)[0]
        result = run_server_command(
            "--host", "127.0.0.1", "--port", str(owner.port), *second, timeout=30
        )
        assert result.returncode == 1, result
        lines = result.stderr.strip().splitlines()
        assert lines == [f"error: cannot listen on 127.0.0.1:{owner.port}: address already in use"]
        assert "Traceback" not in result.stderr
        # The owner still serves alone: one counter, nothing split off.
        assert [exchange(owner.port, 1)[0] for _ in range(20)] == list(
            range(before + 1, before + 21)
        )


def test_a_refused_start_leaves_no_file_behind(tmp_path):
    with start_server() as owner:
        env = {**os.environ, "TMPDIR": str(tmp_path)}
        result = run_server_command(
            "--host", "127.0.0.1", "--port", str(owner.port), "--processes", "2",
            "--max-conns-per-ip", "5", env=env,
        )  # fmt: skip
        assert result.returncode == 1, result
        assert list(tmp_path.iterdir()) == []  # no lock file or table leaked


def test_a_ready_file_in_a_missing_directory_is_a_usage_error(tmp_path):
    result = run_server_command("--ready-file", str(tmp_path / "missing" / "ready.json"))
    assert result.returncode == 2
    assert f"--ready-file: no such directory {tmp_path / 'missing'}" in result.stderr


# --- one owner per state file -----------------------------------------------------


def test_rolling_restart_on_one_state_file_loses_nothing(tmp_path):
    """The issue's reproduction: A acknowledges, a never-reading client holds
    its drain, SIGTERM A; B must not run beside A on the same file; after A
    exits, B resumes; B is killed hard; the restart keeps all B acknowledged."""
    path = tmp_path / "counter.state"
    a = start_server("--state-file", str(path), "--fsync", "always", "--shutdown-timeout", "3")
    acked = [exchange(a.port, 1)[0] for _ in range(50)]
    stalled = stall_server(a.port)  # A owes replies it cannot send: its drain lasts
    a.signal(signal.SIGTERM)
    try:
        refused = run_server_command(
            "--host", "127.0.0.1", "--port", "0", "--state-file", str(path), "--fsync", "always"
        )
        assert refused.returncode == 1, refused
        assert "is in use by another server instance" in refused.stderr
        assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    finally:
        stalled.close()
    assert a.wait(30) == 0
    final_a = a.totals[1]
    assert final_a >= acked[-1]

    b = start_server("--state-file", str(path), "--fsync", "always")
    assert b.ready.initial == final_a
    acked_b = [exchange(b.port, 1)[0] for _ in range(100)]
    assert acked_b == list(range(final_a + 1, final_a + 101))
    b.signal(signal.SIGKILL)
    b.wait()
    with start_server("--state-file", str(path), "--fsync", "always") as c:
        # Both bounds: every frame sent to B was acknowledged, none unanswered.
        assert c.ready.initial == acked_b[-1]
        assert read_counter(c.port) == acked_b[-1]


def test_a_rolling_restart_under_load_answers_every_frame_it_applied(tmp_path):
    path, port = str(tmp_path / "counter.state"), free_port()
    args = ("--state-file", path, "--fsync", "always", "--port", str(port))
    old = start_server(*args)
    load = Load([port], 10, depth=4)
    new = None
    try:
        wait_until(lambda: len(load.replies) > 1000, 10, "the load getting going")
        old.signal(signal.SIGTERM)
        assert old.wait() == 0
        new = start_server(*args)
        served = len(load.replies)
        wait_until(lambda: len(load.replies) > served + 1000, 10, "the new instance serving")
    finally:
        load.finish()
        for server in (old, new):
            if server is not None and server.returncode is None:
                server.stop()
    applied = old.totals[0] + new.totals[0]
    final = new.totals[1]
    assert new.ready.initial == old.totals[1]
    assert_exact(load.verdict(0, final))
    # The replies owed at the old instance's stop were all sent.
    assert len(load.replies) == applied == final, f"{applied - len(load.replies)} never answered"


def test_an_instance_that_waited_resumes_where_the_owner_stopped(tmp_path):
    """Sequential rolling restart, as the docs describe it."""
    path = tmp_path / "counter.state"
    old = start_server("--state-file", str(path), "--fsync", "always", "--processes", "2")
    for _ in range(30):
        exchange(old.port, 2)
    port = old.port
    assert old.stop() == 0
    with start_server("--state-file", str(path), "--port", str(port)) as new:
        assert new.ready.initial == 60
        assert exchange(port, 1) == (61,)


# --- the state file deleted or damaged while the server runs ----------------------


@pytest.mark.parametrize("fsync", ["always", "everysec"])
@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.unlink(),
        lambda p: p.write_bytes(b""),
        lambda p: p.write_bytes(os.urandom(FILE_SIZE)),
    ],
    ids=["deleted", "truncated", "garbage"],
)
def test_a_state_file_lost_while_running_is_restored(tmp_path, fsync, damage):
    path = tmp_path / "counter.state"
    server = start_server("--state-file", str(path), "--fsync", fsync)
    try:
        for _ in range(20):
            exchange(server.port, 10)
        damage(path)
        last = [exchange(server.port, 1)[0] for _ in range(5)][-1]
        if fsync == "always":  # each reply waited for its commit, which restored the file
            assert on_disk(path) >= last
        else:
            wait_until(lambda: (on_disk_or_none(path) or -1) >= last, 10, "restored with the value")
    finally:
        assert server.stop() == 0
    assert "restoring it from the live value" in server.stderr
    assert server.totals[1] == last
    with start_server("--state-file", str(path)) as again:
        assert again.ready.initial == last


def test_a_link_planted_where_the_old_temporary_name_was_is_never_written_through(tmp_path):
    """Anyone who can write to the state file's directory could plant a
    symlink at the predictable ``PATH.PID.new`` and have the restore truncate
    and overwrite the link's target."""
    path, victim = tmp_path / "counter.state", tmp_path / "victim.txt"
    victim.write_bytes(b"not yours 1234")
    server = start_server("--state-file", str(path), "--fsync", "always")
    try:
        exchange(server.port, 5)
        (tmp_path / f"counter.state.{server.pid}.new").symlink_to(victim)
        path.unlink()
        assert exchange(server.port, 1) == (6,)  # restored under --fsync always
    finally:
        assert server.stop() == 0
    assert victim.read_bytes() == b"not yours 1234"
    assert not path.is_symlink() and on_disk(path) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "counter.state",
        f"counter.state.{server.pid}.new",
        "victim.txt",
    ]  # no temporary left behind


def test_a_link_planted_where_the_ready_file_was_written_is_never_written_through(tmp_path):
    ready, victim = tmp_path / "ready.json", tmp_path / "victim.txt"
    victim.write_bytes(b"not yours 1234")
    argv = [sys.executable, str(SERVER_SCRIPT), "--host", "127.0.0.1", "--port", "0"]
    server = subprocess.Popen(
        [*argv, "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        # Planted before the interpreter has even imported the server.
        (tmp_path / f"ready.json.{server.pid}.tmp").symlink_to(victim)
        wait_until(lambda: ready.exists() or server.poll() is not None, 30, "the ready file")
        assert json.loads(ready.read_text())["pid"] == server.pid
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0, stderr
    assert victim.read_bytes() == b"not yours 1234"
    assert not ready.is_symlink()


def test_a_stop_that_cannot_save_the_final_value_exits_non_zero(tmp_path):
    directory = tmp_path / "state"
    directory.mkdir()
    path = directory / "counter.state"
    server = start_server("--state-file", str(path), "--fsync", "no")
    exchange(server.port, 7)
    shutil.rmtree(directory)  # nowhere to restore it to
    assert server.stop() == 1
    assert "the final value 7 was not saved" in server.stderr
    assert server.totals[1] == 7


# --- a restarted --processes worker under --fsync always --------------------------


def test_a_restarted_worker_never_reports_a_value_not_yet_on_disk(tmp_path):
    """A worker started beside running ones finds the shared counter ahead
    of the disk (increments applied, their commit not yet done). Built
    through the same wiring a restarted worker uses."""
    path = tmp_path / "counter.state"
    settings = parse_settings(["--state-file", str(path), "--fsync", "always"])
    claimed = claim(settings)
    try:
        StateFile.commit(claimed.state, lambda: 5, sync=True)
        shared = SharedCounter(12)  # 7 applied by a worker that died before committing
        store = open_store(settings, claimed, shared)
        replies = store.apply([0])  # a read on the new worker
        assert replies == [12]
        assert on_disk(path) >= 12, "replied 12 while the disk held less"
        store.close()
    finally:
        claimed.listener.close()


# --- /healthz tells the truth ----------------------------------------------------


def test_healthz_is_503_while_the_state_file_cannot_be_written(tmp_path):
    directory = tmp_path / "state"
    directory.mkdir()
    path = directory / "counter.state"
    with start_server(
        "--state-file", str(path), "--fsync", "always", "--metrics-port", "0",
        "--log-format", "json",
    ) as server:  # fmt: skip
        assert http_get(server.metrics_url("/healthz")) == (200, "ok\n")
        exchange(server.port, 1)
        directory.rename(tmp_path / "gone")  # the file's directory disappears
        with pytest.raises(AssertionError, match="closed after 0 of 8 bytes"):
            exchange(server.port, 1)  # its commit fails: no reply
        status, body = http_get(server.metrics_url("/healthz"))
        assert status == 503
        assert f"state file {path}" in body and "cannot" in body
        assert "counter_server_healthy 0.0" in http_get(server.metrics_url())[1]
        (tmp_path / "gone").rename(directory)  # the operator puts it back
        wait_until(
            lambda: http_get(server.metrics_url("/healthz"))[0] == 200, 10, "health recovered"
        )
        # The failed frame was applied but never acknowledged (like a reply
        # lost in the network); what matters is that nothing is acknowledged
        # before it is on disk.
        assert exchange(server.port, 1) == (3,)
        assert on_disk(path) >= 3
        assert "counter_server_healthy 1.0" in http_get(server.metrics_url())[1]
    # Every line on stderr is a JSON object, gevent's own reports included.
    lines = server.stderr.splitlines()
    assert any("cannot" in line for line in lines)
    for line in lines:
        record = json.loads(line)
        assert {"time", "level", "logger", "message"} <= record.keys(), line


# --- a worker that keeps dying at start -------------------------------------------


def test_a_crash_looping_worker_is_restarted_with_backoff_and_recovers():
    server = start_server("--processes", "2", "--multiplier", "2")
    try:
        parent = server.pid
        fds = len(os.listdir(f"/proc/{parent}/fd"))
        soft, hard = resource.prlimit(parent, resource.RLIMIT_NOFILE)
        # New workers inherit a limit that leaves them no descriptor to open.
        resource.prlimit(parent, resource.RLIMIT_NOFILE, (fds, hard))
        os.kill(server.ready.workers[0], signal.SIGKILL)

        def delays() -> list[str]:
            return re.findall(r"starting a new one in (\S+)s", server.stderr_path.read_text())

        wait_until(lambda: len(delays()) >= 4, 15, "four restarts")
        assert delays()[:4] == ["0.1", "0.2", "0.4", "0.8"]  # the backoff doubles
        log = server.stderr_path.read_text()
        assert "too many open files" in log.lower(), log
        assert "Traceback" not in log
        resource.prlimit(parent, resource.RLIMIT_NOFILE, (soft, hard))
        wait_until(
            lambda: len(children_of(parent)) == 2,
            15,
            "a new worker started once descriptors were available",
        )
        assert exchange(server.port, 1)[0] >= 1
        # Once the new worker has said it is ready, its pipe is closed: no
        # descriptor accumulates in the parent, however many restarts.
        wait_until(lambda: len(os.listdir(f"/proc/{parent}/fd")) <= fds, 5, "no pipe leaked")
    finally:
        assert server.stop() == 0
