"""FuseOrtSkipRmsNormPass: residual Add + decomposed RMSNorm into onnxruntime's
com.microsoft SkipSimplifiedLayerNormalization (opt-in: in no level's pipeline).

Rewrite (below opset 23; from 23 ``fuse-normalization`` writes the standard
RMSNormalization)::

    h = Add(a, skip)
    y = Mul(Mul(h, Reciprocal(Sqrt(Add(ReduceMean(Pow(h, 2) or Mul(h, h), [-1]), eps))))
            or Mul(h, Div(1, Sqrt(...))) or Div(h, Sqrt(...)), gamma)

(``h`` optionally through a float32-to-float32 Cast, the normalized value too, as HF's
LlamaRMSNorm exports; a Cast read elsewhere, as TorchScript's traced residual reads it, is
replaced by the sum output too: it is the same float32 tensor),

becomes ``SkipSimplifiedLayerNormalization(a, skip, gamma, epsilon=eps)``; when ``h`` has
other readers (the next residual Add of a pre-norm decoder such as Llama), the node's
fourth output, ``input_skip_bias_sum`` (the same float32 ``a + skip``, bit for bit),
replaces ``h`` for them and the Add goes.

Why only with a residual Add: onnxruntime registers its SimplifiedLayerNormalization
kernel in the default domain, which onnx's checker rejects (and there is no
com.microsoft SimplifiedLayerNormalization), so a standalone RMSNorm below opset 23 is
left decomposed.

Preconditions (besides ``fuse-normalization``'s for the RMSNorm part: float32, the mean
over the last axis with keepdims, exponent 2, scalar eps, gamma one per element of the
last axis): ``a`` and ``skip`` both rank 3 (the kernel's (batch, sequence, hidden)
layout) with the same declared dims (the kernel's output takes the first input's shape:
a batch-1 input with a batch-B skip would silently lose the batch); the default-domain
opset below 23.

Numerics ("fusion"): the kernel sums in float32 and computes ``x / sqrt(mean(x^2) + eps) *
gamma`` in float32 (rounding-order differences ~1e-7 relative, inside 1e-4).

Cost: onnxruntime 1.32's float32 CPU kernel is not a clear gain over the decomposed ops
(one thread; fastest of 200 runs of four blocks, 1 x 128 tokens, hidden 1024-4096:
1.06-1.18x; a 2-layer Llama exported by torch's dynamo exporter, 4 of its 5 norms fused:
0.96-0.99x at hidden 64, 0.77-1.34x, i.e. within the noise, at hidden 1024), so -O3 (whose
fusions must not make onnxruntime's CPU slower) leaves it out; name it
(``passes=[..., "fuse-ort-skip-rmsnorm"]``, ``--passes``) for a target whose kernel is fast.

Stats: ``applied``/``rejected`` per rule.
"""

from __future__ import annotations

import onnx_ir as ir

import optcc

from optcc.infra import PassResult
from optcc.passes.fuse_normalization import _check_rms, _scalar_near, _vector, rms_pattern
from optcc.passes.fuse_ort_transformer import MS_DOMAIN, MicrosoftRewritePass, float32_only
from optcc.rewrite import Builder, Match, Rule

__all__ = ["FuseOrtSkipRmsNormPass"]

RMS_OPSET = 23


def _float32_cast(node: ir.Node | None) -> bool:
    """A Cast to float32 of a float32 value (a no-op)."""
    if node is None or node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
        return False
    to = node.attributes.get("to")
    return (to is not None and to.as_int() == ir.DataType.FLOAT
            and optcc.ir.element_type(node.inputs[0]) == ir.DataType.FLOAT)


def _residual(x: ir.Value) -> ir.Node | None:
    """The residual Add that computes ``x``, directly or through a no-op float32 Cast."""
    node = x.producer()
    if _float32_cast(node):
        x, node = node.inputs[0], node.inputs[0].producer()
    if node is None or node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    return node if x is node.outputs[0] and all(v is not None for v in node.inputs) else None


