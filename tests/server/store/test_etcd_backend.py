"""--backend etcd://...: instances sharing one counter in a real etcd cluster
(three members on loopback, started by each test; .ci/run installs
etcd-server and etcd-client)."""

from __future__ import annotations

import signal
import time

import pytest

from counter_server.protocol import MAX_COUNTER
from support import (
    AnswerProxy,
    EtcdCluster,
    Load,
    StandIn,
    assert_exact,
    exchange,
    http_get,
    metric,
    run_server_command,
    start_server,
    try_increment,
    wait_until,
)

pytestmark = pytest.mark.needs("etcd", "etcdctl")


@pytest.fixture
def cluster(tmp_path):
    members = EtcdCluster(tmp_path)
    members.start()
    try:
        members.wait_healthy()
        yield members
    finally:
        members.kill()


def test_two_instances_share_one_exact_counter_and_compares_are_retried(cluster):
    servers = [start_server("--backend", cluster.url(), "--metrics-port", "0") for _ in range(2)]
    try:
        load = Load([s.port for s in servers], 16, depth=3)
        time.sleep(3)
        values = load.finish()
        assert len(values) > 300, "too little traffic to prove anything"
        assert_exact(load.verdict(0, int(cluster.get())))
        assert load.unanswered == 0 and int(cluster.get()) == len(values)
        conflicts = sum(
            metric(s.metrics_url(), "counter_server_backend_compare_conflicts_total")
            for s in servers
        )
        assert conflicts > 0, "the instances never raced: the retry path is untested"
    finally:
        for server in servers:
            server.stop()
    for server in servers:
        assert "Traceback" not in server.stderr


def test_the_counter_at_its_maximum_refuses_overflow(cluster):
    cluster.ctl("put", "counter", str(MAX_COUNTER - 2))
    with start_server("--backend", cluster.url()) as server:
        assert exchange(server.port, 1, 1) == (MAX_COUNTER - 1, MAX_COUNTER)
        assert try_increment(server.port) is None  # refused: closed without a reply
        assert exchange(server.port, 0) == (MAX_COUNTER,)
    assert cluster.get() == str(MAX_COUNTER)


def test_a_key_that_is_not_a_counter(cluster):
    cluster.ctl("put", "counter", "hello")
    result = run_server_command("--backend", cluster.url())
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result
    assert "holds b'hello', not a counter" in result.stderr
    cluster.ctl("put", "counter", "5")
    with start_server("--backend", cluster.url(), "--metrics-port", "0") as server:
        assert try_increment(server.port) == 6
        cluster.ctl("put", "counter", "oops")  # an operator's mistake, while it runs
        assert try_increment(server.port) is None
        status, body = http_get(server.metrics_url("/healthz"))
        assert status == 503 and "not a counter" in body
        assert cluster.get() == "oops", "the server overwrote what it does not understand"
        cluster.ctl("put", "counter", "6")
        wait_until(lambda: try_increment(server.port) == 7, 5, "serving again")


def test_the_key_set_lower_is_refused_until_restored(cluster):
    with start_server("--backend", cluster.url(), "--metrics-port", "0") as server:
        assert exchange(server.port, *[1] * 20)[-1] == 20
        cluster.ctl("put", "counter", "3")
        assert try_increment(server.port) is None
        status, body = http_get(server.metrics_url("/healthz"))
        assert status == 503 and "went back to 3, below 20" in body, body
        assert cluster.get() == "3"
        cluster.ctl("put", "counter", "20")
        wait_until(lambda: try_increment(server.port) == 21, 5, "acknowledging again")
    assert "etcdctl put counter 20" in server.stderr


@pytest.mark.parametrize("change", [("put", "counter", "3"), ("del", "counter")])
def test_a_key_set_lower_or_deleted_while_idle_turns_health_503(cluster, change):
    with start_server("--backend", cluster.url(), "--metrics-port", "0") as server:
        assert exchange(server.port, *[1] * 20)[-1] == 20
        assert http_get(server.metrics_url("/healthz"))[0] == 200
        assert cluster.ctl(*change).returncode == 0
        changed = time.monotonic()
        wait_until(lambda: http_get(server.metrics_url("/healthz"))[0] == 503, 5, "503")
        assert time.monotonic() - changed <= 2.0, "noticed late"
        assert "below 20" in http_get(server.metrics_url("/healthz"))[1]
        assert try_increment(server.port) is None
        cluster.ctl("put", "counter", "20")
        wait_until(lambda: http_get(server.metrics_url("/healthz"))[0] == 200, 5, "200 again")
        assert try_increment(server.port) == 21


def test_health_follows_the_cluster_without_traffic(cluster):
    with start_server("--backend", cluster.url(), "--metrics-port", "0") as server:
        assert try_increment(server.port) == 1
        cluster.kill()
        gone = time.monotonic()
        wait_until(lambda: http_get(server.metrics_url("/healthz"))[0] == 503, 5, "503")
        assert time.monotonic() - gone <= 3.0
        assert try_increment(server.port) is None
        cluster.start()
        wait_until(lambda: try_increment(server.port) == 2, 20, "serving again")
        assert http_get(server.metrics_url("/healthz"))[0] == 200


