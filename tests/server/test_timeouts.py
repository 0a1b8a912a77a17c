"""The timeout reaper's decisions, driven with a fake clock (no waiting)."""

from __future__ import annotations

import socket

import pytest

from counter_server.protocol import encode_request
from counter_server.server.errors import CloseReason, Stopped
from counter_server.server.limits import TokenBucket
from counter_server.server.timeouts import NS_PER_SECOND, TimeoutReaper, Timeouts


class FakeClock:
    """The reaper's clock (integer nanoseconds), moved by the test:
    ``clock.at(seconds)`` is ``seconds`` after where it started."""

    def __init__(self, start: int = 1019 * NS_PER_SECOND) -> None:
        self.start = self.now = start

    def __call__(self) -> int:
        return self.now

    def at(self, seconds: float) -> None:
        self.now = self.start + round(seconds * NS_PER_SECOND)


def check_at(reaper: TimeoutReaper, clock: FakeClock, seconds: float) -> None:
    clock.at(seconds)
    reaper.check()


def watched_connection(pair, timeouts: Timeouts, clock: FakeClock | None = None):
    clock = clock or FakeClock()
    reaper = TimeoutReaper(timeouts, clock)
    watched = reaper.watch(pair[0])
    return reaper, watched.decoder, watched, clock


def test_idle_connection_times_out_and_is_shut_down(pair):
    reaper, _, watched, clock = watched_connection(pair, Timeouts(idle=5, frame=None, write=None))
    check_at(reaper, clock, 4.9)
    assert watched.verdict is None
    check_at(reaper, clock, 5.0)
    assert watched.verdict.reason is CloseReason.IDLE_TIMEOUT
    assert pair[1].recv(1) == b""  # the reaper shut the socket down
    assert str(watched.verdict) == "idle timeout after 5s"


def test_activity_resets_the_idle_clock(pair):
    reaper, _, watched, clock = watched_connection(pair, Timeouts(idle=5, frame=None, write=None))
    check_at(reaper, clock, 4)
    watched.bytes_in += 16
    check_at(reaper, clock, 6)  # bytes arrived since the last look: not idle
    assert watched.verdict is None
    check_at(reaper, clock, 10.9)
    assert watched.verdict is None
    check_at(reaper, clock, 11)
    assert watched.verdict.reason is CloseReason.IDLE_TIMEOUT


def test_a_trickled_frame_times_out_even_though_bytes_keep_coming(pair):
    reaper, decoder, watched, clock = watched_connection(
        pair, Timeouts(idle=5, frame=2, write=None)
    )
    frame = encode_request(1)
    for second in range(5):
        decoder.feed(frame[second : second + 1])
        watched.bytes_in += 1
        check_at(reaper, clock, second)
        if watched.verdict:
            break
    assert watched.verdict.reason is CloseReason.FRAME_TIMEOUT


def test_completed_frames_restart_the_frame_clock(pair):
    reaper, decoder, watched, clock = watched_connection(
        pair, Timeouts(idle=None, frame=2, write=None)
    )
    frame = encode_request(1)
    for second in range(6):  # every second: finish the previous frame, start a new one
        decoder.feed(frame[8:] if second else b"")
        decoder.feed(frame[:8])
        watched.bytes_in += 16 if second else 8
        check_at(reaper, clock, second)
    assert watched.verdict is None


def test_blocked_write_times_out_but_slow_progress_does_not(pair):
    reaper, _, watched, clock = watched_connection(pair, Timeouts(idle=None, frame=None, write=3))
    watched.writing = True
    check_at(reaper, clock, 1)
    watched.bytes_out += 8  # progress
    check_at(reaper, clock, 2)
    check_at(reaper, clock, 4.9)
    assert watched.verdict is None
    check_at(reaper, clock, 5)
    assert watched.verdict.reason is CloseReason.WRITE_TIMEOUT


def test_throttled_connection_is_not_idle(pair):
    reaper, _, watched, clock = watched_connection(pair, Timeouts(idle=1, frame=None, write=None))
    watched.throttled = True
    check_at(reaper, clock, 5)
    assert watched.verdict is None


def test_check_interval_follows_the_shortest_timeout():
    assert Timeouts(idle=300, frame=10, write=30).check_interval == 0.5
    assert Timeouts(idle=1, frame=None, write=None).check_interval == 0.25
    assert Timeouts(idle=None, frame=0.01, write=None).check_interval == 0.05
    assert Timeouts(idle=None, frame=None, write=None).check_interval == 0.5


def test_a_partial_frame_does_not_time_out_while_the_server_is_writing(pair):
    reaper, decoder, watched, clock = watched_connection(
        pair, Timeouts(idle=None, frame=1, write=3)
    )
    decoder.feed(encode_request(1)[:5])
    watched.bytes_in += 5
    watched.writing = True  # blocked sending to a client that does not read
    for tenth in range(1, 30):
        check_at(reaper, clock, tenth / 10)
        assert watched.verdict is None, tenth
    check_at(reaper, clock, 3.1)
    assert watched.verdict.reason is CloseReason.WRITE_TIMEOUT


def test_eviction_takes_the_longest_idle_connections_only(pair):
    clock = FakeClock()
    reaper = TimeoutReaper(Timeouts(idle=None, frame=None, write=None), clock)
    others = [socket.socketpair() for _ in range(3)]
    try:
        busy = reaper.watch(others[0][0])
        busy.writing = True  # replies owed: never evicted
        partial = reaper.watch(pair[0])
        partial.decoder.feed(encode_request(1)[:3])  # a frame in progress
        partial.bytes_in = partial._seen_in = 3
        clock.at(1)
        idle_long = reaper.watch(others[1][0])
        clock.at(4)
        idle_short = reaper.watch(others[2][0])
        clock.at(6)
        assert reaper.evict_idle(idle_for=1.0, count=1) == 1
        assert idle_long.verdict.reason is CloseReason.IDLE_EVICTED
        assert idle_short.verdict is None and busy.verdict is None and partial.verdict is None
        assert reaper.evict_idle(idle_for=1.0, count=5) == 1  # idle_short only
        assert idle_short.verdict is not None and busy.verdict is None
        assert partial.verdict is None
    finally:
        for a, b in others:
            a.close()
            b.close()


