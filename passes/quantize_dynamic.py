"""QuantizeDynamicPass: dynamic INT8 quantization of MatMuls and Gemms with constant weights.

Rewrite: ``y = MatMul(a, W)`` with ``W`` a constant float32 ``[K, N]`` matrix becomes

    a_q, a_scale, a_zp = DynamicQuantizeLinear(a)           # uint8, range of a at run time
    acc = MatMulInteger(a_q, W_q, a_zp, W_zp)                # int32
    y   = Mul(Cast<float>(acc), Mul(a_scale, W_scale))       # W_scale: [N] (per column)

with ``W_q`` int8 symmetric per output column (``W_scale[n] = max|W[:, n]| / 64``,
zero point 0; per tensor with ``per_channel=False``): within +-64, onnxruntime's
MatMulInteger kernels on x86 CPUs without VNNI never saturate their int16 pair sums, so
every CPU computes the same exact accumulations (``optcc.quant.integer_range``). No calibration is needed: the
activation's range is measured by DynamicQuantizeLinear for every run. onnxruntime
fuses the chain into DynamicQuantizeMatMul / MatMulIntegerToFloat (counted in
``stats["integer_nodes"]``). ``y`` keeps its name, type and shape.

``Gemm(a, B, C)`` (``transA = 0``) is rewritten the same way with ``W = B`` or, for
``transB = 1``, ``W = B^T`` stored transposed once; ``alpha`` is folded into the scale
and ``beta * C`` is added after the Mul (``beta`` folded into a constant ``C``).

With ``embeddings`` (default), ``Gather(table, ids)`` of a constant float32 ``[V, H]``
table read only by such Gathers becomes int8 rows with one scale per row, gathered and
then dequantized (``quantize_gather``; its error is the per-row rounding only).

The replaced float weights are removed (initializers, or Constant nodes) once nothing
reads them, so the file shrinks to about a quarter of the weights' float32 bytes.

Preconditions: default-domain MatMul/Gemm, opset >= 11, ``a`` float32, ``W`` a float32
2-D constant of finite values (as is an embedding table; ``optcc.ir.const_array``: from IR 4
on a graph input with an initializer default is fed, no constant; below IR 4, where every
initializer is listed as an input, it is a constant and the model moves to IR 4 before the
first rewrite, ``stats["unlisted_constant_inputs"]``) read only by MatMul (input 1) /
Gemm (input 1) nodes (a weight shared with another kind of op, or read by Gemms with
different ``transB``, stays float; nodes sharing one weight share one quantized copy),
node not in ``exclude`` (node names, output names). Other ops, custom domains and
function bodies are left alone.

A MatMul/Gemm weight stored as integer levels and dequantized in the graph,
``W = Mul(Cast<float>(q), scale)`` with constant ``q`` and ``scale``
(``optcc.ir.dequantized_array``), counts as a constant: ``W`` is evaluated as the graph
computes it and quantized like any float weight (its levels rounded again, to +-64), and
its Mul, Cast and constants are removed once nothing reads them
(``stats["dequantized_weight_bytes_removed"]``). An embedding table stored so, with one
scale per row or one for all rows, is gathered as its stored levels instead and dequantized
after (``gather_stored_rows``: exact, the same float32 products;
``stats["stored_rows_gathered"]``); only plain constant tables are quantized to int8 rows.

Layers left float (``gate``, where ``searched()`` is true or not given): ``gate(candidate)``
judges a whole quantized model (None: it passes; else why not; ``optcc.optimize`` gives a
KV-cache decoder the verification's next-token check on prompts held apart from the
verification's, asking ``NEXT_TOKEN_SEARCH_AGREEMENT``, and searches no other model: its
verification holds nothing apart). When the candidate with every layer quantized misses, the
MatMul/Gemm layers are ranked by their relative output error under dynamic INT8
(``optcc.quant.dynamic_error``, on the layers' inputs in the float model on ``samples()``,
else by weight error alone), and the fewest of the most damaging are left float
(``optcc.quant.fewest_float_layers``: 1, 2, 4, ... then bisection, at most all but one,
within ``FLOAT_LAYER_CANDIDATES`` candidates: once they are spent, only those built are
judged further, the fewest that passed ship, and ``stats["search"]["bounded"]`` says so), each candidate
confirmed by ``held_out`` where given (the verification's own check). When none passes,
the model is left unchanged with the reason in ``stats["reason"]`` (the precision is
declined); ``stats["search"]`` holds the checks and the layers left float. Candidates are
built on copies sharing the model's tensors.

Numerics ("int8"): lossy, judged by SQNR/cosine/argmax agreement. The error is that of
rounding ``a`` to 256 levels over its own min..max and ``W`` to 255 levels per column.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

import optcc
from optcc.passes.quantize_weights import (ROWS_KEY, drop_unused_weights, embedding_reason, gather_stored_rows,
                                          meta_forgotten, quantize_gather, summary_reason)
from optcc.quant import (BOUNDED_NOTE, FloatLayerSearch, dynamic_int8_errors, fewest_float_layers, KeptCandidates,
                         probed_values)

Feeds = Mapping[str, np.ndarray]
SEARCHED_FLOAT = "left float by the search"  # the kept-float reason of the layers the search chose
LEVELS_CHUNK_BYTES = 16 << 20  # float64 bytes of weight rows rounded to int8 levels at a time
# a weight tensor's meta entry: (per_channel, read transposed) -> its levels, scale
_LEVELS_KEY = "optcc.dynamic_int8_levels"

__all__ = ["QuantizeDynamicPass", "drop_unused_weights"]


class QuantizeDynamicPass(optcc.Pass):
    """MatMul/Gemm with a constant weight -> DynamicQuantizeLinear + MatMulInteger (see module doc)."""

    name = "quantize-dynamic"
    numerics = "int8"

    def __init__(self, *, per_channel: bool = True, exclude: Iterable[str] = (),
                 count_fused: bool = True, embeddings: bool = True,
                 gate: Callable[[ir.Model], str | None] | None = None,
                 held_out: Callable[[ir.Model], str | None] | None = None,
                 samples: Callable[[], Sequence[Feeds] | None] | None = None,
                 searched: Callable[[], bool] | None = None) -> None:
        super().__init__()
        self.per_channel = per_channel
        self.embeddings = embeddings
        self.exclude = frozenset(exclude)
        self.count_fused = count_fused
        self.gate = gate
        self.held_out = held_out
        self.samples = samples
        self.searched = searched

    def call(self, model: ir.Model) -> optcc.PassResult:
        with meta_forgotten(model, ROWS_KEY, _LEVELS_KEY):  # the tensors may be the caller's
            return self._call(model)

    def _call(self, model: ir.Model) -> optcc.PassResult:
        search = self._search(model) if self.gate is not None and (self.searched is None or self.searched()) \
            else None
        if search is not None and search.chosen is None:  # declined: the model as it was
            reason = (f"dynamic INT8 missed its check with every {search.candidates} candidate(s) the search built "
                      f"(the most damaging layers left float, at most all but one): {_last_reason(search.checks)}")
            return optcc.PassResult(model, False, {"quantized": 0, "kept_float": {}, "reason": reason, "search": {
                "checks": search.checks, "candidates": search.candidates}})
        chosen = search.chosen if search is not None and search.chosen else []
        result = self._quantized(model, self.exclude | set(chosen), self.count_fused)
        if search is None:
            return result
        kept = result.stats["kept_float"]
        if chosen:  # counted apart from the layers the caller excluded
            kept["excluded"] -= len(chosen)
            if not kept["excluded"]:
                del kept["excluded"]
            kept[SEARCHED_FLOAT] = len(chosen)
        result.stats["search"] = {"float_layers": chosen, "checks": search.checks, "candidates": search.candidates,
                                  **({"bounded": True} if search.bounded else {})}
        if chosen:  # the report's line (none where every layer passed at INT8)
            result.stats["search"]["summary"] = _summary(search)
        return result

    def _search(self, model: ir.Model) -> FloatLayerSearch | None:
        """The fewest layers left float for the candidate to pass ``gate`` and then
        ``held_out`` (``fewest_float_layers``, over the layers ranked by their
        ``dynamic_int8_error`` on ``samples``); None when nothing is a candidate."""
        assert self.gate is not None
        weights = self._layer_weights(model)
        if not weights:
            return None
        @KeptCandidates
        def candidate(float_layers: Sequence[str]) -> ir.Model:
            copy = optcc.ir.clone(model)
            self._quantized(copy, self.exclude | set(float_layers), False)
            return copy

        def ranking() -> list[str]:
            """The layers, most damaging first (only when the candidate with none float misses)."""
            samples = self.samples() if self.samples is not None else None
            runs = None
            if samples:
                names = sorted({name for name, _ in weights.values()})
                runs = probed_values(model, names, samples)
            errors = dynamic_int8_errors(weights, runs)
            # a NaN error (an infinite activation) ranks as the most damaging; ties keep graph order
            return sorted(errors, key=lambda layer: (not np.isnan(errors[layer]), -errors[layer]))

        def judge(float_layers: Sequence[str]) -> str | None:
            return self.gate(candidate(float_layers))  # type: ignore[misc]

        def confirm(float_layers: Sequence[str]) -> str | None:
            return self.held_out(candidate(float_layers))  # type: ignore[misc]

        return fewest_float_layers(ranking, judge, confirm if self.held_out is not None else None,
                                   retain=candidate.retain)

    def _layer_weights(self, model: ir.Model) -> dict[str, tuple[str, np.ndarray]]:
        """The MatMul/Gemm layers this pass would quantize, by output name: (the name of
        the activation it reads, its weight as [K, N])."""
        inputs_constant = optcc.ir.initializers_are_constant(model)
        layers: dict[str, tuple[str, np.ndarray]] = {}
        for node in model.graph:
            if node.op_type == "Gather" or self._reason_to_skip(node, inputs_constant, self.exclude) is not None:
                continue
            w = _weight_array(node.inputs[1], inputs_constant)
            assert w is not None and node.inputs[0] is not None
            layers[node.outputs[0].name] = (node.inputs[0].name, w.T if _transposed(node) else w)
        return layers

    def _quantized(self, model: ir.Model, exclude: frozenset[str], count_fused: bool) -> optcc.PassResult:
        """``model`` rewritten in place, the nodes named in ``exclude`` left float."""
        stats: dict[str, Any] = {"quantized": 0, "kept_float": {}, "float_weight_bytes_removed": 0}
        # below IR 4 an initializer listed as a graph input is a constant (not so from 4 on);
        # the model moves to 4 before the first rewrite, so the new initializers need not be inputs
        inputs_constant = optcc.ir.initializers_are_constant(model)
        # the opset only matters where there is something to rewrite: a model with no
        # candidate is declined as having nothing to convert, whatever its opset
        if optcc.ir.default_opset(model) < 11 and self._has_candidate(model, inputs_constant, exclude):
            stats["reason"] = (f"the model's opset {optcc.ir.default_opset(model)} has no DynamicQuantizeLinear "
                               "(opset 11 on); --target-opset 13 converts the model first")
            return optcc.PassResult(model, False, stats)
        taken = optcc.ir.value_names(model)
        for graph in optcc.ir.graphs(model):
            if not isinstance(graph, ir.Graph):
                continue
            cache: dict[ir.Value, tuple[ir.Value, ir.Value, ir.Value]] = {}
            replaced: list[ir.Value] = []
            for node in list(graph):
                embedding = node.op_type == "Gather" and self.embeddings
                if embedding:
                    reason = embedding_reason(node, inputs_constant=inputs_constant)
                    excluded = _excluded(node, exclude)
                    if reason is None and excluded:
                        reason = "excluded"
                else:
                    reason = self._reason_to_skip(node, inputs_constant, exclude)
                table = node.inputs[0] if embedding else None
                if embedding and reason == "" and not excluded and gather_stored_rows(graph, node, taken):
                    replaced.append(table)
                    stats["stored_rows_gathered"] = stats.get("stored_rows_gathered", 0) + 1
                    continue
                if reason is not None:  # "": not a candidate at all
                    if reason:
                        stats["kept_float"][reason] = stats["kept_float"].get(reason, 0) + 1
                    continue
                if inputs_constant:
                    stats["unlisted_constant_inputs"] = optcc.ir.upgrade_legacy_ir(model)
                    inputs_constant = False
                if embedding:
                    replaced.append(node.inputs[0])
                    quantize_gather(graph, node, node.inputs[0], taken)
                else:
                    replaced.append(node.inputs[1])
                    self._rewrite(graph, node, cache, taken)
                stats["quantized"] += 1
                stats[node.op_type] = stats.get(node.op_type, 0) + 1
            # a dequantized weight's Mul/Cast go first, then the constants they read
            operands = [v for value in dict.fromkeys(replaced) for v in optcc.ir.drop_dequantization(value)]
            stats["float_weight_bytes_removed"] = (
                stats.get("float_weight_bytes_removed", 0) + drop_unused_weights(graph, dict.fromkeys(replaced)))
            if operands:
                stats["dequantized_weight_bytes_removed"] = (
                    stats.get("dequantized_weight_bytes_removed", 0) + drop_unused_weights(graph, dict.fromkeys(operands)))
        modified = stats["quantized"] > 0 or "stored_rows_gathered" in stats
        if modified and count_fused:
            from optcc.quant import count_integer_nodes

            try:
                stats["integer_nodes"] = count_integer_nodes(model)
            except Exception as e:  # noqa: BLE001 - reporting only
                stats["integer_nodes_error"] = str(e).splitlines()[0][:200]
        return optcc.PassResult(model, modified, stats)

    def _has_candidate(self, model: ir.Model, inputs_constant: bool, exclude: frozenset[str]) -> bool:
        """Whether any node of ``model`` is a MatMul/Gemm this pass would rewrite or, with
        ``embeddings``, a Gather it might (one that reads rows of a stored dequantization
        counts too: ``_quantized`` alone can tell whether its rows are rewritten)."""
        for graph in optcc.ir.graphs(model):
            if not isinstance(graph, ir.Graph):
                continue
            for node in graph:
                if node.op_type == "Gather" and self.embeddings:
                    if not _excluded(node, exclude) and \
                            embedding_reason(node, inputs_constant=inputs_constant) in (None, ""):
                        return True
                elif self._reason_to_skip(node, inputs_constant, exclude) is None:
                    return True
        return False

    def _reason_to_skip(self, node: ir.Node, inputs_constant: bool, exclude: frozenset[str]) -> str | None:
        """None: rewrite; "": not a candidate at all; else why a MatMul stays float.
        ``inputs_constant``: ``optcc.ir.initializers_are_constant`` of the model; ``exclude``:
        node and output names left float."""
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            return ""
        if _excluded(node, exclude):
            return "excluded"
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            return "Gemm with transA"
        a, w_value = node.inputs[0], node.inputs[1]
        if a is None or w_value is None or (a.dtype is not None and a.dtype != ir.DataType.FLOAT):
            return "activation not float32"
        # from IR 4 on, a graph input with a default is fed, not a weight
        w = _weight_array(w_value, inputs_constant)
        if w is None:
            return "weight not constant"
        if w.dtype != np.float32 or w.ndim != 2:
            return "weight not a float32 matrix"
        if not np.isfinite(w).all():
            return "weight holds inf or NaN"
        if optcc.ir.const_array(a, inputs_constant=inputs_constant) is not None:
            return "activation constant"
        if w_value.is_graph_output() or any(
            u.node.op_type not in ("MatMul", "Gemm") or u.idx != 1 for u in w_value.uses()
        ):
            return "weight shared with another op"
        if len({_transposed(u.node) for u in w_value.uses()}) > 1:
            return "weight read transposed and not"
        return None

    def _quantized_weight(self, graph: ir.Graph, w_value: ir.Value, cache: dict, taken: set[str]
                          ) -> tuple[ir.Value, ir.Value, ir.Value]:
        if w_value in cache:
            return cache[w_value]
        q, scale = self._levels(w_value)
        zero = np.zeros(scale.shape, np.int8)
        base = w_value.name or "weight"
        made = tuple(
            _initializer(graph, optcc.ir.unique_value_name(None, taken=taken, base=f"{base}_{suffix}"), array)
            for suffix, array in (("quantized", q), ("zero_point", zero), ("scale", scale))
        )
        cache[w_value] = made  # type: ignore[assignment]
        return made  # type: ignore[return-value]

    def _levels(self, w_value: ir.Value) -> tuple[np.ndarray, np.ndarray]:
        """The int8 levels (``[K, N]``) and float32 scale of the weight ``w_value`` holds. Those
        of an initializer are made once per call and kept, read-only, in its tensor's metadata
        until the call returns: a search's candidates share the float model's tensors, so
        they share these arrays too, and no candidate holds levels of its own."""
        tensor = w_value.const_value
        transposed = any(_transposed(u.node) for u in w_value.uses())
        key = (self.per_channel, transposed)  # values sharing a tensor may read it either way
        kept = None if tensor is None else tensor.meta.setdefault(_LEVELS_KEY, {})
        if kept is not None and key in kept:
            return kept[key]
        w = _weight_array(w_value)
        assert w is not None
        if transposed:
            w = w.T  # [N, K] -> [K, N]: MatMulInteger reads the weight as [K, N]
        scale = optcc.quant.symmetric_weight_scale(w, 1 if self.per_channel else None)  # [K, N]: per column
        q = np.empty(w.shape, np.int8)
        scale64 = scale.astype(np.float64)
        rows = max(1, LEVELS_CHUNK_BYTES // max(1, w.shape[1] * 8))
        for start in range(0, w.shape[0], rows):  # each element rounds alone: float64 work arrays of a chunk
            q[start:start + rows] = optcc.quant.weight_levels(w[start:start + rows].astype(np.float64), scale64)
        for array in (q, scale):
            array.flags.writeable = False
        if kept is not None:
            kept[key] = (q, scale)
        return q, scale

    def _rewrite(self, graph: ir.Graph, node: ir.Node, cache: dict, taken: set[str]) -> None:
        a, w_value = node.inputs[0], node.inputs[1]
        assert a is not None and w_value is not None
        w_q, w_zero, w_scale = self._quantized_weight(graph, w_value, cache, taken)
        base = node.outputs[0].name or "matmul"
        dql = ir.node("DynamicQuantizeLinear", [a], num_outputs=3,
                      name=optcc.ir.unique_value_name(None, taken=taken, base=f"{node.name or base}_dynamic_quantize"))
        a_q, a_scale, a_zero = dql.outputs
        for value, suffix in zip(dql.outputs, ("quantized", "scale", "zero_point")):
            value.name = optcc.ir.unique_value_name(None, taken=taken, base=f"{a.name or base}_{suffix}")
        mmi = ir.node("MatMulInteger", [a_q, w_q, a_zero, w_zero], name=optcc.ir.unique_value_name(None, taken=taken, base=f"{node.name or base}_integer"))
        mmi.outputs[0].name = optcc.ir.unique_value_name(None, taken=taken, base=f"{base}_int32")
        cast = ir.node("Cast", [mmi.outputs[0]], {"to": ir.DataType.FLOAT})
        cast.outputs[0].name = optcc.ir.unique_value_name(None, taken=taken, base=f"{base}_int32_float")
        alpha = float(_attr(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0
        if alpha != 1.0:
            w_scale = _initializer(graph, optcc.ir.unique_value_name(None, taken=taken, base=f"{base}_alpha_scale"),
                                   (optcc.ir.as_numpy(w_scale) * np.float32(alpha)).astype(np.float32))
        scales = ir.node("Mul", [a_scale, w_scale])
        scales.outputs[0].name = optcc.ir.unique_value_name(None, taken=taken, base=f"{base}_scale")
        old = node.outputs[0]
        name, type_, shape = old.name, old.type, old.shape
        result = ir.Value(name=None, type=type_, shape=shape)
        added = self._gemm_bias(graph, node, base, taken)
        product = ir.Value(name=optcc.ir.unique_value_name(None, taken=taken, base=f"{base}_product")) if added else result
        mul = ir.node("Mul", [cast.outputs[0], scales.outputs[0]], outputs=[product], name=node.name or None)
        tail = []
        if added:
            bias_nodes, bias = added
            tail = [*bias_nodes, ir.node("Add", [product, bias], outputs=[result],
                                         name=optcc.ir.unique_value_name(None, taken=taken, base=f"{node.name or base}_bias"))]
        graph.insert_after(node, [dql, mmi, cast, scales, mul, *tail])
        old.replace_all_uses_with(result, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        old.name = None
        result.name = name

    def _gemm_bias(self, graph: ir.Graph, node: ir.Node, base: str, taken: set[str]
                   ) -> tuple[list[ir.Node], ir.Value] | None:
        """``beta * C`` of a Gemm as (nodes computing it, value), or None without C."""
        if node.op_type != "Gemm" or len(node.inputs) < 3 or node.inputs[2] is None:
            return None
        c = node.inputs[2]
        beta = float(_attr(node, "beta", 1.0))
        if beta == 1.0:
            return [], c
        constant = optcc.ir.const_array(c)  # a fed C is scaled as fed
        if constant is not None:
            folded = (constant.astype(np.float64) * beta).astype(np.float32)
            return [], _initializer(graph, optcc.ir.unique_value_name(None, taken=taken, base=f"{base}_bias"), folded)
        factor = _initializer(graph, optcc.ir.unique_value_name(None, taken=taken, base=f"{base}_beta"),
                              np.array(beta, np.float32))
        scaled = ir.node("Mul", [c, factor])
        scaled.outputs[0].name = optcc.ir.unique_value_name(None, taken=taken, base=f"{base}_scaled_bias")
        return [scaled], scaled.outputs[0]


def _excluded(node: ir.Node, exclude: frozenset[str]) -> bool:
    """Whether the user left ``node`` float, by its name or an output's."""
    return bool(exclude & {node.name, *(v.name for v in node.outputs)})


