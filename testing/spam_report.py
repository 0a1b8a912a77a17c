"""Summary of a spam.sh stress run: reads every client's JSON report and the
counter before and after, prints a table and the verdict (exit 0 only when OK).

The check is a range, as Jepsen's counter checker makes it: every
acknowledged increment must be in the counter, and the counter may also hold
increments that were sent but not answered (a frame that timed out on the
client may still be applied when the server reaches it), so

    acknowledged <= moved <= acknowledged + sent without an answer.

Below the range, acknowledged increments were lost; above it, the counter
moved by more than anyone sent.

Usage:
  spam_report.py --before N --after N --clients N [REPORT...]
  spam_report.py --pool-from URL

Options:
  --before N       Counter value read before the clients started.
  --after N        Counter value read after they all finished.
  --clients N      How many clients were launched (reports missing count as failed).
  --pool-from URL  Print the pool size a server's /metrics (URL) reports, or nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from counter_server.common.cli import convert, parse_args
from counter_server.common.values import plural


def load_reports(paths: list[str]) -> tuple[list[dict], list[str]]:
    """The parsed reports, and the paths that held no readable report."""
    reports, unreadable = [], []
    for path in paths:
        try:
            text = Path(path).read_text().strip()
            reports.append(json.loads(text.splitlines()[-1]))
        except (OSError, ValueError, IndexError):
            unreadable.append(path)
    return reports, unreadable


def verdict(before: int, after: int, clients: int, reports: list[dict], missing: int) -> dict:
    """Every figure of the summary table, and whether the run passed."""
    acknowledged = sum(r["increments_acknowledged"] for r in reports)
    requests = sum(r["requests_acknowledged"] for r in reports)
    unanswered = sum(
        (r["requests_sent"] - r["requests_acknowledged"]) * r["increment"] for r in reports
    )
    failed = [r for r in reports if r["errors_total"] or r["connections_failed"]]
    wrong = [r for r in reports if any(r["errors"].get(kind) for kind in _WRONG_REPLIES)]
    starts = [r["started_at"] for r in reports if r.get("started_at")]
    ends = [r["finished_at"] for r in reports if r.get("finished_at")]
    window = max(ends) - min(starts) if starts and ends else 0.0
    p99s = [r["latency_us"]["p99"] for r in reports if r.get("latency_us")]
    moved = after - before
    problems = []
    if missing:
        problems.append(
            f"{missing} of {plural(clients, 'client')} produced no report (crashed or killed)"
        )
    notes = []
    if failed:
        first = next((r["first_error"] for r in failed if r.get("first_error")), "see reports")
        notes.append(f"{plural(len(failed), 'client')} reported errors (first: {first})")
    if wrong:
        problems.append(f"{plural(len(wrong), 'client')} received wrong replies "
                        f"({', '.join(_WRONG_REPLIES)})")  # fmt: skip
    if moved < acknowledged:
        problems.append(
            f"lost: the counter moved by {moved:,}, below the {acknowledged:,} increments "
            f"acknowledged (lower bound broken by {acknowledged - moved:,})"
        )
    elif moved > acknowledged + unanswered:
        problems.append(
            f"too many: the counter moved by {moved:,}, above acknowledged + unanswered = "
            f"{acknowledged + unanswered:,} (upper bound broken by "
            f"{moved - acknowledged - unanswered:,})"
        )
    return {
        "clients": clients,
        "clients_ok": len(reports) - len(failed),
        "clients_failed": len(failed) + missing,
        "requests_acknowledged": requests,
        "increments_acknowledged": acknowledged,
        "replies_per_second": requests / window if window > 0 else 0.0,
        "worst_p99_us": max(p99s) if p99s else None,
        "before": before,
        "after": after,
        "moved": moved,
        "unanswered": unanswered,
        "notes": notes,
        "problems": problems,
        "ok": not problems,
    }


def format_table(summary: dict) -> str:
    worst = summary["worst_p99_us"]
    lines = [
        f"clients ok / failed      {summary['clients_ok']} / {summary['clients_failed']}",
        f"requests acknowledged    {summary['requests_acknowledged']:,}",
        f"increments acknowledged  {summary['increments_acknowledged']:,}",
        f"aggregate throughput     {summary['replies_per_second']:,.0f} replies/s",
        f"worst p99 latency        {'-' if worst is None else f'{worst / 1000:.3f} ms'}",
        f"counter before / after   {summary['before']:,} / {summary['after']:,} "
        f"(moved by {summary['moved']:,})",
        "acknowledged <= moved <= acknowledged + unanswered: "
        f"{summary['increments_acknowledged']:,} <= {summary['moved']:,} <= "
        f"{summary['increments_acknowledged']:,} + {summary['unanswered']:,}",
    ]
    lines += [f"note: {note}" for note in summary["notes"]]
    if summary["ok"] and summary["moved"] == summary["increments_acknowledged"]:
        lines.append("RESULT: OK: the counter moved by exactly the acknowledged increments")
    elif summary["ok"]:
        extra = summary["moved"] - summary["increments_acknowledged"]
        lines.append(
            f"RESULT: OK: every acknowledged increment is in the counter; {extra:,} of the "
            f"{summary['unanswered']:,} unanswered ones were applied too (never answered: a "
            "client timed out or its connection ended first)"
        )
    else:
        lines.append("RESULT: FAILED")
        lines += [f"  - {problem}" for problem in summary["problems"]]
    return "\n".join(lines)


# Reply errors that mean the server answered wrongly (not only late or never).
_WRONG_REPLIES = ("not_increasing", "extra_reply", "short_reply")


def pool_from(url: str) -> int | None:
    """``counter_server_pool_size`` at ``url`` (a /metrics URL), or None."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except (OSError, ValueError, urllib.error.URLError):
        return None
    for line in text.splitlines():
        if line.startswith("counter_server_pool_size "):
            return int(float(line.split()[1]))
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    if args["--pool-from"]:
        pool = pool_from(args["--pool-from"])
        if pool is not None:
            print(pool)
        return 0
    before, after = (convert(__doc__, f, args[f], _count) for f in ("--before", "--after"))
    clients = convert(__doc__, "--clients", args["--clients"], _count)
    reports, unreadable = load_reports(args["REPORT"])
    missing = len(unreadable) + max(0, clients - len(args["REPORT"]))
    summary = verdict(before, after, clients, reports, missing)
    print(format_table(summary), flush=True)
    return 0 if summary["ok"] else 1


def _count(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(f"must be >= 0, got {raw!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