def test_a_frame_trickled_for_as_long_as_an_idle_one_is_evicted_too(pair):
    clock = FakeClock()
    reaper = TimeoutReaper(Timeouts(idle=None, frame=None, write=None), clock)
    trickle = reaper.watch(pair[0])
    trickle.decoder.feed(encode_request(1)[:3])
    trickle.bytes_in = 3
    check_at(reaper, clock, 0.5)  # the reaper sees the frame begin
    trickle.decoder.feed(encode_request(1)[3:5])
    trickle.bytes_in = 5  # a byte now and then: never idle, but the same frame
    check_at(reaper, clock, 1.4)
    assert reaper.evict_idle(idle_for=1.0, count=1) == 0  # under way 0.9 s
    clock.at(1.5)
    assert reaper.evict_idle(idle_for=1.0, count=1) == 1
    assert trickle.verdict.reason is CloseReason.IDLE_EVICTED
    assert str(trickle.verdict) == "no whole frame for 1s or more while the pool was full"


def test_a_tls_handshake_under_way_is_evictable_and_its_end_restarts_the_idle_clock(pair):
    clock = FakeClock()
    reaper = TimeoutReaper(Timeouts(idle=None, frame=None, write=None), clock)
    watched = reaper.watch(pair[0])
    with reaper.handshake(watched):
        clock.at(1.0)
        assert reaper._unused_since(watched) == clock.start  # since its accept
    assert reaper.evict_idle(idle_for=1.0, count=1) == 0  # the handshake just ended
    clock.at(2.0)
    assert reaper.evict_idle(idle_for=1.0, count=1) == 1


def test_a_peer_that_left_while_throttled_is_noticed(pair):
    reaper = TimeoutReaper(Timeouts(idle=None, frame=None, write=None), FakeClock())
    watched = reaper.watch(pair[0])
    watched.throttled = True  # waiting for rate tokens: not reading
    pair[1].sendall(b"\0" * 100)  # unread bytes do not hide the close
    reaper.check()
    assert watched.verdict is None
    pair[1].close()
    reaper.check()
    assert watched.verdict.reason is CloseReason.PEER_CLOSED


def test_after_shutdown_began_a_connection_no_longer_waits_for_tokens(pair):
    reaper = TimeoutReaper(Timeouts(idle=None, frame=None, write=None), FakeClock())
    watched = reaper.watch(pair[0])
    bucket = TokenBucket(rate=0.001, burst=1, clock=lambda: 0.0)  # refills in 1,000 s
    assert watched.paid(bucket, [1]) == ([1], None, 0.0)
    reaper.stop_reading()
    with pytest.raises(Stopped):
        watched.paid(bucket, [1])
    assert watched.verdict is None  # it was not waiting: shut for reading only


def test_a_connection_watched_after_shutdown_began_reads_no_frame(pair):
    reaper = TimeoutReaper(Timeouts(idle=None, frame=None, write=None), FakeClock())
    assert not reaper.watch(pair[0]).stopped
    reaper.stop_reading()
    assert reaper.watch(pair[1]).stopped


def test_the_frames_paid_for_go_now_and_the_rest_wait(pair):
    """A batch is never held back whole for tokens that come one by one:
    waiting batches of one client would share them out and none would go."""
    reaper = TimeoutReaper(Timeouts(idle=None, frame=None, write=None), FakeClock())
    watched = reaper.watch(pair[0])
    bucket = TokenBucket(rate=10, burst=3, clock=lambda: 0.0)
    assert watched.paid(bucket, [1, 2, 3, 4, 5]) == ([1, 2, 3], [4, 5], 0.0)
    assert watched.read_size(TokenBucket(rate=10, burst=3), 2.5, 1024) == (32, 2.5)


@pytest.mark.parametrize("power", [10, 11, 20])
@pytest.mark.parametrize("kind", ["idle", "write", "frame"])
def test_a_limit_passes_exactly_when_it_is_reached_whatever_the_clock_reads(pair, kind, power):
    # The start values where float seconds went wrong: the 5 s before 2^power s.
    for step in range(0, 500, 7):
        start = (2**power) * NS_PER_SECOND - step * NS_PER_SECOND // 100
        timeouts = Timeouts(**{"idle": None, "frame": None, "write": None, kind: 3})
        reaper, decoder, watched, clock = watched_connection(pair, timeouts, FakeClock(start))
        if kind == "write":
            watched.writing = True
        if kind == "frame":
            decoder.feed(encode_request(1)[:5])
            watched.bytes_in += 5
        check_at(reaper, clock, 1)
        if kind == "frame":
            decoder.feed(encode_request(1)[5:] + encode_request(1)[:5])  # a new frame begins
        watched.bytes_in += 16
        watched.bytes_out += 8  # progress, for each kind
        check_at(reaper, clock, 2)
        clock.now = clock.start + 5 * NS_PER_SECOND - 1
        reaper.check()
        assert watched.verdict is None, (start, "1 ns early")
        check_at(reaper, clock, 5)
        assert watched.verdict is not None, (start, "not at the limit")
        assert watched.verdict.reason.value == f"{kind}_timeout"
