"""The --processes metrics board: merging workers' figures, in process."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from counter_server.server.board import Board, BoardCollector


def figures(applied: float, value: float, healthy: float, in_use: float) -> list:
    closed = CounterMetricFamily("counter_server_connections_closed", "c", labels=["reason"])
    closed.add_metric(["peer_closed"], applied / 10)
    return [
        CounterMetricFamily("counter_server_requests_applied", "a", value=applied),
        GaugeMetricFamily("counter_server_value", "v", value=value),
        GaugeMetricFamily("counter_server_healthy", "h", value=healthy),
        GaugeMetricFamily("counter_server_pool_in_use", "p", value=in_use),
        GaugeMetricFamily("process_open_fds", "per process", value=99),
        closed,
    ]


def samples(board: Board) -> dict:
    return {
        (s.name, tuple(s.labels.items())): s.value
        for family in BoardCollector(board).collect()
        for s in family.samples
    }


def test_counters_and_pool_sum_the_value_is_the_largest_health_the_worst():
    board = Board(2)
    board.publish(0, figures(100, 250, 1, 3), None)
    board.publish(1, figures(150, 240, 0, 4), "state file x: cannot write")
    merged = samples(board)
    assert merged[("counter_server_requests_applied_total", ())] == 250
    assert merged[("counter_server_value", ())] == 250
    assert merged[("counter_server_healthy", ())] == 0
    assert merged[("counter_server_pool_in_use", ())] == 7
    assert merged[("counter_server_connections_closed_total", (("reason", "peer_closed"),))] == 25
    assert not any(name.startswith("process_") for name, _ in merged)
    assert board.health() == "state file x: cannot write"


def test_a_dead_workers_counters_are_kept_and_its_gauges_dropped():
    board = Board(2)
    board.publish(0, figures(100, 250, 1, 3), None)
    board.publish(1, figures(150, 240, 1, 4), None)
    board.retire(1)
    board.publish(1, figures(5, 260, 1, 1), None)  # its replacement starts from 0
    merged = samples(board)
    assert merged[("counter_server_requests_applied_total", ())] == 255
    assert merged[("counter_server_pool_in_use", ())] == 4
    assert merged[("counter_server_value", ())] == 260
    assert board.total("counter_server_requests_applied") == 255


def test_a_slot_being_written_or_garbled_reads_as_empty():
    board = Board(1)
    board.publish(0, figures(1, 1, 1, 1), None)
    board.memory[12:16] = b"]]]]"  # a torn snapshot
    assert board.read(0) == {"health": None, "families": []}
