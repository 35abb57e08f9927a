"""A float64 reference: the original model evaluated in double precision.

The verifier judges a float32 candidate against something more precise than float32, so
that a rewrite that is exact in real arithmetic (a folded BatchNorm) is not blamed for the
original's own rounding, and a wrong one cannot hide inside it. The model is copied with
every float tensor, type and Cast target turned into float64, then run by:

1. onnxruntime on CPU, when it has a double kernel for every node (MLPs, many
   transformer graphs);
2. else onnx's reference evaluator's kernels, run node by node (each intermediate dropped
   once its last reader has run, so that only the values still to be read are held), with
   fast numpy kernels for the ops that dominate CNNs (Conv, ConvTranspose,
   BatchNormalization, MaxPool/AveragePool, and Softmax-family ops with their
   pre-opset-13 semantics). Before its outputs are trusted, every node is
   checked on the first sample against onnxruntime's float32 run: fed onnxruntime's own
   float32 inputs, its float64 result must match onnxruntime's output to within
   ``NODE_CHECK_REL`` of that output's scale plus ``INPUT_ROUNDING_ULPS`` float32 roundings
   of its largest input (one op's float32 rounding), so a semantic difference between the
   two runtimes can never pose as precision.

When neither works (quantized or custom-domain ops, a node that does not check out, a
model too large to hold twice in memory) the caller falls back to the float32 original
and says so. Everything here is deterministic.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_conv_transpose import ConvTranspose as _EvaluatorConvTranspose

from optcc.runtime.session import first_line, make_session, run, session_options, with_outputs

__all__ = ["Float64Reference", "to_float64", "estimated_macs", "MAX_REFERENCE_BYTES", "MAX_REFERENCE_MACS",
           "NODE_COST_MACS", "NODE_CHECK_REL"]

_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
_NOT_FLOAT64 = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                "QLinearMatMul", "MatMulInteger", "ConvInteger"}
MAX_REFERENCE_BYTES = 512 * 1024 * 1024  # float64 weights held in memory at most
# Multiply-accumulates the float64 evaluation may spend, over the samples it is asked for and
# the node check: a deterministic stand-in for its time (numpy's float64 kernels run ~1 GMAC/s
# on 2 cores; the evaluator's own work per node costs about as much as NODE_COST_MACS). Its
# memory does not grow with it: samples run one after another, each intermediate dropped once
# its last reader has run. It is asked only for the samples a candidate fails against the
# float32 original on.
MAX_REFERENCE_MACS = 8_000_000_000
NODE_COST_MACS = 200_000
NODE_CHECK_REL = 1e-4  # per-node agreement with onnxruntime's float32 output, relative to its scale
# plus this many float32 roundings of the node's largest input: an op that cancels large
# inputs (x - mean of a BatchNorm) returns their rounding, whatever its output's scale
INPUT_ROUNDING_ULPS = 16
_EPS32 = float(np.finfo(np.float32).eps) / 2

Feeds = Mapping[str, np.ndarray]


# --------------------------------------------------------------------------- conversion


def _tensor64(tensor: TensorProto) -> TensorProto:
    if tensor.data_type not in _FLOATS:
        return tensor
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name)


def _graph64(graph: onnx.GraphProto) -> str | None:
    for i, tensor in enumerate(graph.initializer):
        graph.initializer[i].CopyFrom(_tensor64(tensor))
    for info in [*graph.input, *graph.output]:
        if info.type.tensor_type.elem_type in _FLOATS:
            info.type.tensor_type.elem_type = TensorProto.DOUBLE
    del graph.value_info[:]
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            return f"custom-domain op {node.domain}::{node.op_type}"
        if node.op_type in _NOT_FLOAT64:
            return f"quantized op {node.op_type}"
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                attr.t.CopyFrom(_tensor64(attr.t))
            elif attr.type == onnx.AttributeProto.GRAPH:
                problem = _graph64(attr.g)
                if problem:
                    return problem
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    problem = _graph64(sub)
                    if problem:
                        return problem
            elif node.op_type in ("Cast", "EyeLike", "RandomNormal", "RandomUniform",
                                  "RandomNormalLike", "RandomUniformLike") and attr.name in ("to", "dtype"):
                if attr.i in _FLOATS:
                    attr.i = TensorProto.DOUBLE
            if node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
                return "Constant with value_float(s)"  # rare; rewriting it is not worth the risk
    return None


def to_float64(proto: onnx.ModelProto) -> tuple[onnx.ModelProto | None, str | None]:
    """A float64 copy of ``proto`` (floats, types and Cast targets), or None and why not."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    problem = _graph64(copy.graph)
    if problem:
        return None, problem
    return copy, None


