"""client.pipeline (auto-pipelining): the calls of many callers share a
connection, their frames travel together, replies go back to each in order,
and a caller that gave up leaves the connection in step.

The pure ``Pipeline`` first; then both front ends against a stand-in
counter server that holds its replies, so that what reached it while
nothing was answered can be counted."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import socket
import ssl
import threading
import time

import pytest

from counter_server.client import (
    AsyncCounterClient,
    CounterClient,
    CounterError,
    Indeterminate,
    Unavailable,
)
from counter_server.client.calls import IN_FLIGHT_FRAMES, Deadline, NotACounterServer
from counter_server.client.pipeline import Pending, Pipeline
from counter_server.protocol import FRAME_SIZE, decode_request, encode_request
from support import LoopbackListener, start_tls_server, wait_until

FRONT_ENDS = ("sync", "asyncio")


def pending(*increments: int) -> Pending:
    return Pending(b"".join(encode_request(n) for n in increments), Deadline(5))


def replies(*values: int) -> bytes:
    return b"".join(v.to_bytes(8, "big") for v in values)


# --- the pure pipeline ---


def test_calls_go_out_together_and_replies_go_back_in_order_however_cut():
    pipeline = Pipeline()
    first, second, third = pending(1), pending(2, 3, 4), pending(5)
    for call in (first, second, third):
        pipeline.add(call)
    assert pipeline.to_send() == first.frames + second.frames + third.frames
    assert pipeline.load == 5
    stream = replies(1, 3, 6, 10, 15)
    assert pipeline.received(stream[:5]) == []  # part of one reply
    assert pipeline.received(stream[5:20]) == [first]
    assert first.data == stream[:8] and second.data == stream[8:20]
    assert pipeline.received(stream[20:]) == [second, third]
    assert second.data == stream[8:32] and third.data == stream[32:]
    assert pipeline.load == 0 and not pipeline.owed


def test_at_most_the_window_goes_unanswered():
    pipeline = Pipeline()
    big, small = pending(*[1] * (IN_FLIGHT_FRAMES + 10)), pending(7)
    pipeline.add(big)
    pipeline.add(small)
    assert len(pipeline.to_send()) == IN_FLIGHT_FRAMES * FRAME_SIZE
    assert pipeline.to_send() == b""
    pipeline.received(replies(*range(1, 4)))
    assert len(pipeline.to_send()) == 3 * FRAME_SIZE  # the batch's frames before the next call's
    pipeline.received(replies(*range(4, IN_FLIGHT_FRAMES + 4)))
    assert pipeline.to_send() == encode_request(1) * 7 + small.frames


def test_a_withdrawn_call_is_never_sent_and_an_abandoned_one_keeps_its_place():
    pipeline = Pipeline()
    sent, later = pending(1), pending(2)
    pipeline.add(sent)
    pipeline.to_send()
    pipeline.add(later)
    pipeline.withdraw(later)  # nothing of it went out: forgotten
    pipeline.withdraw(sent)  # it went out: its reply will come and is dropped
    assert pipeline.to_send() == b""
    sent.abandoned = True
    assert not pipeline.live
    after = pending(3)
    pipeline.add(after)
    assert decode_request(pipeline.to_send()) == 3
    assert pipeline.received(replies(1, 4)) == [sent, after]
    assert after.data == replies(4)


def test_bytes_nobody_asked_for_and_http_are_not_a_counter_server():
    pipeline = Pipeline()
    pipeline.add(pending(1))
    pipeline.to_send()
    with pytest.raises(NotACounterServer) as http:
        pipeline.received(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    assert http.value.http
    pipeline = Pipeline()
    pipeline.add(pending(1))
    pipeline.to_send()
    with pytest.raises(NotACounterServer):
        pipeline.received(replies(1, 2))  # two replies to one frame


def test_a_cut_ends_every_call_still_owed_in_order():
    pipeline = Pipeline()
    calls = [pending(1), pending(1, 1), pending(1)]
    for call in calls:
        pipeline.add(call)
    pipeline.to_send()
    assert pipeline.received(replies(1, 2)) == [calls[0]]
    assert pipeline.cut() == calls[1:]
    assert calls[1].data == replies(2)


# --- both front ends against a stand-in that holds its replies ---


class HoldingCounter(LoopbackListener):
    """A counter server on loopback that answers nothing while ``hold`` is
    set (replies queue up, in order, per connection); ``increments`` counts
    the non-zero frames it has read, ``accepted`` its connections, and
    ``ended`` the connections whose client closed them."""

    def __init__(self) -> None:
        self.value = 0
        self.increments = 0
        self.accepted = 0
        self.ended = 0
        self.hold = threading.Event()
        self.released = threading.Condition()
        super().__init__()

    def release(self) -> None:
        with self.released:
            self.hold.clear()
            self.released.notify_all()

    def _took(self, conn: socket.socket) -> None:
        self.accepted += 1
        self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        owed: list[int] = []
        unread = b""
        with conn, contextlib.suppress(OSError):
            conn.settimeout(0.05)
            while True:
                try:
                    data = conn.recv(4096)
                    if not data:
                        break
                    unread += data
                except TimeoutError:
                    pass
                with self.released:
                    while len(unread) >= FRAME_SIZE:
                        n = decode_request(unread[:FRAME_SIZE])
                        unread = unread[FRAME_SIZE:]
                        self.value += n
                        self.increments += n > 0
                        owed.append(self.value)
                    if owed and not self.hold.is_set():
                        conn.sendall(replies(*owed))
                        owed.clear()
        self.ended += 1


@pytest.fixture
def holding():
    server = HoldingCounter()
    try:
        yield server
    finally:
        server.release()
        server.close()


def run(front_end: str, address: str, scenario_sync, scenario_async, **settings):
    if front_end == "asyncio":

        async def on_loop():
            async with AsyncCounterClient(address, **settings) as counter:
                return await scenario_async(counter)

        return asyncio.run(on_loop())
    with CounterClient(address, **settings) as counter:
        return scenario_sync(counter)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_forty_callers_share_two_connections_all_in_flight_at_once(front_end, holding):
    # Fails where a connection carries one call at a time: two frames at most arrive.
    holding.hold.set()
    callers = 40

    def release_when_all_arrived():
        wait_until(lambda: holding.increments == callers, 10, "every caller's frame in flight")
        holding.release()

    releaser = threading.Thread(target=release_when_all_arrived, daemon=True)
    releaser.start()

    def threads(counter):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(callers) as pool:
            return list(pool.map(lambda n: counter.increment(n), range(1, callers + 1)))

    async def tasks(counter):
        return await asyncio.gather(*(counter.increment(n) for n in range(1, callers + 1)))

    try:
        values = run(front_end, holding.address, threads, tasks, pool_size=2, timeout=15)
    finally:
        releaser.join(15)
    assert holding.accepted <= 2
    assert len(set(values)) == callers and max(values) == sum(range(1, callers + 1))
    # Each value is the counter right after its own increment: n apart from the one before.
    ordered = sorted(zip(values, range(1, callers + 1), strict=True))
    for (before, _), (after, n) in itertools.pairwise(ordered):
        assert after - before == n


def test_a_cancelled_callers_reply_is_dropped_and_its_connection_kept(holding):
    async def scenario():
        async with AsyncCounterClient(holding.address, pool_size=1, timeout=10) as counter:
            assert await counter.read() == 0
            holding.hold.set()
            gave_up = asyncio.ensure_future(counter.increment(5))
            while holding.increments < 1:
                await asyncio.sleep(0.01)
            gave_up.cancel()
            after = asyncio.ensure_future(counter.increment(1))
            while holding.increments < 2:
                await asyncio.sleep(0.01)
            holding.release()
            return await after, gave_up.cancelled()

    value, cancelled = asyncio.run(scenario())
    assert cancelled
    assert value == 6  # the cancelled 5 went out and was applied; its reply was dropped
    assert holding.accepted == 1


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_a_timed_out_call_retires_its_connection(front_end, holding):
    # The connection has answered before (a silent new one is retired by the HTTP nudge).
    def sync(counter):
        assert counter.read() == 0
        holding.hold.set()
        with pytest.raises(Indeterminate):
            counter.increment(1)
        holding.release()
        return counter.increment(1)

    async def aio(counter):
        assert await counter.read() == 0
        holding.hold.set()
        with pytest.raises(Indeterminate):
            await counter.increment(1)
        holding.release()
        return await counter.increment(1)

    value = run(front_end, holding.address, sync, aio, pool_size=1, timeout=0.5)
    assert value == 2  # the timed-out increment was applied once released
    # A new connection for the next call, though the pool holds one: the first was retired.
    assert holding.accepted == 2
    wait_until(lambda: holding.ended == 2, 5, "every connection closed by the client")


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_a_call_that_times_out_before_its_frames_went_out_is_unavailable_and_never_sent(
    front_end, holding
):
    # Behind a batch that fills the window of the only connection, on a server holding replies.
    holding.hold.set()
    batch = [1] * (IN_FLIGHT_FRAMES + 10)
    window_of_ones = IN_FLIGHT_FRAMES - 1  # the first call's read of the counter takes a place
    settings = {"pool_size": 1, "timeout": 1}
    outcomes = {}

    def batch_sync(counter):
        worker = threading.Thread(target=lambda: outcomes.update(batch=call_sync(counter)))
        worker.start()
        wait_until(lambda: holding.increments >= window_of_ones, 5, "the window sent")
        outcomes["behind"] = call_sync(counter, [10**6])
        worker.join(10)

    def call_sync(counter, increments=batch):
        try:
            return counter.increment_many(increments)
        except CounterError as exc:
            return exc

    async def call_async(counter, increments=batch):
        try:
            return await counter.increment_many(increments)
        except CounterError as exc:
            return exc

    async def batch_async(counter):
        first = asyncio.ensure_future(call_async(counter))
        for _ in range(500):
            if holding.increments >= window_of_ones:
                break
            await asyncio.sleep(0.01)
        outcomes["behind"] = await call_async(counter, [10**6])
        outcomes["batch"] = await first

    run(front_end, holding.address, batch_sync, batch_async, **settings)
    assert isinstance(outcomes["batch"], Indeterminate), outcomes
    behind = outcomes["behind"]
    assert isinstance(behind, Unavailable) and "nothing was applied" in str(behind), behind
    holding.release()
    time.sleep(0.3)  # anything still on its way would arrive now
    assert holding.value <= len(batch)  # the 10**6 never reached the server


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_calls_that_time_out_together_on_one_tls_connection_each_get_their_error(front_end, pki):
    # Each caller leaving the retired connection closes it; a TLS transport
    # closed a third time raised AttributeError from asyncio's sslproto.
    server = start_tls_server(pki)
    settings = {"pool_size": 1, "timeout": 0.5, "tls_ca": pki["ca"]}
    callers = 3

    def threads(counter):
        counter.read()
        server.signal(signal.SIGSTOP)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(callers) as pool:
            return list(pool.map(lambda _: outcome(counter.increment), range(callers)))

    def outcome(method, *args):
        try:
            return method(*args)
        except CounterError as exc:
            return exc

    async def tasks(counter):
        await counter.read()
        server.signal(signal.SIGSTOP)

        async def one():
            try:
                return await counter.increment()
            except CounterError as exc:
                return exc

        return await asyncio.gather(*(one() for _ in range(callers)))

    try:
        outcomes = run(front_end, f"127.0.0.1:{server.port}", threads, tasks, **settings)
        assert all(isinstance(o, Indeterminate) for o in outcomes), outcomes
    finally:
        server.signal(signal.SIGCONT)
        server.stop()


def test_an_error_right_after_the_end_of_file_names_the_cause_of_the_calls_it_ended():
    # asyncio's TLS transport may report the end of file before the alert
    # that explains it (a refused client certificate): the calls learn the alert.
    from counter_server.client.aio import _Connection

    class Transport(asyncio.Transport):
        def write(self, data):
            pass

        def is_closing(self):
            return False

        def get_write_buffer_size(self):
            return 0

    async def scenario():
        connection = _Connection()
        connection.connection_made(Transport())
        call = Pending(encode_request(1), Deadline(5), asyncio.get_running_loop().create_future())
        connection.submit(call)
        await asyncio.sleep(0)  # sent
        connection.eof_received()
        alert = ssl.SSLError(1, "certificate required")
        connection.connection_lost(alert)
        await call.waiter
        return call, alert

    call, alert = asyncio.run(scenario())
    assert call.ended.cause is alert
