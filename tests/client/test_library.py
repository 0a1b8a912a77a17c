"""client.library: CounterClient against the real server on loopback, from
threads and greenlets; what each error says happened to the increment."""

from __future__ import annotations

import importlib
import json
import signal
import ssl
import subprocess
import sys
import threading
import time

import pytest

from counter_server.client import (
    CounterClient,
    CounterError,
    Indeterminate,
    Refused,
    Unavailable,
)
from counter_server.protocol import MAX_COUNTER
from support import (
    REPO_ROOT,
    HangsUpFirst,
    StandIn,
    exchange,
    free_port,
    metric,
    start_server,
    start_tls_server,
    unread_at,
    wait_until,
)


def test_increment_read_and_increment_many(server):
    with CounterClient(f"127.0.0.1:{server.port}", timeout=5.0) as counter:
        assert counter.increment() == 1
        assert counter.increment(5) == 6
        assert counter.read() == 6
        assert counter.increment_many([1, 1, 5]) == [7, 8, 13]
        assert counter.increment_many([]) == []
        assert counter.increment(0) == 13


@pytest.mark.parametrize("package", ["client", "server", "protocol", "common"])
def test_a_subpackage_has_one_name(package):
    # The repository root is on sys.path in a clone; `import client` would load
    # a second copy of every class (two Indeterminate, two CloseReason).
    with pytest.raises(ImportError, match=f"import counter_server.{package}, not {package}"):
        importlib.import_module(package)
    assert package not in sys.modules


@pytest.mark.parametrize("folder", ["bench", "chaos", "docs", "tests"])
def test_the_package_holds_only_the_product(folder):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"counter_server.{folder}")


def test_ipv6_address():
    with (
        start_server("--host", "::1") as server,
        CounterClient(f"[::1]:{server.port}") as counter,
    ):
        assert counter.increment(2) == 2


def increments_from_threads(counter: CounterClient, threads: int, each: int) -> list[int]:
    """``threads`` threads share ``counter``, each calling increment() ``each``
    times; every reply they got."""
    replies: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [counter.increment() for _ in range(each)]
        with lock:
            replies.extend(mine)

    workers = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert not any(w.is_alive() for w in workers), "a thread did not finish"
    return replies


def test_16_threads_share_one_client_and_every_reply_is_distinct():
    with start_server("--metrics-port", "0") as server:
        with CounterClient(f"127.0.0.1:{server.port}", pool_size=2) as counter:
            replies = increments_from_threads(counter, 16, 1000)
            assert sorted(replies) == list(range(1, 16001))
            assert counter.read() == 16000
        accepted = metric(server.metrics_url(), "counter_server_connections_accepted_total")
        assert accepted <= 2, f"{accepted:.0f} connections for pool_size=2"


GREENLETS = """
import json, sys
from gevent import monkey; monkey.patch_all()
import gevent
sys.path.insert(0, sys.argv[2])
from counter_server.client import CounterClient
counter = CounterClient(sys.argv[1], pool_size=4)
jobs = [gevent.spawn(lambda: [counter.increment() for _ in range(200)]) for _ in range(20)]
gevent.joinall(jobs, raise_error=True)
print(json.dumps(sorted(v for job in jobs for v in job.value)))
"""


def test_greenlets_under_monkey_patching(server):
    result = subprocess.run(
        [sys.executable, "-c", GREENLETS, f"127.0.0.1:{server.port}", str(REPO_ROOT)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == list(range(1, 4001))


@pytest.mark.parametrize("bad", [-1, MAX_COUNTER + 1, 1.5, "1", True, None], ids=lambda v: repr(v))
def test_bad_increments_raise_value_error_before_anything_is_sent(server, bad):
    with CounterClient(f"127.0.0.1:{server.port}") as counter:
        with pytest.raises(ValueError):
            counter.increment(bad)
        with pytest.raises(ValueError):
            counter.increment_many([1, bad])
        assert counter.read() == 0  # nothing of the batch went out


@pytest.mark.parametrize(
    "kwargs",
    [{"timeout": 0}, {"pool_size": 0}, {"tls": ssl.create_default_context(), "tls_ca": "x"}],
)
def test_bad_settings_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        CounterClient("127.0.0.1:1", **kwargs)


@pytest.mark.parametrize("address", ["localhost", "127.0.0.1:0", "127.0.0.1:port", "[::1]"])
def test_bad_addresses_raise_value_error(address):
    with pytest.raises(ValueError):
        CounterClient(address)


def test_nothing_listening_is_unavailable():
    with CounterClient(f"127.0.0.1:{free_port()}") as counter:
        with pytest.raises(Unavailable, match=r"cannot connect to 127\.0\.0\.1:.*refused"):
            counter.increment()
        with pytest.raises(Unavailable):
            counter.read()


def test_overflow_is_refused_and_the_next_call_works(server):
    exchange(server.port, MAX_COUNTER - 10)
    with CounterClient(f"127.0.0.1:{server.port}") as counter:
        with pytest.raises(Refused) as refused:
            counter.increment(11)
        assert refused.value.value == MAX_COUNTER - 10
        assert "did not move" in str(refused.value)
        with pytest.raises(Refused) as refused:
            counter.increment_many([5, 6, 1])
        assert refused.value.replies == (MAX_COUNTER - 5,)
        assert counter.increment(5) == MAX_COUNTER
        assert counter.read() == MAX_COUNTER


def test_the_server_killed_mid_call_is_indeterminate_then_unavailable():
    server = start_server()
    counter = CounterClient(f"127.0.0.1:{server.port}", timeout=10)
    try:
        assert counter.increment() == 1
        server.signal(signal.SIGSTOP)  # the next frame waits unread in its socket
        outcome: list = []

        def call() -> None:
            try:
                outcome.append(counter.increment())
            except CounterError as exc:
                outcome.append(exc)

        thread = threading.Thread(daemon=True, target=call)
        thread.start()
        wait_until(lambda: unread_at(server.port) >= 16, 10, "the frame waiting in the server")
        server.proc.kill()  # unread data: the kernel resets the connection
        thread.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], Indeterminate), outcome
        assert "may or may not have been applied" in str(outcome[0])
        with pytest.raises(Unavailable):
            counter.increment()
    finally:
        counter.close()
        server.proc.kill()
        server.wait()


