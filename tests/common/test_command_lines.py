"""Every command line, tried as a new user would: unknown options, --version,
messages that say what is wrong, and a missing virtualenv."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from counter_server.common import __version__
from counter_server.common.cli import UsageError, host_port, positive_rate
from support import REPO_ROOT

COMMANDS = {
    "server": REPO_ROOT / "server" / "server.py",
    "client": REPO_ROOT / "client" / "client.py",
    "chaos": REPO_ROOT / "chaos" / "chaos.py",
    "bench": REPO_ROOT / "bench" / "run.py",
}


def run(script, *args: str, python: tuple[str, ...] = (sys.executable,)):
    return subprocess.run(
        [*python, str(script), *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        stdin=subprocess.DEVNULL,
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
    assert result.stdout.strip() == f"counter {__version__}"


def test_the_version_has_one_value():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', pyproject, re.M)[1] == __version__


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
