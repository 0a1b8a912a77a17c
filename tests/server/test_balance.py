"""server.balance: which worker steps back from accepting."""

from __future__ import annotations

from counter_server.server.balance import SLACK, AcceptBalance


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
