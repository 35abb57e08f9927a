"""The float values a model computes inside its graph, for analyses that need a layer's
inputs on samples (GPTQ's Hessians, a layer's quantization error)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from optcc.runtime.session import feedable, session_options

__all__ = ["probed_values"]


def probed_values(model: Any, names: Sequence[str], samples: Iterable[Mapping[str, np.ndarray]]
                  ) -> Iterator[dict[str, np.ndarray]]:
    """The values ``names`` of the main graph of ``model`` (an onnx_ir.Model), by name, on
    each of ``samples`` in turn, run as written on onnxruntime one sample at a time. The
    probe (the model with those values as extra outputs) is written to a temporary folder,
    with external data when the model needs it, so no serialized copy is held in memory;
    ``model`` is left as it was."""
    import onnxruntime as ort

    from optcc import ir as oir

    graph = model.graph
    by_name = {v.name: v for v in (*graph.inputs, *(o for node in graph for o in node.outputs))}
    added = [by_name[n] for n in names if not by_name[n].is_graph_output()]
    options = session_options()
    with tempfile.TemporaryDirectory(prefix="optcc_probe_") as folder:
        path = os.path.join(folder, "probe.onnx")
        graph.outputs.extend(added)
        try:
            oir.save(model, path, external_data=oir.needs_external_data(model))
        finally:
            for value in added:
                graph.outputs.remove(value)
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        wanted = feedable(session)
        for sample in samples:
            feeds = {name: np.asarray(value) for name, value in sample.items() if name in wanted}
            yield dict(zip(names, session.run(list(names), feeds)))
        del session
