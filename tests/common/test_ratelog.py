"""Rate-limited logging."""

from __future__ import annotations

import logging

from counter_server.common.ratelog import RateLimitedLog


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_suppression_then_summary(caplog):
    clock = FakeClock()
    events = RateLimitedLog(logging.getLogger("t"), interval=10, burst=3, clock=clock)
    with caplog.at_level(logging.INFO, logger="t"):
        logged = [events.log("bad", logging.INFO, "bad frame %d", i) for i in range(10)]
        assert logged == [True] * 3 + [False] * 7
        assert events.log("other", logging.INFO, "other key")  # keys are independent
        clock.now = 10.0
        assert events.log("bad", logging.INFO, "bad frame %d", 10)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "bad frame 0",
        "bad frame 1",
        "bad frame 2",
        "other key",
        "bad frame 10 (7 similar messages suppressed)",
    ]


def test_messages_below_the_level_are_not_counted_either(caplog):
    events = RateLimitedLog(logging.getLogger("quiet"), interval=10, burst=3, clock=FakeClock())
    with caplog.at_level(logging.INFO, logger="quiet"):
        logged = [events.log("peer", logging.DEBUG, "client left %d", i) for i in range(10)]
        events.flush()  # at stop: no summary of lines that were never wanted
    assert logged == [False] * 10
    assert caplog.records == []
