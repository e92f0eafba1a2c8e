"""NAV normalization: every field mapped or kept; bad records raise BadRecord, nothing else."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.errors import BadRecord
from bridge.normalize.nav import SOURCE_WS, nav_tick
from tests.samples import DAILY, HOURLY, NAV_FIELDS, REALTIME


def test_every_upstream_field_is_mapped_or_kept() -> None:
    record = {**HOURLY, "weight": 0.5, "components": ["btc"]}
    data = nav_tick(record, source=SOURCE_WS).data
    for field, value in HOURLY.items():
        assert data[field] == value
    assert data["extra"] == {"weight": 0.5, "components": ["btc"]}
    assert data["frequency"] == "hourly"
    assert data["official"] is True


def test_frequency_and_official_flag() -> None:
    assert nav_tick(DAILY, source=SOURCE_WS).data["frequency"] == "daily"
    assert nav_tick(REALTIME, source=SOURCE_WS).data["frequency"] == "real-time"
    assert nav_tick({**DAILY, "id": 0}, source=SOURCE_WS).data["official"] is False


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ([1, 2], "not_an_object"),
        ({**DAILY, "symbol": None}, "missing_field"),
        ({**DAILY, "symbol": "vnfa-btca-15"}, "bad_symbol"),
        ({k: v for k, v in DAILY.items() if k != "timestamp"}, "missing_field"),
        ({**DAILY, "timestamp": "1677542400000"}, "bad_field"),
        ({**DAILY, "timestamp": 1677542400}, "bad_field"),  # seconds, not ms
        ({**DAILY, "close": "98.6"}, "bad_field"),
        ({**DAILY, "close": True}, "bad_field"),
        ({k: v for k, v in DAILY.items() if k != "close"}, "missing_field"),
        ({**DAILY, "date": 20230228}, "bad_field"),
    ],
)
def test_bad_records_name_a_reason(record: Any, reason: str) -> None:
    with pytest.raises(BadRecord) as info:
        nav_tick(record, source=SOURCE_WS)
    assert info.value.reason == reason


def test_symbol_must_match_the_socket() -> None:
    with pytest.raises(BadRecord, match="symbol_mismatch"):
        nav_tick(DAILY, source=SOURCE_WS, expected_symbol="other-d")


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
field_names = st.sampled_from([*NAV_FIELDS, "other"])
records = st.one_of(
    json_values,
    st.dictionaries(field_names, json_values, max_size=12),
    st.builds(
        lambda base, patch: {**base, **patch},
        st.sampled_from([DAILY, HOURLY, REALTIME]),
        st.dictionaries(field_names, json_values, max_size=3),
    ),
)


@settings(max_examples=500)
@given(records)
def test_normalize_raises_only_bad_record(record: Any) -> None:
    try:
        event = nav_tick(record, source=SOURCE_WS)
    except BadRecord:
        return
    assert event.validation_error() is None
