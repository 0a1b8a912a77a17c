"""The Grafana dashboard and the alerting rules only use series the server
really exports: a server with a state file and one on Redis are scraped,
and every counter_server_* name the files reference must be among them."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import REPO_ROOT, RedisServer, exchange, http_get, require, start_server

MONITORING = REPO_ROOT / "docs" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ALERTS = MONITORING / "alerts.yml"
SERIES = re.compile(r"\bcounter_server_\w+")


def exported(server) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(http_get(server.metrics_url())[1]):
        names.update(sample.name for sample in family.samples)
    return names


def referenced() -> set[str]:
    exprs = [
        target["expr"]
        for panel in json.loads(DASHBOARD.read_text())["panels"]
        for target in panel["targets"]
    ]
    return set(SERIES.findall(" ".join(exprs))) | set(SERIES.findall(ALERTS.read_text()))


@pytest.fixture
def redis_url(tmp_path):
    require("redis-server")
    redis = RedisServer(tmp_path)
    redis.start()
    yield redis.url()
    redis.kill()


def test_every_series_the_dashboard_and_alerts_use_is_exported(tmp_path, redis_url):
    names: set[str] = set()
    for args in (
        ["--state-file", str(tmp_path / "counter.state"), "--rate", "1000"],
        ["--backend", redis_url],
    ):
        with start_server("--metrics-port", "0", *args) as server:
            exchange(server.port, 1, 2)
            names |= exported(server)
    wanted = referenced()
    assert len(wanted) >= 15, wanted
    assert not wanted - names, f"referenced but not exported: {sorted(wanted - names)}"


def test_every_dashboard_panel_has_a_query_and_a_place():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["title"] and panel["targets"] and panel["gridPos"]["w"] > 0


def test_the_alerting_rules_pass_promtool():
    require("promtool")
    result = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rules = ALERTS.read_text().count("- alert:")
    assert rules >= 10 and f"SUCCESS: {rules} rules found" in result.stdout
