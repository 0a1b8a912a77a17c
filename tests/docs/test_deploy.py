"""docs/deploy/counter-server.service is a unit systemd accepts, and the
server accepts its command line: started with its flags (free ports), it
serves and stops on SIGTERM with exit 0, as the unit's comments say."""

from __future__ import annotations

import shlex
import subprocess
import sys

from support import REPO_ROOT, exchange, require, start_server

UNIT = REPO_ROOT / "docs" / "deploy" / "counter-server.service"
INSTALLED_AT = "/opt/counter-server"  # where the unit expects the clone


def exec_start() -> list[str]:
    """The unit's ExecStart, continuation lines joined, split as systemd does."""
    text = UNIT.read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


def test_systemd_accepts_the_unit(tmp_path):
    require("systemd-analyze")
    here = UNIT.read_text()
    here = here.replace(f"{INSTALLED_AT}/.venv/bin/python", sys.executable)
    here = here.replace(INSTALLED_AT, str(REPO_ROOT))
    (tmp_path / UNIT.name).write_text(here)
    result = subprocess.run(
        ["systemd-analyze", "verify", UNIT.name],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    said = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not said, said


def test_the_units_command_line_serves_and_stops_cleanly():
    python, script, *flags = exec_start()
    assert python == f"{INSTALLED_AT}/.venv/bin/python"
    assert script == f"{INSTALLED_AT}/server/server.py"
    given = dict(zip(flags[::2], flags[1:][::2], strict=False))
    assert "--ready-file" in given and "--port" in given
    for flag in ("--port", "--metrics-port", "--ready-file"):  # this test's own
        at = flags.index(flag)
        del flags[at : at + 2]
    server = start_server(*flags, "--metrics-port", "0")
    try:
        assert exchange(server.port, 7) == (7,)
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.stderr
    if "--processes" in given:
        assert len(server.ready.workers) >= 1
