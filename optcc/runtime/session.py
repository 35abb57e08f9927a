"""The one onnxruntime session factory, and probes that expose a model's intermediates.

Every session optcc builds comes from here: onnxruntime's own graph optimizations off
unless asked for (so its fusions can neither hide nor cause a difference), its log lines
kept off stderr, and models with external data loaded from a file rather than bytes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from optcc import ir as oir
from optcc.errors import BadInputError

__all__ = ["session_options", "make_session", "run", "first_line", "with_outputs", "resolve_providers"]

ModelRef = Union[ir.Model, onnx.ModelProto, bytes, str, os.PathLike]
_FATAL_ONLY = 4  # onnxruntime log severity: a failing kernel is logged at 3 before it raises, and optcc reports it once
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def resolve_providers(names: Sequence[str] | None) -> list[str]:
    """onnxruntime provider names for 'cpu'/'cuda' (or full names). None: CPU, plus CUDA
    when onnxruntime-gpu and a GPU are present."""
    available = ort.get_available_providers()
    if names is None:
        chosen = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in available:
            chosen.append("CUDAExecutionProvider")
        return chosen
    chosen = []
    for name in names:
        full = PROVIDER_ALIASES.get(name.strip().lower(), name.strip())
        if full not in available:
            raise BadInputError(
                f"execution provider '{name}' is not available in this onnxruntime "
                f"(available: {', '.join(available)})"
            )
        chosen.append(full)
    return chosen


_LEVELS = {
    False: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    True: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(
    *,
    optimize: bool | str = False,
    arena: bool = True,
    threads: int | None = None,
    priority_order: bool = False,
    optimized_path: str | os.PathLike | None = None,
) -> ort.SessionOptions:
    """Options for a session that runs the graph as written and logs only fatal errors.

    ``optimize``: onnxruntime's graph optimizations (True or "basic", "extended", "all");
    ``arena``: its memory arena (off: freed activations go back to the system);
    ``threads``: intra-op threads (one inter-op thread then); ``priority_order``: the
    priority-based execution order (reductions placed after their producers run early);
    ``optimized_path``: where onnxruntime writes the graph it executes."""
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[optimize]
    options.log_severity_level = _FATAL_ONLY
    options.enable_cpu_mem_arena = arena
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if priority_order:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return options


def make_session(
    model: ModelRef,
    provider: str = "CPUExecutionProvider",
    *,
    scratch: str | os.PathLike | None = None,
    options: ort.SessionOptions | None = None,
) -> ort.InferenceSession:
    """A session for ``model``: a path loads from the file (its external data beside it);
    an onnx-ir model that needs external data is saved into ``scratch`` first."""
    source: Any
    if isinstance(model, (str, os.PathLike)):
        source = str(model)
    elif isinstance(model, bytes):
        source = model
    elif isinstance(model, onnx.ModelProto):
        source = model.SerializeToString()
    elif oir.needs_external_data(model) or oir.uses_external_data(model):
        if scratch is None:
            raise ValueError("a model with external data needs a scratch folder for its session")
        path = Path(scratch) / f"model_{id(model)}.onnx"
        oir.save(model, path, external_data=True)
        source = str(path)
    else:
        source = oir.serialize(model).SerializeToString()
    return ort.InferenceSession(source, options or session_options(), providers=[provider])


def run(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None) -> list[np.ndarray]:
    """``session``'s outputs for ``feeds`` as numpy arrays."""
    return [np.asarray(x) for x in session.run(None if outputs is None else list(outputs), dict(feeds))]


def with_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``proto`` whose graph also outputs the values ``names`` (a probe)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in present)
    return probe


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (onnxruntime's are long)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]
