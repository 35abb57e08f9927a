"""Independent runs side by side: how many at once, and their results in order.

``map_ordered(fn, items)`` returns ``[fn(item) for item in items]``, and
``each_ordered(fn, items, take)`` calls ``take(fn(item))`` for each item in order (until
``take`` returns True), computing up to ``worker_count()`` of the ``fn`` calls at once in
threads. They are for work whose time is spent outside Python's interpreter lock:
onnxruntime's ``InferenceSession.run`` releases it and may be called on one session from
several threads at once (each run with its own activations, the session's intra-op
threads as it was built), and numpy's arithmetic on large arrays releases it too. Each
result is computed by the same code on the same inputs as in the plain loop, and the
caller gets the results in the items' order, in its own thread, so whatever it folds them
into (sums added in sample order, lists, decisions to stop) is the same, bit for bit,
whatever the number of workers; only the time changes. ``fn`` must not depend on another
item's call (no state shared between items written, no order between calls).

The one policy: ``worker_count()`` is the number of CPUs this process may run on
(``os.sched_getaffinity``: ``taskset`` or a container's CPU set limits it), at most
``MAX_WORKERS``, and no more than the items. At most that many items are computed at once
(the next starts when the oldest is done, while the caller takes it), so the memory the
items hold beside what the caller keeps is that of at most that many runs and the result
being taken. A caller that knows what one item holds (one sample's fetched outputs, say)
asks ``worker_count(items, each_bytes)``: no more items side by side than hold
``SIDE_BY_SIDE_BYTES`` beside the first; one that must hold memory to one run passes
``workers=1``. With one worker the items run one by one in the caller's thread, exactly
the plain loop.

The first exception an item raises, in the items' order (the one the plain loop would
meet), is raised; so is one ``take`` raises, or KeyboardInterrupt. Whenever they return or
raise, no item is left running: the items not started are cancelled, and those in
progress (a run cannot be interrupted) are waited for and their results dropped. Each item
runs in a copy of the caller's context (``contextvars``): progress phases it opens nest as
in the caller.
"""

from __future__ import annotations

import collections
import contextvars
import os
from collections.abc import Callable, Iterable, Sized
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

__all__ = ["MAX_WORKERS", "SIDE_BY_SIDE_BYTES", "worker_count", "map_ordered", "each_ordered"]

T = TypeVar("T")
R = TypeVar("R")

MAX_WORKERS = 4  # beyond a few samples at once, the memory they hold grows faster than the time saved
# the most memory the items run beside the first may hold together, where the caller knows one item's
SIDE_BY_SIDE_BYTES = 512 << 20


def worker_count(items: int | None = None, each_bytes: int = 0) -> int:
    """How many items to compute at once: the CPUs this process may run on, at most
    ``MAX_WORKERS``, (``items`` given) at most ``items``, and (``each_bytes``: the memory
    one item holds while it runs, where known) no more than the first and as many others
    as hold ``SIDE_BY_SIDE_BYTES`` together; at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # a platform without CPU affinity
        cpus = os.cpu_count() or 1
    count = min(cpus, MAX_WORKERS)
    if items is not None:
        count = min(count, items)
    if each_bytes > 0:
        count = min(count, 1 + SIDE_BY_SIDE_BYTES // each_bytes)
    return max(count, 1)


def map_ordered(fn: Callable[[T], R], items: Iterable[T], *, workers: int | None = None) -> list[R]:
    """``[fn(item) for item in items]``, up to ``workers`` (default: ``worker_count()``)
    computed at once (see the module docstring)."""
    results: list[R] = []
    each_ordered(fn, items, lambda result: bool(results.append(result)), workers=workers)
    return results


def each_ordered(fn: Callable[[T], R], items: Iterable[T], take: Callable[[R], bool], *,
                 workers: int | None = None) -> None:
    """``take(fn(item))`` for each item in order, in the caller's thread, until ``take``
    returns True; up to ``workers`` (default: ``worker_count()``) of the ``fn`` calls at
    once (see the module docstring). No result is kept here: a caller that folds each into
    a sum holds one at a time (and those in flight). ``items`` is read as the items start,
    in the caller's thread: a stream of samples is never all in memory at once."""
    sized = len(items) if isinstance(items, Sized) else None
    count = worker_count(sized) if workers is None else max(1, workers if sized is None else min(workers, sized))
    if count <= 1:
        for item in items:
            if take(fn(item)):
                return
        return
    executor = ThreadPoolExecutor(max_workers=count, thread_name_prefix="optcc-run")
    flight: collections.deque[Future[R]] = collections.deque()
    queue = iter(items)

    def start() -> None:
        for item in queue:
            flight.append(executor.submit(contextvars.copy_context().run, fn, item))
            return

    try:
        for _ in range(count):
            start()
        while flight:
            result = flight.popleft().result()  # the item's exception, in the items' order
            start()  # the next item runs while the caller takes this result
            if take(result):
                return
            del result
    finally:
        # on every way out nothing new starts, and the runs in progress finish first
        for future in flight:
            future.cancel()
        executor.shutdown(wait=True, cancel_futures=True)
