"""spam.sh end to end (small settings), and its summary's arithmetic."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from support import REPO_ROOT, read_counter, start_server
from testing.spam_report import verdict

SPAM = REPO_ROOT / "spam.sh"


def run_spam(
    env: dict[str, str], timeout: float = 120, args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SPAM), *args],
        cwd="/",
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def our_processes(marker: str) -> list[str]:
    """Command lines of live processes mentioning ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline:
                found.append(cmdline)
    return found


def test_spam_starts_its_own_server_and_checks_the_sums():
    result = run_spam({"CLIENTS": "4", "DURATION": "2"})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "clients ok / failed      4 / 0" in out
    # It says what it is doing while the clients run, and when they are done.
    assert "spam.sh: started 4 clients; each sends for" in out
    assert re.search(r"spam\.sh: all clients done after \d+s; checking the counter", out), out
    assert "RESULT: OK" in out
    acked = int(re.search(r"increments acknowledged\s+([\d,]+)", out)[1].replace(",", ""))
    moved = int(re.search(r"moved by ([\d,]+)", out)[1].replace(",", ""))
    assert acked == moved > 0
    assert f"Final counter value: {moved:,}".replace(",", "") in out.replace(",", "")
    assert not our_processes(
        str(REPO_ROOT / "server" / "server.py") + " --host 127.0.0.1 --port 0 --multiplier 5"
    )


