"""Pausing Python's cyclic garbage collector while a step only builds objects.

Parsing or cloning a model allocates tens of thousands of objects that all stay alive.
Those allocations trigger collections that scan them (and, once enough have survived, a
full collection that scans every object in the process) and find nothing to free. Such
steps run with the collector paused; on exit it is left as it was found. The pass
manager also pauses it over a pipeline of float rewrites, whose few removed-node cycles
wait for the first collection after the steps; other pipelines (INT8, float16, passes
verified one by one) run with it, so their cyclic garbage is collected where it arises.

A model is itself a reference cycle (nodes and values point at each other): a dropped one
is freed, weights and all, only by a full collection. ``collect_for`` runs one around the
work on a large model, so a loop over large models holds one model's garbage at most.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import onnx_ir as ir

__all__ = ["LARGE_MODEL_BYTES", "clone", "collect_for", "collector_paused"]

LARGE_MODEL_BYTES = 32 * 2**20  # a full collection (tens of ms) is small beside the work on such a model


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


def collect_for(weight_bytes: int) -> None:
    """A full collection when a model of ``weight_bytes`` is large (``LARGE_MODEL_BYTES``):
    the dropped models of earlier calls go before this one's work, and this call's own
    copies before it returns."""
    if weight_bytes >= LARGE_MODEL_BYTES:
        gc.collect()


def clone(model: ir.Model) -> ir.Model:
    """``model.clone()`` (a copy of the graph sharing the immutable tensors) with the
    collector paused."""
    with collector_paused():
        return model.clone()
