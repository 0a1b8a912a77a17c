"""Start-up, graceful shutdown and the command line (docs/protocol.md, "The server")."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from support import (
    REPO_ROOT,
    Load,
    assert_exact,
    connect,
    exchange,
    frames,
    free_port,
    read_counter,
    run_server_command,
    stall_server,
    start_server,
    wait_until,
)


def test_startup_line_names_address_pool_and_pid():
    with start_server("--multiplier", "3") as server:
        first_line = server.stdout_path.read_text().splitlines()[0]
        assert f"127.0.0.1:{server.port}" in first_line
        assert f"pid {server.proc.pid}" in first_line
        assert server.pool_size % 3 == 0 and server.pool_size >= 3
        assert "TLS" not in first_line and "metrics" not in first_line


def test_startup_line_says_tls_the_metrics_url_and_the_whole_pool(pki):
    with start_server(
        "--processes", "2", "--multiplier", "3", "--metrics-port", "0", "--backend", "memory",
        "--tls-cert", pki["server_cert"], "--tls-key", pki["server_key"],
    ) as server:  # fmt: skip
        line = server.stdout_path.read_text().splitlines()[0]
    per_process = server.ready.pool
    assert f"127.0.0.1:{server.port} with TLS (" in line, line
    assert f"pool {2 * per_process} = 2 processes x {per_process} (" in line, line
    assert f"metrics on {server.ready.metrics_url}" in line, line


def test_a_client_leaving_is_logged_only_at_debug():
    for level, logged in (("info", False), ("debug", True)):
        with start_server("--log-level", level) as server:
            for value in range(1, 11):  # more than the 5 lines a log key may write per 10 s
                assert exchange(server.port, 1) == (value,)
            with connect(server.port) as sock:  # an abrupt end stays news
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.sendall(frames(1)[:5])
            log = server.stderr_path
            wait_until(lambda: "closed: reset" in log.read_text(), 10, "reset")  # noqa: B023
        assert ("closed: peer closed" in server.stderr) is logged, server.stderr
        # Nor a summary of the lines not wanted ("N similar messages suppressed").
        assert ("peer_closed" in server.stderr) is logged, server.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_graceful_stop_prints_totals_and_exits_0(signum):
    server = start_server()
    exchange(server.port, 1, 2, 3)
    exchange(server.port, 0)
    server.signal(signum)
    assert server.wait() == 0
    assert server.totals == (4, 6)  # frames applied (zero-increment reads included), value
    assert "Traceback" not in server.stderr


def test_sigterm_under_load_loses_nothing_acknowledged():
    server = start_server()
    load = Load([server.port], 20, depth=10)
    wait_until(lambda: len(load.replies) > 1000, 10, "the load getting going")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    values = load.finish(10)
    applied, final = server.totals
    assert applied == final  # every frame was an increment of 1 from 0
    assert_exact(load.verdict(0, final))
    # Every frame the server applied was answered (the replies owed at shutdown).
    assert len(values) == applied, f"{applied - len(values)} applied frames never answered"


# What a stop may take beyond --shutdown-timeout (docs/operations.md): cutting
# the connections still open (at most a second), saving the final value and
# exiting, with room for a loaded two-core machine.
STOP_MARGIN = 3.0


def test_shutdown_timeout_cuts_a_client_that_never_reads():
    server = start_server("--shutdown-timeout", "2")
    with stall_server(server.port):
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0
        elapsed = time.monotonic() - started
    assert 2 <= elapsed < 2 + STOP_MARGIN, f"shutdown took {elapsed:.1f}s with a 2s timeout"
    assert "did not finish within the 2.0s shutdown timeout" in server.stderr
    applied, final = server.totals
    assert applied == final > 0


def shutdown_begun(server) -> bool:
    return "shutdown begun" in server.stderr_path.read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_second_signal_exits_at_once(signum):
    server = start_server("--shutdown-timeout", "60")
    try:
        with stall_server(server.port):
            server.signal(signum)
            # Two signals before the first is handled would be one.
            wait_until(lambda: shutdown_begun(server), 10, "the first signal being handled")
            assert server.proc.poll() is None, "the first signal should wait for the stuck client"
            started = time.monotonic()
            server.signal(signum)
            assert server.wait(timeout=10) == 128 + signum
            assert time.monotonic() - started < 5
    finally:
        if server.returncode is None:
            server.proc.kill()
            server.wait()
    assert f"second {signal.Signals(signum).name}: exiting now" in server.stderr


def test_port_already_in_use_is_one_line_and_exit_1():
    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    with holder:
        result = run_server_command("--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 1
    assert (
        result.stderr.strip() == f"error: cannot listen on 127.0.0.1:{port}: address already in use"
    )
    assert result.stdout == ""


def test_go_style_port_and_default_host():
    port = free_port()
    with start_server("--port", f":{port}", "--host", "0.0.0.0") as server:
        assert server.port == port
        assert exchange(port, 2) == (2,)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "abc"], "--port: must be a port number"),
        (["--port", "70000"], "--port: port must be between 0 and 65535"),
        (["--multiplier", "0"], "--multiplier: must be a positive integer"),
        (["--multiplier", "many"], "--multiplier: must be"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout: must be a number of seconds >= 0"),
        (["--log-level", "loud"], "--log-level: must be one of"),
        (["--bogus"], "error:"),
        (["--port", "1", "extra", "argument"], "error: unexpected arguments: extra argument"),
        (["--port", "9100", "--metrics-port", "9100"],
         "--metrics-port 9100: --port uses it; choose another"),
        (["--backend", "redis:/:pw@host"],
         "--backend: '***@host' is not a URL (SCHEME://...), nor memory"),
    ],
)  # fmt: skip
def test_bad_flags_give_one_line_and_usage_and_exit_2(args, message):
    result = run_server_command(*args)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0].startswith("server.py: error: ")
    assert message in lines[0]
    assert "Usage:" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_help_exits_0():
    result = run_server_command("--help")
    assert result.returncode == 0
    assert "--multiplier N" in result.stdout and "--shutdown-timeout" in result.stdout


def test_runs_from_another_directory_with_a_relative_path():
    tests_dir = REPO_ROOT / "tests"
    with start_server(cwd=tests_dir, script=os.path.join("..", "server", "server.py")) as server:
        assert exchange(server.port, 1) == (1,)


def help_of_module(module: str) -> subprocess.CompletedProcess:
    """``python -m MODULE --help`` from the repository root."""
    return subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def test_runs_as_a_module_from_the_repo_root():
    proc = help_of_module("counter_server.server.server")
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout


def test_the_package_under_a_second_name_is_refused_in_one_line():
    proc = help_of_module("server.server")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "python -m counter_server.server" in proc.stderr


def test_counter_state_is_per_process(server):
    # A fresh server starts from zero (no hidden state between runs).
    assert read_counter(server.port) == 0
