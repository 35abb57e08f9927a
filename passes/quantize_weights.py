"""QuantizeWeightsPass: weight-only quantization: block-wise INT4/INT8 of MatMul and Gemm,
per-channel INT8 of Conv and ConvTranspose with bias correction.

Rewrite, for ``y = MatMul(a, W)`` / ``y = Gemm(a, B, C)`` with a constant float32 (or
float16) 2-D weight (``W = B`` or ``B^T`` with ``transB``), the weight quantized block-wise
along K by ``optcc.quant.weight_only`` (RTN, HQQ or GPTQ; ``bits`` 4 or 8, ``block_size``
rows per block, symmetric or asymmetric):

- ``target="onnxruntime"``: ``y = com.microsoft.MatMulNBits(a, B_q, scales[, zero_points])``
  (K, N, bits, block_size; ``accuracy_level`` only when given), followed for a Gemm by
  ``* alpha`` and ``+ beta * C``;
- otherwise (portable): the node keeps reading a float weight, now
  ``DequantizeLinear(W_q, scale[, zero], axis, block_size)`` with int4/uint4 (int8/uint8)
  levels — block-wise DequantizeLinear needs opset 21: a model below it is upgraded with
  onnx's version converter (weights set aside, so none is copied) and, when that fails,
  left unchanged with the reason in ``stats["reason"]``.

The float weights are removed once nothing reads them; activations stay float.

A layer computes in its weight's float type: a float16 weight (a model
``ConvertFloat16Pass`` converted first) gets float16 scales, each the block's scale
rounded once to float16 and the levels rounded against it (a scale below float16's range
becomes 1: that block's values round to 0), so DequantizeLinear yields float16 and
MatMulNBits runs with T1 = float16; a Gemm's alpha, beta and scaled bias are of that type
too. Integer levels and block layout are the same for both types. A float32 layer reading
``Cast<float>(W16)`` of a float16 constant (how ``ConvertFloat16Pass`` stores the weights
of the layers it keeps float32) is quantized from those float16 values with float32
scales; the Cast and ``W16`` go once nothing reads them. ``stats["scales"]`` counts the
layers by scale type. Convolutions are quantized in float32 only.

Policy: with ``bits=4``, a *head* (a quantized node whose output reaches a graph output
through data-movement and elementwise ops only: the logits projection) is quantized with
``head_bits`` (8 by default; None: like the body), since an int4 head is the usual cause of
degraded generation. ``embeddings=True`` also quantizes ``Gather(table, ids)`` of a
constant float32 (float16) ``[V, H]`` table to int8 with one scale per row, of the table's
type (rows are gathered first, then dequantized); a table tied to a MatMul/Gemm head is stored once as int8 per
row and dequantized once for all its readers. Without ``embeddings`` a tied table stays
float (its readers include a Gather). ``embeddings=None`` (the default) means True with
``bits=4`` and False with ``bits=8``: next to a 4-bit body, int8 rows add an error far
below the body's, and a vocabulary table is a large share of a language model; next to an
8-bit body they would be the largest error left (docs/weight-only.md has the measurements).

Mixed widths (``gate``, with ``bits=4``): ``gate(candidate)`` judges a whole quantized model
(None: it passes; else why not; ``optcc.optimize`` gives the verification's own check). When
the all-int4 candidate misses, the body's weights are ranked once by their relative error
at int4, ``tr(dW^T H dW) / tr(W^T H W)`` with ``H`` the mean ``X^T X`` of the layer's input
on ``samples`` (the identity without samples: the relative weight error), and the most
sensitive are raised to int8, as few as the search finds (``optcc.quant.fewest_float_layers``,
every weight may be raised): 1, 2, 4, ... weights (all of them last) until a candidate
passes, then bisection below it, at most ``FLOAT_LAYER_CANDIDATES`` candidates: when they
run out during the bisection, the fewest that passed are raised and
``stats["mixed"]["bounded"]`` says fewer might pass; when none passed by then, declined as
below. Candidates are built on copies sharing the model's tensors, each weight held at one
width at a time (quantized again when a later candidate or the result asks for the other:
quantizing is deterministic, so the levels are the same). When even every body weight at int8 misses, the model is written all-int4
as without a gate (the verification then declines it). ``held_out(candidate)``, when given, judges the widths the gate chose on
samples the gate did not see (``optcc.optimize`` gives the verification's own check where
the gate judges other samples: a KV-cache decoder's): when it misses, the next weight in
the ranking is raised, and the next, each candidate judged by the gate and then by
``held_out``, until one passes both (when none does, all-int4 as above). ``stats["mixed"]``
holds the checks, the raised weights and a summary line; ``stats["bit_widths"]`` each
layer's width and why.

``samples`` (feed dicts) serve GPTQ, the mixed widths' ranking and the convolutions' bias correction. GPTQ needs
them: the Hessian ``X^T X`` of each layer's input is accumulated in float64 over them, one
sample at a time, from the float model; without samples GPTQ falls back to RTN and says
so in ``stats["note"]``.

Preconditions: main-graph default-domain MatMul/Gemm (``transA = 0``), activation
float32 or float16, weight a 2-D constant of the activation's type
(``optcc.ir.const_array``: from IR 4 on not a graph input with an initializer default,
which a caller may feed) or one dequantized in the graph
from stored integer levels of more bits than asked (``Mul(Cast<float>(q), scale)``,
``optcc.ir.dequantized_array``: requantized from the float values it computes; its Mul,
Cast and constants go once nothing else reads them; not when a Gather reads it too; levels
of no more bits than asked stay as they are: re-rounding them loses accuracy and adds scales), read only by such nodes with
one orientation (and, with ``embeddings``, by Gathers on axis 0); node not in ``exclude``
(node or output names). Everything else is left alone with a reason in
``stats["kept_float"]``. A model below IR 4, whose initializers are all listed as inputs
(constants there), moves to IR 4 before the rewrite (``optcc.ir.upgrade_legacy_ir``;
``stats["unlisted_constant_inputs"]``).

onnxruntime's full graph optimization fuses a block-wise DequantizeLinear + MatMul into
its own MatMulNBits with ``accuracy_level`` 4 (activations rounded to int8 inside the
kernel; session option ``session.qdq_matmulnbits_accuracy_level``), so the portable form
runs with that extra error there; the MatMulNBits target writes ``accuracy_level`` only
when asked (default: float activations).

Convolutions (``convs``; default: with ``bits=8``): ``y = Conv(x, W, b)`` (or
ConvTranspose, or onnxruntime's FusedConv of -O3) with a constant float32 weight becomes ``Conv(x, DequantizeLinear(q, scale,
axis), b')``: ``q`` symmetric int8, one scale per output channel (``axis=0``; 1 for an
ungrouped ConvTranspose, whose weight is ``[C_in, C_out, k...]``; a grouped one gets one
scale per input channel, axis 0), RTN with the channel's value of largest magnitude mapped
to -128 (``weight_only.quantize_channels``). Per-axis DequantizeLinear needs opset 13 (not
21): an older model is upgraded to 13 as above. Activations stay float; a weight read by
several such nodes is dequantized once. With ``samples`` (and ``bias_correction``),
``b' = b + E[conv(x, W - W_hat)]`` per output channel, the mean over the samples and
output positions with ``x`` the node's input in the float model (before this pass changes
anything): onnxruntime runs a probe copy of each node on ``W - W_hat`` followed by a
per-channel ReduceMean, one sample at a time on one thread, averaged in float64
(``weight_only.weight_error_shifts``); ``b'`` is a new float32 initializer per node (0 + shift
when the node had no bias), so the quantized layer's mean output equals the float one's on
the samples. Without samples ``b' = b`` and ``stats["bias_correction"]`` says so. A
convolution whose bias is not a float32 constant keeps it (counted as not corrected).
Preconditions: a node of the main graph; activation float32 and not
constant; weight a float32 constant (initializer or Constant node) of rank >= 3, not a
graph input or output, read only as the weight of such nodes of the same op with the same
scale axis; else it stays float with a reason in ``stats["kept_float"]``. (The -O1+
pipelines lift Constant-node weights to initializers before this pass; run alone, it
reads a Constant node's tensor and removes the node once nothing reads it.)

Numerics ("int8"): lossy; the error is the weight's block-wise rounding, bounded per
element by half a step (``|scale| / 2``) for RTN (per channel for convolutions); the
quantized model computes exactly the float graph with ``W_hat`` and ``b'`` (up to float32
rounding); the verifier judges the outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

import optcc
import optcc.quant
from optcc.quant import BOUNDED_NOTE, KeptCandidates, fewest_float_layers

__all__ = ["QuantizeWeightsPass", "drop_unused_weights", "embedding_reason", "quantize_gather", "meta_forgotten",
           "ROWS_KEY", "summary_reason"]

weight_only = optcc.quant.weight_only

BLOCKWISE_OPSET = 21
PER_AXIS_OPSET = 13  # DequantizeLinear's axis (one scale per channel)
SUMMARY_REASON_CHARS = 160  # a missed check's reason quoted in a search's one-line summary
# the float types a MatMul/Gemm layer or an embedding table is quantized in (numpy -> ONNX);
# the scales are of the layer's type
_FLOATS = {np.float32: ir.DataType.FLOAT, np.float16: ir.DataType.FLOAT16}
_CONVS = ("Conv", "ConvTranspose")  # default domain; and com.microsoft FusedConv (-O3), a Conv's weight
_MS = "com.microsoft"
# ops a head's output may pass through on its way to a graph output
_HEAD_PASSTHROUGH = frozenset({"Add", "Sub", "Mul", "Div", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
                               "Identity", "Cast", "Flatten", "Softmax", "LogSoftmax"})


_FORMS = ("kn", "nk", "nbits")  # how ``_Parts.arrays`` writes a quantized weight
_OTHER_WIDTH = {4: 8, 8: 4}  # a weight's other width in a mixed-width search


def _forget(written: dict[tuple[int, str], Any], bq: Any) -> None:
    """Drop what ``_Parts.arrays`` made of ``bq`` (``written``: its store), in every form."""
    for form in _FORMS:
        written.pop((id(bq), form), None)


@dataclasses.dataclass(frozen=True)
class _Parts:
    """What a rewrite writes, computed once on the float model: ``quantized(index, bits)``
    (the planned layer's block-quantized weight), each planned convolution's per-channel
    weight and its bias shift (by index; none when not corrected)."""

    quantized: Callable[[int, int], Any]
    conv_weights: list[Any]
    conv_shifts: dict[int, np.ndarray]
    # the arrays a quantized weight is written as, by (id of the weight, form), beside the
    # weight itself (an id is only that object's while it lives): made once while the weight
    # is held (``_quantizer``) and shared, read-only, by every candidate of a search and the result
    written: dict[tuple[int, str], tuple[Any, tuple[np.ndarray | None, ...]]] = \
        dataclasses.field(default_factory=dict)

    def arrays(self, bq: Any, form: str) -> tuple[np.ndarray | None, ...]:
        """``bq`` as written: ``form`` "kn" or "nk" (DequantizeLinear's levels, scales and
        zero points, ``[N, K]``-major for "nk"), or "nbits" (``pack_matmul_nbits``)."""
        key = (id(bq), form)
        if key not in self.written or self.written[key][0] is not bq:
            if form == "nbits":
                made = weight_only.pack_matmul_nbits(bq)
            else:
                q, zero = bq.storage()
                made = (q, bq.scales, zero) if form == "kn" else (q.T, bq.scales.T, None if zero is None else zero.T)
                made = tuple(None if a is None else np.ascontiguousarray(a) for a in made)
            for array in made:
                if array is not None:
                    array.flags.writeable = False
            self.written[key] = (bq, made)
        return self.written[key][1]


class QuantizeWeightsPass(optcc.Pass):
    """MatMul/Gemm weights -> block-wise INT4/INT8 (MatMulNBits or DequantizeLinear), Conv
    weights -> per-channel INT8 with bias correction; see module doc."""

    name = "quantize-weights"
    numerics = "int8"

    def __init__(self, *, bits: int = 4, block_size: int = 32, symmetric: bool = False,
                 algorithm: str = "rtn", target: str = "portable", head_bits: int | None = 8,
                 embeddings: bool | None = None, samples: Iterable[Mapping[str, np.ndarray]] | None = None,
                 accuracy_level: int | None = None, exclude: Iterable[str] = (), convs: bool | None = None,
                 bias_correction: bool = True, gate: Callable[[ir.Model], str | None] | None = None,
                 held_out: Callable[[ir.Model], str | None] | None = None) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise optcc.BadInputError(f"weight-only bits must be 4 or 8, got {bits!r}")
        if block_size not in (16, 32, 64, 128, 256):
            raise optcc.BadInputError(f"weight-only block_size must be 16, 32, 64, 128 or 256, got {block_size!r}")
        if algorithm not in weight_only.ALGORITHMS:
            raise optcc.BadInputError(
                f"unknown weight-only algorithm {algorithm!r}; choose one of {', '.join(weight_only.ALGORITHMS)}")
        if head_bits not in (None, 4, 8):
            raise optcc.BadInputError(f"head_bits must be 4, 8 or None, got {head_bits!r}")
        self.bits, self.block_size, self.symmetric = bits, block_size, symmetric
        self.algorithm, self.target = algorithm, target
        self.head_bits = head_bits
        self.embeddings = (bits == 4) if embeddings is None else embeddings
        self.samples = None if samples is None else list(samples)
        self.accuracy_level = accuracy_level
        self.exclude = frozenset(exclude)
        self.convs = (bits == 8) if convs is None else convs
        self.bias_correction = bias_correction
        self.gate = gate
        self.held_out = held_out

    # ------------------------------------------------------------------ planning

    def call(self, model: ir.Model) -> optcc.PassResult:
        with meta_forgotten(model, ROWS_KEY):
            result = self._call(model)
        if "mixed" in result.stats:
            # the search's candidates are reference cycles holding the arrays of widths the result
            # does not use: a collection frees them before anything runs on the result
            optcc.ir.collect_for(optcc.ir.weight_bytes(result.model))
        return result

    def _call(self, model: ir.Model) -> optcc.PassResult:
        stats: dict[str, Any] = {"quantized": {}, "kept_float": {}, "head": [], "algorithm": self.algorithm,
                                 "bits": self.bits, "block_size": self.block_size, "target": self.target}
        graph = model.graph
        # below IR 4 an initializer listed as a graph input is a constant (not so from 4 on);
        # the model moves to 4 before any rewrite, so the new initializers need not be inputs
        inputs_constant = optcc.ir.initializers_are_constant(model)
        layers, gathers, tied = self._plan(graph, stats, inputs_constant)
        convs = self._plan_convs(graph, stats, inputs_constant)
        if not layers and not gathers and not tied and not convs:
            return optcc.PassResult(model, False, stats)
        if inputs_constant:
            stats["unlisted_constant_inputs"] = optcc.ir.upgrade_legacy_ir(model)
        portable = self.target != "onnxruntime"
        needed = max(BLOCKWISE_OPSET if (portable and layers) else 0, PER_AXIS_OPSET if convs else 0)
        if optcc.ir.default_opset(model) < needed:
            reason = _upgrade_opset(model, needed, "block-wise" if needed == BLOCKWISE_OPSET else "per-axis")
            if reason:
                stats["reason"] = reason
                return optcc.PassResult(model, False, stats)
            stats["opset_upgraded_to"] = needed
            graph = model.graph
            scratch: dict[str, Any] = {"quantized": {}, "kept_float": {}, "head": []}
            layers, gathers, tied = self._plan(graph, scratch)
            convs = self._plan_convs(graph, scratch)
        heads = _heads(graph, {node for node, _ in layers})
        widths = [self.head_bits if (node in heads and self.bits == 4 and self.head_bits) else self.bits
                  for node, _ in layers]
        stats["head"] = [{"node": node.name, "bits": bits} for (node, _), bits in zip(layers, widths) if node in heads]
        hessians = self._hessians(model, layers, stats)
        written: dict[tuple[int, str], tuple[Any, tuple[np.ndarray | None, ...]]] = {}
        quantized = self._quantizer(layers, hessians, written)
        # the convolutions' weights and bias shifts, measured on the float model before any rewrite
        by_weight = {w: weight_only.quantize_channels(optcc.ir.as_numpy(w), _conv_axis(node)) for node, w in convs}
        conv_weights = [by_weight[w] for _, w in convs]
        shifts = self._conv_shifts(model, convs, by_weight, stats)
        conv_shifts = {index: shifts[node] for index, (node, _) in enumerate(convs) if node in shifts}
        parts = _Parts(quantized, conv_weights, conv_shifts, written)
        if self.bits == 4 and layers:
            if self.gate is not None:
                widths = self._mixed(model, layers, widths, heads, hessians, parts, stats)
            stats["bit_widths"] = stats.get("bit_widths") or _bit_widths(layers, widths, heads, [])
        self._rewrite(model, (layers, gathers, tied, convs), widths, parts, stats)
        return optcc.PassResult(model, True, stats)

    def _quantizer(self, layers: list[tuple[ir.Node, ir.Value]], hessians: Mapping[str, np.ndarray] | None,
                   written: dict[tuple[int, str], Any]) -> Callable[[int, int], Any]:
        """``quantized(index, bits)``: the planned layer's weight block-quantized with ``bits``
        (layers sharing a weight share it; layers reading the same input share GPTQ's
        factorization). One width of a weight is held at a time, with what ``written``
        (``_Parts.written``) made of it: asking for the other drops it, so a search's candidate
        holds each weight's levels once, not at both widths. Quantizing is deterministic, so a
        width asked for again is the same levels, computed again."""
        done: dict[tuple[ir.Value, int], Any] = {}
        factors: dict[tuple[str | None, int], Any] = {}

        def quantized(index: int, bits: int) -> Any:
            node, w_value = layers[index]
            key = (w_value, bits)
            if key not in done:
                dropped = done.pop((w_value, _OTHER_WIDTH[bits]), None)
                if dropped is not None:
                    _forget(written, dropped)
                w = _weight_kn(node, w_value)
                hessian = hessians.get(node.inputs[0].name) if hessians else None
                algorithm = self.algorithm if (self.algorithm != "gptq" or hessian is not None) else "rtn"
                factor = None
                if algorithm == "gptq":
                    factor_key = (node.inputs[0].name, w.shape[0])
                    if factor_key not in factors:
                        factors[factor_key] = weight_only.gptq_factor(hessian, self.block_size)
                    factor = factors[factor_key]
                # a float16 layer (``--fp16`` before this pass) gets float16 scales: its
                # dequantized weight and MatMulNBits' T1 are the activation's type
                done[key] = weight_only.quantize(w, algorithm, bits, self.block_size, self.symmetric, factor=factor,
                                                 scale_dtype=w.dtype)
            return done[key]

        return quantized

    def _rewrite(self, model: ir.Model, plan: tuple[Any, Any, Any, Any], widths: list[int], parts: _Parts,
                 stats: dict[str, Any]) -> None:
        """Quantize ``model`` in place as planned (``plan``: its layers, gathers, tied tables
        and convolutions, index-aligned with those ``parts`` were computed for), layer i
        with ``widths[i]`` bits."""
        layers, gathers, tied, convs = plan
        graph = model.graph
        portable = self.target != "onnxruntime"
        taken = optcc.ir.value_names(model)
        replaced: list[ir.Value] = []
        emitted: dict[int, Any] = {}  # id(quantized weight) -> what the first reader got
        held = []  # every quantized weight used here, alive while ``emitted`` keys them by id
        for index, ((node, w_value), bits) in enumerate(zip(layers, widths)):
            bq = parts.quantized(index, bits)
            held.append(bq)
            replaced.append(w_value)
            if portable:
                self._emit_dequantize(graph, node, w_value, bq, taken, emitted, parts)
            else:
                self._emit_matmul_nbits(model, node, bq, taken, emitted, parts)
            label = f"{node.op_type} int{bits}"
            stats["quantized"][label] = stats["quantized"].get(label, 0) + 1
            scale_type = "float16" if bq.scales.dtype == np.float16 else "float32"
            stats.setdefault("scales", {})[scale_type] = stats.get("scales", {}).get(scale_type, 0) + 1
        for node, table in gathers:
            replaced.append(table)
            quantize_gather(graph, node, table, taken)
            stats["quantized"]["Gather int8"] = stats["quantized"].get("Gather int8", 0) + 1
        for table in tied:
            replaced.append(table)
            self._emit_tied(graph, table, taken)
            stats["quantized"]["tied table int8"] = stats["quantized"].get("tied table int8", 0) + 1
        conv_emitted: dict[ir.Value, ir.Value] = {}  # float weight -> its DequantizeLinear's output
        for index, (node, w_value) in enumerate(convs):
            replaced.append(w_value)
            if w_value not in conv_emitted:
                conv_emitted[w_value] = _emit_channel_dequantize(graph, node, w_value, parts.conv_weights[index],
                                                                 taken)
            node.replace_input_with(1, conv_emitted[w_value])
            if index in parts.conv_shifts:
                old_bias = _set_bias(graph, node, parts.conv_shifts[index], taken)
                if old_bias is not None:
                    replaced.append(old_bias)
            label = f"{node.op_type} int8"
            stats["quantized"][label] = stats["quantized"].get(label, 0) + 1
        # a dequantized weight's Mul/Cast go first, then the constants they read
        operands = [v for value in dict.fromkeys(replaced)
                    for v in (*_drop_float16_cast(value), *optcc.ir.drop_dequantization(value))]
        stats["float_weight_bytes_removed"] = drop_unused_weights(graph, dict.fromkeys(replaced))
        if operands:
            stats["dequantized_weight_bytes_removed"] = drop_unused_weights(graph, dict.fromkeys(operands))

    # ------------------------------------------------------------------ mixed widths

    def _mixed(self, model: ir.Model, layers: list[tuple[ir.Node, ir.Value]], widths: list[int],
               heads: set[ir.Node], hessians: Mapping[str, np.ndarray] | None, parts: _Parts,
               stats: dict[str, Any]) -> list[int]:
        """The widths to write when ``gate`` judges candidates: every body layer int4 when
        that passes; else the most sensitive body weights raised to int8, as few as
        ``optcc.quant.fewest_float_layers`` finds over ``_ranking``'s order (every weight may
        be raised; at most ``FLOAT_LAYER_CANDIDATES`` candidates, ``bounded`` when that cut
        the search short), ``held_out`` confirming its choice; when it declines,
        all-int4 (the verification then declines it, as without a gate). Candidates are
        built on copies of ``model`` (sharing its tensors); ``model`` itself is not changed here."""
        assert self.gate is not None
        order: list[tuple[ir.Value, float]] = []
        by_name: dict[str, ir.Value] = {}

        @KeptCandidates
        def candidate(raised: Sequence[str]) -> ir.Model:
            # the candidates dropped before this one are reference cycles: a collection frees
            # them, and with them the levels of widths this one does not hold
            optcc.ir.collect_for(optcc.ir.weight_bytes(model))
            copy = optcc.ir.clone(model)
            scratch: dict[str, Any] = {"quantized": {}, "kept_float": {}, "head": []}
            plan = (*self._plan(copy.graph, scratch), self._plan_convs(copy.graph, scratch))
            assert [n.name for n, _ in plan[0]] == [n.name for n, _ in layers], "the copy plans other layers"
            self._rewrite(copy, plan, _with_int8(layers, widths, [by_name[n] for n in raised]), parts, scratch)
            return copy

        def ranking() -> list[str]:
            """The body's weights, most sensitive first (only when all-int4 misses a check)."""
            sensitivity = hessians
            if sensitivity is None and self.samples:
                inputs = {node.inputs[0].name: _weight_kn(node, w).shape[0] for node, w in layers}
                sensitivity = weight_only.collect_hessians(model, inputs, self.samples)[0]
            order.extend(_ranking(layers, widths, parts.quantized, sensitivity))
            by_name.update((w.name, w) for w, _ in order)
            assert len(by_name) == len(order), "two ranked weights share a name"
            stats["mixed"]["ranked_by"] = "output error on the samples" if sensitivity else "weight error (no samples)"
            return [w.name for w, _ in order]

        held_out = self.held_out
        stats["mixed"] = mixed = {}
        search = fewest_float_layers(ranking, lambda raised: self.gate(candidate(raised)),
                                     None if held_out is None else lambda raised: held_out(candidate(raised)),
                                     keep_one=False, retain=candidate.retain)
        checks = [{"int8_weights": c["float_layers"], **({"held_out": True} if c["check"] == "confirm" else {}),
                   "passed": c["passed"], **({"reason": c["reason"]} if "reason" in c else {})} for c in search.checks]
        if search.chosen == []:
            stats["mixed"] = {"checks": checks, "summary": "int4 passed its check; no layer raised to int8"}
            return widths
        first = search.checks[0]
        missed = first["reason"] if not first["passed"] else f"held-out check: {search.checks[1]['reason']}"
        mixed.update({"missed": missed, "checks": checks, **({"bounded": True} if search.bounded else {})})
        # the count the gate chose first: the first one held out to the confirmation, unless all-int4 passed the gate
        confirmed = [c["int8_weights"] for c in checks if c.get("held_out")]
        gate_chose = confirmed[0] if confirmed and confirmed[0] else None
        if search.chosen is None:
            mixed["declined"] = True
            checked = "its check and the held-out one" if confirmed else "its check"
            mixed["summary"] = (f"int4 missed its check ({summary_reason(missed)}); none of the {search.candidates} "
                                f"candidates the search could build passed {checked}: declined" if search.bounded
                                else f"int4 missed its check ({summary_reason(missed)}) and so does every body "
                                f"layer at int8{' on the held-out check' if confirmed else ''}: declined")
            stats["bit_widths"] = _bit_widths(layers, widths, heads, order)
            return widths
        raised = [by_name[name] for name in search.chosen]
        chosen = _with_int8(layers, widths, raised)
        count = sum(a != b for a, b in zip(widths, chosen))
        body = sum(bits == 4 for bits in widths)
        mixed["raised"] = [w.name for w in raised]
        if gate_chose is not None and gate_chose != len(raised):
            mixed["gate_chose"] = gate_chose
        mixed["summary"] = (f"int4 missed its check ({summary_reason(missed)}); {count} of {body} body layers "
                            f"raised to int8 (the most sensitive by {mixed['ranked_by']}), the rest int4"
                            + (f"; the held-out check refused the {gate_chose} the search chose first"
                               if gate_chose is not None and gate_chose != len(raised) else "")
                            + (f"; {BOUNDED_NOTE}" if search.bounded else ""))
        stats["bit_widths"] = _bit_widths(layers, chosen, heads, order, set(raised))
        return chosen

    def _plan(self, graph: ir.Graph, stats: dict[str, Any], inputs_constant: bool = False
              ) -> tuple[list[tuple[ir.Node, ir.Value]], list[tuple[ir.Node, ir.Value]], list[ir.Value]]:
        """(MatMul/Gemm node, weight) pairs, (Gather, table) pairs and tied tables to quantize
        (``inputs_constant``: ``optcc.ir.initializers_are_constant`` of the model)."""
        layers: list[tuple[ir.Node, ir.Value]] = []
        gathers: list[tuple[ir.Node, ir.Value]] = []
        tied: list[ir.Value] = []

        def skip(reason: str) -> None:
            stats["kept_float"][reason] = stats["kept_float"].get(reason, 0) + 1

        for node in graph:
            if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm", "Gather"):
                continue
            if self.exclude & {node.name, *(v.name for v in node.outputs)}:
                skip("excluded")
                continue
            if node.op_type == "Gather":
                why = _table_reason(node, inputs_constant, float16=True) if self.embeddings else ""
                if why is not None:
                    if why:
                        skip(why)
                    continue
                table = node.inputs[0]
                kinds = {_use_kind(u) for u in table.uses()}
                if table.is_graph_output() or None in kinds:
                    skip("embedding table shared with another op")
                elif kinds == {"gather"}:
                    gathers.append((node, table))
                elif table not in tied:
                    tied.append(table)
                continue
            reason = self._layer_reason(node, inputs_constant)
            if reason and reason.startswith("weight tied") and self.embeddings:
                continue  # quantized with its table
            if reason:
                skip(reason)
                continue
            layers.append((node, node.inputs[1]))
        if tied:
            layers = [(n, w) for n, w in layers if w not in tied]
        return layers, gathers, tied

    def _plan_convs(self, graph: ir.Graph, stats: dict[str, Any], inputs_constant: bool = False
                    ) -> list[tuple[ir.Node, ir.Value]]:
        """(Conv/ConvTranspose node, weight) pairs to store as per-channel int8, in graph order."""
        if not self.convs:
            return []
        found = []
        for node in graph:
            if not _is_conv(node):
                continue
            reason = ("excluded" if self.exclude & {node.name, *(v.name for v in node.outputs)}
                      else _conv_reason(node, inputs_constant))
            if reason:
                stats["kept_float"][reason] = stats["kept_float"].get(reason, 0) + 1
                continue
            found.append((node, node.inputs[1]))
        return found

    def _conv_shifts(self, model: ir.Model, convs: list[tuple[ir.Node, ir.Value]],
                     weights: Mapping[ir.Value, Any], stats: dict[str, Any]) -> dict[ir.Node, np.ndarray]:
        """Each correctable convolution's bias shift ``E[conv(x, W - W_hat)]`` per output
        channel on the samples (``weight_only.weight_error_shifts``, on the float model)."""
        if not convs:
            return {}
        if not self.bias_correction or not self.samples:
            why = "turned off" if not self.bias_correction else "no calibration samples given"
            stats["bias_correction"] = {"corrected": 0, "note": f"{why}: convolution biases not corrected"}
            return {}
        deltas, skipped = [], 0
        for node, w_value in convs:
            if _bias_reason(node) is not None:
                skipped += 1
                continue
            w = optcc.ir.as_numpy(w_value)
            deltas.append((node, (w.astype(np.float64) - weights[w_value].dequantize()).astype(np.float32)))
        # one thread: the reductions' order, so the biases written, do not depend on the machine's cores
        shifts = weight_only.weight_error_shifts(model, deltas, self.samples, threads=1)
        stats["bias_correction"] = {
            "corrected": len(deltas), "samples": len(self.samples),
            "mean_abs_shift": float(np.mean([np.abs(s).mean() for s in shifts])) if shifts else 0.0}
        if skipped:
            stats["bias_correction"]["not_corrected"] = f"{skipped} with a bias that is not a float32 constant"
        return {node: shift for (node, _), shift in zip(deltas, shifts)}

    def _layer_reason(self, node: ir.Node, inputs_constant: bool = False) -> str | None:
        a, w_value = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            return "Gemm with transA"
        if a is None or w_value is None or (a.dtype is not None and a.dtype not in _FLOATS.values()):
            return "activation not float32 or float16"
        if optcc.ir.const_array(a, inputs_constant=inputs_constant) is not None:
            return "activation constant"
        w = _constant_matrix(w_value, inputs_constant, float16=True)
        if w is not None and a.dtype is not None and a.dtype != _FLOATS[w.dtype.type]:
            return "activation and weight of different float types"
        dequantized = w is None
        stored = optcc.ir.stored_bits(w_value) if dequantized else None
        if stored is not None and stored <= self.bits:  # re-rounding its levels would only lose
            return f"weight already stored as {stored}-bit integers"
        if dequantized:
            w = _float16_stored(w_value, inputs_constant)
        if dequantized and w is None:
            w = optcc.ir.dequantized_array(w_value, inputs_constant=inputs_constant)
            w = w if w is not None and w.ndim == 2 else None
        if w is None:
            return "weight not a constant float32 or float16 matrix"
        if not finite(w):
            return "weight holds inf or NaN"
        if a.shape is not None and len(a.shape) < 2 and self.target == "onnxruntime":
            return "activation of rank 1"
        kinds = {_use_kind(u) for u in w_value.uses()}
        # a table dequantized in the graph is no embedding this pass quantizes
        if w_value.is_graph_output() or None in kinds or (dequantized and "gather" in kinds):
            return "weight shared with another op"
        if "gather" in kinds:
            return "weight tied to an embedding Gather (quantize embeddings to include it)"
        if len(kinds) > 1:
            return "weight read transposed and not"
        return None

    def _hessians(self, model: ir.Model, layers: list[tuple[ir.Node, ir.Value]], stats: dict[str, Any]
                  ) -> dict[str, np.ndarray] | None:
        if self.algorithm != "gptq" or not layers:
            return None
        if not self.samples:
            stats["note"] = "GPTQ needs calibration samples; none given, so RTN was used"
            return None
        inputs = {node.inputs[0].name: _weight_kn(node, w).shape[0] for node, w in layers}
        hessians, count = weight_only.collect_hessians(model, inputs, self.samples)
        stats["gptq_samples"] = count
        return hessians

    # ------------------------------------------------------------------ emission

    def _emit_dequantize(self, graph: ir.Graph, node: ir.Node, w_value: ir.Value, bq: Any, taken: set[str],
                         emitted: dict[int, Any], parts: _Parts) -> None:
        if id(bq) in emitted:  # nodes sharing a weight share its dequantization
            node.replace_input_with(1, emitted[id(bq)])
            return
        transposed = _transposed(node)
        q, scales, zero = parts.arrays(bq, "nk" if transposed else "kn")  # "nk": B is [N, K], blocks along axis 1
        base = w_value.name or "weight"
        inputs = [_initializer(graph, _name(taken, f"{base}_q{bq.bits}"), q),
                  _initializer(graph, _name(taken, f"{base}_scale"), scales)]
        if zero is not None:
            inputs.append(_initializer(graph, _name(taken, f"{base}_zero_point"), zero))
        dq = ir.node("DequantizeLinear", inputs, {"axis": 1 if transposed else 0, "block_size": bq.block_size},
                     name=_name(taken, f"{base}_dequantize"))
        dq.outputs[0].name = _name(taken, f"{base}_dequantized")
        dq.outputs[0].dtype = _FLOATS[scales.dtype.type]  # DequantizeLinear computes in its scale's type
        dq.outputs[0].shape = ir.Shape(q.shape)
        graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
        emitted[id(bq)] = dq.outputs[0]

    def _emit_matmul_nbits(self, model: ir.Model, node: ir.Node, bq: Any, taken: set[str],
                           emitted: dict[int, Any], parts: _Parts) -> None:
        graph = model.graph
        model.opset_imports.setdefault(_MS, 1)
        k, n = bq.q.shape
        base = node.inputs[1].name or "weight"
        dtype = bq.scales.dtype.type  # the layer's float type: its Gemm factors and bias are of it too
        if id(bq) not in emitted:  # nodes sharing a weight share its packed initializers
            b, scales, zero = parts.arrays(bq, "nbits")
            made = [_initializer(graph, _name(taken, f"{base}_q{bq.bits}"), b),
                    _initializer(graph, _name(taken, f"{base}_scales"), scales)]
            if zero is not None:
                made.append(_initializer(graph, _name(taken, f"{base}_zero_points"), zero.reshape(-1)))
            emitted[id(bq)] = made
        inputs = [node.inputs[0], *emitted[id(bq)]]
        attrs: dict[str, Any] = {"K": k, "N": n, "bits": bq.bits, "block_size": bq.block_size}
        if self.accuracy_level is not None:
            attrs["accuracy_level"] = self.accuracy_level
        old = node.outputs[0]
        name, type_, shape = old.name, old.type, old.shape
        result = ir.Value(name=None, type=type_, shape=shape)
        tail: list[ir.Node] = []
        folded_c: ir.Value | None = None  # a constant C that beta was folded into: dropped once unread
        alpha = float(_attr(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0
        has_c = node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None
        current = result if (alpha == 1.0 and not has_c) else ir.Value(name=_name(taken, f"{name}_nbits"))
        mm = ir.node("MatMulNBits", inputs, attrs, domain=_MS, outputs=[current],
                     name=_name(taken, f"{node.name or base}_nbits"))
        if alpha != 1.0:
            factor = _initializer(graph, _name(taken, f"{name}_alpha"), np.array(alpha, dtype))
            scaled = result if not has_c else ir.Value(name=_name(taken, f"{name}_scaled"))
            tail.append(ir.node("Mul", [current, factor], outputs=[scaled]))
            current = scaled
        if has_c:
            c = node.inputs[2]
            beta = float(_attr(node, "beta", 1.0))
            constant = optcc.ir.const_array(c)  # a fed C (a graph input with a default) is scaled as fed
            if beta != 1.0 and constant is not None:
                scaled_c = (constant.astype(np.float64) * beta).astype(dtype)
                folded_c = c
                c = _initializer(graph, _name(taken, f"{name}_bias"), scaled_c)
            elif beta != 1.0:
                factor = _initializer(graph, _name(taken, f"{name}_beta"), np.array(beta, dtype))
                mul = ir.node("Mul", [c, factor])
                mul.outputs[0].name = _name(taken, f"{name}_scaled_bias")
                tail.append(mul)
                c = mul.outputs[0]
            tail.append(ir.node("Add", [current, c], outputs=[result]))
        graph.insert_after(node, [mm, *tail])
        old.replace_all_uses_with(result, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        old.name = None
        result.name = name
        if folded_c is not None:
            drop_unused_weights(graph, [folded_c])

    def _emit_tied(self, graph: ir.Graph, table: ir.Value, taken: set[str]) -> None:
        q, scale = _table_rows(table)  # every candidate of a search shares the table's levels
        base = table.name or "embedding"
        float_type = _FLOATS[scale.dtype.type]
        cast = ir.node("Cast", [_initializer(graph, _name(taken, f"{base}_q8"), q)], {"to": float_type})
        cast.outputs[0].name = _name(taken, f"{base}_q8_float")
        mul = ir.node("Mul", [cast.outputs[0], _initializer(graph, _name(taken, f"{base}_row_scale"), scale)])
        mul.outputs[0].name = _name(taken, f"{base}_dequantized")
        mul.outputs[0].dtype, mul.outputs[0].shape = float_type, ir.Shape(q.shape)
        first = min((u.node for u in table.uses()), key=lambda n: list(graph).index(n))
        graph.insert_before(first, [cast, mul])
        for use in list(table.uses()):
            use.node.replace_input_with(use.idx, mul.outputs[0])


# ---------------------------------------------------------------------- mixed widths


def _with_int8(layers: list[tuple[ir.Node, ir.Value]], widths: list[int], raised: Iterable[ir.Value]) -> list[int]:
    """``widths`` with every layer reading a weight of ``raised`` at 8 bits."""
    up = set(raised)
    return [8 if w in up else bits for (_, w), bits in zip(layers, widths)]


def _ranking(layers: list[tuple[ir.Node, ir.Value]], widths: list[int], quantized: Callable[[int, int], Any],
             hessians: Mapping[str, np.ndarray] | None) -> list[tuple[ir.Value, float]]:
    """The int4 weights, most sensitive first, each with its relative output error at int4:
    ``sum tr(dW^T H dW) / sum tr(W^T H W)`` over the layers reading it (``H`` the mean
    ``X^T X`` of the layer's input on the samples; the identity without them, which makes it
    the relative squared weight error). Ties keep graph order."""
    errors: dict[ir.Value, list[float]] = {}
    for index, ((node, w_value), bits) in enumerate(zip(layers, widths)):
        if bits != 4:
            continue
        w = _weight_kn(node, w_value).astype(np.float64)
        d = w - quantized(index, 4).dequantize().astype(np.float64)
        hessian = hessians.get(node.inputs[0].name) if hessians else None
        if hessian is None:
            error, energy = float(np.sum(d * d)), float(np.sum(w * w))
        else:
            error, energy = weight_only.output_error(d, np.zeros_like(d), hessian), \
                weight_only.output_error(w, np.zeros_like(w), hessian)
        sums = errors.setdefault(w_value, [0.0, 0.0])
        sums[0] += error
        sums[1] += energy
    scored = [(w, error / energy if energy > 0 else 0.0) for w, (error, energy) in errors.items()]
    order = sorted(range(len(scored)), key=lambda i: (-scored[i][1], i))
    return [scored[i] for i in order]


def _bit_widths(layers: list[tuple[ir.Node, ir.Value]], widths: list[int], heads: set[ir.Node],
                order: Sequence[tuple[ir.Value, float]], raised: set[ir.Value] = frozenset()) -> dict[str, Any]:
    """Each quantized layer's width and why: the head's policy, the body's width, or raised to
    int8 by the mixed search (with its rank and error from ``order``)."""
    rank = {w: (i + 1, error) for i, (w, error) in enumerate(order)}
    rows: dict[str, Any] = {}
    for (node, w_value), bits in zip(layers, widths):
        name = node.name or node.outputs[0].name or f"{node.op_type}#{len(rows)}"
        if node in heads and w_value not in raised and bits == 8:
            why = "head (head_bits)"
        elif w_value in raised:
            place, error = rank[w_value]
            why = f"raised to int8: rank {place} of {len(order)}, relative error {error:.2e} at int4"
        elif w_value in rank:
            place, error = rank[w_value]
            why = f"int4: rank {place} of {len(order)}, relative error {error:.2e}"
        else:
            why = f"int{bits}"
        rows[name] = {"bits": bits, "why": why}
    return rows


def summary_reason(reason: str) -> str:
    """A check's reason on one line, within ``SUMMARY_REASON_CHARS`` (cut between words or clauses)."""
    return optcc.infra.short_reason(" ".join(reason.split()), SUMMARY_REASON_CHARS)


# ---------------------------------------------------------------------- helpers


def drop_unused_weights(graph: ir.Graph, values: Iterable[ir.Value]) -> int:
    """Remove the initializers (or Constant nodes) behind ``values`` that nothing reads any
    more; returns how many bytes of tensor data went with them."""
    freed = 0
    for value in values:
        if value.uses() or value.is_graph_output() or value in graph.inputs:
            continue
        tensor = optcc.ir.const_tensor(value)
        producer = value.producer()
        if value.is_initializer() and value.name in graph.initializers:
            graph.initializers.pop(value.name)
        elif producer is not None and producer.op_type == "Constant" and producer.graph is graph:
            graph.remove(producer, safe=True)
        else:
            continue
        freed += int(tensor.nbytes) if tensor is not None else 0
    return freed


ROW_CHUNK_BYTES = 16 << 20  # float64 bytes of table rows ``row_int8`` quantizes at a time
ROWS_KEY = "optcc.row_int8"  # a table tensor's meta entry: its ``row_int8`` levels and scales


def row_int8(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of a ``[V, H]`` table with one scale per row (``[V, 1]``, in the
    table's float type), quantized ``ROW_CHUNK_BYTES`` of rows at a time: each row is its
    own block, so the levels and scales are those of the whole table at once, and the
    float64 work arrays stay that small whatever the table's size."""
    q = np.empty(table.shape, np.int8)
    scales = np.empty((table.shape[0], 1), table.dtype)
    rows = max(1, ROW_CHUNK_BYTES // max(1, table.shape[1] * 8))
    for start in range(0, table.shape[0], rows):
        bq = weight_only.quantize_rtn(table[start:start + rows].T, 8, _pow2_at_least(table.shape[1]),
                                      symmetric=True, scale_dtype=table.dtype)
        q[start:start + rows] = bq.q.T
        scales[start:start + rows] = bq.scales.T
    return q, scales


def embedding_reason(node: ir.Node, *, inputs_constant: bool = False) -> str | None:
    """None when ``node`` is a Gather of a constant float32 table of finite values that only
    axis-0 Gathers read (so ``quantize_gather`` may rewrite it); "" when it is no such
    Gather at all; else why the table stays float. ``inputs_constant``:
    ``optcc.ir.initializers_are_constant`` of the model."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
        return ""
    why = _table_reason(node, inputs_constant)
    if why is not None:
        return why
    table = node.inputs[0]
    if table.is_graph_output() or any(_use_kind(u) != "gather" for u in table.uses()):
        return "embedding table shared with another op"
    return None


def _table_reason(node: ir.Node, inputs_constant: bool = False, float16: bool = False) -> str | None:
    """For a Gather: "" when its table is no constant float32 (with ``float16``, or float16)
    matrix (no embedding to quantize); why it stays float when it is one but gathered on
    another axis, of one column or holding inf or NaN; None when its table may be quantized row by row, as far as this Gather tells
    (who else reads the table is the caller's question)."""
    table = node.inputs[0]
    matrix = None if table is None else _constant_matrix(table, inputs_constant, float16)
    if matrix is None:
        return ""
    if _attr(node, "axis", 0) != 0:
        return "Gather not on axis 0"
    if matrix.shape[1] == 1:  # as the row scales quantize_gather writes are
        return "embedding table of one column (int8 rows with a scale each would be larger)"
    if not finite(matrix):
        return "embedding table holds inf or NaN"
    return None


def quantize_gather(graph: ir.Graph, node: ir.Node, table: ir.Value, taken: set[str]) -> None:
    """``Gather(table, ids)`` -> ``Cast<float>(Gather(table_q8, ids)) * Gather(row_scale, ids)``:
    the rows are gathered as int8 and dequantized after (exact float32 arithmetic on the
    stored levels); the output keeps its name, type and shape."""
    q, scale = _table_rows(table)
    base = table.name or "embedding"
    q_value = _initializer(graph, _name(taken, f"{base}_q8"), q)
    s_value = _initializer(graph, _name(taken, f"{base}_row_scale"), scale)
    ids = node.inputs[1]
    gq = ir.node("Gather", [q_value, ids], {"axis": 0})
    gs = ir.node("Gather", [s_value, ids], {"axis": 0})
    cast = ir.node("Cast", [gq.outputs[0]], {"to": _FLOATS[scale.dtype.type]})
    for made, suffix in ((gq, "rows_q8"), (gs, "rows_scale"), (cast, "rows_float")):
        made.outputs[0].name = _name(taken, f"{base}_{suffix}")
    old = node.outputs[0]
    name, type_, shape = old.name, old.type, old.shape
    result = ir.Value(name=None, type=type_, shape=shape)
    mul = ir.node("Mul", [cast.outputs[0], gs.outputs[0]], outputs=[result], name=node.name or None)
    graph.insert_after(node, [gq, gs, cast, mul])
    old.replace_all_uses_with(result, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    old.name = None
    result.name = name


def _table_rows(table: ir.Value) -> tuple[np.ndarray, np.ndarray]:
    """``row_int8`` of ``table``'s constant, made once per tensor and kept, read-only, in its
    metadata until the pass's call returns (``meta_forgotten``): the candidates of a search
    share the float model's tensors, so each quantizes a table as the first did, with the
    same arrays."""
    tensor = optcc.ir.const_tensor(table)
    assert tensor is not None, "quantize_gather reads a constant table"
    rows = tensor.meta.get(ROWS_KEY)
    if rows is None:
        rows = row_int8(optcc.ir.as_numpy(table))
        for array in rows:
            array.flags.writeable = False
        tensor.meta[ROWS_KEY] = rows
    return rows


@contextlib.contextmanager
def meta_forgotten(model: ir.Model, *keys: str) -> Iterator[None]:
    """The ``with`` block, after which no tensor of ``model``'s initializers (of every graph,
    as they were before it) keeps an entry of ``keys`` in its metadata: what a pass keeps on
    a tensor for its call (``_table_rows``' rows, quantize-dynamic's levels), on tensors that
    may be the caller's, which must not hold it past the call."""
    tensors = [value.const_value for graph in optcc.ir.graphs(model) if isinstance(graph, ir.Graph)
               for value in graph.initializers.values() if value.const_value is not None]
    try:
        yield
    finally:
        for tensor in tensors:
            for key in keys:
                tensor.meta.pop(key, None)


def gather_stored_rows(graph: ir.Graph, node: ir.Node, taken: set[str]) -> bool:
    """``Gather(Mul(Cast<float>(q), scale), ids)`` on axis 0, with ``q`` a ``[V, H]`` table
    stored as integer levels (``optcc.ir.stored_levels``) that only axis-0 Gathers read and
    ``scale`` one per row (``[V, 1]``) or one for every row (a scalar, ``[H]``, ``[1, H]``)
    -> ``Mul(Cast<float>(Gather(q, ids)), scale or Gather(scale, ids))`` (a ``[1, H]`` scale
    as ``[H]``: the gathered rows of 0-d ids have rank 1, as the original's), the operands in
    the order the graph had them: each element is the same float32 product of the same
    operands, and the table is never dequantized whole. False, nothing changed, for any
    other Gather."""
    table = node.inputs[0]
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or table is None or _attr(node, "axis", 0) != 0:
        return False
    stored = optcc.ir.stored_levels(table)
    if stored is None or table.is_graph_output() or any(_use_kind(u) != "gather" for u in table.uses()):
        return False
    mul, q, scale = stored
    levels, factor = optcc.ir.const_tensor(q), optcc.ir.const_array(scale)
    if levels is None or factor is None or len(levels.shape) != 2:
        return False
    rows, width = levels.shape
    per_row = factor.shape == (rows, 1) and rows > 1
    if not per_row and factor.shape not in ((), (1,), (1, 1), (width,), (1, width)):
        return False
    ids = node.inputs[1]
    base = table.name or "embedding"
    gathered = ir.node("Gather", [q, ids], {"axis": 0})
    cast = ir.node("Cast", [gathered.outputs[0]], {"to": ir.DataType.FLOAT})
    made = [(gathered, "rows_stored"), (cast, "rows_float")]
    if per_row:
        row_scale = ir.node("Gather", [scale, ids], {"axis": 0})
        made.append((row_scale, "rows_scale"))
        scale = row_scale.outputs[0]
    elif factor.ndim == 2:  # [1, H] or [1, 1] would broadcast the rows of 0-d ids to [1, H]
        scale = _initializer(graph, _name(taken, f"{base}_rows_scale"), factor.reshape(factor.shape[-1:]))
    for new, suffix in made:
        new.outputs[0].name = _name(taken, f"{base}_{suffix}")
    old = node.outputs[0]
    name, type_, shape = old.name, old.type, old.shape
    result = ir.Value(name=None, type=type_, shape=shape)
    scale_first = mul.inputs[0] is stored[2]
    operands = [scale, cast.outputs[0]] if scale_first else [cast.outputs[0], scale]
    product = ir.node("Mul", operands, outputs=[result], name=node.name or None)
    graph.insert_after(node, [new for new, _ in made] + [product])
    old.replace_all_uses_with(result, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    old.name = None
    result.name = name
    return True


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _transposed(node: ir.Node) -> bool:
    return node.op_type == "Gemm" and bool(_attr(node, "transB", 0))


def _use_kind(use: Any) -> str | None:
    """How a weight is read: "kn" / "nk" (MatMul/Gemm input 1), "gather", else None."""
    node, idx = use.node, use.idx
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in ("MatMul", "Gemm") and idx == 1:
        return "nk" if _transposed(node) else "kn"
    if node.op_type == "Gather" and idx == 0 and _attr(node, "axis", 0) == 0:
        return "gather"
    return None


def _constant_matrix(value: ir.Value, inputs_constant: bool = False, float16: bool = False) -> np.ndarray | None:
    """The float32 (with ``float16``, also float16) matrix behind a constant
    (``optcc.ir.const_array``: from IR 4 on, a graph input with an initializer default is
    no constant, a caller may feed it)."""
    array = optcc.ir.const_array(value, inputs_constant=inputs_constant)
    if array is None or array.dtype.type not in (_FLOATS if float16 else (np.float32,)) or array.ndim != 2:
        return None
    return array


def finite(array: np.ndarray) -> bool:
    """Whether every value of a float weight is finite. One that holds inf or NaN (an
    embedding row of -inf that masks attention, as chython-rxnmap's distance table has)
    stays float: its scale would be inf and every level NaN."""
    return bool(np.isfinite(array).all())


def _weight_kn(node: ir.Node, w_value: ir.Value) -> np.ndarray:
    """The ``[K, N]`` weight of a planned layer: a constant or one dequantized in the graph."""
    w = optcc.ir.as_numpy(w_value)
    w = w if w is not None else _float16_stored(w_value)
    w = w if w is not None else optcc.ir.dequantized_array(w_value)
    assert w is not None
    return w.T if _transposed(node) else w


def _float16_cast(value: ir.Value) -> ir.Node | None:
    """The ``Cast(to=float)`` of a main-graph float16 matrix constant that computes
    ``value`` (how ``ConvertFloat16Pass`` stores the weights of layers it keeps float32),
    else None."""
    node = value.producer()
    if node is None or node.op_type != "Cast" or node.domain not in ("", "ai.onnx") \
            or ir.DataType(_attr(node, "to", 0)) != ir.DataType.FLOAT or node.inputs[0] is None:
        return None
    return node


def _float16_stored(value: ir.Value, inputs_constant: bool = False) -> np.ndarray | None:
    """The float32 matrix ``Cast<float>(W16)`` computes (exactly the float16 values) when
    ``value`` is such a Cast of a float16 2-D constant; else None."""
    cast = _float16_cast(value)
    stored = None if cast is None else optcc.ir.const_array(cast.inputs[0], inputs_constant=inputs_constant)
    if stored is None or stored.dtype != np.float16 or stored.ndim != 2:
        return None
    return stored.astype(np.float32)


def _drop_float16_cast(value: ir.Value) -> list[ir.Value]:
    """Remove the Cast of a ``_float16_stored`` weight once nothing reads it; returns the
    float16 constant for the caller to drop once it is unread too."""
    cast = _float16_cast(value)
    if cast is None or value.uses() or value.is_graph_output() or cast.graph is None:
        return []
    stored = cast.inputs[0]
    cast.graph.remove(cast, safe=True)
    return [stored]


def _pow2_at_least(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def _heads(graph: ir.Graph, candidates: set[ir.Node]) -> set[ir.Node]:
    """Candidates whose output reaches a graph output through pass-through ops only."""
    heads = set()
    for node in candidates:
        frontier, seen = [node.outputs[0]], set()
        while frontier:
            value = frontier.pop()
            if value in seen:
                continue
            seen.add(value)
            if value.is_graph_output():
                heads.add(node)
                break
            for use in value.uses():
                if use.node.op_type in _HEAD_PASSTHROUGH and use.node.domain in ("", "ai.onnx"):
                    frontier.extend(use.node.outputs)
    return heads


def _name(taken: set[str], base: str) -> str:
    return optcc.ir.unique_value_name(None, taken=taken, base=base)


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.Tensor(array, name=name)
    value = ir.Value(name=name, const_value=tensor)
    value.dtype = tensor.dtype
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def _upgrade_opset(model: ir.Model, target: int, form: str = "block-wise") -> str | None:
    """Move the model's default-domain opset to ``target`` in place
    (``optcc.ir.convert_opset``: onnx's version converter, no weight copied). Returns why
    it could not, or None."""
    current = optcc.ir.default_opset(model)
    try:
        optcc.ir.convert_opset(model, target)
    except Exception as e:  # noqa: BLE001 - the converter raises plain errors
        line = " ".join(str(e).split())[:200]
        hint = "; use target='onnxruntime' (MatMulNBits)" if form == "block-wise" else ""
        return (f"{form} DequantizeLinear needs opset {target}; the model is at opset {current} and "
                f"onnx's version converter cannot upgrade it ({line}){hint}")
    return None


# ---------------------------------------------------------------------- convolutions


def _is_conv(node: ir.Node) -> bool:
    """A default-domain Conv/ConvTranspose, or onnxruntime's FusedConv (a Conv, its bias and
    an activation in one node; the weight and bias mean what they mean for Conv)."""
    if node.domain in ("", "ai.onnx"):
        return node.op_type in _CONVS
    return node.domain == _MS and node.op_type == "FusedConv"


def _conv_axis(node: ir.Node) -> int:
    """The weight axis that gets one scale: output channels (axis 0 of a Conv's
    ``[C_out, C_in/g, k...]``, axis 1 of an ungrouped ConvTranspose's ``[C_in, C_out, k...]``);
    a grouped ConvTranspose's output channels are not one axis of its weight, so it gets
    one scale per input channel (axis 0; for a depthwise one the same thing)."""
    if node.op_type == "ConvTranspose" and _attr(node, "group", 1) == 1:
        return 1
    return 0


def _conv_reason(node: ir.Node, inputs_constant: bool = False) -> str | None:
    """Why a Conv/ConvTranspose's weight stays float, or None: it must be a float32 constant
    (initializer or Constant node; ``optcc.ir.is_constant``) of rank >= 3, not a graph output, read only
    as the weight of Convs (ConvTransposes) that give it the same scale axis; the
    activation float32 and not constant."""
    x = node.inputs[0] if node.inputs else None
    w_value = node.inputs[1] if len(node.inputs) > 1 else None
    if x is None or w_value is None:
        return "convolution without input or weight"
    if x.dtype is not None and x.dtype != ir.DataType.FLOAT:
        return "activation not float32"
    if optcc.ir.const_array(x, inputs_constant=inputs_constant) is not None:
        return "activation constant"
    if not optcc.ir.is_constant(w_value, inputs_constant=inputs_constant) and w_value.is_graph_input():
        return "weight is a graph input"
    w = optcc.ir.const_array(w_value, inputs_constant=inputs_constant)
    if w is None:
        return "weight not a constant"
    if w.dtype != np.float32 or w.ndim < 3:
        return "weight not a float32 constant of rank >= 3"
    if not finite(w):
        return "weight holds inf or NaN"
    axis = _conv_axis(node)
    for use in w_value.uses():
        other = use.node
        if use.idx != 1 or other.op_type != node.op_type or not _is_conv(other) or _conv_axis(other) != axis:
            return "weight shared with another op"
    if w_value.is_graph_output():
        return "weight shared with another op"
    return None


def _bias_reason(node: ir.Node) -> str | None:
    """None when the node's bias is absent or a float32 constant vector that the correction
    may replace (a new initializer per node, so a shared bias is never changed for its
    other readers)."""
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is None:
        return None
    array = optcc.ir.const_array(bias)
    if array is None or array.dtype != np.float32 or array.ndim != 1:
        return "bias not a float32 constant"
    return None


def _emit_channel_dequantize(graph: ir.Graph, node: ir.Node, w_value: ir.Value, cq: Any, taken: set[str]) -> ir.Value:
    """``DequantizeLinear(q, scale, axis)`` (int8, no zero point) before ``node`` (the weight's
    first reader in graph order); returns its float output, shaped as the weight."""
    base = w_value.name or "weight"
    q = _initializer(graph, _name(taken, f"{base}_q8"), cq.q)
    scale = _initializer(graph, _name(taken, f"{base}_scale"), cq.scale)
    dq = ir.node("DequantizeLinear", [q, scale], {"axis": cq.axis}, name=_name(taken, f"{base}_dequantize"))
    dq.outputs[0].name = _name(taken, f"{base}_dequantized")
    dq.outputs[0].dtype = ir.DataType.FLOAT
    dq.outputs[0].shape = ir.Shape(cq.q.shape)
    graph.insert_before(node, dq)
    return dq.outputs[0]


def _set_bias(graph: ir.Graph, node: ir.Node, shift: np.ndarray, taken: set[str]) -> ir.Value | None:
    """Give ``node`` a new float32 bias initializer, its bias (0 when it has none) plus
    ``shift`` (rounded once to float32); returns the bias value it read before, if any."""
    old = node.inputs[2] if len(node.inputs) > 2 else None
    current = np.zeros(shift.shape) if old is None else optcc.ir.as_numpy(old).astype(np.float64)
    base = (old.name if old is not None and old.name else None) or f"{node.outputs[0].name}_bias"
    value = _initializer(graph, _name(taken, f"{base}_corrected"), (current + shift).astype(np.float32))
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, value)
    return old