def _same_declared_shape(a: ir.Value, b: ir.Value) -> bool:
    if a.shape is None or b.shape is None or a.shape.rank() != 3 or b.shape.rank() != 3:
        return False
    for x, y in zip(a.shape.dims, b.shape.dims):
        if isinstance(x, int) or isinstance(y, int):
            if x != y:
                return False
        elif x.value is None or x.value != y.value:
            return False
    return True


def _check(m: Match) -> str | None:
    if m.opset >= RMS_OPSET:
        return "opset >= 23: fuse-normalization writes the standard RMSNormalization"
    if m.get("cast_out") is not None and not _float32_cast(m["cast_out"]):
        return "a Cast that is not float32 to float32"
    if optcc.ir.element_type(m["x"]) != ir.DataType.FLOAT:
        return "not float32"
    if m.get("one") is not None and not _scalar_near(m, "one", 1.0):
        return "not 1 / sqrt(..)"
    reason = _check_rms(m)
    if reason is not None:
        return reason
    add = _residual(m["x"])
    if add is None:
        return "input is not a residual Add (no onnxruntime op for a standalone RMSNorm below opset 23)"
    a, skip = add.inputs
    if not float32_only(a, skip):
        return "not float32"
    if not _same_declared_shape(a, skip):
        return "Add operands not both rank 3 with the same declared dims"
    return None


def _rewrite(sums: list[tuple[ir.Value, ir.Value]]):  # noqa: ANN202 - returns a Rewrite
    def rewrite(m: Match, b: Builder) -> ir.Value:
        x = m["x"]
        add = _residual(x)
        rank = 3
        size = x.shape[-1] if x.shape is not None and isinstance(x.shape[-1], int) else None
        if size is None:
            size = _vector(m.array("gamma"), None, rank).size
        gamma = _vector(m.array("gamma"), size, rank)
        gamma_value = m["gamma"] if m.array("gamma").shape == gamma.shape else b.const(
            gamma.copy(), f"{m.output.name}_gamma")
        node = ir.Node(MS_DOMAIN, "SkipSimplifiedLayerNormalization", [*add.inputs, gamma_value],
                       [ir.AttrFloat32("epsilon", float(m.array("eps").reshape(())))],
                       num_outputs=4, name=m.root.name)
        for unused in node.outputs[1:]:  # mean, inv_std_var; the sum until it is wired
            unused.name = ""
        b.nodes.append(node)
        sums.append((x, node.outputs[3]))
        return node.outputs[0]

    return rewrite


def _wire_sum(old: ir.Value, new: ir.Value) -> None:
    """The remaining readers of the sum (or of its no-op Cast) read the kernel's sum output
    instead; the Cast and the Add go when nothing else reads them."""
    node = new.producer()
    if node is None or node.graph is None:
        return
    graph = node.graph
    if old.uses() or old.is_graph_output():
        name, type_, shape = old.name, old.type, old.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        old.name = None
        new.name, new.type, new.shape = name, type_, shape
        graph.sort()  # readers of the sum placed between the Add and the norm
    value = old
    while value is not None and value.producer() is not None and value.producer().graph is graph \
            and not value.uses() and not value.is_graph_output():
        producer = value.producer()
        nxt = producer.inputs[0] if producer.op_type == "Cast" else None
        graph.remove(producer, safe=True)
        value = nxt


class FuseOrtSkipRmsNormPass(MicrosoftRewritePass):
    """Add + decomposed RMSNorm -> com.microsoft.SkipSimplifiedLayerNormalization (opt-in)."""

    name = "fuse-ort-skip-rmsnorm"
    numerics = "fusion"
    rules = ()

    def call(self, model: ir.Model) -> PassResult:
        sums: list[tuple[ir.Value, ir.Value]] = []
        self.rules = tuple(Rule("skip-rmsnorm", rms_pattern(square, normalize, cast_out), _rewrite(sums), _check)
                           for square in ("pow", "mul") for normalize in ("reciprocal", "div", "div-one")
                           for cast_out in (True, False))
        result = super().call(model)
        for old, new in sums:
            _wire_sum(old, new)
        return result
