"""Partition run, in the manner of Jepsen: hosts made of network namespaces
on a bridge, the store's nodes spread over them, two counter instances on
hosts of their own, clients that record every reply, and faults (nemeses)
between them. Then, per backend and nemesis, the checker's verdict
(testing/checker.py): increments acknowledged and unanswered (sent, no reply:
maybe applied), the final value and the range it must lie in, [acknowledged,
acknowledged + unanswered], how far below (lost) or above (extra) it is,
values handed out twice, and the longest time without an acknowledgement.

Hosts (10.77.N.1-6 on a bridge): h1-h3 hold the store (etcd: one member each;
Redis: h1 the primary and a sentinel, h2 a replica, h3 a replica and a
sentinel, h4 a sentinel), h5 and h6 a counter instance and its clients each.

Nemeses:
  kill     kill -9 the primary (etcd: the leader), restarted at the heal
  failover a planned failover, nothing broken: SENTINEL FAILOVER (etcd:
           etcdctl move-leader)
  isolate  cut the primary's host off from every other host
  split    Redis: {primary, one replica} cut off from {the other replica, the
           sentinels' majority}; etcd: the leader cut off from both followers.
           The instances still reach every host.

Needs root (ip netns, veth, a bridge), etcd, redis-server and
redis-sentinel. Everything it creates is removed at the end, Ctrl-C included.

Usage:
  partition.py [--backends LIST] [--nemeses LIST] [--before SECS] [--fault SECS]
               [--after SECS] [--connections N] [--json]
  partition.py --record ADDRESS --out FILE --connections N
  partition.py -h | --help

Options:
  --backends LIST   Comma-separated: etcd, redis-replicas-0, redis-replicas-1,
                    redis-replicas-all.
                    [default: etcd,redis-replicas-0,redis-replicas-1,redis-replicas-all]
  --nemeses LIST    Comma-separated: kill, failover, isolate, split.
                    [default: kill,failover,isolate,split]
  --before SECS     Seconds of load before the fault. [default: 5]
  --fault SECS      Seconds the fault lasts before the heal. [default: 25]
  --after SECS      Seconds of load after the heal. [default: 10]
  --connections N   Client connections per instance. [default: 4]
  --json            Print the results as JSON lines instead of a table.
  --record ADDRESS  (internal) record replies from ADDRESS until SIGTERM.
  --out FILE        (internal) where the recorder writes them.

Exit status: 0 when every run finished (whatever it measured), 1 if a run
could not be set up, 2 when this machine cannot make the hosts.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from counter_server.common.cli import convert, parse_args
from counter_server.common.values import positive_int
from counter_server.protocol import decode_replies, encode_request
from testing.checker import judge
from testing.launcher import start_server
from testing.stores import (
    EtcdCluster,
    NotReady,
    RedisServer,
    Sentinel,
    end,
    launch,
    wait_until,
)

BOGUS_MAC = "02:00:00:00:00:01"  # neighbour entries pointing here drop silently
PORT = 8080
SETTLE_SECONDS = 60  # at most, for the store to settle after the heal


class CannotRun(Exception):
    """This machine cannot make the hosts (not root, no ip netns)."""


# --- hosts ------------------------------------------------------------------


class Network:
    """A bridge and ``count`` hosts (network namespaces) on it."""

    made = 0  # networks made by this process: each run has names of its own

    def __init__(self, count: int) -> None:
        Network.made += 1
        tag = f"{os.getpid() % 1000}{Network.made}"
        self.bridge = f"cpb{tag}"
        self.subnet = f"10.77.{int(tag) % 250}"
        self.hosts = [f"cp{tag}h{i}" for i in range(1, count + 1)]
        self.created: list[str] = []  # namespaces made, for the teardown
        self.cuts: set[tuple[int, int]] = set()

    def ip(self, host: int) -> str:
        return f"{self.subnet}.{host}"

    def run_in(self, host: int) -> list[str]:
        """The prefix that runs a command on ``host``."""
        return ["ip", "netns", "exec", self.hosts[host - 1]]

    def create(self) -> None:
        if os.geteuid() != 0:
            raise CannotRun("needs root (ip netns, veth pairs, a bridge)")
        if shutil.which("ip") is None:
            raise CannotRun("needs ip (apt-get install iproute2)")
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        for number, name in enumerate(self.hosts, 1):
            _ip("netns", "add", name)
            self.created.append(name)
            outside = f"{name}v"
            _ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", name)
            _ip("link", "set", outside, "master", self.bridge, "up")
            _ip("-n", name, "addr", "add", f"{self.ip(number)}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")

    def cut(self, side_a: list[int], side_b: list[int]) -> None:
        """Every packet between the two sides silently dropped."""
        for a, b in itertools.product(side_a, side_b):
            for here, there in ((a, b), (b, a)):
                _ip("-n", self.hosts[here - 1], "neigh", "replace", self.ip(there),
                    "lladdr", BOGUS_MAC, "dev", "eth0", "nud", "permanent")  # fmt: skip
                self.cuts.add((here, there))

    def heal(self) -> None:
        for here, there in sorted(self.cuts):
            _ip("-n", self.hosts[here - 1], "neigh", "del", self.ip(there), "dev", "eth0",
                check=False)  # fmt: skip
        self.cuts.clear()

    def teardown(self) -> None:
        for name in self.created:
            _ip("link", "del", f"{name}v", check=False)
            _ip("netns", "del", name, check=False)
        self.created.clear()
        _ip("link", "del", self.bridge, check=False)


def _ip(*args: str, check: bool = True) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode:
        raise CannotRun(f"ip {' '.join(args)}: {result.stderr.strip()}")


# --- the stores ---------------------------------------------------------------


class EtcdStore:
    """Three etcd members on h1-h3."""

    name = "etcd"
    hosts = (1, 2, 3)

    def __init__(self, net: Network, workdir: Path) -> None:
        self.net = net
        self.cluster = EtcdCluster(workdir, hosts=[net.ip(h) for h in self.hosts],
                                   run_in=[net.run_in(h) for h in self.hosts],
                                   ask_from=net.run_in(5))  # fmt: skip

    def url(self) -> str:
        return self.cluster.url()

    def start(self) -> None:
        self.cluster.start()

    def ready(self) -> None:
        wait_until(lambda: self.primary() is not None, 30, "an etcd leader")

    def primary(self) -> int | None:
        """The leader's host."""
        leader = self.cluster.leader()
        return _host(self.cluster.hosts[leader]) if leader else None

    def kill_primary(self) -> int:
        leader = self.cluster.leader()
        self.cluster.kill(leader)
        return _host(self.cluster.hosts[leader])

    def restart(self, host: int) -> None:
        self.cluster.start(self.cluster.names[self.hosts.index(host)], state="existing")

    def planned_failover(self) -> int:
        leader = self.primary()
        self.cluster.move_leader()
        return leader

    def split(self, leader: int) -> tuple[list[int], list[int]]:
        return [leader], [h for h in self.hosts if h != leader]

    def final(self) -> int:
        wait_until(lambda: self.cluster.get().isdigit(), SETTLE_SECONDS,
                   "etcd answering after the heal")  # fmt: skip
        return int(self.cluster.get())

    def kill(self) -> None:
        self.cluster.kill()


