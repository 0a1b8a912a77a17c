"""--backend redis://...: instances sharing one counter in a real redis-server
that each test starts on loopback (.ci/run installs redis-server)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from counter_server.protocol import decode_replies
from support import (
    Load,
    RedisServer,
    assert_exact,
    connect,
    exchange,
    frames,
    http_get,
    recv_replies,
    recv_until_closed,
    run_server_command,
    start_client,
    start_server,
    wait_until,
)

pytestmark = pytest.mark.needs("redis-server")
REDIS_MAX = 2**63 - 1


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


def test_two_instances_share_one_exact_counter(redis_server):
    first = start_server("--backend", redis_server.url(), "--multiplier", "50")
    second = start_server("--backend", redis_server.url(), "--multiplier", "50")
    try:
        replies: list[int] = []
        lock = threading.Lock()

        def client(port: int, pipelined: bool) -> None:
            got = []
            with connect(port) as sock:
                for _ in range(10):
                    if pipelined:
                        sock.sendall(frames(*[1] * 5))
                        got.extend(recv_replies(sock, 5))
                    else:
                        sock.sendall(frames(1))
                        got.extend(recv_replies(sock, 1))
            with lock:
                replies.extend(got)

        threads = [
            threading.Thread(daemon=True, target=client, args=(server.port, i % 2 == 0))
            for i in range(60)
            for server in [(first, second)[i % 2]]
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(replies) == list(range(1, len(replies) + 1))
        assert len(replies) == 30 * 50 + 30 * 10
        assert redis_server.cli("get", "counter") == str(len(replies))
    finally:
        first.stop()
        second.stop()
    assert first.totals[1] == len(replies)
    assert "Traceback" not in first.stderr + second.stderr


def test_redis_killed_and_restarted_loses_nothing_acknowledged(redis_server):
    server = start_server("--backend", redis_server.url())
    load = Load([server.port], 8)
    try:
        wait_until(lambda: len(load.replies) > 100, 10, "acknowledging")
        before_outage = len(load.replies)
        redis_server.kill()
        time.sleep(1.0)
        redis_server.start()  # the AOF brings the counter back
        wait_until(lambda: len(load.replies) > before_outage + 100, 10,
                   "replies after Redis came back")  # fmt: skip
        load.finish()
        final = int(redis_server.cli("get", "counter"))
        assert_exact(load.verdict(0, final))
        assert load.unanswered > 0, "the outage cut no round trip: the test proves nothing"
        assert exchange(server.port, 0) == (final,)
    finally:
        load.finish()
        server.stop()
    assert "Redis" in server.stderr
    assert "closed: backend unavailable" in server.stderr or "not acknowledged" in server.stderr
    assert "Traceback" not in server.stderr


def test_unreachable_redis_closes_without_reply_then_recovers(tmp_path):
    redis_server = RedisServer(tmp_path)  # not started yet
    server = start_server("--backend", redis_server.url())
    try:
        with connect(server.port, timeout=30) as sock:
            started = time.monotonic()
            sock.sendall(frames(1))
            assert recv_until_closed(sock) == b"", "a reply for an unconfirmed increment"
            assert time.monotonic() - started < 15, "the retries were not bounded"
        redis_server.start()
        assert exchange(server.port, 1) == (1,)
    finally:
        server.stop()
        if redis_server.proc is not None:
            redis_server.kill()
    assert "closed: backend unavailable" in server.stderr


def test_overflow_at_the_redis_limit_applies_the_frames_that_fit(redis_server):
    redis_server.cli("set", "counter", str(REDIS_MAX - 3))
    with start_server("--backend", redis_server.url()) as server:
        assert exchange(server.port, 1) == (REDIS_MAX - 2,)
        with connect(server.port) as sock:
            sock.sendall(frames(1, 1, 1, 1))
            assert decode_replies(recv_until_closed(sock)) == (REDIS_MAX - 1, REDIS_MAX)
        assert redis_server.cli("get", "counter") == str(REDIS_MAX)
        with connect(server.port) as sock:
            sock.sendall(frames(2**63))  # beyond what Redis can hold at all
            assert recv_until_closed(sock) == b""
        assert exchange(server.port, 0) == (REDIS_MAX,)
    assert "overflow" in server.stderr
    assert "counts up to 2^63 - 1 (Redis's integer range)" in server.stdout + server.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "http://x"], "--backend: unknown scheme 'http://': expected redis://"),
        (["--backend", "redis://h:1/db"], "--backend: the database must be a number"),
        (["--backend", "redis+sentinel://h:1"], "--backend: the Sentinel service name is missing"),
        (["--backend", "redis+sentinel://h:1,h:2//0"], "--backend: the Sentinel service name"),
        (["--backend", "redis://h:1,h:2/0"], "--backend: several hosts need redis+sentinel://"),
        (["--backend", "redis://h:1/0?ca=x"], "--backend: ca= needs rediss://"),
        (["--backend", "redis://h:1/0?replicas=x"], "--backend: replicas= (a whole number or all)"),
        (["--backend", "redis://h:1/0?color=red"], "--backend: unknown option color="),
        (["--backend", "redis://h:1/0", "--state-file", "s"], "choose one"),
    ],
)
def test_bad_backend_flags(args, message):
    result = run_server_command(*args)
    assert result.returncode == 2
    assert message in result.stderr.splitlines()[0]


def test_healthz_is_503_while_redis_is_unreachable_and_recovers_by_itself(redis_server):
    server = start_server("--backend", redis_server.url(), "--metrics-port", "0")
    healthz = server.metrics_url("/healthz")
    try:
        assert exchange(server.port, 1) == (1,)
        assert http_get(healthz) == (200, "ok\n")
        redis_server.kill()
        with connect(server.port, timeout=30) as sock:
            sock.sendall(frames(1))
            assert recv_until_closed(sock) == b""
        status, body = http_get(healthz)
        assert status == 503 and body.startswith("Redis"), (status, body)
        redis_server.start()  # no traffic: the server notices by itself
        deadline = time.monotonic() + 10
        while http_get(healthz)[0] != 200:
            assert time.monotonic() < deadline, "/healthz did not recover"
            time.sleep(0.1)
        assert exchange(server.port, 1)[0] >= 2
    finally:
        server.stop()


def test_tls_and_plain_clients_of_redis_backed_instances_share_one_exact_counter(redis_server, pki):
    """TLS connections wait for their round trip and write their own replies;
    plain ones have them written by the flusher (server.connection.Outbox): both at once,
    pipelined and ping-pong, against two instances."""
    tls = start_server(
        "--backend", redis_server.url(), "--tls-cert", pki["server_cert"],
        "--tls-key", pki["server_key"],
    )  # fmt: skip
    plain = start_server("--backend", redis_server.url())
    settings = [("--tls", "--tls-ca", pki["ca"]), ()]
    try:
        runs = []
        for server, extra in zip((tls, plain), settings, strict=True):
            for pipeline in ("1", "8"):
                address = f"127.0.0.1:{server.port}"
                args = ["--serverAddress", address, "--multiplier", "2", "--duration", "1.5"]
                runs.append(start_client(*args, "--pipeline", pipeline, "--json", *extra))
        reports = []
        for run in runs:
            out, err = run.communicate(timeout=60)
            assert run.returncode == 0, err
            reports.append(json.loads(out))
    finally:
        tls.stop()
        plain.stop()
    acknowledged = sum(r["increments_acknowledged"] for r in reports)
    assert all(r["requests_acknowledged"] > 0 and r["errors_total"] == 0 for r in reports)
    assert redis_server.cli("get", "counter") == str(acknowledged)
    assert tls.totals[0] + plain.totals[0] == acknowledged
    assert "Traceback" not in tls.stderr + plain.stderr
