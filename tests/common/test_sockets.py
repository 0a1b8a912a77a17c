"""common.sockets: the hot loops' recv and the waking shutdown, on gevent
socket pairs in this process (no server)."""

from __future__ import annotations

import socket as stdlib_socket

import gevent

from counter_server.common.sockets import Reader, reader, shut_down


def test_reader_returns_what_arrives_and_waits_after_a_short_read(pair):
    left, right = pair
    recv = reader(left)
    assert recv is not left.recv  # the fast path is taken on a plain gevent socket
    right.sendall(b"abc")
    assert recv(16) == b"abc"  # short: the next call waits for readability
    later = gevent.spawn_later(0.05, right.sendall, b"defg")
    assert recv(16) == b"defg"
    later.join()


def test_reader_reads_straight_on_after_a_full_read(pair):
    left, right = pair
    recv = reader(left)
    right.sendall(b"x" * 10)
    assert recv(4) == b"xxxx"  # full: more may be there without waiting
    assert recv(4) == b"xxxx"
    assert recv(4) == b"xx"


def test_reader_sees_the_peer_close(pair):
    left, right = pair
    recv = reader(left)
    right.sendall(b"last")
    right.close()
    assert recv(16) == b"last"
    assert recv(16) == b""


def test_reader_keeps_recv_of_sockets_it_cannot_speed_up(pair):
    left, _ = pair
    left.settimeout(5)  # a wait must start its timer: the socket's own recv
    assert reader(left) == left.recv
    plain, other = stdlib_socket.socketpair()
    with plain, other:
        assert reader(plain) == plain.recv


def test_shut_down_wakes_a_greenlet_blocked_in_recv(pair):
    left, _ = pair
    recv = reader(left)
    blocked = gevent.spawn(recv, 16)
    gevent.sleep(0.05)
    assert not blocked.ready()
    shut_down(left, stdlib_socket.SHUT_RDWR)
    assert blocked.get(timeout=5) == b""


def test_interrupt_ends_a_waiting_recv_and_leaves_the_socket_usable(pair):
    left, right = pair
    incoming = Reader(left)
    right.sendall(b"a")
    assert incoming.recv(16) == b"a"  # short: the next recv waits
    waiting = gevent.spawn(incoming.recv, 16)
    gevent.sleep(0.05)
    assert not waiting.ready()
    incoming.interrupt()
    assert waiting.get(timeout=5) == b""
    assert incoming.recv(16) == b"", "later reads must not wait either"
    left.sendall(b"still writable")
    assert right.recv(64) == b"still writable"


def test_interrupt_before_any_wait_needs_no_waiter(pair):
    left, right = pair
    incoming = Reader(left)
    incoming.interrupt()
    right.sendall(b"unread")
    assert incoming.recv(16) == b""