class RedisStore:
    """Primary (h1) and a sentinel, replica (h2), replica and a sentinel (h3),
    a sentinel (h4)."""

    hosts = (1, 2, 3, 4)
    sentinel_hosts = (1, 3, 4)

    def __init__(self, net: Network, workdir: Path, replicas: str) -> None:
        self.net, self.workdir, self.replicas = net, workdir, replicas
        self.name = f"redis-replicas-{replicas}"
        self.servers: dict[int, RedisServer] = {}
        self.sentinels: list[Sentinel] = []

    def url(self) -> str:
        sentinels = ",".join(f"{s.host}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{sentinels}/primary/0?key=counter&replicas={self.replicas}"

    def _server(self, host: int, *extra: str) -> None:
        ip = self.net.ip(host)
        self.servers[host] = RedisServer(
            self.workdir, "--protected-mode", "no", "--repl-diskless-sync-delay", "0",
            "--replica-announce-ip", ip, "--dbfilename", f"dump-{host}.rdb", *extra,
            durable=False, host=ip, port=6379, run_in=self.net.run_in(host),
            ask_from=self.net.run_in(5), name=f"redis-{host}",
        )  # fmt: skip
        self.servers[host].start()

    def start(self) -> None:
        self._server(1)
        for host in (2, 3):
            self._server(host, "--replicaof", self.net.ip(1), "6379")
        wait_until(lambda: self.servers[1].cli("info", "replication").count("state=online") == 2,
                   30, "both replicas in sync")  # fmt: skip
        for h in self.sentinel_hosts:  # each kept as it starts: the teardown kills it
            self.sentinels.append(Sentinel(self.workdir, self.servers[1], host=self.net.ip(h),
                                           port=26379, run_in=self.net.run_in(h),
                                           ask_from=self.net.run_in(5)))  # fmt: skip

    def ready(self) -> None:
        wait_until(lambda: all(s.primary() == self.servers[1].address for s in self.sentinels),
                   30, "sentinels watching")  # fmt: skip
        time.sleep(2)  # the sentinels discover each other and the replicas

    def primary(self) -> int | None:
        named = next((address for s in self.sentinels if (address := s.primary())), None)
        return _host(named[0]) if named else None

    def kill_primary(self) -> int:
        primary = self.primary()
        self.servers[primary].kill()
        return primary

    def restart(self, host: int) -> None:
        self.servers[host].start()  # empty; the sentinels make it a replica of the new primary

    def planned_failover(self) -> int:
        """SENTINEL FAILOVER: promote a replica though nothing failed."""
        primary = self.primary()
        answer = self.sentinels[0].cli("sentinel", "failover", "primary")
        if answer != "OK":
            raise RuntimeError(f"SENTINEL FAILOVER: {answer}")
        return primary

    def split(self, primary: int) -> tuple[list[int], list[int]]:
        # {primary, replica on h2} against {replica + sentinel on h3, sentinel on h4}.
        return [1, 2], [3, 4]

    def final(self) -> int:
        def read() -> int | None:
            primary = self.primary()
            if primary is None:
                return None
            role = self.servers[primary].cli("role")
            value = self.servers[primary].cli("get", "counter")
            return int(value) if role.startswith("master") and value.isdigit() else None

        wait_until(lambda: read() is not None, SETTLE_SECONDS, "a Redis primary after the heal")
        time.sleep(3)  # the sentinels settle which primary wins
        return read()

    def kill(self) -> None:
        for process in [*self.sentinels, *self.servers.values()]:
            process.kill()


def _host(ip: str) -> int:
    """The number of the host at ``ip``."""
    return int(ip.rsplit(".", 1)[1])


# --- clients ------------------------------------------------------------------


def record(address: str, out: str, connections: int) -> int:
    """(Inside an instance's host) connections incrementing by 1 until
    SIGTERM, reconnecting when closed; written to ``out``: every reply as
    [time, value] (monotonic clock, shared by every namespace) and how many
    frames were sent without a reply (the checker's "unanswered")."""
    host, port = address.rsplit(":", 1)
    stop = threading.Event()
    replies: list[tuple[float, int]] = []
    unanswered = [0]
    lock = threading.Lock()
    frame = encode_request(1)

    def run() -> None:
        while not stop.is_set():
            try:
                sock = socket.create_connection((host, int(port)), timeout=2)
            except OSError:
                stop.wait(0.05)
                continue
            with sock:
                while not stop.is_set():
                    try:
                        sock.sendall(frame)
                        data = b""
                        while len(data) < 8:
                            chunk = sock.recv(8 - len(data))
                            if not chunk:
                                raise ConnectionError("closed")
                            data += chunk
                    except OSError:  # sent, maybe applied, not acknowledged
                        with lock:
                            unanswered[0] += 1
                        break
                    value = decode_replies(data)[0]
                    with lock:
                        replies.append((time.monotonic(), value))
            stop.wait(0.05)

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threads = [threading.Thread(daemon=True, target=run) for _ in range(connections)]
    for thread in threads:
        thread.start()
    while not stop.is_set():
        stop.wait(0.2)
    for thread in threads:
        thread.join(5)
    Path(out).write_text(json.dumps({"replies": replies, "unanswered": unanswered[0]}))
    return 0


# --- one run --------------------------------------------------------------------


def run_one(backend: str, nemesis: str, timing: dict, connections: int) -> dict:
    """Set up hosts and a store, load, fault, heal, and measure."""
    workdir = Path(tempfile.mkdtemp(prefix=f"partition-{backend}-{nemesis}-"))
    net = Network(6)
    store, servers, recorders = None, [], []
    try:
        net.create()
        store = EtcdStore(net, workdir) if backend == "etcd" else \
            RedisStore(net, workdir, backend.rsplit("-", 1)[1])  # fmt: skip
        store.start()
        store.ready()
        for host in (5, 6):
            servers.append(start_server(
                "--host", net.ip(host), "--port", str(PORT), "--backend", store.url(),
                "--multiplier", "5", "--log-level", "warning", cwd=workdir,
                prefix=net.run_in(host),
            ))  # fmt: skip
        for host in (5, 6):
            out = workdir / f"replies-{host}.json"
            recorders.append((out, launch(
                [*net.run_in(host), sys.executable, __file__, "--record",
                 f"{net.ip(host)}:{PORT}", "--out", str(out), "--connections", str(connections)],
                workdir / f"recorder-{host}.log",
            )))  # fmt: skip
        time.sleep(timing["before"])
        fault_at = time.monotonic()
        primary = store.primary()
        if nemesis == "kill":
            primary = store.kill_primary()
        elif nemesis == "failover":
            primary = store.planned_failover()
        elif nemesis == "isolate":
            net.cut([primary], [h for h in range(1, 7) if h != primary])
        elif nemesis == "split":
            net.cut(*store.split(primary))
        time.sleep(timing["fault"])
        healed_at = time.monotonic()
        if nemesis == "kill":
            store.restart(primary)
        net.heal()
        time.sleep(timing["after"])
        ended_at = time.monotonic()
        for _, proc in recorders:
            proc.send_signal(signal.SIGTERM)
        for _, proc in recorders:
            proc.wait(30)
        final = store.final()
        recorded = [json.loads(out.read_text()) for out, _ in recorders]
        replies = [tuple(r) for run in recorded for r in run["replies"]]
        unanswered = sum(run["unanswered"] for run in recorded)
        return measure(backend, nemesis, replies, unanswered, final,
                       (fault_at, healed_at, ended_at))  # fmt: skip
    finally:
        # A second Ctrl-C (or SIGTERM sent to the whole process group as well
        # as to this process) must not cut the teardown short.
        held = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for server in servers:
                with contextlib.suppress(Exception):
                    server.stop(10)
            for _, proc in recorders:
                end(proc)
            if store is not None:
                store.kill()
            net.teardown()
            shutil.rmtree(workdir, ignore_errors=True)
        finally:
            for signum, handler in held.items():
                signal.signal(signum, handler)


def measure(backend: str, nemesis: str, replies: list, unanswered: int, final: int,
            moments: tuple[float, float, float]) -> dict:  # fmt: skip
    """The checker's verdict (``testing.checker``: the counter from 0 within
    [acknowledged, acknowledged + unanswered], no value twice, every reply
    in (0, final]) and the timing: ``moments`` are the fault, the heal and
    the end of the load; the longest time without an acknowledgement counts
    up to the end."""
    fault_at, healed_at, ended_at = moments
    values = [v for _, v in replies]
    times = sorted(t for t, _ in replies)
    verdict = judge(0, final, len(values), unanswered, values)
    after_fault = [t for t in times if t >= fault_at]
    before = [t for t in times if t < fault_at]
    resumed = after_fault[0] - fault_at if after_fault else None
    gaps = [b - a for a, b in itertools.pairwise([*times, ended_at])]
    return {
        "backend": backend,
        "nemesis": nemesis,
        "acknowledged": verdict.acknowledged,
        "unanswered": verdict.unanswered,
        "final": final,
        "range": f"[{verdict.low}, {verdict.high}]",
        "in_range": verdict.low <= final <= verdict.high,
        "lost": max(0, verdict.low - final),
        "extra": max(0, final - verdict.high),
        "twice": verdict.twice,
        "outside": verdict.outside,
        "ok": verdict.ok,
        "highest_acknowledged": max(values, default=0),
        "longest_without_acks_s": round(max(gaps, default=0.0), 1),
        "first_ack_after_fault_s": None if resumed is None else round(resumed, 1),
        "acks_during_fault": sum(1 for t in after_fault if t < healed_at),
        "acks_after_heal": sum(1 for t in after_fault if t >= healed_at),
        "acks_before_fault": len(before),
    }


COLUMNS = ("backend", "nemesis", "acknowledged", "unanswered", "final", "range", "lost",
           "extra", "twice", "longest_without_acks_s", "acks_during_fault",
           "acks_after_heal")  # fmt: skip


def main() -> int:
    args = parse_args(__doc__)
    if args["--record"]:
        return record(args["--record"], args["--out"], int(args["--connections"]))
    timing = {name: convert(__doc__, f"--{name}", args[f"--{name}"], positive_int)
              for name in ("before", "fault", "after")}  # fmt: skip
    connections = convert(__doc__, "--connections", args["--connections"], positive_int)
    backends = args["--backends"].split(",")
    nemeses = args["--nemeses"].split(",")
    for name in backends:
        if name not in ("etcd", "redis-replicas-0", "redis-replicas-1", "redis-replicas-all"):
            print(f"partition.py: unknown backend {name!r}", file=sys.stderr)
            return 2
    for name in nemeses:
        if name not in ("kill", "failover", "isolate", "split"):
            print(f"partition.py: unknown nemesis {name!r}", file=sys.stderr)
            return 2
    if not args["--json"]:
        print("  ".join(f"{c:>12}" if i > 1 else f"{c:<18}" for i, c in enumerate(COLUMNS)))
    failed = False
    for backend, nemesis in itertools.product(backends, nemeses):
        try:
            result = run_one(backend, nemesis, timing, connections)
        except CannotRun as exc:
            print(f"partition.py: {exc}", file=sys.stderr)
            return 2
        except (NotReady, RuntimeError, OSError, subprocess.SubprocessError) as exc:
            print(f"partition.py: {backend} {nemesis}: could not run: {exc}", file=sys.stderr)
            failed = True
            continue
        if args["--json"]:
            print(json.dumps(result), flush=True)
        else:
            print("  ".join(f"{result[c]!s:>12}" if i > 1 else f"{result[c]!s:<18}"
                            for i, c in enumerate(COLUMNS)), flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # teardown on SIGTERM too
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
