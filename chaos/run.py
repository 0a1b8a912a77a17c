"""Chaos run: good clients count while every kind of misbehaving client hits
the same server, then checks that the bad ones hurt nobody.

Starts its own server on loopback (short frame and write timeouts, metrics on),
runs 50 good connections sending increments of 1 for the duration while bad
clients of every kind attack (they only ever send zero increments or invalid
frames, so the counter moves by the good clients alone), then checks: the good
clients' replies together are exactly start+1 ... start+N; the server still
answers; its file descriptors are back to the baseline and its RSS within a
margin; it logged no traceback; every bad client was closed and counted under
the right reason. With --sigterm the server is stopped halfway instead, and
the graceful stop is checked against what the good clients were told.

Usage:
  chaos.py [--duration SECS] [--good N] [--sigterm] [--json]
  chaos.py -h | --help

Options:
  --duration SECS  Seconds of counting and attacking. [default: 20]
  --good N         Good client connections. [default: 50]
  --sigterm        Send SIGTERM halfway through and check the graceful stop.
  --json           Print the results as one JSON object instead of a table.

Exit status: 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import time
import urllib.request
from collections import Counter

import gevent
from gevent.pool import Group

from counter_server.client.load import read_counter, recv_exactly
from counter_server.common.cli import convert, cpu_count, parse_args
from counter_server.common.values import positive_int
from counter_server.protocol import MAX_COUNTER, REPLY_SIZE, decode_replies, encode_request
from testing.checker import judge
from testing.launcher import parse_totals, start_server
from testing.procinfo import fd_count, rss_kib

ZERO, ONE = encode_request(0), encode_request(1)
TAMPERED = bytes.fromhex("00000000000000016021b5621680598b")  # checksum of '2' on 1
RSS_MARGIN_KIB = 64 * 1024
SERVER_FLAGS = ["--frame-timeout", "1", "--write-timeout", "2", "--idle-timeout", "10",
                "--shutdown-timeout", "5", "--log-level", "info"]  # fmt: skip


class Harness:
    def __init__(self, port: int) -> None:
        self.port = port
        self.opened = 0
        self.stopping = False
        self.server_stopping = False  # SIGTERM sent (--sigterm)

    def connect(self, timeout: float = 10.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.opened += 1
        return sock

    def read_counter(self) -> int:
        self.opened += 1
        return read_counter("127.0.0.1", self.port)


def _drain(sock: socket.socket) -> tuple[int, str]:
    """Bytes received until the server closed, and how it closed."""
    total = 0
    try:
        while chunk := sock.recv(65536):
            total += len(chunk)
    except ConnectionResetError:
        return total, "reset"
    except TimeoutError:
        return total, "still open"
    return total, "closed"


# --- the bad clients: each returns what it saw -----------------------------------


def garbage(h: Harness) -> str:
    with h.connect() as sock:
        sock.sendall(os.urandom(random.randint(16, 200)))
        got, how = _drain(sock)
    return f"{how}, {got} reply bytes"


def tampered(h: Harness) -> str:
    with h.connect() as sock:
        sock.sendall(ZERO * 3 + TAMPERED + ZERO * 3)
        got, how = _drain(sock)
    return f"{how}, {got // REPLY_SIZE} replies"


def overflow(h: Harness) -> str:
    with h.connect() as sock:
        sock.sendall(encode_request(MAX_COUNTER))
        got, how = _drain(sock)
    return f"{how}, {got} reply bytes"


def reset_mid_frame(h: Harness) -> str:
    sock = h.connect()
    sock.sendall(ZERO)
    recv_exactly(sock, REPLY_SIZE)  # surely accepted and being served
    sock.sendall(ONE[:8])
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST
    return "sent RST"


def half_closed(h: Harness) -> str:
    with h.connect() as sock:
        sock.sendall(ZERO * 3)
        sock.shutdown(socket.SHUT_WR)
        got, how = _drain(sock)
    return f"{how}, {got // REPLY_SIZE} replies"


def slowloris(h: Harness) -> str:
    with h.connect() as sock:
        started = time.monotonic()
        for byte in ONE:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            gevent.sleep(0.3)
            if time.monotonic() - started > 8:
                return "still open"
        sock.settimeout(8)
        _, how = _drain(sock)
    return f"{how} after ~{time.monotonic() - started:.0f}s"


def never_reads(h: Harness) -> str:
    with h.connect() as sock:
        sock.settimeout(10)
        chunk = ZERO * 65536
        try:
            for _ in range(64):
                sock.sendall(chunk)
        except OSError:
            return "closed by server while sending"
    return "never blocked"


def connect_flood(h: Harness, size: int = 300) -> str:
    def one() -> bool:
        try:
            h.connect().close()
            return True
        except OSError:
            return False

    group = Group()
    done = group.map(lambda _: one(), range(size))
    return f"{sum(done)} of {size} connected and left"


def big_write(h: Harness) -> str:
    frames = 4 * 1024 * 1024 // 16
    with h.connect() as sock:
        sock.settimeout(20)
        reader = gevent.spawn(recv_exactly, sock, frames * REPLY_SIZE)
        sock.sendall(ZERO * frames)
        reader.get()
    return f"{frames} replies to one {frames * 16 // 1024 // 1024} MB write"


BAD_KINDS = {
    # kind: (client, expected server verdict, seconds between launches)
    "garbage": (garbage, "refused: checksum", 0.2),
    "tampered checksum": (tampered, "refused: checksum", 0.2),
    "overflow attempt": (overflow, "refused: overflow", 0.3),
    "RST mid-frame": (reset_mid_frame, "closed: reset", 0.3),
    "half-closed": (half_closed, "closed: peer closed", 0.3),
    "slowloris": (slowloris, "closed: frame timeout", 0.5),
    "never reads replies": (never_reads, "closed: write timeout", 1.0),
    "connect flood (300)": (connect_flood, "closed: peer closed", 3.0),
    "several-MB write": (big_write, "closed: peer closed", 2.0),
}


def attack(h: Harness, kind: str, sent: Counter, seen: dict[str, Counter]) -> None:
    client, _, pause = BAD_KINDS[kind]
    group = Group()

    def run() -> None:
        try:
            seen[kind][client(h)] += 1
        except Exception as exc:  # the harness reports it, it does not stop
            seen[kind][f"client error: {type(exc).__name__}: {exc}"] += 1

    while not h.stopping:
        sent[kind] += 300 if client is connect_flood else 1
        group.spawn(run)
        gevent.sleep(pause)
    group.join(timeout=30)


def good_client(h: Harness, replies: list[int], errors: list[str], unanswered: list[int]) -> None:
    """Increments of 1, four in flight, until the run stops; the frames left
    without a reply when the connection ends go to ``unanswered``."""
    try:
        sock = h.connect()
    except OSError as exc:
        errors.append(f"connect: {exc}")
        return
    pending, owed = b"", 0
    with sock:
        try:
            while owed or not h.stopping:
                if not h.stopping and owed < 4:
                    sock.sendall(ONE * (4 - owed))
                    owed = 4
                chunk = sock.recv(4096)
                if not chunk:
                    return  # graceful stop (with --sigterm)
                data = pending + chunk
                count = len(data) // REPLY_SIZE
                pending = data[count * REPLY_SIZE :]
                replies.extend(decode_replies(data[: count * REPLY_SIZE]))
                owed -= count
        except ConnectionResetError as exc:
            # After SIGTERM, frames sent after the server stopped reading may
            # earn a reset once the replies it owed were delivered: not an error.
            if not h.server_stopping:
                errors.append(f"{type(exc).__name__}: {exc}")
        except OSError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            unanswered.append(owed)


# --- the server ---------------------------------------------------------------


def scrape(url: str) -> Counter:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: Counter = Counter()
    for line in text.splitlines():
        if line.startswith("counter_server_"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def closed(reason: str) -> str:
    return f'counter_server_connections_closed_total{{reason="{reason}"}}'


def rejected(reason: str) -> str:
    return f'counter_server_rejected_frames_total{{reason="{reason}"}}'


def run(duration: float, good: int, sigterm: bool) -> dict:
    multiplier = max(1, 200 // cpu_count())
    server = start_server("--metrics-port", "0", "--multiplier", str(multiplier), *SERVER_FLAGS)
    proc, metrics_url = server.proc, server.metrics_url()
    h = Harness(server.port)
    checks: dict[str, tuple[bool, str]] = {}
    try:
        start = h.read_counter()
        before = scrape(metrics_url)
        fds_before, rss_before = fd_count(proc.pid), rss_kib(proc.pid)
        replies: list[int] = []
        unanswered: list[int] = []
        good_errors: list[str] = []
        sent: Counter = Counter()
        seen: dict[str, Counter] = {kind: Counter() for kind in BAD_KINDS}
        goods = [
            gevent.spawn(good_client, h, replies, good_errors, unanswered) for _ in range(good)
        ]
        attackers = [gevent.spawn(attack, h, kind, sent, seen) for kind in BAD_KINDS]
        if sigterm:
            gevent.sleep(duration / 2)
            h.server_stopping = True
            proc.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()
        else:
            gevent.sleep(duration)
        h.stopping = True
        gevent.joinall(goods, timeout=30)
        gevent.joinall(attackers, timeout=60)

        counted = sorted(replies)
        if sigterm:
            code = server.wait(30)
            took = time.monotonic() - stopped_at
            totals = parse_totals(server.stdout)
            final = totals[1] if totals else -1
            checks["graceful stop: exit 0 within the shutdown timeout"] = (
                code == 0 and took < 5 + 5,
                f"exit {code} after {took:.1f}s",
            )
        else:
            final = h.read_counter()
        verdict = judge(start, final, len(counted), sum(unanswered), counted)
        checks["counter within [acknowledged, acknowledged + unanswered], no value twice"] = (
            verdict.ok and len(counted) > 0,
            f"{len(counted):,} replies over {good} connections: {verdict.summary()}",
        )
        checks["every frame applied was answered (the replies owed)"] = (
            final == verdict.low,
            f"counter {final:,}, acknowledged up to {verdict.low:,}",
        )
        if not sigterm:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                after = scrape(metrics_url)
                fds_after = fd_count(proc.pid)
                if after["counter_server_connections_active"] == 0 and fds_after <= fds_before:
                    break
                gevent.sleep(0.2)
            rss_after = rss_kib(proc.pid)
            checks["no file descriptor leaked"] = (
                fds_after <= fds_before,
                f"{fds_before} before, {fds_after} after",
            )
            checks["RSS back within 64 MiB of the baseline"] = (
                rss_after - rss_before <= RSS_MARGIN_KIB,
                f"{rss_before / 1024:.0f} MiB before, {rss_after / 1024:.0f} MiB after",
            )
            checks.update(verdicts(before, after, sent, good, h))
        checks["good clients saw no error"] = (not good_errors, "; ".join(good_errors[:3]))
    finally:
        server.stop(30)
    tracebacks = server.stderr.count("Traceback")
    checks["no traceback in the server's log"] = (tracebacks == 0, f"{tracebacks} tracebacks")
    return {
        "duration_s": duration,
        "sigterm": sigterm,
        "bad_clients": {
            kind: {
                "sent": sent[kind],
                "expected": BAD_KINDS[kind][1],
                "client_saw": dict(seen[kind]),
            }
            for kind in BAD_KINDS
        },
        "good": {"connections": good, "acknowledged": len(counted)},
        "checks": {name: {"ok": ok, "detail": detail} for name, (ok, detail) in checks.items()},
        "ok": all(ok for ok, _ in checks.values()),
    }


def verdicts(before: Counter, after: Counter, sent: Counter, good: int, h: Harness) -> dict:
    """Each bad-client kind against the server's own counts of how it closed them."""

    def delta(name: str) -> int:
        return int(after[name] - before[name])

    checksum = sent["garbage"] + sent["tampered checksum"]
    peer_closed = (
        sent["half-closed"] + sent["connect flood (300)"] + sent["several-MB write"] + good + 1
    )  # + the read of the final value
    expectations = {
        "refused for checksum = garbage + tampered": (delta(rejected("checksum")), checksum),
        "refused for overflow = overflow attempts": (
            delta(rejected("overflow")),
            sent["overflow attempt"],
        ),
        "closed as refused = checksum + overflow clients": (
            delta(closed("refused")),
            checksum + sent["overflow attempt"],
        ),
        "closed by reset = RST clients": (delta(closed("reset")), sent["RST mid-frame"]),
        "closed by frame timeout = slowloris": (delta(closed("frame_timeout")), sent["slowloris"]),
        "closed by write timeout = never-reading": (
            delta(closed("write_timeout")),
            sent["never reads replies"],
        ),
        "closed by peer = half-closed + flood + MB writes + good": (
            delta(closed("peer_closed")),
            peer_closed,
        ),
        "accepted = every connection opened": (
            delta("counter_server_connections_accepted_total"),
            h.opened - 1,  # the first read came before the baseline scrape
        ),
    }
    return {
        name: (got == want, f"server counted {got}, expected {want}")
        for name, (got, want) in expectations.items()
    }


def format_table(result: dict) -> str:
    lines = [f"{'bad client':<22}{'sent':>6}  {'expected handling':<24}what the client saw"]
    for kind, row in result["bad_clients"].items():
        saw = ", ".join(f"{k} x{v}" for k, v in Counter(row["client_saw"]).most_common(2))
        lines.append(f"{kind:<22}{row['sent']:>6}  {row['expected']:<24}{saw}")
    lines.append("")
    for name, check in result["checks"].items():
        detail = f": {check['detail']}" if check["detail"] else ""
        lines.append(f"[{'ok' if check['ok'] else 'FAIL'}] {name}{detail}")
    lines.append("RESULT: " + ("OK" if result["ok"] else "FAILED"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    duration = convert(__doc__, "--duration", args["--duration"], positive_int)
    good = convert(__doc__, "--good", args["--good"], positive_int)
    result = run(duration, good, args["--sigterm"])
    print(json.dumps(result) if args["--json"] else format_table(result), flush=True)
    return 0 if result["ok"] else 1
