"""QuantizeInt8Pass: static INT8 quantization in QDQ form, from calibrated ranges.

Rewrite: every quantizable op ``y = op(x, W, b)`` becomes
``y' = DQ(Q(op(DQ(Q(x)), DQ(W_q), DQ(b_q))))`` with QuantizeLinear/DequantizeLinear
pairs, the form onnxruntime fuses into integer kernels (QLinearConv, QLinearMatMul,
QGemm, QLinearAdd/Mul, QLinearAveragePool, QLinearConcat, ...):

- weights (Conv, Gemm, MatMul with a constant 2-D B): int8 symmetric within +-64,
  per output channel by default (``scale[c] = max|W[c]| / 64``, zero point 0), or per
  tensor (``per_channel=False``, and always for opset < 13). 64, not 127: onnxruntime's
  integer kernels on x86 CPUs without VNNI sum pairs of uint8 x int8 products in a
  saturating int16, which larger weights overflow (``optcc.quant.integer_range``);
  within 64 every CPU computes the same exact accumulations;
- activations: uint8 asymmetric over the calibrated range widened to contain 0
  (``scale = (hi - lo) / 255``, ``zero_point = round(-lo / scale)``), or int8 symmetric
  (``activation_type="int8"``: ``scale = max(|lo|, |hi|) / 127``);
- bias (Conv, Gemm with a 1-D C): int32, ``scale = x_scale * w_scale[c]``,
  zero point 0. Overflow guard: when ``|b[c] / scale| > 2**31 - 1``, the weight scale of
  that channel is raised to ``|b[c]| / (x_scale * (2**31 - 1))`` (the int32 bias then
  fits; the weights of that channel are quantized a little more coarsely). Counted in
  ``stats["bias_scale_raised"]``;
- Relu and Clip(min <= 0 <= max) right after a quantized op (its only use) are absorbed
  (uint8 only): the op's output is quantized with the activation's output range, whose
  clamp at the range's ends is exactly what the activation did (range lo = 0 for Relu).
- data-movement ops (Reshape, Transpose, Slice, Flatten, Squeeze, Unsqueeze, MaxPool,
  Resize, Split) reuse their input's scale and zero point, so onnxruntime drops their Q/DQ and
  runs them on 8-bit data; they are quantized only when a consumer is quantized;
- Concat: its output and inputs share one scale and zero point, from the union of their
  ranges (carried upstream through data-movement ops, e.g. to a Split's input), so
  onnxruntime's QLinearConcat copies the inputs instead of requantizing each (nudenet's
  24 YOLOv8 concats: 1.58x -> 1.69x faster than float32, 29.9 -> 30.3 dB); a Concat whose
  inputs' ranges differ more than ``CONCAT_SPAN_RATIO`` times stays float (YOLO's output
  joins pixel coordinates and class scores: one scale would round the scores to 0 or 1.26);
- rescales: ``Mul(x, c)`` / ``Div(x, c)`` with a positive scalar constant ``c`` (hard-swish's
  ``/ 6``, PP-LCNet's learnable scales) whose result feeds a quantized op are removed: the
  consumer dequantizes ``x``'s 8-bit tensor with scale ``x_scale * c`` (``/ c``) and the
  same zero point, exactly ``c * DQ(x_q)`` up to float rounding. No kernel runs for them
  and no second 8-bit rounding happens (onnxruntime has no integer Div: the op would run
  float between a DQ and a Q);
- cancellations stay float: the inputs of an Add/Sub whose result's range is more than
  ``CANCELLATION_RATIO`` times narrower than an input's (a variance written
  ``E[x^2] - E[x]^2``) are computed in float32, back through sums, means, data movement
  and scalar rescales to the quantized ops that produce them (8-bit inputs would leave the
  result a few levels); so is the input of Sqrt/Reciprocal/Log or a Div's divisor whose
  range comes within ``RELATIVE_STEPS`` 8-bit steps of 0 (its absolute rounding error
  becomes the result's relative error);
- masked scores stay float: the Add that puts an attention mask into a Softmax/LogSoftmax
  input (an input whose calibrated values are 0 and, masked, ``MASKED_BELOW`` or lower)
  stays a float op (one grid over mask and scores would leave the scores a few levels,
  and a -inf rounded to the grid's lowest level would unmask its position);
- ConvTranspose stays float: onnxruntime's CPU provider has no integer ConvTranspose
  (measured with 1.32: a QDQ ConvTranspose runs float, its weights dequantized on every
  run);
- any other op (Softmax, Sigmoid, custom domains, ...) stays float, and a tensor gets a
  Q/DQ pair only when its producer or one of its consumers is quantized: no useless pair.
- a Conv, ConvTranspose or Gemm that stays float (ConvTranspose, ``exclude``, a layer the
  fallback returned to float) but reads a DQ output reads it through its own
  DequantizeLinear with the scale and zero point repeated along the channel axis
  (``axis=1``; ``stats["float_layers_shielded"]``). Exact: every element is dequantized
  with the same scale and zero point as before. Why: onnxruntime (1.2x and later,
  ``WeightBiasQuantization``, at every optimization level above none) quantizes the
  float weights of any such layer fed by a per-tensor DQ itself, symmetric per tensor
  int8, and fuses it into an integer kernel: a layer kept float for accuracy would run
  with weights coarser than the quantized layers' per-channel ones. It matches a scalar
  scale only, so a per-channel one keeps the layer float. Needs opset >= 13 (``axis``)
  and more than one input channel (a 1-element scale counts as a scalar there).

A model below IR version 4 is moved to 4 first (``optcc.ir.upgrade_legacy_ir``): there every
initializer must also be a graph input, so the scales and quantized weights would
change the interface. From IR 4 on, an initializer listed as a graph input is a default a
caller may replace: it is no constant (``optcc.ir.is_constant``) but an activation with a
calibrated range (a MatMul's fed B, a Mul's fed gain), and a Conv or Gemm whose weight or
bias is fed stays float.

Preconditions (else the node stays float, reason in ``stats["kept_float"]``): default
domain, float32 tensors, a calibrated range for every activation input and output
(``ranges`` keyed by value name), constant weights read by no float op, no
BatchNormalization right after (fold it first: ``fuse-batchnorm``), Gemm with
alpha = beta = 1 and transA = 0, opset >= 10. Graph inputs and output names, types and
shapes stay; a quantized op's graph output becomes the DQ output under the same name.
Nodes in ``exclude`` (node names, output names or op types) stay float; ``only``
restricts quantization to the listed nodes. Function bodies are left float (no ranges
can be collected inside them); If/Loop/Scan bodies are quantized where ranges are given.

Numerics ("int8"): lossy; the result is judged by SQNR/cosine/argmax agreement. The
pass is deterministic given ``ranges``. ``stats["integer_nodes"]`` counts the integer
kernels onnxruntime (ORT_ENABLE_EXTENDED) actually runs after fusing the QDQ model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

import optcc
from optcc.rewrite import static_rank

__all__ = ["QuantizeInt8Pass", "COMPUTE_OPS", "SHARED_SCALE_OPS", "layer_id", "activation_params"]

COMPUTE_OPS = frozenset(
    {"Conv", "MatMul", "Gemm", "Add", "Mul", "AveragePool", "GlobalAveragePool", "Concat"}
)
SHARED_SCALE_OPS = frozenset(
    {"Reshape", "Transpose", "Slice", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Resize", "Split"}
)
_WEIGHTED = frozenset({"Conv", "Gemm"})
# Ops that turn logits into the probabilities a model outputs: their input's absolute
# error becomes a relative error of the output (Softmax: dp/p = d logit), and a saturated
# Sigmoid map turns a logit step into a flipped pixel. Logits feeding one of them on the
# way to a graph output are never rounded to 8 bits.
PROBABILITY_OPS = frozenset({"Softmax", "LogSoftmax", "Sigmoid", "HardSigmoid"})
_PASS_THROUGH = SHARED_SCALE_OPS | {"Identity", "Cast"}
_SINGLE_INPUT_OPS = _WEIGHTED | {"AveragePool", "GlobalAveragePool"}  # other inputs: weights
INT32_MAX = 2**31 - 1
_QUANTIZE_CHUNK = 1 << 20  # elements ``_quantize`` rounds at a time (8 MiB of float64 temporaries)
# A Softmax input more than 88 below its row's largest value has probability below
# exp(-88), under float32's smallest normal number: added values at or below MASKED_BELOW mask.
MASKED_BELOW = -88.0
CONCAT_SPAN_RATIO = 16  # a Concat whose inputs' ranges differ more stays float (4 bits lost)
# An Add/Sub whose result's range is more than CANCELLATION_RATIO times narrower than an
# input's range cancels (a variance written E[x^2] - E[x]^2): inputs rounded to 8 bits over
# their own range leave the result fewer than 255 / CANCELLATION_RATIO levels (2 bits lost).
CANCELLATION_RATIO = 4
# A divisor, Sqrt or Log input whose smallest calibrated magnitude lies within
# RELATIVE_STEPS 8-bit steps of 0 would be known to worse than 1 / (2 * RELATIVE_STEPS)
# relative error there, and those ops turn the input's relative error into the result's.
RELATIVE_STEPS = 16
_RELATIVE_OPS = frozenset({"Sqrt", "Reciprocal", "Log"})  # and Div's divisor
# Ops between a rounded value and a cancellation that neither round again nor shrink the
# rounding error relative to the result: data movement, broadcasts, sums and means.
_CARRY_ERROR_OPS = _PASS_THROUGH | {"Expand", "ReduceSum", "ReduceMean"}

Params = tuple[np.ndarray, np.ndarray]  # (scale float32, zero point uint8/int8)


def layer_id(node: ir.Node) -> str:
    """How a node is named in stats, ``exclude`` and ``only``: its name, else its first
    output's name."""
    return node.name or (node.outputs[0].name if node.outputs and node.outputs[0].name else "")


