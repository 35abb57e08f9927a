"""SmoothActivationsPass: move activation outliers into the weights before static INT8
(SmoothQuant-style scale migration).

Rewrite: for ``y = LayerNormalization(x, gamma, beta)`` read by MatMuls ``y @ W_i`` with
constant weights, every channel ``k`` of what the MatMuls read is divided by ``s_k`` and
row ``k`` of every ``W_i`` multiplied by it: ``gamma_k /= s_k`` and ``beta_k /= s_k`` when
the MatMuls are ``y``'s only readers, else a ``Mul(y, 1/s)`` feeds the MatMuls alone (a
post-LayerNorm encoder's residual Add keeps ``y``); ``W_i[k, :] *= s_k``,
with ``s_k = sqrt(a_k / w_k)`` (migration strength 1/2), ``a_k`` the largest ``|y_k|`` over
the calibration samples and ``w_k`` the largest ``|W_i[k, :]|`` over the readers (Xiao et
al., "SmoothQuant", 2023). Transformer LayerNorm outputs carry a few channels tens of
times larger than the rest; one per-tensor 8-bit scale then leaves the others a few
levels. After the rewrite the activation and the weights share the range, and per-channel
weight scales absorb the weights' part.

Preconditions: a default-domain LayerNormalization over the last axis with constant 1-D
float32 ``gamma`` (and ``beta``) of ``K`` elements read by it alone, its mean/inv_std
outputs unused, ``y`` not a graph output; the MatMuls take ``y`` as their first input
and a constant ``(K, N)`` float32 weight read by that MatMul alone; the samples give every
channel a finite range. Channels whose ranges are zero keep ``s_k = 1``. Off by default in
the INT8 driver (``Int8Options.smooth``): on the real MiniLM it moved nothing that mattered
(docs/int8.md).

Numerics ("fusion"): exact in real arithmetic (``((x - m) / d * g / s + b / s) (s W) =
(x - m) / d * g W + b W`` per channel); the new constants are computed in float64 and
rounded to float32 once, so the result is within float32 rounding of the original.

Stats: ``layers`` smoothed, and per LayerNormalization the largest channel ratio
``max a / min a`` before and after.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

import optcc
from optcc.passes.equalize_cross_layer import sole_weight

__all__ = ["SmoothActivationsPass", "smoothing_sites"]

STRENGTH = 0.5


def _sole_constant(value: ir.Value | None, ndim: int) -> np.ndarray | None:
    """``sole_weight`` (a weight only its reader reads), when it is float32 of rank ``ndim``."""
    array = sole_weight(value)
    return array if array is not None and array.dtype == np.float32 and array.ndim == ndim else None


def smoothing_sites(model: ir.Model) -> list[tuple[ir.Node, list[ir.Node]]]:
    """The (LayerNormalization, reading MatMuls) pairs of the main graph that meet the
    preconditions (module docstring)."""
    sites = []
    for node in model.graph:
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        y = node.outputs[0]
        axis = node.attributes.get("axis")
        gamma = _sole_constant(node.inputs[1], 1)
        beta = node.inputs[2] if len(node.inputs) > 2 else None
        if gamma is None or (beta is not None and _sole_constant(beta, 1) is None):
            continue
        rank = None if y.shape is None else len(y.shape)
        if axis is not None and axis.as_int() != -1 and (rank is None or axis.as_int() != rank - 1):
            continue
        if y.is_graph_output() or any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            continue
        readers = [use.node for use in y.uses() if use.node.op_type == "MatMul" and use.idx == 0
                   and use.node.domain in ("", "ai.onnx") and use.node.inputs[1] is not y]
        if not readers:
            continue
        weights = [_sole_constant(r.inputs[1], 2) for r in readers]
        if any(w is None or w.shape[0] != gamma.size for w in weights) or len(set(map(id, readers))) != len(readers):
            continue
        sites.append((node, readers))
    return sites


class SmoothActivationsPass(optcc.Pass):
    """Move LayerNorm output outliers into the reading MatMuls' weights (SmoothQuant)."""

    name = "smooth-activations"
    numerics = "fusion"

    def __init__(self, samples: Sequence[Mapping[str, np.ndarray]]) -> None:
        super().__init__()
        self.samples = list(samples)

    def call(self, model: ir.Model) -> optcc.PassResult:
        sites = smoothing_sites(model)
        if not sites or not self.samples:
            return optcc.PassResult(model, False, {"layers": 0})
        names = [ln.outputs[0].name for ln, _ in sites]
        probe = model.clone()  # shares the weights; its graph also outputs the LayerNorms' results
        outputs = {v.name: v for node in probe.graph for v in node.outputs}
        probe.graph.outputs.extend(outputs[name] for name in names if not outputs[name].is_graph_output())
        session = optcc.runtime.make_session(probe)
        wanted = [o.name for o in session.get_outputs()].index
        ranges = {name: None for name in names}
        for feeds in self.samples:
            outs = session.run(None, dict(feeds))
            for name in names:
                got = np.abs(np.asarray(outs[wanted(name)], np.float64))
                peak = got.reshape(-1, got.shape[-1]).max(axis=0)
                ranges[name] = peak if ranges[name] is None else np.maximum(ranges[name], peak)
        ratios, new_names = {}, optcc.ir.ModelNames(model)
        for (ln, readers), name in zip(sites, names):
            a = ranges[name]
            if a is None or not np.all(np.isfinite(a)):
                continue
            w = np.max([np.abs(optcc.ir.as_numpy(r.inputs[1]).astype(np.float64)).max(axis=1) for r in readers], axis=0)
            with np.errstate(divide="ignore", invalid="ignore"):
                s = a ** STRENGTH / w ** (1.0 - STRENGTH)
            s = np.where((a > 0) & (w > 0) & np.isfinite(s) & (s > 0), s, 1.0)
            self._rescale(ln, readers, s, new_names)
            smoothed = a / s
            ratios[ln.name or name] = [float(a.max() / max(a.min(), 1e-30)),
                                       float(smoothed.max() / max(smoothed.min(), 1e-30))]
        return optcc.PassResult(model, bool(ratios), {"layers": len(ratios), "channel_ratio": ratios})

    @staticmethod
    def _rescale(ln: ir.Node, readers: list[ir.Node], s: np.ndarray, names: optcc.ir.ModelNames) -> None:
        y = ln.outputs[0]
        if any(use.node not in readers for use in y.uses()):  # others read y as it is: divide for the MatMuls only
            divisor = ir.Value(name=names.value(f"{y.name}_smoothed"), type=y.type, shape=y.shape)
            scale = ir.Value(name=names.value(f"{y.name}_smoothing"),
                             const_value=ir.Tensor((1.0 / s).astype(np.float32)))
            scale.const_value.name = scale.name
            ln.graph.register_initializer(scale)
            mul = ir.Node("", "Mul", [y, scale], outputs=[divisor], name=f"{ln.name}_smooth")
            ln.graph.insert_after(ln, mul)
            for reader in readers:
                reader.replace_input_with(0, divisor)
        else:
            for index in (1, 2):
                if index < len(ln.inputs) and ln.inputs[index] is not None:
                    value = ln.inputs[index]
                    scaled = optcc.ir.as_numpy(value).astype(np.float64) / s
                    value.const_value = ir.Tensor(scaled.astype(np.float32), name=value.name)
        for reader in readers:
            value = reader.inputs[1]
            scaled = optcc.ir.as_numpy(value).astype(np.float64) * s[:, None]
            value.const_value = ir.Tensor(scaled.astype(np.float32), name=value.name)
