"""The connection loop, ``serve()``, in process over ``socket.socketpair()``:
no server process, no timing (the test plays the client and the reaper).
Then the loop with a store that answers later (``connection.Outbox``), over
gevent socket pairs: a stand-in store answers the submitted reads when the
test says so, so every interleaving is chosen, not timed."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence

import gevent
import pytest
from gevent import socket as gevent_socket

from counter_server.protocol import MAX_COUNTER, RejectReason, decode_replies, encode_request
from counter_server.server.connection import serve
from counter_server.server.errors import ClientTimeout, CloseReason, FrameRefused
from counter_server.server.stats import ServerStats
from counter_server.server.store import MemoryCounterStore, StoreUnavailable
from counter_server.server.timeouts import NS_PER_SECOND, TimeoutReaper, Timeouts

TAMPERED = bytes.fromhex("00000000000000016021b5621680598b")  # checksum of "2" on 1


@pytest.fixture
def pair():
    server_side, client_side = socket.socketpair()
    client_side.settimeout(10)
    yield server_side, client_side
    server_side.close()
    client_side.close()


def run(pair, payload: bytes, store=None, stats=None):
    """Send ``payload``, close the sending side, serve, collect the replies."""
    server_side, client_side = pair
    client_side.sendall(payload)
    client_side.shutdown(socket.SHUT_WR)
    store = store or MemoryCounterStore()
    stats = stats or ServerStats()
    reaper = TimeoutReaper(Timeouts(idle=None, frame=None, write=None))
    watched = reaper.watch(server_side)
    outcome = None  # the peer closed: serve() returned
    try:
        serve(watched, store, stats)
    except FrameRefused as exc:
        outcome = exc.refusal
    server_side.shutdown(socket.SHUT_WR)
    received = b""
    while chunk := client_side.recv(65536):
        received += chunk
    return outcome, decode_replies(received), store, watched


def test_frames_get_their_replies_in_order_and_the_peer_close_ends_it(pair):
    outcome, replies, store, watched = run(pair, b"".join(map(encode_request, [1, 2, 0, 3])))
    assert outcome is None
    assert replies == (1, 3, 3, 6)
    assert store.requests_applied == 4
    assert watched.bytes_in == 64 and watched.bytes_out == 32


def test_replies_owed_before_a_bad_frame_are_sent_then_it_is_refused(pair):
    payload = encode_request(1) * 3 + TAMPERED + encode_request(1)
    outcome, replies, store, _ = run(pair, payload)
    assert outcome.reason is RejectReason.CHECKSUM
    assert replies == (1, 2, 3)
    assert store.value == 3  # nothing after the bad frame applied


def test_a_partial_frame_at_close_is_discarded(pair):
    outcome, replies, store, _ = run(pair, encode_request(5) + encode_request(1)[:9])
    assert outcome.reason is RejectReason.TRUNCATED
    assert replies == (5,)
    assert store.value == 5


def test_overflow_is_refused_and_the_counter_unchanged(pair):
    store = MemoryCounterStore(MAX_COUNTER - 1)
    outcome, replies, _, _ = run(pair, encode_request(1) + encode_request(1), store=store)
    assert outcome.reason is RejectReason.OVERFLOW
    assert replies == (MAX_COUNTER,)
    assert store.value == MAX_COUNTER


class FailingStore(MemoryCounterStore):
    def apply(self, increments: Sequence[int]) -> Sequence[int]:
        raise StoreUnavailable("state file: cannot write")


def test_an_unavailable_store_ends_the_connection_without_replies(pair):
    with pytest.raises(StoreUnavailable) as raised:
        run(pair, encode_request(1), store=FailingStore())
    assert raised.value.reason is CloseReason.BACKEND_UNAVAILABLE


def test_a_reaper_verdict_ends_the_loop_as_that_timeout(pair):
    server_side, _ = pair
    now = [0]
    reaper = TimeoutReaper(Timeouts(idle=5, frame=None, write=None), lambda: now[0])
    outcome: list = []

    def serving() -> None:
        try:
            serve(reaper.watch(server_side), MemoryCounterStore(), ServerStats())
        except ClientTimeout as exc:
            outcome.append(exc)

    thread = threading.Thread(daemon=True, target=serving)
    thread.start()
    deadline = time.monotonic() + 10
    while not reaper.watched:  # serve() registered the connection
        assert time.monotonic() < deadline
        time.sleep(0.01)
    now[0] = 6 * NS_PER_SECOND  # the idle limit has passed
    reaper.check()
    thread.join(10)
    assert not thread.is_alive()
    assert outcome and outcome[0].reason is CloseReason.IDLE_TIMEOUT
    assert str(outcome[0]) == "idle timeout after 5s"


def test_shutdown_stops_reading_quietly(pair):
    server_side, client_side = pair
    client_side.sendall(encode_request(1))
    reaper = TimeoutReaper(Timeouts())
    watched = reaper.watch(server_side)
    watched.stopped = True  # as TimeoutReaper.stop_reading sets it
    assert serve(watched, MemoryCounterStore(), ServerStats()) is None


def test_the_gevent_read_path_keeps_framing_across_short_and_full_reads():
    """On gevent sockets serve() reads through _reader (wait after a short
    read, read on after a full one): a trickle, then more than one read's
    worth at once, then the peer's close, all answered exactly."""
    import gevent
    from gevent import socket as gsocket

    from counter_server.server.connection import RECV_SIZE

    server_side, client_side = gsocket.socketpair()
    store = MemoryCounterStore()
    stats = ServerStats()
    reaper = TimeoutReaper(Timeouts(idle=None, frame=None, write=None))
    watched = reaper.watch(server_side)
    serving = gevent.spawn(serve, watched, store, stats)
    received = bytearray()
    reader = gevent.spawn(
        lambda: [received.extend(c) for c in iter(lambda: client_side.recv(65536), b"")]
    )
    for byte in encode_request(1) * 2:  # byte by byte: every read is short
        client_side.sendall(bytes([byte]))
        gevent.sleep(0.001)
    burst = RECV_SIZE // 16 * 3 + 5  # full reads, then a short one
    client_side.sendall(encode_request(1) * burst)
    client_side.shutdown(socket.SHUT_WR)
    assert serving.get(timeout=10) is None
    server_side.shutdown(socket.SHUT_WR)
    reader.join(timeout=10)
    assert decode_replies(bytes(received)) == tuple(range(1, burst + 3))
    assert watched.bytes_in == (burst + 2) * 16
    server_side.close()
    client_side.close()


