"""`pip install` into fresh virtualenvs: `.[server]` installs the package
with every runtime dependency, its commands run, and the library talks to the
server it installed (started from the virtualenv, outside the repository);
`-e .` (editable) alone installs the library with xxhash only, imports it
from the clone under its one name, and the commands then say in one line how
to add the rest."""

from __future__ import annotations

import shutil
import subprocess
import time
import venv

from support import REPO_ROOT
from testing.launcher import read_ready_file

SKIP = shutil.ignore_patterns(".venv", ".git", "__pycache__", "build", "*.egg-info", ".ruff_cache")


def install(tmp_path, extra: str = "", editable: bool = False):
    """A fresh virtualenv with a copy of the repository installed (``extra``:
    ``[server]``); its python, bin folder and virtualenv folder."""
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT, source, symlinks=True, ignore=SKIP)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python, bin_dir = env_dir / "bin" / "python", env_dir / "bin"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", *(["-e"] if editable else []),
         f"{source}{extra}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return python, bin_dir, env_dir


def pins(name: str) -> set[str]:
    lines = (REPO_ROOT / name).read_text().splitlines()
    return {line.split("#")[0].strip() for line in lines if "==" in line.split("#")[0]}


def test_the_library_pins_are_the_servers_too():
    assert pins("requirements-library.txt") <= pins("requirements.txt")


def test_the_library_alone_installs_editable_with_xxhash_only(tmp_path):
    python, bin_dir, _ = install(tmp_path, editable=True)
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "freeze"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    names = {line.split("==")[0].lower() for line in listed.stdout.split()}
    assert names - {"pip", "setuptools", "wheel"} == {"counter-server", "xxhash"}, names
    program = (
        "import sys\n"
        "import counter_server.client\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'gevent', 'docopt', "
        "'pythonjsonlogger', 'redis', 'prometheus_client'}))\n"
        "import counter_server.protocol.frames as frames\n"
        "print(frames.__file__)\n"
        "for name in ('server', 'counter_server.bench', 'counter_server.tests'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    print('importable:', name)\n"
    )
    imported = subprocess.run([str(python), "-c", program], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
    assert imported.returncode == 0, imported
    assert imported.stdout.splitlines() == [
        "[]",
        str(tmp_path / "source" / "counter_server" / "protocol" / "frames.py"),
    ], imported.stdout
    server = subprocess.run([str(bin_dir / "counter-server"), "--version"], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert server.returncode == 1 and "Traceback" not in server.stderr, server.stderr
    assert server.stderr.count("\n") == 1
    assert "counter-server: the Python package gevent is not installed" in server.stderr
    assert "pip install 'counter-server[server]'" in server.stderr


def test_pip_install_into_a_fresh_virtualenv(tmp_path):
    python, bin_dir, env_dir = install(tmp_path, "[server]")
    for command in ("counter-server", "counter-client"):
        version = subprocess.run([str(bin_dir / command), "--version"], capture_output=True,
                                 text=True, timeout=60)  # fmt: skip
        assert version.returncode == 0 and version.stdout.startswith("counter-server "), version
        helped = subprocess.run([str(bin_dir / command), "--help"], capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert f"\n  {command} [options]" in helped.stdout, helped.stdout
        assert ".py" not in helped.stdout.partition("Options:")[0], helped.stdout
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
