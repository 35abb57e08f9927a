"""Independent references for judging the numbers an optimized model computes.

Nothing here imports optcc: the verifier is code under test, so tests judge its results
with these instead.

- ``expected_outputs``: the model evaluated by onnx's reference evaluator (numpy).
- ``expected_outputs_float64``: the same on a copy of the model cast to float64 (float
  initializers, Constant/ConstantOfShape values, graph input/output/value_info types and
  Cast targets; subgraphs too), fed the same values in float64. More precise than any
  float32 run, so it can tell a correct fold (more accurate than the original) from a
  wrong one (off by as much as the original's own rounding).
- ``onnxruntime_outputs``: onnxruntime CPU with every graph optimization off. The reference
  for models onnx's evaluator computes differently from onnxruntime (legacy ops:
  Softmax before opset 13, BatchNormalization-9 with its training attributes, old
  Dropout); a test that uses it as the reference for the ORIGINAL says so.
- ``random_feeds``: standard-normal float inputs, coin-flip bools, symbolic dims sized 3.
- ``assert_converged``: no fixpoint or pattern driver stopped at its cap (read from an
  optcc report and the warnings caught around the run, without importing optcc).
- ``assert_close``: every element within ``atol + rtol * scale`` of the reference, where
  ``scale`` is the largest magnitude of that reference output.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Union

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

__all__ = [
    "EXACT_RTOL",
    "FUSION_RTOL",
    "assert_close",
    "assert_converged",
    "expected_outputs",
    "expected_outputs_float64",
    "onnxruntime_outputs",
    "random_feeds",
    "to_float64",
]

ModelLike = Union[onnx.ModelProto, ir.Model]
Feeds = Mapping[str, np.ndarray]

# Relative to the largest magnitude of each reference output.
EXACT_RTOL = 1e-5  # rewrites that compute the same arithmetic
FUSION_RTOL = 1e-4  # rewrites that reassociate it (folded weights, fused kernels)


def _proto(model: ModelLike) -> onnx.ModelProto:
    return ir.to_proto(model) if isinstance(model, ir.Model) else model


def random_feeds(model: ModelLike, shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0,
                 symbolic: int = 3) -> dict[str, np.ndarray]:
    """Feeds for the graph inputs of ``model`` (initializers excluded): ``shapes`` by name,
    else the declared shape with every symbolic dim ``symbolic``; standard normal for
    float inputs, small integers for integer ones, coin flips for bool ones."""
    proto = _proto(model)
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in proto.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for v in proto.graph.input:
        if v.name in initializers:
            continue
        tensor = v.type.tensor_type
        shape = list((shapes or {}).get(v.name) or
                     [d.dim_value if d.HasField("dim_value") else symbolic for d in tensor.shape.dim])
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        if dtype == np.bool_:
            feeds[v.name] = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            feeds[v.name] = rng.integers(0, 4, shape).astype(dtype)
        else:
            feeds[v.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def onnxruntime_outputs(model: ModelLike, feeds: Feeds) -> list[np.ndarray]:
    """The model's outputs on onnxruntime CPU with every graph optimization disabled."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(_proto(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))


def expected_outputs(model: ModelLike, feeds: Feeds) -> list[np.ndarray]:
    """The model's outputs by onnx's reference evaluator, in the model's own types."""
    return [np.asarray(o) for o in ReferenceEvaluator(_proto(model)).run(None, dict(feeds))]


