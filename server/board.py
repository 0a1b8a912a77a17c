"""Metrics of ``--processes`` workers, merged in the parent.

Each worker publishes a snapshot of its own collector (``ServerCollector``)
into its slot of a shared memory board twice a second and once more when it
stops; the parent's ``BoardCollector`` reads every slot at scrape time and
merges them, in the style of prometheus_client's multiprocess mode: counters
and histograms are summed, and so are the pool gauges; the counter value is the
largest any worker saw; health is the worst. When a worker dies, its last
counters are kept (``retire``), so no counter ever goes backwards.

A slot is written under a sequence number (odd while writing), so a reader
never takes a half-written snapshot.
"""

from __future__ import annotations

import json
import mmap
import struct
import time
from collections.abc import Iterable, Iterator

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

SLOT_SIZE = 256 * 1024  # bytes per worker: a snapshot is a few KiB of JSON
_HEADER = struct.Struct("=QI")  # sequence number, length of the JSON that follows
# Gauges that are not summed across workers: name -> how they merge.
_GAUGE_MERGE = {"counter_server_value": max, "counter_server_healthy": min}
_PER_PROCESS = ("process_", "python_")  # each worker's own; the parent exports its own
_EMPTY = {"health": None, "families": []}


def _snapshot(families: Iterable[Metric], health: str | None) -> bytes:
    return json.dumps({"health": health, "families": [
        [f.name, f.type, f.documentation, [[s.name, s.labels, s.value] for s in f.samples]]
        for f in families
        if not f.name.startswith(_PER_PROCESS)
    ]}).encode()  # fmt: skip


class Board:
    """The shared memory; create in the parent before forking."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.memory = mmap.mmap(-1, workers * SLOT_SIZE)
        self._retired: dict[str, list] = {}  # family -> [kind, doc, {(sample, labels): value}]

    def publish(self, index: int, families: Iterable[Metric], health: str | None) -> None:
        """In worker ``index``: replace its snapshot (its figures and its
        health: None, or why it cannot acknowledge increments)."""
        data = _snapshot(families, health)[: SLOT_SIZE - _HEADER.size]
        base = index * SLOT_SIZE
        sequence = _HEADER.unpack_from(self.memory, base)[0]
        _HEADER.pack_into(self.memory, base, sequence + 1, 0)  # odd: being written
        self.memory[base + _HEADER.size : base + _HEADER.size + len(data)] = data
        _HEADER.pack_into(self.memory, base, sequence + 2, len(data))

    def read(self, index: int) -> dict:
        """Worker ``index``'s last snapshot: {"health": ..., "families": [...]}."""
        base = index * SLOT_SIZE
        for _ in range(100):
            before, length = _HEADER.unpack_from(self.memory, base)
            if before % 2:
                time.sleep(0.001)
                continue
            data = bytes(self.memory[base + _HEADER.size : base + _HEADER.size + length])
            if _HEADER.unpack_from(self.memory, base)[0] == before:
                try:
                    return json.loads(data) if data else _EMPTY
                except ValueError:  # larger than a slot (cut short): skip it
                    return _EMPTY
        return _EMPTY

    def retire(self, index: int) -> None:
        """In the parent, when worker ``index`` has died: keep its counters."""
        for name, kind, doc, samples in self.read(index)["families"]:
            if kind in ("counter", "histogram"):
                values = self._retired.setdefault(name, [kind, doc, {}])[2]
                for sample, labels, value in samples:
                    key = (sample, tuple(sorted(labels.items())))
                    values[key] = values.get(key, 0.0) + value
        base = index * SLOT_SIZE
        sequence = _HEADER.unpack_from(self.memory, base)[0]
        _HEADER.pack_into(self.memory, base, sequence + 2, 0)

    def merged(self) -> dict[str, list]:
        """name -> [kind, doc, {(sample, labels): value}] over every worker."""
        merged = {
            name: [kind, doc, dict(values)] for name, (kind, doc, values) in self._retired.items()
        }
        for index in range(self.workers):
            for name, kind, doc, samples in self.read(index)["families"]:
                family = merged.setdefault(name, [kind, doc, {}])
                combine = _GAUGE_MERGE.get(name, lambda a, b: a + b)
                for sample, labels, value in samples:
                    key = (sample, tuple(sorted(labels.items())))
                    values = family[2]
                    values[key] = combine(values[key], value) if key in values else value
        return merged

    def health(self) -> str | None:
        """None while every worker can acknowledge increments, else the first reason."""
        for index in range(self.workers):
            problem = self.read(index)["health"]
            if problem is not None:
                return problem
        return None

    def total(self, name: str) -> float:
        """One unlabelled figure merged over the workers (0 if none has it)."""
        family = self.merged().get(name)
        return sum(family[2].values()) if family else 0.0


class BoardCollector(Collector):
    """The parent's collector: every worker's figures, merged."""

    def __init__(self, board: Board) -> None:
        self._board = board

    def collect(self) -> Iterator[Metric]:
        for name, (kind, doc, samples) in self._board.merged().items():
            family = Metric(name, doc, kind)
            for (sample, labels), value in sorted(samples.items()):
                family.add_sample(sample, dict(labels), value)
            yield family
