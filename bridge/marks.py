"""High-water marks per key, and the recent versions of each key's records: pure state that
tells a new record from a duplicate, a stale copy or the next revision.

A `MarkBook` holds, for one output topic, the newest upstream position published per key
(a NAV symbol's last `timestamp`, a VWAP instrument's last interval) and, for keys whose
records can change after they were published (NAV), the `Version` of the newest `keep`
positions. `bridge.state` checkpoints the book to Kafka and recovers it.
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

Mark = int
#: `Version.updated_ms` of a record without a readable `updated_at`: older than any.
NO_UPDATE = -1
#: Positions whose versions a book keeps per key, unless told otherwise.
KEEP_VERSIONS = 16


class Version(NamedTuple):
    """What was published for one position: its revision, a digest of its content, and
    the two fields that rank versions (`updated_at` in Unix ms, then official or not)."""

    revision: int
    digest: int
    updated_ms: int
    official: bool

    def outranks(self, other: Version) -> bool:
        """Strictly newer by the vendor's rule: a later `updated_at`, then official over
        indicative (`id == 0`)."""
        return (self.updated_ms, self.official) > (other.updated_ms, other.official)


#: Data fields that say which revision an event is; not part of the content compared.
REVISION_FIELDS = frozenset(("revision", "supersedes"))


def content_digest(data: dict[str, Any]) -> int:
    """A 64-bit digest of an event's content (its data without the revision fields): two
    records with the same digest are the same record sent again.

    Two 32-bit checksums, not a cryptographic hash: it only tells apart the few versions
    of one record, which no one crafts.
    """
    if not REVISION_FIELDS.isdisjoint(data):
        data = {k: v for k, v in data.items() if k not in REVISION_FIELDS}
    text = orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
    return (zlib.adler32(text) << 31) ^ zlib.crc32(text)


def updated_ms(text: Any) -> int:
    """`updated_at` in Unix ms, or `NO_UPDATE` when it is absent or not an ISO time."""
    if type(text) is not str:
        return NO_UPDATE
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return NO_UPDATE
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def version_of(data: dict[str, Any]) -> Version:
    """The `Version` of a published event's data (of either NAV schema version)."""
    revision = data.get("revision")
    return Version(
        revision if type(revision) is int and revision >= 1 else 1,
        content_digest(data),
        updated_ms(data.get("updated_at")),
        bool(data.get("official")),
    )


def _resolved(kept: dict[Mark, Version | bytes], position: Mark) -> Version | None:
    """The version kept for `position`; a published event's JSON is read the first time."""
    found = kept.get(position)
    if type(found) is bytes:
        found = kept[position] = version_of(orjson.loads(found)["data"])
    return found  # type: ignore[return-value]


class Verdict(enum.Enum):
    """What a record for an already published position is."""

    DUPLICATE = "duplicate"  # the same content as the newest version
    STALE = "stale"  # ranks below the newest version: an older copy
    FORGOTTEN = "forgotten"  # older than every version kept: cannot be compared
    LATE = "late"  # never published, newer than the oldest kept: it came after a later one
    REVISION = "revision"  # other content, not older: publish the next revision


