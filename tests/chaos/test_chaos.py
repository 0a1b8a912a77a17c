"""The chaos run, bounded: a few seconds of every kind of bad client while good
clients count (the script is ``python chaos/chaos.py``; 20 s by default)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

from chaos.run import BAD_KINDS, closed, rejected, verdicts
from support import REPO_ROOT

CHAOS = REPO_ROOT / "chaos" / "chaos.py"


def run_chaos(*args: str) -> tuple[int, dict]:
    result = subprocess.run(
        [sys.executable, str(CHAOS), "--json", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd="/",
    )
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def failed_checks(report: dict) -> dict:
    return {name: c["detail"] for name, c in report["checks"].items() if not c["ok"]}


def test_bad_clients_never_hurt_good_ones():
    code, report = run_chaos("--duration", "4", "--good", "30")
    assert code == 0, failed_checks(report)
    assert report["good"]["acknowledged"] > 1000
    for kind, row in report["bad_clients"].items():
        assert row["sent"] > 0, f"no {kind} client ran"
    names = set(report["checks"])
    assert "counter within [acknowledged, acknowledged + unanswered], no value twice" in names
    assert "no file descriptor leaked" in names
    assert "closed by write timeout = never-reading" in names
    assert "accepted = every connection opened" in names


def test_sigterm_during_chaos_stops_gracefully():
    code, report = run_chaos("--duration", "4", "--good", "30", "--sigterm")
    assert code == 0, failed_checks(report)
    assert report["checks"]["every frame applied was answered (the replies owed)"]["ok"]
    assert report["checks"][
        "counter within [acknowledged, acknowledged + unanswered], no value twice"
    ]["ok"]


class FakeHarness:
    opened = 11


def test_verdicts_fail_when_a_count_is_off():
    sent = Counter({kind: 1 for kind in BAD_KINDS})
    before = Counter()
    after = Counter(
        {
            rejected("checksum"): 2,
            rejected("overflow"): 1,
            closed("refused"): 3,
            closed("reset"): 1,
            closed("frame_timeout"): 0,  # the slowloris client was not caught
            closed("write_timeout"): 1,
            closed("peer_closed"): 1 + 1 + 1 + 2 + 1,
            "counter_server_connections_accepted_total": 10,
        }
    )
    results = verdicts(before, after, sent, good=2, h=FakeHarness())
    failing = {name for name, (ok, _) in results.items() if not ok}
    assert failing == {"closed by frame timeout = slowloris"}
