"""gevent's own error reports through ``logging``.

gevent's hub prints tracebacks of failed greenlets and callbacks (the
accept loop, the thread pool, the hub) straight to stderr, bypassing
logging: with ``--log-format json`` those lines are not JSON, and a storm of
them floods the log. ``log_gevent_errors`` routes them to the
``counter.gevent`` logger instead, rate-limited per kind of error, with the
traceback attached the first time (as ``exc_info``, so a JSON formatter keeps
it inside the object).
"""

from __future__ import annotations

import logging

from gevent.hub import Hub

from counter_server.common.ratelog import RateLimitedLog

log = logging.getLogger("counter.gevent")
_events = RateLimitedLog(log)
_seen: set[tuple] = set()


def _print_exception(hub: Hub, context: object, t: type, v: BaseException, tb) -> None:
    try:
        where = hub.format_context(context) if context is not None else "the hub"
    except Exception:
        where = repr(context)
    key = (t, str(where).split(" ", 1)[0])
    first = key not in _seen
    _seen.add(key)
    _events.log(
        f"gevent:{t.__name__}",
        logging.ERROR,
        "%s failed with %s: %s",
        where,
        t.__name__,
        v,
        exc_info=(t, v, tb) if first else None,
    )


def log_gevent_errors() -> None:
    """From now on, every gevent hub (thread pool threads' included) logs its
    error reports instead of printing them."""
    Hub.print_exception = _print_exception
