"""The bounded window of maintenance tasks (pipeline.window), without Ray: never more than `width` in flight, waits
only over the window, every item finishes once, and a wait that finds nothing reports what is in flight."""

from __future__ import annotations

import random

import pytest

from pipeline.window import bounded


def test_window_keeps_at_most_width_in_flight_and_finishes_every_item():
    rng = random.Random(0)
    flight: set[int] = set()
    peak, waited_over, finished, idle_calls = 0, 0, [], []

    def submit(item: int) -> int:
        nonlocal peak
        flight.add(item)
        peak = max(peak, len(flight))
        return item  # the handle

    def wait(handles: list[int], timeout_s: float) -> list[int]:
        nonlocal waited_over
        waited_over = max(waited_over, len(handles))
        assert set(handles) == flight
        if rng.random() < 0.2:
            return []  # nothing finished before the timeout
        done = rng.sample(handles, rng.randint(1, len(handles)))
        flight.difference_update(done)
        return done

    for item, handle in bounded(range(1000), submit, wait, width=7,
                                idle=lambda items, s: idle_calls.append(sorted(items))):
        assert item == handle
        finished.append(item)
    assert peak == 7 and waited_over == 7
    assert sorted(finished) == list(range(1000))
    assert idle_calls and all(1 <= len(items) <= 7 for items in idle_calls)
    with pytest.raises(ValueError):
        next(bounded([1], submit, wait, width=0))
