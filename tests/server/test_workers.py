"""server.workers, in process: which worker steps back from accepting, and
the metrics board that merges the workers' figures and totals."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from counter_server.server.workers import SLACK, AcceptBalance, Board, BoardCollector, Totals


def test_a_worker_ahead_of_the_least_busy_one_steps_back():
    balance = AcceptBalance(3)
    for index, count in enumerate((5, 5 + SLACK, 5 + SLACK + 1)):
        balance.serving(index, count)
    assert not balance.ahead(0)
    assert not balance.ahead(1)  # within the slack
    assert balance.ahead(2)


def test_absent_workers_are_not_waited_for():
    balance = AcceptBalance(2)
    balance.serving(0, 10)
    assert not balance.ahead(0), "the other worker has not started accepting"
    balance.serving(1, 0)
    assert balance.ahead(0)
    balance.absent(1)  # died or stopping
    assert not balance.ahead(0)


def test_one_worker_alone_never_steps_back():
    balance = AcceptBalance(1)
    balance.serving(0, 1000)
    assert not balance.ahead(0)


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
    board.publish(0, figures(100, 250, 1, 3), None, Totals(100, 250))
    board.publish(1, figures(150, 240, 0, 4), "state file x: cannot write", Totals(150, 240))
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
    board.publish(0, figures(100, 250, 1, 3), None, Totals(100, 250))
    board.publish(1, figures(150, 240, 1, 4), None, Totals(150, 240))
    board.retire(1)
    board.publish(1, figures(5, 260, 1, 1), None, Totals(5, 260))  # its replacement starts from 0
    merged = samples(board)
    assert merged[("counter_server_requests_applied_total", ())] == 255
    assert merged[("counter_server_pool_in_use", ())] == 4
    assert merged[("counter_server_value", ())] == 260
    assert board.totals() == Totals(255, 260)


def test_a_slot_being_written_or_garbled_reads_as_empty():
    board = Board(1)
    board.publish(0, figures(1, 1, 1, 1), None, Totals(1, 1))
    board.memory[12:16] = b"]]]]"  # a torn snapshot
    assert board.read(0) == {"health": None, "totals": [0, 0], "families": []}