# --------------------------------------------------------------------------- fast kernels


def _pads(x_shape: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
          pads: Sequence[int] | None, auto_pad: str | None) -> list[int]:
    spatial = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        result = [0] * (2 * spatial)
        for i in range(spatial):
            size = x_shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
            small, big = total // 2, total - total // 2
            result[i], result[i + spatial] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
        return result
    if auto_pad == "VALID" or pads is None:
        return [0] * (2 * spatial)
    return list(pads)


def _windows(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
             pads: Sequence[int], fill: float, ceil: bool = False) -> np.ndarray:
    """[N, C, *out, *kernel] windows of the padded input."""
    spatial = len(kernel)
    extra = [0] * spatial
    if ceil:
        for i in range(spatial):
            size = x.shape[2 + i] + pads[i] + pads[i + spatial]
            span = (kernel[i] - 1) * dilations[i] + 1
            rem = (size - span) % strides[i]
            extra[i] = (strides[i] - rem) % strides[i] if size >= span else 0
    width = [(0, 0), (0, 0)] + [(pads[i], pads[i + spatial] + extra[i]) for i in range(spatial)]
    padded = np.pad(x, width, constant_values=fill)
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    view = np.lib.stride_tricks.sliding_window_view(padded, spans, axis=tuple(range(2, 2 + spatial)))
    index = (slice(None), slice(None), *[slice(None, None, s) for s in strides], *[slice(None, None, d) for d in dilations])
    return view[index]


class _Conv(OpRun):
    op_domain = ""

    def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None,
             strides=None):
        spatial = X.ndim - 2
        kernel = list(kernel_shape or W.shape[2:])
        strides = list(strides or [1] * spatial)
        dilations = list(dilations or [1] * spatial)
        group = group or 1
        auto = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        pad = _pads(X.shape, kernel, strides, dilations, pads, auto)
        n, c = X.shape[:2]
        m = W.shape[0]
        if group == 1 and all(k == 1 for k in kernel) and not any(pad):
            x = X[(slice(None), slice(None), *[slice(None, None, s) for s in strides])]
            y = np.tensordot(W.reshape(m, c), x, axes=([1], [1])).swapaxes(0, 1)  # [N, M, *out]
        else:
            windows = _windows(X, kernel, strides, dilations, pad, 0.0)  # [N, C, *out, *kernel]
            out_shape = windows.shape[2:2 + spatial]
            cg, mg = c // group, m // group
            if cg == 1 and mg == 1:  # depthwise: one product per kernel offset, summed in row-major order
                w = W.reshape(c, -1).T.reshape(-1, 1, c, *([1] * spatial))  # [offsets, 1, C, 1...]
                offsets = np.ndindex(*kernel)
                y = windows[(..., *next(offsets))] * w[0]
                for i, offset in enumerate(offsets, 1):
                    y += windows[(..., *offset)] * w[i]
            else:
                results = []
                for g in range(group):
                    win = np.moveaxis(windows[:, g * cg:(g + 1) * cg], 1, 1 + spatial)  # [N, *out, C, *kernel]
                    cols = win.reshape(n * int(np.prod(out_shape)), -1)
                    results.append(cols @ W[g * mg:(g + 1) * mg].reshape(mg, -1).T)
                y = np.concatenate(results, axis=-1).reshape(n, *out_shape, m)
                y = np.moveaxis(y, -1, 1)
        if B is not None:
            y = y + B.reshape(1, m, *([1] * spatial))
        y = np.ascontiguousarray(y)
        return (y.astype(X.dtype, copy=False),)


