"""Every command line, tried as a new user would: unknown options, --version,
messages that say what is wrong, and a missing virtualenv."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from counter_server.common import DISTRIBUTION, __version__
from counter_server.common.values import UsageError, host_port, positive_rate
from support import REPO_ROOT

COMMANDS = {
    "server": REPO_ROOT / "server" / "server.py",
    "client": REPO_ROOT / "client" / "client.py",
    "chaos": REPO_ROOT / "chaos" / "chaos.py",
    "bench": REPO_ROOT / "bench" / "run.py",
}


def run(script, *args: str, python: tuple[str, ...] = (sys.executable,), env=None):
    return subprocess.run(
        [*python, str(script), *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        stdin=subprocess.DEVNULL,
        env=None if env is None else {**os.environ, **env},
    )


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("bogus", ["--bogus", "--bogus=3", "-z"])
def test_an_unknown_option_is_named_in_one_line(command, bogus):
    result = run(COMMANDS[command], bogus)
    assert result.returncode == 2
    first, *rest = result.stderr.splitlines()
    assert first.endswith(f"error: unknown option {bogus.split('=')[0]}"), result.stderr
    assert rest and rest[0].startswith("Usage:")
    assert "Option(" not in result.stderr and "Traceback" not in result.stderr


def test_an_option_value_that_looks_like_an_option_is_a_value():
    result = run(COMMANDS["server"], "--rate", "-5")
    assert result.returncode == 2
    assert "--rate: must be a number of frames per second > 0, got '-5'" in result.stderr


@pytest.mark.parametrize("command", ["server", "client"])
def test_version(command):
    result = run(COMMANDS[command], "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"counter-server {__version__}"


def test_the_version_and_name_have_one_value():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', pyproject, re.M)[1] == __version__
    assert re.search(r'^name = "([^"]+)"', pyproject, re.M)[1] == DISTRIBUTION


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("abc", "must be a number of frames per second, got 'abc'"),
        ("-5", "must be a number of frames per second > 0, got '-5'"),
        ("0", "must be a number of frames per second > 0, got '0'"),
        ("inf", "must be a finite number, got 'inf'"),
    ],
)
def test_rate_messages_say_what_a_rate_is(raw, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        positive_rate(raw)


@pytest.mark.parametrize("raw", ["[::1]", "::1", "localhost", "10.0.0.1"])
def test_an_address_without_a_port_says_the_port_is_missing(raw):
    with pytest.raises(UsageError, match="the port is missing"):
        host_port(raw)


def test_ipv6_addresses_with_a_port():
    assert host_port("[::1]:8080") == ("::1", 8080)
    assert host_port("[2001:db8::5]:9") == ("2001:db8::5", 9)


@pytest.mark.parametrize("command", ["server", "client", "chaos"])
def test_without_the_virtualenv_one_line_names_the_package(command):
    # -S -I: no site-packages, as with a bare python3 before the venv exists.
    result = run(COMMANDS[command], "--help", python=(sys.executable, "-S", "-I"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "the Python package gevent is not installed" in result.stderr
    assert "pip install -r requirements.txt" in result.stderr
    assert "Traceback" not in result.stderr


# --- Go users ---------------------------------------------------------------------


def test_go_flag_forms_start_the_server():
    from support import exchange, start_server

    with start_server("-port", "0", "-multiplier", "3") as server:
        assert server.pool_size == 3 * len(__import__("os").sched_getaffinity(0))
        assert exchange(server.port, 2) == (2,)


def test_go_forms_of_the_client_flags(server_for_cli):
    result = run(COMMANDS["client"], f"-serverAddress=127.0.0.1:{server_for_cli.port}", "-get")
    assert result.returncode == 0 and result.stdout.strip() == "0", result.stderr
    result = run(COMMANDS["client"], "-serverAddress", f"127.0.0.1:{server_for_cli.port}",
                 "--get", "--json")  # fmt: skip
    assert json.loads(result.stdout) == {"server": f"127.0.0.1:{server_for_cli.port}", "value": 0}


def test_port_with_a_host_listens_on_that_address():
    from support import exchange, start_server

    with start_server("--port", "127.0.0.1:0", host=None) as server:
        assert server.ready.host == "127.0.0.1"
        assert exchange(server.port, 1) == (1,)
    both = run(COMMANDS["server"], "--port", "127.0.0.1:8080", "--host", "::1")
    assert both.returncode == 2 and "names the host already: drop --host" in both.stderr
    bare = run(COMMANDS["server"], "--port", "::1:8080")
    assert bare.returncode == 2 and "in brackets" in bare.stderr


def test_dash_h_is_still_help():
    result = run(COMMANDS["server"], "-h")
    assert result.returncode == 0 and "Usage:" in result.stdout


@pytest.mark.skipif(
    not __import__("socket").has_dualstack_ipv6(), reason="this machine has no IPv6"
)
def test_the_default_listens_on_ipv4_and_ipv6_and_shows_ipv4_clients_as_ipv4():
    import socket

    from support import exchange, start_server

    # At debug level, where a client that closed is logged.
    with start_server("--max-conns-per-ip", "5", "--log-level", "debug", host=None) as server:
        assert "(IPv4 and IPv6)" in server.stdout_path.read_text()
        with socket.create_connection(("::1", server.port), timeout=5):
            pass
        assert exchange(server.port, 1) == (1,)  # over IPv4
    assert "connection from 127.0.0.1:" in server.stderr and "::ffff:" not in server.stderr


def test_without_ipv6_the_default_falls_back_to_ipv4(monkeypatch):
    import socket

    from counter_server.server import wiring

    monkeypatch.setattr(socket, "has_dualstack_ipv6", lambda: False)
    listener = wiring.open_listener(None, 0)
    try:
        assert listener.family == socket.AF_INET and listener.getsockname()[0] == "0.0.0.0"
    finally:
        listener.close()


# --- server messages ------------------------------------------------------------------


def test_help_says_what_processes_do():
    result = run(COMMANDS["server"], "--help")
    assert "port (SO_REUSEPORT)" not in result.stdout and "never SO_REUSEPORT" in result.stdout
    bad = run(COMMANDS["server"], "--processes", "abc")
    assert bad.returncode == 2 and "a whole number >= 1 or auto, got 'abc'" in bad.stderr


def test_an_unreachable_sentinel_set_says_what_was_tried_in_one_line():
    from support import free_port

    ports = [free_port(), free_port()]
    hosts = ",".join(f"127.0.0.1:{p}" for p in ports)
    result = run(COMMANDS["server"], "--backend", f"redis+sentinel://{hosts}/primary/0")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert all(f"127.0.0.1:{p}: connection refused" in result.stderr for p in ports)
    assert len(result.stderr) < 300 and "<redis" not in result.stderr


@pytest.fixture
def server_for_cli():
    from support import start_server

    server = start_server()
    yield server
    server.stop()


@pytest.fixture
def redis_with_password(tmp_path):
    from support import RedisServer, require

    require("redis-server")
    redis = RedisServer(tmp_path, "--requirepass", "s3cret", password="s3cret")
    redis.start()
    yield redis
    redis.kill()


def test_a_missing_password_is_named(redis_with_password):
    result = run(COMMANDS["server"], "--backend", redis_with_password.url())
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "Redis requires a password" in result.stderr and "HELLO" not in result.stderr
    wrong = redis_with_password.url().replace("redis://", "redis://:nope@")
    result = run(COMMANDS["server"], "--backend", wrong)
    assert result.returncode == 1 and "Redis refused the password" in result.stderr
    assert "nope" not in result.stderr


def test_redis_down_at_start_is_said_plainly():
    from support import free_port, start_server

    with start_server("--backend", f"redis://127.0.0.1:{free_port()}/0?key=counter") as server:
        line = server.stdout_path.read_text()
        assert "not reachable yet: serving once it is" in line and "counter 0" not in line
        assert line.lower().count("counter") == 2, line  # "Counter server", "?key=counter"


def test_a_backend_password_kept_off_the_command_line(redis_with_password, tmp_path):
    """$COUNTER_SERVER_BACKEND and --backend-file keep the password out of ps,
    the output, /metrics and /healthz."""
    from support import exchange, http_get, start_server

    url = redis_with_password.url().replace("redis://", "redis://:s3cret@")
    secret_file = tmp_path / "backend.url"
    secret_file.write_text(url + "\n# anything after the first line is ignored\n")
    secret_file.chmod(0o600)
    ways = [
        ((), {"COUNTER_SERVER_BACKEND": url}),
        (("--backend-file", str(secret_file)), {}),
        # A flag overrides the environment.
        (("--backend-file", str(secret_file)), {"COUNTER_SERVER_BACKEND": "redis://nowhere:1/0"}),
    ]
    for args, env in ways:
        with start_server(*args, "--metrics-port", "0", env=env) as server:
            assert exchange(server.port, 1)[0] >= 1
            shown = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode()
            for path in ("/metrics", "/healthz"):
                shown += http_get(server.metrics_url(path))[1]
        shown += server.stdout + server.stderr
        assert "s3cret" not in shown, shown
        assert f"127.0.0.1:{redis_with_password.port}" in server.stdout  # where, without the secret
    assert redis_with_password.cli("get", "counter") == "3"


def test_backend_file_and_environment_mistakes(tmp_path):
    secret_file = tmp_path / "backend.url"
    secret_file.write_text("redis://:s3cret@127.0.0.1:1/0\n")
    secret_file.chmod(0o640)
    env_url = {"COUNTER_SERVER_BACKEND": "redis://:s3cret@127.0.0.1:63x79/0"}
    cases = [
        (["--backend-file", str(secret_file)], {},
         f"{secret_file} may be read by group or others (mode 0640): chmod 600"),
        (["--backend", "redis://127.0.0.1:1/0", "--backend-file", str(secret_file)], {},
         "--backend and --backend-file: give the URL one way"),
        (["--backend-file", str(tmp_path / "absent")], {}, "cannot read"),
        ([], env_url,
         "$COUNTER_SERVER_BACKEND: bad port '63x79' in 'redis://:***@127.0.0.1:63x79/0'"),
        (["--backend", "etcd://root:s3cret@127.0.0.1:23x79/k"], {},
         "--backend: bad port '23x79' in 'etcd://root:***@127.0.0.1:23x79/k'"),
        (["--state-file", str(tmp_path / "state")], {"COUNTER_SERVER_BACKEND": "redis://h:1/0"},
         "$COUNTER_SERVER_BACKEND and --state-file"),
    ]  # fmt: skip
    for args, env, message in cases:
        result = run(COMMANDS["server"], *args, env=env)
        assert result.returncode == 2, (args, result.stderr)
        first = result.stderr.splitlines()[0]
        assert message in first, first
        assert "s3cret" not in result.stderr
    secret_file.write_text("")
    secret_file.chmod(0o600)
    result = run(COMMANDS["server"], "--backend-file", str(secret_file))
    assert result.returncode == 2 and "is empty" in result.stderr
