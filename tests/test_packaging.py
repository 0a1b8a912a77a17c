"""`pip install .` into a fresh virtualenv: the package installs with its
runtime dependencies, its commands run, and the library talks to the server
it installed (started from the virtualenv, outside the repository)."""

from __future__ import annotations

import shutil
import subprocess
import time
import venv

from counter_server.server.banner import read_ready_file
from support import REPO_ROOT

SKIP = shutil.ignore_patterns(".venv", ".git", "__pycache__", "build", "*.egg-info", ".ruff_cache")


def test_pip_install_into_a_fresh_virtualenv(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT, source, ignore=SKIP)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python, bin_dir = env_dir / "bin" / "python", env_dir / "bin"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    for command in ("counter-server", "counter-client"):
        version = subprocess.run([str(bin_dir / command), "--version"], capture_output=True,
                                 text=True, timeout=60)  # fmt: skip
        assert version.returncode == 0 and version.stdout.startswith("counter "), version
    # Only one top-level name in site-packages, never "server" or "client".
    site = next((env_dir / "lib").glob("python*/site-packages"))
    ours = {p.name for p in site.iterdir() if "counter" in p.name}
    assert {"counter_server"} <= ours
    assert not any((site / name).exists() for name in ("server", "client", "common", "protocol"))
    assert (site / "counter_server" / "client" / "py.typed").is_file()

    ready = tmp_path / "ready.json"
    server = subprocess.Popen(
        [str(bin_dir / "counter-server"), "--host", "127.0.0.1", "--port", "0",
         "--ready-file", str(ready)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while (started := read_ready_file(str(ready))) is None:
            assert time.monotonic() < deadline and server.poll() is None, "no ready file"
            time.sleep(0.05)
        port = started.port
        program = (
            "from counter_server.client import CounterClient\n"
            f"with CounterClient('127.0.0.1:{port}') as counter:\n"
            "    print(counter.increment_many([1, 2]), counter.read())\n"
        )
        call = subprocess.run([str(python), "-c", program], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert call.returncode == 0, call.stderr
        assert call.stdout.split("\n")[0] == "[1, 3] 3"
    finally:
        server.terminate()
        server.wait(30)
