"""Client of the Vinter NAV REST API (`nav_daily`, `nav_hourly`, real-time): ranges of
records in timestamp order, transient failures retried a few times here. What it relies on
from the vendor docs, and how it reads a range the 2000-record cap cuts: docs/design.md,
"Vinter REST"."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from pydantic import SecretStr

from bridge.backoff import Backoff
from bridge.errors import AuthError, BadRecord, UpstreamError
from bridge.normalize.nav import MAX_MS, MIN_MS

log = logging.getLogger(__name__)

PATHS = {
    "daily": "/api/v3/nav_daily/",
    "hourly": "/api/v3/nav_hourly/",
    "real-time": "/api/v3/nav_real_time/",
}
PAGE_CAP = 2000
SOURCE = "vinter.rest"
MAX_RETRY_AFTER_S = 300.0
#: The largest body read, after decompression, unless told otherwise.
MAX_BODY_BYTES = 32 << 20
#: How much of an error body an error message quotes.
QUOTED_CHARS = 200
_TOKEN = re.compile(r"(token=)[^&\s\"'#]*", re.IGNORECASE)


def format_time(ms: int) -> str:
    """Unix ms -> `YYYY-MM-DDTHH:MM:SS.fffZ`, the most precise of the documented formats."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{ms % 1000:03d}Z"
    )


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        return None  # an HTTP-date: fall back to our own backoff


def _timestamp(record: Any) -> int | None:
    """The record's `timestamp` if it is Unix milliseconds (an integer in the range the
    normalizers accept), else None: a record in seconds or microseconds is bad input."""
    ts = record.get("timestamp") if isinstance(record, dict) else None
    return ts if type(ts) is int and MIN_MS <= ts <= MAX_MS else None


def parse_body(raw: bytes) -> list[Any]:
    """The `data` list of a documented response envelope, or BadRecord."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRecord("bad_body", f"response is not JSON: {exc}", raw=raw) from None
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise BadRecord("bad_body", "response is not {result, message, data: [...]}", raw=raw)
    if body.get("result", "success") != "success":
        raise BadRecord("bad_body", f"result is {str(body.get('result'))[:40]!r}", raw=raw)
    data: list[Any] = body["data"]
    return data


async def _read_at_most(content: aiohttp.StreamReader, limit: int) -> tuple[bytes, bool]:
    """A body as decompressed, up to `limit` bytes: (the bytes, whether that was all). It is
    read a chunk at a time, so a small gzip body that inflates to gigabytes stops here."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            chunks.append(chunk[: len(chunk) - (size - limit)])
            return b"".join(chunks), False
        chunks.append(chunk)
    return b"".join(chunks), True


def split_page(page: list[Any], start_ms: int, end_ms: int) -> tuple[list[Any], list[Any], int]:
    """One page of a range query as (timed, unmappable, outside).

    `timed`: the records with start_ms <= timestamp < end_ms, sorted by timestamp; records
    sharing a timestamp are all kept, in page order (two versions of one record are for the
    caller to tell apart, not for this client to pick one at random). `unmappable`: items
    with no Unix-millisecond `timestamp`, for the caller to reject as bad input. `outside`:
    how many records had a valid timestamp outside the range asked for; they belong to
    another range (where they are fetched), so they are counted, not returned.
    """
    timed: list[tuple[int, Any]] = []
    unmappable: list[Any] = []
    outside = 0
    for record in page:
        ts = _timestamp(record)
        if ts is None:
            unmappable.append(record)
        elif start_ms <= ts < end_ms:
            timed.append((ts, record))
        else:
            outside += 1
    timed.sort(key=lambda item: item[0])  # stable: page order within one timestamp
    return [record for _, record in timed], unmappable, outside


