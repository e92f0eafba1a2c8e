"""The pure core of `completeness`: missing slots on a cadence's grid, missing steps in a
real-time series, and which of them a gap event covers."""

from __future__ import annotations

from bridge.completeness import Interval, KeyReport, by_cadence, on_grid, split_by_gaps

HOUR = 3_600_000


def test_every_slot_of_the_grid_present_is_complete() -> None:
    stamps = [k * HOUR for k in range(10)]
    assert on_grid(stamps, HOUR, 0, 10 * HOUR) == []


def test_missing_slots_merge_into_spans_and_the_range_is_half_open() -> None:
    stamps = [k * HOUR for k in (0, 1, 4, 5, 7)]
    assert on_grid(stamps, HOUR, 0, 8 * HOUR) == [
        Interval(2 * HOUR, 4 * HOUR),
        Interval(6 * HOUR, 7 * HOUR),
    ]
    assert on_grid(stamps, HOUR, 0, 7 * HOUR) == [
        Interval(2 * HOUR, 4 * HOUR),
        Interval(6 * HOUR, 7 * HOUR),
    ]  # the slot at 7h is the end bound: not asked for


def test_the_grid_starts_at_the_first_slot_in_the_range_and_ignores_off_grid_stamps() -> None:
    assert on_grid([HOUR + 5, 2 * HOUR], HOUR, HOUR // 2, 3 * HOUR) == [Interval(HOUR, 2 * HOUR)]


def test_a_real_time_step_longer_than_the_multiple_of_the_usual_one_is_missing() -> None:
    stamps = [0, 1000, 2000, 3000, 9000, 10000, 11000]
    assert by_cadence(stamps, multiple=3) == [Interval(3001, 9000)]
    assert by_cadence(stamps, multiple=10) == []
    assert by_cadence([5], multiple=3) == []


def test_missing_spans_inside_a_gap_event_are_told_apart() -> None:
    missing = [Interval(2 * HOUR, 4 * HOUR), Interval(6 * HOUR, 7 * HOUR)]
    gaps = [Interval(HOUR + 1, 4 * HOUR)]  # after 1h, before 4h
    outside, inside = split_by_gaps(missing, gaps)
    assert inside == [Interval(2 * HOUR, 4 * HOUR)]
    assert outside == [Interval(6 * HOUR, 7 * HOUR)]
    report = KeyReport("vnfa-btca-15-h", "1h", 8, 5, outside, inside)
    assert not report.complete
    assert KeyReport("k", "1h", 8, 8, [], inside).complete
