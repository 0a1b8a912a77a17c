"""The Redis backend beyond one plain server: passwords and ACL users, TLS,
Sentinel failover with replica acknowledgement, --processes, and one INCRBY
per flush. Every Redis here is a real redis-server (or redis-sentinel) on
loopback, started and stopped by the test."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from support import (
    Load,
    RedisServer,
    Sentinel,
    Tally,
    assert_exact,
    closed_without_reply,
    connect,
    documented,
    exchange,
    frames,
    free_port,
    http_get,
    metric,
    run_server_command,
    start_server,
    try_increment,
    wait_until,
)

pytestmark = pytest.mark.needs("redis-server", "redis-sentinel")


# --- passwords, ACL users, TLS ---------------------------------------------------------


def test_a_password_and_an_acl_user(tmp_path):
    redis = RedisServer(
        tmp_path, "--requirepass", "s3cret", "--user", "counter", "on", ">pw", "~*", "&*",
        "+@all", password="s3cret",
    )  # fmt: skip
    redis.start()
    try:
        for userinfo in (":s3cret", "counter:pw"):
            with start_server(
                "--backend", f"redis://{userinfo}@127.0.0.1:{redis.port}/0"
            ) as server:
                assert exchange(server.port, 2)[0] >= 2
            assert "s3cret" not in server.stdout + server.stderr  # never printed
        wrong = run_server_command("--backend", f"redis://counter:nope@127.0.0.1:{redis.port}/0")
        assert wrong.returncode == 1
        assert wrong.stderr.count("\n") == 1, wrong.stderr
        assert "authentication failed" in wrong.stderr and "nope" not in wrong.stderr
        assert "Traceback" not in wrong.stderr
        assert redis.cli("get", "counter") == "4"
    finally:
        redis.kill()


def test_a_password_changed_under_a_running_server_is_not_called_unreachable(tmp_path):
    redis = RedisServer(tmp_path, "--requirepass", "s3cret", password="s3cret")
    redis.start()
    url = f"redis://:s3cret@127.0.0.1:{redis.port}/0"
    server = start_server("--backend", url, "--metrics-port", "0")
    try:
        assert exchange(server.port, 1) == (1,)
        redis.cli("config", "set", "requirepass", "changed")
        redis.password = "changed"
        redis.cli("client", "kill", "type", "normal")  # its connections log in again
        wait_until(lambda: http_get(server.metrics_url("/healthz"))[0] == 503, 10, "unhealthy")
        body = http_get(server.metrics_url("/healthz"))[1]
        assert "unreachable" not in body and "invalid username-password" in body, body
        redis.cli("config", "set", "requirepass", "s3cret")
        redis.password = "s3cret"
        wait_until(lambda: http_get(server.metrics_url("/healthz"))[0] == 200, 10, "healthy")
        assert exchange(server.port, 1) == (2,)
    finally:
        server.stop()
        redis.kill()
    assert "reachable" not in server.stderr, server.stderr
    assert "s3cret" not in server.stdout + server.stderr


def tls_redis(directory, pki) -> tuple[RedisServer, int]:
    """A started redis-server with a plain port and a TLS one (its port)."""
    tls_port = free_port()
    redis = RedisServer(
        directory, "--tls-port", str(tls_port), "--tls-cert-file", pki["server_cert"],
        "--tls-key-file", pki["server_key"], "--tls-ca-cert-file", pki["ca"],
        "--tls-auth-clients", "no",
    )  # fmt: skip
    redis.start()
    return redis, tls_port


def test_tls_to_redis_with_a_ca(tmp_path, pki):
    redis, tls_port = tls_redis(tmp_path, pki)
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0?key=tls&ca={pki['ca']}"
        with start_server("--backend", url) as server:
            assert exchange(server.port, 5) == (5,)
        assert redis.cli("get", "tls") == "5"
        untrusted = run_server_command(
            "--backend", f"rediss://127.0.0.1:{tls_port}/0?ca={pki['stranger_ca']}"
        )
        assert untrusted.returncode == 1
        assert "TLS failed" in untrusted.stderr and untrusted.stderr.count("\n") == 1
    finally:
        redis.kill()


# --- one INCRBY per flush ------------------------------------------------------------------


def test_a_flush_is_one_incrby_whatever_the_reads(tmp_path):
    redis = RedisServer(tmp_path)
    redis.start()
    server = start_server("--backend", redis.url(), "--metrics-port", "0", "--multiplier", "20")
    try:
        redis.cli("config", "resetstat")
        threads = [
            threading.Thread(
                daemon=True, target=lambda: [exchange(server.port, 1, 1, 1) for _ in range(50)]
            )
            for _ in range(10)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert redis.cli("get", "counter") == str(10 * 50 * 3)
        stats = redis.cli("info", "commandstats")
        incrby = int(stats.split("cmdstat_incrby:calls=")[1].split(",")[0])
        trips = metric(server.metrics_url(), "counter_server_backend_round_trips_total")
        reads = metric(server.metrics_url(), "counter_server_backend_reads_batched_total")
        assert "cmdstat_multi" not in stats  # no transaction per read any more
        assert incrby == trips  # one INCRBY per round trip
        assert reads == 500 and trips <= reads
    finally:
        server.stop()
        redis.kill()


# --- --processes with the backend and one metrics endpoint ---------------------------------


def test_processes_share_redis_and_serve_one_metrics_endpoint(tmp_path):
    redis = RedisServer(tmp_path)
    redis.start()
    server = start_server(
        "--processes", "2", "--backend", redis.url(), "--metrics-port", "0", "--multiplier", "10"
    )
    try:
        replies = [exchange(server.port, 1)[0] for _ in range(40)]
        assert sorted(replies) == list(range(1, 41))

        def applied() -> float:
            return metric(server.metrics_url(), "counter_server_requests_applied_total")

        # The workers publish their figures twice a second.
        wait_until(lambda: applied() == 40, 10, "the workers' figures")
        os.kill(server.ready.workers[0], signal.SIGKILL)  # its counts must not vanish
        for _ in range(10):  # nor dip while the parent retires it
            assert applied() >= 40
            time.sleep(0.1)
        assert http_get(server.metrics_url("/healthz")) == (200, "ok\n")
        wait_until(lambda: exchange(server.port, 1)[0] > 40, 10, "served after the restart")
    finally:
        assert server.stop() == 0
    applied_total, final = server.totals
    assert final == int(redis.cli("get", "counter")) >= 41
    assert applied_total >= 41
    redis.kill()


# --- Sentinel failover --------------------------------------------------------------------


@contextlib.contextmanager
def replicated_set(tmp_path: Path):
    """A primary, two replicas in sync and three sentinels watching them:
    (primary, replicas, sentinels); all killed at the end."""
    # No delay before a replica's first sync (Redis 7 waits 5 s by default).
    fast_sync = ("--repl-diskless-sync-delay", "0")
    (tmp_path / "primary").mkdir()
    primary = RedisServer(tmp_path / "primary", *fast_sync)
    primary.start()
    replicas, sentinels = [], []
    try:
        for name in ("replica-1", "replica-2"):
            (tmp_path / name).mkdir()
            replica = RedisServer(
                tmp_path / name, "--replicaof", "127.0.0.1", str(primary.port), *fast_sync
            )
            replica.start()
            replicas.append(replica)
        wait_until(
            lambda: primary.cli("info", "replication").count("state=online") == 2,
            15,
            "both replicas in sync",
        )
        sentinels = [Sentinel(tmp_path, primary, "sentinel parallel-syncs primary 2")
                     for _ in range(3)]  # fmt: skip
        wait_until(lambda: all(s.primary() == primary.address for s in sentinels), 15,
                   "sentinels watching")  # fmt: skip
        yield primary, replicas, sentinels
    finally:
        for process in [*sentinels, primary, *replicas]:
            process.kill()  # resumed first if a test stopped it


def promoted(sentinels, old: RedisServer) -> bool:
    return any(s.primary() not in (None, old.address) for s in sentinels)


def check_history(load: Load, nodes, sentinels, since: float) -> tuple[int, float]:
    """The checker's verdict (both bounds) against the primary the sentinels
    name, once every other live node of ``nodes`` has become a replica (a
    demoted primary keeps taking writes until then); (replies, longest time
    without acknowledgements after ``since``)."""
    named = next(address for s in sentinels if (address := s.primary()))
    primary = next(node for node in nodes if node.address == named)
    wait_until(lambda: all("role:master" not in node.cli("info", "replication")
                           for node in nodes if node is not primary and node.proc.poll() is None),
               30, "one primary left")  # fmt: skip
    assert_exact(load.verdict(0, int(primary.cli("get", "counter"))))
    times = sorted(t for t, _ in load.replies)
    before = [t for t in times if t < since]
    after = [t for t in times if t >= since]
    assert before and after
    return len(times), max(b - a for a, b in itertools.pairwise([before[-1], *after]))


@contextlib.contextmanager
def counting_through_sentinels(tmp_path: Path, query: str, instances: int = 2,
                               connections: int = 8):  # fmt: skip
    """A replicated set, ``instances`` servers on its sentinels (``query``
    added to the URL) and a Load over them: (primary, replicas, sentinels,
    load, servers). The load is finished and the servers stopped at the end."""
    servers, load = [], None
    with replicated_set(tmp_path) as (primary, replicas, sentinels):
        try:
            hosts = ",".join(f"127.0.0.1:{s.port}" for s in sentinels)
            url = f"redis+sentinel://{hosts}/primary/0?key=counter{query}"
            servers = [start_server("--backend", url, "--multiplier", "10")
                       for _ in range(instances)]  # fmt: skip
            load = Load([server.port for server in servers], connections)
            yield primary, replicas, sentinels, load, servers
        finally:
            if load is not None:
                load.finish()
            for server in servers:
                server.stop()


def serving_again(load: Load, sentinels, old: RedisServer, since: float) -> None:
    """Wait until a replica is promoted and the load is acknowledged again
    (steadily, a second after ``since``), without a restart."""
    wait_until(lambda: promoted(sentinels, old), 30, "a replica promoted")
    wait_until(lambda: load.last_reply() > max(time.monotonic() - 0.5, since + 1), 40,
               "the servers acknowledging again (without a restart)")  # fmt: skip


def test_sentinel_failover_keeps_every_acknowledged_increment(tmp_path):
    with counting_through_sentinels(tmp_path, "&replicas=1") as (
        primary, replicas, sentinels, load, _
    ):  # fmt: skip
        wait_until(lambda: len(load.replies) > 200, 10, "acknowledging")
        killed_at = time.monotonic()
        primary.kill()
        serving_again(load, sentinels, primary, killed_at)
        load.finish()
        replies, gap = check_history(load, [primary, *replicas], sentinels, killed_at)
    print(f"\nfailover: {replies} replies acknowledged, none twice; "
          f"service interrupted for {gap:.1f}s")  # fmt: skip


@pytest.mark.parametrize("replicas", ["", "&replicas=all"], ids=["default", "all"])
def test_a_planned_failover_loses_nothing_with_the_default(tmp_path, replicas):
    # SENTINEL FAILOVER: the old primary takes writes until the sentinels
    # demote it, and with replicas=1 the other replica, still attached to it,
    # satisfies WAIT 1 (replicas=0 waits for nothing); those increments are
    # gone once it resyncs from the new primary. The default for Sentinel
    # waits for every replica the sentinels know, the promoted one included.
    with counting_through_sentinels(tmp_path, replicas) as (
        primary, replicas_, sentinels, load, servers
    ):  # fmt: skip
        wait_until(lambda: len(load.replies) > 200, 10, "acknowledging")
        failover_at = time.monotonic()
        answer = sentinels[0].cli("sentinel", "failover", "primary")
        assert answer == "OK", answer
        serving_again(load, sentinels, primary, failover_at)
        load.finish()
        replies, gap = check_history(load, [primary, *replicas_], sentinels, failover_at)
    print(f"\nplanned failover: {replies} replies; {gap:.1f}s without acknowledgements")
    line = servers[0].stdout + servers[0].stderr  # stopped: the output it collected
    assert "replies wait for every replica the sentinels know (replicas=all)" in line


def test_a_hung_primary_and_a_hung_sentinel_cost_seconds_not_ten(tmp_path):
    # The primary's host stops answering (SIGSTOP: connections open, nothing
    # answered), and so does the first sentinel of the URL: acknowledgements
    # resume within 3 s of the promotion (5 s socket timeouts cost 10 s).
    with counting_through_sentinels(tmp_path, "&replicas=1", 1, 4) as (
        primary, replicas, sentinels, load, servers
    ):  # fmt: skip
        wait_until(lambda: len(load.replies) > 100, 10, "acknowledging")
        hung_at = time.monotonic()
        os.kill(sentinels[0].proc.pid, signal.SIGSTOP)
        os.kill(primary.proc.pid, signal.SIGSTOP)
        wait_until(lambda: promoted(sentinels[1:], primary), 30, "a replica promoted")
        promoted_at = time.monotonic()
        wait_until(lambda: load.last_reply() > promoted_at, 10, "acknowledging again")
        resumed = load.last_reply() - promoted_at
        load.finish()
        replies, gap = check_history(load, replicas, sentinels[1:], hung_at)  # not the hung one
    print(f"\nhung primary: promoted {promoted_at - hung_at:.1f}s after the hang, "
          f"acknowledging {resumed:.1f}s after the promotion; {replies} replies, "
          f"none twice; {gap:.1f}s without acknowledgements")  # fmt: skip
    assert resumed <= 3.0
    assert "Traceback" not in servers[0].stderr


def test_an_unreachable_sentinel_set_is_one_line_exit_1():
    ports = ",".join(f"127.0.0.1:{free_port()}" for _ in range(2))
    result = run_server_command("--backend", f"redis+sentinel://{ports}/primary/0")
    assert result.returncode == 1, result
    assert result.stderr.count("\n") == 1 and "no sentinel knows the primary" in result.stderr
    assert "Traceback" not in result.stderr


def test_replicas_all_waits_for_every_replica_the_sentinels_know(tmp_path):
    # A replica that went away is dropped from the primary's own list at
    # once (or after repl-timeout when cut off); WAIT for "the replicas
    # connected now" would then acknowledge with one copy fewer.
    with replicated_set(tmp_path) as (primary, replicas, sentinels):
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in sentinels)
        url = f"redis+sentinel://{hosts}/primary/0?key=counter&replicas=all"
        with start_server("--backend", url, "--metrics-port", "0") as server:
            assert exchange(server.port, 1, 1) == (1, 2)
            replicas[1].kill()
            wait_until(lambda: "connected_slaves:1" in primary.cli("info", "replication"), 10,
                       "the primary dropped the dead replica")  # fmt: skip
            with connect(server.port) as sock:
                sock.sendall(frames(1))
                assert closed_without_reply(sock), "acknowledged on 1 of the 2 replicas"
            status, body = http_get(server.metrics_url("/healthz"))
            assert status == 503 and "only 1 of 2 replicas" in body, body
            replicas[1].start()
            wait_until(lambda: try_increment(server.port) is not None, 15, "acknowledging again")
        assert "Traceback" not in server.stderr


def test_replicas_all_refuses_when_the_sentinels_know_no_replica(tmp_path):
    (tmp_path / "alone").mkdir()
    alone = RedisServer(tmp_path / "alone")
    alone.start()
    sentinel = Sentinel(tmp_path, alone)
    try:
        wait_until(lambda: sentinel.primary() == alone.address, 15, "sentinel watching")
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/primary/0?replicas=all"
        with start_server("--backend", url, "--metrics-port", "0") as server:
            assert try_increment(server.port) is None
            status, body = http_get(server.metrics_url("/healthz"))
            assert status == 503 and "know no replica" in body, body
        startup = server.stdout.splitlines()[0]
        assert "but replicas=all: the sentinels know no replica" in startup, startup
        assert "reachable" not in server.stdout + server.stderr
        assert alone.cli("get", "counter") == "", "incremented without a replica to confirm it"
    finally:
        sentinel.kill()
        alone.kill()


def test_replicas_all_needs_sentinel():
    result = run_server_command("--backend", "redis://127.0.0.1:6379/0?replicas=all")
    assert result.returncode == 2 and "replicas=all needs redis+sentinel://" in result.stderr


# --- mistakes that waiting will not heal: caught at start --------------------------------


def refused_at_start(url: str, *extra: str) -> str:
    """The one line the server prints when ``url`` cannot work; it must exit 1
    at once (a mistake retried for ever would time out here)."""
    started = time.monotonic()
    result = run_server_command("--backend", url, *extra, timeout=15)
    assert result.returncode == 1, (url, result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 10
    return result.stderr


def test_permanent_redis_mistakes_are_one_line_exit_1(tmp_path, pki):
    redis, tls_port = tls_redis(tmp_path, pki)
    sentinel = Sentinel(tmp_path, redis)
    try:
        wait_until(lambda: sentinel.primary() == redis.address, 15, "sentinel watching")
        # Plain Redis spoken to the TLS port, and TLS to the plain one.
        line = refused_at_start(f"redis://127.0.0.1:{tls_port}/0")
        assert f"127.0.0.1:{tls_port} {documented('speaks TLS: use rediss://')}" in line, line
        line = refused_at_start(f"rediss://127.0.0.1:{redis.port}/0?ca={pki['ca']}")
        said = documented("speaks plain Redis, not TLS: use redis://")
        assert f"127.0.0.1:{redis.port} {said}" in line, line
        # A CA file that is not there.
        line = refused_at_start(f"rediss://127.0.0.1:{tls_port}/0?ca={tmp_path}/nonexistent.pem")
        assert f"cannot read {tmp_path}/nonexistent.pem: no such file" in line, line
        # A sentinel's port given as a Redis server: the URL to use instead.
        line = refused_at_start(f"redis://:pw@127.0.0.1:{sentinel.port}/0")
        said = documented("is a Redis Sentinel, not a Redis server: use redis+sentinel://")
        assert f"127.0.0.1:{sentinel.port} {said}" in line, line
        assert f"use redis+sentinel://127.0.0.1:{sentinel.port}/primary/0" in line, line
        assert "pw" not in line
        # A key that holds something else.
        redis.cli("set", "words", "hello")
        line = refused_at_start(redis.url("words"))
        said = documented("key 'NAME' holds 'hello', not a counter")
        assert said.replace("NAME", "words") in line, line
        assert redis.cli("get", "words") == "hello"
        # The same Redis, rightly addressed, serves.
        with start_server("--backend", f"rediss://127.0.0.1:{tls_port}/0?ca={pki['ca']}") as server:
            assert exchange(server.port, 3) == (3,)
    finally:
        sentinel.kill()
        redis.kill()


def test_replicas_not_attached_yet_are_said_and_heal(tmp_path):
    """replicas=1 on a primary with no replica: the server starts and says
    why it cannot acknowledge (never that Redis is reachable again), then
    serves once a replica attaches."""
    (tmp_path / "primary").mkdir()
    primary = RedisServer(tmp_path / "primary", "--repl-diskless-sync-delay", "0")
    primary.start()
    replica = None
    server = start_server(
        "--backend", f"redis://127.0.0.1:{primary.port}/0?replicas=1&replica_timeout_ms=200",
        "--metrics-port", "0",
    )  # fmt: skip
    tally = Tally(server.port)  # each frame adds 1: the counter counts what was applied
    increment = tally.increment

    try:
        status, body = http_get(server.metrics_url("/healthz"))
        assert status == 503 and "only 0 of the 1 replicas" in body, body
        assert not increment()
        status, body = http_get(server.metrics_url("/healthz"))
        assert status == 503 and "only 0 of 1 replicas confirmed" in body, body
        (tmp_path / "replica").mkdir()
        replica = RedisServer(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port))
        replica.start()
        wait_until(lambda: http_get(server.metrics_url("/healthz"))[0] == 200, 20, "healthy")
        # The first WAIT after the replica attached may still fall short.
        wait_until(increment, 20, "acknowledged again")
        assert increment() and increment()
        final = int(primary.cli("get", "counter"))
    finally:
        server.stop()
        primary.kill()
        if replica is not None:
            replica.kill()
    # An increment that WAIT did not confirm was applied on the primary, or
    # not: unanswered, never acknowledged; nothing acknowledged is missing
    # and no value was handed out twice.
    assert len(tally.acknowledged) == 3
    assert_exact(tally.verdict(0, final))
    startup = server.stdout.splitlines()[0]
    said = documented("but only 0 of the 1 replicas a reply waits for are attached to the primary")
    assert said in startup, startup
    assert "reachable" not in server.stdout + server.stderr
    assert "Traceback" not in server.stderr
