"""The timeout reaper's decisions, driven with a fake clock (no waiting)."""

from __future__ import annotations

import socket

import pytest

from protocol import FrameDecoder, encode_request
from server.close import CloseReason
from server.timeouts import TimeoutReaper, Timeouts


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def watched_connection(pair, timeouts: Timeouts):
    reaper = TimeoutReaper(timeouts)
    decoder = FrameDecoder()
    watched = reaper.watch(pair[0], decoder)
    return reaper, decoder, watched


def test_idle_connection_times_out_and_is_shut_down(pair):
    reaper, _, watched = watched_connection(pair, Timeouts(idle=5, frame=None, write=None))
    start = watched._idle_since
    reaper.check(start + 4.9)
    assert watched.timed_out is None
    reaper.check(start + 5.0)
    assert watched.timed_out.reason is CloseReason.IDLE_TIMEOUT
    assert pair[1].recv(1) == b""  # the reaper shut the socket down
    assert str(watched.timed_out) == "idle timeout after 5s"


def test_activity_resets_the_idle_clock(pair):
    reaper, _, watched = watched_connection(pair, Timeouts(idle=5, frame=None, write=None))
    start = watched._idle_since
    reaper.check(start + 4)
    watched.bytes_in += 16
    reaper.check(start + 6)  # bytes arrived since the last look: not idle
    assert watched.timed_out is None
    reaper.check(start + 10.9)
    assert watched.timed_out is None
    reaper.check(start + 11)
    assert watched.timed_out.reason is CloseReason.IDLE_TIMEOUT


def test_a_trickled_frame_times_out_even_though_bytes_keep_coming(pair):
    reaper, decoder, watched = watched_connection(pair, Timeouts(idle=5, frame=2, write=None))
    start = watched._idle_since
    frame = encode_request(1)
    for second in range(5):
        decoder.feed(frame[second : second + 1])
        watched.bytes_in += 1
        reaper.check(start + second)
        if watched.timed_out:
            break
    assert watched.timed_out.reason is CloseReason.FRAME_TIMEOUT


def test_completed_frames_restart_the_frame_clock(pair):
    reaper, decoder, watched = watched_connection(pair, Timeouts(idle=None, frame=2, write=None))
    start = watched._idle_since
    frame = encode_request(1)
    for second in range(6):  # every second: finish the previous frame, start a new one
        decoder.feed(frame[8:] if second else b"")
        decoder.feed(frame[:8])
        watched.bytes_in += 16 if second else 8
        reaper.check(start + second)
    assert watched.timed_out is None


def test_blocked_write_times_out_but_slow_progress_does_not(pair):
    reaper, _, watched = watched_connection(pair, Timeouts(idle=None, frame=None, write=3))
    start = watched._idle_since
    watched.writing = True
    reaper.check(start + 1)
    watched.bytes_out += 8  # progress
    reaper.check(start + 2)
    reaper.check(start + 4.9)
    assert watched.timed_out is None
    reaper.check(start + 5)
    assert watched.timed_out.reason is CloseReason.WRITE_TIMEOUT


def test_throttled_connection_is_not_idle(pair):
    reaper, _, watched = watched_connection(pair, Timeouts(idle=1, frame=None, write=None))
    start = watched._idle_since
    watched.throttled = True
    reaper.check(start + 5)
    assert watched.timed_out is None


def test_check_interval_follows_the_shortest_timeout():
    assert Timeouts(idle=300, frame=10, write=30).check_interval == 1.0
    assert Timeouts(idle=1, frame=None, write=None).check_interval == 0.25
    assert Timeouts(idle=None, frame=0.01, write=None).check_interval == 0.05
    assert not Timeouts(idle=None, frame=None, write=None).enabled


def test_a_partial_frame_does_not_time_out_while_the_server_is_writing(pair):
    reaper, decoder, watched = watched_connection(pair, Timeouts(idle=None, frame=1, write=3))
    start = watched._idle_since
    decoder.feed(encode_request(1)[:5])
    watched.bytes_in += 5
    watched.writing = True  # blocked sending to a client that does not read
    for tenth in range(1, 30):
        reaper.check(start + tenth / 10)
        assert watched.timed_out is None, tenth
    reaper.check(start + 3.1)
    assert watched.timed_out.reason is CloseReason.WRITE_TIMEOUT
