"""Prometheus metrics, /healthz and JSON logs, against a real server process."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from counter_server.protocol import MAX_COUNTER
from support import (
    VECTORS,
    connect,
    frames,
    http_get,
    recv_replies,
    recv_until_closed,
    run_server_command,
    stall_server,
    start_server,
    wait_until,
)


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(server.metrics_url(), timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples[(f"counter_server_{name}", tuple(sorted(labels.items())))]


@pytest.fixture
def metered():
    server = start_server("--metrics-port", "0", "--multiplier", "5")
    yield server
    if server.returncode is None:
        server.stop()
    assert "Traceback" not in server.stderr


def test_scraped_figures_equal_what_the_clients_did(metered):
    with connect(metered.port) as sock:
        sock.sendall(frames(*[1] * 100))
        assert recv_replies(sock, 100)[-1] == 100
    with connect(metered.port) as sock:
        sock.sendall(frames(1, 1, 1) + bytes.fromhex(VECTORS["tampered"][1]["frame_hex"]))
        assert len(recv_until_closed(sock)) == 3 * 8
    with connect(metered.port) as sock:
        sock.sendall(frames(5) + b"\0" * 7)
        sock.shutdown(socket.SHUT_WR)
        assert len(recv_until_closed(sock)) == 8
    with connect(metered.port) as sock:
        sock.sendall(frames(MAX_COUNTER))
        assert recv_until_closed(sock) == b""

    deadline = time.monotonic() + 10
    while metric(samples := scrape(metered), "connections_closed_total", reason="refused") < 2:
        assert time.monotonic() < deadline, "connections were not closed"
        time.sleep(0.1)
    assert metric(samples, "requests_applied_total") == 104
    assert metric(samples, "value") == 108
    assert metric(samples, "rejected_frames_total", reason="checksum") == 1
    assert metric(samples, "rejected_frames_total", reason="truncated") == 1
    assert metric(samples, "rejected_frames_total", reason="overflow") == 1
    assert metric(samples, "connections_accepted_total") == 4
    assert metric(samples, "connections_active") == 0
    assert metric(samples, "connections_closed_total", reason="peer_closed") == 2
    assert metric(samples, "connections_closed_total", reason="refused") == 2
    assert metric(samples, "received_bytes_total") == 1600 + 64 + 23 + 16
    assert metric(samples, "sent_bytes_total") == 104 * 8
    assert metric(samples, "replies_per_write_sum") == 104
    writes = metric(samples, "replies_per_write_count")
    assert 3 <= writes <= 104
    assert metric(samples, "replies_per_write_bucket", le="+Inf") == writes
    assert metric(samples, "replies_per_write_bucket", le="1") >= 1  # the lone frame(5)
    assert metric(samples, "pool_size") == metered.pool_size
    assert samples[("process_resident_memory_bytes", ())] > 1_000_000
    assert ("process_cpu_seconds_total", ()) in samples


def test_pool_in_use_counts_open_connections(metered):
    held = [connect(metered.port) for _ in range(3)]
    try:
        for sock in held:
            sock.sendall(frames(0))
            recv_replies(sock, 1)
        samples = scrape(metered)
        assert metric(samples, "pool_in_use") == 3
        assert metric(samples, "connections_active") == 3
    finally:
        for sock in held:
            sock.close()


def test_healthz_flips_to_503_when_shutdown_begins():
    server = start_server("--metrics-port", "0", "--shutdown-timeout", "30")
    try:
        assert http_get(server.metrics_url("/healthz")) == (200, "ok\n")
        assert http_get(server.metrics_url("/nowhere"))[0] == 404
        with stall_server(server.port):
            server.signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while http_get(server.metrics_url("/healthz"))[0] != 503:
                assert time.monotonic() < deadline, "/healthz never reported the shutdown"
                time.sleep(0.1)
            assert http_get(server.metrics_url("/healthz")) == (503, "stopping\n")
            assert metric(scrape(server), "connections_active") == 1
        assert server.wait() == 0
    finally:
        if server.returncode is None:
            server.stop()


def listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = str(fd.readlink()) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_no_extra_port_without_metrics(server):
    assert listening_ports(server.proc.pid) == {server.port}


def test_metrics_port_is_the_only_extra_port(metered):
    metrics_port = int(metered.metrics_url().rsplit(":", 1)[1].split("/")[0])
    assert listening_ports(metered.proc.pid) == {metered.port, metrics_port}


@pytest.mark.parametrize("bad", ["http", "-5", "99999"])
def test_bad_metrics_port_is_a_usage_error(bad):
    result = run_server_command("--metrics-port", bad)
    assert result.returncode == 2
    assert result.stderr.startswith("server.py: error: --metrics-port:")
    assert "Usage:" in result.stderr


def test_metrics_port_in_use_is_one_line_and_exit_1():
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        result = run_server_command("--port", "0", "--metrics-port", str(port))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: cannot listen on 127.0.0.1:{port}: address already in use"
    )


def test_json_log_format():
    server = start_server("--log-format", "json")
    with connect(server.port) as sock:
        sock.sendall(b"x" * 16)
        recv_until_closed(sock)
    server.stop()
    records = [json.loads(line) for line in server.stderr.splitlines()]
    assert records, "no log lines"
    assert {"time", "level", "logger", "message"} <= set(records[0])
    messages = [r["message"] for r in records]
    assert any(m.startswith("started: listening on 127.0.0.1:") for m in messages)
    assert any("refused frame from 127.0.0.1:" in m and "(checksum)" in m for m in messages)
    assert any(m.startswith("stopped: 0 requests applied") for m in messages)
    # ISO 8601 in UTC, and the event's facts as fields of their own.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", records[0]["time"])
    started = next(r for r in records if r["message"].startswith("started"))
    assert started["pool_size"] == server.pool_size and started["pid"] == server.pid
    refused = next(r for r in records if "refused frame" in r["message"])
    assert refused["reason"] == "checksum" and refused["peer"].startswith("127.0.0.1:")
    stopped = next(r for r in records if r["message"].startswith("stopped"))
    assert stopped["requests_applied"] == 0 and stopped["value"] == 0


def test_suppressed_log_lines_are_counted_at_stop():
    server = start_server("--log-format", "json")
    for _ in range(8):  # five lines per reason per 10 s, then suppressed
        with connect(server.port) as sock:
            sock.sendall(b"x" * 16)
            recv_until_closed(sock)
    server.stop()
    records = [json.loads(line) for line in server.stderr.splitlines()]
    refused = [r for r in records if "refused frame" in r["message"]]
    summary = [r for r in records if r.get("event") == "checksum"]
    assert len(refused) == 5
    assert summary and summary[0]["suppressed"] == 3, records


def test_bad_log_format_is_a_usage_error():
    result = run_server_command("--log-format", "xml")
    assert result.returncode == 2
    assert "--log-format: must be text or json" in result.stderr


def test_metrics_answer_while_the_process_is_out_of_descriptors():
    # The moment the accept-error alert needs /metrics: every descriptor the
    # server may open is taken by client connections.
    server = start_server("--multiplier", "100", "--metrics-port", "0", max_files=40)
    clients = []
    try:
        for _ in range(60):
            clients.append(connect(server.port))
        wait_until(
            lambda: "cannot accept connections" in server.stderr_path.read_text(),
            10,
            "the server out of descriptors",
        )
        for _ in range(3):  # and again: the reserve is taken back after each scrape
            status, body = http_get(server.metrics_url())
            assert status == 200 and "counter_server_accept_errors_total" in body
            assert metric(scrape(server), "accept_errors_total") > 0
    finally:
        for sock in clients:
            sock.close()
        server.stop()
    assert "Traceback" not in server.stderr


def test_idle_connections_to_the_metrics_port_cannot_keep_a_health_probe_out(metered):
    """Each HTTP connection may live 5 s and 16 are served at once: 100
    connections that never send a request kept /healthz unanswered for
    half a minute; the one waiting longest now gives way to a newcomer."""
    port = int(metered.metrics_url().rsplit(":", 1)[1].split("/")[0])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(100)]
    try:
        started = time.monotonic()
        assert http_get(metered.metrics_url("/healthz")) == (200, "ok\n")
        took = time.monotonic() - started
        assert took < 3.0, f"/healthz answered after {took:.1f}s behind idle connections"
    finally:
        for sock in idle:
            sock.close()