def _graphs_of(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        yield from ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs))


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph in it, recursively."""
    yield graph
    for node in graph.node:
        for sub in _graphs_of(node):
            yield from _graphs(sub)


def _double(tensor: onnx.TensorProto) -> None:
    if tensor.data_type == TensorProto.FLOAT:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))


def _double_nodes(nodes: Sequence[onnx.NodeProto]) -> None:
    for node in nodes:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.DOUBLE
            elif attr.type == onnx.AttributeProto.TENSOR:
                _double(attr.t)


def to_float64(model: ModelLike) -> onnx.ModelProto:
    """A copy of ``model`` computing in float64 wherever it computed in float32."""
    model = copy.deepcopy(_proto(model))
    bodies = [model.graph, *(g for f in model.functions for n in f.node for g in _graphs_of(n))]
    for graph in (sub for body in bodies for sub in _graphs(body)):
        for tensor in graph.initializer:
            _double(tensor)
        for info in [*graph.input, *graph.output, *graph.value_info]:
            if info.type.tensor_type.elem_type == TensorProto.FLOAT:
                info.type.tensor_type.elem_type = TensorProto.DOUBLE
        _double_nodes(graph.node)
    for function in model.functions:
        _double_nodes(function.node)
    return model


def expected_outputs_float64(model: ModelLike, feeds: Feeds) -> list[np.ndarray]:
    """The model's outputs evaluated in float64 by onnx's reference evaluator (float
    outputs come back as float64)."""
    wide = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feeds.items()}
    return expected_outputs(to_float64(model), wide)


def lossy_metrics(original: ModelLike, converted: ModelLike, samples: Sequence[Feeds]) -> list[tuple[float, float]]:
    """(SQNR in dB, cosine) per output of ``converted`` against ``original``, both run on
    onnxruntime, over all ``samples`` together (feeds cast to the converted inputs' types)."""
    converted = _proto(converted)
    types = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
             for v in converted.graph.input}
    refs = [onnxruntime_outputs(original, feeds) for feeds in samples]
    gots = [onnxruntime_outputs(converted, {k: v.astype(types[k]) for k, v in feeds.items()}) for feeds in samples]
    metrics = []
    for i in range(len(refs[0])):
        ref = np.concatenate([r[i].astype(np.float64).ravel() for r in refs])
        got = np.concatenate([g[i].astype(np.float64).ravel() for g in gots])
        signal, noise = float(np.sum(ref ** 2)), float(np.sum((got - ref) ** 2))
        sqnr = math.inf if noise == 0 else -math.inf if signal == 0 else 10 * math.log10(signal / noise)
        norms = float(np.linalg.norm(ref) * np.linalg.norm(got))
        metrics.append((sqnr, float(ref @ got) / norms if norms > 0 else float(noise == 0)))
    return metrics


def _describe(got: np.ndarray, want: np.ndarray, bad: np.ndarray, bound: float) -> str:
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    error = np.where(bad, np.where(np.isnan(diff), np.inf, diff), -1.0)  # NaN against a number: worst
    where = np.unravel_index(int(np.argmax(error)) if error.size else 0, want.shape)
    return (f"{int(bad.sum())} of {want.size} elements off by more than {bound:.3g}; worst at "
            f"{tuple(int(i) for i in where)}: got {got[where]!r}, want {want[where]!r}")


def assert_close(
    got: Sequence[np.ndarray],
    want: Sequence[np.ndarray],
    rtol: float,
    atol: float = 0.0,
    what: str = "outputs",
    *,
    names: Sequence[str] | None = None,
    also: Sequence[np.ndarray] | None = None,
) -> None:
    """Assert ``got[i]`` matches ``want[i]`` elementwise within ``atol + rtol * scale``
    (``scale``: the largest finite magnitude of ``want[i]``), with the same shapes and the
    same non-finite values. ``also``: a second reference an element may match instead
    (e.g. the float32 original where a lossy Cast makes float64 round elsewhere)."""
    assert len(got) == len(want), f"{what}: {len(got)} outputs, the reference has {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        label = f"{what}: output {names[i] if names else i}"
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape, f"{label}: shape {g.shape}, the reference has {w.shape}"
        if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(g.dtype, np.floating)):
            assert np.array_equal(g, w), f"{label}: {_describe(g, w, g != w, 0)}"
            continue
        g64, w64 = g.astype(np.float64), w.astype(np.float64)
        finite = np.isfinite(w64)
        scale = float(np.abs(w64[finite]).max()) if finite.any() else 0.0
        bound = atol + rtol * scale
        close = np.where(finite, np.abs(g64 - w64) <= bound, (g64 == w64) | (np.isnan(g64) & np.isnan(w64)))
        if also is not None:
            a64 = np.asarray(also[i]).astype(np.float64)
            close |= np.abs(g64 - a64) <= bound
        assert close.all(), f"{label}: {_describe(g, w, ~close, bound)} (scale {scale:.3g}, rtol {rtol:g})"


UNCONVERGED_MARKS = ("unconverged", "did not reach a fixed point")


def assert_converged(report: object, caught: Sequence[object] = ()) -> None:
    """Assert no fixpoint hit its iteration cap and no pass hit a round cap: nothing in
    ``report.warnings`` or the ``caught`` warnings says so, and no pass record's stats hold
    ``capped`` (the pattern driver's count of graphs left with rewrites pending) or a
    warning that says so (constant folding)."""
    said = [str(w) for w in getattr(report, "warnings", [])]
    said += [str(getattr(w, "message", w)) for w in caught]
    unconverged = [w for w in said if any(mark in w for mark in UNCONVERGED_MARKS)]
    assert not unconverged, f"stopped unconverged: {unconverged}"
    for record in getattr(report, "passes", []):
        stats = record.stats if isinstance(record.stats, dict) else {}
        assert not stats.get("capped"), f"pass '{record.name}' hit its round cap: {stats}"
        assert not any(m in str(stats.get("warning", "")) for m in UNCONVERGED_MARKS), (
            f"pass '{record.name}': {stats['warning']}")
