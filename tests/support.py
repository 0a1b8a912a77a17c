"""Helpers for tests that talk to a real server process over loopback.

Everything here uses plain blocking sockets with timeouts, so a test that goes
wrong fails with a message instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from counter_server.client import load
from counter_server.protocol import REPLY_SIZE, decode_replies, encode_request
from counter_server.server.store.statefile import Slot, decode_file
from install_servers import PACKAGES
from testing.checker import Verdict, judge
from testing.launcher import SERVER_SCRIPT, ServerProcess, start_server
from testing.stores import EtcdCluster, RedisServer, Sentinel, free_port, wait_until

__all__ = [
    "SERVER_SCRIPT", "EtcdCluster", "RedisServer", "Sentinel", "ServerProcess", "Verdict",
    "free_port", "judge", "start_server", "wait_until",
]  # fmt: skip

REPO_ROOT = Path(__file__).resolve().parent.parent
# The test vectors, cross-checked against the Go library (docs/protocol.md).
VECTORS = json.loads((REPO_ROOT / "docs" / "protocol-vectors.json").read_text())
IO_TIMEOUT = 10.0


def documented(text: str, doc: str = "operations.md") -> str:
    """``text``, after checking that ``docs/<doc>`` says it (wherever lines
    break); a test that compares it with what a program prints then keeps
    the doc and the program in step."""
    flat = " ".join((REPO_ROOT / "docs" / doc).read_text().split())
    assert text in flat, f"docs/{doc} no longer says {text!r}"
    return text


def require(*programs: str) -> None:
    """Skip the calling test when a program it needs is not installed, naming
    the package; under CI (``CI`` set), fail instead: nothing is skipped there.
    ``pytest.mark.needs(*programs)`` does the same for a whole test or module."""
    import pytest

    missing = [program for program in programs if shutil.which(program) is None]
    if not missing:
        return
    why = (
        f"{', '.join(missing)} not installed "
        f"(python3 tests/install_servers.py installs "
        f"{' '.join(sorted({PACKAGES.get(m, m) for m in missing}))})"
    )
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI runs every test", pytrace=False)
    pytest.skip(why)


def start_tls_server(pki: dict, *extra: str) -> ServerProcess:
    """A server with TLS on, its certificate from the ``pki`` fixture."""
    return start_server("--tls-cert", pki["server_cert"], "--tls-key", pki["server_key"], *extra)


def run_server_command(
    *args: str, cwd: Path | None = None, timeout: float = 30.0, env: dict | None = None
):
    """Run the server's command line to completion (for flag errors, --help)."""
    return subprocess.run(
        [sys.executable, str(SERVER_SCRIPT), *args],
        cwd=cwd or tempfile.gettempdir(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def http_get(url: str) -> tuple[int, str]:
    """(status, body) of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=IO_TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (``url``), by full sample name."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(http_get(url)[1]):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"no sample {name}{labels or ''} at {url}")


def state_on_disk(path) -> Slot:
    """The newest slot of the state file at ``path``."""
    with open(path, "rb") as f:
        return decode_file(str(path), f.read())


def connect(port: int, timeout: float = IO_TIMEOUT) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def connect_from(source: str, port: int, host: str = "127.0.0.1") -> socket.socket:
    """A connection whose source address is ``source`` (any 127.x works on Linux)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect((host, port))
    return sock


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closed ``sock``; fails if it takes longer."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        raise AssertionError(f"still open after {seconds}s") from None
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def closed_without_reply(sock: socket.socket) -> bool:
    """True once the server closed ``sock`` (FIN or RST) without a byte."""
    try:
        return recv_until_closed(sock) == b""
    except ConnectionResetError:
        return True


# --- timeouts ---------------------------------------------------------------


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


def unread_at(port: int) -> int:
    """Bytes waiting unread in the sockets of the server on local ``port``
    (its established TCP connections, from /proc/net/tcp and tcp6)."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                local, state, queues = fields[1], fields[3], fields[4]
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                    total += int(queues.split(":")[1], 16)
    return total


def served_within(port: int, seconds: float, *increments: int) -> tuple[int, ...]:
    """The replies to ``increments`` on the first connection the server
    serves within ``seconds``; connections it closes unanswered (a slot not
    yet given back) are tried again."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return exchange(port, *increments)
        except (AssertionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def try_increment(port: int, n: int = 1) -> int | None:
    """The reply to one increment on a new connection, or None if the server
    closed it without one (a refusal, its store unavailable)."""
    with connect(port) as sock:
        sock.sendall(frames(n))
        replies, whole = recv_some_replies(sock, 1)
        return replies[0] if whole else None


class Tally:
    """Increments of 1 sent one at a time, each on a new connection: the
    values acknowledged, and how many went unanswered (the checker's two
    sides: each of those may or may not have been applied)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.acknowledged: list[int] = []
        self.unanswered = 0

    def increment(self) -> bool:
        """One increment; whether it was acknowledged."""
        value = try_increment(self.port)
        if value is None:
            self.unanswered += 1
        else:
            self.acknowledged.append(value)
        return value is not None

    def verdict(self, start: int, final: int) -> Verdict:
        return judge(start, final, len(self.acknowledged), self.unanswered, self.acknowledged)


def read_counter(port: int) -> int:
    return load.read_counter("127.0.0.1", port, IO_TIMEOUT)


def stall_server(port: int, limit_seconds: float = 30.0) -> socket.socket:
    """A connection that floods frames and never reads replies, returned once
    the server has stopped reading from it for two seconds in a row with
    bytes waiting unread (it is then stuck writing replies the client does
    not read), or once the server closed it after it stalled (a short
    --write-timeout)."""
    deadline = time.monotonic() + limit_seconds
    while time.monotonic() < deadline:
        sock = _flood_until_stalled(port, deadline)
        if sock is not None:
            return sock
    raise AssertionError(f"the server kept reading for {limit_seconds}s without stalling")


def _flood_until_stalled(port: int, deadline: float) -> socket.socket | None:
    """One try of ``stall_server``: the connection, or None (closed) if the
    client's sends stalled while nothing waited unread at the server. Then
    the server had read everything and waits in recv, its replies queued in
    the kernel: it is not stuck and would not hold a stop (seen 1 run in 30;
    the client's view of the server's window stays closed)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    sock.settimeout(IO_TIMEOUT)
    sock.connect(("127.0.0.1", port))
    flood = memoryview(encode_request(1) * 65536)  # 1 MiB of frames
    offset = 0  # where the stream is in the flood, so frames stay whole
    sock.settimeout(1.0)
    stalled = 0
    while time.monotonic() < deadline:
        try:
            offset = (offset + sock.send(flood[offset:])) % len(flood)
            stalled = 0
        except TimeoutError:
            stalled += 1
            if stalled == 2:
                if unread_at(port) > 0:
                    return sock
                break
        except (ConnectionResetError, BrokenPipeError):
            if stalled:  # it stalled, then a write timeout closed it: as good
                return sock
            raise
    sock.close()
    return None


CLIENT_SCRIPT = REPO_ROOT / "client" / "client.py"


def start_client(*args: str) -> subprocess.Popen:
    """Start the client's command line (output piped, text) and return at once."""
    return subprocess.Popen(
        [sys.executable, str(CLIENT_SCRIPT), *args],
        cwd=tempfile.gettempdir(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


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


# --- fault runs ---------------------------------------------------------------


class Load:
    """Connections sending increments of 1, ``depth`` frames at a time, to
    ``ports`` in turn, reconnecting when a connection ends; every reply kept
    with its time, and every frame sent without a reply counted (the
    checker's "unanswered": it may or may not have been applied)."""

    def __init__(self, ports: list[int], connections: int, depth: int = 1) -> None:
        self.replies: list[tuple[float, int]] = []
        self.unanswered = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(ports[i % len(ports)], depth), daemon=True)
            for i in range(connections)
        ]
        for thread in self.threads:
            thread.start()

    def _run(self, port: int, depth: int) -> None:
        while not self.stop.is_set():
            try:
                sock = connect(port, timeout=5.0)
            except OSError:
                self.stop.wait(0.05)
                continue
            with sock:
                while not self.stop.is_set():
                    try:
                        sock.sendall(frames(*[1] * depth))
                    except OSError:  # part of it may have reached the server
                        with self.lock:
                            self.unanswered += depth
                        break
                    try:
                        got, whole = recv_some_replies(sock, depth)
                    except OSError:
                        got, whole = (), False
                    now = time.monotonic()
                    with self.lock:
                        self.replies.extend((now, v) for v in got)
                        self.unanswered += depth - len(got)
                    if not whole:
                        break
            self.stop.wait(0.05)

    def finish(self, seconds: float = 30.0) -> list[int]:
        """Stop, and the reply values received."""
        self.stop.set()
        for thread in self.threads:
            thread.join(seconds)
        assert not any(t.is_alive() for t in self.threads), "a load thread did not end"
        return [v for _, v in self.replies]

    def last_reply(self) -> float:
        with self.lock:
            return max((t for t, _ in self.replies), default=0.0)

    def largest_before(self, moment: float) -> int:
        """The largest reply value received before ``moment`` (0: none)."""
        with self.lock:
            return max((v for t, v in self.replies if t < moment), default=0)

    def verdict(self, start: int, final: int) -> Verdict:
        """The checker's verdict on this load (after ``finish``)."""
        values = [v for _, v in self.replies]
        return judge(start, final, len(values), self.unanswered, values)


def assert_exact(verdict: Verdict) -> None:
    """Fail with every figure unless the run was exact (both bounds)."""
    assert verdict.ok, verdict.summary()
    print(f"\n{verdict.summary()}")


class LoopbackListener:
    """A listener on a free loopback port (``port``, ``address``) whose
    connections are each handed to ``_took`` on the accepting thread;
    ``close`` stops it, shuts down every socket it holds and joins its
    (daemon) threads with a bound."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(conn)
            self._took(conn)

    def _took(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes the accept (close alone does not)
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(5)


class AnswerProxy(LoopbackListener):
    """A TCP proxy on loopback in front of ``port`` whose answers can be
    dropped: requests always pass, and while ``drop`` is set whatever the
    upstream answers is read and thrown away (a lost answer)."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.drop = threading.Event()
        self.dropped = 0  # answer bytes thrown away
        super().__init__()

    def _took(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
        except OSError:
            client.close()  # upstream is down: as the client would find it
            return
        server.settimeout(None)
        self._sockets.append(server)
        self._spawn(self._pump, client, server, False)
        self._spawn(self._pump, server, client, True)

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        try:
            while data := source.recv(65536):
                if answers and self.drop.is_set():
                    self.dropped += len(data)
                    continue
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class StandIn(LoopbackListener):
    """A stand-in server on loopback: each connection is handed to
    ``behaviour`` on a thread of its own (``None``: accepted, held open and
    never answered); ``accepted`` counts the connections it took. A context
    manager: leaving it closes everything it holds."""

    def __init__(self, behaviour: Callable[[socket.socket], None] | None = None) -> None:
        self._behaviour = behaviour
        self.accepted = 0
        super().__init__()

    def _took(self, conn: socket.socket) -> None:
        self.accepted += 1
        if self._behaviour is not None:
            self._spawn(self._run, conn)

    def _run(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(IO_TIMEOUT)
            self._behaviour(conn)

    def __enter__(self) -> StandIn:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class HangsUpFirst(LoopbackListener):
    """A stand-in server on loopback: it closes each of its first
    ``hang_ups`` connections once a frame arrives (unanswered), then answers
    every frame on later connections with ``value``. ``accepted`` counts
    the connections it took."""

    def __init__(self, hang_ups: int, value: int) -> None:
        self.hang_ups = hang_ups
        self.reply = value.to_bytes(REPLY_SIZE, "big")
        self.accepted = 0
        super().__init__()

    def _took(self, conn: socket.socket) -> None:
        self.accepted += 1
        self._spawn(self._serve, conn, self.accepted)

    def _serve(self, conn: socket.socket, number: int) -> None:
        with conn, contextlib.suppress(OSError, AssertionError):
            conn.settimeout(IO_TIMEOUT)
            while recv_exactly(conn, 16):
                if number <= self.hang_ups:
                    return
                conn.sendall(self.reply)
