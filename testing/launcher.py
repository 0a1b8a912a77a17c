"""Start a server as a subprocess and wait until it is ready: the one way
the tests, the chaos run and the benchmarks start one.

Readiness comes from the server's ``--ready-file`` (``server.banner``), never
from parsing its output; output goes to files, never pipes, so a chatty
server cannot block on a full pipe.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from counter_server.server.banner import Ready

SERVER_SCRIPT = Path(__file__).resolve().parent.parent / "server" / "server.py"
START_TIMEOUT = 20.0  # seconds for a server to become ready
# The closing lines of server.banner.totals_lines.
_TOTALS = re.compile(
    r"Server stopped after processing total requests: (\d+)\nFinal counter value: (\d+)"
)


def read_ready_file(path: str) -> Ready | None:
    """The facts a server wrote to ``path``, or None if it has not yet."""
    try:
        with open(path) as f:
            return Ready(**json.load(f))
    except FileNotFoundError:
        return None


def parse_totals(text: str) -> tuple[int, int] | None:
    """(requests applied, final value) from a server's stdout, or None."""
    match = _TOTALS.search(text)
    return (int(match[1]), int(match[2])) if match else None


class ServerDidNotStart(AssertionError):
    """The server exited or stayed silent instead of becoming ready."""


@dataclass
class ServerProcess:
    """A server started by ``start_server``."""

    proc: subprocess.Popen
    ready: Ready
    stdout_path: Path
    stderr_path: Path
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    _files: list = field(default_factory=list)
    _folders: list = field(default_factory=list)  # removed once it has exited

    @property
    def port(self) -> int:
        return self.ready.port

    @property
    def pool_size(self) -> int:
        return self.ready.pool

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics_url(self, path: str = "/metrics") -> str:
        """The metrics endpoint (needs ``--metrics-port``), at ``path``."""
        if self.ready.metrics_url is None:
            raise AssertionError("the server was started without --metrics-port")
        return self.ready.metrics_url.removesuffix("/metrics") + path

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
            self._collect()
        return self.returncode

    def _collect(self) -> None:
        """Keep the output, close the files, remove the folders the launcher
        made (once: a second wait keeps what the first collected)."""
        if not self._folders:
            return
        self.stdout = self.stdout_path.read_text()
        self.stderr = self.stderr_path.read_text()
        for f in self._files:
            f.close()
        for folder in self._folders:
            shutil.rmtree(folder, ignore_errors=True)
        self._folders = []

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def totals(self) -> tuple[int, int]:
        """(requests applied, final value) from the closing lines, once stopped."""
        totals = parse_totals(self.stdout)
        if totals is None:
            raise AssertionError(f"no closing lines in the server's output: {self.stdout!r}")
        return totals


def start_server(
    *args: str,
    cwd: str | Path | None = None,
    script: str | Path | None = None,
    max_files: int | None = None,
    prefix: Sequence[str] = (),
    host: str | None = "127.0.0.1",
    env: Mapping[str, str] | None = None,
) -> ServerProcess:
    """Start the server (on a free port of ``host`` unless ``args`` name
    them; ``host=None`` keeps the server's default, every interface) and
    wait until it is ready. ``prefix`` goes before the interpreter
    (``taskset -c 0``); ``max_files`` caps its open file descriptors; ``env``
    adds environment variables."""
    scratch = Path(tempfile.mkdtemp(prefix="counter-launch-"))
    workdir = Path(cwd) if cwd else scratch / "cwd"
    workdir.mkdir(exist_ok=True)
    out_path, err_path = scratch / "stdout.txt", scratch / "stderr.txt"
    ready_path = scratch / "ready.json"
    out, err = out_path.open("w"), err_path.open("w")
    argv = [*prefix, sys.executable, str(script or SERVER_SCRIPT), *args]
    named = {arg.split("=", 1)[0].lstrip("-") for arg in args if arg.startswith("-")}
    if "port" not in named:
        argv += ["--port", "0"]
    if "host" not in named and host is not None:
        argv += ["--host", host]
    argv += ["--ready-file", str(ready_path)]

    def limit_files() -> None:
        if max_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

    proc = subprocess.Popen(
        argv, cwd=workdir, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
        preexec_fn=limit_files, env={**os.environ, **(env or {})},
    )  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        ready = read_ready_file(str(ready_path))
        if ready is not None:
            return ServerProcess(
                proc, ready, out_path, err_path, _files=[out, err], _folders=[scratch]
            )
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    for f in (out, err):
        f.close()
    said = f"stdout={out_path.read_text()!r} stderr={err_path.read_text()!r}"
    shutil.rmtree(scratch, ignore_errors=True)
    raise ServerDidNotStart(f"server did not start; {said}")
