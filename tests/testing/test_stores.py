"""testing/stores.py: the stores' real servers that the tests, the benchmarks
and the partition run start. Each test starts the real program on loopback."""

from __future__ import annotations

import signal
import time

import pytest

from testing.stores import EtcdCluster, NotReady, RedisServer, Sentinel, wait_until


@pytest.mark.needs("redis-server")
def test_a_durable_redis_keeps_its_counter_across_a_kill(tmp_path):
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        assert redis.cli("incrby", "counter", "41") == "41"
        redis.kill()
        redis.start()  # the same port and folder: the AOF brings the value back
        assert redis.cli("incr", "counter") == "42"
    finally:
        redis.kill()
    assert (tmp_path / f"redis-{redis.port}.log").read_text(), "its log is in its folder"


@pytest.mark.needs("redis-server")
def test_kill_ends_a_stopped_redis(tmp_path):
    redis = RedisServer(tmp_path, durable=False)
    redis.start()
    redis.proc.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    redis.kill()
    assert redis.proc.returncode is not None and time.monotonic() - started < 5
    assert redis.cli("ping") == ""  # nothing answers there any more


@pytest.mark.needs("redis-server", "redis-sentinel")
def test_a_sentinel_names_its_primary(tmp_path):
    redis = RedisServer(tmp_path, durable=False)
    redis.start()
    sentinel = Sentinel(tmp_path, redis)
    try:
        wait_until(lambda: sentinel.primary() == redis.address, 15, "the sentinel watching")
    finally:
        sentinel.kill()
        redis.kill()


@pytest.mark.needs("etcd", "etcdctl")
def test_an_etcd_leader_is_named_and_moves(tmp_path):
    cluster = EtcdCluster(tmp_path, 3)
    cluster.start()
    try:
        cluster.wait_healthy()
        leader = cluster.leader()
        assert leader in cluster.names
        cluster.move_leader()
        wait_until(lambda: cluster.leader() not in ("", leader), 10, "a new leader")
        assert cluster.ctl("put", "counter", "7").returncode == 0
        assert cluster.get() == "7"
    finally:
        cluster.kill()
    assert not cluster.procs


@pytest.mark.needs("etcd", "etcdctl")
def test_a_member_that_exits_is_named_with_its_last_words(tmp_path):
    cluster = EtcdCluster(tmp_path, 1, "--no-such-flag")
    cluster.start()
    try:
        with pytest.raises(NotReady) as raised:
            cluster.wait_healthy(3)
    finally:
        cluster.kill()
    assert "exited: {'m0'" in str(raised.value) and "no-such-flag" in str(raised.value)
