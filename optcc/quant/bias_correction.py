"""Empirical bias correction of a QDQ model, measured on calibration data.

Quantization shifts the *mean* of a convolution's result, not only its spread: the
rounding error of the weights has a non-zero dot product with the (non-zero-mean)
input, and activation noise upstream comes out of every nonlinearity (Relu, hard-swish,
SiLU) as a bias. Downstream layers add their own shift to the one they receive, so the
error grows with depth. ``correct_biases`` measures, for every quantized Conv and Gemm in
graph order, the per-channel mean of its result in the quantized model and in the float one
over the calibration samples, and subtracts the difference from the layer's bias
(``b[c] -= E[y_q[c]] - E[y[c]]``), each layer measured with the corrections of all the
layers before it in place (sequential: a simultaneous update of all layers diverges on
PP-LCNet, measured). The new bias is written as int32 with the bias's own scale
(``x_scale * w_scale[c]``), so onnxruntime still fuses the node (a layer without a bias
gets one); a channel whose corrected bias would not fit in int32 keeps its old value.

The measurement runs the QDQ model on onnxruntime with its optimizations off (the
simulation of the integer kernels, which agree with it up to rounding), cut into
segments at the corrected layers (``_Segments``): segment ``k`` runs the nodes from layer
``k-1`` (with its corrected bias) up to layer ``k``, plus a probe copy of layer ``k`` fed
its current bias whose per-channel mean (ReduceMean in the graph) is the measurement; the
tensors later segments read are carried between segments per sample. A corrected Conv runs
as its sums (the Conv without its bias) and an Add of the bias fed (``_bias_added``): the
same values, and its probe is a copy of that Add, reading the sums computed once. Every
node runs once per sample (a corrected Gemm twice), so the cost is about (samples) runs of
the graph up to its last corrected layer, not (layers x samples) runs of graph prefixes.
Each node computes what it would in one session (the same kernels on the same inputs),
so the corrections equal those of a layer-by-layer prefix run. The weights' dequantizations
run once, not once per sample and segment, and no weight is copied for a session: the
float model's and the quantized model's weights are handed to onnxruntime in place
(``optcc.runtime.shared_weights``), the dequantized ones fed as inputs.

Measured with the benchmark's data (8 calibration, 8 different held-out samples; worst
output SQNR; docs/int8.md): nudenet-320n 30.3 -> 30.6 dB; on whole text lines PP-OCRv4 rec
9.9 -> 13.9 dB (CTC greedy decode equal to float32's on 7/8 lines instead of 4/8) and
PP-OCR cls 22.5 -> 25.2 dB; PP-OCRv4 det on photos -2.8 -> 1.5 dB; on random windows of
text rec 13.1 -> 13.1 (CTC 1/8 -> 3/8) and cls 16.9 -> 16.4 dB. cls is within its noise:
corrected on 8 samples instead of 4, it gives 19.4 (lines) and 13.8 dB (crops).

``weight_error_shifts`` serves weight-only quantization (activations float): the mean
output error ``E[conv(x, W - W_hat)]`` of each convolution on the float model's own
inputs, measured by probe copies of the layers reading ``W - W_hat``; the caller adds it
to the float bias.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from optcc import ir as oir
from optcc.progress import Progress
from optcc.quant.calibration import channel_mean_nodes
from optcc.runtime.session import feedable, session_options
from optcc.runtime.shared_weights import light_proto, release_memory, weighted_session

__all__ = ["FloatMeans", "SegmentMeans", "correct_biases", "float_result_ranks", "weight_error_shifts"]

Feeds = Mapping[str, np.ndarray]
_INT32_MAX = 2**31 - 1
DEQUANTIZE_AHEAD_BYTES = 16 << 20  # dequantized weights made ahead of the segment that reads them


@dataclass
class _Layer:
    """A quantized Conv or Gemm: its node, result name (here and in the float model), rank, and
    its current float bias."""

    node: ir.Node
    result: str
    reference: str
    rank: int
    bias_scale: np.ndarray  # float64 [C]: x_scale * w_scale[c], the int32 bias step
    bias: np.ndarray  # float64 [C]: the dequantized int32 bias (zeros when it has none)
    bias_q: ir.Value | None  # the int32 initializer behind the bias's DequantizeLinear


def _dq_constants(value: ir.Value | None) -> tuple[np.ndarray, np.ndarray, ir.Value] | None:
    """(quantized array, scale, the quantized initializer) of ``value = DQ(const)``."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    q, scale = (oir.as_numpy(v) if v is not None else None for v in node.inputs[:2])
    if q is None or scale is None:
        return None
    return q, scale, node.inputs[0]


def _scale_of_dq(value: ir.Value) -> np.ndarray | None:
    node = value.producer()
    if node is None or node.op_type != "DequantizeLinear" or len(node.inputs) < 2:
        return None
    return oir.as_numpy(node.inputs[1]) if node.inputs[1] is not None else None


