"""Pausing Python's cyclic garbage collector while a step only builds objects.

Parsing or cloning a model allocates tens of thousands of objects that all stay alive.
Those allocations trigger collections that scan them (and, once enough have survived, a
full collection that scans every object in the process) and find nothing to free. Such
steps run with the collector paused; on exit it is left as it was found. The pass
manager also pauses it over a pipeline of float rewrites, whose few removed-node cycles
wait for the first collection after the steps; other pipelines (INT8, float16, passes
verified one by one) run with it, so their cyclic garbage is collected where it arises.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import onnx_ir as ir

__all__ = ["clone", "collector_paused"]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Run the body with automatic garbage collection off; re-enable it after, if it was on."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def clone(model: ir.Model) -> ir.Model:
    """``model.clone()`` (a copy of the graph sharing the immutable tensors) with the
    collector paused."""
    with collector_paused():
        return model.clone()