def _weight_array(value: ir.Value, inputs_constant: bool = False) -> np.ndarray | None:
    """The weight behind ``value``: a constant, or a constant integer tensor dequantized in
    the graph (``optcc.ir.dequantized_array``); None for anything else."""
    array = optcc.ir.const_array(value, inputs_constant=inputs_constant)
    return array if array is not None else optcc.ir.dequantized_array(value, inputs_constant=inputs_constant)


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _transposed(node: ir.Node) -> bool:
    return node.op_type == "Gemm" and bool(_attr(node, "transB", 0))


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.dtype = ir.DataType.from_numpy(array.dtype)
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def _last_reason(checks: Sequence[dict[str, Any]]) -> str:
    """The reason of the last check that missed (the search's last word)."""
    return next((c["reason"] for c in reversed(checks) if not c["passed"]), "no candidate")


def _summary(search: FloatLayerSearch) -> str:
    """One line: the layers the search left float, and why any were."""
    missed = next(c["reason"] for c in search.checks if not c["passed"])
    return (f"every layer at INT8 missed its check ({summary_reason(missed)}); {len(search.chosen or [])} of "
            f"{len(search.ranked)} left float, the most damaging by their output error: "
            f"{', '.join(search.chosen or [])} ({search.candidates} candidate(s) judged"
            + (f"; {BOUNDED_NOTE}" if search.bounded else "") + ")")
