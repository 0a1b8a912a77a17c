"""The load client against a real server, and against servers that misbehave."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from contextlib import suppress

import pytest

from counter_server.protocol import MAX_COUNTER
from support import (
    CLIENT_SCRIPT,
    StandIn,
    exchange,
    read_counter,
    run_client,
    start_client,
    start_server,
)

REPORT_FIELDS = {
    "server": str,
    "started_at": float,
    "finished_at": float,
    "connections": int,
    "connections_failed": int,
    "pipeline": int,
    "increment": int,
    "duration_s": float,
    "requests_sent": int,
    "requests_acknowledged": int,
    "increments_acknowledged": int,
    "errors": dict,
    "errors_total": int,
    "replies_per_second": float,
    "latency_us": dict,
    "last_counter_value": int,
}


def address(server) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.mark.parametrize(("pipeline", "value"), [(1, 1), (16, 1), (4, 5)])
def test_reported_totals_equal_the_counter_delta(server, pipeline, value):
    before = read_counter(server.port)
    result = run_client(
        "--serverAddress", address(server), "--duration", "1", "--multiplier", "2",
        "--pipeline", str(pipeline), "--value", str(value), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    after = read_counter(server.port)
    assert report["errors_total"] == 0
    assert report["requests_acknowledged"] == report["requests_sent"] > 0
    assert report["increments_acknowledged"] == report["requests_acknowledged"] * value
    assert after - before == report["increments_acknowledged"]
    assert report["last_counter_value"] == after


def test_json_report_fields(server):
    result = run_client("--serverAddress", address(server), "--duration", "0.5", "--json")
    report = json.loads(result.stdout)
    for name, kind in REPORT_FIELDS.items():
        assert isinstance(report[name], kind), (name, report[name])
    assert set(report["errors"]) == {
        "refused", "closed", "short_reply", "not_increasing", "timeout", "extra_reply", "tls",
    }  # fmt: skip
    latency = report["latency_us"]
    assert list(latency) == ["p50", "p90", "p99", "p99_9", "max"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99_9"]
    assert latency["p99_9"] <= latency["max"] * 1.001
    assert report["finished_at"] - report["started_at"] == pytest.approx(
        report["duration_s"], abs=0.01
    )


def test_text_report(server):
    result = run_client("--serverAddress", address(server), "--duration", "0.5")
    assert result.returncode == 0, result.stderr
    for label in ("requests acknowledged", "throughput", "errors", "latency (ms)", "p99.9"):
        assert label in result.stdout
    assert "errors                 0 (none)" in result.stdout


def test_get_prints_the_counter(server):
    run_client("--serverAddress", address(server), "--duration", "0.3")
    result = run_client("--get", "--serverAddress", f":{server.port}")
    assert result.returncode == 0
    assert int(result.stdout) == read_counter(server.port) > 0


def unused_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


def test_refused_port_is_one_clear_line():
    port = unused_port()
    result = run_client("--serverAddress", f"127.0.0.1:{port}", "--duration", "1", "--json")
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: 127.0.0.1:{port}: connect: connection refused"
    report = json.loads(result.stdout)
    assert report["errors"]["refused"] == report["connections"]
    assert report["requests_acknowledged"] == 0


def test_get_against_a_refused_port():
    port = unused_port()
    result = run_client("--get", "--serverAddress", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: cannot read the counter from 127.0.0.1:{port}: connection refused"
    )


def test_unresolvable_host():
    result = run_client("--serverAddress", "no-such-host.invalid:8080", "--duration", "1")
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot resolve no-such-host.invalid")
    assert "Traceback" not in result.stderr


def test_server_killed_mid_run_gives_partial_results():
    server = start_server()
    client = start_client("--serverAddress", address(server), "--duration", "20", "--json")
    time.sleep(2.5)
    server.signal(signal.SIGKILL)
    server.wait()
    out, err = client.communicate(timeout=30)
    assert client.returncode == 1
    assert "Traceback" not in err
    report = json.loads(out)
    assert report["requests_acknowledged"] > 0
    assert report["errors"]["closed"] + report["errors"]["refused"] > 0
    assert report["connections_failed"] == report["connections"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--serverAddress", "nohostport"], "--serverAddress: the port is missing"),
        (["--multiplier", "0"], "--multiplier: must be a positive integer"),
        (["--duration", "soon"], "--duration: must be a number"),
        (["--pipeline", "-3"], "--pipeline: must be a positive integer"),
        (["--value", "-1"], "--value: must be an integer from 0 to 2^64-1"),
        (["--value", str(2**64)], "--value: must be an integer from 0 to 2^64-1"),
        (["--timeout", "0"], "--timeout: must be a number of seconds > 0"),
        (["--frobnicate"], "error:"),
    ],
)
def test_bad_flags_exit_2(args, message):
    result = run_client(*args)
    assert result.returncode == 2
    assert message in result.stderr.splitlines()[0]
    assert "Usage:" in result.stderr and "Traceback" not in result.stderr


# --- servers that misbehave: the client must notice and say what went wrong ---


def decreasing(conn: socket.socket) -> None:
    value = 1000
    while conn.recv(16):
        value = max(value - 1, 0)
        conn.sendall(struct.pack(">Q", value))


def short_then_close(conn: socket.socket) -> None:
    conn.recv(16)
    conn.sendall(b"\0\0\0")


def silent(conn: socket.socket) -> None:
    while conn.recv(16):
        pass


def never_reads(conn: socket.socket) -> None:
    time.sleep(3)


def too_many(conn: socket.socket) -> None:
    conn.recv(16)
    conn.sendall(struct.pack(">QQ", 1, 2))
    time.sleep(1)


@pytest.mark.parametrize(
    ("behaviour", "kind", "extra"),
    [
        (decreasing, "not_increasing", []),
        (short_then_close, "short_reply", []),
        (silent, "timeout", ["--timeout", "1"]),
        (never_reads, "timeout", ["--timeout", "1", "--pipeline", "2000000"]),
        (too_many, "extra_reply", []),
    ],
)
def test_misbehaving_server_is_counted_by_kind(behaviour, kind, extra):
    with StandIn(behaviour) as stand_in:
        result = run_client(
            "--serverAddress", stand_in.address, "--multiplier", "1", "--duration", "0.5",
            "--json", *extra,
        )  # fmt: skip
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["errors"][kind] > 0, report
    assert "Traceback" not in result.stderr


def test_sigint_stops_early_and_still_reports_everything_owed(server):
    client = start_client(
        "--serverAddress", address(server), "--duration", "30", "--pipeline", "8", "--json"
    )
    time.sleep(2.5)
    client.send_signal(signal.SIGINT)
    out, err = client.communicate(timeout=30)
    assert client.returncode == 130, err
    assert "Traceback" not in err
    report = json.loads(out)
    assert report["interrupted"] is True
    assert report["duration_s"] < 20
    assert report["errors_total"] == 0
    assert report["requests_acknowledged"] == report["requests_sent"] > 0
    assert read_counter(server.port) == report["increments_acknowledged"]


def test_progress_line_on_a_terminal(server):
    import pty

    controller, terminal = pty.openpty()
    client = subprocess.Popen(
        [sys.executable, str(CLIENT_SCRIPT), "--serverAddress", address(server),
         "--duration", "2.5", "--multiplier", "1"],
        stdout=subprocess.PIPE, stderr=terminal, text=True,
    )  # fmt: skip
    os.close(terminal)
    out, _ = client.communicate(timeout=30)
    progress = b""
    with suppress(OSError):  # EIO once the pty is drained and closed
        while chunk := os.read(controller, 4096):
            progress += chunk
    os.close(controller)
    assert client.returncode == 0
    lines = [line for line in progress.decode().splitlines() if "replies/s" in line]
    assert len(lines) >= 2, progress
    assert re.search(r"\[\s*\d+\.\ds\] [\d,]+ replies/s, [\d,]+ acknowledged, 0 errors", lines[0])
    assert "requests acknowledged" in out


def test_no_progress_line_when_not_on_a_terminal(server):
    result = run_client("--serverAddress", address(server), "--duration", "1.5")
    assert "replies/s," not in result.stderr


def test_a_refused_overflow_is_not_blamed_on_tls(server):
    exchange(server.port, MAX_COUNTER - 1)
    result = run_client("--serverAddress", f"127.0.0.1:{server.port}", "--multiplier", "1",
                        "--duration", "1", "--json")  # fmt: skip
    report = json.loads(result.stdout)
    first = report["first_error"]
    assert "--tls" not in first and "--tls" not in result.stderr, first
    assert "after 1 reply, with 1 reply owed" in first or "after 0 replies" in first, first
    assert "check the server's log for the reason" in first


def test_an_http_server_is_recognised():
    # An HTTP server that answers anything it cannot parse with a 400.
    def answer(conn: socket.socket) -> None:
        conn.recv(64)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    with StandIn(answer) as http:
        result = run_client("--serverAddress", http.address,
                            "--multiplier", "1", "--duration", "1", "--json")  # fmt: skip
        first = json.loads(result.stdout)["first_error"]
        assert "answered in HTTP: is this the metrics port?" in first and "--tls" not in first
