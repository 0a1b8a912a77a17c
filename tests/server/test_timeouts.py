"""The timeout reaper's decisions, driven with a fake clock (no waiting)."""

from __future__ import annotations

import socket

from counter_server.protocol import FrameDecoder, encode_request
from counter_server.server.close import CloseReason
from counter_server.server.timeouts import TimeoutReaper, Timeouts


def watched_connection(pair, timeouts: Timeouts):
    reaper = TimeoutReaper(timeouts)
    decoder = FrameDecoder()
    watched = reaper.watch(pair[0], decoder)
    return reaper, decoder, watched


def test_idle_connection_times_out_and_is_shut_down(pair):
    reaper, _, watched = watched_connection(pair, Timeouts(idle=5, frame=None, write=None))
    start = watched._idle_since
    reaper.check(start + 4.9)
    assert watched.verdict is None
    reaper.check(start + 5.0)
    assert watched.verdict.reason is CloseReason.IDLE_TIMEOUT
    assert pair[1].recv(1) == b""  # the reaper shut the socket down
    assert str(watched.verdict) == "idle timeout after 5s"


def test_activity_resets_the_idle_clock(pair):
    reaper, _, watched = watched_connection(pair, Timeouts(idle=5, frame=None, write=None))
    start = watched._idle_since
    reaper.check(start + 4)
    watched.bytes_in += 16
    reaper.check(start + 6)  # bytes arrived since the last look: not idle
    assert watched.verdict is None
    reaper.check(start + 10.9)
    assert watched.verdict is None
    reaper.check(start + 11)
    assert watched.verdict.reason is CloseReason.IDLE_TIMEOUT


def test_a_trickled_frame_times_out_even_though_bytes_keep_coming(pair):
    reaper, decoder, watched = watched_connection(pair, Timeouts(idle=5, frame=2, write=None))
    start = watched._idle_since
    frame = encode_request(1)
    for second in range(5):
        decoder.feed(frame[second : second + 1])
        watched.bytes_in += 1
        reaper.check(start + second)
        if watched.verdict:
            break
    assert watched.verdict.reason is CloseReason.FRAME_TIMEOUT


def test_completed_frames_restart_the_frame_clock(pair):
    reaper, decoder, watched = watched_connection(pair, Timeouts(idle=None, frame=2, write=None))
    start = watched._idle_since
    frame = encode_request(1)
    for second in range(6):  # every second: finish the previous frame, start a new one
        decoder.feed(frame[8:] if second else b"")
        decoder.feed(frame[:8])
        watched.bytes_in += 16 if second else 8
        reaper.check(start + second)
    assert watched.verdict is None


def test_blocked_write_times_out_but_slow_progress_does_not(pair):
    reaper, _, watched = watched_connection(pair, Timeouts(idle=None, frame=None, write=3))
    start = watched._idle_since
    watched.writing = True
    reaper.check(start + 1)
    watched.bytes_out += 8  # progress
    reaper.check(start + 2)
    reaper.check(start + 4.9)
    assert watched.verdict is None
    reaper.check(start + 5)
    assert watched.verdict.reason is CloseReason.WRITE_TIMEOUT


def test_throttled_connection_is_not_idle(pair):
    reaper, _, watched = watched_connection(pair, Timeouts(idle=1, frame=None, write=None))
    start = watched._idle_since
    watched.throttled = True
    reaper.check(start + 5)
    assert watched.verdict is None


def test_check_interval_follows_the_shortest_timeout():
    assert Timeouts(idle=300, frame=10, write=30).check_interval == 0.5
    assert Timeouts(idle=1, frame=None, write=None).check_interval == 0.25
    assert Timeouts(idle=None, frame=0.01, write=None).check_interval == 0.05
    assert Timeouts(idle=None, frame=None, write=None).check_interval == 0.5


def test_a_partial_frame_does_not_time_out_while_the_server_is_writing(pair):
    reaper, decoder, watched = watched_connection(pair, Timeouts(idle=None, frame=1, write=3))
    start = watched._idle_since
    decoder.feed(encode_request(1)[:5])
    watched.bytes_in += 5
    watched.writing = True  # blocked sending to a client that does not read
    for tenth in range(1, 30):
        reaper.check(start + tenth / 10)
        assert watched.verdict is None, tenth
    reaper.check(start + 3.1)
    assert watched.verdict.reason is CloseReason.WRITE_TIMEOUT


def test_eviction_takes_the_longest_idle_connections_only(pair):
    reaper = TimeoutReaper(Timeouts(idle=None, frame=None, write=None))
    others = [socket.socketpair() for _ in range(3)]
    try:
        idle_long, idle_short, busy = (reaper.watch(a, FrameDecoder()) for a, _ in others)
        partial = reaper.watch(pair[0], FrameDecoder())
        start = idle_long._idle_since
        idle_long._idle_since = start - 5
        idle_short._idle_since = start - 2
        busy.writing = True  # replies owed: never evicted
        busy._idle_since = start - 9
        partial.decoder.feed(encode_request(1)[:3])  # a frame in progress
        partial.bytes_in = partial._seen_in = 3
        partial._idle_since = start - 9
        assert reaper.evict_idle(start, idle_for=1.0, count=1) == 1
        assert idle_long.verdict.reason is CloseReason.IDLE_EVICTED
        assert idle_short.verdict is None and busy.verdict is None and partial.verdict is None
        assert reaper.evict_idle(start, idle_for=1.0, count=5) == 1  # idle_short only
        assert idle_short.verdict is not None and busy.verdict is None
        assert partial.verdict is None
    finally:
        for a, b in others:
            a.close()
            b.close()
