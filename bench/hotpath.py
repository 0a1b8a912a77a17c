"""The pure-Python part of the hot path, without sockets: decode a read of
N identical frames, apply it to the in-memory store, pack the replies
(timeit, best of --repeat); and what applying costs in the --processes
store (shared memory under its semaphore) beside the in-memory one. Compare
runs of one machine.

Usage:
  hotpath.py [--repeat N]
  hotpath.py -h | --help

Options:
  --repeat N  timeit repeats; the best is printed. [default: 5]
"""

from __future__ import annotations

import sys
import timeit
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from counter_server.common.cli import convert, parse_args
from counter_server.common.values import positive_int
from counter_server.protocol import FrameDecoder, encode_replies, encode_request
from counter_server.server.store import MemoryCounterStore
from counter_server.server.store.shared import SharedCounter


def per_call_us(function, number: int, repeat: int) -> float:
    return min(timeit.repeat(function, number=number, repeat=repeat)) / number * 1e6


def main() -> int:
    args = parse_args(__doc__)
    repeat = convert(__doc__, "--repeat", args["--repeat"], positive_int)
    print("frames per read   decode us   apply us   pack us   total us   per frame us")
    for frames in (1, 64):
        data = encode_request(1) * frames
        decoder, store = FrameDecoder(), MemoryCounterStore()
        increments = decoder.feed(data)
        replies = store.apply(increments)
        number = 200_000 // frames
        decode = per_call_us(partial(decoder.feed, data), number, repeat)
        apply = per_call_us(partial(store.apply, increments), number, repeat)
        pack = per_call_us(partial(encode_replies, replies), number, repeat)
        total = decode + apply + pack
        print(f"{frames:>15} {decode:>11.2f} {apply:>10.2f} {pack:>9.2f} {total:>10.2f}"
              f" {total / frames:>14.3f}")  # fmt: skip
    shared = SharedCounter().open_store()
    memory = MemoryCounterStore()
    print("\napply of one frame    in memory us   --processes store us")
    print(f"{'':>20} {per_call_us(partial(memory.apply, [1]), 200_000, repeat):>14.2f}"
          f" {per_call_us(partial(shared.apply, [1]), 200_000, repeat):>22.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
