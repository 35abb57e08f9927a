"""``optcc.runtime.parallel``: results in the items' order whatever finishes first, the
first exception in that order, nothing left running when it returns or raises, a stream of
items read only as far as the items in flight, and the one policy of how many."""

from __future__ import annotations

import contextvars
import os
import threading
import time

import pytest

from optcc.runtime import parallel
from optcc.runtime.parallel import SIDE_BY_SIDE_BYTES, each_ordered, map_ordered, worker_count


class Running:
    """Counts the calls in progress, and the most at once."""

    def __init__(self) -> None:
        self.now = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, fn):
        def counted(item):
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
            try:
                return fn(item)
            finally:
                with self.lock:
                    self.now -= 1
        return counted


def slow_first(item: int) -> int:
    """The earlier the item, the later it finishes."""
    time.sleep(0.02 * (5 - item % 5))
    return item * item


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_results_come_in_the_items_order(workers: int) -> None:
    running = Running()
    assert map_ordered(running(slow_first), range(10), workers=workers) == [i * i for i in range(10)]
    assert running.most == workers and running.now == 0


def test_the_first_exception_in_the_items_order_is_raised_and_nothing_runs_after() -> None:
    running = Running()

    def failing(item: int) -> int:
        if item == 3:  # fails at once, while item 1 is still running
            raise KeyError(item)
        if item == 1:
            time.sleep(0.05)
            raise ValueError(item)
        return item

    with pytest.raises(ValueError, match="1"):
        map_ordered(running(failing), range(6), workers=3)
    assert running.now == 0


def test_a_keyboard_interrupt_stops_the_work_and_leaves_nothing_running() -> None:
    running, started = Running(), []

    def interrupted(item: int) -> int:
        started.append(item)
        if item == 2:
            raise KeyboardInterrupt
        time.sleep(0.01)
        return item

    with pytest.raises(KeyboardInterrupt):
        map_ordered(running(interrupted), range(100), workers=2)
    assert running.now == 0 and len(started) < 100


def test_take_stops_after_the_result_it_says_and_drops_the_others() -> None:
    running, taken = Running(), []

    def take(result: int) -> bool:
        taken.append(result)
        return result == 4

    each_ordered(running(slow_first), range(10), take, workers=3)
    assert taken == [0, 1, 4] and running.now == 0


def test_a_stream_of_items_is_read_no_further_than_the_items_in_flight() -> None:
    read = []

    def stream():
        for i in range(10):
            read.append(i)
            yield i

    each_ordered(lambda i: i, stream(), lambda result: result == 2, workers=2)
    # the item taken and two in flight: the next starts as the oldest is taken
    assert read == [0, 1, 2, 3, 4]


def test_each_item_runs_in_a_copy_of_the_callers_context() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("caller")
    assert map_ordered(lambda i: var.get(), range(4), workers=2) == ["caller"] * 4


def test_the_workers_are_the_cpus_allowed_at_most_four_and_at_most_the_items(monkeypatch) -> None:
    for cpus, items, each_bytes, want in ((1, None, 0, 1), (2, None, 0, 2), (16, None, 0, 4), (16, 3, 0, 3),
                                          (16, 0, 0, 1), (16, None, SIDE_BY_SIDE_BYTES // 2, 3),
                                          (16, None, SIDE_BY_SIDE_BYTES, 2), (2, None, 2 * SIDE_BY_SIDE_BYTES, 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert worker_count(items, each_bytes) == want, (cpus, items, each_bytes)
    assert parallel.MAX_WORKERS == 4
