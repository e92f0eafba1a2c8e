from __future__ import annotations

from bridge.backoff import Backoff


def test_grows_by_1_6_with_jitter_and_caps() -> None:
    backoff = Backoff()
    delays = [backoff.next_delay() for _ in range(20)]
    nominal = [min(1.6**i, 120.0) for i in range(20)]
    for delay, expected in zip(delays, nominal, strict=True):
        assert expected * 0.8 <= delay <= expected * 1.2
    assert max(delays) <= 144.0


def test_reset_starts_over() -> None:
    backoff = Backoff(jitter=0)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == 1.0
