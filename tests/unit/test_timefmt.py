"""RFC 3339 text of Unix times: the cached calendar arithmetic agrees with `datetime`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from bridge.timefmt import civil_from_days, days_from_civil, iso_from_ms, iso_from_ns

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# datetime's own range, years 1..9999, in Unix milliseconds
MIN_MS = int((datetime(1, 1, 1, tzinfo=UTC) - EPOCH) / timedelta(milliseconds=1))
MAX_MS = int(
    (datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC) - EPOCH) / timedelta(milliseconds=1)
)


def test_known_values() -> None:
    assert iso_from_ms(0) == "1970-01-01T00:00:00.000Z"
    assert iso_from_ms(1677542400123) == "2023-02-28T00:00:00.123Z"
    assert iso_from_ms(-1) == "1969-12-31T23:59:59.999Z"
    assert iso_from_ns(1_723_211_239_000_000_001) == "2024-08-09T13:47:19.000000001Z"
    assert iso_from_ms(951_782_400_000) == "2000-02-29T00:00:00.000Z"  # a leap day


@given(st.integers(MIN_MS, MAX_MS) | st.sampled_from([MIN_MS, MAX_MS, -1, 0]))
def test_milliseconds_agree_with_datetime(ms: int) -> None:
    expected = (EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds")
    expected = expected.removesuffix("+00:00") + "Z"
    assert iso_from_ms(ms) == expected


@given(st.integers(-719_162, 2_932_896))  # 0001-01-01 .. 9999-12-31
def test_days_round_trip(days: int) -> None:
    date = (EPOCH + timedelta(days=days)).date()
    assert civil_from_days(days) == (date.year, date.month, date.day)
    assert days_from_civil(date.year, date.month, date.day) == days
