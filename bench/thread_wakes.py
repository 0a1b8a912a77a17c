"""The most calls per second 40 threads of one process can finish on one
CPU when each call ends by being woken, as a CounterClient call from a thread
does: each thread waits on a lock of its own, and one thread releases the
locks of those waiting, in batches, doing nothing else (no socket, no
library). The ceiling for bench/library.py's "40 threads" line.

Usage:
  thread_wakes.py [--duration SECS] [--cpu N]

Options:
  --duration SECS  Seconds to run. [default: 3]
  --cpu N          The CPU to pin the process to. [default: 1]
"""

from __future__ import annotations

import os
import sys
import threading
import time

from docopt import docopt

THREADS = 40  # as bench/library.py's callers


def wakes_per_second(duration: float) -> float:
    locks = [threading.Lock() for _ in range(THREADS)]
    for lock in locks:
        lock.acquire()
    waiting: list[int] = []
    guard = threading.Lock()
    woken = [0] * THREADS
    stop = time.monotonic() + duration

    def caller(index: int) -> None:
        while time.monotonic() < stop:
            with guard:
                waiting.append(index)
            locks[index].acquire()
            woken[index] += 1

    def waker() -> None:
        while time.monotonic() < stop + 0.5:
            with guard:
                batch = waiting[:]
                waiting.clear()
            for index in batch:
                locks[index].release()
            if not batch:
                time.sleep(0)

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(THREADS)]
    threads.append(threading.Thread(target=waker, daemon=True))
    for thread in threads:
        thread.start()
    time.sleep(duration)
    return sum(woken) / duration


def main() -> int:
    args = docopt(__doc__)
    os.sched_setaffinity(0, {int(args["--cpu"])})
    rate = wakes_per_second(float(args["--duration"]))
    print(f"{THREADS} threads on one CPU, each call ended by a wake-up: {rate:,.0f} calls/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
