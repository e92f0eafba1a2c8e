"""The bridge's processes start with their start-up heap frozen, its garbage collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from bridge.loop import run_loop


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    enabled = gc.isenabled()
    gc.disable()  # no automatic collection decides these tests for them
    try:
        yield
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


async def _freeze_count() -> int:
    return gc.get_freeze_count()


@pytest.mark.usefixtures("unfrozen")
def test_the_start_up_heap_is_frozen_before_the_loop_runs() -> None:
    assert gc.get_freeze_count() == 0
    assert run_loop(_freeze_count()) > 0


@pytest.mark.usefixtures("unfrozen")
def test_start_up_garbage_is_collected_not_frozen_for_good() -> None:
    garbage = _Node()
    gone = weakref.ref(garbage)
    del garbage
    run_loop(_freeze_count())
    assert gone() is None
