"""FuseOrtSkipLayerNormPass: residual Add + LayerNormalization into onnxruntime's
com.microsoft SkipLayerNormalization (opt-in: in no level's pipeline).

Rewrites (onnxruntime target; com.microsoft opset 1 imported when used):

- ``skip-layernorm``: ``LayerNormalization(Add(x, skip), gamma, beta?, axis=-1)`` becomes
  ``SkipLayerNormalization(x, skip, gamma, beta?, epsilon)``; with
  ``x = Add(MatMul(..), bias)`` (a constant 1-D bias) the bias Add folds in as its fifth
  input, ``SkipLayerNormalization(MatMul(..), skip, gamma, beta, bias)``.
- ``skip-layernorm-sum`` (after the rules): ``LayerNormalization(Add(x, skip))`` whose sum
  is also read elsewhere (a pre-LayerNorm block's residual, GPT-2) becomes
  ``SkipLayerNormalization(x, skip, gamma, beta?)`` with its fourth output,
  ``input_skip_bias_sum``, replacing the sum for every other reader (the same float32
  ``x + skip``, bit for bit).

Preconditions: float32; LayerNormalization over the last axis (axis -1 or rank-1), its
mean/inv_std outputs unused; x and skip both of rank 3 (the kernel's input layout:
batch, sequence, hidden); gamma/beta/bias constant vectors of the hidden size.
Intermediates read elsewhere block a rule's match (a sum read elsewhere goes to
``skip-layernorm-sum``, which takes no bias: its sum output would include it).

Numerics ("fusion"): the kernel sums x + skip (+ bias) and normalizes with the mean and
the one-pass variance E[x^2] - mean^2 in float32; rounding differences ~1e-6 on
transformer activations, inside 1e-4.

Cost: onnxruntime's CPU kernel for float32 is a scalar loop with a division per element,
slower than Add + LayerNormalization, so -O3 (whose fusions must not make onnxruntime's
CPU slower) leaves this fusion out; name it (``passes=[..., "fuse-ort-skip-layernorm"]``,
``--passes``) for a target whose kernel is fast. Without it, -O3 with ``--fp16`` keeps the
standard LayerNormalization, which has a float16 kernel: no Casts either way.

Stats: ``applied``/``rejected`` per rule and ``skip_layernorm_sum``: per LayerNormalization
over a sum read elsewhere, "fused" or why not.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

import optcc
from optcc.infra import PassResult
from optcc.passes.fuse_attention import exported_rank
from optcc.passes.fuse_ort_transformer import MS_DOMAIN, float32_only, float_vector, import_microsoft_domain
from optcc.rewrite import Builder, Const, Match, Op, RewritePass, Rule, Var, static_rank

__all__ = ["FuseOrtSkipLayerNormPass", "RULES", "fuse_skip_layernorm_with_sum"]



def _skip_pattern(with_bias: bool) -> Op:
    x = Op("Add", Op("MatMul", Var("a"), Var("w"), name="matmul"), Const("bias"), commute=True,
           name="bias_add") if with_bias else Var("x")
    total = Op("Add", x, Var("skip"), commute=True, name="residual")
    return Op("LayerNormalization", total, Const("gamma"), Const("beta", optional=True), name="ln")


def _check_skip(m: Match) -> str | None:
    ln: ir.Node = m["ln"]
    x = m.get("x") if m.get("x") is not None else m["bias_add"].outputs[0]
    if not float32_only(x, m["skip"], m.output):
        return "not float32"
    if any(len(o.uses()) or o.is_graph_output() for o in ln.outputs[1:]):
        return "LayerNormalization's mean/inv_std outputs are used"
    gamma = float_vector(m, "gamma")
    if gamma is None:
        return "gamma is not a float32 vector"
    size = gamma.size
    for name in ("beta", "bias"):
        if m.get(name) is not None and (float_vector(m, name) is None or float_vector(m, name).size != size):
            return f"{name} is not a float32 vector of the hidden size"
    ranks = [exported_rank(m, x), exported_rank(m, m["skip"])]
    if ranks != [3, 3]:
        return "input and skip not both known to be rank 3"
    axis = ln.attributes.get("axis")
    if axis is not None and axis.as_int() not in (-1, 2):
        return "LayerNormalization not over the last axis"
    return None


def _rewrite_skip(m: Match, b: Builder) -> ir.Value:
    ln: ir.Node = m["ln"]
    eps = ln.attributes.get("epsilon")
    epsilon = 1e-5 if eps is None else eps.as_float()
    beta = m.get("beta")
    if m.get("bias") is not None:
        x = b.op("MatMul", m["a"], m["w"])
        if beta is None:
            beta = b.const(np.zeros_like(m.array("gamma")), "skip_ln_beta")
        inputs = [x, m["skip"], m["gamma"], beta, m["bias"]]
    else:
        inputs = [m["x"], m["skip"], m["gamma"]] + ([beta] if beta is not None else [])
    return b.op("SkipLayerNormalization", *inputs, domain=MS_DOMAIN, epsilon=epsilon)


class _Facts:
    """The two facts ``exported_rank`` reads from a match, for a value outside one."""

    def __init__(self) -> None:
        self.memo: dict[ir.Value, int | None] = {}

    def rank(self, value: ir.Value) -> int | None:
        return static_rank(value, self.memo)

    def value_array(self, value: ir.Value) -> np.ndarray | None:
        """A constant's array (``optcc.ir.const_array``: a graph input with a default, which
        a caller may feed, is none)."""
        return optcc.ir.const_array(value)


def _float32_vector(value: ir.Value | None) -> np.ndarray | None:
    array = optcc.ir.const_array(value) if value is not None else None
    return array if array is not None and array.ndim == 1 and array.dtype == np.float32 else None


def _sum_check(ln: ir.Node, facts: _Facts) -> str | None:
    total = ln.inputs[0]
    add = total.producer() if total is not None else None
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return "input is not an Add"
    if not float32_only(*add.inputs, total, ln.outputs[0]):
        return "not float32"
    if any(o.uses() or o.is_graph_output() for o in ln.outputs[1:]):
        return "LayerNormalization's mean/inv_std outputs are used"
    gamma = _float32_vector(ln.inputs[1])
    beta = ln.inputs[2] if len(ln.inputs) > 2 else None
    if gamma is None or (beta is not None and (_float32_vector(beta) is None or _float32_vector(beta).size != gamma.size)):
        return "gamma/beta are not constant float32 vectors of one size"
    axis = ln.attributes.get("axis")
    if axis is not None and axis.as_int() not in (-1, 2):
        return "LayerNormalization not over the last axis"
    if [exported_rank(facts, v) for v in add.inputs] != [3, 3]:  # type: ignore[arg-type]
        return "input and skip not both known to be rank 3"
    return None


def fuse_skip_layernorm_with_sum(model: ir.Model) -> dict[str, str]:
    """``LayerNormalization(Add(x, skip))`` whose sum has other readers ->
    ``SkipLayerNormalization`` with the sum as its fourth output; per LayerNormalization
    over such a sum: "fused" or why not."""
    facts, report = _Facts(), {}
    for graph in optcc.ir.graphs(model):
        fused = False
        for ln in list(graph):
            if ln.op_type != "LayerNormalization" or ln.domain not in ("", "ai.onnx") or ln.inputs[0] is None:
                continue
            total = ln.inputs[0]
            producer = total.producer()
            if producer is None or producer.op_type != "Add" or (
                    not [u for u in total.uses() if u.node is not ln] and not total.is_graph_output()):
                continue  # not a sum, or a sum read once (the skip-layernorm rule's)
            label = ln.name or f"LayerNormalization#{len(report)}"
            reason = _sum_check(ln, facts)
            report[label] = reason or "fused"
            if reason is not None:
                continue
            add = total.producer()
            eps = ln.attributes.get("epsilon")
            skip = ir.Node(MS_DOMAIN, "SkipLayerNormalization", [*add.inputs, *ln.inputs[1:3]],
                           [ir.AttrFloat32("epsilon", 1e-5 if eps is None else eps.as_float())],
                           num_outputs=4, name=ln.name)
            for unused in skip.outputs[1:3]:  # mean and inv_std_var: omitted
                unused.name = ""
            graph.insert_before(ln, skip)
            for old, new in ((ln.outputs[0], skip.outputs[0]), (total, skip.outputs[3])):
                name, type_, shape = old.name, old.type, old.shape
                old.replace_all_uses_with(new, replace_graph_outputs=True)
                new.name, new.type, new.shape = name, type_, shape
            graph.remove(ln, safe=True)
            graph.remove(add, safe=True)
            fused = True
        if fused:
            graph.sort()  # readers of the sum that came before the LayerNormalization
    return report


RULES: tuple[Rule, ...] = (
    Rule("skip-layernorm-bias", _skip_pattern(True), _rewrite_skip, _check_skip, min_opset=17),
    Rule("skip-layernorm", _skip_pattern(False), _rewrite_skip, _check_skip, min_opset=17),
)


class FuseOrtSkipLayerNormPass(RewritePass):
    """Add (+ bias) + LayerNormalization -> com.microsoft.SkipLayerNormalization (-O3)."""

    name = "fuse-ort-skip-layernorm"
    numerics = "fusion"
    rules = RULES

    def call(self, model: ir.Model) -> PassResult:
        result = super().call(model)
        sums = fuse_skip_layernorm_with_sum(model) if optcc.ir.default_opset(model) >= 17 else {}
        modified = result.modified or "fused" in sums.values()
        if modified:
            import_microsoft_domain(model)
        stats = dict(result.stats)
        if sums:
            stats["skip_layernorm_sum"] = sums
        return PassResult(model, modified, stats)
