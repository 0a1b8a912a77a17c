"""Helpers for tests that talk to a real server process over loopback.

Everything here uses plain blocking sockets with timeouts, so a test that goes
wrong fails with a message instead of hanging.
"""

from __future__ import annotations

import json
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from protocol import REPLY_SIZE, decode_replies, encode_request

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_SCRIPT = REPO_ROOT / "server" / "server.py"
VECTORS = json.loads((REPO_ROOT.parent / "shared" / "protocol-vectors.json").read_text())
STARTUP_LINE = re.compile(r"listening on (?P<host>\S+):(?P<port>\d+) \(pool (?P<pool>\d+) ")
IO_TIMEOUT = 10.0


@dataclass
class ServerProcess:
    """A server started by ``start_server``; output goes to files, never pipes,
    so a chatty server cannot block on a full pipe."""

    proc: subprocess.Popen
    port: int
    pool_size: int
    stdout_path: Path
    stderr_path: Path
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    _files: list = field(default_factory=list)

    def connect(self, timeout: float = IO_TIMEOUT) -> socket.socket:
        return connect(self.port, timeout)

    def metrics_url(self, path: str = "/metrics") -> str:
        """The metrics endpoint the server logged at start (needs --metrics-port)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            match = re.search(r"metrics on http://(\S+)/metrics", self.stderr_path.read_text())
            if match:
                return f"http://{match[1]}{path}"
            time.sleep(0.05)
        raise AssertionError("the server did not log its metrics address")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for exit (killing it if it overruns) and collect its output."""
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not exit within {timeout}s") from None
        finally:
            self.stdout = self.stdout_path.read_text()
            self.stderr = self.stderr_path.read_text()
            for f in self._files:
                f.close()
        return self.returncode

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait(timeout)


def run_server_command(*args: str, cwd: Path | None = None, timeout: float = 30.0):
    """Run the server's command line to completion (for flag errors, --help)."""
    return subprocess.run(
        [sys.executable, str(SERVER_SCRIPT), *args],
        cwd=cwd or tempfile.gettempdir(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def start_server(
    *args: str, cwd: Path | None = None, script: str | None = None, max_files: int | None = None
) -> ServerProcess:
    """Start the server on a free loopback port and wait for its start-up line
    (with at most ``max_files`` open file descriptors, if given)."""
    workdir = Path(cwd or tempfile.mkdtemp(prefix="counter-test-"))
    out_path = Path(tempfile.mkstemp(prefix="server-out-", suffix=".txt")[1])
    err_path = Path(tempfile.mkstemp(prefix="server-err-", suffix=".txt")[1])
    out, err = out_path.open("w"), err_path.open("w")
    argv = [sys.executable, script or str(SERVER_SCRIPT)]
    if "--port" not in args:
        argv += ["--port", "0"]
    if "--host" not in args:
        argv += ["--host", "127.0.0.1"]

    def limit_files() -> None:
        if max_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

    proc = subprocess.Popen(
        [*argv, *args],
        cwd=workdir,
        stdout=out,
        stderr=err,
        stdin=subprocess.DEVNULL,
        preexec_fn=limit_files,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        match = STARTUP_LINE.search(out_path.read_text())
        if match:
            return ServerProcess(
                proc, int(match["port"]), int(match["pool"]), out_path, err_path, _files=[out, err]
            )
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise AssertionError(
        f"server did not print its start-up line; stdout={out_path.read_text()!r} "
        f"stderr={err_path.read_text()!r}"
    )


def connect(port: int, timeout: float = IO_TIMEOUT) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def frames(*increments: int) -> bytes:
    return b"".join(encode_request(n) for n in increments)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes, or AssertionError if the peer closes first."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def recv_replies(sock: socket.socket, count: int) -> tuple[int, ...]:
    return decode_replies(recv_exactly(sock, count * REPLY_SIZE))


def recv_some_replies(sock: socket.socket, count: int) -> tuple[tuple[int, ...], bool]:
    """Up to ``count`` replies: the whole ones received, and False if the
    server closed the connection before all ``count`` arrived."""
    size = count * REPLY_SIZE
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    whole = len(data) - len(data) % REPLY_SIZE
    return decode_replies(data[:whole]), len(data) == size


def recv_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes the connection."""
    data = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(data)
        data += chunk


def exchange(port: int, *increments: int) -> tuple[int, ...]:
    """Send ``increments`` on a new connection and return their replies."""
    with connect(port) as sock:
        sock.sendall(frames(*increments))
        return recv_replies(sock, len(increments))


def read_counter(port: int) -> int:
    return exchange(port, 0)[0]


def stall_server(port: int, limit_seconds: float = 30.0) -> socket.socket:
    """A connection that floods frames and never reads replies, returned once
    sending has blocked for a second: the server is stuck writing to it."""
    sock = connect(port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    chunk = encode_request(1) * 65536  # 1 MiB of frames
    sock.settimeout(1.0)
    deadline = time.monotonic() + limit_seconds
    while time.monotonic() < deadline:
        try:
            sock.sendall(chunk)
        except TimeoutError:
            return sock
    sock.close()
    raise AssertionError(f"the server kept reading for {limit_seconds}s without stalling")


CLIENT_SCRIPT = REPO_ROOT / "client" / "client.py"


def run_client(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run the client's command line to completion from a temporary directory."""
    return subprocess.run(
        [sys.executable, str(CLIENT_SCRIPT), *args],
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