class _ConvTranspose(_EvaluatorConvTranspose):
    """ConvTranspose as one tensordot per group, added into the output once per kernel
    offset (onnx's evaluator loops over images and channels in Python). An ``output_shape``,
    an ``auto_pad``, a ``kernel_shape`` other than the weight's or a negative pad is left to
    onnx's evaluator."""

    op_domain = ""

    def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
             output_padding=None, output_shape=None, pads=None, strides=None):
        spatial = X.ndim - 2
        kernel = list(W.shape[2:])
        auto = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if output_shape is not None or auto not in (None, "NOTSET") or (pads is not None and min(pads) < 0) \
                or (kernel_shape is not None and list(kernel_shape) != kernel):
            return super()._run(X, W, B, auto_pad=auto_pad, dilations=dilations, group=group,
                                kernel_shape=kernel_shape, output_padding=output_padding,
                                output_shape=output_shape, pads=pads, strides=strides)
        strides = list(strides or [1] * spatial)
        dilations = list(dilations or [1] * spatial)
        extra = list(output_padding or [0] * spatial)
        pads = list(pads or [0] * (2 * spatial))
        group = group or 1
        n, c = X.shape[:2]
        cg, mg = c // group, W.shape[1]
        inner = X.shape[2:]
        # the output before pads are cropped: every input element's kernel footprint, then output_padding
        full = [s * (i - 1) + (k - 1) * d + 1 + e for s, i, k, d, e in zip(strides, inner, kernel, dilations, extra)]
        y = np.zeros((n, mg * group, *full), dtype=np.result_type(X, W))
        for g in range(group):
            products = np.tensordot(X[:, g * cg:(g + 1) * cg], W[g * cg:(g + 1) * cg], axes=([1], [0]))
            products = np.moveaxis(products, 1 + spatial, 1)  # [N, M/group, *inner, *kernel]
            for offset in np.ndindex(*kernel):
                at = tuple(slice(o * d, o * d + s * (i - 1) + 1, s)
                           for o, d, s, i in zip(offset, dilations, strides, inner))
                y[(slice(None), slice(g * mg, (g + 1) * mg), *at)] += products[(..., *offset)]
        y = y[(slice(None), slice(None), *(slice(pads[i], full[i] - pads[i + spatial]) for i in range(spatial)))]
        if B is not None:
            y = y + B.reshape(1, -1, *([1] * spatial))
        return (np.ascontiguousarray(y).astype(X.dtype, copy=False),)


class _BatchNormalization(OpRun):
    op_domain = ""

    def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, training_mode=None, spatial=None,
             is_test=None, consumed_inputs=None):
        if training_mode:
            raise NotImplementedError("BatchNormalization in training mode")
        eps = 1e-5 if epsilon is None else epsilon
        shape = (1, -1, *([1] * (x.ndim - 2)))
        y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * scale.reshape(shape) + bias.reshape(shape)
        return (y.astype(x.dtype, copy=False),)


def _pool(kind: str):
    class _Pool(OpRun):
        op_domain = ""

        def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None, pads=None,
                 storage_order=None, strides=None, count_include_pad=None, p=None):
            if len(self.onnx_node.output) > 1 or (storage_order or 0) != 0:
                raise NotImplementedError("pool with indices")
            spatial = x.ndim - 2
            kernel = list(kernel_shape)
            strides = list(strides or [1] * spatial)
            dilations = list(dilations or [1] * spatial)
            auto = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
            pad = _pads(x.shape, kernel, strides, dilations, pads, auto)
            axes = tuple(range(-spatial, 0))
            if kind == "max":
                win = _windows(x, kernel, strides, dilations, pad, -np.inf, bool(ceil_mode))
                return (win.max(axis=axes).astype(x.dtype, copy=False),)
            win = _windows(x, kernel, strides, dilations, pad, 0.0, bool(ceil_mode))
            total = win.sum(axis=axes)
            if count_include_pad:
                ones = np.pad(np.ones(x.shape[2:]), [(pad[i], pad[i + spatial]) for i in range(spatial)],
                              constant_values=1.0)
                ones = ones[None, None]
                trimmed = _windows(ones, kernel, strides, dilations, [0] * (2 * spatial), 0.0, bool(ceil_mode))
            else:
                trimmed = _windows(np.ones((1, 1, *x.shape[2:])), kernel, strides, dilations, pad, 0.0, bool(ceil_mode))
            count = trimmed.sum(axis=axes)
            return ((total / count).astype(x.dtype, copy=False),)

    _Pool.__name__ = "MaxPool" if kind == "max" else "AveragePool"
    return _Pool