def activation_params(lo: float, hi: float, activation_type: str = "uint8") -> Params:
    """Scale and zero point of an activation over ``[lo, hi]`` (widened to contain 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if activation_type == "uint8":
        scale = np.float32((hi - lo) / 255.0)
        if not scale > 0 or not np.isfinite(scale):
            return np.array(1.0, np.float32), np.array(0, np.uint8)
        zero = np.clip(np.round(-lo / float(scale)), 0, 255)
        return np.array(scale, np.float32), np.array(zero, np.uint8)
    scale = np.float32(max(-lo, hi) / 127.0)
    if not scale > 0 or not np.isfinite(scale):
        scale = np.float32(1.0)
    return np.array(scale, np.float32), np.array(0, np.int8)


def _quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int | None) -> np.ndarray:
    """``round(x / scale) + zero`` in float64, clipped to the zero point's integer range, in
    the zero point's dtype. Element-wise, so it is computed in slices of the leading axis of
    at most ``_QUANTIZE_CHUNK`` elements: the float64 temporaries stay small whatever the
    weight's size, and every element gets the same arithmetic as in one piece."""
    dtype = zero.dtype
    info = np.iinfo(dtype)
    if axis is not None and scale.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    scale, zero = scale.astype(np.float64), zero.astype(np.int64)

    def rounded(part: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
        return np.clip(np.round(part.astype(np.float64) / s) + z, info.min, info.max).astype(dtype)

    if x.ndim == 0 or x.size <= _QUANTIZE_CHUNK:
        return rounded(x, scale, zero)
    out = np.empty(x.shape, dtype)
    rows = max(1, _QUANTIZE_CHUNK // max(1, x[0].size))
    # an operand with its own leading axis (per-channel along axis 0) is sliced with ``x``
    sliced = [a.ndim == x.ndim and a.shape[0] != 1 for a in (scale, zero)]
    for start in range(0, x.shape[0], rows):
        part = slice(start, start + rows)
        s, z = (a[part] if cut else a for a, cut in zip((scale, zero), sliced))
        out[part] = rounded(x[part], s, z)
    return out


def _is_default(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.as_float())


def _is_float32(value: ir.Value) -> bool:
    return value.dtype is None or value.dtype == ir.DataType.FLOAT


class _Plan:
    """What to quantize in one graph: nodes, per-value params, absorbed activations.
    ``inputs_constant``: whether initializers listed as graph inputs are constants (below
    IR 4, ``optcc.ir.initializers_are_constant``); from IR 4 on such an input may be fed,
    so it is an activation like any other input."""

    def __init__(self, inputs_constant: bool) -> None:
        self.inputs_constant = inputs_constant
        self.compute: dict[ir.Node, str] = {}  # node -> weight handling ("conv", "gemm", ...)
        self.shared: set[ir.Node] = set()
        self.rescale: dict[ir.Node, float] = {}  # Mul/Div by a positive scalar -> factor
        self.params: dict[ir.Value, Params] = {}
        self.absorbed: dict[ir.Node, ir.Node] = {}  # quantized node -> absorbed Relu/Clip
        self.kept: dict[str, int] = {}
        self.float_output: set[ir.Node] = set()  # quantized inputs, float result (logits of a head)

    def keep(self, reason: str) -> None:
        self.kept[reason] = self.kept.get(reason, 0) + 1

    def const(self, value: ir.Value | None) -> np.ndarray | None:
        """The array of a constant input (``optcc.ir.const_array``), None for an activation."""
        return None if value is None else optcc.ir.const_array(value, inputs_constant=self.inputs_constant)


class QuantizeInt8Pass(optcc.Pass):
    """Insert QDQ pairs so onnxruntime runs Conv/MatMul/Gemm/... on INT8 (see module doc)."""

    name = "quantize-int8"
    numerics = "int8"

    def __init__(
        self,
        ranges: Mapping[str, tuple[float, float]] | None = None,
        *,
        per_channel: bool = True,
        activation_type: str = "uint8",
        exclude: Iterable[str] = (),
        only: Iterable[str] | None = None,
        count_fused: bool = True,
    ) -> None:
        super().__init__()
        if activation_type not in ("uint8", "int8"):
            raise optcc.BadInputError(f"activation_type must be 'uint8' or 'int8', got '{activation_type}'")
        self.ranges = dict(ranges or {})
        self.per_channel = per_channel
        self.activation_type = activation_type
        self.exclude = frozenset(exclude)
        self.only = None if only is None else frozenset(only)
        self.count_fused = count_fused

    def __repr__(self) -> str:
        return (
            f"QuantizeInt8Pass(ranges=<{len(self.ranges)} tensors>, per_channel={self.per_channel}, "
            f"activation_type='{self.activation_type}', exclude={sorted(self.exclude)})"
        )

    # ------------------------------------------------------------------ call

    def call(self, model: ir.Model) -> optcc.PassResult:
        opset = optcc.ir.default_opset(model)
        stats: dict[str, Any] = {"quantized": {}, "kept_float": {}, "absorbed": {}, "rescaled": {}, "qdq_pairs": 0,
                                 "bias_scale_raised": 0, "float_layers_shielded": 0, "layers": [], "layer_ops": {},
                                 "layer_outputs": {}}
        if opset < 10:
            stats["reason"] = f"opset {opset} < 10 has no QuantizeLinear"
            return optcc.PassResult(model, False, stats)
        if not self.ranges:
            stats["reason"] = ("no calibrated ranges given (quantize-int8-calibrated calibrates first; "
                               "on the command line: --int8 --calibration DATA)")
            return optcc.PassResult(model, False, stats)
        per_channel = self.per_channel and opset >= 13
        names = optcc.ir.ModelNames(model)
        inputs_constant = optcc.ir.initializers_are_constant(model)
        modified = False
        # the op holding each If/Loop/Scan body: a layer there has a range only where the caller gave one
        owners = {id(body): node.op_type for graph in optcc.ir.graphs(model) for node in graph
                  for body in optcc.ir.subgraphs(node)}
        for graph in optcc.ir.graphs(model):
            if not isinstance(graph, ir.Graph):
                if any(n.op_type in COMPUTE_OPS for n in graph):
                    _count(stats["kept_float"], "inside a function")
                continue
            plan = self._plan(graph, inputs_constant, owners.get(id(graph)))
            for reason, n in plan.kept.items():
                _count(stats["kept_float"], reason, n)
            if plan.compute or plan.shared or plan.rescale:
                if not modified:  # the initializers added below need IR >= 4
                    stats["unlisted_constant_inputs"] = optcc.ir.upgrade_legacy_ir(model)
                _Rewriter(graph, plan, per_channel, self.activation_type, stats, names,
                          per_axis_dq=opset >= 13).run()
                modified = True
        if modified:
            for graph in optcc.ir.graphs(model):
                graph.sort()
            if self.count_fused:
                from optcc.quant import count_integer_nodes

                try:
                    stats["integer_nodes"] = count_integer_nodes(model)
                except Exception as e:  # noqa: BLE001 - reporting only; verify judges the model
                    stats["integer_nodes_error"] = str(e).splitlines()[0][:200]
        return optcc.PassResult(model, modified, stats)

    # ------------------------------------------------------------------ planning

    def _range(self, value: ir.Value | None) -> tuple[float, float] | None:
        if value is None or not value.name or not _is_float32(value):
            return None
        r = self.ranges.get(value.name)
        if r is None or not all(np.isfinite(r)):
            return None
        return (float(r[0]), float(r[1]))

    def _selected(self, node: ir.Node) -> bool:
        names = {node.name, node.op_type, *(v.name for v in node.outputs)}
        if self.exclude & names:
            return False
        return self.only is None or bool(self.only & names)

    def _plan(self, graph: ir.Graph, inputs_constant: bool, owner: str | None = None) -> _Plan:
        """``owner``: the op type holding ``graph`` when it is an If/Loop/Scan body."""
        plan = _Plan(inputs_constant)
        weight_users: dict[ir.Value, list[ir.Node]] = {}
        rescales = {node: f for node in graph if (f := self._rescale_factor(node, plan)) is not None}
        for node in graph:
            if not _is_default(node) or node.op_type not in COMPUTE_OPS or node in rescales:
                continue
            if not self._selected(node):
                plan.keep("excluded")
                continue
            kind = self._check(node, plan, owner)
            if kind is None:
                continue
            plan.compute[node] = kind
            if kind in ("weighted", "matmul-const"):
                weight_users.setdefault(node.inputs[1], []).append(node)
        # a weight read by a float op too is not quantized (the float copy would stay)
        for weight, users in weight_users.items():
            if any(use.node not in plan.compute for use in weight.uses()) or weight.is_graph_output():
                for node in users:
                    plan.compute.pop(node, None)
                    plan.keep("weight shared with a float op")
        self._keep_logits_float(graph, plan)
        self._keep_masked_scores_float(graph, plan)
        self._keep_precise_inputs_float(graph, plan, rescales)
        self._absorb_activations(graph, plan)
        self._plan_shared(graph, plan, rescales)
        self._assign_params(graph, plan)
        return plan

    def _rescale_factor(self, node: ir.Node, plan: _Plan) -> float | None:
        """``c`` for ``Mul(x, c)``, ``1 / c`` for ``Div(x, c)``, with ``c`` a positive finite
        float32 scalar constant and ``y`` shaped like ``x``; else None."""
        if not _is_default(node) or node.op_type not in ("Mul", "Div") or len(node.inputs) != 2:
            return None
        if len(node.outputs) != 1 or node.outputs[0].is_graph_output() or not self._selected(node):
            return None
        a, b = node.inputs
        order = [(a, b), (b, a)] if node.op_type == "Mul" else [(a, b)]
        for x, c_value in order:
            c = plan.const(c_value)
            if x is None or c is None or plan.const(x) is not None or self._range(x) is None:
                continue
            if c.dtype != np.float32 or c.size != 1 or not np.isfinite(c).all() or not float(c.reshape(())) > 0:
                continue
            if c.ndim and (static_rank(x) or 0) < c.ndim:  # a broadcast would change the shape
                continue
            value = float(c.reshape(()))
            return value if node.op_type == "Mul" else 1.0 / value
        return None

    def _check(self, node: ir.Node, plan: _Plan, owner: str | None = None) -> str | None:
        """The kind of quantization for ``node``, or None (reason recorded; a missing range in
        a body held by an ``owner`` op is said with the op and where it is: calibration
        records the main graph's values only)."""
        op = node.op_type
        outputs = list(node.outputs)
        unranged = "no calibrated float output range"
        if owner is not None:
            where = "an If branch" if owner == "If" else f"a {owner} body"
            unranged = f"{op} inside {where}"
        if len(outputs) != 1 or self._range(outputs[0]) is None:
            plan.keep(unranged if len(outputs) == 1 else "several outputs")
            return None
        if op in _WEIGHTED:
            if any(use.node.op_type == "BatchNormalization" for use in outputs[0].uses()):
                plan.keep("BatchNormalization not folded (run fuse-batchnorm first)")
                return None
            if len(node.inputs) < 2 or self._range(node.inputs[0]) is None:
                plan.keep("no calibrated input range")
                return None
            w = plan.const(node.inputs[1])
            if w is None or w.dtype != np.float32:
                plan.keep("weight not a float32 constant")
                return None
            if op == "Gemm":
                if w.ndim != 2 or _int_attr(node, "transA", 0) or _float_attr(node, "alpha", 1.0) != 1.0 or (
                    len(node.inputs) > 2 and node.inputs[2] is not None and _float_attr(node, "beta", 1.0) != 1.0
                ):
                    plan.keep("Gemm with transA/alpha/beta")
                    return None
            elif w.ndim < 3:
                plan.keep("malformed weight")
                return None
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                b = plan.const(node.inputs[2])
                n_out = self._out_channels(node, w)
                if b is None or b.dtype != np.float32 or b.ndim != 1 or b.shape[0] != n_out:
                    plan.keep("bias not a constant vector")
                    return None
            return "weighted"
        if op == "MatMul":
            if self._range(node.inputs[0]) is None:
                plan.keep("no calibrated input range")
                return None
            w = plan.const(node.inputs[1])
            if w is not None:
                if w.dtype != np.float32:
                    plan.keep("weight not a float32 constant")
                    return None
                return "matmul-const"
            if self._range(node.inputs[1]) is None:
                plan.keep("no calibrated input range")
                return None
            return "activations"
        # Add, Mul, Concat, AveragePool, GlobalAveragePool: activations (or constants)
        data = [v for v in node.inputs if v is not None]
        if op in ("AveragePool", "GlobalAveragePool"):
            data = data[:1]
        consts = [v for v in data if plan.const(v) is not None]
        if len(consts) == len(data):
            plan.keep("all inputs constant")
            return None
        for v in data:
            c = plan.const(v)
            if c is not None:
                if c.dtype != np.float32:
                    plan.keep("constant input not float32")
                    return None
            elif self._range(v) is None:
                plan.keep("no calibrated input range")
                return None
        if op == "Concat":
            spans = [hi - lo for lo, hi in (self._range(v) for v in data if plan.const(v) is None)]
            if min(spans) <= 0 or max(spans) > CONCAT_SPAN_RATIO * min(spans):
                # one scale for all inputs would leave the narrow ones a few levels
                plan.keep(f"Concat inputs' ranges differ more than {CONCAT_SPAN_RATIO}x")
                return None
        return "activations"

    @staticmethod
    def _out_channels(node: ir.Node, w: np.ndarray) -> int:
        if node.op_type == "Conv":
            return int(w.shape[0])
        return int(w.shape[0] if _int_attr(node, "transB", 0) else w.shape[1])

    def _keep_logits_float(self, graph: ir.Graph, plan: _Plan) -> None:
        """The logits of an output head (the input of a Softmax/Sigmoid whose result
        reaches a graph output through data movement, and back through Add/Mul with a
        constant, e.g. a bias) stay float: Add/Mul there stay float ops; a Conv, Gemm or
        MatMul there keeps its quantized inputs and weights but gets no output Q/DQ
        (onnxruntime then runs it with a float result)."""
        logits: set[ir.Value] = set()
        stack = [v for v in graph.outputs]
        seen: set[ir.Value] = set()
        while stack:  # from the graph outputs back through data movement to a probability op
            value = stack.pop()
            if value in seen:
                continue
            seen.add(value)
            node = value.producer()
            if node is None or node.graph is not graph or not _is_default(node) or not node.inputs:
                continue
            if node.op_type in _PASS_THROUGH and node.inputs[0] is not None:
                stack.append(node.inputs[0])
            elif node.op_type in PROBABILITY_OPS and node.inputs[0] is not None:
                logits.add(node.inputs[0])
        stack = list(logits)
        while stack:  # the logits' producers, back through data movement and constant Add/Mul
            value = stack.pop()
            node = value.producer()
            if node is None or node.graph is not graph or not _is_default(node):
                continue
            if any(
                u.node.op_type not in PROBABILITY_OPS and u.node.op_type not in ("Shape", "Size")
                and u.node.outputs[0] not in logits
                for u in value.uses()
            ):
                continue  # also read by something else: the usual rules apply
            if node in plan.compute and node.op_type in ("Add", "Mul") and any(
                v is not None and plan.const(v) is not None for v in node.inputs
            ):
                del plan.compute[node]
                plan.keep("logits of an output head (Add/Mul with a constant before Softmax/Sigmoid)")
            elif node in plan.compute and node.op_type in (*_WEIGHTED, "MatMul"):
                plan.float_output.add(node)
                continue
            if node.op_type in _PASS_THROUGH | {"Add", "Mul"}:
                for v in node.inputs:
                    if v is not None and plan.const(v) is None and v not in logits:
                        logits.add(v)
                        stack.append(v)

    def _keep_masked_scores_float(self, graph: ir.Graph, plan: _Plan) -> None:
        """The Add producing a Softmax/LogSoftmax input (back through data movement) stays
        a float op when it adds a mask: an input whose calibrated finite values are 0 and,
        at masked positions, at or below ``MASKED_BELOW`` (-10000, float32's lowest; -inf
        is left out of a range, so such a mask's range is [0, 0]). One 8-bit grid over the
        mask and the scores would round every score to a few levels, and a -inf rounded
        to the grid's lowest level would unmask the position. The quantized ops computing
        the mask (back through data movement, up to a MatMul, Gemm or Conv) stay float too:
        calibrated on unpadded samples, the mask's range is [0, 0], and its 8-bit grid would
        hold no -10000."""
        for node in graph:
            if not _is_default(node) or node.op_type not in ("Softmax", "LogSoftmax") or not node.inputs:
                continue
            value = node.inputs[0]
            while value is not None and (producer := value.producer()) is not None and producer.graph is graph \
                    and _is_default(producer) and producer.op_type in _PASS_THROUGH:
                value = producer.inputs[0]
            producer = None if value is None else value.producer()
            if producer is None or producer.op_type != "Add" or producer not in plan.compute:
                continue
            masks = [v for v in producer.inputs if v is not None and plan.const(v) is None and
                     (r := self._range(v)) is not None and r[1] == 0.0 and (r[0] == 0.0 or r[0] <= MASKED_BELOW)]
            if not masks:
                continue
            del plan.compute[producer]
            plan.keep("attention mask added to a Softmax input")
            while masks:  # the ops computing the mask too: a grid calibrated on unpadded samples is [0, 0]
                producer = masks.pop().producer()
                if producer is None or producer.graph is not graph or producer.op_type in _WEIGHTED | {"MatMul"}:
                    continue  # a mask is computed elementwise from an input: a weighted op's output is an activation
                if producer in plan.compute:
                    del plan.compute[producer]
                    plan.keep("attention mask added to a Softmax input")
                    masks += [v for v in producer.inputs if v is not None and plan.const(v) is None]
                elif producer.op_type in _PASS_THROUGH and producer.inputs[0] is not None:
                    masks.append(producer.inputs[0])

    def _span(self, value: ir.Value) -> float | None:
        """The width of ``value``'s 8-bit grid: its calibrated range widened to contain 0."""
        r = self._range(value)
        return None if r is None else max(r[1], 0.0) - min(r[0], 0.0)

    def _keep_precise_inputs_float(self, graph: ir.Graph, plan: _Plan, rescales: Mapping[ir.Node, float]) -> None:
        """Values that 8-bit rounding cannot carry are computed in float32:

        - the inputs of a cancelling Add/Sub (``CANCELLATION_RATIO``): the quantized ops that
          produce them, back through ``_CARRY_ERROR_OPS`` and scalar rescales, stay float,
          and so does a cancelling Add itself;
        - the input of Sqrt, Reciprocal, Log or Div's divisor whose calibrated range comes
          within ``RELATIVE_STEPS`` steps of 0 (back through data movement and broadcasts)."""
        precise: list[tuple[ir.Value, str]] = []
        for node in graph:
            if not _is_default(node) or len(node.outputs) != 1:
                continue
            if node.op_type in ("Add", "Sub") and len(node.inputs) == 2:
                out_span = self._span(node.outputs[0])
                spans = [self._span(v) for v in node.inputs if v is not None and plan.const(v) is None]
                if out_span is None or len(spans) != 2 or None in spans:
                    continue
                if max(spans) > CANCELLATION_RATIO * out_span:
                    reason = (f"input of a cancelling {node.op_type} (result's range more than "
                              f"{CANCELLATION_RATIO}x narrower than an input's)")
                    if node in plan.compute:
                        del plan.compute[node]
                        plan.keep(f"cancelling {node.op_type} (result's range more than {CANCELLATION_RATIO}x "
                                  "narrower than an input's)")
                    precise += [(v, reason) for v in node.inputs if v is not None]
            elif node.op_type in _RELATIVE_OPS or (node.op_type == "Div" and len(node.inputs) == 2):
                value = node.inputs[-1]
                while value is not None and (producer := value.producer()) is not None and (
                    producer.graph is graph and _is_default(producer)
                    and producer.op_type in _PASS_THROUGH | {"Expand"}
                ):
                    value = producer.inputs[0]
                if value is None or plan.const(value) is not None:
                    continue
                r, span = self._range(value), self._span(value)
                if r is None or not span:
                    continue
                nearest = 0.0 if r[0] <= 0.0 <= r[1] else min(abs(r[0]), abs(r[1]))
                if nearest < RELATIVE_STEPS * span / 255.0:
                    what = "divisor" if node.op_type == "Div" else f"{node.op_type} input"
                    precise.append((value, f"{what} near 0 (within {RELATIVE_STEPS} 8-bit steps)"))
        seen: set[ir.Value] = set()
        while precise:
            value, reason = precise.pop()
            if value in seen:
                continue
            seen.add(value)
            node = value.producer()
            if node is None or node.graph is not graph or not _is_default(node):
                continue
            if node in plan.compute:  # its weights' rounding would be the error too
                del plan.compute[node]
                plan.keep(reason)
            elif node in rescales:
                precise += [(v, reason) for v in node.inputs if v is not None and plan.const(v) is None]
            elif node.op_type in _CARRY_ERROR_OPS and node.inputs and node.inputs[0] is not None:
                precise.append((node.inputs[0], reason))

    def _absorb_activations(self, graph: ir.Graph, plan: _Plan) -> None:
        if self.activation_type != "uint8":
            return
        for node in list(plan.compute):
            if node in plan.float_output:
                continue
            out = node.outputs[0]
            uses = list(out.uses())
            if out.is_graph_output() or len(uses) != 1:
                continue
            act = uses[0].node
            if act.graph is not graph or not _is_default(act) or act.op_type not in ("Relu", "Clip"):
                continue
            if len(act.outputs) != 1 or self._range(act.outputs[0]) is None or uses[0].idx != 0:
                continue
            if act.op_type == "Clip":
                bounds = self._clip_bounds(act, plan)
                if bounds is None or not bounds[0] <= 0.0 <= bounds[1]:
                    continue
            plan.absorbed[node] = act

    @staticmethod
    def _clip_bounds(node: ir.Node, plan: _Plan) -> tuple[float, float] | None:
        if "min" in node.attributes or "max" in node.attributes:  # opset < 11
            return (_float_attr(node, "min", -np.inf), _float_attr(node, "max", np.inf))
        bounds = [-np.inf, np.inf]
        for i in (1, 2):
            if len(node.inputs) > i and node.inputs[i] is not None:
                c = plan.const(node.inputs[i])
                if c is None or c.size != 1:
                    return None
                bounds[i - 1] = float(c.reshape(()))
        return (bounds[0], bounds[1])

    def _plan_shared(self, graph: ir.Graph, plan: _Plan, rescales: Mapping[ir.Node, float]) -> None:
        """Data-movement ops and rescales whose output feeds a quantized op (reverse order:
        chains)."""
        def feeds_quantized(node: ir.Node) -> bool:
            consumers = (u.node for out in node.outputs for u in out.uses())
            return any(c in plan.compute or c in plan.shared or c in plan.rescale for c in consumers)

        for node in reversed(list(graph)):
            if node in rescales:
                if feeds_quantized(node):
                    plan.rescale[node] = rescales[node]
                continue
            if not _is_default(node) or node.op_type not in SHARED_SCALE_OPS or not self._selected(node):
                continue
            if not node.inputs or self._range(node.inputs[0]) is None or plan.const(node.inputs[0]) is not None:
                continue
            if len(node.outputs) != 1 and node.op_type != "Split":
                continue
            if feeds_quantized(node):
                plan.shared.add(node)

    def _assign_params(self, graph: ir.Graph, plan: _Plan) -> None:
        t = self.activation_type
        # an absorbed activation's output is replaced by its producer's output
        alias = {act.outputs[0]: node.outputs[0] for node, act in plan.absorbed.items()}
        concat_ranges = self._concat_ranges(graph, plan, alias)

        def of_range(value: ir.Value) -> Params | None:
            r = concat_ranges.get(value) or self._range(value)
            return None if r is None else activation_params(r[0], r[1], t)

        for node in graph:  # topological: inputs are assigned before shared outputs
            if node in plan.compute:
                data = node.inputs[:1] if node.op_type in _SINGLE_INPUT_OPS else node.inputs
                for v in data:
                    v = alias.get(v, v)  # type: ignore[arg-type]
                    if v is not None and plan.const(v) is None and v not in plan.params:
                        plan.params[v] = of_range(v)  # type: ignore[assignment]
                out = node.outputs[0]
                if node in plan.float_output:
                    continue
                source = plan.absorbed[node].outputs[0] if node in plan.absorbed else out
                plan.params[out] = of_range(source)  # type: ignore[assignment]
            elif node in plan.shared or node in plan.rescale:
                src = _data_input(node, plan)
                src = alias.get(src, src)
                if src not in plan.params:
                    plan.params[src] = of_range(src)  # type: ignore[assignment]
                scale, zero = plan.params[src]
                factor = plan.rescale.get(node, 1.0)
                for out in node.outputs:
                    plan.params[out] = (np.array(scale * factor, np.float32), zero)


    def _concat_ranges(self, graph: ir.Graph, plan: _Plan, alias: Mapping[ir.Value, ir.Value]
                       ) -> dict[ir.Value, tuple[float, float]]:
        """One range for a quantized Concat's output and all its inputs (and, through
        data-movement ops, the tensors those share their scale with): the union of their
        ranges. Inputs with the output's scale and zero point are copied, not requantized
        (onnxruntime's QLinearConcat requantizes every other input)."""
        parent: dict[ir.Value, ir.Value] = {}

        def find(v: ir.Value) -> ir.Value:
            while parent.get(v, v) is not v:
                v = parent[v]
            return v

        def union(a: ir.Value, b: ir.Value) -> None:
            parent.setdefault(a, a), parent.setdefault(b, b)
            parent[find(a)] = find(b)

        for node in graph:
            if node.op_type != "Concat" or node not in plan.compute or node in plan.float_output or node in plan.absorbed:
                continue
            for v in node.inputs:
                while v is not None and plan.const(v) is None:
                    union(node.outputs[0], v)
                    producer = v.producer()
                    if producer is None or producer not in plan.shared:
                        break
                    v = _data_input(producer, plan)
        groups: dict[ir.Value, list[ir.Value]] = {}
        for v in parent:
            groups.setdefault(find(v), []).append(v)
        result: dict[ir.Value, tuple[float, float]] = {}
        for members in groups.values():
            ranges = [self._range(m) for m in members]
            if any(r is None for r in ranges):
                continue
            union_range = (min(r[0] for r in ranges), max(r[1] for r in ranges))  # type: ignore[index]
            for m in members:
                result[m] = union_range
                if m in alias:  # an absorbed activation's output: its producer's takes the range
                    result[alias[m]] = union_range
        return result


def _data_input(node: ir.Node, plan: _Plan) -> ir.Value:
    """The non-constant input of a data-movement op or a rescale."""
    return next(v for v in node.inputs if v is not None and plan.const(v) is None)


# float layers whose constant weights onnxruntime quantizes per tensor when their input is
# a per-tensor DQ output (``_Rewriter._shield_float_layer``)
_WEIGHTED_FLOAT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})


