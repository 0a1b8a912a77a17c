"""Rate-limited logging, so a flood of bad clients cannot flood the log."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable

_ALL: weakref.WeakSet[RateLimitedLog] = weakref.WeakSet()


def flush_all() -> None:
    """Log every pending "N suppressed" summary (at stop, so none is lost)."""
    for events in list(_ALL):
        events.flush()


class RateLimitedLog:
    """Logs at most ``burst`` messages per ``interval`` seconds for each key.

    Messages over the limit are counted, and the first message of the next
    window says how many were suppressed.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        burst: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._burst = burst
        self._clock = clock
        self._windows: dict[str, list[float]] = {}  # key -> [start, logged, suppressed]
        _ALL.add(self)

    def log(self, key: str, level: int, message: str, *args: object, **kwargs: object) -> bool:
        """Log ``message % args`` under ``key`` unless over the limit; True if logged.

        ``kwargs`` go to ``Logger.log`` (``exc_info=True`` for a traceback).
        A message below the logger's level is neither logged nor counted, so
        no summary line speaks for lines nobody asked to see.
        """
        if not self._logger.isEnabledFor(level):
            return False
        now = self._clock()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self._interval:
            suppressed = int(window[2]) if window else 0
            window = self._windows[key] = [now, 0, 0]
            if suppressed:
                message += " (%d similar messages suppressed)"
                args = (*args, suppressed)
        if window[1] >= self._burst:
            window[2] += 1
            return False
        window[1] += 1
        self._logger.log(level, message, *args, **kwargs)
        return True

    def flush(self) -> None:
        """Log how many messages each key suppressed since its last line."""
        for key, window in self._windows.items():
            if window[2]:
                self._logger.log(
                    logging.INFO,
                    "%d similar messages suppressed (%s)",
                    int(window[2]),
                    key,
                    extra={"event": key, "suppressed": int(window[2])},
                )
                window[2] = 0