def _softmax_family(name: str, opset: int):
    def compute(x: np.ndarray, axis: int) -> np.ndarray:
        shifted = x - x.max(axis=axis, keepdims=True)
        if name == "Hardmax":
            idx = np.argmax(x, axis=axis)
            out = np.zeros_like(x)
            np.put_along_axis(out, np.expand_dims(idx, axis), 1.0, axis=axis)
            return out
        exp = np.exp(shifted)
        total = exp.sum(axis=axis, keepdims=True)
        return shifted - np.log(total) if name == "LogSoftmax" else exp / total

    class _Softmax(OpRun):
        op_domain = ""

        def _run(self, x, axis=None):
            if opset >= 13:
                return (compute(x, -1 if axis is None else axis).astype(x.dtype, copy=False),)
            axis = 1 if axis is None else axis % max(x.ndim, 1)
            flat = x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
            return (compute(flat, 1).reshape(x.shape).astype(x.dtype, copy=False),)

    _Softmax.__name__ = name
    return _Softmax


def _kernels(opset: int) -> list[type[OpRun]]:
    conv = type("Conv", (_Conv,), {})
    conv_transpose = type("ConvTranspose", (_ConvTranspose,), {})
    bn = type("BatchNormalization", (_BatchNormalization,), {})
    return [conv, conv_transpose, bn, _pool("max"), _pool("avg"),
            *(_softmax_family(name, opset) for name in ("Softmax", "LogSoftmax", "Hardmax"))]


# --------------------------------------------------------------------------- cost