def test_a_restarted_server_is_reconnected_to_by_itself(tmp_path):
    port = free_port()
    state = str(tmp_path / "counter.state")
    args = ("--port", str(port), "--state-file", state, "--fsync", "always")
    server = start_server(*args)
    with CounterClient(f"127.0.0.1:{port}", pool_size=2) as counter:
        assert counter.increment_many([1, 1]) == [1, 2]
        server.stop()
        with start_server(*args) as server:
            # The pooled connections were closed by the old server: dropped,
            # not used for a frame (that would be Indeterminate).
            assert counter.increment() == 3
            assert counter.read() == 3


def test_a_server_that_never_replies_times_out_as_indeterminate():
    with StandIn() as silent, CounterClient(silent.address, timeout=0.5) as counter:
        started = time.monotonic()
        with pytest.raises(Indeterminate, match="no reply within the timeout"):
            counter.increment()
        assert time.monotonic() - started < 3


@pytest.mark.parametrize(("hang_ups", "read"), [(2, 42), (3, None)])
def test_read_is_tried_three_times_on_fresh_connections(hang_ups, read):
    stand_in = HangsUpFirst(hang_ups, 42)
    try:
        with CounterClient(stand_in.address, timeout=5) as counter:
            if read is None:
                with pytest.raises(Unavailable, match="cannot read the counter"):
                    counter.read()
            else:
                assert counter.read() == read
        assert stand_in.accepted == 3
    finally:
        stand_in.close()


def test_a_closed_client_is_unavailable(server):
    counter = CounterClient(f"127.0.0.1:{server.port}")
    counter.increment()
    counter.close()
    with pytest.raises(Unavailable, match="closed"):
        counter.increment()


def test_tls_with_a_context_and_with_paths(pki):
    server = start_tls_server(pki)
    try:
        context = ssl.create_default_context(cafile=pki["ca"])
        with CounterClient(f"127.0.0.1:{server.port}", tls=context) as counter:
            assert counter.increment() == 1
        with CounterClient(f"127.0.0.1:{server.port}", tls_ca=pki["ca"]) as counter:
            assert counter.increment() == 2
        stranger = CounterClient(f"127.0.0.1:{server.port}", tls_ca=pki["stranger_ca"])
        with stranger, pytest.raises(Unavailable, match=r"TLS with .* failed"):
            stranger.increment()
    finally:
        server.stop()


def test_mutual_tls(pki):
    server = start_tls_server(pki, "--tls-client-ca", pki["ca"])
    try:
        address = f"127.0.0.1:{server.port}"
        with CounterClient(
            address, tls_ca=pki["ca"], tls_cert=pki["client_cert"], tls_key=pki["client_key"]
        ) as counter:
            assert counter.increment() == 1
        anonymous = CounterClient(address, tls_ca=pki["ca"])  # no client certificate
        with anonymous, pytest.raises(Unavailable, match="requires a client certificate"):
            anonymous.increment()
    finally:
        server.stop()


def test_threads_against_processes_workers_get_one_exact_sequence():
    # The pooled connections land on different --processes workers.
    with (
        start_server("--processes", "2") as server,
        CounterClient(f"127.0.0.1:{server.port}", pool_size=6) as counter,
    ):
        replies = increments_from_threads(counter, 6, 300)
        assert counter.read() == 1800
    assert sorted(replies) == list(range(1, 1801))
