"""FuseOrtTransformerPass: the Gelu family into onnxruntime's com.microsoft ops (-O3).

Rewrites (onnxruntime target; com.microsoft opset 1 imported when used):

- ``bias-gelu``: ``Gelu(Add(x, bias))`` (standard Gelu, erf form, or com.microsoft Gelu)
  becomes ``BiasGelu(x, bias)``; ``Gelu(.., approximate="tanh")`` or com.microsoft FastGelu
  of ``Add(x, bias)`` becomes ``FastGelu(x, bias)``.
- ``gelu-erf`` / ``gelu-tanh`` below opset 20 (no standard Gelu): the decomposed
  erf/tanh formulas ``fuse-normalization`` matches become com.microsoft ``Gelu`` /
  ``FastGelu`` (then the rule above adds their bias).

(Add + LayerNormalization into SkipLayerNormalization is ``fuse-ort-skip-layernorm``.)

Preconditions: float32; Gelu's bias a constant 1-D vector; intermediates read elsewhere
block a match.

Numerics ("fusion"): the kernels compute the same formulas in float32 (BiasGelu/Gelu use
erf, FastGelu the same tanh polynomial); rounding-order differences ~1e-6, inside 1e-4.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from optcc.infra import PassResult
from optcc.passes.fuse_normalization import _check_gelu, gelu_rules
from optcc.rewrite import Builder, Const, Match, Op, RewritePass, Rule, Var

__all__ = ["FuseOrtTransformerPass", "MicrosoftRewritePass", "RULES", "MS_DOMAIN", "float32_only", "float_vector",
           "import_microsoft_domain"]

MS_DOMAIN = "com.microsoft"


def float32_only(*values: ir.Value | None) -> bool:
    """Whether every given value is float32 (or of unknown type)."""
    return all(v is None or v.dtype in (None, ir.DataType.FLOAT) for v in values)


def float_vector(m: Match, name: str) -> np.ndarray | None:
    """The match's constant ``name`` when it is a float32 vector, else None."""
    array = m.array(name)
    return array if array is not None and array.ndim == 1 and array.dtype == np.float32 else None


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
    if not float32_only(m["x"], m.output) or float_vector(m, "bias") is None:
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
    *_decomposed_gelu_rules(),
    *_bias_gelu_rules(),
)


def import_microsoft_domain(model: ir.Model) -> None:
    """Import com.microsoft (opset 1) into ``model``, once it holds ops of that domain."""
    if MS_DOMAIN not in model.opset_imports:
        model.opset_imports[MS_DOMAIN] = 1


class MicrosoftRewritePass(RewritePass):
    """A rewrite pass whose rules write com.microsoft ops: it imports that domain when it
    changed the model."""

    def call(self, model: ir.Model) -> PassResult:
        result = super().call(model)
        if result.modified:
            import_microsoft_domain(model)
        return result


class FuseOrtTransformerPass(MicrosoftRewritePass):
    """Gelu(x + b) -> BiasGelu / FastGelu, decomposed Gelu below opset 20 ->
    com.microsoft Gelu / FastGelu (-O3)."""

    name = "fuse-ort-transformer"
    numerics = "fusion"
    rules = RULES