def test_spam_against_a_given_server_leaves_it_running():
    server = start_server("--multiplier", "10")
    try:
        before = read_counter(server.port)
        result = run_spam(
            {"CLIENTS": "3", "DURATION": "1", "PIPELINE": "8", "SERVER": f"127.0.0.1:{server.port}"}
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "RESULT: OK" in result.stdout
        assert server.proc.poll() is None, "spam.sh stopped a server it did not start"
        assert read_counter(server.port) > before
    finally:
        assert server.stop() == 0


def test_spam_reports_an_unreachable_server():
    result = run_spam({"CLIENTS": "2", "DURATION": "1", "SERVER": "127.0.0.1:1"})
    assert result.returncode == 1
    assert "cannot read the counter at 127.0.0.1:1" in result.stderr


def test_spam_rejects_bad_settings():
    result = run_spam({"CLIENTS": "many"})
    assert result.returncode == 2
    assert "CLIENTS must be a positive integer" in result.stderr


def test_ctrl_c_leaves_no_process_behind():
    marker = "--duration 45"
    proc = subprocess.Popen(
        [str(SPAM)],
        env={**os.environ, "CLIENTS": "3", "DURATION": "45"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while len(our_processes(marker)) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert our_processes(marker), "clients never started"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "interrupted" in err
    time.sleep(0.5)
    assert not our_processes(marker)


def report(acked: int, errors: int = 0, sent: int | None = None, **kinds: int) -> dict:
    return {
        "increments_acknowledged": acked,
        "requests_acknowledged": acked,
        "requests_sent": acked if sent is None else sent,
        "increment": 1,
        "errors": {"timeout": errors, **kinds},
        "errors_total": errors + sum(kinds.values()),
        "connections_failed": 1 if errors or kinds else 0,
        "first_error": "boom" if errors or kinds else None,
        "started_at": 100.0,
        "finished_at": 102.0,
        "latency_us": {"p99": 1500},
    }


def test_verdict_is_the_range_acknowledged_to_acknowledged_plus_unanswered():
    exact = verdict(10, 40, 2, [report(10), report(20)], missing=0)
    assert exact["ok"] and exact["moved"] == 30 and exact["replies_per_second"] == 15.0
    # Three frames timed out on a client; two of them were applied anyway.
    late = verdict(10, 42, 2, [report(10, errors=3, sent=13), report(20)], missing=0)
    assert late["ok"] and late["unanswered"] == 3, late
    too_many = verdict(10, 44, 2, [report(10, errors=3, sent=13), report(20)], missing=0)
    assert not too_many["ok"]
    assert too_many["problems"] == [
        "too many: the counter moved by 34, above acknowledged + unanswered = 33 "
        "(upper bound broken by 1)"
    ]
    lost = verdict(10, 39, 2, [report(10), report(20)], missing=0)
    assert not lost["ok"]
    assert lost["problems"] == [
        "lost: the counter moved by 29, below the 30 increments acknowledged "
        "(lower bound broken by 1)"
    ]


def test_verdict_counts_failed_and_missing_clients_and_wrong_replies():
    summary = verdict(0, 30, 3, [report(10), report(20, errors=2, sent=22)], missing=1)
    assert not summary["ok"]
    assert summary["clients_ok"] == 1 and summary["clients_failed"] == 2
    assert any("1 of 3 clients produced no report" in p for p in summary["problems"])
    assert any("first: boom" in n for n in summary["notes"])  # timeouts: noted, not failed
    wrong = verdict(0, 30, 2, [report(10), report(20, not_increasing=1)], missing=0)
    assert not wrong["ok"] and "received wrong replies" in wrong["problems"][0]


def test_a_pool_smaller_than_the_run_is_noted_and_the_range_holds():
    # 2 clients x 2 CPUs x 2 connections against a pool of 2: most
    # connections wait in the listen queue, their frames time out on the
    # client, and the server applies them when it reaches them.
    with start_server("--multiplier", "1", "--metrics-port", "0") as server:
        result = run_spam({
            "CLIENTS": "2", "DURATION": "3", "MULTIPLIER": "2", "TIMEOUT": "1",
            "SERVER": f"127.0.0.1:{server.port}", "METRICS": server.metrics_url(),
        })  # fmt: skip
        out = result.stdout
        assert "the server serves 2 connections at once and this run opens 8" in out, out
        assert "acknowledged <= moved <= acknowledged + unanswered" in out
        assert result.returncode == 0 and "RESULT: OK" in out, out + result.stderr


LOSING_SERVER = """
import socket, sys, threading
sys.path.insert(0, sys.argv[1])
from counter_server.protocol import decode_request, encode_reply
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
state = {"value": 0, "reads": 0}
lock = threading.Lock()
def serve(conn):
    with conn:
        while True:
            frame = b""
            while len(frame) < 16:
                chunk = conn.recv(16 - len(frame))
                if not chunk:
                    return
                frame += chunk
            n = decode_request(frame)
            with lock:
                if n == 0:
                    state["reads"] += 1
                    # It forgets 5 increments between the first read and the last.
                    reply = state["value"] - (5 if state["reads"] > 1 else 0)
                else:
                    state["value"] += n
                    reply = state["value"]
            conn.sendall(encode_reply(max(reply, 0)))
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def test_a_server_that_loses_increments_fails_the_run():
    fake = subprocess.Popen([sys.executable, "-c", LOSING_SERVER, str(REPO_ROOT)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        port = int(fake.stdout.readline())
        result = run_spam({"CLIENTS": "1", "DURATION": "1", "SERVER": f"127.0.0.1:{port}"})
        assert result.returncode == 1, result.stdout + result.stderr
        assert "RESULT: FAILED" in result.stdout
        assert "lost: the counter moved by" in result.stdout
    finally:
        fake.kill()
        fake.wait()


def test_spam_help_prints_usage_and_runs_nothing():
    result = run_spam({}, timeout=10, args=("--help",))
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: ./spam.sh")
    assert "CLIENTS" in result.stdout and not result.stderr


def test_spam_refuses_unknown_arguments():
    result = run_spam({}, timeout=10, args=("--clients", "3"))
    assert result.returncode == 2
    assert "unknown argument '--clients'" in result.stderr
    assert "Usage: ./spam.sh" in result.stderr


def test_spam_with_a_missing_interpreter_stops_at_once(tmp_path):
    result = run_spam({"PYTHON": f"{tmp_path}/python", "CLIENTS": "1"}, timeout=30)
    assert result.returncode != 0
    assert "cannot read the counter" not in result.stderr


def test_spam_with_a_bare_python_names_the_missing_package(tmp_path):
    bare = tmp_path / "python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S -E "$@"\n')
    bare.chmod(0o755)
    result = run_spam({"PYTHON": str(bare), "CLIENTS": "1"}, timeout=30)
    assert result.returncode == 1
    assert "spam.sh: the Python package gevent is not installed" in result.stderr
    assert "cannot read the counter" not in result.stderr