class MarkBook:
    """The high-water marks of one output topic and the recent versions per key."""

    def __init__(
        self, topic: str, marks: Mapping[str, Mark] | None = None, *, keep: int = KEEP_VERSIONS
    ) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.topic = topic
        self.keep = keep
        self._marks: dict[str, Mark] = dict(marks or {})
        # key -> position -> Version, ascending by position (the first entry is the oldest);
        # on the hot path the event's JSON stands in for its Version until one is needed
        self._versions: dict[str, dict[Mark, Version | bytes]] = {}
        self.version = 0  # bumps on every change, so checkpoints skip when nothing moved

    def get(self, key: str) -> Mark | None:
        return self._marks.get(key)

    def is_duplicate(self, key: str, mark: Mark) -> bool:
        last = self._marks.get(key)
        return last is not None and mark <= last

    def advance(self, key: str, mark: Mark) -> None:
        last = self._marks.get(key)
        if last is None or mark > last:
            self._marks[key] = mark
            self.version += 1

    def published(self, key: str, mark: Mark, version: Version | bytes) -> None:
        """A record past the mark was published: move the mark and remember its version
        (or the event's JSON, read only if the position is met again)."""
        marks = self._marks  # once per event: `advance` inlined
        last = marks.get(key)
        if last is None or mark > last:
            marks[key] = mark
            self.version += 1
        kept = self._versions.get(key)
        if kept is None:
            kept = self._versions[key] = {}
        kept[mark] = version
        if len(kept) > self.keep:
            del kept[next(iter(kept))]  # positions arrive ascending: the first is the oldest

    def judge(self, key: str, mark: Mark, version: Version) -> tuple[Verdict, Version | None]:
        """What a record at or below the mark is, with the newest version published for its
        position (None when that is no longer kept)."""
        kept = self._versions.get(key)
        newest = _resolved(kept, mark) if kept else None
        if newest is None:
            late = kept and mark > next(iter(kept))
            return (Verdict.LATE if late else Verdict.FORGOTTEN), None
        if version.digest == newest.digest:
            return Verdict.DUPLICATE, newest
        if newest.outranks(version):
            return Verdict.STALE, newest
        return Verdict.REVISION, newest

    def remember(self, key: str, mark: Mark, version: Version) -> None:
        """A record at or below the mark was published (a revision, or a late one)."""
        self._remember(key, mark, version)
        self.version += 1

    def replay(self, key: str, mark: Mark, version: Version | None) -> None:
        """Take in one record read back from the output topic (recovery): idempotent, in
        any order, so a log read twice or from an older checkpoint changes nothing."""
        self.advance(key, mark)
        if version is not None:
            self._remember(key, mark, version)

    def _remember(self, key: str, mark: Mark, version: Version) -> None:
        kept = self._versions.setdefault(key, {})
        known = _resolved(kept, mark)
        if known is not None:
            if version.revision > known.revision:
                kept[mark] = version
            return
        if len(kept) >= self.keep and mark < next(iter(kept)):
            return  # older than every version kept
        newest = next(reversed(kept), None)
        kept[mark] = version
        if newest is not None and mark < newest:  # keep the positions ascending
            self._versions[key] = kept = dict(sorted(kept.items()))
        if len(kept) > self.keep:
            del kept[next(iter(kept))]

    def snapshot(self) -> dict[str, Mark]:
        return dict(self._marks)

    def versions(self, key: str) -> dict[Mark, Version]:
        """The versions kept for `key`, by position (a copy)."""
        kept = self._versions.get(key, {})
        return {position: v for position in list(kept) if (v := _resolved(kept, position))}

    def marked_keys(self) -> list[str]:
        return list(self._marks)

    def __len__(self) -> int:
        return len(self._marks)

    # -- checkpoints ---------------------------------------------------------------------------

    def state_of(self, keys: Iterable[str]) -> dict[str, Any]:
        """The marks and versions of `keys`, as a checkpoint stores them."""
        marks: dict[str, Mark] = {}
        versions: dict[str, list[list[int]]] = {}
        for key in keys:
            mark = self._marks.get(key)
            if mark is None:
                continue
            marks[key] = mark
            kept = self.versions(key)
            if kept:
                versions[key] = [
                    [position, v.revision, v.digest, v.updated_ms, int(v.official)]
                    for position, v in kept.items()
                ]
        return {"marks": marks, "versions": versions}

    def load(self, doc: Mapping[str, Any]) -> None:
        """Merge a checkpoint written by `state_of` (ValueError if it is not one)."""
        try:
            for key, mark in doc.get("marks", {}).items():
                self.advance(str(key), int(mark))
            for key, entries in doc.get("versions", {}).items():
                for position, revision, digest, updated_ms, official in entries:
                    version = Version(int(revision), int(digest), int(updated_ms), bool(official))
                    self._remember(str(key), int(position), version)
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a checkpoint of marks: {exc}") from None
