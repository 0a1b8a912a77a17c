"""The floor for a gevent server: the same StreamServer and pool as ours, but
the loop only counts 16-byte frames and answers each with a rising 8-byte
value — no checksum, no store, no stats, no timeouts. bench/baseline.py
measures it beside our server. Takes the flags bench/run.py passes.

Usage:
  echo.py [options]

Options:
  --host HOST        Address to listen on. [default: 127.0.0.1]
  --port PORT        Port (0 picks a free one). [default: 0]
  --multiplier N     Pool size is NumCPU x N. [default: 20]
  --log-level LEVEL  Accepted for bench/run.py's sake and ignored. [default: info]
  --ready-file PATH  Write the start-up facts here as JSON (server.banner).
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

from counter_server.common.cli import cpu_count, parse_args  # noqa: E402
from counter_server.common.signals import StopSignals  # noqa: E402
from counter_server.server.banner import Ready, write_ready_file  # noqa: E402

_U64 = struct.Struct(">Q")


def handle(sock: socket.socket, _address: tuple) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    value = 0
    while data := sock.recv(65536):
        count = len(data) // 16
        if count == 1:
            value += 1
            sock.send(_U64.pack(value))  # 8 bytes: never a partial write here
        else:
            sock.sendall(struct.pack(f">{count}Q", *range(value + 1, value + count + 1)))
            value += count


def main() -> int:
    args = parse_args(__doc__)
    pool = Pool(cpu_count() * int(args["--multiplier"]))
    server = StreamServer((args["--host"], int(args["--port"])), handle, spawn=pool)
    stop = StopSignals()
    server.start()
    print(f"echo listening on {args['--host']}:{server.server_port} (pool {pool.size})", flush=True)
    if args["--ready-file"]:
        ready = Ready(
            args["--host"], server.server_port, pool.size, cpu_count(),
            int(args["--multiplier"]), os.getpid(),
        )  # fmt: skip
        write_ready_file(args["--ready-file"], ready)
    stop.wait()
    server.stop(timeout=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