def _float_layer_channels(node: ir.Node, plan: _Plan) -> tuple[int | None, int]:
    """(channels of the data input along its channel axis, that axis) from the weights:
    Conv ``W[M, C/group, ...]``, ConvTranspose ``W[C, M/group, ...]``, Gemm ``A[M, K]``
    (``A[K, M]`` with transA) and ``B[K, N]`` (``B[N, K]`` with transB); None when the
    weights are not constant."""
    w = plan.const(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.ndim < 2:
        return None, 1
    if node.op_type == "Conv":
        return int(w.shape[1]) * _int_attr(node, "group", 1), 1
    if node.op_type == "ConvTranspose":
        return int(w.shape[0]), 1
    k = int(w.shape[1] if _int_attr(node, "transB", 0) else w.shape[0])
    return k, 0 if _int_attr(node, "transA", 0) else 1


def _const_dtype(value: ir.Value) -> np.dtype:
    """The numpy dtype of a quantized tensor (uint8 when unknown, DQ's default)."""
    return value.dtype.numpy() if value.dtype is not None else np.dtype(np.uint8)


def _count(counter: dict[str, int], key: str, n: int = 1) -> None:
    counter[key] = counter.get(key, 0) + n


class _Rewriter:
    """Applies a plan to one graph."""

    def __init__(self, graph: ir.Graph, plan: _Plan, per_channel: bool, activation_type: str,
                 stats: dict[str, Any], names: optcc.ir.ModelNames, per_axis_dq: bool = True) -> None:
        self.graph = graph
        self.per_axis_dq = per_axis_dq
        self.names = names
        self.plan = plan
        self.per_channel = per_channel
        self.act_dtype = np.uint8 if activation_type == "uint8" else np.int8
        self.stats = stats
        self.dq_of: dict[ir.Value, ir.Value] = {}
        self.weight_cache: dict[tuple[int, Any], tuple[ir.Value, np.ndarray]] = {}

    def run(self) -> None:
        plan = self.plan
        float_names = {
            node: (plan.absorbed[node].outputs[0].name if node in plan.absorbed else node.outputs[0].name)
            for node in plan.compute
        }
        for node, act in plan.absorbed.items():
            self._remove_activation(node, act)
            _count(self.stats["absorbed"], act.op_type)
        for value, params in list(plan.params.items()):
            self._insert_pair(value, params)
        for node, kind in plan.compute.items():
            if kind == "weighted":
                self._quantize_weighted(node)
            elif kind == "matmul-const":
                self._quantize_weight_input(node, 1, axis=1 if self._two_d(node.inputs[1]) else None)
            else:
                for i, v in enumerate(node.inputs):
                    if v is not None and self.plan.const(v) is not None:
                        self._quantize_constant_activation(node, i)
            _count(self.stats["quantized"], node.op_type)
            self.stats["layers"].append(layer_id(node))
            self.stats["layer_ops"][layer_id(node)] = node.op_type
            deq = self.dq_of.get(node.outputs[0])
            # the layer's result: its name in the float model, and in this one (DQ output)
            result = deq.name if deq else (node.outputs[0].name if node in plan.float_output else None)
            self.stats["layer_outputs"][layer_id(node)] = [float_names[node], result]
        for node in plan.shared:
            _count(self.stats["quantized"], node.op_type)
        for node in [n for n in self.graph if n in plan.rescale]:
            self._fold_rescale(node)
            _count(self.stats["rescaled"], node.op_type)
        if self.per_axis_dq:
            for node in [n for n in self.graph if n.op_type in _WEIGHTED_FLOAT_OPS and n not in plan.compute]:
                self._shield_float_layer(node)

    def _two_d(self, value: ir.Value) -> bool:
        c = self.plan.const(value)
        return c is not None and c.ndim == 2

    # -------------------------------------------------------------- helpers

    def _initializer(self, base: str, array: np.ndarray) -> ir.Value:
        name = self.names.value(base)
        # an array is wrapped as ir.tensor() would wrap it, without its Protocol isinstance checks
        tensor = ir.Tensor(array, name=name) if isinstance(array, np.ndarray) else ir.tensor(array, name=name)
        value = ir.Value(name=name, const_value=tensor)
        value.dtype = ir.DataType.from_numpy(array.dtype)
        value.shape = ir.Shape(array.shape)
        self.graph.register_initializer(value)
        return value

    def _new_value(self, base: str, like: ir.Value | None, dtype: ir.DataType | None) -> ir.Value:
        value = ir.Value(name=self.names.value(base))
        if like is not None and like.shape is not None:
            value.shape = like.shape.copy() if hasattr(like.shape, "copy") else like.shape
        if dtype is not None:
            value.dtype = dtype
        return value

    def _remove_activation(self, node: ir.Node, act: ir.Node) -> None:
        bounds = [v for v in act.inputs[1:] if v is not None]  # Clip's min/max
        self._replace_activation(node, act)
        for value in bounds:
            self._drop_if_unused(value)

    def _replace_activation(self, node: ir.Node, act: ir.Node) -> None:
        out, y = node.outputs[0], act.outputs[0]
        if y.is_graph_output():
            name, type_, shape = y.name, y.type, y.shape
            y.replace_all_uses_with(out, replace_graph_outputs=True)
            self.graph.remove(act, safe=True)
            y.name = None
            out.name, out.type, out.shape = name, type_ or out.type, shape or out.shape
        else:
            y.replace_all_uses_with(out)
            self.graph.remove(act, safe=True)

    def _fold_rescale(self, node: ir.Node) -> None:
        """Remove ``y = x * c``: ``y``'s DQ (scale ``x_scale * c``) reads ``x``'s 8-bit
        tensor; ``y``'s Q, the node and ``x``'s DQ (when nothing else reads it) go."""
        x_dq = _data_input(node, self.plan)
        y_dq_node = self.dq_of[node.outputs[0]].producer()
        y_q_node = y_dq_node.inputs[0].producer()
        x_q = x_dq.producer().inputs[0]
        y_dq_node.replace_input_with(0, x_q)
        removed = [y_q_node, node]
        if len(x_dq.uses()) == 1 and not x_dq.is_graph_output():  # read by the rescale only
            removed.append(x_dq.producer())
            # that result is gone: the layer's result is now ``y``'s DQ output, the same
            # 8-bit tensor times ``c``, which the float model computes as ``y``
            for names in self.stats["layer_outputs"].values():
                if names[1] == x_dq.name:
                    names[0], names[1] = node.outputs[0].name, y_dq_node.outputs[0].name
        inputs = [v for n in removed for v in n.inputs]
        for n in removed:
            self.graph.remove(n, safe=True)
        for value in inputs:  # the constant, and the scales of a chain's middle pair
            if value is not x_q:
                self._drop_if_unused(value)

    def _shield_float_layer(self, node: ir.Node) -> None:
        """A float Conv/ConvTranspose/Gemm reading a per-tensor DQ output reads the same
        8-bit tensor through a DQ whose scale and zero point are repeated along its channel
        axis: the same values, but onnxruntime no longer quantizes its weights per tensor
        (module doc)."""
        x = node.inputs[0] if node.inputs else None
        dq = None if x is None else x.producer()
        if (not _is_default(node) or dq is None or dq.graph is not self.graph or dq.op_type != "DequantizeLinear"
                or len(dq.inputs) < 2):
            return
        scale, zero = self.plan.const(dq.inputs[1]), self.plan.const(dq.inputs[2]) if len(dq.inputs) > 2 else None
        channels, axis = _float_layer_channels(node, self.plan)
        if scale is None or scale.size != 1 or (zero is not None and zero.size != 1) or channels is None \
                or channels < 2:
            return
        zero = np.zeros((), _const_dtype(dq.inputs[0])) if zero is None else zero
        base = f"{x.name or 'x'}_per_axis"
        s = self._initializer(f"{base}_scale", np.full(channels, scale.reshape(()), scale.dtype))
        z = self._initializer(f"{base}_zero_point", np.full(channels, zero.reshape(()), zero.dtype))
        out = self._new_value(f"{base}_dequantized", x, ir.DataType.FLOAT)
        self.graph.insert_before(node, ir.node("DequantizeLinear", [dq.inputs[0], s, z], attributes={"axis": axis},
                                               outputs=[out]))
        node.replace_input_with(0, out)
        if not list(x.uses()) and not x.is_graph_output():  # the per-tensor DQ fed this layer alone
            for names in self.stats["layer_outputs"].values():  # a layer's result: the same values
                if names[1] == x.name:
                    names[1] = out.name
            inputs = list(dq.inputs[1:])
            self.graph.remove(dq, safe=True)
            for value in inputs:
                self._drop_if_unused(value)
        self.stats["float_layers_shielded"] += 1

    def _insert_pair(self, value: ir.Value, params: Params) -> None:
        """x -> Q -> DQ; every use of x reads the DQ output. A quantized producer's graph
        output becomes the DQ output, under the original name."""
        scale, zero = params
        base = value.name or "x"
        s = self._initializer(f"{base}_scale", scale)
        z = self._initializer(f"{base}_zero_point", zero)
        quant = self._new_value(f"{base}_quantized", value, ir.DataType.from_numpy(zero.dtype))
        deq = self._new_value(f"{base}_dequantized", value, ir.DataType.FLOAT)
        q_node = ir.node("QuantizeLinear", [value, s, z], outputs=[quant])
        dq_node = ir.node("DequantizeLinear", [quant, s, z], outputs=[deq])
        producer = value.producer()
        if producer is not None and producer.graph is self.graph:
            self.graph.insert_after(producer, [q_node, dq_node])
        else:
            first = next(iter(self.graph), None)
            if first is None:
                self.graph.extend([q_node, dq_node])
            else:
                self.graph.insert_before(first, [q_node, dq_node])
        local = producer is not None and producer.graph is self.graph
        for use in list(value.uses()):
            # an outer-scope value is re-read only by this graph's nodes (not by sibling bodies)
            if use.node is not q_node and (local or use.node.graph is self.graph):
                use.node.replace_input_with(use.idx, deq)
        producer_quantized = producer is not None and (
            producer in self.plan.compute or producer in self.plan.shared
        )
        if value.is_graph_output() and producer_quantized:
            name, type_, shape = value.name, value.type, value.shape
            for i, out in enumerate(self.graph.outputs):
                if out is value:
                    self.graph.outputs[i] = deq
            value.name = self.names.value(f"{name}_float")
            deq.name, deq.type, deq.shape = name, type_ or deq.type, shape or deq.shape
        self.dq_of[value] = deq
        self.stats["qdq_pairs"] += 1

    def _dequantize_const(self, node: ir.Node, index: int, q: np.ndarray, scale: np.ndarray,
                          zero: np.ndarray, axis: int | None, base: str) -> None:
        qv = self._initializer(f"{base}_quantized", q)
        sv = self._initializer(f"{base}_scale", scale)
        zv = self._initializer(f"{base}_zero_point", zero)
        out = self._new_value(f"{base}_dequantized", node.inputs[index], ir.DataType.FLOAT)
        attrs = {"axis": axis} if axis is not None and scale.ndim == 1 else {}
        dq = ir.node("DequantizeLinear", [qv, sv, zv], attributes=attrs, outputs=[out])
        self.graph.insert_before(node, dq)
        replaced = node.inputs[index]
        node.replace_input_with(index, out)
        self._drop_if_unused(replaced)

    def _drop_if_unused(self, value: ir.Value | None) -> None:
        """Remove a float initializer nothing reads any more (never a graph input/output)."""
        if value is None or list(value.uses()) or value.is_graph_output() or value.is_graph_input():
            return
        if value.name in self.graph.initializers and self.graph.initializers[value.name] is value:
            del self.graph.initializers[value.name]
            return
        producer = value.producer()
        if (
            producer is not None
            and producer.graph is self.graph
            and producer.op_type == "Constant"
            and _is_default(producer)
        ):
            self.graph.remove(producer, safe=True)

    def _weight_params(self, w: np.ndarray, axis: int | None, floor: np.ndarray | None) -> Params:
        """Symmetric int8 scale of ``w`` (per channel along ``axis``, else per tensor), at
        least ``optcc.quant.MIN_WEIGHT_SCALE`` and ``floor`` (a bias's need: the channels it raises are
        counted in ``bias_scale_raised``). Maxima of float32 values: the order in which the
        bounds apply does not change the result."""
        scale = optcc.quant.symmetric_weight_scale(w, axis)
        if axis is None and floor is not None:
            floor = floor.max()
        if floor is not None:
            self.stats["bias_scale_raised"] += int(np.sum(np.broadcast_to(floor, scale.shape) > scale))
            scale = np.maximum(scale, floor).astype(np.float32)
        return scale, np.zeros(scale.shape, np.int8)

    def _quantize_weight_input(self, node: ir.Node, index: int, axis: int | None,
                               floor: np.ndarray | None = None) -> Params:
        value = node.inputs[index]
        w = self.plan.const(value)
        assert value is not None and w is not None
        if not self.per_channel:
            axis = None
        scale, zero = self._weight_params(w, axis, floor)
        key = (id(value), axis, scale.tobytes())
        cached = self.weight_cache.get(key)
        if cached is not None:
            node.replace_input_with(index, cached[0])
            self._drop_if_unused(value)
            return scale, zero
        q = _quantize(w, scale, zero, axis)
        self._dequantize_const(node, index, q, scale, zero, axis, value.name or "weight")
        self.weight_cache[key] = (node.inputs[index], scale)  # type: ignore[assignment]
        return scale, zero

    def _quantize_weighted(self, node: ir.Node) -> None:
        w = self.plan.const(node.inputs[1])
        assert w is not None
        op = node.op_type
        axis: int | None = 0 if op == "Conv" or _int_attr(node, "transB", 0) else 1
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        x_scale = self.plan.params[self._original_input(node)][0]
        floor = None
        if has_bias:
            b = self.plan.const(node.inputs[2])
            assert b is not None
            # smallest weight scale whose int32 bias fits: |b| / (x_scale * w_scale) <= INT32_MAX
            needed = (np.abs(b.astype(np.float64)) / (float(x_scale) * INT32_MAX)).astype(np.float32)
            if axis is None or not self.per_channel:
                needed = np.array(needed.max() if needed.size else 0.0, np.float32)
            floor = needed
        w_scale, _ = self._quantize_weight_input(node, 1, axis, floor)
        if has_bias:
            b = self.plan.const(node.inputs[2])
            assert b is not None
            bias_scale = (np.float32(x_scale) * w_scale).astype(np.float32)  # [C] or scalar
            per_element = np.broadcast_to(bias_scale, b.shape).astype(np.float64)
            q = np.clip(np.round(b.astype(np.float64) / per_element), -INT32_MAX, INT32_MAX).astype(np.int32)
            zero = np.zeros(bias_scale.shape, np.int32)
            axis = 0 if bias_scale.ndim == 1 else None
            self._dequantize_const(node, 2, q, bias_scale, zero, axis, node.inputs[2].name or "bias")

    def _original_input(self, node: ir.Node) -> ir.Value:
        """The float value whose Q/DQ pair feeds input 0 (the DQ output's source)."""
        current = node.inputs[0]
        for value, deq in self.dq_of.items():
            if deq is current:
                return value
        return current  # type: ignore[return-value]

    def _quantize_constant_activation(self, node: ir.Node, index: int) -> None:
        value = node.inputs[index]
        c = self.plan.const(value)
        assert value is not None and c is not None
        lo, hi = (float(c.min()), float(c.max())) if c.size else (0.0, 0.0)
        scale, zero = activation_params(lo, hi, "uint8" if self.act_dtype == np.uint8 else "int8")
        q = _quantize(c, scale, zero, None)
        self._dequantize_const(node, index, q, scale, zero, None, value.name or "const")
