"""FuseOrtTransformerPass: transformer blocks into onnxruntime's com.microsoft ops (-O3).

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
- ``bias-gelu``: ``Gelu(Add(x, bias))`` (standard Gelu, erf form, or com.microsoft Gelu)
  becomes ``BiasGelu(x, bias)``; ``Gelu(.., approximate="tanh")`` or com.microsoft FastGelu
  of ``Add(x, bias)`` becomes ``FastGelu(x, bias)``.
- ``gelu-erf`` / ``gelu-tanh`` below opset 20 (no standard Gelu): the decomposed
  erf/tanh formulas ``fuse-normalization`` matches become com.microsoft ``Gelu`` /
  ``FastGelu`` (then the rule above adds their bias).

Preconditions: float32; LayerNormalization over the last axis (axis -1 or rank-1), x and
skip both of rank 3 (the kernel's input layout: batch, sequence, hidden; the residual
Add of a transformer block adds two such tensors of one shape), gamma/beta/bias constant
vectors of the hidden size; Gelu's bias a constant 1-D vector. Intermediates read
elsewhere block a rule's match (a residual sum read elsewhere is ``skip-layernorm-sum``'s,
without a bias: the sum output would include it); LayerNormalization's mean/inv_std
outputs unused. Stats: ``skip_layernorm_sum``, per LayerNormalization over such a sum,
"fused" or why not.

Numerics ("fusion"): the kernels compute the same formulas in float32 (SkipLayerNorm
sums x + skip (+ bias) then normalizes with the same mean/variance; BiasGelu/Gelu use erf,
FastGelu the same tanh polynomial); rounding-order differences ~1e-6, inside 1e-4.
"""

from __future__ import annotations


import numpy as np
import onnx_ir as ir

import optcc
from optcc.infra import PassResult
from optcc.passes.fuse_attention import exported_rank
from optcc.passes.fuse_normalization import _check_gelu, gelu_rules
from optcc.rewrite import Builder, Const, Match, Op, RewritePass, Rule, Var, static_rank

__all__ = ["FuseOrtTransformerPass", "RULES", "MS_DOMAIN", "fuse_skip_layernorm_with_sum"]

MS_DOMAIN = "com.microsoft"


def _float32(*values: ir.Value | None) -> bool:
    return all(v is None or v.dtype in (None, ir.DataType.FLOAT) for v in values)


def _vector(m: Match, name: str) -> np.ndarray | None:
    array = m.array(name)
    return array if array is not None and array.ndim == 1 and array.dtype == np.float32 else None


# ---------------------------------------------------------------- SkipLayerNormalization


def _skip_pattern(with_bias: bool) -> Op:
    x = Op("Add", Op("MatMul", Var("a"), Var("w"), name="matmul"), Const("bias"), commute=True,
           name="bias_add") if with_bias else Var("x")
    total = Op("Add", x, Var("skip"), commute=True, name="residual")
    return Op("LayerNormalization", total, Const("gamma"), Const("beta", optional=True), name="ln")


def _check_skip(m: Match) -> str | None:
    ln: ir.Node = m["ln"]
    x = m.get("x") if m.get("x") is not None else m["bias_add"].outputs[0]
    if not _float32(x, m["skip"], m.output):
        return "not float32"
    if any(len(o.uses()) or o.is_graph_output() for o in ln.outputs[1:]):
        return "LayerNormalization's mean/inv_std outputs are used"
    gamma = _vector(m, "gamma")
    if gamma is None:
        return "gamma is not a float32 vector"
    size = gamma.size
    for name in ("beta", "bias"):
        if m.get(name) is not None and (_vector(m, name) is None or _vector(m, name).size != size):
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
        return optcc.ir.as_numpy(value)


def _float32_vector(value: ir.Value | None) -> np.ndarray | None:
    array = optcc.ir.as_numpy(value) if value is not None else None
    return array if array is not None and array.ndim == 1 and array.dtype == np.float32 else None


def _sum_check(ln: ir.Node, facts: _Facts) -> str | None:
    total = ln.inputs[0]
    add = total.producer() if total is not None else None
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return "input is not an Add"
    if not _float32(*add.inputs, total, ln.outputs[0]):
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


# ---------------------------------------------------------------- Gelu family


def _gelu_kind(node: ir.Node) -> str | None:
    if node.domain == MS_DOMAIN:
        return {"Gelu": "erf", "FastGelu": "tanh"}.get(node.op_type)
    approximate = node.attributes.get("approximate")
    return "tanh" if approximate is not None and approximate.as_string() == "tanh" else "erf"


def _check_bias_gelu(m: Match) -> str | None:
    node: ir.Node = m["gelu"]
    if node.domain == MS_DOMAIN and len(node.inputs) > 1:
        return "FastGelu already has a bias"
    if not _float32(m["x"], m.output) or _vector(m, "bias") is None:
        return "not float32 with a constant vector bias"
    return None if _gelu_kind(node) else "unknown Gelu form"


def _rewrite_bias_gelu(m: Match, b: Builder) -> ir.Value:
    op = "BiasGelu" if _gelu_kind(m["gelu"]) == "erf" else "FastGelu"
    return b.op(op, m["x"], m["bias"], domain=MS_DOMAIN)


def _bias_gelu_rules() -> list[Rule]:
    rules = []
    for domain, op in (("", "Gelu"), (MS_DOMAIN, "Gelu"), (MS_DOMAIN, "FastGelu")):
        pattern = Op(op, Op("Add", Var("x"), Const("bias"), commute=True), name="gelu", domain=domain)
        rules.append(Rule("bias-gelu", pattern, _rewrite_bias_gelu, _check_bias_gelu))
    return rules


def _contrib_gelu(kind: str):  # noqa: ANN202 - returns a Rewrite
    def rewrite(m: Match, b: Builder) -> ir.Value:
        return b.op("Gelu" if kind == "erf" else "FastGelu", m["x"], domain=MS_DOMAIN)

    return rewrite


def _check_old_opset(kind: str):  # noqa: ANN202 - returns a Check
    inner = _check_gelu(kind)

    def check(m: Match) -> str | None:
        if m.opset >= 20:
            return "opset >= 20: fuse-normalization writes the standard Gelu"
        return inner(m)

    return check


def _decomposed_gelu_rules() -> list[Rule]:
    return gelu_rules(_contrib_gelu, _check_old_opset)


RULES: tuple[Rule, ...] = (
    Rule("skip-layernorm-bias", _skip_pattern(True), _rewrite_skip, _check_skip, min_opset=17),
    Rule("skip-layernorm", _skip_pattern(False), _rewrite_skip, _check_skip, min_opset=17),
    *_decomposed_gelu_rules(),
    *_bias_gelu_rules(),
)


class FuseOrtTransformerPass(RewritePass):
    """Add + LayerNormalization -> SkipLayerNormalization, Gelu(x + b) -> BiasGelu /
    FastGelu, decomposed Gelu below opset 20 -> com.microsoft Gelu / FastGelu (-O3)."""

    name = "fuse-ort-transformer"
    numerics = "fusion"
    rules = RULES

    def call(self, model: ir.Model) -> PassResult:
        result = super().call(model)
        sums = fuse_skip_layernorm_with_sum(model) if optcc.ir.default_opset(model) >= 17 else {}
        modified = result.modified or "fused" in sums.values()
        if modified and MS_DOMAIN not in model.opset_imports:
            model.opset_imports[MS_DOMAIN] = 1
        stats = dict(result.stats)
        if sums:
            stats["skip_layernorm_sum"] = sums
        return PassResult(model, modified, stats)
