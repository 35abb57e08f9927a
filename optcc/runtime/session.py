"""The one onnxruntime session factory, and probes that expose a model's intermediates.

Every session optcc builds comes from here: onnxruntime's own graph optimizations off
unless asked for (so its fusions can neither hide nor cause a difference), its log lines
kept off stderr, and models with external data loaded from a file rather than bytes.

An onnx-ir model with external data (or too large for one protobuf) is never copied for
its session: its graph is serialized (small external tensors, such as axes, inlined) with
its large initializers as placeholders, and the session receives each of them as a
view of the one read-only memory map of its file that every live session shares
(``optcc.ir.external_files``), or as the in-memory array itself
(``optcc.runtime.shared_weights``). onnxruntime reads the weights where they are:
pre-packing is off (it copies every MatMul/Gemm weight), and a map closes with the
last session reading it, so no page of them stays resident afterwards. Such a session runs nodes in
onnxruntime's priority-based order, which makes the float32 copy of a float16 weight
(onnxruntime's CPU kernels read float16 through float32) where it is read instead of all
of them first. A model file with external data (or past protobuf's limit) also loads
without pre-packing, so that a model and its rewrite run the same kernels. A large
in-memory model is not serialized with its weights either: they are handed over as
arrays with pre-packing on (as external initializers where graph optimizations run), the
kernels and results of a session of its bytes. Handed-over weights are for the CPU alone: on any other
provider such a model is saved into the scratch folder, its weights in an external file,
and loaded from that path (a CUDA session given them in memory computes other results).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from optcc import ir as oir
from optcc.errors import BadInputError
from optcc.runtime.providers import provider_entry
from optcc.runtime.shared_weights import light_proto, weighted_session

__all__ = ["session_options", "make_session", "run", "detached", "first_line", "with_outputs", "resolve_providers",
           "REFUSALS", "RefusedModel", "building_session"]

ModelRef = Union[ir.Model, onnx.ModelProto, bytes, str, os.PathLike]
SHARED_MIN_BYTES = 1 << 20  # initializers at least this large are handed over, not serialized
HANDOVER_MIN_BYTES = 64 << 20  # an in-memory model with this many weight bytes hands them over
_SMALL_MODEL_FILE = 64 << 20  # a model file this small is parsed to see whether it has external data
_FATAL_ONLY = 4  # onnxruntime log severity: a failing kernel is logged at 3 before it raises, and optcc reports it once
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
CPU = PROVIDER_ALIASES["cpu"]
# how onnxruntime refuses to build a session: no kernel for an op and its types, a graph it
# cannot check (the same types also report failures to run one)
REFUSALS = (ort_state.Fail, ort_state.InvalidGraph, ort_state.NotImplemented, ort_state.InvalidArgument)


class RefusedModel(Exception):
    """onnxruntime refused to build a session of a model (one of ``REFUSALS``, raised while
    building it); the message is its first line. Never raised for a session that fails to run."""


@contextlib.contextmanager
def building_session() -> Iterator[None]:
    """Build a session in the body: a refusal (``REFUSALS``) is raised as ``RefusedModel``,
    so that a caller tells a model onnxruntime refuses from one that then fails to run."""
    try:
        yield
    except REFUSALS as e:
        raise RefusedModel(first_line(e)) from e


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
    prepack: bool = True,
    spin: bool = False,
) -> ort.SessionOptions:
    """Options for a session that runs the graph as written and logs only fatal errors.

    ``optimize``: onnxruntime's graph optimizations (True or "basic", "extended", "all");
    ``arena``: its memory arena (off: freed activations go back to the system);
    ``threads``: intra-op threads (one inter-op thread then); ``priority_order``: the
    priority-based execution order (reductions placed after their producers run early);
    ``optimized_path``: where onnxruntime writes the graph it executes; ``prepack``: off,
    constant weights are read as they are, by the kernels a computed weight gets (a
    constant folded ahead of time then runs the same kernel as the subgraph it replaced);
    ``spin``: the intra-op threads busy-wait for work between kernels (onnxruntime's
    default, as a timed session runs); off, they sleep until work comes: a spinning thread
    holds a core that the caller's own work between runs, or another process, could use,
    and on a busy machine it doubles the CPU time of a run. How a thread waits never
    changes what a kernel computes: the results are the same either way."""
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
    if not prepack:
        _no_prepacking(options)
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def make_session(
    model: ModelRef,
    provider: str = "CPUExecutionProvider",
    *,
    scratch: str | os.PathLike | None = None,
    options: ort.SessionOptions | None = None,
) -> ort.InferenceSession:
    """A session for ``model``: a path loads from the file (its external data beside it;
    when onnxruntime cannot load it so, for a constant it needs kept in an external file,
    it is loaded as an onnx-ir model); an onnx-ir model that needs external data gets its
    large weights handed over in place (see the module docstring); one with external
    weights inside a subgraph is saved into ``scratch``. An in-memory onnx-ir model with
    ``HANDOVER_MIN_BYTES`` of weights or more gets its large main-graph weights handed
    over as arrays (``shared_weights.weighted_session``, with or without graph
    optimizations: the same kernels and results as from its serialization). ``options``
    is used for this one session (the handed-over weights are added to it)."""
    options = options or session_options()
    if isinstance(model, (str, os.PathLike)):
        external = _file_has_external_data(model)
        if external:
            _no_prepacking(options)
        try:
            return ort.InferenceSession(str(model), options, providers=[provider_entry(provider)])
        except Exception:
            if not external or scratch is None:
                raise
            # onnxruntime cannot read a constant it needs to load the graph (Unsqueeze axes,
            # Reshape shapes) from an external file; small external tensors are inlined here
            if provider != CPU:
                return _saved_session(oir.load(model), provider, options, scratch)
            return _shared_weights_session(oir.load(model), provider, options)
    if isinstance(model, bytes):
        return ort.InferenceSession(model, options, providers=[provider_entry(provider)])
    if isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(model.SerializeToString(), options, providers=[provider_entry(provider)])
    if provider != CPU and (oir.needs_external_data(model) or oir.uses_external_data(model)
                            or oir.weight_bytes(model) >= HANDOVER_MIN_BYTES):
        return _saved_session(model, provider, options, scratch)
    if oir.needs_external_data(model) or oir.uses_external_data(model):
        if scratch is None:
            raise ValueError("a model with external data needs a scratch folder for its session")
        if _external_in_bodies(model):
            return _saved_session(model, provider, options, scratch)
        return _shared_weights_session(model, provider, options)
    if oir.weight_bytes(model) >= HANDOVER_MIN_BYTES:
        # no serialized copy of the weights (a protobuf and its bytes: twice their size, and
        # onnxruntime's own copy of them): the graph alone, the arrays handed over,
        # pre-packed and optimized as from a full proto
        proto, weights = light_proto(model, min_bytes=SHARED_MIN_BYTES)
        return weighted_session(proto, weights, options, provider)
    return ort.InferenceSession(oir.serialize(model).SerializeToString(), options, providers=[provider_entry(provider)])


def _saved_session(model: ir.Model, provider: str, options: ort.SessionOptions,
                   scratch: str | os.PathLike | None) -> ort.InferenceSession:
    """A session of ``model`` saved with its weights in an external file and loaded from
    that path, onnxruntime's own way of reading them. Weights handed over in memory are
    for the CPU alone: a CUDA session given them computes other results."""
    if scratch is None:
        with tempfile.TemporaryDirectory(prefix="optcc-session-") as folder:
            return _saved_session(model, provider, options, folder)
    path = Path(scratch) / f"model_{uuid.uuid4().hex}.onnx"
    oir.save(model, path, external_data=True)
    return ort.InferenceSession(str(path), options, providers=[provider_entry(provider)])


def _no_prepacking(options: ort.SessionOptions) -> None:
    # pre-packing copies every constant MatMul/Gemm weight into onnxruntime's own memory
    try:
        if options.get_session_config_entry("session.disable_prepacking") == "1":
            return  # set again, onnxruntime would log a warning
    except RuntimeError:  # not set
        pass
    options.add_session_config_entry("session.disable_prepacking", "1")


def _file_has_external_data(path: str | os.PathLike) -> bool:
    """Whether a model file keeps main-graph initializers in external files, or is itself
    so large that its rewrite would (those rewrites' sessions run without pre-packing)."""
    try:
        size = os.path.getsize(path)
        if size > oir.EXTERNAL_DATA_THRESHOLD_BYTES:
            return True
        if size > _SMALL_MODEL_FILE:
            return False
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - onnxruntime reports an unreadable model itself
        return False
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def _external_in_bodies(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for g in oir.graphs(model)
               if g is not model.graph and isinstance(g, ir.Graph) for v in g.initializers.values())


def _mapped(tensor: ir.TensorProtocol) -> np.ndarray:
    """The tensor's values without a copy: an external tensor's file region as a view of
    its file's one read-only map (``optcc.ir.external_files``: unmapped when its last
    view goes), an in-memory one as is."""
    if isinstance(tensor, ir.ExternalTensor) and tensor.size > 0:
        return oir.mapped(tensor)
    array = np.asarray(tensor.numpy())
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))


