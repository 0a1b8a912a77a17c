"""The floor for a gevent server: the same StreamServer and pool as ours, but
the loop only counts 16-byte frames and answers each with a rising 8-byte
value — no checksum, no store, no stats, no timeouts. bench/baseline.py
measures it beside our server. Takes the flags bench/run.py passes.

Usage:
  echo.py --host HOST --port PORT [--multiplier N] [--log-level LEVEL]
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402

from gevent.pool import Pool  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.cli import cpu_count, parse_args  # noqa: E402
from common.signals import StopSignals  # noqa: E402


def handle(sock: socket.socket, _address: tuple) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    value = 0
    while data := sock.recv(65536):
        count = len(data) // 16
        sock.sendall(struct.pack(f">{count}Q", *range(value + 1, value + count + 1)))
        value += count


def main() -> int:
    args = parse_args(__doc__)
    pool = Pool(cpu_count() * int(args["--multiplier"] or 20))
    server = StreamServer((args["--host"], int(args["--port"])), handle, spawn=pool)
    stop = StopSignals()
    server.start()
    print(f"echo listening on {args['--host']}:{server.server_port} (pool {pool.size})", flush=True)
    stop.wait()
    server.stop(timeout=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
