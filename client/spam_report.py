"""Summary of a spam.sh stress run: reads every client's JSON report and the
counter before and after, prints a table and says whether the counter moved by
exactly the sum of acknowledged increments (exit 0 only then).

Usage:
  spam_report.py --before N --after N --clients N [REPORT...]

Options:
  --before N   Counter value read before the clients started.
  --after N    Counter value read after they all finished.
  --clients N  How many clients were launched (reports missing count as failed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from counter_server.common.cli import convert, parse_args, plural


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
    failed = [r for r in reports if r["errors_total"] or r["connections_failed"]]
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
    if failed:
        first = next((r["first_error"] for r in failed if r.get("first_error")), "see reports")
        problems.append(f"{plural(len(failed), 'client')} reported errors (first: {first})")
    if moved != acknowledged:
        problems.append(
            f"the counter moved by {moved:,} but clients acknowledged {acknowledged:,} "
            f"(difference {moved - acknowledged:+,})"
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
    ]
    if summary["ok"]:
        lines.append("RESULT: OK: the counter moved by exactly the acknowledged increments")
    else:
        lines.append("RESULT: FAILED")
        lines += [f"  - {problem}" for problem in summary["problems"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
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
