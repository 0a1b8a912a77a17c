"""What the server tells people and programs about itself, each defined once.

- The start-up line on stdout (for people), and the same facts as JSON in
  the ``--ready-file`` (for programs: tests, chaos, benchmarks, spam.sh), written
  atomically once the server accepts connections.
- The closing lines on stdout: the Go original's
  ``Server stopped after processing total requests: N`` and the final value.

The readers of both are test tooling (``testing.launcher``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from counter_server.common.files import replace_file
from counter_server.common.values import format_address


@dataclass(frozen=True)
class Ready:
    """The facts of a started server."""

    host: str
    port: int
    pool: int  # connections served at once, per process
    cpus: int
    multiplier: int
    pid: int
    tls: bool = False
    metrics_url: str | None = None
    workers: list[int] = field(default_factory=list)  # --processes: the workers' pids
    initial: int = 0  # the counter when the server started
    origin: str = ""  # where the counter came from, for people ("resumed at 5 from ...")
    dual_stack: bool = False  # an IPv6 socket that takes IPv4 clients too

    @property
    def address(self) -> str:
        return format_address((self.host, self.port))

    @property
    def total_pool(self) -> int:
        """Connections the whole server serves at once (every process)."""
        return self.pool * (len(self.workers) or 1)


def startup_line(ready: Ready) -> str:
    """The one line printed on stdout once the server accepts connections."""
    per_process = f"{ready.cpus} CPUs x {ready.multiplier}"
    if ready.workers:
        processes = len(ready.workers)
        how = (
            f"pool {ready.total_pool} = {processes} processes x {ready.pool} "
            f"({per_process}), parent pid {ready.pid}, workers {ready.workers}"
        )
    else:
        how = f"pool {ready.pool} = {per_process}, pid {ready.pid}"
    metrics = f", metrics on {ready.metrics_url}" if ready.metrics_url else ""
    origin = f", {ready.origin}" if ready.origin else ""
    families = " (IPv4 and IPv6)" if ready.dual_stack else ""
    tls = " with TLS" if ready.tls else ""
    return f"Counter server listening on {ready.address}{families}{tls} ({how}{metrics}{origin})"


def write_ready_file(path: str, ready: Ready) -> None:
    """Write ``ready`` as JSON to ``path`` atomically (a reader never sees half)."""
    replace_file(path, json.dumps(asdict(ready)).encode())


def totals_lines(requests_applied: int, value: int) -> str:
    """The Go original's closing line, and the final value."""
    return (
        f"Server stopped after processing total requests: {requests_applied}\n"
        f"Final counter value: {value}"
    )
