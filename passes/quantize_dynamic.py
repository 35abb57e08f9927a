"""QuantizeDynamicPass: dynamic INT8 quantization of MatMuls with constant weights.

Rewrite: ``y = MatMul(a, W)`` with ``W`` a constant float32 ``[K, N]`` matrix becomes

    a_q, a_scale, a_zp = DynamicQuantizeLinear(a)           # uint8, range of a at run time
    acc = MatMulInteger(a_q, W_q, a_zp, W_zp)                # int32
    y   = Mul(Cast<float>(acc), Mul(a_scale, W_scale))       # W_scale: [N] (per column)

with ``W_q`` int8 symmetric per output column (``W_scale[n] = max|W[:, n]| / 127``,
zero point 0; per tensor with ``per_channel=False``). No calibration is needed: the
activation's range is measured by DynamicQuantizeLinear for every run. onnxruntime
fuses the chain into DynamicQuantizeMatMul / MatMulIntegerToFloat (counted in
``stats["integer_nodes"]``). ``y`` keeps its name, type and shape.

Preconditions: default-domain MatMul, opset >= 11, ``a`` float32, ``W`` a float32 2-D
constant read by MatMuls only (a weight shared with another kind of op stays float;
MatMuls sharing one weight share one quantized copy), node not in ``exclude`` (node
names, output names). Other ops, custom domains and function bodies are left alone.

Numerics ("int8"): lossy, judged by SQNR/cosine/argmax agreement. The error is that of
rounding ``a`` to 256 levels over its own min..max and ``W`` to 255 levels per column.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx_ir as ir

import optcc

__all__ = ["QuantizeDynamicPass"]


class QuantizeDynamicPass(optcc.Pass):
    """MatMul with a constant weight -> DynamicQuantizeLinear + MatMulInteger (see module doc)."""

    name = "quantize-dynamic"
    level = None
    numerics = "int8"

    def __init__(self, *, per_channel: bool = True, exclude: Iterable[str] = (),
                 count_fused: bool = True) -> None:
        super().__init__()
        self.per_channel = per_channel
        self.exclude = frozenset(exclude)
        self.count_fused = count_fused

    def call(self, model: ir.Model) -> optcc.PassResult:
        stats: dict[str, Any] = {"quantized": 0, "kept_float": {}}
        if optcc.ir.default_opset(model) < 11:
            stats["reason"] = "opset < 11 has no DynamicQuantizeLinear"
            return optcc.PassResult(model, False, stats)
        taken = optcc.ir.value_names(model)
        for graph in optcc.ir.graphs(model):
            if not isinstance(graph, ir.Graph):
                continue
            cache: dict[ir.Value, tuple[ir.Value, ir.Value, ir.Value]] = {}
            for node in list(graph):
                reason = self._reason_to_skip(node)
                if reason == "":
                    continue
                if reason is not None:
                    stats["kept_float"][reason] = stats["kept_float"].get(reason, 0) + 1
                    continue
                self._rewrite(graph, node, cache, taken)
                stats["quantized"] += 1
        modified = stats["quantized"] > 0
        if modified and self.count_fused:
            from optcc.quant import count_integer_nodes

            try:
                stats["integer_nodes"] = count_integer_nodes(model)
            except Exception as e:  # noqa: BLE001 - reporting only
                stats["integer_nodes_error"] = str(e).splitlines()[0][:200]
        return optcc.PassResult(model, modified, stats)

    def _reason_to_skip(self, node: ir.Node) -> str | None:
        """None: rewrite; "": not a candidate at all; else why a MatMul stays float."""
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            return ""
        if self.exclude & {node.name, *(v.name for v in node.outputs)}:
            return "excluded"
        a, w_value = node.inputs[0], node.inputs[1]
        if a is None or w_value is None or (a.dtype is not None and a.dtype != ir.DataType.FLOAT):
            return "activation not float32"
        w = optcc.ir.as_numpy(w_value)
        if w is None:
            return "weight not constant"
        if w.dtype != np.float32 or w.ndim != 2:
            return "weight not a float32 matrix"
        if optcc.ir.as_numpy(a) is not None:
            return "activation constant"
        if w_value.is_graph_output() or any(
            u.node.op_type != "MatMul" or u.idx != 1 for u in w_value.uses()
        ):
            return "weight shared with another op"
        return None

    def _quantized_weight(self, graph: ir.Graph, w_value: ir.Value, cache: dict, taken: set[str]
                          ) -> tuple[ir.Value, ir.Value, ir.Value]:
        if w_value in cache:
            return cache[w_value]
        w = optcc.ir.as_numpy(w_value)
        assert w is not None
        if self.per_channel:
            scale = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)
        else:
            scale = np.array(np.abs(w).max() / 127.0 if w.size else 1.0, np.float32)
        scale = np.maximum(scale, np.float32(1e-12)).astype(np.float32)
        q = np.clip(np.round(w.astype(np.float64) / scale.astype(np.float64)), -127, 127).astype(np.int8)
        zero = np.zeros(scale.shape, np.int8)
        base = w_value.name or "weight"
        made = tuple(
            _initializer(graph, optcc.ir.unique_value_name(None, taken=taken, base=f"{base}_{suffix}"), array)
            for suffix, array in (("quantized", q), ("zero_point", zero), ("scale", scale))
        )
        cache[w_value] = made  # type: ignore[assignment]
        return made  # type: ignore[return-value]

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
        scales = ir.node("Mul", [a_scale, w_scale])
        scales.outputs[0].name = optcc.ir.unique_value_name(None, taken=taken, base=f"{base}_scale")
        old = node.outputs[0]
        name, type_, shape = old.name, old.type, old.shape
        result = ir.Value(name=None, type=type_, shape=shape)
        mul = ir.node("Mul", [cast.outputs[0], scales.outputs[0]], outputs=[result], name=node.name or None)
        graph.insert_after(node, [dql, mmi, cast, scales, mul])
        old.replace_all_uses_with(result, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        old.name = None
        result.name = name


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.dtype = ir.DataType.from_numpy(array.dtype)
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    return value