def estimated_macs(proto: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> int:
    """Multiply-accumulates of one run of the Conv/ConvTranspose/MatMul/Gemm nodes, given the
    shape of every value (from a run)."""
    total = 0
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm") or len(node.input) < 2:
            continue
        out, a, weight = (list(shapes.get(name, ())) for name in (node.output[0], node.input[0], node.input[1]))
        if not out or not a or not weight:
            continue
        if node.op_type == "ConvTranspose":  # each input element times its [Cout/group, *kernel] footprint
            total += int(np.prod(a)) * int(np.prod(weight[1:]))
            continue
        if node.op_type == "Conv":
            reduce = int(np.prod(weight[1:]))
        elif node.op_type == "Gemm":
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            reduce = a[0] if trans_a else a[-1]
        else:
            reduce = a[-1]
        total += int(np.prod(out)) * reduce
    return total


# --------------------------------------------------------------------------- the reference


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


def _as64(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float64) if array.dtype in (np.float32, np.float16) else array


@dataclasses.dataclass
class Float64Reference:
    """Float64 outputs of a model on each sample, or why there are none.

    ``kind`` says what produced them ("float64 (onnxruntime)" or "float64 (onnx reference
    evaluator)"); ``outputs[i][name]`` is sample i's float64 output; ``reason`` says why
    ``outputs`` is None.
    """

    kind: str | None
    outputs: list[dict[str, np.ndarray]] | None
    reason: str | None = None

    @classmethod
    def build(cls, proto: onnx.ModelProto, feeds: Sequence[Feeds],
              float32_outputs: Sequence[Mapping[str, np.ndarray]] | None = None,
              advance: Callable[[int], None] = lambda steps: None) -> Float64Reference:
        """Evaluate ``proto`` in float64 on every feed dict (see the module docstring);
        ``advance(1)`` after each sample evaluated (a progress bar's)."""
        if proto.ByteSize() > MAX_REFERENCE_BYTES // 2:
            return cls(None, None, f"model over {MAX_REFERENCE_BYTES // 2**21} MiB of weights")
        model64, problem = to_float64(proto)
        if model64 is None:
            return cls(None, None, f"no float64 copy: {problem}")
        feeds64 = [{k: _as64(v) for k, v in f.items()} for f in feeds]
        names = [o.name for o in proto.graph.output]
        try:
            session = make_session(model64, options=session_options())
            outs = []
            for f in feeds64:
                outs.append(dict(zip(names, run(session, f))))
                advance(1)
            return cls("float64 (onnxruntime)", outs)
        except Exception:  # noqa: BLE001 - no double kernel for some node: try the evaluator
            pass
        # the shapes onnx infers give a lower bound of the work (a node they cannot size
        # counts nothing): over the budget, no probe of every intermediate is needed
        macs = _macs(proto, _inferred_shapes(proto, feeds[0]), len(feeds))
        if macs > MAX_REFERENCE_MACS:
            return cls(None, None, f"a float64 evaluation would take at least {macs / 1e9:.2g} GMAC "
                                   f"(budget {MAX_REFERENCE_MACS / 1e9:g})")
        values, problem = _float32_values(proto, feeds[0])
        if values is None:
            return cls(None, None, problem)
        macs = _macs(proto, {k: np.shape(v) for k, v in values.items()}, len(feeds))
        if macs > MAX_REFERENCE_MACS:
            return cls(None, None, f"a float64 evaluation would take {macs / 1e9:.2g} GMAC "
                                   f"(budget {MAX_REFERENCE_MACS / 1e9:g})")
        try:
            evaluator = ReferenceEvaluator(model64, new_ops=_kernels(_opset(proto)))
        except Exception as e:  # noqa: BLE001
            return cls(None, None, f"onnx's reference evaluator cannot load the model: {first_line(e)}")
        # one schedule for the check and the evaluation: model64 has proto's nodes, in order
        releases = _releases(proto.graph, names)
        problem = _check_nodes(proto, evaluator, values, releases)
        del values  # the probe's float32 intermediates: none is read again
        if problem:
            return cls(None, None, problem)
        try:
            outs = []
            for f in feeds64:
                outs.append(dict(zip(names, (np.asarray(o) for o in _evaluate(evaluator, releases, names, f)))))
                advance(1)
        except Exception as e:  # noqa: BLE001
            return cls(None, None, f"onnx's reference evaluator failed: {first_line(e)}")
        return cls("float64 (onnx reference evaluator)", outs)


def _node_reads(node: onnx.NodeProto) -> set[str]:
    """The names ``node`` reads: its inputs and what its subgraphs read from its scope."""
    reads = set(node.input)
    for attr in node.attribute:
        for sub in (attr.g,) if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
            reads |= _outer_reads(sub)
    return reads


def _outer_reads(graph: onnx.GraphProto) -> set[str]:
    """The names ``graph`` and its subgraphs read or return from an enclosing scope."""
    reads = {o.name for o in graph.output}.union(*(_node_reads(node) for node in graph.node))
    defined = {*(i.name for i in graph.input), *(t.name for t in graph.initializer),
               *(o for node in graph.node for o in node.output)}
    return reads - defined


def _releases(graph: onnx.GraphProto, keep: Sequence[str]) -> list[list[str]]:
    """Per node of ``graph``, the values to drop once it has run: those it is the last reader
    of (a subgraph's reads count as its node's), and its own outputs no node reads. Graph
    outputs and ``keep`` are never dropped."""
    last: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in (*node.output, *_node_reads(node)):
            last[name] = i
    kept = {*keep, *(o.name for o in graph.output), ""}
    releases: list[list[str]] = [[] for _ in graph.node]
    for name, i in last.items():
        if name not in kept:
            releases[i].append(name)
    return releases


def _evaluate(evaluator: ReferenceEvaluator, releases: Sequence[Sequence[str]], names: Sequence[str],
              feeds: Feeds) -> list[Any]:
    """``evaluator``'s main graph run node by node on ``feeds``, each value dropped once its
    last reader has run (``releases``, by node), so that at most the values still to be read
    are held at once; the values of ``names``."""
    results: dict[str, Any] = {"": None, **evaluator.rt_inits_, **feeds}
    for op, done in zip(evaluator.rt_nodes_, releases, strict=True):
        inputs = [results[name] for name in op.input]
        outputs = op.run(*inputs, context=results) if op.need_context() else op.run(*inputs)
        results.update(zip(op.output, outputs))
        for name in done:
            results.pop(name, None)
    return [results[name] for name in names]


def _macs(proto: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], samples: int) -> int:
    """The float64 evaluation's work: every sample and the node check, nodes included."""
    return (estimated_macs(proto, shapes) + NODE_COST_MACS * len(proto.graph.node)) * (samples + 1)


def _inferred_shapes(proto: onnx.ModelProto, feeds: Feeds) -> dict[str, list[int]]:
    """The static shapes onnx's shape inference gives the main graph's values when its
    inputs have the shapes of ``feeds`` (none when inference fails)."""
    trial = onnx.ModelProto()
    trial.CopyFrom(proto)
    for value in trial.graph.input:
        if value.name in feeds and value.type.HasField("tensor_type"):
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in np.shape(feeds[value.name]):
                dims.add().dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(trial, data_prop=True)
    except Exception:  # noqa: BLE001 - then the probe sizes every value
        return {}
    shapes = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else ()
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    shapes.update({t.name: list(t.dims) for t in proto.graph.initializer})
    return shapes


