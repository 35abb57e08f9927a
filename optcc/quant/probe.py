"""The float values a model computes inside its graph, for analyses that need a layer's
inputs on samples (GPTQ's Hessians, a layer's quantization error)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from optcc.runtime.session import CPU, feedable, make_session, session_options

__all__ = ["probed_values"]


def probed_values(model: Any, names: Sequence[str], samples: Iterable[Mapping[str, np.ndarray]]
                  ) -> Iterator[dict[str, np.ndarray]]:
    """The values ``names`` of the main graph of ``model`` (an onnx_ir.Model), by name, on
    each of ``samples`` in turn, run as written on onnxruntime one sample at a time. The
    probe (the model with those values as extra outputs) is a ``make_session`` session of
    ``model`` itself: a model with external data or large weights hands its weights over in
    place (no serialized copy of them, and no copy of onnxruntime's own); only one with
    external weights inside a subgraph is saved, to a temporary folder. ``model`` is left
    as it was."""
    graph = model.graph
    by_name = {v.name: v for v in (*graph.inputs, *(o for node in graph for o in node.outputs))}
    added = [by_name[n] for n in names if not by_name[n].is_graph_output()]
    with tempfile.TemporaryDirectory(prefix="optcc_probe_") as folder:
        graph.outputs.extend(added)
        try:
            session = make_session(model, CPU, scratch=folder, options=session_options())
        finally:
            for value in added:
                graph.outputs.remove(value)
        wanted = feedable(session)
        for sample in samples:
            feeds = {name: np.asarray(value) for name, value in sample.items() if name in wanted}
            yield dict(zip(names, session.run(list(names), feeds)))
        del session
