"""The one timing loop: median wall time of an onnxruntime session over repeated runs.

Used by the INT8 speed check and by the benchmarks, so every latency optcc reports is
measured the same way.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["median_seconds"]


def median_seconds(session: Any, feeds: Mapping[str, Any], *, runs: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``session.run`` on ``feeds`` over ``runs`` runs, after ``warmup``."""
    feeds = dict(feeds)
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