class VinterRest:
    """One HTTP session to the Vinter REST API. Use as an async context manager."""

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr | None,
        *,
        timeout_s: float = 30.0,
        attempts: int = 5,
        backoff: Backoff | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._max_body = max_body_bytes
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._attempts = attempts
        self._backoff_template = backoff or Backoff()
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0

    async def __aenter__(self) -> VinterRest:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Accept": "application/json"}
            if self._api_key is not None:
                headers["Authorization"] = self._api_key.get_secret_value()
            self._session = aiohttp.ClientSession(headers=headers, timeout=self._timeout)
        return self._session

    async def fetch(
        self,
        frequency: str,
        symbol: str,
        *,
        start_ms: int | None = None,
        end_ms: int | None = None,
        limit: int | None = None,
    ) -> list[Any]:
        """One GET (with retries for transient failures); the `data` list as received."""
        params = {"symbol": symbol}
        if start_ms is not None:
            params["start_time"] = format_time(start_ms)
        if end_ms is not None:
            params["end_time"] = format_time(end_ms)
        if limit is not None:
            params["limit"] = str(limit)
        url = self._base_url + PATHS[frequency]
        backoff = Backoff(
            self._backoff_template.initial,
            self._backoff_template.multiplier,
            self._backoff_template.jitter,
            self._backoff_template.cap,
        )
        for attempt in range(1, self._attempts + 1):
            try:
                return await self._get(url, params, symbol)
            except UpstreamError as exc:
                if not exc.retriable or attempt == self._attempts:
                    raise
                delay = exc.retry_after if exc.retry_after is not None else backoff.next_delay()
                log.warning("%s %s: %s; retry %d in %.1fs", SOURCE, symbol, exc, attempt, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _get(self, url: str, params: dict[str, str], symbol: str) -> list[Any]:
        self.requests += 1
        try:
            async with self._client().get(url, params=params) as response:
                status = response.status
                headers = response.headers
                raw, whole = await _read_at_most(response.content, self._max_body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # aiohttp's messages can quote the URL; ours has no secret, but keep it short.
            raise UpstreamError(SOURCE, f"{symbol}: {type(exc).__name__}") from None
        if status in (401, 403):
            raise AuthError(SOURCE, f"{symbol}: HTTP {status}", setting="vinter.api_key")
        if status == 429 or status >= 500:
            raise UpstreamError(
                SOURCE, f"{symbol}: HTTP {status}", retry_after=_retry_after(headers)
            )
        if status != 200:
            where = f" for {url} (check vinter.rest_url)" if status == 404 else ""
            error = UpstreamError(SOURCE, f"{symbol}: HTTP {status}{where}: {self._quote(raw)}")
            error.retriable = False  # 400/404: asking again cannot help
            raise error
        if not whole:
            raise BadRecord(
                "too_large",
                f"{symbol}: a REST body over vinter.max_body_bytes ({self._max_body}) once "
                "decompressed",
                raw=raw,
            )
        return parse_body(raw)

    def _quote(self, raw: bytes) -> str:
        """The start of an upstream error body, fit to quote: secrets blanked, cut short."""
        text = raw.decode("utf-8", "replace")
        if self._api_key is not None and (key := self._api_key.get_secret_value()):
            text = text.replace(key, "***")
        text = _TOKEN.sub(r"\1***", text)
        return repr(text[:QUOTED_CHARS] + ("..." if len(text) > QUOTED_CHARS else ""))

    async def latest(self, frequency: str, symbol: str) -> Any | None:
        """The newest record (a call without `limit`), or None if there is none.

        Only records with a Unix-millisecond `timestamp` count: the answer bounds a
        back-fill, and a timestamp in microseconds would make that range absurdly long.
        """
        data = await self.fetch(frequency, symbol)
        timed = [r for r in data if _timestamp(r) is not None]
        return max(timed, key=lambda record: record["timestamp"]) if timed else None

    async def records(
        self, frequency: str, symbol: str, *, start_ms: int, end_ms: int
    ) -> list[Any]:
        """Every record with start_ms <= timestamp < end_ms, sorted by timestamp.

        Full pages are split in two by time until each answer is under the cap. Items with
        no Unix-millisecond `timestamp` are returned at the end, unsorted, for the caller to
        reject (see `split_page`).
        """
        found: list[Any] = []
        untimed: list[Any] = []
        outside = 0
        ranges = [(start_ms, end_ms)]
        while ranges:
            lo, hi = ranges.pop()
            if lo >= hi:
                continue
            page = await self.fetch(frequency, symbol, start_ms=lo, end_ms=hi, limit=PAGE_CAP)
            if len(page) >= PAGE_CAP and hi - lo > 1:
                mid = (lo + hi) // 2
                ranges.extend([(mid, hi), (lo, mid)])
                continue
            timed, unmappable, skipped = split_page(page, lo, hi)
            found.extend(timed)
            untimed.extend(unmappable)
            outside += skipped
        if outside:
            log.warning(
                "%s %s: %d records outside the range asked, ignored", SOURCE, symbol, outside
            )
        # Pages come in any order; each is sorted, and a stable sort keeps that within one ms.
        found.sort(key=lambda record: record["timestamp"])
        return found + untimed
