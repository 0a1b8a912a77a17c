"""A bug while serving is logged with its traceback once, then as one line."""

from __future__ import annotations

import logging
import socket

from counter_server.server.cli import parse_settings
from counter_server.server.lifecycle import CounterServer
from counter_server.server.store import MemoryCounterStore


def fail_at_the_same_place() -> None:
    raise RuntimeError("boom")


def test_traceback_once_per_place(caplog):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        server = CounterServer(
            listener, MemoryCounterStore(), parse_settings(["--multiplier", "1"])
        )
        with caplog.at_level(logging.ERROR, logger="counter.server"):
            for _ in range(3):
                try:
                    fail_at_the_same_place()
                except RuntimeError as exc:
                    server._unexpected(("127.0.0.1", 1234), exc)
    records = [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert len(records) == 3
    assert records[0].exc_info is not None
    assert all(not r.exc_info for r in records[1:])
    assert "RuntimeError('boom')" in records[1].getMessage()
