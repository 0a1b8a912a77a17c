"""The checker every fault test shares (testing/checker.py): both bounds."""

from __future__ import annotations

from testing.checker import judge


def test_an_exact_run():
    verdict = judge(10, 15, 3, 2, [11, 12, 13])
    assert verdict.ok and (verdict.low, verdict.high) == (13, 15), verdict.summary()


def test_lost_increments_are_caught():
    verdict = judge(0, 2, 3, 0, [1, 2, 3])
    assert not verdict.ok
    assert "1 acknowledged increments lost" in verdict.summary()


def test_over_counting_is_caught():
    # Applied twice and acknowledged once: as wrong as a loss.
    verdict = judge(0, 391, 390, 0, range(1, 391))
    assert not verdict.ok and "1 applied beyond what was sent" in verdict.summary()


def test_a_value_twice_and_a_value_outside_are_caught():
    verdict = judge(5, 8, 3, 0, [6, 6, 9])
    assert (verdict.twice, verdict.outside) == (1, 1)
    assert not verdict.ok
