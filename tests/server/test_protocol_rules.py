"""The protocol rules 1-7 of docs/protocol.md against a real server process over loopback."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from counter_server.protocol import MAX_COUNTER, decode_replies
from support import (
    VECTORS,
    connect,
    exchange,
    frames,
    read_counter,
    recv_exactly,
    recv_replies,
    recv_until_closed,
    start_server,
)


def test_go_vectors_in_order_with_overflow_refused(server):
    counter = 0
    for case in VECTORS["valid"]:
        n = int(case["increment"])
        with connect(server.port) as sock:
            sock.sendall(bytes.fromhex(case["frame_hex"]))
            if counter + n <= MAX_COUNTER:
                counter += n
                assert recv_replies(sock, 1) == (counter,), case
            else:
                assert recv_until_closed(sock) == b"", f"overflow of {n} was not refused"
        assert read_counter(server.port) == counter


def test_zero_increment_reads_without_changing(server):
    assert exchange(server.port, 5) == (5,)
    assert exchange(server.port, 0, 0, 0) == (5, 5, 5)
    assert read_counter(server.port) == 5


def test_2000_pipelined_frames_in_one_write(server):
    with connect(server.port) as sock:
        sock.sendall(frames(*[1] * 2000))
        assert recv_replies(sock, 2000) == tuple(range(1, 2001))


def test_mixed_increments_pipelined(server):
    values = [3, 0, 1, 2**40, 7, 0]
    expected, total = [], 0
    for v in values:
        total += v
        expected.append(total)
    assert exchange(server.port, *values) == tuple(expected)


def test_stream_sent_one_byte_at_a_time(server):
    stream = frames(*range(1, 31))
    with connect(server.port) as sock:
        for i in range(len(stream)):
            sock.send(stream[i : i + 1])
        replies = recv_replies(sock, 30)
    assert replies[-1] == sum(range(1, 31))
    assert list(replies) == [sum(range(1, k + 1)) for k in range(1, 31)]


def test_replies_follow_each_read_without_waiting_for_more(server):
    """A frame split across writes is answered once complete, not later."""
    with connect(server.port) as sock:
        frame = frames(1)
        sock.sendall(frames(1) + frame[:5])
        assert recv_replies(sock, 1) == (1,)
        sock.sendall(frame[5:])
        assert recv_replies(sock, 1) == (2,)


@pytest.mark.parametrize("case", VECTORS["tampered"], ids=lambda c: c["why"])
def test_tampered_frame_after_valid_ones_in_one_write(server, case):
    before = read_counter(server.port)
    with connect(server.port) as sock:
        sock.sendall(frames(1, 1, 1) + bytes.fromhex(case["frame_hex"]) + frames(1, 1))
        data = recv_until_closed(sock)
    assert decode_replies(data) == (before + 1, before + 2, before + 3)
    assert read_counter(server.port) == before + 3  # the frames after it were not applied


def test_tampered_frame_alone_gets_no_reply_and_is_logged(server):
    with connect(server.port) as sock:
        sock.sendall(b"aaaaaaaaaaaaaaaa")
        assert recv_until_closed(sock) == b""
    assert read_counter(server.port) == 0
    server.stop()
    assert "refused frame from 127.0.0.1:" in server.stderr
    assert "checksum" in server.stderr


def test_bad_frame_after_many_pipelined_replies_loses_none(server):
    """The server half-closes and drains, so replies owed are not destroyed by a reset."""
    with connect(server.port) as sock:
        sock.sendall(frames(*[1] * 5000) + b"\xff" * 16 + frames(*[1] * 5000))
        data = recv_until_closed(sock)
    assert decode_replies(data) == tuple(range(1, 5001))


def test_truncated_frame_is_discarded(server):
    with connect(server.port) as sock:
        sock.sendall(frames(4) + frames(9)[:7])
        sock.shutdown(socket.SHUT_WR)
        assert decode_replies(recv_until_closed(sock)) == (4,)
    assert read_counter(server.port) == 4
    server.stop()
    assert "discarded partial frame" in server.stderr


def test_overflow_at_the_top_of_the_range():
    with start_server() as server:
        assert exchange(server.port, MAX_COUNTER - 1) == (MAX_COUNTER - 1,)
        with connect(server.port) as sock:
            sock.sendall(frames(1, 0, 1, 5))
            data = recv_until_closed(sock)
        assert decode_replies(data) == (MAX_COUNTER, MAX_COUNTER)
        assert read_counter(server.port) == MAX_COUNTER
        with connect(server.port) as sock:
            sock.sendall(frames(MAX_COUNTER))
            assert recv_until_closed(sock) == b""
        assert read_counter(server.port) == MAX_COUNTER
    assert "overflow" in server.stderr
    assert server.totals[1] == MAX_COUNTER


def test_a_misbehaving_client_does_not_disturb_another(server):
    with connect(server.port) as good:
        good.sendall(frames(1))
        assert recv_replies(good, 1) == (1,)
        with connect(server.port) as bad:
            bad.sendall(b"garbage!" * 2)
            assert recv_until_closed(bad) == b""
        good.sendall(frames(1))
        assert recv_replies(good, 1) == (2,)


def test_120_concurrent_connections_get_exactly_every_value():
    server = start_server("--multiplier", "100")
    connections, per_connection = 120, 50
    replies: list[list[int]] = [[] for _ in range(connections)]
    errors: list[BaseException] = []
    start = threading.Barrier(connections, timeout=30)

    def client(index: int) -> None:
        try:
            with connect(server.port) as sock:
                start.wait()
                for _ in range(per_connection):
                    sock.sendall(frames(1))
                    replies[index].extend(recv_replies(sock, 1))
        except BaseException as exc:  # reported below
            errors.append(exc)

    try:
        threads = [
            threading.Thread(daemon=True, target=client, args=(i,)) for i in range(connections)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
        for own in replies:
            assert own == sorted(own) and len(set(own)) == len(own)
        everything = sorted(v for own in replies for v in own)
        assert everything == list(range(1, connections * per_connection + 1))
    finally:
        assert server.stop() == 0
    assert f"total requests: {connections * per_connection}" in server.stdout


def test_full_pool_makes_new_connections_wait_then_serves_them():
    with start_server("--multiplier", "1", "--evict-idle-after", "0") as server:  # holders stay
        holders = [connect(server.port) for _ in range(server.pool_size)]
        for sock in holders:
            sock.sendall(frames(0))
            recv_replies(sock, 1)
        time.sleep(1.2)  # two saturation checks
        assert "pool full" not in server.stderr_path.read_text(), "warned with nobody waiting"
        waiting = connect(server.port)
        waiting.sendall(frames(1))
        waiting.settimeout(1.2)
        with pytest.raises(TimeoutError):
            waiting.recv(8)
        holders.pop().close()
        waiting.settimeout(10)
        assert decode_replies(recv_exactly(waiting, 8)) == (1,)
        for sock in [*holders, waiting]:
            sock.close()
    assert "connection pool full" in server.stderr
    assert "1 connections waiting to be accepted" in server.stderr


def test_counter_is_shared_across_connections(server):
    first = connect(server.port)
    second = connect(server.port)
    with first, second:
        first.sendall(frames(10))
        assert recv_replies(first, 1) == (10,)
        second.sendall(frames(5))
        assert recv_replies(second, 1) == (15,)
    assert read_counter(server.port) == 15


def test_running_out_of_file_descriptors_is_reported_once_and_recovers():
    server = start_server("--multiplier", "100", max_files=40)
    clients = []
    try:
        for _ in range(60):
            clients.append(connect(server.port))
        time.sleep(0.5)
        for sock in clients:
            sock.close()
        clients.clear()
        deadline = time.monotonic() + 10
        while "cannot accept connections" not in server.stderr_path.read_text():
            assert time.monotonic() < deadline, "the accept failure was not logged"
            time.sleep(0.1)
        assert exchange(server.port, 3) == (3,)
    finally:
        for sock in clients:
            sock.close()
        server.stop()
    assert "too many open files" in server.stderr
    assert "Traceback" not in server.stderr
    assert server.stderr.count("cannot accept connections") <= 5  # rate-limited
