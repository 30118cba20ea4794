"""A bounded window of tasks: at most ``width`` in flight, a wait over the window only, one finished task at a time.

Used by the run's maintenance steps (retire, conform: one Ray task per file) so that a million stale files are
neither submitted at once nor polled all together every second. Plain callables, so the logic is tested without Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R", bound=Hashable)


def bounded(items: Iterable[T], submit: Callable[[T], R], wait: Callable[[list[R], float], list[R]], *, width: int,
            timeout_s: float = 1.0, idle: Callable[[list[T], float], None] | None = None) -> Iterator[tuple[T, R]]:
    """Submit ``items`` in order, at most ``width`` in flight, and yield ``(item, handle)`` as each finishes.

    ``submit(item)`` starts one and returns its handle; ``wait(handles, timeout_s)`` returns the finished ones among
    ``handles`` (at least one, or none when ``timeout_s`` passed). After a wait that found none, ``idle(items in
    flight, seconds since a task last finished)`` is called (the caller's periodic work and its log of what it waits
    for)."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    pending = iter(items)
    flight: dict[R, T] = {}
    exhausted = False
    last_finish = time.monotonic()
    while True:
        while not exhausted and len(flight) < width:
            item = next(pending, _END)
            if item is _END:
                exhausted = True
            else:
                flight[submit(item)] = item
        if not flight:
            return
        finished = wait(list(flight), timeout_s)
        if finished:
            last_finish = time.monotonic()
        elif idle is not None:
            idle(list(flight.values()), time.monotonic() - last_finish)
        for handle in finished:
            yield flight.pop(handle), handle


_END = object()
