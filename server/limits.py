"""Who may connect and how fast, for every connection: the allowlist
(``--allow``), the per-IP connection cap (``--max-conns-per-ip``) and the
per-client rate (``--rate``, ``--burst``). A client is an IP; an IPv6 client
is its prefix (``peer_key``), since a host gets a whole /64 for free.

``Limits`` holds them in one process; with ``--processes``, ``SharedLimits``
holds them in a ``PeerTable`` in shared memory, so they hold across the
workers. Both are used alike: ``admit`` when a connection is accepted
(``TurnedAway``, or the client's token bucket when a rate is set) and
``release`` when it closes.

**Rate.** All the connections of a client share one bucket, and a frame is
applied only after its token has been taken, so a client gets at most
``burst + rate x t`` frames over any t seconds, however many connections it
opens. An over-limit client is slowed, not refused: its connection stops
reading until tokens refill (TCP backpressure holds the client back; nothing
it sent is lost). The waiting itself is the connection's
(``server.timeouts.Watched``), so that shutdown and a peer that left can end
it. A bucket outlives the client's connections until it would be full again:
closing every connection and reconnecting does not forget a debt.

**Across workers.** The table holds one entry per client with both its
connection counts (per worker, so the parent can drop a dead worker's:
``forget_worker``) and its token bucket, so the rule above is one rule: an
entry lives while its client has connections, and after that while its
bucket is in debt. Every operation takes an exclusive ``flock`` on a lock
file that each worker opens for itself (the kernel releases it if a worker
dies). The table is an open-addressing hash with linear probing and
backward-shift deletion, sized at twice the connections the server can serve
at once; entries of clients that are gone and rested are swept when a probe
grows long.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import mmap
import os
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

from counter_server.server.errors import CloseReason, TurnedAway

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Drop rested buckets (no connection, full again) when the table has grown to
# twice what the last sweep left, and never below this: amortised O(1) per
# connection, memory proportional to the clients of the last burst/rate seconds.
MIN_SWEEP = 64
# A probe this long for a new entry of the shared table sweeps out the rested
# ones first: with live entries at most half the table, longer probes mean
# stale entries.
LONG_PROBE = 32
_EMPTY = bytes(16)


# --- who a client is -------------------------------------------------------------


def parse_network(raw: str) -> Network:
    """A CIDR such as ``10.0.0.0/8``, ``2001:db8::/32`` or a single address."""
    try:
        return ipaddress.ip_network(raw, strict=False)
    except ValueError:
        raise ValueError(f"not an IPv4 or IPv6 network (CIDR), got {raw!r}") from None


def peer_key(ip: str, ipv6_prefix: int = 64) -> str:
    """What the per-IP limits count ``ip`` as: an IPv4 address is itself; an
    IPv6 one is its /``ipv6_prefix`` network, since a host gets a whole /64
    (or more) of addresses for free."""
    if ":" not in ip:
        return ip
    return str(ipaddress.ip_network(f"{ip}/{ipv6_prefix}", strict=False))


def client_ip(address: tuple) -> str:
    """The peer's IP as text; IPv4-mapped IPv6 (``::ffff:1.2.3.4``) as IPv4."""
    ip = ipaddress.ip_address(address[0].split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def allowed(ip: str, networks: Sequence[Network]) -> bool:
    """Whether ``ip`` is in one of ``networks``. An IPv4 client also
    matches IPv4-mapped IPv6 networks (``::ffff:10.0.0.0/104``)."""
    address = ipaddress.ip_address(ip)
    mapped = ipaddress.IPv6Address(f"::ffff:{ip}") if address.version == 4 else None
    return any(
        address in network or (mapped is not None and mapped in network) for network in networks
    )


# --- in this process -----------------------------------------------------------


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; one token per
    frame applied. The balance never goes below zero: tokens are taken
    before the frames they pay for are applied."""

    __slots__ = ("_clock", "burst", "limiter", "rate", "tokens", "updated", "users")

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        limiter: RateLimiter | None = None,
    ) -> None:
        """``clock`` is injectable so tests need not wait."""
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self._clock = clock
        self.updated = clock()
        self.limiter = limiter
        self.users = 0  # connections sharing this bucket

    def take(self, frames: int) -> tuple[int, float]:
        """Take up to ``frames`` whole tokens (0: only look); returns how many
        were taken and the tokens left."""
        now = self._clock()
        tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        taken = min(frames, int(tokens))
        self.tokens, self.updated = tokens - taken, now
        return taken, self.tokens

    def waited(self, seconds: float) -> None:
        """A connection of this client waited ``seconds`` for tokens."""
        if self.limiter is not None:
            self.limiter.throttled_seconds += seconds

    def full(self) -> bool:
        """Whether the bucket has refilled to its burst (forgetting it then
        loses nothing)."""
        return self.tokens + (self._clock() - self.updated) * self.rate >= self.burst


class RateLimiter:
    """One bucket per client, created on its first connection and dropped
    once it has no connection and is full again."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._sweep_at = MIN_SWEEP
        self.throttled_seconds = 0.0  # time connections waited for tokens, all clients

    def acquire(self, key: str) -> TokenBucket:
        """The bucket of client ``key`` for one more connection."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._sweep()
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self._clock, self)
        bucket.users += 1
        return bucket

    def release(self, key: str) -> None:
        """A connection of client ``key`` closed; its bucket stays while in debt."""
        bucket = self._buckets[key]
        bucket.users -= 1
        if not bucket.users and bucket.full():
            del self._buckets[key]

    def _sweep(self) -> None:
        rested = [key for key, b in self._buckets.items() if not b.users and b.full()]
        for key in rested:
            del self._buckets[key]
        self._sweep_at = max(MIN_SWEEP, 2 * len(self._buckets))

    def __len__(self) -> int:
        """Clients with a bucket (connected, or in debt)."""
        return len(self._buckets)


class Admission:
    """The allowlist and the per-IP cap in this process; ``admit`` and
    ``release`` pair up per connection."""

    def __init__(self, allow: Sequence[Network] = (), max_per_ip: int | None = None) -> None:
        self._allow = tuple(allow)
        self._max_per_ip = max_per_ip
        self._per_ip: dict[str, int] = {}

    def admit(self, ip: str, key: str) -> None:
        """Count a connection from ``ip`` under its peer ``key``; ``TurnedAway``
        with the reason if it may not connect."""
        if self._allow and not allowed(ip, self._allow):
            raise TurnedAway(CloseReason.NOT_ALLOWED)
        if self._max_per_ip is not None:
            count = self._per_ip.get(key, 0)
            if count >= self._max_per_ip:
                raise TurnedAway(CloseReason.PER_IP_LIMIT)
            self._per_ip[key] = count + 1

    def release(self, key: str) -> None:
        """An admitted connection counted under ``key`` has closed."""
        if self._max_per_ip is not None:
            count = self._per_ip[key] - 1
            if count:
                self._per_ip[key] = count
            else:
                del self._per_ip[key]


class Limits:
    """Every limit, in this process."""

    def __init__(
        self,
        allow: Sequence[Network] = (),
        max_per_ip: int | None = None,
        rate: float | None = None,
        burst: int | None = None,
    ) -> None:
        self.admission = Admission(allow, max_per_ip)
        self.rates = RateLimiter(rate, burst) if rate else None

    @property
    def throttled_seconds(self) -> float:
        """Time connections waited for tokens, all clients."""
        return self.rates.throttled_seconds if self.rates is not None else 0.0

    def admit(self, ip: str, key: str) -> TokenBucket | None:
        """Count a connection from ``ip`` (client ``key``); TurnedAway if it
        may not connect; its client's bucket if a rate is set."""
        self.admission.admit(ip, key)
        return self.rates.acquire(key) if self.rates is not None else None

    def release(self, key: str) -> None:
        """An admitted connection of client ``key`` closed."""
        self.admission.release(key)
        if self.rates is not None:
            self.rates.release(key)


# --- across the --processes workers -----------------------------------------------


def _digest(key: str) -> bytes:
    digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
    return digest if digest != _EMPTY else b"\x01" + digest[1:]


class PeerTable:
    """The shared table; create in the parent, ``open`` in each worker."""

    def __init__(self, capacity: int, workers: int, rate: float | None, burst: int | None) -> None:
        self.size = 1 << max(10, (2 * capacity - 1).bit_length())
        self.workers = workers
        self.rate, self.burst = rate, burst
        # digest, tokens, updated, then one connection count per worker
        self._slot = struct.Struct(f"=16sdd{workers}I")
        self.memory = mmap.mmap(-1, self.size * self._slot.size)
        handle, self.lock_path = tempfile.mkstemp(prefix="counter-peers-")
        os.close(handle)
        self._lock_fd = -1

    def open(self) -> None:
        """In a worker, after the fork: a lock descriptor of its own."""
        self._lock_fd = os.open(self.lock_path, os.O_RDWR)

    def remove(self) -> None:
        """Delete the lock file (the parent, at exit)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.lock_path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = self._lock_fd if self._lock_fd >= 0 else os.open(self.lock_path, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            if fd != self._lock_fd:
                os.close(fd)

    # --- slots -----------------------------------------------------------------

    def _read(self, index: int) -> list:
        return list(self._slot.unpack_from(self.memory, index * self._slot.size))

    def _write(self, index: int, fields: Sequence) -> None:
        self._slot.pack_into(self.memory, index * self._slot.size, *fields)

    def _home(self, digest: bytes) -> int:
        return int.from_bytes(digest[:8], "little") % self.size

    def _find(self, digest: bytes, create: bool) -> int | None:
        if not create:
            return self._probe(digest, False, self.size)
        index = self._probe(digest, True, LONG_PROBE)
        if index is None:  # a long probe: sweep out the rested entries first
            self._sweep()
            index = self._probe(digest, True, self.size)
        return index

    def _probe(self, digest: bytes, create: bool, limit: int) -> int | None:
        """The slot of ``digest``, looking at most ``limit`` slots; with
        ``create``, a new entry in the first free one (None if there is none)."""
        index = self._home(digest)
        for _ in range(min(limit, self.size)):
            stored = self.memory[index * self._slot.size : index * self._slot.size + 16]
            if stored == digest:
                return index
            if stored == _EMPTY:
                if not create:
                    return None
                burst = float(self.burst or 0)
                self._write(index, [digest, burst, time.monotonic(), *([0] * self.workers)])
                return index
            index = (index + 1) % self.size
        return None  # full, or past the limit

    def _rested(self, fields: Sequence, now: float) -> bool:
        """An entry with no connection whose bucket is full again (or no rate)."""
        if sum(fields[3:]):
            return False
        return self.rate is None or fields[1] + (now - fields[2]) * self.rate >= self.burst

    def _sweep(self) -> None:
        """Delete every rested entry (backward shift may move another entry
        into the slot just emptied: look at it again)."""
        now, index = time.monotonic(), 0
        while index < self.size:
            fields = self._read(index)
            if fields[0] != _EMPTY and self._rested(fields, now):
                self._delete(index)
                continue
            index += 1

    def _delete(self, index: int) -> None:
        """Backward-shift deletion: keeps every other key reachable."""
        hole, probe = index, index
        while True:
            probe = (probe + 1) % self.size
            fields = self._read(probe)
            if fields[0] == _EMPTY:
                break
            home = self._home(fields[0])
            # Does its home lie after the hole (cyclically, up to the probe)?
            stays = hole < home <= probe if hole < probe else not probe < home <= hole
            if stays:
                continue  # its home is after the hole: it must not move before it
            self._write(hole, fields)
            hole = probe
        self._write(hole, [_EMPTY, 0.0, 0.0, *([0] * self.workers)])

    # --- connections -------------------------------------------------------------

    def enter(self, key: str, worker: int, limit: int | None) -> None:
        """Count a connection of ``key`` on ``worker``; TurnedAway if ``key``
        already has ``limit`` connections across all workers (or the table is full)."""
        digest = _digest(key)
        with self._locked():
            index = self._find(digest, create=True)
            if index is None:
                raise TurnedAway(CloseReason.PER_IP_LIMIT)
            fields = self._read(index)
            if limit is not None and sum(fields[3:]) >= limit:
                raise TurnedAway(CloseReason.PER_IP_LIMIT)
            fields[3 + worker] += 1
            self._write(index, fields)

    def leave(self, key: str, worker: int) -> None:
        """A connection of ``key`` on ``worker`` closed."""
        with self._locked():
            index = self._find(_digest(key), create=False)
            if index is None:
                return
            fields = self._read(index)
            fields[3 + worker] = max(0, fields[3 + worker] - 1)
            if self._rested(fields, time.monotonic()):
                self._delete(index)
            else:
                self._write(index, fields)

    def forget_worker(self, worker: int) -> None:
        """A worker died: its connections are gone (the parent calls this)."""
        with self._locked():
            for index in range(self.size):
                fields = self._read(index)
                if fields[0] != _EMPTY and fields[3 + worker]:
                    fields[3 + worker] = 0
                    self._write(index, fields)
            self._sweep()

    def connections(self, key: str) -> int:
        """Connections of ``key`` across every worker."""
        with self._locked():
            index = self._find(_digest(key), create=False)
            return 0 if index is None else sum(self._read(index)[3:])

    # --- token buckets -----------------------------------------------------------

    def take(self, key: str, frames: int) -> tuple[int, float]:
        """Take up to ``frames`` whole tokens from ``key``'s bucket (0: only
        look); returns how many were taken and the tokens left."""
        with self._locked():
            index = self._find(_digest(key), create=False)
            if index is None:  # not admitted through the table: not limited
                return frames, float(self.burst or 0)
            fields = self._read(index)
            now = time.monotonic()
            tokens = min(self.burst, fields[1] + (now - fields[2]) * self.rate)
            taken = min(frames, int(tokens))
            fields[1], fields[2] = tokens - taken, now
            self._write(index, fields)
        return taken, tokens - taken

    def __len__(self) -> int:
        """Peers with an entry (connected, or in debt)."""
        with self._locked():
            return sum(
                self.memory[i * self._slot.size : i * self._slot.size + 16] != _EMPTY
                for i in range(self.size)
            )


class SharedBucket:
    """A peer's token bucket in the table, with ``TokenBucket``'s interface."""

    __slots__ = ("_key", "_limits", "rate")

    def __init__(self, limits: SharedLimits, key: str) -> None:
        self._limits, self._key = limits, key
        self.rate = limits.table.rate

    def take(self, frames: int) -> tuple[int, float]:
        return self._limits.table.take(self._key, frames)

    def waited(self, seconds: float) -> None:
        self._limits.throttled_seconds += seconds


def limits_for(
    allow: Sequence[Network] = (),
    max_per_ip: int | None = None,
    rate: float | None = None,
    burst: int | None = None,
    table: PeerTable | None = None,
    worker: int = 0,
) -> Limits | SharedLimits | None:
    """The limits asked for, across the workers when they share ``table``
    (this is worker number ``worker``); None when there are none."""
    if table is not None:
        return SharedLimits(table, worker, allow, max_per_ip)
    if allow or max_per_ip is not None or rate:
        return Limits(allow, max_per_ip, rate, burst)
    return None


Bucket = TokenBucket | SharedBucket  # a client's token bucket, as connections use it


class SharedLimits:
    """Every limit, across the ``--processes`` workers: the allowlist here,
    the cap and the rate in the shared ``table``, where entering counts the
    connection and pins its client's bucket in one entry."""

    def __init__(
        self, table: PeerTable, worker: int, allow: Sequence[Network], max_per_ip: int | None
    ) -> None:
        self.table, self._worker = table, worker
        self._allow = Admission(allow)  # the allowlist only: the table counts the cap
        self._max_per_ip = max_per_ip
        self.throttled_seconds = 0.0  # this worker's waits for tokens

    def admit(self, ip: str, key: str) -> SharedBucket | None:
        """As ``Limits.admit``, counted across every worker."""
        self._allow.admit(ip, key)
        self.table.enter(key, self._worker, self._max_per_ip)
        return SharedBucket(self, key) if self.table.rate else None

    def release(self, key: str) -> None:
        """The table keeps the entry while its bucket is in debt."""
        self.table.leave(key, self._worker)