def _shared_weights_session(
    model: ir.Model, provider: str, options: ort.SessionOptions
) -> ort.InferenceSession:
    proto, weights = light_proto(model, min_bytes=SHARED_MIN_BYTES, array=_mapped)  # small external ones inlined
    _no_prepacking(options)
    # the default order runs every Cast of a weight (onnxruntime's own, in front of a
    # float16 weight a CPU kernel reads in float32) first, all their float32 copies alive
    # at once; the priority-based order runs each where it is read (the same results)
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return weighted_session(proto, weights, options, provider)


def run(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None) -> list[np.ndarray]:
    """``session``'s outputs for ``feeds`` as numpy arrays that hold no session memory
    (``detached``)."""
    return detached(session.run(None if outputs is None else list(outputs), dict(feeds)))


def feedable(session: ort.InferenceSession) -> frozenset[str]:
    """The names a caller may feed ``session``: its graph inputs, those with an initializer's
    default too (onnxruntime lists them apart from ``get_inputs``, and a feed replaces the
    default)."""
    return frozenset(i.name for i in (*session.get_inputs(), *session.get_overridable_initializers()))


def float16_feedable(session: ort.InferenceSession) -> frozenset[str]:
    """The names among ``feedable`` of float16 type (a float16 conversion that did not keep
    the input types made them so, a default a caller may replace included)."""
    return frozenset(i.name for i in (*session.get_inputs(), *session.get_overridable_initializers())
                     if i.type == "tensor(float16)")


def detached(values: Sequence[object]) -> list[np.ndarray]:
    """onnxruntime's outputs as arrays that own their memory. onnxruntime hands out its
    output buffers without a copy, and each keeps its session's whole memory arena alive
    (every activation buffer it ever grew, long after the session is gone) for as long as
    the array lives: an output kept needs a copy of its own."""
    arrays = [np.asarray(v) for v in values]
    return [a.copy() if a.base is not None else a for a in arrays]


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
