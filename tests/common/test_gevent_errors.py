"""gevent's own error reports go through logging, never straight to stderr."""

from __future__ import annotations

import logging

import gevent

from counter_server.common.gevent_errors import log_gevent_errors


def fail() -> None:
    raise OSError(24, "Too many open files")


def test_a_failed_greenlet_is_logged_not_printed(caplog, capfd):
    log_gevent_errors()
    with caplog.at_level(logging.ERROR, logger="counter.gevent"):
        gevent.spawn(fail).join()
        gevent.get_hub().threadpool.spawn(fail)
        gevent.sleep(0.2)
    records = [r for r in caplog.records if r.name == "counter.gevent"]
    assert len(records) == 2, [r.getMessage() for r in records]
    assert "failed with OSError: [Errno 24] Too many open files" in records[0].getMessage()
    assert records[0].exc_info is not None  # the traceback, inside the record
    assert "ThreadPoolWorker" in records[1].getMessage()
    assert capfd.readouterr().err == ""  # nothing bypassed logging
