"""The counter survives restarts and crashes (--state-file, --fsync)."""

from __future__ import annotations

import random
import signal
import threading
import time

import pytest

from counter_server.server.store.statefile import FILE_SIZE, encode_slot
from support import (
    Load,
    assert_exact,
    exchange,
    read_counter,
    run_server_command,
    start_server,
)


def resumed_value(server) -> int:
    assert "counter resumed at" in server.ready.origin, server.ready
    return server.ready.initial


def test_graceful_restart_resumes_where_it_stopped(tmp_path):
    path = str(tmp_path / "counter.state")
    server = start_server("--state-file", path, "--fsync", "no")
    assert "counter starts at 0 in new state file" in server.stdout_path.read_text()
    exchange(server.port, 5, 6)
    assert server.stop() == 0
    with start_server("--state-file", path) as server:
        assert resumed_value(server) == 11
        assert exchange(server.port, 1) == (12,)


def crash_rounds(tmp_path, fsync: str, rounds: int, load_seconds: tuple[float, float]):
    path = str(tmp_path / "counter.state")
    rng = random.Random(20261123)
    floor = 0  # everything acknowledged before this round was durable
    for round_number in range(rounds):
        server = start_server("--state-file", path, "--fsync", fsync, "--multiplier", "20")
        start_value = read_counter(server.port)
        assert start_value >= floor, f"round {round_number}: lost acknowledged increments"
        load = Load([server.port], 20, depth=4)
        time.sleep(rng.uniform(*load_seconds))
        killed_at = time.monotonic()
        server.signal(signal.SIGKILL)
        server.wait()
        load.finish()
        yield load, killed_at, start_value, path
        floor = start_value


def test_crash_with_fsync_always_never_loses_an_acknowledged_increment(tmp_path):
    rounds = 0
    for load, killed_at, start_value, path in crash_rounds(tmp_path, "always", 10, (0.3, 1.2)):
        with start_server("--state-file", path) as server:
            resumed = resumed_value(server)
            assert load.largest_before(killed_at) > start_value, "no reply before the kill"
            assert_exact(load.verdict(start_value, resumed))
        rounds += 1
    assert rounds == 10


def test_crash_with_fsync_everysec_loses_at_most_about_a_second(tmp_path):
    rounds = 0
    for load, killed_at, start_value, path in crash_rounds(tmp_path, "everysec", 3, (2.5, 3.0)):
        with start_server("--state-file", path) as server:
            resumed = resumed_value(server)
            settled = load.largest_before(killed_at - 1.5)
            assert settled > start_value, "no reply arrived early enough"
            assert settled <= resumed, (
                f"acknowledged {settled} 1.5 s before the kill, resumed {resumed}"
            )
            verdict = load.verdict(start_value, resumed)
            assert resumed <= verdict.high, verdict.summary()  # nothing applied twice
            assert not verdict.twice, verdict.summary()
        rounds += 1
    assert rounds == 3


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "wrong size (0 bytes, expected 64)"),
        (encode_slot(3, 9)[:20], "wrong size (20 bytes, expected 64)"),
        (b"\0" * FILE_SIZE, "corrupt, no valid slot (not a counter state file (bad magic))"),
        (
            bytes(b ^ (i == 30) for i, b in enumerate(encode_slot(1, 5))) * 2,
            "corrupt, no valid slot (checksum mismatch)",
        ),
    ],
)
def test_corrupt_or_truncated_state_file_is_refused(tmp_path, content, problem):
    path = tmp_path / "counter.state"
    path.write_bytes(content)
    result = run_server_command("--port", "0", "--state-file", str(path))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: state file {path}: {problem}"
    assert path.read_bytes() == content, "the bad file must be left as it was"


def test_unreadable_state_file_directory(tmp_path):
    result = run_server_command("--port", "0", "--state-file", str(tmp_path / "nope" / "c.state"))
    assert result.returncode == 1
    assert "cannot create it: no such file or directory" in result.stderr


def test_fsync_needs_a_state_file():
    result = run_server_command("--fsync", "always")
    assert result.returncode == 2
    assert "--fsync: needs --state-file" in result.stderr


def test_bad_fsync_mode(tmp_path):
    result = run_server_command("--state-file", str(tmp_path / "s"), "--fsync", "sometimes")
    assert result.returncode == 2
    assert "--fsync: must be always, everysec or no" in result.stderr


def test_fsync_always_under_concurrent_load_stays_exact(tmp_path):
    with start_server("--state-file", str(tmp_path / "s"), "--fsync", "always") as server:
        results: list[tuple[int, ...]] = []

        def client() -> None:
            for _ in range(20):
                results.append(exchange(server.port, *[1] * 5))

        threads = [threading.Thread(daemon=True, target=client) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        everything = sorted(v for r in results for v in r)
        assert everything == list(range(1, 1001))
    assert server.totals[1] == 1000
