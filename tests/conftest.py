"""Shared fixtures: a real server process on loopback, stopped after the test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import settings
from support import ServerProcess, start_server

# Shared CI machines stall now and then: judge examples by outcome, not speed.
settings.register_profile("counter", deadline=None)
settings.load_profile("counter")


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    """A server with default settings on a free loopback port."""
    proc = start_server()
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.stop()
        assert "Traceback" not in proc.stderr, proc.stderr
