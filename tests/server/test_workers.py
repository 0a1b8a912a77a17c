"""server.workers: in process, which worker steps back from accepting and
the metrics board that merges the workers' figures and totals; then
--processes N whole, workers sharing one port and one counter."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from counter_server.server.workers import SLACK, AcceptBalance, Board, BoardCollector, Totals
from support import (
    REPO_ROOT,
    connect,
    exchange,
    frames,
    http_get,
    read_counter,
    recv_replies,
    run_server_command,
    start_server,
)
from testing.procinfo import children_of


def test_a_worker_ahead_of_the_least_busy_one_steps_back():
    balance = AcceptBalance(3)
    for index, count in enumerate((5, 5 + SLACK, 5 + SLACK + 1)):
        balance.serving(index, count)
    assert not balance.ahead(0)
    assert not balance.ahead(1)  # within the slack
    assert balance.ahead(2)


def test_absent_workers_are_not_waited_for():
    balance = AcceptBalance(2)
    balance.serving(0, 10)
    assert not balance.ahead(0), "the other worker has not started accepting"
    balance.serving(1, 0)
    assert balance.ahead(0)
    balance.absent(1)  # died or stopping
    assert not balance.ahead(0)


def test_one_worker_alone_never_steps_back():
    balance = AcceptBalance(1)
    balance.serving(0, 1000)
    assert not balance.ahead(0)


def figures(applied: float, value: float, healthy: float, in_use: float) -> list:
    closed = CounterMetricFamily("counter_server_connections_closed", "c", labels=["reason"])
    closed.add_metric(["peer_closed"], applied / 10)
    return [
        CounterMetricFamily("counter_server_requests_applied", "a", value=applied),
        GaugeMetricFamily("counter_server_value", "v", value=value),
        GaugeMetricFamily("counter_server_healthy", "h", value=healthy),
        GaugeMetricFamily("counter_server_pool_in_use", "p", value=in_use),
        GaugeMetricFamily("process_open_fds", "per process", value=99),
        closed,
    ]


def samples(board: Board) -> dict:
    return {
        (s.name, tuple(s.labels.items())): s.value
        for family in BoardCollector(board).collect()
        for s in family.samples
    }


def test_counters_and_pool_sum_the_value_is_the_largest_health_the_worst():
    board = Board(2)
    board.publish(0, figures(100, 250, 1, 3), None, Totals(100, 250))
    board.publish(1, figures(150, 240, 0, 4), "state file x: cannot write", Totals(150, 240))
    merged = samples(board)
    assert merged[("counter_server_requests_applied_total", ())] == 250
    assert merged[("counter_server_value", ())] == 250
    assert merged[("counter_server_healthy", ())] == 0
    assert merged[("counter_server_pool_in_use", ())] == 7
    assert merged[("counter_server_connections_closed_total", (("reason", "peer_closed"),))] == 25
    assert not any(name.startswith("process_") for name, _ in merged)
    assert board.health() == "state file x: cannot write"


def test_a_dead_workers_counters_are_kept_and_its_gauges_dropped():
    board = Board(2)
    board.publish(0, figures(100, 250, 1, 3), None, Totals(100, 250))
    board.publish(1, figures(150, 240, 1, 4), None, Totals(150, 240))
    board.retire(1)
    board.publish(1, figures(5, 260, 1, 1), None, Totals(5, 260))  # its replacement starts from 0
    merged = samples(board)
    assert merged[("counter_server_requests_applied_total", ())] == 255
    assert merged[("counter_server_pool_in_use", ())] == 4
    assert merged[("counter_server_value", ())] == 260
    assert board.totals() == Totals(255, 260)


def test_a_slot_being_written_or_garbled_reads_as_empty():
    board = Board(1)
    board.publish(0, figures(1, 1, 1, 1), None, Totals(1, 1))
    board.memory[12:16] = b"]]]]"  # a torn snapshot
    assert board.read(0) == {"health": None, "totals": [0, 0], "families": []}


# --- --processes N, whole: workers sharing one port and one counter --------


def worker_pids(server) -> list[int]:
    return server.ready.workers


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"


def socket_count(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if str(fd.readlink()).startswith("socket:"))


def test_two_workers_share_the_port_and_give_exact_distinct_replies():
    server = start_server("--processes", "2", "--multiplier", "50")
    try:
        pids = worker_pids(server)
        assert len(pids) == 2 and all(alive(p) for p in pids)
        connections, per_connection = 100, 30
        replies: list[int] = []
        lock = threading.Lock()
        held = threading.Barrier(connections + 1, timeout=30)
        done = threading.Barrier(connections + 1, timeout=60)

        def client() -> None:
            with connect(server.port) as sock:
                got = []
                for _ in range(per_connection):
                    sock.sendall(frames(1))
                    got.extend(recv_replies(sock, 1))
                held.wait()
                done.wait()
            with lock:
                replies.extend(got)

        threads = [threading.Thread(daemon=True, target=client) for _ in range(connections)]
        for t in threads:
            t.start()
        held.wait()
        # While every connection is open, each worker holds some of them.
        assert all(socket_count(pid) > 3 for pid in pids), [socket_count(p) for p in pids]
        done.wait()
        for t in threads:
            t.join(30)
        assert sorted(replies) == list(range(1, connections * per_connection + 1))
    finally:
        assert server.stop() == 0
    assert server.stdout.count("Server stopped after processing total requests: 3000") == 1
    assert server.totals[1] == 3000
    assert not any(alive(p) for p in pids)
    assert "Traceback" not in server.stderr


def test_a_burst_of_connections_is_spread_over_the_workers():
    """A worker ahead of the others lets them accept (server.workers.AcceptBalance), so a
    burst is shared out; before, whichever worker woke first took up to
    gevent's 100 in a row, and one worker got 34 to 40 of the 40."""
    with start_server("--processes", "2") as server:
        workers = worker_pids(server)
        before = {pid: socket_count(pid) for pid in workers}
        held = []
        for _ in range(40):  # connect all at once, as load generators do
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", server.port))
            held.append(sock)
        for sock in held:
            sock.settimeout(10)
            sock.sendall(frames(0))
            assert recv_replies(sock, 1) == (0,)
        share = {pid: socket_count(pid) - before[pid] for pid in workers}
        for sock in held:
            sock.close()
    assert sum(share.values()) == 40, share
    # Even is 20 each; unbalanced was 0 to 6 for one of them. A loaded machine
    # may delay one worker's accepts, so the bound leaves room.
    assert min(share.values()) >= 10, f"connections per worker: {share}"