# --- a store that answers later (connection.Outbox) ------------------------


@pytest.fixture
def green_pair():
    """A connected pair of gevent sockets: the store answers from another greenlet."""
    left, right = gevent_socket.socketpair()
    yield left, right
    left.close()
    right.close()


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


def start(green_pair, store, stats=None):
    server_side, _ = green_pair
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


def test_ping_pong_replies_are_written_by_the_store_side(green_pair):
    _, client = green_pair
    store, stats = LaterStore(), ServerStats()
    loop = start(green_pair, store, stats)
    for expected in (1, 3, 6):
        client.sendall(encode_request(expected - store.value))
        wait_for(lambda: store.queued, "the read to reach the store")
        store.answer()
        assert read_replies(client, 1) == (expected,)
    client.shutdown(socket.SHUT_WR)
    assert loop.get(timeout=5) is None
    assert stats.replies_per_write[1] == 3


def test_a_pipelined_read_waits_for_the_previous_replies_and_order_holds(green_pair):
    _, client = green_pair
    store = LaterStore()
    loop = start(green_pair, store)
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


def test_a_failed_store_ends_the_connection_without_replies(green_pair):
    _, client = green_pair
    store = LaterStore()
    loop = start(green_pair, store)
    client.sendall(encode_request(1))
    wait_for(lambda: store.queued, "the read")
    store.fail()  # the loop is blocked reading: it must be woken
    with pytest.raises(StoreUnavailable):
        loop.get(timeout=5)
    green_pair[0].close()  # as the server does after the loop
    client.settimeout(5)
    assert client.recv(64) == b"", "a reply was sent for a read the store did not confirm"


def test_overflow_sends_the_replies_that_fit_then_returns_the_refusal(green_pair):
    _, client = green_pair
    store = LaterStore(MAX_COUNTER - 1)
    loop = start(green_pair, store)
    client.sendall(encode_request(1) * 3)
    wait_for(lambda: store.queued, "the read")
    store.answer()
    refusal = loop.get(timeout=5)
    assert refusal is not None and refusal.reason is RejectReason.OVERFLOW
    assert read_replies(client, 1) == (MAX_COUNTER,)


def test_a_client_that_does_not_read_holds_one_read_and_gets_every_reply_later(green_pair):
    server_side, client = green_pair
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    store = LaterStore()
    loop = start(green_pair, store)
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


def test_nothing_after_a_refused_frame_is_applied_even_from_a_waiting_read(green_pair):
    _, client = green_pair
    store = LaterStore(MAX_COUNTER - 1)
    loop = start(green_pair, store)
    client.sendall(encode_request(1) * 2)  # the second frame would pass the limit
    wait_for(lambda: store.queued, "the first read")
    client.sendall(encode_request(0) * 3)  # read while the first is in the store
    gevent.sleep(0.05)
    store.answer()
    refusal = loop.get(timeout=5)
    assert refusal is not None and refusal.reason is RejectReason.OVERFLOW
    assert store.queued == [], "a read after the refused frame reached the store"
    assert store.requests_applied == 1
