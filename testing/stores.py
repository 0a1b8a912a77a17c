"""The stores' own servers, started for real: redis-server, redis-sentinel
and etcd members, for the tests, the benchmarks and the partition run alike.

Each runs on loopback at a free port by default, or at a given address
through a command prefix (``ip netns exec HOST``, ``taskset -c N``); each
writes its log into its directory and is stopped through the handle that
started it (``kill`` resumes a stopped process first). A store that does
not come up raises ``NotReady``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"
START_SECONDS = 20.0  # for a store to answer after its start


class NotReady(AssertionError):
    """A store (or anything waited for) was not ready in time."""


def free_port() -> int:
    """A loopback port nobody listens on (for a server that must be told one)."""
    with socket.create_server((LOOPBACK, 0)) as probe:
        return probe.getsockname()[1]


def wait_until(condition: Callable[[], object], seconds: float, what: str) -> None:
    """Poll ``condition`` until true; ``NotReady`` naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise NotReady(f"{what} within {seconds:g}s")
        time.sleep(0.05)


def launch(argv: Sequence[str], log: Path) -> subprocess.Popen:
    """``argv`` started with its output appended to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL)


def end(proc: subprocess.Popen | None) -> None:
    """Kill ``proc`` (resumed first, in case a test stopped it) and reap it."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGCONT)
        proc.kill()
    proc.wait(10)


class RedisServer:
    """A redis-server at ``host``:``port`` (a free loopback port by default),
    its files in ``directory``; ``durable`` makes every write reach the disk
    (AOF, fsync always) so a restart keeps the counter. ``extra`` arguments
    go to redis-server (a password, a replica, TLS...); ``run_in`` prefixes
    its command, ``ask_from`` redis-cli's."""

    def __init__(self, directory, *extra: str, password: str | None = None, durable: bool = True,
                 host: str = LOOPBACK, port: int | None = None, run_in: Sequence[str] = (),
                 ask_from: Sequence[str] = (), name: str = "") -> None:  # fmt: skip
        self.directory = Path(directory)
        self.extra, self.password, self.durable = list(extra), password, durable
        self.host, self.port = host, port or free_port()
        self.run_in, self.ask_from = list(run_in), list(ask_from)
        self.name = name or f"redis-{self.port}"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def start(self) -> None:
        """Start it and wait until it answers PING."""
        persistence = ["yes", "--appendfsync", "always"] if self.durable else ["no"]
        self.proc = launch(
            [*self.run_in, "redis-server", "--port", str(self.port), "--bind", self.host,
             "--dir", str(self.directory), "--save", "", "--appendonly", *persistence,
             *self.extra],
            self.directory / f"{self.name}.log",
        )  # fmt: skip
        wait_until(lambda: self.cli("ping") == "PONG", START_SECONDS, f"{self.name} answering")

    def kill(self) -> None:
        end(self.proc)

    def cli(self, *args: str) -> str:
        """redis-cli's answer to ``args``, stripped ("" when it could not ask)."""
        auth = ["-a", self.password, "--no-auth-warning"] if self.password else []
        return _ask([*self.ask_from, "redis-cli", "-h", self.host, "-p", str(self.port), *auth,
                     *args])  # fmt: skip

    def url(self, key: str = "counter") -> str:
        return f"redis://{self.host}:{self.port}/0?key={key}"


class Sentinel:
    """A redis-sentinel watching ``primary`` under the name "primary",
    started at once; a failover after 1 s without it. ``config`` lines are
    added to its file."""

    def __init__(self, directory, primary: RedisServer, *config: str, host: str = LOOPBACK,
                 port: int | None = None, run_in: Sequence[str] = (),
                 ask_from: Sequence[str] = ()) -> None:  # fmt: skip
        self.host, self.port = host, port or free_port()
        self.ask_from = list(ask_from)
        directory = Path(directory)
        path = directory / f"sentinel-{host}-{self.port}.conf"
        path.write_text("\n".join([
            f"port {self.port}", f"bind {host}", "protected-mode no", f"dir {directory}",
            f"sentinel announce-ip {host}",
            f"sentinel monitor primary {primary.host} {primary.port} 2",
            "sentinel down-after-milliseconds primary 1000",
            "sentinel failover-timeout primary 4000", *config, "",
        ]))  # fmt: skip
        self.proc = launch([*run_in, "redis-sentinel", str(path)], path.with_suffix(".log"))

    def primary(self) -> tuple[str, int] | None:
        """The primary's address as this sentinel knows it (None: none)."""
        words = self.cli("sentinel", "get-master-addr-by-name", "primary").split()
        return (words[0], int(words[1])) if len(words) == 2 else None

    def cli(self, *args: str) -> str:
        return _ask([*self.ask_from, "redis-cli", "-h", self.host, "-p", str(self.port), *args])

    def kill(self) -> None:
        end(self.proc)


