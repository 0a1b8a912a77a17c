"""client.aio: AsyncCounterClient against the real server on loopback, from
asyncio tasks, with no gevent in the process."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys

import pytest

from counter_server.client import (
    AsyncCounterClient,
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
)

TASKS = """
import asyncio, json, sys
sys.path.insert(0, sys.argv[2])
from counter_server.client import AsyncCounterClient

async def main():
    async with AsyncCounterClient(sys.argv[1], pool_size=4) as counter:
        async def work():
            return [await counter.increment() for _ in range(200)]
        done = await asyncio.gather(*(work() for _ in range(20)))
        many = await counter.increment_many([1, 1, 5])
        return sorted(v for values in done for v in values), many, await counter.read()

replies, many, value = asyncio.run(main())
print(json.dumps({"replies": replies, "many": many, "value": value,
                  "gevent": "gevent" in sys.modules}))
"""


def test_20_tasks_share_one_client_without_gevent():
    with start_server("--metrics-port", "0") as server:
        result = subprocess.run(
            [sys.executable, "-c", TASKS, f"127.0.0.1:{server.port}", str(REPO_ROOT)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        accepted = metric(server.metrics_url(), "counter_server_connections_accepted_total")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["replies"] == list(range(1, 4001))
    assert report["many"] == [4001, 4002, 4007] and report["value"] == 4007
    assert report["gevent"] is False
    assert accepted <= 4, f"{accepted:.0f} connections for pool_size=4"


def run(coroutine):
    return asyncio.run(coroutine)


def test_errors_and_recovery(server):
    exchange(server.port, MAX_COUNTER - 3)

    async def scenario():
        async with AsyncCounterClient(f"127.0.0.1:{server.port}") as counter:
            with pytest.raises(Refused) as refused:
                await counter.increment(4)
            assert refused.value.value == MAX_COUNTER - 3
            assert await counter.increment(3) == MAX_COUNTER
            with pytest.raises(ValueError):
                await counter.increment(-1)
            return await counter.read()

    assert run(scenario()) == MAX_COUNTER


def test_nothing_listening_is_unavailable():
    async def scenario():
        async with AsyncCounterClient(f"127.0.0.1:{free_port()}") as counter:
            with pytest.raises(Unavailable, match="cannot connect"):
                await counter.increment()

    run(scenario())


@pytest.mark.parametrize(("hang_ups", "read"), [(2, 42), (3, None)])
def test_read_is_tried_three_times_on_fresh_connections(hang_ups, read):
    stand_in = HangsUpFirst(hang_ups, 42)

    async def scenario():
        async with AsyncCounterClient(stand_in.address, timeout=5) as counter:
            if read is None:
                with pytest.raises(Unavailable, match="cannot read the counter"):
                    await counter.read()
            else:
                assert await counter.read() == read

    try:
        run(scenario())
        assert stand_in.accepted == 3
    finally:
        stand_in.close()


def test_a_server_that_never_replies_times_out_as_indeterminate():
    async def scenario(address):
        async with AsyncCounterClient(address, timeout=0.5) as counter:
            with pytest.raises(Indeterminate, match="no reply within the timeout"):
                await counter.increment()

    with StandIn() as silent:
        run(scenario(silent.address))


def test_server_killed_mid_call_then_restarted(tmp_path):
    port = free_port()
    args = ("--port", str(port), "--state-file", str(tmp_path / "c.state"), "--fsync", "always")
    server = start_server(*args)

    async def scenario():
        nonlocal server
        async with AsyncCounterClient(f"127.0.0.1:{port}", timeout=10) as counter:
            assert await counter.increment() == 1
            server.signal(signal.SIGSTOP)
            call = asyncio.ensure_future(counter.increment())
            await asyncio.sleep(0.5)
            server.proc.kill()
            with pytest.raises(Indeterminate):
                await call
            server.wait()
            with pytest.raises(Unavailable):
                await counter.increment()
            server = start_server(*args)
            return await counter.increment()

    try:
        # The increment in flight was read by nobody: the restarted server resumes at 1.
        assert run(scenario()) == 2
    finally:
        server.stop()


def test_tls(pki):
    server = start_tls_server(pki)

    async def scenario():
        async with AsyncCounterClient(f"127.0.0.1:{server.port}", tls_ca=pki["ca"]) as counter:
            return await counter.increment()

    try:
        assert run(scenario()) == 1
    finally:
        server.stop()
