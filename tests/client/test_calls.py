"""What both library front ends share (client/calls.py): every error's
claim is provable, a client belongs to its process, a batch of any size
streams, and a call ends within its timeout whatever happens meanwhile.

Each end-to-end case runs the sync ``CounterClient`` and the asyncio
``AsyncCounterClient`` against a real server on loopback."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time

import pytest
from counter_server.client import (
    AsyncCounterClient,
    CounterClient,
    CounterError,
    Indeterminate,
    Refused,
    Unavailable,
)
from counter_server.client.calls import ended_early, refused_locally
from counter_server.protocol import MAX_COUNTER
from support import REPO_ROOT, StandIn, exchange, read_counter, start_server, wait_until

FRONT_ENDS = ("sync", "asyncio")


def call(front_end: str, address: str, method: str, *args, **settings):
    """``method(*args)`` on a new client of ``front_end``, closed after: the
    result, or the CounterError raised."""

    async def on_loop():
        async with AsyncCounterClient(address, **settings) as counter:
            return await getattr(counter, method)(*args)

    try:
        if front_end == "asyncio":
            return asyncio.run(on_loop())
        with CounterClient(address, **settings) as counter:
            return getattr(counter, method)(*args)
    except CounterError as exc:
        return exc


def assert_claim_holds(outcome, n: int, before: int, after: int) -> None:
    """The error's claim judged against the counter read before and after
    (nobody else increments meanwhile)."""
    if isinstance(outcome, (Refused, Unavailable)):
        assert after == before, f"{outcome!r} claims not applied, yet the counter moved"
    elif isinstance(outcome, Indeterminate):
        assert after in (before, before + n), (outcome, before, after)
    else:
        assert outcome == after == before + n, (outcome, before, after)


# --- the claims, as pure functions ---


def test_an_applied_increment_near_the_top_is_never_called_refused():
    # The counter was at least MAX - 11 and reads MAX - 1 after: +10 may have been applied.
    ended = ended_early("a", [10], [], MAX_COUNTER - 11, MAX_COUNTER - 1, "timed out")
    assert isinstance(ended, Indeterminate) and ended.value == MAX_COUNTER - 1


def test_a_refusal_is_claimed_only_when_proven():
    # Still below floor + n after: not applied yet, and it can never fit.
    ended = ended_early("a", [10], [], MAX_COUNTER - 11, MAX_COUNTER - 5, "closed")
    assert isinstance(ended, Refused) and ended.value == MAX_COUNTER - 5
    # The reply before it in the batch already proves it, no read needed.
    ended = ended_early("a", [1, 10], [MAX_COUNTER - 5], 0, None, "closed")
    assert isinstance(ended, Refused) and ended.replies == (MAX_COUNTER - 5,)
    # Nothing known: nothing claimed.
    assert isinstance(ended_early("a", [10], [], None, None, "closed"), Indeterminate)
    assert isinstance(ended_early("a", [10], [], 5, MAX_COUNTER - 5, "closed"), Indeterminate)


def test_an_increment_that_cannot_fit_is_refused_without_sending():
    assert refused_locally("a", None, MAX_COUNTER) is None  # nothing seen yet
    assert refused_locally("a", 5, MAX_COUNTER - 5) is None
    refusal = refused_locally("a", 6, MAX_COUNTER - 5)
    assert isinstance(refusal, Refused) and refusal.value == 6


# --- the claims against a real server ---


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_an_increment_applied_after_a_timeout_near_the_top_is_indeterminate(front_end):
    # The independent run's case: paused 0.75 s, timeout 0.5 s, applied once resumed.
    server = start_server()
    try:
        exchange(server.port, MAX_COUNTER - 11)
        address = f"127.0.0.1:{server.port}"
        server.signal(signal.SIGSTOP)
        resume = threading.Timer(0.75, server.signal, (signal.SIGCONT,))
        resume.start()
        try:
            outcome = call(front_end, address, "increment", 10, timeout=0.5)
        finally:
            resume.join()
        time.sleep(0.2)  # the frame waiting in the server's socket is applied once it runs
        after = read_counter(server.port)
        assert isinstance(outcome, Indeterminate), outcome
        assert_claim_holds(outcome, 10, MAX_COUNTER - 11, after)
    finally:
        server.stop()


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_a_refusal_is_proven_even_by_a_client_that_saw_nothing_before(front_end, server):
    exchange(server.port, MAX_COUNTER - 10)
    outcome = call(front_end, f"127.0.0.1:{server.port}", "increment", 11)
    assert isinstance(outcome, Refused) and outcome.value == MAX_COUNTER - 10, outcome
    assert_claim_holds(outcome, 11, MAX_COUNTER - 10, read_counter(server.port))


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_a_client_refuses_what_cannot_fit_without_sending(front_end):
    server = start_server()
    address = f"127.0.0.1:{server.port}"
    exchange(server.port, MAX_COUNTER - 5)

    async def on_loop():
        async with AsyncCounterClient(address) as counter:
            assert await counter.read() == MAX_COUNTER - 5
            server.stop()  # nothing could be sent now
            with pytest.raises(Refused) as refused:
                await counter.increment(6)
            return refused.value

    if front_end == "asyncio":
        refusal = asyncio.run(on_loop())
    else:
        with CounterClient(address) as counter:
            assert counter.read() == MAX_COUNTER - 5
            server.stop()
            with pytest.raises(Refused) as refused:
                counter.increment(6)
            refusal = refused.value
    assert refusal.value == MAX_COUNTER - 5 and "without sending" in str(refusal)


# --- a client belongs to its process ---

FORKED = """
import asyncio, os, sys
sys.path.insert(0, sys.argv[1])
from counter_server.client import AsyncCounterClient, CounterClient