def test_an_instance_started_without_quorum_serves_once_there_is_one(cluster):
    cluster.kill("m1", "m2")
    with start_server("--backend", cluster.url(), "--metrics-port", "0") as server:
        assert "cannot confirm reads yet" in server.stderr_path.read_text()
        wait_until(lambda: http_get(server.metrics_url("/healthz"))[0] == 503, 5, "503")
        assert try_increment(server.port) is None
        cluster.start("m1", "m2")
        wait_until(lambda: try_increment(server.port) == 1, 20, "serving with a quorum")
    assert "Traceback" not in server.stderr


def test_a_leader_change_under_load_with_processes(cluster):
    with start_server("--backend", cluster.url(), "--processes", "2") as server:
        load = Load([server.port], 8)
        time.sleep(1.5)
        leader = cluster.leader()
        assert leader
        killed_at = time.monotonic()
        cluster.kill(leader)
        wait_until(lambda: load.last_reply() > killed_at + 0.2, 10, "acknowledging again")
        resumed = load.last_reply() - killed_at
        time.sleep(0.5)
        values = load.finish()
    assert_exact(load.verdict(0, int(cluster.get())))
    print(f"\nleader killed: acknowledging again {resumed:.1f}s later; {len(values)} replies")


def test_a_transaction_whose_answer_was_lost_is_applied_once(cluster):
    """The member the server talks to commits a swap and its answer is lost:
    the same transaction re-sent to the next member must be recognised as
    committed, not swapped again (one writer: every conflict is a mistake)."""
    proxies = [AnswerProxy(cluster.client_ports[name]) for name in cluster.names]
    url = "etcd://" + ",".join(f"127.0.0.1:{p.port}" for p in proxies) + "/counter"
    server = start_server("--backend", url, "--metrics-port", "0")
    try:
        load = Load([server.port], 1)
        for proxy in proxies:  # the server moves on to the next member each time
            wait_until(lambda: len(load.replies) > 50, 10, "acknowledging")
            before = len(load.replies)
            proxy.drop.set()
            wait_until(lambda p=proxy: p.dropped > 0, 10, "an answer dropped")
            time.sleep(0.2)
            proxy.drop.clear()
            wait_until(lambda n=before: len(load.replies) > n + 20, 10,
                       "acknowledging through the next member")  # fmt: skip
        load.finish()
        conflicts = metric(server.metrics_url(), "counter_server_backend_compare_conflicts_total")
        recognised = metric(
            server.metrics_url(), "counter_server_backend_resent_swaps_recognised_total"
        )
    finally:
        server.stop()
        for proxy in proxies:
            proxy.close()
    assert_exact(load.verdict(0, int(cluster.get())))
    assert conflicts == 0, f"{conflicts} conflicts with a single writer"
    assert recognised >= 1, "no re-sent swap was found committed: the case was not reached"


def test_a_swap_tells_its_outcome_after_a_lost_answer(cluster):
    # EtcdCluster.swap itself: the answer of a committed swap dropped, the
    # same transaction re-sent to the next member is recognised (applied
    # once); with the writers key deleted by hand the outcome is unknown.
    from counter_server.server.store import etcd_backend
    from counter_server.server.store.urls import parse_etcd

    proxies = [AnswerProxy(cluster.client_ports[name]) for name in cluster.names]
    client = etcd_backend.EtcdCluster(
        parse_etcd("etcd://" + ",".join(f"127.0.0.1:{p.port}" for p in proxies) + "/counter")
    )
    try:
        outcome, seen = client.swap(client.state(), 1, "first")
        assert outcome == etcd_backend.SWAPPED and seen.value == 1
        proxies[0].drop.set()
        outcome, seen = client.swap(seen, 2, "second")
        assert outcome == etcd_backend.RECOGNISED, outcome
        assert (seen.value, seen.writer_token) == (2, "second")
        assert cluster.get() == "2", "the re-sent swap was applied again"
        outcome, stale = client.swap(seen._replace(value=1), 3, "third")  # another writer's
        assert outcome == etcd_backend.FAILED and stale.value == 2
        assert cluster.ctl("del", client.writer).returncode == 0  # an operator tidying up
        proxies[1].drop.set()
        with pytest.raises(etcd_backend.EtcdUnavailable, match="cannot be told"):
            client.swap(seen, 3, "fourth")
        assert cluster.get() == "2"
    finally:
        for proxy in proxies:
            proxy.close()


