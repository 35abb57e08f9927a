"""FuseOrtConvActivationPass: Conv (+ residual Add) + activation into com.microsoft.FusedConv.

Rewrites (``y = act(t)``, ``t = Conv(x, W, B?)``; default-domain ops):

- ``conv-<act>``: ``act(Conv(x, W, B?))`` becomes
  ``com.microsoft::FusedConv(x, W, B?, activation=<act>, activation_params=[...])`` for the
  activations onnxruntime's CPU kernel implements (``GetFusedActivationAttr``): Relu,
  Sigmoid, Tanh (no parameters), LeakyRelu ``[alpha]``, HardSigmoid ``[alpha, beta]`` and
  Clip ``[min, max]`` (constant bounds; absent bounds become float32's lowest/largest).
- ``conv-add-<act>`` / ``conv-add``: ``act(Add(Conv(x, W, B?), z))`` (either operand
  order; or the Add alone) becomes ``FusedConv(x, W, B?, z, ...)``: the CPU kernel
  accumulates its optional fourth input Z into the output before the activation
  (``Beta = 1``), exactly the residual Add of ResNet-style blocks.

The Conv's attributes (auto_pad, dilations, group, kernel_shape, pads, strides) are copied;
the activation's output keeps its name, type and shape; the model (and any function that
holds a fused node) gets the ``com.microsoft`` opset import, version 1, when absent.

Preconditions: float32 Conv (onnxruntime's CPU FusedConv kernel is float only; float16,
double and integer Convs are left alone), type known from the Conv's output, its input or
its weight; default-domain opset >= 6 (attribute forms of the activations); Clip bounds
constant scalars with ``min <= max``; for Z, the other Add operand has the very shape of
the Conv's output (static or the same symbolic dims: the kernel does not broadcast Z) and
is not computed from the Conv. The driver (``optcc.rewrite.pattern``) refuses matches whose
Conv (or Add) output is a graph output or has other readers, and never touches
custom-domain ops.

Target: onnxruntime's CPU kernel. A model meant for any other provider as well gets no
FusedConv (``providers`` other than "cpu": the pass changes nothing and says why): the
CUDA/ROCm kernels implement Relu only (a session with any other activation fails to
build), and on CUDA the fused Relu form runs slower than the Conv and Relu it replaces
(benchmarks/cuda_check.md).

Numerics ("fusion"): FusedConv runs the same MLAS convolution as Conv and applies the
activation to its output in place (Z is summed into the accumulator first, instead of in
a separate Add). Relu, LeakyRelu and Clip give the same bits; HardSigmoid, Sigmoid, Tanh
(MLAS's kernels instead of the standalone ops') and the Z sum can differ by a few ulp:
well inside 1e-4 relative.

Stats: ``applied``/``rejected`` per rule (see ``optcc.rewrite.pattern``), ``constants_dropped``
(Clip bounds no longer read) and ``opset_import_added``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from optcc.ir import graphs as oir_graphs
from optcc.ir import const_tensor, subgraphs
from optcc.rewrite import Builder, Match, Op, Pattern, RewritePass, Rule, Var
from optcc.infra import PassResult

__all__ = ["FuseOrtConvActivationPass", "RULES", "MS_DOMAIN", "ACTIVATIONS"]

MS_DOMAIN = "com.microsoft"
MS_OPSET = 1
FLOAT32_LOWEST = float(np.finfo(np.float32).min)
FLOAT32_MAX = float(np.finfo(np.float32).max)

# Activations onnxruntime's CPU FusedConv accepts, and the default value of each
# parameter in the order the kernel reads ``activation_params``.
ACTIVATIONS: dict[str, tuple[tuple[str, float], ...]] = {
    "Relu": (),
    "Sigmoid": (),
    "Tanh": (),
    "LeakyRelu": (("alpha", 0.01),),
    "HardSigmoid": (("alpha", 0.2), ("beta", 0.5)),
    "Clip": (),  # bounds come from inputs (opset >= 11) or attributes (opset < 11)
}


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.as_float())


def _clip_bounds(m: Match) -> tuple[list[float] | None, str | None]:
    """[min, max] of the matched Clip, or the reason they cannot be used."""
    act = m["act"]
    if m.opset < 11:
        bounds = [_float_attr(act, "min", FLOAT32_LOWEST), _float_attr(act, "max", FLOAT32_MAX)]
    else:
        bounds = []
        for key, default in (("min", FLOAT32_LOWEST), ("max", FLOAT32_MAX)):
            if m.get(key) is None:
                bounds.append(default)
                continue
            array = m.array(key)
            if array is None:
                return None, "Clip bounds are not constant"
            if array.size != 1 or array.dtype != np.float32:
                return None, "Clip bounds are not float32 scalars"
            bounds.append(float(array.reshape(-1)[0]))
    if any(np.isnan(b) for b in bounds):
        return None, "Clip bound is NaN"
    if bounds[0] > bounds[1]:
        return None, "Clip min > max"
    return bounds, None


def _activation_params(m: Match) -> tuple[list[float] | None, str | None]:
    act = m.get("act")
    if act is None:
        return [], None
    if act.op_type == "Clip":
        return _clip_bounds(m)
    return [_float_attr(act, name, default) for name, default in ACTIVATIONS[act.op_type]], None


def _elem_type(m: Match) -> ir.DataType | None:
    """The Conv's element type, from its output, its input or its weight (typed, or a
    constant: inside functions values are often untyped)."""
    for value in (m["conv"].outputs[0], m["x"], m["w"]):
        if value is not None and value.dtype is not None:
            return value.dtype
    tensor = const_tensor(m["w"])
    return None if tensor is None else tensor.dtype


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    """Whether two values certainly have the same shape (all dims known or named alike)."""
    if a.shape is None or b.shape is None or a.shape.rank() != b.shape.rank():
        return False
    for da, db in zip(a.shape, b.shape):
        if isinstance(da, ir.SymbolicDim) or isinstance(db, ir.SymbolicDim):
            if not (isinstance(da, ir.SymbolicDim) and isinstance(db, ir.SymbolicDim)):
                return False
            if da.value is None or da.value != db.value:
                return False
        elif int(da) != int(db):
            return False
    return True


def _check(m: Match) -> str | None:
    if any(a.is_ref() for n in m.nodes for a in n.attributes.values()):
        return "attribute refers to a function attribute"
    dtype = _elem_type(m)
    if dtype is None:
        return "unknown element type"
    if dtype != ir.DataType.FLOAT:
        return f"{dtype.name} Conv (onnxruntime's FusedConv kernel is float32 only)"
    if m.get("z") is not None:
        z, conv_out = m["z"], m["conv"].outputs[0]
        if z.dtype not in (None, ir.DataType.FLOAT):
            return "residual operand is not float32"
        add_out = m["add"].outputs[0]
        if not (_same_shape(z, conv_out) or (_same_shape(z, add_out) and _same_shape(conv_out, add_out))):
            return "residual operand shape not known to equal the Conv output's"
    return _activation_params(m)[1]


def _rewrite(m: Match, b: Builder) -> ir.Value:
    conv, act = m["conv"], m.get("act")
    params, _ = _activation_params(m)
    attrs: dict[str, object] = {}
    if act is not None:
        attrs["activation"] = act.op_type
        if params:
            attrs["activation_params"] = [float(p) for p in params]
    inputs: list[ir.Value | None] = [m["x"], m["w"], m.get("b")]
    if m.get("z") is not None:
        inputs.append(m["z"])
    else:
        while inputs and inputs[-1] is None:
            inputs.pop()
    return b.op("FusedConv", *inputs, domain=MS_DOMAIN, attributes=conv.attributes, **attrs)


def _conv() -> Op:
    return Op("Conv", Var("x"), Var("w"), Var("b", optional=True), name="conv")


def _act(op_type: str, inner: Pattern) -> Op:
    if op_type == "Clip":
        return Op("Clip", inner, Var("min", optional=True), Var("max", optional=True), name="act")
    return Op(op_type, inner, name="act")


def _residual() -> Op:
    return Op("Add", _conv(), Var("z"), commute=True, name="add")


def _rules() -> tuple[Rule, ...]:
    # Rules of one root op are tried in order: the residual form (three nodes) first.
    rules: list[Rule] = []
    for op_type in ACTIVATIONS:
        key = op_type.lower()
        rules.append(Rule(f"conv-add-{key}", _act(op_type, _residual()), _rewrite, _check, min_opset=6))
        rules.append(Rule(f"conv-{key}", _act(op_type, _conv()), _rewrite, _check, min_opset=6))
    rules.append(Rule("conv-add", _residual(), _rewrite, _check, min_opset=6))
    return tuple(rules)


RULES: tuple[Rule, ...] = _rules()


def _add_ms_opset(model: ir.Model) -> bool:
    """Import com.microsoft (version 1) in the model and in every function using it."""
    added = False
    if MS_DOMAIN not in model.opset_imports:
        model.opset_imports[MS_DOMAIN] = MS_OPSET
        added = True
    for function in model.functions.values():
        uses = any(n.domain == MS_DOMAIN for n in _function_nodes(function))
        if uses and MS_DOMAIN not in function.opset_imports:
            function.opset_imports[MS_DOMAIN] = MS_OPSET
    return added


def _used_constants(model: ir.Model) -> list[tuple[ir.Graph | ir.Function, ir.Value]]:
    """Initializers and Constant-node outputs that some node reads, per graph."""
    found: list[tuple[ir.Graph | ir.Function, ir.Value]] = []
    for graph in oir_graphs(model):
        if isinstance(graph, ir.Graph):
            found.extend((graph, v) for v in graph.initializers.values() if v.uses())
        for node in graph:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.outputs[0].uses():
                found.append((graph, node.outputs[0]))
    return found


def _drop_orphans(used_before: list[tuple[ir.Graph | ir.Function, ir.Value]]) -> int:
    """Remove the constants among ``used_before`` that nothing reads any more."""
    dropped = 0
    for graph, value in used_before:
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        producer = value.producer()
        if producer is None:
            if isinstance(graph, ir.Graph) and graph.initializers.get(value.name) is value:
                graph.initializers.pop(value.name)
                dropped += 1
        elif producer.graph is not None:
            producer.graph.remove(producer, safe=True)
            dropped += 1
    return dropped


def _function_nodes(function: ir.Function) -> list[ir.Node]:
    found: list[ir.Node] = []
    stack: list[ir.Graph | ir.Function] = [function]
    while stack:
        graph = stack.pop()
        for node in graph:
            found.append(node)
            stack.extend(subgraphs(node))
    return found


class FuseOrtConvActivationPass(RewritePass):
    """Conv (+ same-shape residual Add) + Relu/Sigmoid/Tanh/LeakyRelu/HardSigmoid/Clip
    -> com.microsoft.FusedConv (onnxruntime target, -O3).

    ``providers``: the onnxruntime execution providers the model is meant for ("cpu",
    "cuda", ...). With any provider other than "cpu", nothing is fused (module docstring).
    """

    name = "fuse-ort-conv-activation"
    numerics = "fusion"
    rules = RULES

    def __init__(self, providers: tuple[str, ...] | list[str] = ("cpu",), max_iters: int = 32) -> None:
        super().__init__(max_iters=max_iters)
        self.providers = tuple(p.lower().removesuffix("executionprovider") for p in providers)
        self.not_for = [p for p in self.providers if p != "cpu"]
        if self.not_for:
            self.rules = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(providers={self.providers!r})"

    def call(self, model: ir.Model) -> PassResult:
        if self.not_for:
            reason = f"FusedConv is for onnxruntime's CPU, and the model is also meant for {', '.join(self.not_for)}"
            return PassResult(model, False, {"reason": reason})
        used_before = _used_constants(model)
        result = super().call(model)
        if result.modified:
            # Clip bounds are matched as plain operands (so that non-constant bounds are
            # reported, not silently skipped); drop the constants the fusion orphaned.
            dropped = _drop_orphans(used_before)
            if dropped:
                result.stats["constants_dropped"] = dropped
            if _add_ms_opset(model):
                result.stats["opset_import_added"] = f"{MS_DOMAIN}:{MS_OPSET}"
        return result
