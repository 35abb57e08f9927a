"""EqualizeCrossLayerPass: cross-layer equalization of Conv -> Conv pairs, before INT8.

Rewrite: for ``y = Conv2(act(Conv1(x, W1, b1)), W2, b2)`` every channel ``c`` of the
tensor between the two convs is divided by ``s_c``: ``W1[c] /= s_c``, ``b1[c] /= s_c``
and the weights of Conv2 that read channel ``c`` are multiplied by ``s_c``, with
``s_c = sqrt(r1_c / r2_c)``, ``r1_c`` the largest ``|W1[c]|`` and ``r2_c`` the largest
weight of Conv2 reading channel ``c`` (Nagel et al., "Data-Free Quantization Through
Weight Equalization and Bias Correction", 2019). Both then have the range
``sqrt(r1_c r2_c)`` on channel ``c``, and so, roughly, the tensor between them: a
per-tensor activation scale no longer leaves the small channels a few levels (PP-OCRv4
rec's stem feeds a depthwise conv channels whose ranges differ 15x).

The tensors between the two convs hold other values afterwards, so they get new names
(a comparison by name with the original's intermediates would otherwise misreport them).

Bias absorption: with nothing between the convs and Conv2 unpadded, ``b1`` moves into
Conv2 entirely (``b2 += sum over the kernel of W2 * b1``), so the tensor between them is
centred on what the weights make of the input.

Preconditions: both are default-domain ``Conv`` with 2-D or larger constant float
weights (initializers read by nothing else and not graph inputs) and constant biases when present; Conv1's
result and the activation's result are read only by the next node and are not graph
outputs; Conv2's input channels equal Conv1's output channels (any ``group``:
depthwise or full); the activation between them, if any, is ``Relu`` or ``LeakyRelu``
(positively homogeneous: ``act(x / s) == act(x) / s`` for ``s > 0``); channels where
either range is zero keep ``s_c = 1``.

Numerics ("fusion"): exact in real arithmetic: convolution is linear per output channel
in its weights and bias, the activation commutes with a positive scale, and Conv2 sums
``(W2[., c] s_c) (h_c / s_c)``. A constant ``b1`` through an unpadded conv adds the same
``sum W2 * b1`` at every output position. The new weights are computed in float64 and cast
back, so the result is within float32 rounding of the original.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

import optcc

__all__ = ["EqualizeCrossLayerPass", "equalization_scales", "sole_weight"]

_HOMOGENEOUS = frozenset({"Relu", "LeakyRelu"})
_FLOAT = (np.float32, np.float64, np.float16)


def equalization_scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """``sqrt(r1 / r2)`` per channel, 1 where either range is zero or not finite."""
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.sqrt(r1 / r2)
    return np.where((r1 > 0) & (r2 > 0) & np.isfinite(s), s, 1.0)


def sole_weight(value: ir.Value | None) -> np.ndarray | None:
    """The value's float constant array when it is a weight a pass may rewrite for its
    reader: an initializer read by one node only and not a graph input (which a caller
    may feed instead)."""
    if value is None or not value.is_initializer() or value.is_graph_input() or len(value.uses()) != 1:
        return None
    array = optcc.ir.as_numpy(value)
    return array if array is not None and array.dtype in _FLOAT else None


def _only_reader(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _group(node: ir.Node) -> int:
    attr = node.attributes.get("group")
    return 1 if attr is None else int(attr.as_int())


def _unpadded(node: ir.Node) -> bool:
    pads = node.attributes.get("pads")
    auto = node.attributes.get("auto_pad")
    return (pads is None or not any(pads.as_ints())) and (auto is None or auto.as_string() in ("NOTSET", "VALID"))


def _is_conv(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "Conv" and node.domain in ("", "ai.onnx")


def _pair(conv1: ir.Node) -> tuple[ir.Node, ir.Node | None] | None:
    """(Conv2, the activation between or None) when ``conv1`` starts an equalizable pair."""
    nxt = _only_reader(conv1.outputs[0])
    act = None
    if nxt is not None and nxt.op_type in _HOMOGENEOUS and nxt.domain in ("", "ai.onnx"):
        act, nxt = nxt, _only_reader(nxt.outputs[0])
    if not _is_conv(nxt) or nxt.inputs[0] is not (act or conv1).outputs[0]:
        return None
    return nxt, act


class EqualizeCrossLayerPass(optcc.Pass):
    """Cross-layer equalization (with bias absorption) of Conv -> Conv pairs; see the module
    docstring."""

    name = "equalize-cross-layer"
    numerics = "fusion"

    def call(self, model: ir.Model) -> optcc.PassResult:
        taken = optcc.ir.value_names(model)
        pairs = absorbed = 0
        for conv1 in list(model.graph):
            if not _is_conv(conv1) or len(conv1.inputs) < 2:
                continue
            found = _pair(conv1)
            if found is None:
                continue
            conv2, act = found
            w1, w2 = sole_weight(conv1.inputs[1]), sole_weight(conv2.inputs[1])
            b1 = sole_weight(conv1.inputs[2]) if len(conv1.inputs) > 2 and conv1.inputs[2] is not None else None
            b2 = sole_weight(conv2.inputs[2]) if len(conv2.inputs) > 2 and conv2.inputs[2] is not None else None
            if w1 is None or w2 is None or w1.ndim < 3 or w2.ndim != w1.ndim:
                continue
            if (len(conv1.inputs) > 2 and conv1.inputs[2] is not None and b1 is None) or (
                    len(conv2.inputs) > 2 and conv2.inputs[2] is not None and b2 is None):
                continue  # a bias that is not a constant of its own
            channels, group = w1.shape[0], _group(conv2)
            per_group, outs = w2.shape[1], w2.shape[0] // max(group, 1)
            if group < 1 or per_group * group != channels or outs * group != w2.shape[0]:
                continue
            # w2 laid out per input channel c: [group, outs, per_group, k...] -> channel c = g*per_group + j
            grouped = w2.astype(np.float64).reshape((group, outs, per_group) + w2.shape[2:])
            r1 = np.abs(w1.astype(np.float64)).reshape(channels, -1).max(axis=1)
            r2 = np.abs(np.moveaxis(grouped, 2, 1)).reshape(group * per_group, -1).max(axis=1)
            s = equalization_scales(r1, r2)
            if np.all(s == 1.0):
                continue
            tail = (1,) * (w1.ndim - 1)
            new_w1 = w1.astype(np.float64) / s.reshape((-1,) + tail)
            new_b1 = None if b1 is None else b1.astype(np.float64) / s
            per_channel = (group, 1, per_group) + (1,) * (w2.ndim - 2)
            scaled = grouped * s.reshape(per_channel)
            new_w2 = scaled.reshape(w2.shape)
            new_b2 = None if b2 is None else b2.astype(np.float64)
            if new_b1 is not None and act is None and _unpadded(conv2):
                total = (scaled * new_b1.reshape(per_channel)).reshape(group, outs, -1).sum(axis=2).reshape(-1)
                new_b2 = total if new_b2 is None else new_b2 + total
                new_b1 = np.zeros_like(new_b1)
                absorbed += 1
            self._set(model, conv1, 1, new_w1.astype(w1.dtype), taken)
            if new_b1 is not None:
                self._set(model, conv1, 2, new_b1.astype(b1.dtype), taken)
            self._set(model, conv2, 1, new_w2.astype(w2.dtype), taken)
            if new_b2 is not None:
                self._set(model, conv2, 2, new_b2.astype(w2.dtype), taken)
            for node in (conv1, act):  # other tensors now: new names, never matched to the old ones
                if node is not None:
                    node.outputs[0].name = optcc.ir.unique_value_name(None, f"{node.outputs[0].name}_equalized", taken)
            pairs += 1
        return optcc.PassResult(model, bool(pairs), {"pairs": pairs, "biases_absorbed": absorbed})

    @staticmethod
    def _set(model: ir.Model, node: ir.Node, index: int, array: np.ndarray, taken: set[str]) -> None:
        """Input ``index`` of ``node`` becomes a new initializer holding ``array``."""
        old = node.inputs[index] if index < len(node.inputs) else None
        base = old.name if old is not None and old.name else f"{node.outputs[0].name}_input{index}"
        name = optcc.ir.unique_value_name(None, f"{base}_equalized", taken)
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.dtype, value.shape = ir.DataType.from_numpy(array.dtype), ir.Shape(array.shape)
        model.graph.register_initializer(value)
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        node.replace_input_with(index, value)
        if old is not None and not old.uses() and old.is_initializer() and not old.is_graph_input():
            model.graph.initializers.pop(old.name)
