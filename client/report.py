"""The load run's report: one dict of figures, printed as text or JSON."""

from __future__ import annotations

from collections import Counter

from hdrh.histogram import HdrHistogram

from counter_server.client.load import ERROR_KINDS, LoadRun
from counter_server.common.values import plural

HIGHEST_LATENCY_US = 3_600_000_000  # one hour
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99_9", 99.9))


def summarize(run: LoadRun) -> dict:
    """All the figures of a finished run, JSON-ready."""
    settings = run.settings
    results = run.results
    histogram = HdrHistogram(1, HIGHEST_LATENCY_US, 3)
    errors: Counter = Counter()
    for result in results:
        errors.update(result.errors)
        for micros, count in result.latency_us.items():
            histogram.record_value(min(max(micros, 1), HIGHEST_LATENCY_US), count)
    acknowledged = sum(r.acknowledged for r in results)
    seen = [r.last_value for r in results if r.last_value is not None]
    elapsed = run.elapsed
    latency = None
    if histogram.get_total_count():
        latency = {name: histogram.get_value_at_percentile(p) for name, p in PERCENTILES}
        latency["max"] = histogram.get_max_value()
    first_error = next((r.error_detail for r in results if r.error_detail), None)
    return {
        "server": f"{settings.host}:{settings.port}",
        "started_at": round(run.started_wall, 3),
        "finished_at": round(run.started_wall + elapsed, 3),
        "connections": settings.connections,
        "connections_failed": sum(1 for r in results if r.errors),
        "pipeline": settings.pipeline,
        "increment": settings.increment,
        "duration_s": round(elapsed, 3),
        "interrupted": run.interrupted,
        "requests_sent": sum(r.sent for r in results),
        "requests_acknowledged": acknowledged,
        "increments_acknowledged": acknowledged * settings.increment,
        "errors": {kind: errors.get(kind, 0) for kind in ERROR_KINDS},
        "errors_total": sum(errors.values()),
        "first_error": first_error,
        "replies_per_second": round(acknowledged / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_us": latency,
        "last_counter_value": max(seen) if seen else None,
    }


def format_text(summary: dict) -> str:
    """The report a person reads at the end of a run."""
    errors = summary["errors"]
    error_text = ", ".join(f"{k} {v:,}" for k, v in errors.items() if v) or "none"
    lines = [
        f"server                 {summary['server']}",
        f"opened                 {plural(summary['connections'], 'connection')} "
        f"({summary['connections_failed']:,} with errors), "
        f"{summary['pipeline']} in flight each, increment {summary['increment']}",
        f"duration               {summary['duration_s']:.2f} s"
        + (" (interrupted)" if summary["interrupted"] else ""),
        f"requests acknowledged  {summary['requests_acknowledged']:,} "
        f"of {summary['requests_sent']:,} sent",
        f"throughput             {summary['replies_per_second']:,.0f} replies/s",
        f"errors                 {summary['errors_total']:,} ({error_text})",
    ]
    if summary["first_error"]:
        lines.append(f"first error            {summary['first_error']}")
    latency = summary["latency_us"]
    if latency:
        parts = "  ".join(f"{name.replace('_', '.')} {_ms(us)}" for name, us in latency.items())
        lines.append(f"latency (ms)           {parts}")
    last = summary["last_counter_value"]
    lines.append(f"last counter value     {'-' if last is None else f'{last:,}'}")
    return "\n".join(lines)


def _ms(micros: int) -> str:
    return f"{micros / 1000:.3f}"
