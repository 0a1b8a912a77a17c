"""The one judge of a counting run under faults (the suite's fault tests,
``chaos/run.py`` and ``chaos/partition.py``), in the manner of Jepsen's
counter checker: the counter must have moved by at least the increments
acknowledged and at most those plus the increments sent without an answer
(each of those may or may not have been applied); no reply value may be
handed to two increments; every reply lies in (start, final].
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    """What a run proved: its figures, and ``problems`` (empty when exact)."""

    start: int
    final: int
    acknowledged: int  # the sum of the increments acknowledged
    unanswered: int  # the sum of the increments sent without an answer
    twice: int  # reply values handed to more than one increment
    outside: int  # reply values outside (start, final]
    problems: tuple[str, ...]

    @property
    def low(self) -> int:
        return self.start + self.acknowledged

    @property
    def high(self) -> int:
        return self.start + self.acknowledged + self.unanswered

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line with every figure (and the problems, if any)."""
        line = (
            f"final {self.final} in [{self.low}, {self.high}] (start {self.start}, "
            f"acknowledged {self.acknowledged}, unanswered {self.unanswered}), "
            f"twice {self.twice}, outside {self.outside}"
        )
        return line if self.ok else f"{line}: {'; '.join(self.problems)}"


def judge(
    start: int, final: int, acknowledged: int, unanswered: int, replies: Iterable[int]
) -> Verdict:
    """Judge a run. ``acknowledged`` and ``unanswered`` are sums of
    increments; ``replies`` the values handed to positive increments."""
    counts = Counter(replies)
    twice = sum(n - 1 for n in counts.values() if n > 1)
    outside = sum(n for value, n in counts.items() if not start < value <= final)
    low, high = start + acknowledged, start + acknowledged + unanswered
    problems = []
    if final < low:
        problems.append(f"{low - final} acknowledged increments lost (final below {low})")
    if final > high:
        problems.append(f"{final - high} applied beyond what was sent (final above {high})")
    if twice:
        problems.append(f"{twice} reply values handed out twice")
    if outside:
        problems.append(f"{outside} reply values outside ({start}, {final}]")
    return Verdict(start, final, acknowledged, unanswered, twice, outside, tuple(problems))
