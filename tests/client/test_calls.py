"""What both library front ends share (client/calls.py): every error's
claim is provable, a client belongs to its process, a batch of any size
streams, and a call ends within its timeout whatever happens meanwhile.

Each end-to-end case runs the sync ``CounterClient`` and the asyncio
``AsyncCounterClient`` against a real server on loopback."""

from __future__ import annotations

import asyncio
import random
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
from support import (
    REPO_ROOT,
    StandIn,
    exchange,
    read_counter,
    start_server,
    start_tls_server,
    wait_until,
)

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
    with start_server() as server:
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


# --- errors that name the cause ---


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize(
    ("certificate", "said"),
    [
        ({}, "the server requires a client certificate (pass tls_cert= and tls_key=)"),
        ({"tls_cert": "stranger_cert", "tls_key": "stranger_key"}, "the server does not trust"),
    ],
)
def test_a_refused_client_certificate_is_unavailable_and_says_why(
    front_end, certificate, said, pki
):
    server = start_tls_server(pki, "--tls-client-ca", pki["ca"])
    try:
        settings = {key: pki[name] for key, name in certificate.items()}
        address = f"127.0.0.1:{server.port}"
        outcome = call(front_end, address, "increment", tls_ca=pki["ca"], **settings)
        assert isinstance(outcome, Unavailable), outcome
        assert said in str(outcome) and "nothing was applied" in str(outcome)
        trusted = {"tls_cert": pki["client_cert"], "tls_key": pki["client_key"]}
        assert call(front_end, address, "read", tls_ca=pki["ca"], **trusted) == 0
    finally:
        server.stop()


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_a_plain_client_of_a_tls_server_is_told_to_use_tls(front_end, pki):
    server = start_tls_server(pki)
    try:
        outcome = call(front_end, f"127.0.0.1:{server.port}", "increment")
        assert isinstance(outcome, Unavailable), outcome
        assert "looks like a TLS server: pass tls_ca=" in str(outcome)
        assert call(front_end, f"127.0.0.1:{server.port}", "read", tls_ca=pki["ca"]) == 0
    finally:
        server.stop()


def http_400(conn) -> None:
    conn.recv(64)
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_a_slow_server_gets_a_large_first_batch_whole(front_end):
    # Paused past the point where a silent new connection is nudged (see
    # HTTP_NUDGE), with most of the batch still unsent: nothing may follow a nudge.
    server = start_server()
    try:
        server.signal(signal.SIGSTOP)
        resume = threading.Timer(0.85, server.signal, (signal.SIGCONT,))
        resume.start()
        try:
            outcome = call(front_end, f"127.0.0.1:{server.port}", "increment_many",
                           [1] * 5000, timeout=1)  # fmt: skip
        finally:
            resume.join()
        assert outcome == list(range(1, 5001)), outcome
        assert read_counter(server.port) == 5000
    finally:
        server.signal(signal.SIGCONT)
        server.stop()


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_an_http_server_is_named_within_the_timeout(front_end):
    # The metrics port (silent until its request line ends) and a server that answers at once.
    server = start_server("--metrics-port", "0")
    metrics = server.metrics_url().split("/")[2]
    try:
        with StandIn(http_400) as answering:
            for address in (metrics, answering.address):
                started = time.monotonic()
                outcome = call(front_end, address, "increment", timeout=2)
                took = time.monotonic() - started
                assert isinstance(outcome, Unavailable), outcome
                assert "is not a counter server: it answered in HTTP" in str(outcome)
                assert took < 2 + 0.5, took
        assert read_counter(server.port) == 0
    finally:
        server.stop()


def test_an_async_client_used_from_a_second_open_loop_says_so():
    async def first(counter):
        await counter.read()

    async def second(counter):
        with pytest.raises(RuntimeError, match="make one client per event loop"):
            await counter.increment()

    server = start_server()
    counter = AsyncCounterClient(f"127.0.0.1:{server.port}")
    loops = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        loops[0].run_until_complete(first(counter))
        loops[1].run_until_complete(second(counter))
        loops[0].run_until_complete(first(counter))  # its own loop still works
        loops[0].close()
        asyncio.run(first(counter))  # a new loop once the first is closed
        assert read_counter(server.port) == 0
    finally:
        for loop in loops:
            loop.close()
        server.stop()


# --- every claim against the counter, under concurrency, timeouts and cancellation ---

BITS_PER_ROUND = 40  # increments 2^0 .. 2^39: the counter's growth names the frames applied