class EtcdCluster:
    """``size`` etcd members named m0, m1..., data in ``directory``; on
    loopback at free ports, or one member per address of ``hosts`` (ports
    2379 and 2380, started through ``run_in[i]``). ``extra`` arguments go to
    every member (TLS...); ``scheme`` is the client URLs' (https with TLS);
    etcdctl runs through ``ask_from``."""

    ca: str = ""  # the CA file etcdctl checks the members against (https)

    def __init__(self, directory, size: int = 3, *extra: str, scheme: str = "http",
                 hosts: Sequence[str] = (), run_in: Sequence[Sequence[str]] = (),
                 ask_from: Sequence[str] = ()) -> None:  # fmt: skip
        self.directory = Path(directory)
        self.extra, self.scheme, self.ask_from = list(extra), scheme, list(ask_from)
        self.names = [f"m{i}" for i in range(len(hosts) or size)]
        self.hosts = dict(zip(self.names, hosts or [LOOPBACK] * size, strict=True))
        self.run_in = dict(zip(self.names, run_in or [()] * len(self.names), strict=True))
        self.client_ports = {n: 2379 if hosts else free_port() for n in self.names}
        self.peer_ports = {n: 2380 if hosts else free_port() for n in self.names}
        self.procs: dict[str, subprocess.Popen] = {}

    def client(self, name: str) -> str:
        """``name``'s client address, host:port."""
        return f"{self.hosts[name]}:{self.client_ports[name]}"

    @property
    def endpoints(self) -> str:
        return ",".join(self.client(n) for n in self.names)

    def url(self, key: str = "counter", userinfo: str = "", query: str = "") -> str:
        scheme = "etcds" if self.scheme == "https" else "etcd"
        return f"{scheme}://{userinfo}{self.endpoints}/{key}{query}"

    def start(self, *names: str, state: str = "new") -> None:
        """Start ``names`` (all by default); ``state`` "existing" rejoins."""
        peer = {n: f"http://{self.hosts[n]}:{self.peer_ports[n]}" for n in self.names}
        cluster = ",".join(f"{n}={url}" for n, url in peer.items())
        for name in names or self.names:
            client = f"{self.scheme}://{self.client(name)}"
            self.procs[name] = launch(
                [*self.run_in[name], "etcd", "--name", name,
                 "--data-dir", str(self.directory / name),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer[name], "--initial-advertise-peer-urls", peer[name],
                 "--initial-cluster", cluster, "--initial-cluster-state", state,
                 "--heartbeat-interval", "100", "--election-timeout", "1000", *self.extra],
                self.directory / f"{name}.log",
            )  # fmt: skip

    def wait_healthy(self, seconds: float = START_SECONDS) -> None:
        """Wait until every member answers and one leads; ``NotReady`` names
        the members that exited and their last log lines."""
        try:
            wait_until(lambda: self.ctl("endpoint", "health").returncode == 0, seconds,
                       "etcd healthy")  # fmt: skip
        except NotReady as exc:
            gone = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            logs = {name: (self.directory / f"{name}.log").read_text()[-600:] for name in gone}
            raise NotReady(f"{exc}; exited: {gone}; their logs: {logs}") from None

    def ctl(self, *args: str, user: str | None = None) -> subprocess.CompletedProcess:
        """etcdctl against every member (``user`` as USER:PASSWORD)."""
        tls = ["--cacert", self.ca] if self.scheme == "https" else []
        auth = ["--user", user] if user else []
        endpoints = ",".join(f"{self.scheme}://{self.client(n)}" for n in self.names)
        return subprocess.run(
            [*self.ask_from, "etcdctl", "--endpoints", endpoints, "--command-timeout", "3s",
             *tls, *auth, *args],
            capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=30,
        )  # fmt: skip

    def get(self, key: str = "counter", user: str | None = None) -> str:
        return self.ctl("get", key, "--print-value-only", user=user).stdout.strip()

    def _statuses(self) -> list[dict]:
        try:
            return json.loads(self.ctl("endpoint", "status", "-w", "json").stdout)
        except ValueError:
            return []

    def leader(self) -> str:
        """The name of the member that leads now ("" if none)."""
        for status in self._statuses():
            # A member without a leader (an election) leaves the field out.
            if status["Status"].get("leader") == status["Status"]["header"]["member_id"]:
                return next((n for n in self.names if status["Endpoint"].endswith(self.client(n))),
                            "")  # fmt: skip
        return ""

    def move_leader(self) -> None:
        """Hand the leadership to another member (etcdctl move-leader)."""
        statuses = self._statuses()
        others = [s["Status"]["header"]["member_id"] for s in statuses
                  if s["Status"].get("leader") != s["Status"]["header"]["member_id"]]  # fmt: skip
        if not others:
            raise NotReady("etcdctl move-leader: no follower answered to take the lead")
        moved = self.ctl("move-leader", format(others[0], "x"))
        if moved.returncode:
            raise NotReady(f"etcdctl move-leader: {moved.stderr.strip()}")

    def kill(self, *names: str) -> None:
        for name in names or list(self.procs):
            end(self.procs.pop(name, None))


def _ask(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except subprocess.TimeoutExpired:
        return ""
