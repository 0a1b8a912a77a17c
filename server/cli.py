"""The counter server's command line: flags in, ``ServerSettings`` out.

Parsing only; ``server.wiring`` turns settings into listeners and stores and
``server.run`` runs them.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from counter_server.common import DISTRIBUTION, __version__
from counter_server.common.cli import convert, cpu_count, parse_args, usage_exit
from counter_server.common.values import (
    log_format,
    log_level,
    non_negative_float,
    phrase,
    port_number,
    positive_int,
    positive_rate,
)
from counter_server.server.limits import Network, parse_network
from counter_server.server.store.statefile import FSYNC_MODES
from counter_server.server.store.urls import AnyBackend, parse_backend
from counter_server.server.timeouts import Timeouts

__doc__ = """Counter server: one shared 64-bit counter that many clients add to at
once, over a 16-byte checksummed TCP protocol (byte-compatible with the Go original).

Usage:
  server.py [options] [--allow CIDR]...
  server.py -h | --help
  server.py --version

Options:
  --port PORT              TCP port: 8080, :8080, or HOST:PORT to listen on one
                           address (0 picks a free port). [default: 8080]
  --host HOST              Address to listen on: 0.0.0.0 is every IPv4
                           interface, :: every IPv6 and IPv4 one (default: ::
                           where the machine has IPv6, else 0.0.0.0).
  --multiplier N           Serve at most NumCPU x N connections at once; more
                           wait until a slot frees. [default: 20]
  --processes N            Worker processes (or auto = NumCPU) sharing the one
                           listening socket (never SO_REUSEPORT) and one counter
                           in shared memory, each with its own pool. [default: 1]
  --shutdown-timeout SECS  On SIGINT/SIGTERM, wait at most this long for owed
                           replies before closing connections. [default: 10]
  --idle-timeout SECS      Close a connection that sends nothing for this long
                           (0: never). [default: 300]
  --frame-timeout SECS     A frame whose first byte has arrived must be complete
                           within this long, against slowloris (0: never). [default: 10]
  --write-timeout SECS     Close a client that leaves its replies unread so that
                           sending blocks this long (0: never). [default: 30]
  --evict-idle-after SECS  While the pool is full and connections wait, close
                           connections idle this long, or this long in a TLS
                           handshake or a frame, to free their slots (0:
                           never). [default: 1]
  --rate R                 Frames per second allowed per client IP; faster
                           clients are slowed down, not refused (off when not given).
  --burst B                Frames a client IP may send at full speed before the
                           rate applies (default: one second's worth).
  --max-conns-per-ip N     Close connections beyond N at once from one IP
                           (off when not given).
  --ipv6-prefix BITS       Per-IP limits (--max-conns-per-ip, --rate) count an
                           IPv6 client as its /BITS network. [default: 64]
  --allow CIDR             Accept only peers in this network (IPv4 or IPv6);
                           repeat for more. Everyone when not given.
  --tls-cert FILE          Serve TLS with this certificate chain (PEM).
  --tls-key FILE           The private key of --tls-cert (PEM).
  --tls-client-ca FILE     Require client certificates signed by this CA
                           (mutual TLS).
  --backend URL            Keep the counter in a shared store, for every instance
                           using it (default: memory, this process's). etcd
                           (survives partitions):
                           etcd://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/KEY,
                           etcds://...?ca=FILE for TLS. Redis:
                           redis://[USER:PASSWORD@]HOST:PORT/DB?key=NAME,
                           rediss://... for TLS (&ca=FILE), or
                           redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE/DB?key=NAME
                           to follow failovers; &replicas=N (or all) replies only
                           once N replicas have the increment. A password
                           here shows in ps: see --backend-file.
  --backend-file PATH      Read --backend's URL from this file's first line
                           (refused if group or others may read it). Without
                           either flag, the URL in $COUNTER_SERVER_BACKEND.
  --state-file PATH        Keep the counter in this file so it survives restarts
                           and crashes (memory only when not given).
  --fsync MODE             With --state-file: always (a reply only once its
                           value is on disk), everysec (at most about a second
                           lost in a crash) or no (the OS decides). [default: everysec]
  --metrics-port PORT      Serve Prometheus /metrics and /healthz over HTTP on
                           this port (off when not given).
  --metrics-host HOST      Address for the metrics endpoint. [default: 127.0.0.1]
  --log-level LEVEL        debug, info, warning or error. [default: info]
  --log-format FORMAT      text, or json (one object per line). [default: text]
  --ready-file PATH        Once accepting connections, write the start-up facts
                           (address, pool, pids, metrics URL) to this file as JSON.
  --version                Show the version.
  -h --help                Show this help.
"""


@dataclass(frozen=True)
class ServerSettings:
    """Everything the command line decides."""

    host: str | None  # None: every interface (dual-stack where there is IPv6)
    port: int
    multiplier: int
    shutdown_timeout: float
    metrics_host: str
    metrics_port: int | None
    log_level: int
    log_format: str
    timeouts: Timeouts
    rate: float | None
    burst: int | None
    max_conns_per_ip: int | None
    ipv6_prefix: int
    allow: tuple[Network, ...]
    tls_cert: str | None
    tls_key: str | None
    tls_client_ca: str | None
    state_file: str | None
    fsync: str
    processes: int
    backend: AnyBackend | None
    ready_file: str | None = None

    @property
    def pool_size(self) -> int:
        """Connections one process serves at once: NumCPU x multiplier."""
        return cpu_count() * self.multiplier


def parse_settings(argv: list[str] | None = None) -> ServerSettings:
    """The settings for ``argv``; a usage error exits 2."""
    args = parse_args(__doc__, argv, version=f"{DISTRIBUTION} {__version__}")

    def value(option: str, parser):
        return convert(__doc__, option, args[option], parser)

    def optional(option: str, parser):
        return None if args[option] is None else value(option, parser)

    def seconds_or_off(option: str) -> float | None:
        return value(option, non_negative_float) or None

    processes = value("--processes", process_count)
    host, port = value("--port", listen_port)
    if host is not None and args["--host"] is not None:
        usage_exit(__doc__, f"--port {args['--port']} names the host already: drop --host")
    metrics_port = optional("--metrics-port", port_number)
    if metrics_port and metrics_port == port:
        usage_exit(__doc__, f"--metrics-port {metrics_port}: --port uses it; choose another")
    rate = optional("--rate", positive_rate)
    burst = optional("--burst", positive_int)
    if burst is not None and rate is None:
        usage_exit(__doc__, "--burst: needs --rate")
    if rate is not None and burst is None:
        burst = max(1, math.ceil(rate))
    if (args["--tls-cert"] is None) != (args["--tls-key"] is None):
        usage_exit(__doc__, "--tls-cert and --tls-key go together")
    backend_url = backend_setting(args["--backend"], args["--backend-file"], os.environ)
    if backend_url is not None and args["--state-file"] is not None:
        usage_exit(
            __doc__,
            f"{backend_url[0]} and --state-file: the backend keeps the counter, choose one",
        )
    if args["--fsync"] != "everysec" and args["--state-file"] is None:
        usage_exit(__doc__, "--fsync: needs --state-file")
    ready_dir = os.path.dirname(os.path.abspath(args["--ready-file"] or "."))
    if args["--ready-file"] is not None and not os.path.isdir(ready_dir):
        usage_exit(__doc__, f"--ready-file: no such directory {ready_dir}")
    if args["--tls-client-ca"] is not None and args["--tls-cert"] is None:
        usage_exit(__doc__, "--tls-client-ca: needs --tls-cert and --tls-key")
    return ServerSettings(
        host=host if host is not None else args["--host"],
        port=port,
        multiplier=value("--multiplier", positive_int),
        shutdown_timeout=value("--shutdown-timeout", non_negative_float),
        metrics_host=args["--metrics-host"],
        metrics_port=metrics_port,
        log_level=value("--log-level", log_level),
        log_format=value("--log-format", log_format),
        timeouts=Timeouts(
            idle=seconds_or_off("--idle-timeout"),
            frame=seconds_or_off("--frame-timeout"),
            write=seconds_or_off("--write-timeout"),
            evict_idle=seconds_or_off("--evict-idle-after"),
        ),
        rate=rate,
        burst=burst,
        max_conns_per_ip=optional("--max-conns-per-ip", positive_int),
        ipv6_prefix=value("--ipv6-prefix", prefix_length),
        allow=tuple(convert(__doc__, "--allow", raw, parse_network) for raw in args["--allow"]),
        tls_cert=args["--tls-cert"],
        tls_key=args["--tls-key"],
        tls_client_ca=args["--tls-client-ca"],
        state_file=args["--state-file"],
        fsync=value("--fsync", fsync_mode),
        processes=processes,
        backend=None if backend_url is None else convert(__doc__, *backend_url, parse_backend),
        ready_file=args["--ready-file"],
    )


# Where the backend URL may come from instead of --backend, so that its
# password is not in the process list.
BACKEND_ENV = "COUNTER_SERVER_BACKEND"
MEMORY = "memory"  # --backend memory: the default, this process's memory


def backend_setting(
    flag: str | None, file: str | None, environ: Mapping[str, str]
) -> tuple[str, str] | None:
    """(where it came from, the URL) of the backend: ``--backend``, the
    first line of ``--backend-file`` or ``$COUNTER_SERVER_BACKEND``, in
    that order; None for memory (``--backend memory`` says so outright). A
    usage error for both flags, or for a file that cannot be read or that
    group or others may read."""
    if flag is not None and file is not None:
        usage_exit(__doc__, "--backend and --backend-file: give the URL one way")
    if flag == MEMORY:
        return None
    if flag is not None:
        return "--backend", flag
    if file is not None:
        return "--backend-file", read_secret_line(file)
    if environ.get(BACKEND_ENV):
        return f"${BACKEND_ENV}", environ[BACKEND_ENV]
    return None


def read_secret_line(path: str) -> str:
    """The first line of ``path``, a file only its owner may read; a usage
    error naming the file (never its contents) otherwise."""
    try:
        with open(path, encoding="utf-8") as file:
            mode = os.fstat(file.fileno()).st_mode
            if mode & 0o077:
                usage_exit(
                    __doc__,
                    f"--backend-file: {path} may be read by group or others "
                    f"(mode {stat.S_IMODE(mode):04o}): chmod 600 {path}",
                )
            line = file.readline().strip()
    except OSError as exc:
        usage_exit(__doc__, f"--backend-file: cannot read {path}: {phrase(exc)}")
    except UnicodeDecodeError:
        usage_exit(__doc__, f"--backend-file: cannot read {path}: not text")
    if not line:
        usage_exit(__doc__, f"--backend-file: {path} is empty: its first line is the URL")
    return line


def process_count(raw: str) -> int:
    """--processes: a whole number >= 1, or auto (one per CPU)."""
    if raw == "auto":
        return cpu_count()
    try:
        return positive_int(raw)
    except ValueError:
        raise ValueError(f"must be a whole number >= 1 or auto, got {raw!r}") from None


def listen_port(raw: str) -> tuple[str | None, int]:
    """--port: ``8080``, Go's ``:8080``, or ``HOST:PORT`` (``[IPv6]:PORT``) as
    Go's -port takes it: (the host it names or None, the port)."""
    if ":" not in raw or (raw.startswith(":") and raw.count(":") == 1):
        return None, port_number(raw)
    host, _, port = raw.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, e.g. [::1]:8080, got {raw!r}")
    return host, port_number(port)


def prefix_length(raw: str) -> int:
    """An IPv6 prefix length, 1 to 128."""
    bits = positive_int(raw)
    if bits > 128:
        raise ValueError(f"must be an IPv6 prefix length from 1 to 128, got {raw!r}")
    return bits


def fsync_mode(raw: str) -> str:
    if raw not in FSYNC_MODES:
        raise ValueError(f"must be always, everysec or no, got {raw!r}")
    return raw