def _float32_values(proto: onnx.ModelProto, feeds: Feeds) -> tuple[dict[str, Any] | None, str | None]:
    """Every main-graph value of onnxruntime's float32 run on ``feeds`` (a probe)."""
    produced = [o for node in proto.graph.node for o in node.output if o]
    try:
        # without an arena each output owns its buffer alone: kept as onnxruntime hands it out,
        # not copied, every intermediate is held once
        probe = make_session(with_outputs(proto, produced), options=session_options(arena=False))
        names = [o.name for o in probe.get_outputs()]
        values: dict[str, Any] = dict(zip(names, probe.run(names, dict(feeds))))
    except Exception as e:  # noqa: BLE001
        return None, f"onnxruntime cannot expose the original's intermediates: {first_line(e)}"
    values.update(feeds)
    # an initializer's default where ``feeds`` feed no value for it (a fed one replaces it)
    values.update({t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if t.name not in feeds})
    return values, None


def _finite_abs_max(array: np.ndarray) -> float | None:
    """The largest magnitude among ``array``'s finite elements; None when it has none. An
    array whose largest magnitude is finite is all finite (NaN and infinities make it NaN
    or infinite): then no mask is built."""
    if not array.size:
        return None
    top = float(np.max(np.abs(array)))
    if math.isfinite(top):
        return top
    finite = np.isfinite(array)
    return float(np.abs(array[finite]).max()) if finite.any() else None


def _input_scale(args: Sequence[Any]) -> float:
    scales = [_finite_abs_max(a) for a in args if isinstance(a, np.ndarray) and a.dtype.kind == "f"]
    return max((s for s in scales if s is not None), default=0.0)


def _check_nodes(proto: onnx.ModelProto, evaluator: ReferenceEvaluator, values: dict[str, Any],
                 releases: Sequence[Sequence[str]]) -> str | None:
    """None when every main-graph node of the evaluator, fed onnxruntime's float32 inputs
    ``values``, reproduces onnxruntime's float32 outputs within one op's rounding; else the
    first that does not. Each value is dropped from ``values`` once the last node that
    reads or produces it is checked."""
    graph = proto.graph
    for node, op, done in zip(graph.node, evaluator.rt_nodes_, releases, strict=True):
        try:
            args = [_as64(values[name]) if name else None for name in node.input]
            while args and args[-1] is None:
                args.pop()
            got = op.run(*args)
        except Exception as e:  # noqa: BLE001
            return f"onnx's reference evaluator cannot run {node.op_type} '{node.name}': {first_line(e)}"
        for name, mine in zip(node.output, got):
            if not name:
                continue
            theirs = np.asarray(values[name])
            mine = np.asarray(mine)
            if mine.shape != theirs.shape:
                return f"onnx's reference evaluator disagrees with onnxruntime on {node.op_type} '{node.name}' (shape)"
            if theirs.dtype.kind == "f":
                t64 = theirs.astype(np.float64)
                finite = np.isfinite(t64)
                if not np.array_equal(finite, np.isfinite(mine)):
                    return (f"onnx's reference evaluator disagrees with onnxruntime on {node.op_type} "
                            f"'{node.name}' (non-finite values)")
                if finite.any():
                    if finite.all():  # no mask to apply: the same maxima without copies
                        scale = float(np.abs(t64).max())
                        err = float(np.abs(mine - t64).max())
                    else:
                        scale = float(np.abs(t64[finite]).max())
                        err = float(np.abs(mine[finite] - t64[finite]).max())
                    if err > NODE_CHECK_REL * scale + INPUT_ROUNDING_ULPS * _EPS32 * _input_scale(args) + 1e-30:
                        return (f"onnx's reference evaluator disagrees with onnxruntime on {node.op_type} "
                                f"'{node.name}' (rel {err / scale if scale else err:.2g})")
            elif not np.array_equal(mine, theirs):
                return f"onnx's reference evaluator disagrees with onnxruntime on {node.op_type} '{node.name}'"
        for name in done:
            values.pop(name, None)
    return None
