"""Which intervals of a key's data are missing, from the timestamps found in Kafka: the pure
core of `kaiko-bridge completeness`.

A feed with a fixed cadence (VWAP by its aggregate, hourly and daily NAV, daily settlements)
is expected at every slot of its grid in the range asked; real-time NAV has no grid, so a
step longer than a multiple of its usual (median) step is missing. What is missing may lie
inside a `bridge.gap` event, where the bridge said it could not know.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from statistics import median


@dataclass(frozen=True, order=True, slots=True)
class Interval:
    """A half-open span of data time, Unix ms: `start <= t < end`."""

    start: int
    end: int

    def covers(self, other: Interval) -> bool:
        return self.start <= other.start and other.end <= self.end


@dataclass(slots=True)
class KeyReport:
    """One key: how many records were expected and found, and the spans missing (those
    inside a gap event apart)."""

    key: str
    cadence: str
    expected: int | None  # None: no grid (real-time), only the steps are judged
    present: int
    missing: list[Interval] = field(default_factory=list)  # outside every gap event
    in_gaps: list[Interval] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing


def on_grid(present: Iterable[int], step_ms: int, start_ms: int, end_ms: int) -> list[Interval]:
    """The slots of the grid `k * step_ms` within [start_ms, end_ms) with no record, merged
    into spans."""
    found = {t for t in present if start_ms <= t < end_ms and t % step_ms == 0}
    spans: list[Interval] = []
    first = -(-start_ms // step_ms) * step_ms  # the first slot at or after start
    for slot in range(first, end_ms, step_ms):
        if slot in found:
            continue
        if spans and spans[-1].end == slot:
            spans[-1] = Interval(spans[-1].start, slot + step_ms)
        else:
            spans.append(Interval(slot, slot + step_ms))
    return spans


def by_cadence(present: Sequence[int], multiple: float) -> list[Interval]:
    """The steps between consecutive records longer than `multiple` times the median step,
    as the spans strictly between them (the records at both ends are there)."""
    stamps = sorted(set(present))
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    if not steps:
        return []
    usual = median(steps)
    return [Interval(a + 1, b) for a, b in itertools.pairwise(stamps) if b - a > multiple * usual]


def split_by_gaps(
    missing: Iterable[Interval], gaps: Sequence[Interval]
) -> tuple[list[Interval], list[Interval]]:
    """(outside, inside): each missing span wholly inside some gap event's span is inside."""
    outside: list[Interval] = []
    inside: list[Interval] = []
    for span in missing:
        (inside if any(gap.covers(span) for gap in gaps) else outside).append(span)
    return outside, inside