address, front_end, rounds = sys.argv[2], sys.argv[3], 200


def check(values, step):
    # One caller's batch: consecutive by its own step, never another's reply.
    assert all(b - a == step for a, b in zip(values, values[1:])), (step, values)
    return values


if front_end == "sync":
    client = CounterClient(address, pool_size=2)
    client.increment()  # connections open before the fork
    def batches(step):
        return [check(client.increment_many([step] * 3), step) for _ in range(rounds)]
else:
    client = AsyncCounterClient(address, pool_size=2)
    async def first():
        await client.increment()
    asyncio.run(first())
    async def many(step):
        return [check(await client.increment_many([step] * 3), step) for _ in range(rounds)]
    def batches(step):
        return asyncio.run(many(step))

reader, writer = os.pipe()
child = os.fork()
step = 1 if child == 0 else 1000
try:
    seen = [v for batch in batches(step) for v in batch]
    failure = ""
except AssertionError as exc:
    seen, failure = [], f"crossed replies: {exc}"[:300]
if child == 0:
    os.write(writer, repr((seen, failure)).encode())
    os._exit(0)
os.close(writer)
got = b""
while chunk := os.read(reader, 1 << 16):
    got += chunk
os.waitpid(child, 0)
child_seen, child_failure = eval(got)
failures = [f for f in (failure, child_failure) if f]
every = seen + child_seen
print(repr((failures, len(every), len(set(every)))))
"""


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_after_fork_parent_and_child_each_get_their_own_replies(front_end, server):
    address = f"127.0.0.1:{server.port}"
    for _ in range(5):
        result = subprocess.run(
            [sys.executable, "-c", FORKED, str(REPO_ROOT), address, front_end],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        failures, count, distinct = eval(result.stdout)
        assert not failures, failures
        assert count == distinct == 2 * 200 * 3


# --- a batch of any size ---


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_a_million_increments_in_one_batch(front_end, server):
    start = read_counter(server.port)
    replies = call(front_end, f"127.0.0.1:{server.port}", "increment_many", [1] * 1_000_000)
    assert not isinstance(replies, CounterError), replies
    assert replies == list(range(start + 1, start + 1_000_001))


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_a_batch_cut_by_a_shutdown_holds_every_reply_that_arrived(front_end):
    server = start_server()

    def stop_once_under_way() -> None:
        wait_until(lambda: read_counter(server.port) > 10_000, 60, "the batch to be under way")
        server.signal(signal.SIGTERM)

    stop = threading.Thread(target=stop_once_under_way, daemon=True)
    stop.start()
    try:
        outcome = call(front_end, f"127.0.0.1:{server.port}", "increment_many", [1] * 3_000_000)
    finally:
        stop.join(60)
        server.wait()
    _, final = server.totals  # the increments of 1 applied (the stopper's reads add 0)
    assert isinstance(outcome, Indeterminate), outcome
    # Every frame the server applied was answered before it closed (SPEC 3),
    # and every reply that arrived is in the error.
    assert list(outcome.replies) == list(range(1, final + 1)) and final > 10_000


# --- every call ends within its timeout ---


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_a_silent_server_costs_one_timeout_not_two(front_end):
    with StandIn() as silent:  # accepts, never answers: the classifying read hangs too
        started = time.monotonic()
        outcome = call(front_end, silent.address, "increment", timeout=2)
        took = time.monotonic() - started
    assert isinstance(outcome, Indeterminate), outcome
    assert 2 <= took < 3, took


def test_close_while_a_call_connects_leaves_the_call_its_timeout():
    with StandIn() as silent:  # accepts, never answers

        async def scenario():
            counter = AsyncCounterClient(silent.address, timeout=1)
            started = time.monotonic()
            task = asyncio.ensure_future(counter.increment())
            await asyncio.sleep(0)  # the call is connecting
            await counter.close()
            with pytest.raises(Indeterminate):
                await asyncio.wait_for(task, 10)
            return time.monotonic() - started

        took = asyncio.run(scenario())
    assert took < 1 + 1, took
