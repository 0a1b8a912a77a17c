"""The connection loop with a store that answers later (server.connection.Outbox), in
process over gevent socket pairs: a stand-in store answers the submitted
reads when the test says so, so every interleaving is chosen, not timed."""

from __future__ import annotations

import gevent
import pytest
from gevent import socket

from counter_server.protocol import MAX_COUNTER, RejectReason, decode_replies, encode_request
from counter_server.server.connection import serve
from counter_server.server.errors import FrameRefused
from counter_server.server.stats import ServerStats
from counter_server.server.store import MemoryCounterStore, StoreUnavailable
from counter_server.server.timeouts import TimeoutReaper, Timeouts


class LaterStore(MemoryCounterStore):
    """Takes reads with ``submit`` and answers them when told."""

    def __init__(self, initial: int = 0) -> None:
        super().__init__(initial)
        self.queued: list = []
        self.most_queued = 0

    def submit(self, increments, outbox) -> None:
        self.queued.append((increments, outbox))
        self.most_queued = max(self.most_queued, len(self.queued))

    def answer(self) -> None:
        queued, self.queued = self.queued, []
        for increments, outbox in queued:
            outbox.deliver(increments, self.apply(increments), self.value)

    def fail(self) -> None:
        queued, self.queued = self.queued, []
        for _, outbox in queued:
            outbox.fail(StoreUnavailable("the store is down"))


def start(pair, store, stats=None):
    server_side, _ = pair
    reaper = TimeoutReaper(Timeouts(idle=None, frame=None, write=None))

    def serving():
        """None when the peer closed; the refusal when a frame was refused."""
        try:
            serve(reaper.watch(server_side), store, stats or ServerStats())
        except FrameRefused as exc:
            return exc.refusal
        return None

    return gevent.spawn(serving)


def wait_for(condition, what: str) -> None:
    with gevent.Timeout(5, AssertionError(f"timed out waiting for {what}")):
        while not condition():
            gevent.sleep(0.001)


def read_replies(sock, count: int) -> tuple[int, ...]:
    data = b""
    with gevent.Timeout(5, AssertionError(f"{count} replies did not arrive")):
        while len(data) < 8 * count:
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection"
            data += chunk
    return decode_replies(data)


def test_ping_pong_replies_are_written_by_the_store_side(pair):
    _, client = pair
    store, stats = LaterStore(), ServerStats()
    loop = start(pair, store, stats)
    for expected in (1, 3, 6):
        client.sendall(encode_request(expected - store.value))
        wait_for(lambda: store.queued, "the read to reach the store")
        store.answer()
        assert read_replies(client, 1) == (expected,)
    client.shutdown(socket.SHUT_WR)
    assert loop.get(timeout=5) is None
    assert stats.replies_per_write[1] == 3


def test_a_pipelined_read_waits_for_the_previous_replies_and_order_holds(pair):
    _, client = pair
    store = LaterStore()
    loop = start(pair, store)
    client.sendall(encode_request(1) * 3)
    wait_for(lambda: store.queued, "the first read")
    client.sendall(encode_request(2) * 2)
    gevent.sleep(0.05)
    assert len(store.queued) == 1, "a second read reached the store before the first was answered"
    store.answer()
    wait_for(lambda: store.queued, "the second read")
    store.answer()
    assert read_replies(client, 5) == (1, 2, 3, 5, 7)
    client.shutdown(socket.SHUT_WR)
    assert loop.get(timeout=5) is None
    assert store.most_queued == 1


def test_a_failed_store_ends_the_connection_without_replies(pair):
    _, client = pair
    store = LaterStore()
    loop = start(pair, store)
    client.sendall(encode_request(1))
    wait_for(lambda: store.queued, "the read")
    store.fail()  # the loop is blocked reading: it must be woken
    with pytest.raises(StoreUnavailable):
        loop.get(timeout=5)
    pair[0].close()  # as the server does after the loop
    client.settimeout(5)
    assert client.recv(64) == b"", "a reply was sent for a read the store did not confirm"


def test_overflow_sends_the_replies_that_fit_then_returns_the_refusal(pair):
    _, client = pair
    store = LaterStore(MAX_COUNTER - 1)
    loop = start(pair, store)
    client.sendall(encode_request(1) * 3)
    wait_for(lambda: store.queued, "the read")
    store.answer()
    refusal = loop.get(timeout=5)
    assert refusal is not None and refusal.reason is RejectReason.OVERFLOW
    assert read_replies(client, 1) == (MAX_COUNTER,)


def test_a_client_that_does_not_read_holds_one_read_and_gets_every_reply_later(pair):
    server_side, client = pair
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    store = LaterStore()
    loop = start(pair, store)
    frames = 20_000  # 160 KB of replies: far more than the socket buffers hold
    sender = gevent.spawn(client.sendall, encode_request(1) * frames)
    while True:  # answer every read that arrives; the client reads nothing
        gevent.sleep(0.1)
        if not store.queued:
            break  # the loop is held: its last replies wait for the client
        store.answer()
    assert 0 < store.value < frames, "every reply fit in the socket buffers: nothing was held"
    assert store.most_queued == 1

    def answer_until_done() -> None:
        while store.value < frames:
            wait_for(lambda: store.queued, "a read")
            store.answer()

    answering = gevent.spawn(answer_until_done)
    assert read_replies(client, frames) == tuple(range(1, frames + 1))
    answering.get(timeout=5)
    sender.get(timeout=5)
    client.shutdown(socket.SHUT_WR)
    assert loop.get(timeout=5) is None


def test_nothing_after_a_refused_frame_is_applied_even_from_a_waiting_read(pair):
    _, client = pair
    store = LaterStore(MAX_COUNTER - 1)
    loop = start(pair, store)
    client.sendall(encode_request(1) * 2)  # the second frame would pass the limit
    wait_for(lambda: store.queued, "the first read")
    client.sendall(encode_request(0) * 3)  # read while the first is in the store
    gevent.sleep(0.05)
    store.answer()
    refusal = loop.get(timeout=5)
    assert refusal is not None and refusal.reason is RejectReason.OVERFLOW
    assert store.queued == [], "a read after the refused frame reached the store"
    assert store.requests_applied == 1