def _corrected_layers(model: ir.Model, reference_ops: Mapping[str, str]) -> list[_Layer]:
    """The Convs and Gemms of the main graph whose inputs and weights are dequantized 8-bit
    tensors (and whose bias, when present, is a dequantized int32 constant), with a result
    the float model also has, in graph order."""
    layers = []
    for node in model.graph:
        if node.op_type not in ("Conv", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        weight = _dq_constants(node.inputs[1])
        x_scale = _scale_of_dq(node.inputs[0]) if node.inputs[0] is not None else None
        result = node.outputs[0].name
        reference = _reference_name(node.outputs[0], node.op_type, reference_ops)
        if weight is None or x_scale is None or x_scale.size != 1 or reference is None:
            continue
        w_q, w_scale, _ = weight
        gemm = node.op_type == "Gemm"
        trans_b = gemm and node.attributes.get_int("transB", 0)
        channels = w_q.shape[1] if gemm and not trans_b else w_q.shape[0]
        rank = 2 if gemm else w_q.ndim  # the result's rank
        bias_input = node.inputs[2] if len(node.inputs) > 2 else None
        if bias_input is not None:
            bias = _dq_constants(bias_input)
            if bias is None or bias[0].dtype != np.int32 or len(bias_input.uses()) != 1:
                continue
            b_q, b_scale, b_value = bias
            if len(b_value.uses()) != 1 or b_q.shape != (channels,):
                continue
            scale = np.broadcast_to(b_scale.astype(np.float64), (channels,)).copy()
            float_bias = b_q.astype(np.float64) * scale
        else:
            scale = np.broadcast_to(float(x_scale.reshape(())) * w_scale.astype(np.float64), (channels,)).copy()
            float_bias, b_value = np.zeros(channels), None
        layers.append(_Layer(node, result, reference, rank, scale, float_bias, b_value))
    return layers


def float_result_ranks(model: ir.Model) -> dict[str, int]:
    """The results of float ``model`` whose means ``FloatMeans`` may be asked for, with the
    rank ``_corrected_layers`` gives the quantized layer: every main-graph Conv's with a
    constant weight (its weight's rank) and every Gemm's (2)."""
    ranks: dict[str, int] = {}
    for node in model.graph:
        if node.op_type not in ("Conv", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2 \
                or not node.outputs[0].name:
            continue
        if node.op_type == "Gemm":
            ranks[node.outputs[0].name] = 2
        elif node.inputs[1] is not None and (weight := oir.const_tensor(node.inputs[1])) is not None:
            ranks[node.outputs[0].name] = len(weight.shape)  # a convolution's result has its weight's rank
    return ranks


def _reference_name(value: ir.Value, op_type: str, reference_ops: Mapping[str, str]) -> str | None:
    """The float model's name for a layer's result: its own, or, for a graph output that the
    quantization moved to the DQ after it (the conv's result renamed), the DQ's; either
    only when the float model computes it with the same op (a Relu absorbed into the
    output's quantization leaves the graph output a Relu's result, not the conv's)."""
    if reference_ops.get(value.name or "") == op_type:
        return value.name
    uses = list(value.uses())
    if len(uses) == 1 and uses[0].node.op_type == "QuantizeLinear":
        for q_use in uses[0].node.outputs[0].uses():
            out = q_use.node.outputs[0]
            if (q_use.node.op_type == "DequantizeLinear" and out.is_graph_output()
                    and reference_ops.get(out.name or "") == op_type):
                return out.name
    return None


def _session(proto: onnx.ModelProto, threads: int | None, weights: Mapping[str, np.ndarray] | None = None
             ) -> ort.InferenceSession:
    """A session of ``proto`` as written; ``weights``: the arrays behind its placeholder
    initializers (``shared_weights.weighted_session``: read in place, the kernels and
    results of a session of the full proto). ``proto`` is changed."""
    # no arena: the float simulation's activations go back to the system as they are
    # freed, the reductions placed right after their producers run early (priority order)
    options = session_options(arena=False, priority_order=True, threads=threads)
    if weights:
        return weighted_session(proto, weights, options)
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _with_means(model: ir.Model, layers: Sequence[_Layer], prefix: str, *, reference: bool = False
                ) -> tuple[onnx.ModelProto, dict[str, np.ndarray], list[str]]:
    """The model with the per-channel means of the layers' results as its only outputs: its
    proto with the large weights as placeholders, their arrays (``light_proto``), and the
    outputs' names."""
    proto, weights = light_proto(model)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    names = [layer.reference if reference else layer.result for layer in layers]
    nodes, outputs = channel_mean_nodes(names, [layer.rank for layer in layers], opset, prefix)
    # each reduction right after the node it reads, so the tensor can be freed early
    after: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        if node.op_type == "ReduceMean":
            after.setdefault(node.input[0], []).append(node)
    _insert(proto, [n for n in nodes if n.op_type == "Constant"], after, outputs)
    return proto, weights, outputs


def _insert(proto: onnx.ModelProto, first: Sequence[onnx.NodeProto],
            after: dict[str, list[onnx.NodeProto]], outputs: Sequence[str]) -> None:
    """Add ``first`` at the start of ``proto``'s graph and each list of ``after`` right
    after the node that makes the value it is keyed by (what is left, at the end), and
    make ``outputs`` the graph's only outputs."""
    ordered = list(first)
    for node in proto.graph.node:
        ordered.append(node)
        ordered.extend(n for o in node.output for n in after.pop(o, ()))
    ordered.extend(n for rest in after.values() for n in rest)  # graph inputs' (none: convs)
    del proto.graph.node[:]
    proto.graph.node.extend(ordered)
    del proto.graph.output[:]
    proto.graph.output.extend(onnx.ValueInfoProto(name=o) for o in outputs)


class FloatMeans:
    """The float model's per-channel means of layer results over the samples, each result
    measured once and kept: every model quantized from ``reference`` is corrected towards
    the same means, so the candidates of one quantization (the driver's fallback) share
    one measurement. A result's mean does not depend on which other results a session
    reduces with it (the same kernels on the same inputs, graph optimizations off).
    ``taken``: per sample of ``samples``, in order, float32 channel means some session of
    ``reference`` with those options already computed on it (calibration's:
    ``optcc.quant.calibration.ChannelMeans``, of ``float_result_ranks``' results): those
    found for every sample are averaged here as a measurement averages its own, and not
    measured again."""

    def __init__(self, reference: ir.Model, samples: Sequence[Feeds], threads: int | None = None,
                 taken: Sequence[Mapping[str, np.ndarray]] = ()) -> None:
        self.reference, self.samples, self.threads = reference, samples, threads
        self.means: dict[str, np.ndarray] = {}  # float64 [C] by the float model's name of the result
        if samples and len(taken) == len(samples):
            names = [name for name in taken[0] if all(name in means for means in taken[1:])]
            self.means.update(zip(names, _mean_of(([means[name] for name in names] for means in taken),
                                                  len(names), len(samples))))

    def of(self, layers: Sequence[_Layer]) -> list[np.ndarray]:
        """The float means of the layers' results (``_Layer.reference``), in order; those not
        measured yet are measured in one session."""
        missing = list({layer.reference: layer for layer in layers if layer.reference not in self.means}.values())
        if missing:
            prefix = oir.unique_prefix(oir.value_names(self.reference), "optcc_bias_correction")
            proto, weights, outputs = _with_means(self.reference, missing, prefix, reference=True)
            measured = _average(_session(proto, self.threads, weights), outputs, self.samples)
            del proto, weights
            release_memory()
            self.means.update(zip((layer.reference for layer in missing), measured))
        return [self.means[layer.reference] for layer in layers]


class SegmentMeans:
    """The channel means the segments of ``correct_biases`` measured (``_Segments``), each by
    a digest of its computation: every node upstream of it (op, domain, opset, attributes)
    down to the samples, the initializers' and the fed biases' contents. Models quantized
    from one float model share them (the driver's fallback candidates): where a candidate
    computes a layer's mean as a model measured before did (upstream of its first float
    layer, its biases corrected alike), it takes that mean instead of running the segment;
    the segments so skipped run only when a later one must, then as one segment without
    probes, for the tensors it reads. The same kernels on the same inputs give the same
    means, so the biases written are those of a measurement of its own. Bound to the
    samples of the first ``correct_biases`` call that uses it."""

    def __init__(self) -> None:
        self.samples: Sequence[Feeds] | None = None
        self.means: dict[bytes, np.ndarray] = {}  # by the digest of the mean's computation (``_Segments``)

    def bind(self, samples: Sequence[Feeds]) -> None:
        """Use these means for ``samples`` only (the same arrays, in order)."""
        if self.samples is None:
            self.samples = list(samples)
        elif len(self.samples) != len(samples) or any(
                a.keys() != b.keys() or any(a[k] is not b[k] for k in a) for a, b in zip(self.samples, samples)):
            raise ValueError("SegmentMeans measured on other samples")


def correct_biases(reference: ir.Model, quantized: ir.Model, samples: Sequence[Feeds], *,
                   threads: int | None = None, progress: bool = False,
                   means: FloatMeans | None = None, measured: SegmentMeans | None = None) -> dict[str, Any]:
    """Correct the biases of ``quantized``'s Convs and Gemms in place (see the module docstring);
    ``reference`` is the float model it was quantized from, ``samples`` calibration feed
    dicts. ``means``: the float means of ``reference`` on ``samples`` (``FloatMeans``), kept
    across calls on models quantized from it; None measures them here. ``measured``: the
    segments' means kept across such calls (``SegmentMeans``), taken where a segment and
    all before it are the same. Returns stats:
    layers corrected, channels left uncorrected (int32 overflow), the mean absolute error
    of the layers' channel means before (each measured before its own correction, the
    layers before it corrected) and after, samples, seconds."""
    start = time.perf_counter()
    reference_ops = {v.name: node.op_type for node in reference.graph for v in node.outputs if v.name}
    layers = _corrected_layers(quantized, reference_ops)
    if not layers or not samples:
        return {"layers": 0}
    prefix = oir.unique_prefix(oir.value_names(quantized), "optcc_bias_correction")
    target = (means or FloatMeans(reference, samples, threads)).of(layers)

    # the quantized model with each corrected layer's bias as a float graph input
    proto, weights = light_proto(quantized)
    bias_inputs = [f"{prefix}_bias_{i}" for i in range(len(layers))]
    by_result = {node.output[0]: node for node in proto.graph.node if node.output}
    for layer, name in zip(layers, bias_inputs):
        node = by_result[layer.result]
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
    shapes = _bias_added(proto, layers, bias_inputs, prefix)
    if measured is not None:
        measured.bind(samples)
    segments = _Segments(proto, weights, [layer.result for layer in layers], [layer.rank for layer in layers],
                         bias_inputs, prefix, samples, threads, measured)
    del proto, weights
    biases = [layer.bias.copy() for layer in layers]  # float64; fed as float32
    fed = {name: b.astype(np.float32).reshape(shape) for name, b, shape in zip(bias_inputs, biases, shapes)}
    quantized_bias: list[np.ndarray] = [np.zeros(0, np.int32)] * len(layers)
    residual: list[np.ndarray] = [np.zeros(0)] * len(layers)
    before, overflow = 0.0, 0
    with Progress("bias correction", len(layers), enabled=progress) as bar:
        for k, layer in enumerate(layers):
            got, corrected = segments.run(k, fed)  # layer k-1 corrected, layer k as it is
            if k:
                residual[k - 1] = corrected
            error = got - target[k]
            before += float(np.abs(error).mean()) / len(layers)
            # rounded to the int32 grid at once, so the layers after it correct for the
            # rounding too (fed unrounded, the written model drifted back to 70% of the
            # uncorrected error at depth on PP-OCR cls)
            q = np.round((biases[k] - error) / layer.bias_scale)
            fits = np.abs(q) <= _INT32_MAX
            overflow += int(np.sum(~fits))
            quantized_bias[k] = np.where(fits, q, np.round(layer.bias / layer.bias_scale)).astype(np.int32)
            biases[k] = quantized_bias[k] * layer.bias_scale
            fed[bias_inputs[k]] = biases[k].astype(np.float32).reshape(shapes[k])
            bar.advance()
        _, residual[-1] = segments.run(len(layers), fed)  # the last layer, corrected
    del segments
    release_memory()
    # the residual, for the report: each layer's mean with the final (int32-rounded) biases
    after = float(np.mean([np.abs(r - t).mean() for r, t in zip(residual, target)]))
    taken = oir.value_names(quantized)
    for layer, q in zip(layers, quantized_bias):
        _write_bias(quantized, layer, q, taken)
    return {
        "layers": len(layers),
        "overflow_channels": overflow,
        "mean_error_before": before,
        "mean_error_after": after,
        "samples": len(samples),
        "seconds": round(time.perf_counter() - start, 3),
    }


def _bias_added(proto: onnx.ModelProto, layers: Sequence[_Layer], bias_inputs: Sequence[str], prefix: str
                ) -> list[tuple[int, ...]]:
    """Rewrite, in ``proto``, each corrected Conv (its bias the graph input ``bias_inputs[i]``)
    as the Conv without its bias, then an Add of that input to its result; the shape each
    bias input is fed in (``[C, 1, ...]`` where an Add broadcasts it over a Conv's result,
    ``[C]`` for a Gemm, left as it is). Exact: onnxruntime's CPU Conv adds the bias to each
    finished sum, one float32 addition per element, which is what the Add computes, so every
    value is the one the Conv with its bias computes. The layer's probe (``_Segments``) is
    then a copy of the Add, reading the sums its segment computed once: measuring a layer
    costs an addition, not a second convolution. A Gemm accumulates its products onto its
    bias (``beta``): not split, its probe is a copy of the whole node."""
    split = {layer.result: i for i, layer in enumerate(layers) if layer.node.op_type == "Conv"}
    nodes: list[onnx.NodeProto] = []
    for node in proto.graph.node:
        i = split.get(node.output[0]) if node.op_type == "Conv" and node.output else None
        if i is None:
            nodes.append(node)
            continue
        sums = onnx.NodeProto()
        sums.CopyFrom(node)
        del sums.input[2:]
        sums.output[0] = f"{prefix}_sums_{i}"
        nodes += [sums, onnx.helper.make_node("Add", [sums.output[0], bias_inputs[i]], [node.output[0]],
                                              name=f"{prefix}_bias_add_{i}")]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return [(-1, *[1] * (layer.rank - 2)) if layer.result in split else (-1,) for layer in layers]


def _average(session: ort.InferenceSession, fetch: Sequence[str], samples: Sequence[Feeds],
             extra: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """The fetched outputs averaged over the samples (float64), ``extra`` fed with each."""
    wanted = feedable(session)
    return _mean_of((session.run(list(fetch), {k: v for k, v in {**feeds, **(extra or {})}.items() if k in wanted})
                     for feeds in samples), len(fetch), len(samples))


def _mean_of(rows: Iterable[Sequence[Any]], width: int, count: int) -> list:
    """The mean of ``count`` rows of ``width`` arrays each, array by array (float64): each
    row's array divided by ``count`` and added in row order, the same sums whoever ran them."""
    total: list = [0.0] * width
    for values in rows:
        total = [t + np.asarray(v, np.float64) / count for t, v in zip(total, values)]
    return total


def _reads(node: onnx.NodeProto) -> set[str]:
    """The names ``node`` reads: its inputs and every input of a node in its subgraphs (a
    superset of its outer-scope reads; names local to a subgraph are never carried)."""
    names = {x for x in node.input if x}
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        for graph in graphs:
            for inner in graph.node:
                names |= _reads(inner)
    return names


def _is_constant_dequantization(node: onnx.NodeProto, initializers: Mapping[str, onnx.TensorProto]) -> bool:
    """A DequantizeLinear of initializers only (a weight's): its result is the same on every
    sample."""
    return (node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and len(node.output) == 1
            and all(name in initializers for name in node.input if name))


@dataclass
class _Segment:
    """A segment to run: its model, the tensors it carries on, its mean outputs, the
    dequantized weights it is fed and the node position it ends at."""

    model: onnx.ModelProto | None
    carried: list[str]
    means: list[str]
    constants: list[str]
    end: int


class _Segments:
    """The bias-fed QDQ model cut before each corrected layer, run segment by segment.

    Segment ``k`` (``0 <= k <= L``, ``L`` layers at node positions ``p_0 < ... < p_{L-1}``)
    runs the nodes ``[p_{k-1}, p_k)`` (from 0 for the first; only layer ``L-1`` for the
    last), then a probe copy of layer ``k`` (``k < L``). Its outputs: the per-channel mean
    of layer ``k-1``'s result (with the bias fed now: its corrected one) and of the probe
    (layer ``k``'s current bias), and the tensors it produced that a node at or after
    ``p_k`` reads, which later segments are fed per sample (graph inputs are carried the
    same way). What is carried per sample is the live set at one cut, never all
    activations; a carried array holds its own buffer alone: the segments' sessions have no
    memory arena, so an output of one is an allocation of its own, not a view into the
    buffers of the session that made it (no copy is needed to free them). A segment's session is
    built when it runs, its inputs typed from the carried arrays.

    The DequantizeLinear nodes of initializers (the weights') do not depend on the
    sample: each is run once by onnxruntime (the same kernel on the same inputs as in
    one session, hence the same float32 values), when the first segment that reads it
    is built, and its result is kept while a later node reads it; segments are fed the
    results as graph inputs (read in place, never carried per sample nor dequantized per
    sample). Fed, not initializers: a Gemm or MatMul reads them as it reads a computed
    tensor (an initializer would be pre-packed, which changes its results). The
    initializers are handed over in place (``weights``: the arrays behind ``proto``'s
    placeholders, ``light_proto``; ``weighted_session``: pre-packed as in a session of
    the full proto)."""

    def __init__(self, proto: onnx.ModelProto, weights: Mapping[str, np.ndarray], results: Sequence[str],
                 ranks: Sequence[int], bias_inputs: Sequence[str], prefix: str, samples: Sequence[Feeds],
                 threads: int | None, measured: SegmentMeans | None = None) -> None:
        self.proto, self.weights, self.prefix, self.threads = proto, weights, prefix, threads
        self.measured = measured
        self.pending: list[int] = []  # segments whose means were known: not run yet
        # the digest of every value identified so far (``_identified``)
        self.ids: dict[str, bytes] = {}
        self.bias_names = frozenset(bias_inputs)
        self.opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in proto.opset_import}
        self.bias_inputs, self.ranks = list(bias_inputs), list(ranks)
        # from IR 4 on, an initializer that is a graph input too is a default the samples may
        # replace: read per sample like any graph input (``states``), never a constant of the
        # segments; below IR 4 it is a constant (onnxruntime does not let a caller feed it)
        overridable = {v.name for v in proto.graph.input} if proto.ir_version >= 4 else set()
        self.initializers = {t.name: t for t in proto.graph.initializer if t.name not in overridable}
        self.defaults = {t.name: self._array(t) for t in proto.graph.initializer if t.name in overridable}
        nodes = list(proto.graph.node)
        # sample-independent dequantizations, by result; the graph without them
        self.constant_nodes = {n.output[0]: n for n in nodes if _is_constant_dequantization(n, self.initializers)}
        self.nodes = [n for n in nodes if not (n.output and n.output[0] in self.constant_nodes)]
        self.reads = [_reads(n) for n in self.nodes]
        producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.positions = [producer[r] for r in results]
        fed = [v.name for v in proto.graph.input if v.name not in self.initializers]
        self.position_of = {**{name: -1 for name in fed}, **producer}  # -1: a graph input
        self.last_read: dict[str, int] = {}
        for i, names in enumerate(self.reads):
            for name in names:
                self.last_read[name] = i
        self.states = [{**{k: np.asarray(v) for k, v in self.defaults.items() if k in self.last_read},
                        **{k: np.asarray(v) for k, v in feeds.items() if k in self.position_of}} for feeds in samples]
        self.constants: dict[str, np.ndarray] = {}  # dequantized weights a node from the current segment on reads
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)

    def _bounds(self, k: int) -> tuple[int, int]:
        start = 0 if k == 0 else self.positions[k - 1]
        end = self.positions[k] if k < len(self.positions) else self.positions[-1] + 1
        return start, end

    def _graph(self, name: str, nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
               outputs: Sequence[str], initializers: Sequence[str]) -> onnx.ModelProto:
        """A model of ``nodes`` reading ``initializers`` (of the proto, placeholders for
        the large ones)."""
        model = onnx.ModelProto()
        model.ir_version = self.proto.ir_version
        model.opset_import.extend(self.proto.opset_import)
        model.functions.extend(self.proto.functions)
        model.graph.CopyFrom(onnx.helper.make_graph(
            list(nodes), name, list(inputs), [onnx.ValueInfoProto(name=n) for n in outputs],
            initializer=[self.initializers[n] for n in initializers]))
        return model

    def _session(self, model: onnx.ModelProto) -> ort.InferenceSession:
        return _session(model, self.threads, self.weights)

    def _constants_of(self, k: int) -> set[str]:
        """The dequantized weights segment ``k`` reads (its nodes' and its probe's)."""
        start, end = self._bounds(k)
        reads = set().union(*self.reads[start:end])
        if k < len(self.positions):
            reads |= self.reads[self.positions[k]]
        return {n for n in reads if n in self.constant_nodes}

    def _dequantize(self, k: int) -> None:
        """Run the dequantizations segment ``k`` reads and has not kept yet (once, no sample)
        and keep them; with them those of the segments after it, while they come to at
        most ``DEQUANTIZE_AHEAD_BYTES`` (fewer sessions on a model of many small layers)."""
        missing = sorted(n for n in self._constants_of(k) if n not in self.constants)
        if not missing:
            return
        size = sum(self._nbytes(n) for n in missing)
        for later in range(k + 1, len(self.positions) + 1):
            more = sorted(n for n in self._constants_of(later) if n not in self.constants and n not in missing)
            size += sum(self._nbytes(n) for n in more)
            if size > DEQUANTIZE_AHEAD_BYTES:
                break
            missing += more
        nodes = [self.constant_nodes[n] for n in missing]
        reads = sorted(set().union(*(_reads(n) for n in nodes)))
        model = self._graph("dequantize", nodes, [], missing, reads)
        session = self._session(model)
        # kept without a copy: this session's buffers are these results only
        self.constants.update(zip(missing, (np.asarray(v) for v in session.run(missing, {}))))

    def _nbytes(self, name: str) -> int:
        """The bytes of a dequantization's float32 result (its quantized input's shape)."""
        return 4 * int(np.prod(self.initializers[self.constant_nodes[name].input[0]].dims, dtype=np.int64))

    def _nodes(self, k: int, last: int | None = None) -> tuple[list[onnx.NodeProto], list[str], set[str], int]:
        """Segment ``k`` (with ``last``: segments ``k`` to ``last`` as one, without probes or
        means): its nodes, its mean outputs, the names it reads and where it ends."""
        start, end = self._bounds(k)[0], self._bounds(k if last is None else last)[1]
        nodes = list(self.nodes[start:end])
        reads: set[str] = set().union(*self.reads[start:end])
        means: list[str] = []
        if last is not None:
            return nodes, means, reads, end
        if k:  # the previous layer's result, its bias corrected
            made, outs = channel_mean_nodes([self.nodes[start].output[0]], [self.ranks[k - 1]], self.opset,
                                            f"{self.prefix}_r{k}")
            nodes += made
            means += outs
        if k < len(self.positions):  # the probe: layer k as it is now
            probe = onnx.NodeProto()
            probe.CopyFrom(self.nodes[self.positions[k]])
            probe.name = f"{self.prefix}_probe_{k}"
            del probe.output[:]
            probe.output.append(f"{self.prefix}_probe_{k}")
            reads |= _reads(probe)
            made, outs = channel_mean_nodes([probe.output[0]], [self.ranks[k]], self.opset, f"{self.prefix}_p{k}")
            nodes += [probe, *made]
            means += outs
        return nodes, means, reads, end

    def _model(self, k: int, last: int | None = None) -> _Segment:
        """Segment ``k`` (``last``: see ``_nodes``) to run."""
        nodes, means, reads, end = self._nodes(k, last)
        produced = {o for n in nodes for o in n.output if o}
        constants = sorted(n for n in reads if n in self.constant_nodes)
        for j in range(k, k + 1 if last is None else last + 1):
            self._dequantize(j)
        carried = sorted(n for n in produced if self.last_read.get(n, -1) >= end)
        outside = sorted(n for n in reads if n not in produced and n in self.position_of)
        inputs = [onnx.helper.make_tensor_value_info(
            n, onnx.helper.np_dtype_to_tensor_dtype(self.states[0][n].dtype), None) for n in outside]
        inputs += [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                   for n in self.bias_inputs if n in reads]
        inputs += [onnx.helper.make_tensor_value_info(
            n, onnx.helper.np_dtype_to_tensor_dtype(self.constants[n].dtype), None) for n in constants]
        model = self._graph(f"segment_{k}", nodes, inputs, carried + means,
                            sorted(n for n in reads if n in self.initializers))
        return _Segment(model, carried, means, constants, end)

    def _identified(self, nodes: Sequence[onnx.NodeProto], biases: Mapping[str, np.ndarray]) -> None:
        """Give every output of ``nodes`` (in order) a digest of what computes it: the node (op,
        domain, attributes; not its names) and its inputs' digests, those of the values it
        reads in its subgraphs too. A value from a graph input is named by that input (the
        samples are the same), an initializer's or a bias's by its contents (``biases``: as
        fed now), a dequantized weight's by its DequantizeLinear."""
        for node in nodes:
            domain = node.domain or ""
            digest = hashlib.sha256(f"{domain}:{self.opsets.get(domain)}:{node.op_type}".encode())
            for attribute in node.attribute:
                digest.update(attribute.SerializeToString(deterministic=True))
            for name in node.input:
                digest.update(self._identity(name, biases))
            for name in sorted(_reads(node) - set(node.input)):  # read inside its subgraphs
                digest.update(name.encode() + self._identity(name, biases))
            for i, name in enumerate(node.output):
                if name:
                    self.ids[name] = hashlib.sha256(digest.digest() + str(i).encode()).digest()

    def _array(self, init: onnx.TensorProto) -> np.ndarray:
        """An initializer's array: its weight held apart (``light_proto``), else its data."""
        return self.weights[init.name] if init.name in self.weights else onnx.numpy_helper.to_array(init)

    def _identity(self, name: str, biases: Mapping[str, np.ndarray]) -> bytes:
        """The digest of the value ``name`` (``_identified``)."""
        if not name:
            return b"-"
        if name in self.bias_names:  # never kept: a bias is fed corrected later
            return hashlib.sha256(b"bias" + np.ascontiguousarray(biases[name], np.float32).tobytes()).digest()
        if name not in self.ids:
            if name in self.constant_nodes:
                self._identified([self.constant_nodes[name]], biases)
            elif name in self.initializers:
                init = self.initializers[name]
                array = np.ascontiguousarray(self._array(init))
                self.ids[name] = hashlib.sha256(
                    f"{init.data_type}:{array.dtype.str}:{array.shape}".encode() + array.tobytes()).digest()
            else:  # a graph input (with its default, if any), or a name only a subgraph defines
                digest = hashlib.sha256(b"input:" + name.encode())
                if name in self.defaults:
                    digest.update(np.ascontiguousarray(self.defaults[name]).tobytes())
                self.ids[name] = digest.digest()
        return self.ids[name]

    def run(self, k: int, biases: Mapping[str, np.ndarray]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Run segment ``k`` on every sample, carrying its tensors on; the channel means over
        the samples (float64) of the probe (layer ``k``) and of layer ``k-1`` (None where
        there is none). Means ``measured`` before for the same computation (``_identified``)
        are taken as they are, nothing run; the segments so skipped run (as one) only when
        a later one must run."""
        nodes, means, _, _ = self._nodes(k)
        keys: list[bytes] = []
        if self.measured is not None:
            self._identified(nodes, biases)
            keys = [self.ids[name] for name in means]
            if all(key in self.measured.means for key in keys):
                self.pending.append(k)
                return self._probe_and_previous(k, [self.measured.means[key] for key in keys])
        if self.pending:  # the tensors this segment reads, from the segments skipped
            self._carry(self._model(self.pending[0], self.pending[-1]), biases)
            self.pending = []
        totals = self._carry(self._model(k), biases)
        if self.measured is not None:
            self.measured.means.update(zip(keys, totals))
        return self._probe_and_previous(k, totals)

    def _probe_and_previous(self, k: int, totals: Sequence[np.ndarray]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Segment ``k``'s means (``_nodes``' order: layer ``k-1``'s first, the probe's last)
        as ``run`` returns them."""
        return (totals[-1] if k < len(self.positions) else None), (totals[0] if k else None)

    def _carry(self, segment: _Segment, biases: Mapping[str, np.ndarray]) -> list:
        """Run ``segment`` on every sample, carrying its tensors on; its means averaged over
        the samples (float64)."""
        session = self._session(segment.model)
        segment.model = None  # onnxruntime holds what it needs
        carried, means, end = segment.carried, segment.means, segment.end
        fixed = {**biases, **{n: self.constants[n] for n in segment.constants}}
        wanted = feedable(session)
        totals: list = [0.0] * len(means)
        for state in self.states:
            values = session.run(carried + means, {n: fixed[n] if n in fixed else state[n] for n in wanted})
            # no copy: the session has no arena (``_session``), each output is its own allocation
            state.update(zip(carried, (np.asarray(v) for v in values[:len(carried)])))
            for name in [n for n in state if self.last_read.get(n, -1) < end]:
                del state[name]  # no node from here on reads it
            totals = [t + np.asarray(v, np.float64) / len(self.states) for t, v in zip(totals, values[len(carried):])]
            del values
        del session
        for name in [n for n in self.constants if self.last_read.get(n, -1) < end]:
            del self.constants[name]  # no node from here on reads it
        return totals


def _write_bias(model: ir.Model, layer: _Layer, q: np.ndarray, taken: set[str]) -> None:
    """Store ``q`` as the layer's int32 bias (a new DequantizeLinear when it had none)."""
    if layer.bias_q is not None:
        layer.bias_q.const_value = ir.tensor(q, name=layer.bias_q.name)
        return
    if not np.any(q):
        return
    graph, node = model.graph, layer.node
    base = oir.unique_value_name(None, f"{node.outputs[0].name}_bias", taken)
    values = []
    for suffix, array in (("quantized", q), ("scale", layer.bias_scale.astype(np.float32)),
                          ("zero_point", np.zeros(len(q), np.int32))):
        name = f"{base}_{suffix}"
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.dtype, value.shape = ir.DataType.from_numpy(array.dtype), ir.Shape(array.shape)
        graph.register_initializer(value)
        values.append(value)
    out = ir.Value(name=f"{base}_dequantized")
    out.dtype, out.shape = ir.DataType.FLOAT, ir.Shape([len(q)])
    graph.insert_before(node, ir.node("DequantizeLinear", values, attributes={"axis": 0}, outputs=[out]))
    node.resize_inputs(3)
    node.replace_input_with(2, out)


def weight_error_shifts(reference: ir.Model, deltas: Sequence[tuple[ir.Node, np.ndarray]],
                        samples: Sequence[Feeds], *, threads: int | None = None) -> list[np.ndarray]:
    """The mean output error that replacing a convolution's weight adds, per output channel.

    ``deltas``: (Conv, ConvTranspose or com.microsoft FusedConv node of ``reference``'s main
    graph, ``dW = W - W_hat`` with the weight's shape; a FusedConv's probe is its Conv). For each, ``E[op(x, W) - op(x, W_hat)] = E[op(x, dW)]``
    (the op is linear in its weight; the bias cancels), the mean over the samples and every
    axis of the result but 1 (channels), ``x`` being the node's input in ``reference`` (the
    float model: weight-only quantization leaves activations float, so the error each layer
    adds is measured on the inputs it was trained for, independently of the layers before
    it). Computed by onnxruntime: a probe copy of each node reading ``x`` and ``dW`` (same
    attributes, no bias) followed by a per-channel ReduceMean (``channel_mean_nodes``), the model's
    weights handed to onnxruntime in place (``light_proto``), in float32,
    one sample at a time, averaged over the samples in float64 (``_average``). Adding the
    returned shift to the node's bias makes the quantized layer's mean output equal the
    float one's on the samples (up to that float32 rounding).

    Preconditions: each node's output and input 0 are named, ``dW`` is float32-representable;
    ``reference`` is not modified. Returns float64 arrays ``[C_out]`` in the order given."""
    if not deltas:
        return []
    proto, weights = light_proto(reference)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    prefix = oir.unique_prefix(oir.value_names(reference), "optcc_weight_error")
    by_result = {node.output[0]: node for node in proto.graph.node if node.output}
    probes, names, ranks = [], [], []
    for i, (node, delta) in enumerate(deltas):
        original = by_result[node.outputs[0].name]
        probe = onnx.NodeProto()
        probe.CopyFrom(original)
        probe.name = f"{prefix}_probe_{i}"
        if probe.domain == "com.microsoft" and probe.op_type == "FusedConv":  # its Conv, without the activation
            probe.domain, probe.op_type = "", "Conv"
            kept = [a for a in probe.attribute if a.name not in ("activation", "activation_params")]
            del probe.attribute[:]
            probe.attribute.extend(kept)
        weight = f"{prefix}_dw_{i}"
        del probe.input[:]
        probe.input.extend([original.input[0], weight])
        del probe.output[:]
        probe.output.append(f"{prefix}_probe_{i}")
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(delta, np.float32), weight))
        probes.append(probe)
        names.append(probe.output[0])
        ranks.append(delta.ndim)  # a convolution's result has its weight's rank
    means, outputs = channel_mean_nodes(names, ranks, opset, prefix)
    # each probe and its reduction right after the node whose input it reads, so the
    # probe's result is freed as soon as it is reduced
    reduction_of = {m.input[0]: m for m in means if m.op_type == "ReduceMean"}
    after: dict[str, list[onnx.NodeProto]] = {}
    for (node, _), probe in zip(deltas, probes):
        after.setdefault(node.outputs[0].name, []).extend([probe, reduction_of[probe.output[0]]])
    _insert(proto, [m for m in means if m.op_type == "Constant"], after, outputs)
    return _average(_session(proto, threads, weights), outputs, samples)