def plan_round(rng: random.Random) -> list[list[int]]:
    """Calls of one round: single increments and small batches, each frame
    a distinct power of two."""
    calls, bit = [], 0
    while bit < BITS_PER_ROUND:
        size = min(rng.choice((1, 1, 1, 2, 3)), BITS_PER_ROUND - bit)
        calls.append([1 << (bit + i) for i in range(size)])
        bit += size
    return calls


def judge_round(start: int, final: int, outcomes: list[tuple[list[int], object]]) -> None:
    """Each frame's bit in ``final - start`` says whether it was applied:
    check every value returned and every error's claim against it."""
    applied = final - start
    assert 0 <= applied < 1 << BITS_PER_ROUND, (start, final)
    for increments, outcome in outcomes:
        bits = [applied & n != 0 for n in increments]
        if isinstance(outcome, (Refused, Unavailable)):
            assert not any(bits), f"{outcome!r} claims nothing applied: {increments}"
            continue
        replies = outcome.replies if isinstance(outcome, Indeterminate) else outcome
        assert all(bits[: len(replies)]), (outcome, increments)
        for n, value in zip(increments, replies, strict=False):
            # A reply is the counter right after its own frame: it includes that frame's bit
            # and only bits of frames applied in the round.
            grown = value - start
            assert grown & n and grown & ~applied == 0, (hex(grown), n, outcome)
        if not isinstance(outcome, Indeterminate):
            assert len(replies) == len(increments)


def settled(port: int) -> int:
    """The counter once frames still in flight (a server paused mid-round) are applied."""
    value = read_counter(port)
    while True:
        time.sleep(0.2)
        again = read_counter(port)
        if again == value:
            return value
        value = again


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_every_claim_holds_under_concurrent_callers_timeouts_and_cancellation(front_end):
    rng = random.Random(20261207)
    server = start_server()
    address = f"127.0.0.1:{server.port}"
    try:
        for round_number in range(8):
            calls = plan_round(rng)
            timeouts = [rng.choice((0.02, 0.05, 0.3, 2.0)) for _ in calls]
            pause = round_number > 0  # the server stops twice for 0.1 s in later rounds
            start = read_counter(server.port)
            if front_end == "asyncio":
                outcomes = asyncio.run(async_round(address, calls, timeouts, rng, server, pause))
            else:
                outcomes = threads_round(address, calls, timeouts, server, pause)
            judge_round(start, settled(server.port), outcomes)
    finally:
        server.signal(signal.SIGCONT)
        server.stop()


def pause_server(server) -> None:
    for _ in range(2):
        server.signal(signal.SIGSTOP)
        time.sleep(0.1)
        server.signal(signal.SIGCONT)
        time.sleep(0.03)


WORKERS = 6  # callers per round, each making its calls one after another


def threads_round(address, calls, timeouts, server, pause):
    clients = {t: CounterClient(address, timeout=t, pool_size=3) for t in set(timeouts)}
    outcomes: list = [None] * len(calls)

    def worker(first: int) -> None:
        for i in range(first, len(calls), WORKERS):
            try:
                outcomes[i] = clients[timeouts[i]].increment_many(calls[i])
            except CounterError as exc:
                outcomes[i] = exc

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(WORKERS)]
    for thread in threads:
        thread.start()
    if pause:
        pause_server(server)
    for thread in threads:
        thread.join(30)
    for client in clients.values():
        client.close()
    return list(zip(calls, outcomes, strict=True))


async def async_round(address, calls, timeouts, rng, server, pause):
    clients = {t: AsyncCounterClient(address, timeout=t, pool_size=3) for t in set(timeouts)}
    cancelled = set(rng.sample(range(len(calls)), len(calls) // 4))
    outcomes: list = [None] * len(calls)

    async def one(i: int):
        try:
            return await clients[timeouts[i]].increment_many(calls[i])
        except CounterError as exc:
            return exc

    async def worker(first: int) -> None:
        for i in range(first, len(calls), WORKERS):
            task = asyncio.ensure_future(one(i))
            if i in cancelled:
                asyncio.get_running_loop().call_later(0.001 * (i % 7), task.cancel)
            try:
                outcomes[i] = await task
            except asyncio.CancelledError:
                outcomes[i] = Indeterminate("cancelled")  # claims nothing: either outcome

    workers = [asyncio.ensure_future(worker(w)) for w in range(WORKERS)]
    if pause:
        await asyncio.get_running_loop().run_in_executor(None, pause_server, server)
    await asyncio.gather(*workers)
    for client in clients.values():
        await client.close()
    return list(zip(calls, outcomes, strict=True))