def test_a_dead_worker_is_replaced_and_nothing_acknowledged_is_lost():
    # With the metrics endpoint: a replacement is forked from a parent that
    # serves it, and must leave the parent's endpoint alone (it once failed
    # with EBADF and a traceback at the next scrape).
    with start_server("--processes", "2", "--metrics-port", "0") as server:
        first, second = worker_pids(server)
        assert exchange(server.port, 5) == (5,)
        assert http_get(server.metrics_url())[0] == 200
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            workers = children_of(server.proc.pid)
            if first not in workers and len(workers) == 2:
                break
            assert time.monotonic() < deadline, f"no replacement: {workers}"
            time.sleep(0.1)
        assert second in workers
        values = [exchange(server.port, 1)[0] for _ in range(20)]
        assert values == list(range(6, 26))  # the counter lived on in shared memory
        for _ in range(3):
            assert http_get(server.metrics_url("/healthz"))[0] == 200
    assert "Traceback" not in server.stderr and "Bad file descriptor" not in server.stderr
    assert "starting a new one" in server.stderr
    assert "killed by SIGKILL" in server.stderr
    assert server.totals[1] == 25


# The server with its restart delays shortened (0.01 s instead of doubling from
# 0.1 s to 30 s): only the test's patience changes, not the rule it checks.
IMPATIENT_SERVER = """
import sys
sys.path[0] = {root!r}
from gevent import monkey
monkey.patch_all()
from counter_server.server import workers
workers.BACKOFF_FIRST = workers.BACKOFF_MAX = 0.01
from counter_server.server.run import main
sys.exit(main())
"""


def test_workers_dying_young_again_and_again_make_it_give_up_and_exit_1(tmp_path):
    script = tmp_path / "impatient_server.py"
    script.write_text(IMPATIENT_SERVER.format(root=str(REPO_ROOT)))
    server = start_server("--processes", "2", script=script)
    killed: set[int] = set()
    deadline = time.monotonic() + 30
    try:
        while server.proc.poll() is None:
            assert time.monotonic() < deadline, f"still restarting after {len(killed)} deaths"
            for pid in children_of(server.proc.pid) - killed:
                os.kill(pid, signal.SIGKILL)  # a worker of the server this test started
                killed.add(pid)
            time.sleep(0.005)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()  # its workers follow their parent
        server.wait()
    assert server.returncode == 1
    assert "10 workers in a row died young: giving up" in server.stderr
    # The tenth death gives up; the other worker may be killed by the test too.
    assert len(killed) in (10, 11), f"{len(killed)} workers were started"
    assert "Traceback" not in server.stderr


def test_a_worker_that_does_not_stop_is_killed_5s_after_the_shutdown_timeout():
    server = start_server("--processes", "2", "--shutdown-timeout", "1")
    try:
        assert exchange(server.port, 7) == (7,)
        stuck = worker_pids(server)[0]
        os.kill(stuck, signal.SIGSTOP)  # a worker of the server this test started
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        took = time.monotonic() - started
    finally:
        if server.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # stopped: deaf to its parent's end
                os.kill(stuck, signal.SIGKILL)
            server.proc.kill()
            server.wait()
    assert 6 <= took < 6 + 3, f"the stop took {took:.1f}s"  # 1 s + 5 s, and a loaded machine's
    assert "1 workers did not stop in time and were killed" in server.stderr
    assert not alive(stuck)
    assert server.totals == (1, 7)


def test_auto_starts_one_worker_per_cpu():
    with start_server("--processes", "auto") as server:
        assert len(worker_pids(server)) == len(os.sched_getaffinity(0))
        assert read_counter(server.port) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--processes", "0"], "--processes: must be a whole number >= 1 or auto"),
        (["--processes", "many"], "--processes: must be"),
    ],
)
def test_bad_process_flags(args, message):
    result = run_server_command(*args)
    assert result.returncode == 2
    assert message in result.stderr.splitlines()[0]


def test_processes_with_a_state_file_survive_a_crash(tmp_path):
    path = str(tmp_path / "counter.state")
    server = start_server("--processes", "2", "--state-file", path, "--fsync", "always")
    try:
        acknowledged = [exchange(server.port, 1, 1)[-1] for _ in range(50)]
        assert acknowledged == list(range(2, 101, 2))
        server.signal(signal.SIGKILL)  # the parent: its workers must not outlive it
        server.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in worker_pids(server)):
            assert time.monotonic() < deadline, "workers outlived their parent"
            time.sleep(0.1)
    finally:
        if server.returncode is None:
            server.stop()
    again = start_server("--processes", "2", "--state-file", path)
    try:
        assert "counter resumed at 100 from" in again.stdout_path.read_text()
        assert exchange(again.port, 1) == (101,)
    finally:
        assert again.stop() == 0
    assert again.totals[1] == 101
