"""Shared fixtures: a real server process on loopback, stopped after the test."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest
import trustme
from gevent import socket as gevent_socket
from hypothesis import settings

from support import ServerProcess, require, start_server
from testing.procinfo import children_of

# Shared CI machines stall now and then: judge examples by outcome, not speed.
settings.register_profile("counter", deadline=None)
settings.load_profile("counter")


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    """A server with default settings on a free loopback port."""
    proc = start_server()
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.stop()
        assert "Traceback" not in proc.stderr, proc.stderr


@pytest.fixture
def pair():
    """A connected pair of gevent sockets, closed afterwards (the in-process
    tests of the connection loop, the reaper and the socket helpers)."""
    left, right = gevent_socket.socketpair()
    yield left, right
    left.close()
    right.close()


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate,
    and a second CA nobody trusts; all made now, nothing committed."""
    root = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    paths = {"ca": root / "ca.pem", "stranger_ca": root / "stranger.pem"}
    ca.cert_pem.write_to_path(paths["ca"])
    stranger.cert_pem.write_to_path(paths["stranger_ca"])
    for name, issuer, identities in [
        ("server", ca, ["127.0.0.1", "localhost"]),
        ("client", ca, ["client@example.org"]),
        ("stranger", stranger, ["mallory@example.org"]),
    ]:
        cert = issuer.issue_cert(*identities)
        paths[f"{name}_cert"] = root / f"{name}.pem"
        paths[f"{name}_key"] = root / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(paths[f"{name}_cert"])
        cert.private_key_pem.write_to_path(paths[f"{name}_key"])
    return {k: str(v) for k, v in paths.items()}


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "needs(*programs): real servers the test starts (support.require)"
    )


def pytest_runtest_setup(item) -> None:
    for mark in item.iter_markers("needs"):
        require(*mark.args)


# Folders in the temporary directory that the project's own code makes
# (testing.launcher, bench/, chaos/partition.py, tests/mutants/run.py).
OUR_TEMP_PREFIXES = ("counter-", "bench-", "partition-", "mutant-")
LINGER_SECONDS = 5.0  # for threads and processes a test is still closing


def _namespaces() -> set[str]:
    try:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


def _our_temp_folders() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith(OUR_TEMP_PREFIXES)}


def _left_behind(threads: set, namespaces: set[str], folders: set[str]) -> list[str]:
    deadline = time.monotonic() + LINGER_SECONDS
    while True:
        found = [
            *(
                f"thread {t.name}"
                for t in threading.enumerate()
                if t not in threads and t.is_alive()
            ),
            *(f"child process {pid}" for pid in children_of(os.getpid())),
            *(f"network namespace {n}" for n in _namespaces() - namespaces),
            *(f"folder {tempfile.gettempdir()}/{n}" for n in _our_temp_folders() - folders),
        ]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    """After the last test: fail, naming each, if any thread, child process,
    network namespace or temporary folder of ours made during the run is
    still there (SPEC 10). What other runs made is not judged."""
    threads, namespaces, folders = set(threading.enumerate()), _namespaces(), _our_temp_folders()
    yield
    found = _left_behind(threads, namespaces, folders)
    assert not found, "the run left behind: " + "; ".join(found)