def test_a_leader_paused_again_and_again_applies_nothing_twice(cluster):
    # SIGSTOP pulses longer than the request timeout: swaps committed by the
    # paused leader answer late or never, and are re-sent to other members.
    server = start_server("--backend", cluster.url(), "--metrics-port", "0")
    try:
        load = Load([server.port], 4)
        wait_until(lambda: len(load.replies) > 50, 10, "acknowledging")
        for _ in range(4):
            seen: list[str] = []  # the leader, once there is one (not mid-election)
            wait_until(lambda seen=seen: seen.append(cluster.leader()) or seen[-1], 10,
                       "a leader")  # fmt: skip
            leader = cluster.procs[seen[-1]]
            leader.send_signal(signal.SIGSTOP)
            time.sleep(1.3)
            leader.send_signal(signal.SIGCONT)
            time.sleep(0.7)
        before = len(load.replies)
        wait_until(lambda: len(load.replies) > before + 20, 20, "acknowledging after the pauses")
        load.finish()
    finally:
        for proc in cluster.procs.values():
            proc.send_signal(signal.SIGCONT)
        server.stop()
    assert_exact(load.verdict(0, int(cluster.get())))


def test_start_up_errors_are_one_line():
    from support import free_port

    nobody = f"etcd://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/counter"
    result = run_server_command("--backend", nobody)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result
    assert "no endpoint answers" in result.stderr and "connection refused" in result.stderr


def test_authentication(cluster):
    assert cluster.ctl("user", "add", "root:rootpw").returncode == 0
    assert cluster.ctl("auth", "enable").returncode == 0
    wrong = run_server_command("--backend", cluster.url(userinfo="root:nope@"))
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1, wrong
    assert "authentication failed for user 'root'" in wrong.stderr
    assert "nope" not in wrong.stderr
    missing = run_server_command("--backend", cluster.url())
    assert missing.returncode == 1 and "requires a user and password" in missing.stderr, missing
    with start_server("--backend", cluster.url(userinfo="root:rootpw@")) as server:
        assert exchange(server.port, 1, 2) == (1, 3)
    assert "rootpw" not in server.stdout + server.stderr
    assert cluster.get(user="root:rootpw") == "3"
    # A user with only the rights docs/operations.md lists.
    for command in (["user", "add", "counter:counterpw"], ["role", "add", "counting"],
                    ["role", "grant-permission", "counting", "readwrite", "counter"],
                    ["role", "grant-permission", "counting", "readwrite", "counter/writers/",
                     "--prefix"], ["user", "grant-role", "counter", "counting"]):  # fmt: skip
        assert cluster.ctl(*command, user="root:rootpw").returncode == 0, command
    with start_server("--backend", cluster.url(userinfo="counter:counterpw@")) as server:
        assert exchange(server.port, 1, 2) == (4, 6)
    assert "Traceback" not in server.stderr and "permission" not in server.stderr


def test_tls(tmp_path, pki):
    members = EtcdCluster(
        tmp_path, 1, "--cert-file", pki["server_cert"], "--key-file", pki["server_key"],
        scheme="https",
    )  # fmt: skip
    members.ca = pki["ca"]
    members.start()
    try:
        members.wait_healthy()
        stranger = run_server_command("--backend", members.url(query=f"?ca={pki['stranger_ca']}"))
        assert stranger.returncode == 1 and stranger.stderr.count("\n") == 1, stranger
        assert "does not verify" in stranger.stderr
        plain = run_server_command("--backend", members.url().replace("etcds://", "etcd://"))
        assert plain.returncode == 1 and plain.stderr.count("\n") == 1, plain
        assert f"{members.endpoints} speaks TLS: use etcds://" in plain.stderr, plain.stderr
        absent = run_server_command("--backend", members.url(query=f"?ca={tmp_path}/absent.pem"))
        assert absent.returncode == 1 and absent.stderr.count("\n") == 1, absent
        assert f"ca=: cannot read {tmp_path}/absent.pem: no such file" in absent.stderr
        with start_server("--backend", members.url(query=f"?ca={pki['ca']}")) as server:
            assert exchange(server.port, 4) == (4,)
    finally:
        members.kill()


def test_urls_that_reach_no_etcd_client_port_are_one_line_exit_1(cluster, pki):
    """TLS to a plain member, its peer port, and a port that is not etcd at
    all: each says what it is, at once, without a traceback."""
    member = cluster.names[0]
    cases = [
        (cluster.url(query=f"?ca={pki['ca']}").replace("etcd://", "etcds://"),
         "speaks plain HTTP, not TLS: use etcd://"),
        (f"etcd://127.0.0.1:{cluster.peer_ports[member]}/k",
         "answers 404 for /v3/kv/txn: not an etcd v3 client endpoint (a peer port?)"),
    ]  # fmt: skip
    with StandIn(lambda conn: conn.recv(100)) as stand_in:  # reads, then hangs up
        said = "closed the connection without an answer (not an etcd client endpoint?)"
        cases.append((f"etcd://127.0.0.1:{stand_in.port}/k", said))
        for url, said in cases:
            started = time.monotonic()
            result = run_server_command("--backend", url, timeout=20)
            assert result.returncode == 1 and result.stderr.count("\n") == 1, result
            assert said in result.stderr and "Traceback" not in result.stderr, result.stderr
            assert time.monotonic() - started < 10
