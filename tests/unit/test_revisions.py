"""A NAV tick's identity is its timestamp, its content can change: what the mark book decides
for a record of a published timestamp, and what it must remember (bounded) to decide it."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from bridge.marks import NO_UPDATE, MarkBook, Verdict, Version, content_digest, version_of
from bridge.normalize.nav import (
    SOURCE_REST,
    SOURCE_WS,
    nav_tick,
    nav_tick_versioned,
    newest_per_timestamp,
    revise,
)
from tests.samples import DAILY

SYMBOL = DAILY["symbol"]
TS = DAILY["timestamp"]


def versioned(record: dict[str, object], source: str = SOURCE_WS) -> Version:
    return nav_tick_versioned(record, source=source)[1]


def indicative() -> dict[str, object]:
    return {**DAILY, "id": 0}


def corrected() -> dict[str, object]:
    return {**DAILY, "close": 98.9, "updated_at": "2023-03-01T09:00:00.000Z"}


def test_the_same_content_has_the_same_digest_from_every_path() -> None:
    ws = versioned(dict(DAILY), SOURCE_WS)
    rest = versioned(dict(reversed(list(DAILY.items()))), SOURCE_REST)  # other key order
    assert ws == rest
    assert ws.official
    assert ws.updated_ms == 1_677_542_400_000
    assert versioned(indicative()).digest != ws.digest
    assert versioned(corrected()).digest != ws.digest


def test_the_version_of_a_published_event_is_the_version_it_was_published_with() -> None:
    event, version = nav_tick_versioned(dict(DAILY), source=SOURCE_WS)
    assert version_of(event.data) == version
    revised = revise(nav_tick(corrected(), source=SOURCE_WS), 3)
    assert revised.id == f"nav:{SYMBOL}:{TS}:3"
    assert (revised.data["revision"], revised.data["supersedes"]) == (3, 2)
    assert version_of(revised.data) == versioned(corrected())._replace(revision=3)
    v1_data = {k: v for k, v in event.data.items() if k not in ("revision", "supersedes")}
    assert version_of(v1_data) == version  # events written before revisions existed
    assert content_digest(v1_data) == content_digest(event.data)


def test_indicative_then_official_then_correction_are_three_revisions() -> None:
    book = MarkBook("t")
    book.published(SYMBOL, TS, versioned(indicative()))
    verdict, newest = book.judge(SYMBOL, TS, versioned(dict(DAILY)))
    assert verdict is Verdict.REVISION
    assert newest is not None
    assert newest.revision == 1
    book.remember(SYMBOL, TS, versioned(dict(DAILY))._replace(revision=2))
    verdict, newest = book.judge(SYMBOL, TS, versioned(corrected()))
    assert verdict is Verdict.REVISION
    assert newest is not None
    assert newest.revision == 2
    book.remember(SYMBOL, TS, versioned(corrected())._replace(revision=3))
    assert book.judge(SYMBOL, TS, versioned(corrected()))[0] is Verdict.DUPLICATE
    # what the correction superseded, sent again, is older: dropped
    assert book.judge(SYMBOL, TS, versioned(dict(DAILY)))[0] is Verdict.STALE
    assert book.judge(SYMBOL, TS, versioned(indicative()))[0] is Verdict.STALE


def test_an_official_value_outranks_an_indicative_one_of_the_same_update() -> None:
    official, unofficial = versioned(dict(DAILY)), versioned(indicative())
    assert official.outranks(unofficial)
    assert not unofficial.outranks(official)
    later = versioned(corrected())
    assert later.outranks(official)
    bare = Version(1, 1, NO_UPDATE, True)
    assert official.outranks(bare)  # an updated_at beats none


def test_what_is_remembered_is_bounded_and_late_records_are_told_from_forgotten_ones() -> None:
    book = MarkBook("t", keep=4)
    for ts in range(0, 100, 10):
        book.published("s", ts, Version(1, ts, NO_UPDATE, True))
    assert sorted(book.versions("s")) == [60, 70, 80, 90]
    assert book.get("s") == 90
    assert book.judge("s", 50, Version(1, 5, NO_UPDATE, True))[0] is Verdict.FORGOTTEN
    assert book.judge("s", 75, Version(1, 5, NO_UPDATE, True))[0] is Verdict.LATE
    book.remember("s", 75, Version(1, 75, NO_UPDATE, True))
    assert sorted(book.versions("s")) == [70, 75, 80, 90]
    assert book.judge("s", 75, Version(1, 75, NO_UPDATE, True))[0] is Verdict.DUPLICATE


def test_a_checkpoint_round_trips() -> None:
    book = MarkBook("t", keep=3)
    for ts in (1, 2, 3, 4):
        book.published("a", ts, Version(1, -ts, ts * 1000, ts % 2 == 0))
    book.remember("a", 3, Version(2, 33, 5000, True))
    book.advance("vwap-key", 7)
    copy = MarkBook("t", keep=3)
    copy.load(book.state_of(["a", "vwap-key", "absent"]))
    assert copy.snapshot() == book.snapshot()
    assert copy.versions("a") == book.versions("a")
    assert copy.versions("vwap-key") == {}


published_logs = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=30),  # timestamp
        st.integers(min_value=1, max_value=4),  # revision
        st.integers(min_value=-5, max_value=5),  # digest
    ),
    min_size=1,
    max_size=60,
)


@given(log=published_logs, seed=st.integers(), keep=st.integers(min_value=1, max_value=8))
def test_replaying_the_log_in_any_order_or_twice_gives_the_same_book(
    log: list[tuple[int, int, int]], seed: int, keep: int
) -> None:
    def replayed(entries: list[tuple[int, int, int]]) -> MarkBook:
        book = MarkBook("t", keep=keep)
        for ts, revision, digest in entries:
            book.replay("s", ts, Version(revision, digest * 10 + revision, NO_UPDATE, True))
        return book

    # one digest per (timestamp, revision), as the bridge publishes them
    log = list({(ts, rev): (ts, rev, d) for ts, rev, d in log}.values())
    shuffled = [*log, *log]
    random.Random(seed).shuffle(shuffled)
    a, b = replayed(log), replayed(shuffled)
    assert a.snapshot() == b.snapshot()
    assert a.versions("s") == b.versions("s")
    newest: dict[int, tuple[int, int]] = {}
    for ts, rev, d in log:
        if rev > newest.get(ts, (0, 0))[0]:
            newest[ts] = (rev, d * 10 + rev)
    kept = sorted(newest)[-keep:]
    assert {ts: (v.revision, v.digest) for ts, v in a.versions("s").items()} == {
        ts: newest[ts] for ts in kept
    }
    assert list(a.versions("s")) == sorted(a.versions("s"))


def test_one_record_per_timestamp_wins_inside_a_page() -> None:
    def page(*records: dict[str, object]) -> list[dict[str, object]]:
        decoded = [nav_tick_versioned(dict(r), source=SOURCE_REST) for r in records]
        return [event.data for event, _ in newest_per_timestamp(decoded)]

    official = dict(DAILY)
    unofficial = indicative()
    correction = corrected()
    other = {**DAILY, "timestamp": TS + 86_400_000, "date": "2023-03-01"}
    # by updated_at first, whatever the page order (records come sorted by timestamp)
    assert [d["close"] for d in page(correction, official, other)] == [98.9, 98.63]
    assert [d["close"] for d in page(official, correction, other)] == [98.9, 98.63]
    # then official over indicative
    assert [d["official"] for d in page(official, unofficial)] == [True]
    assert [d["official"] for d in page(unofficial, official)] == [True]
    # then the later one in the page
    same = {**DAILY, "extra_field": 1}
    assert [d.get("extra") for d in page(official, same)] == [{"extra_field": 1}]
    assert len(page(official, other)) == 2


def test_a_published_event_s_json_stands_in_for_its_version_until_needed() -> None:
    """The hot path keeps the JSON it sent; the version is read from it when compared."""
    event, version = nav_tick_versioned(dict(DAILY), source=SOURCE_WS)
    book = MarkBook("t")
    book.published(SYMBOL, TS, event.to_json())
    assert book.judge(SYMBOL, TS, version)[0] is Verdict.DUPLICATE
    assert book.judge(SYMBOL, TS, versioned(corrected()))[0] is Verdict.REVISION
    assert book.versions(SYMBOL) == {TS: version}
    copy = MarkBook("t")
    copy.load(book.state_of([SYMBOL]))
    assert copy.versions(SYMBOL) == {TS: version}
