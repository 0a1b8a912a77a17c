"""chaos/partition.py, short form: real hosts made of network namespaces, a
real etcd cluster and a real Redis set with sentinels; the etcd leader cut off
from its followers, and Redis {primary, replica} cut off from the rest with
replicas=all. The full run (every backend and nemesis) is the script's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from support import REPO_ROOT

SCRIPT = REPO_ROOT / "chaos" / "partition.py"


def can_make_hosts() -> str | None:
    if os.geteuid() != 0:
        return "needs root for ip netns"
    for tool in ("ip", "etcd", "etcdctl", "redis-server", "redis-sentinel"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = subprocess.run(["ip", "netns", "add", f"cpprobe{os.getpid()}"], capture_output=True)
    if probe.returncode:
        return f"this kernel refuses network namespaces: {probe.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", f"cpprobe{os.getpid()}"], capture_output=True)
    return None


WHY_NOT = can_make_hosts()


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


# Before any test here ran (collection): only this run's namespaces are judged.
BEFORE = namespaces() if WHY_NOT is None else set()


def run(*args: str) -> list[dict]:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", *args],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")
@pytest.mark.parametrize(
    ("backend", "fault"), [("etcd", "5"), ("redis-replicas-all", "6")], ids=["etcd", "redis-all"]
)
def test_a_split_loses_nothing_and_hands_out_nothing_twice(backend, fault):
    (result,) = run("--backends", backend, "--nemeses", "split", "--before", "2",
                    "--fault", fault, "--after", "3")  # fmt: skip
    assert result["acks_before_fault"] > 100, result
    assert result["ok"] and result["in_range"], result  # both bounds, nothing twice
    assert result["lost"] == 0 and result["extra"] == 0 and result["twice"] == 0, result
    if backend == "etcd":  # the majority side keeps serving
        assert result["acks_during_fault"] > 0, result
        assert result["first_ack_after_fault_s"] <= 10, result


def test_without_root_it_says_so(monkeypatch):
    from chaos.partition import CannotRun, Network

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(CannotRun, match="needs root"):
        Network(6).create()


def test_no_hosts_are_left_behind():
    if WHY_NOT is not None:
        pytest.skip(WHY_NOT)
    assert not {n for n in namespaces() - BEFORE if n.startswith("cp")}
