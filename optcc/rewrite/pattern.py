"""optcc.rewrite.pattern: a small declarative rewrite engine over onnx-ir.

A fusion is a list of ``Rule`` objects. A rule keeps three things apart, as onnxscript's
rewriter does: the **pattern** (a tree of ``Op`` / ``Var`` / ``Const`` rooted at one
node), the **check** (``check(match) -> None | reason``: why a structural match is
refused) and the **rewrite** (``rewrite(match, builder) -> Value``: the replacement of
the root's first output, built with ``Builder``). Rules are dispatched by the root's op
type, as in tinygrad's ``PatternMatcher``.

The driver (``apply_rules``, or the ``RewritePass`` base class) walks every graph with
``optcc.ir.graphs`` (main graph, functions, If/Loop/Scan bodies) and, for every rule,
enforces the safety rules so that rules need not repeat them:

- only default-domain nodes match (``Op(..., domain=...)`` opts in to another domain);
- every matched node lives in the graph being rewritten;
- no value computed inside the match (other than the root's first output) is read
  outside the match, or is a graph output;
- the root's other outputs are unused;
- a ``Const(..., exclusive=True)`` (a weight the rewrite replaces) is read only by
  matched nodes (else: rejected as "shared weight '<name>'");
- the replacement value takes the root output's name, type and shape, so graph outputs
  and value names are kept; then the matched nodes and the constants only they read
  are removed.

The driver runs a worklist to a fixed point: round 1 visits every node (consumers
before producers, so the largest pattern wins), later rounds visit what a rewrite
created or touched (again the consumers of its result before the nodes it built). It stops after ``max_iters`` rounds with a ``RuntimeWarning``
and ``stats["capped"]`` rather than silently. Stats count applications per rule and
rejections per rule and reason (each node counted once per rule and reason).

Example::

    rule = Rule(
        "double-neg",
        Op("Neg", Op("Neg", Var("x"))),
        rewrite=lambda m, b: b.op("Identity", m["x"]),
    )
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Union

import numpy as np
import onnx_ir as ir

from optcc import ir as oir
from optcc.infra.pass_base import Pass, PassResult

__all__ = [
    "Op",
    "Var",
    "Const",
    "Pattern",
    "Match",
    "Builder",
    "Rule",
    "RewriteStats",
    "apply_rules",
    "RewritePass",
    "static_rank",
]

DEFAULT_DOMAINS = ("", "ai.onnx")


# --------------------------------------------------------------------------- patterns


@dataclasses.dataclass(frozen=True, eq=False)
class Var:
    """Matches any value (``optional``: also a missing input); the same name twice must
    bind the same value."""

    name: str
    optional: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class Const:
    """Matches a constant (an initializer that is not a graph input, or a Constant
    node's output). ``exclusive``: only nodes of the match may read it."""

    name: str
    optional: bool = False
    exclusive: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class Op:
    """Matches the first output of a node of ``op_type`` (a name or a tuple of names)
    whose inputs match ``inputs`` in order (missing trailing inputs match only optional
    patterns; extra non-empty inputs never match). ``commute``: a two-input op may also
    match with its inputs swapped. ``name`` binds the node in the match; one ``Op``
    object used twice in a pattern must match the same node."""

    op_type: Union[str, tuple[str, ...]]
    inputs: tuple[Pattern, ...]
    name: str | None = None
    commute: bool = False
    domain: str = ""

    def __init__(
        self,
        op_type: Union[str, tuple[str, ...]],
        *inputs: Pattern,
        name: str | None = None,
        commute: bool = False,
        domain: str = "",
    ) -> None:
        object.__setattr__(self, "op_type", op_type)
        object.__setattr__(self, "inputs", tuple(inputs))
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "commute", commute)
        object.__setattr__(self, "domain", domain)

    @property
    def op_types(self) -> tuple[str, ...]:
        return (self.op_type,) if isinstance(self.op_type, str) else tuple(self.op_type)

    def depth(self) -> int:
        return 1 + max((p.depth() for p in self.inputs if isinstance(p, Op)), default=0)


Pattern = Union[Op, Var, Const]


# --------------------------------------------------------------------------- matches


def _is_node(obj: object) -> bool:
    """``isinstance(obj, ir.Node)``, the common kinds (a node, a value, None) decided by their
    type: an isinstance check of onnx-ir's classes runs typing's Protocol check in Python."""
    kind = type(obj)
    if kind is ir.Node:
        return True
    if kind is ir.Value or obj is None:
        return False
    return isinstance(obj, ir.Node)


def _body(graph: ir.Graph | ir.Function) -> ir.Graph:
    """The graph whose nodes a graph-like holds (a function's is its ``.graph``)."""
    return graph.graph if isinstance(graph, ir.Function) else graph


@dataclasses.dataclass(frozen=True)
class _Scope:
    """The graph being rewritten and what rules need to know about it."""

    graph: ir.Graph | ir.Function
    opset: int
    # Below IR version 4 every initializer is also listed as a graph input and is a
    # constant (onnxruntime does not let a caller override it); new constants must then
    # be Constant nodes, as an initializer would need a graph input of its own.
    legacy_initializers: bool
    # static ranks found so far (see ``static_rank``); a rewrite keeps its root's shape,
    # so an entry stays true while the graph is rewritten
    ranks: dict[ir.Value, int | None] = dataclasses.field(default_factory=dict, compare=False)
    # the array of each constant tensor decoded so far: tensors are never modified in
    # place (a rewrite builds new ones), so decoding one again would give the same array;
    # nothing writes to these arrays
    arrays: dict[ir.TensorProtocol, np.ndarray] = dataclasses.field(default_factory=dict, compare=False)

    @functools.cached_property
    def body(self) -> ir.Graph:
        return _body(self.graph)  # isinstance against onnx-ir's Protocol classes is slow

    def const_array(self, value: ir.Value) -> np.ndarray | None:
        """``_const_array(value, self.legacy_initializers)``, each tensor decoded once."""
        return _const_array(value, self.legacy_initializers, self._decoded)

    def _decoded(self, tensor: ir.TensorProtocol) -> np.ndarray:
        array = self.arrays.get(tensor)
        if array is None:
            array = self.arrays[tensor] = oir.decoded(tensor)
        return array


def _const_array(value: ir.Value, legacy_initializers: bool = False,
                 decode: Callable[[ir.TensorProtocol], np.ndarray] | None = None) -> np.ndarray | None:
    """The constant array behind ``value`` (``optcc.ir.const_array``: an initializer that is
    also a graph input only with ``legacy_initializers``; ``decode`` reads a tensor's,
    default its ``numpy()``), None when it is not a constant."""
    return oir.const_array(value, inputs_constant=legacy_initializers, decode=decode or _tensor_numpy)


def _tensor_numpy(tensor: ir.TensorProtocol) -> np.ndarray:
    # an external tensor through its file's shared map (onnx-ir's own would stay open with the tensor)
    return oir.mapped(tensor)


class Match:
    """What a pattern bound: ``match["x"]`` is the value of ``Var``/``Const`` "x" or the
    node of ``Op(name="x")``; ``match.array("w")`` the constant's numpy array (None
    for a missing optional input)."""

    def __init__(
        self,
        root: ir.Node,
        scope: _Scope,
        bindings: Mapping[Any, Any],
        nodes: Sequence[ir.Node],
    ) -> None:
        self.root = root
        self.scope = scope
        self.graph = scope.graph
        self.opset = scope.opset
        self.nodes = list(nodes)
        self._bindings = {k: v for k, v in bindings.items() if isinstance(k, str)}

    def __getitem__(self, name: str) -> Any:
        return self._bindings[name]

    def get(self, name: str) -> Any:
        return self._bindings.get(name)

    def values(self) -> list[ir.Value | None]:
        """The values bound by ``Var`` and ``Const`` patterns."""
        return [v for v in self._bindings.values() if not _is_node(v)]

    def array(self, name: str) -> np.ndarray | None:
        value = self._bindings.get(name)
        return None if value is None else self.value_array(value)

    @property
    def output(self) -> ir.Value:
        """The root's first output: what the replacement stands in for."""
        return self.root.outputs[0]

    def value_array(self, value: ir.Value) -> np.ndarray | None:
        """The constant array behind any ``value`` (None when it is not a constant), with
        the same rules as ``Const`` (e.g. for a node found outside the pattern)."""
        return self.scope.const_array(value)

    def rank(self, value: ir.Value) -> int | None:
        """The static rank of ``value`` (see ``static_rank``), None when unknown."""
        return static_rank(value, self.scope.ranks, self.scope.legacy_initializers)


# --------------------------------------------------------------------------- ranks

# ops whose first output has the rank of their first input
_SAME_RANK_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "BatchNormalization",
    "Cast", "CastLike", "Ceil", "Celu", "Clip", "Conv", "ConvTranspose", "Cos", "Cosh",
    "CumSum", "DepthToSpace", "DequantizeLinear", "Dropout", "DynamicQuantizeLinear", "Elu", "Erf", "Exp",
    "Floor", "Gelu", "GlobalAveragePool",
    "GlobalLpPool", "GlobalMaxPool", "HardSigmoid", "HardSwish", "Hardmax", "Identity",
    "InstanceNormalization", "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Log",
    "LogSoftmax", "LpNormalization", "LpPool", "LRN", "MaxPool", "MeanVarianceNormalization",
    "Mish", "Neg", "Not", "Pad", "PRelu", "QuantizeLinear", "Reciprocal", "Relu", "Resize", "Round", "Selu",
    "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Slice", "Softmax", "Softplus", "Softsign",
    "SpaceToDepth", "Split", "Sqrt", "Tan", "Tanh", "ThresholdedRelu", "Tile", "Transpose",
    "Trilu", "Upsample",
})
# elementwise ops with multidirectional broadcasting: the largest input rank
_BROADCAST_OPS = frozenset({
    "Add", "And", "BitShift", "Div", "Equal", "Greater", "GreaterOrEqual", "Less",
    "LessOrEqual", "Max", "Mean", "Min", "Mod", "Mul", "Or", "Pow", "Sub", "Sum", "Where", "Xor",
})
_RANK_DEPTH = 256


def static_rank(
    value: ir.Value, memo: dict[ir.Value, int | None] | None = None,
    legacy_initializers: bool = False,
) -> int | None:
    """The rank ``value`` has for every input the graph admits, or None when unknown.

    From the value's declared shape, else its constant data, else from its producer by
    rules that hold whatever the input data (same rank as the first input for
    elementwise, pooling, convolution and layout ops; the largest input rank for
    broadcasting ops; any input's for Concat; 2 for Gemm/Flatten; 1 for Shape/Range; a
    constant target's length for Reshape; the larger of the input's and the target's
    length for Expand; the perm's length for Transpose; the data's rank plus the indices'
    less one for Gather; ...). Producers are followed at most ``_RANK_DEPTH`` deep; ``memo``
    caches results between calls (reuse it while ranks cannot change).
    """
    memo = {} if memo is None else memo
    # iterative depth-first walk: deep chains (DenseNet's Concats) must not hit Python's
    # recursion limit
    stack: list[tuple[ir.Value, int]] = [(value, 0)]
    while stack:
        current, depth = stack[-1]
        if current in memo:
            stack.pop()
            continue
        rank, needed = _rank_step(current, memo, legacy_initializers)
        if needed and depth < _RANK_DEPTH:
            stack.extend((v, depth + 1) for v in needed)
            continue
        memo[current] = rank
        stack.pop()
    return memo[value]


def _rank_step(
    value: ir.Value, memo: Mapping[ir.Value, int | None], legacy: bool
) -> tuple[int | None, list[ir.Value]]:
    """The rank of ``value`` from what ``memo`` knows, or the values still to rank."""
    if value.shape is not None:
        return value.shape.rank(), []
    node = value.producer()
    if node is None or node.domain not in DEFAULT_DOMAINS:
        array = _const_array(value, legacy) if node is None else None
        return (None if array is None else array.ndim), []
    op = node.op_type
    if value is not node.outputs[0] and op != "Split":
        return None, []  # e.g. BatchNormalization's running statistics are 1-D
    if op == "Constant":
        array = _const_array(value, legacy)
        return (None if array is None else array.ndim), []
    if op in ("Gemm", "Flatten"):
        return 2, []
    if op in ("Shape", "Size", "Range"):
        return (0 if op == "Size" else 1), []
    if op == "Transpose" and "perm" in node.attributes:
        return len(node.attributes["perm"].as_ints()), []  # perm lists every axis once
    inputs = [v for v in node.inputs if v is not None]
    if not inputs:
        return None, []
    if op in _SAME_RANK_OPS or op == "Concat":
        candidates = inputs[:1] if op != "Concat" else inputs[::-1]
        if op in ("Conv", "ConvTranspose") and len(inputs) > 1:
            weight = _const_array(node.inputs[1], legacy)
            if weight is not None:
                return weight.ndim, []
        known = [memo[v] for v in candidates if v in memo and memo[v] is not None]
        if known:
            return known[0], []
        missing = [v for v in candidates if v not in memo]
        return None, missing[:1]  # Concat: the last input first (usually the shortest path)
    if op in _BROADCAST_OPS:
        missing = [v for v in inputs if v not in memo]
        if missing:
            return None, missing
        ranks = [memo[v] for v in inputs]
        return (None if any(r is None for r in ranks) else max(ranks)), []
    if op == "Reshape" and len(inputs) == 2:
        target = _const_array(node.inputs[1], legacy)
        return (None if target is None or target.ndim != 1 else int(target.size)), []
    if op in ("Unsqueeze", "Squeeze"):
        axes = _axes(node, legacy)
        if axes is None:
            return None, []
        if inputs[0] not in memo:
            return None, inputs[:1]
        base = memo[inputs[0]]
        if base is None:
            return None, []
        return (base + len(axes) if op == "Unsqueeze" else base - len(axes)), []
    if op == "Expand" and len(inputs) == 2:
        target = _const_array(node.inputs[1], legacy)
        length = target.size if target is not None and target.ndim == 1 else None
        if length is None:
            shape = node.inputs[1].shape
            length = shape[0] if shape is not None and shape.rank() == 1 and isinstance(shape[0], int) else None
        if length is None:
            return None, []
        if inputs[0] not in memo:
            return None, inputs[:1]
        base = memo[inputs[0]]
        return (None if base is None else max(base, length)), []
    if op in ("Gather", "MatMul") and len(inputs) == 2:
        missing = [v for v in inputs if v not in memo]
        if missing:
            return None, missing
        ra, rb = memo[inputs[0]], memo[inputs[1]]
        if op == "Gather":  # the data's axes with the one indexed replaced by the indices'
            return (None if ra is None or rb is None or ra < 1 else ra + rb - 1), []
        if ra is None or rb is None or ra < 2 or rb < 2:
            return None, []
        return max(ra, rb), []
    return None, []


def _axes(node: ir.Node, legacy: bool) -> list[int] | None:
    """Unsqueeze/Squeeze axes (attribute before opset 13, else a constant input)."""
    attr = node.attributes.get("axes")
    if attr is not None:
        return list(attr.value)
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        array = _const_array(node.inputs[1], legacy)
        return None if array is None else [int(a) for a in array.reshape(-1)]
    return None


def _input_of(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if i < len(node.inputs) else None


def _match(
    pattern: Pattern,
    value: ir.Value | None,
    scope: _Scope,
    bindings: dict[Any, Any],
) -> Iterator[dict[Any, Any]]:
    """Every way ``pattern`` matches ``value``, as extended copies of ``bindings``."""
    if isinstance(pattern, (Var, Const)):
        if value is None:
            if pattern.optional and bindings.get(pattern.name, None) is None:
                yield {**bindings, pattern.name: None}
            return
        if isinstance(pattern, Const) and scope.const_array(value) is None:
            return
        if pattern.name in bindings:
            if bindings[pattern.name] is value:
                yield bindings
            return
        yield {**bindings, pattern.name: value}
        return
    if value is None:
        return
    node = value.producer()
    if node is None or node.graph is not scope.body or value is not node.outputs[0]:
        return
    domains = DEFAULT_DOMAINS if pattern.domain in DEFAULT_DOMAINS else (pattern.domain,)
    if node.op_type not in pattern.op_types or node.domain not in domains:
        return
    yield from _match_node(pattern, node, scope, bindings)


def _match_node(
    pattern: Op, node: ir.Node, scope: _Scope, bindings: dict[Any, Any]
) -> Iterator[dict[Any, Any]]:
    key = pattern.name if pattern.name is not None else ("#op", id(pattern))
    if key in bindings:
        if bindings[key] is node:
            yield bindings
        return
    if any(v is not None for v in node.inputs[len(pattern.inputs):]):
        return
    bindings = {**bindings, key: node}
    orders = [pattern.inputs]
    if pattern.commute and len(pattern.inputs) == 2:
        orders.append(pattern.inputs[::-1])
    for order in orders:
        if _ops_may_match(order, node):
            yield from _match_inputs(order, node, 0, scope, bindings)


def _ops_may_match(patterns: Sequence[Pattern], node: ir.Node) -> bool:
    """False when an ``Op`` among ``patterns`` cannot match the input of ``node`` at its
    position, for want of a producer of one of its op types (what ``_match`` checks
    first): an order that fails so is dropped before any binding is built."""
    inputs = node.inputs
    for i, pattern in enumerate(patterns):
        if isinstance(pattern, Op):
            value = inputs[i] if i < len(inputs) else None
            producer = None if value is None else value.producer()
            if producer is None or producer.op_type not in pattern.op_types:
                return False
    return True


def _match_inputs(
    patterns: Sequence[Pattern],
    node: ir.Node,
    i: int,
    scope: _Scope,
    bindings: dict[Any, Any],
) -> Iterator[dict[Any, Any]]:
    if i == len(patterns):
        yield bindings
        return
    for extended in _match(patterns[i], _input_of(node, i), scope, bindings):
        yield from _match_inputs(patterns, node, i + 1, scope, extended)


def _consts_of(pattern: Pattern, out: dict[str, bool]) -> dict[str, bool]:
    if isinstance(pattern, Const):
        out[pattern.name] = out.get(pattern.name, False) or pattern.exclusive
    elif isinstance(pattern, Op):
        for p in pattern.inputs:
            _consts_of(p, out)
    return out


# --------------------------------------------------------------------------- building


class Builder:
    """Builds the replacement: new nodes (inserted before the root) and constants
    (initializers of a graph; Constant nodes in a function, which has none)."""

    def __init__(self, match: Match, rule_name: str, names: oir.ModelNames) -> None:
        self._match = match
        self._rule = rule_name
        self._names = names
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []

    def _name(self, base: str) -> str:
        return self._names.value(base)

    def op(
        self,
        op_type: str,
        *inputs: ir.Value | None,
        domain: str = "",
        attributes: Mapping[str, ir.Attr] | None = None,
        **attrs: Any,
    ) -> ir.Value:
        """A new node with one output; ``attributes``: ir.Attr objects to carry over (e.g. a
        matched node's; the objects themselves: no pass modifies an attribute in place, a
        changed attribute is a new object), ``attrs``: Python values (int, float, str, lists)."""
        # a node's attributes: the UserDict's own dict (its Mapping methods are slow)
        given = attributes.data if isinstance(attributes, collections.UserDict) else (attributes or {})
        copied = [a for a in given.values() if a.name not in attrs]
        copied.extend(ir.convenience.convert_attributes(attrs))
        root_name = self._match.root.name or self._match.root.op_type
        node = ir.Node(
            domain,
            op_type,
            list(inputs),
            copied,
            num_outputs=1,
            name=self._names.node(f"{root_name}/{self._rule}"),
        )
        node.outputs[0].name = self._name(f"{self._match.output.name or 'v'}_{op_type.lower()}")
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, array: np.ndarray, base: str) -> ir.Value:
        """A new constant holding ``array`` (never shared with another tensor)."""
        name = self._name(base)
        # ir.Tensor directly: what ir.tensor() builds for an ndarray, without its Protocol checks
        tensor = ir.Tensor(np.array(array, copy=True), name=name)
        if isinstance(self._match.graph, ir.Graph) and not self._match.scope.legacy_initializers:
            value = ir.Value(
                name=name, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=tensor.shape
            )
            self.initializers.append(value)
            return value
        node = ir.Node("", "Constant", [], [ir.AttrTensor("value", tensor)], num_outputs=1,
                       name=self._names.node(f"{name}/Constant"))
        node.outputs[0].name = name
        self.nodes.append(node)
        return node.outputs[0]


# --------------------------------------------------------------------------- rules


Check = Callable[[Match], Union[str, None]]
Rewrite = Callable[[Match, Builder], ir.Value]


@dataclasses.dataclass(frozen=True, eq=False)
class Rule:
    """A named rewrite: ``pattern`` (rooted at an ``Op``), ``check`` (None to accept,
    else the reason for refusing) and ``rewrite`` (returns the new value replacing the
    root's first output; it must be produced by a node the builder made)."""

    name: str
    pattern: Op
    rewrite: Rewrite
    check: Check | None = None
    min_opset: int = 0


@dataclasses.dataclass
class RewriteStats:
    applied: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    rejected: dict[str, collections.Counter] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    capped: int = 0

    @property
    def modified(self) -> bool:
        return sum(self.applied.values()) > 0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"applied": dict(sorted(self.applied.items()))}
        rejected = {r: dict(sorted(c.items())) for r, c in sorted(self.rejected.items()) if c}
        if rejected:
            out["rejected"] = rejected
        if self.capped:
            out["capped"] = self.capped
        return out


def _safety_problem(match: Match, consts: Mapping[str, bool]) -> str | None:
    inside = set(match.nodes)
    for extra in match.root.outputs[1:]:
        if extra.uses() or extra.is_graph_output():
            return f"output '{extra.name}' of the root is used"
    for node in match.nodes:
        if node is match.root:
            continue
        for value in node.outputs:
            if value.is_graph_output():
                return f"intermediate '{value.name}' is a graph output"
            if any(use.node not in inside for use in value.uses()):
                return f"intermediate '{value.name}' has readers outside the match"
    for value in match.values():
        if value is not None and value.producer() in inside:
            return f"'{value.name}' is both computed inside the match and read as an operand"
    for name, exclusive in consts.items():
        value = match.get(name)
        if exclusive and value is not None:
            if value.is_graph_output() or any(u.node not in inside for u in value.uses()):
                return f"shared weight '{name}'"
    return None


def _drop_if_unused(value: ir.Value, graph: ir.Graph | ir.Function) -> None:
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    producer = value.producer()
    if producer is None:
        if isinstance(graph, ir.Graph) and graph.initializers.get(value.name) is value:
            graph.initializers.pop(value.name)
    elif producer.graph is _body(graph) and producer.op_type == "Constant" and len(producer.outputs) == 1:
        graph.remove(producer, safe=True)


def _replace(
    match: Match, builder: Builder, new: ir.Value, consts: Mapping[str, bool], names: oir.ModelNames
) -> None:
    graph, root, old = match.graph, match.root, match.output
    if new.producer() not in builder.nodes:
        raise ValueError("a rewrite must return a value produced by a node it built")
    for value in builder.initializers:
        assert isinstance(graph, ir.Graph)
        graph.register_initializer(value)
    graph.insert_before(root, builder.nodes)
    name, type_, shape = old.name, old.type, old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = names.value(f"{name}_replaced")
    new.name, new.type, new.shape = name, type_, shape
    graph.remove(list(reversed(match.nodes)), safe=True)
    for const_name in consts:
        value = match.get(const_name)
        if value is not None:
            _drop_if_unused(value, graph)


def _downstream(values: Sequence[ir.Value], depth: int) -> list[ir.Node]:
    """The readers of ``values`` and their readers, ``depth`` levels down, each once, in the
    order first met (a dict: with a list, a value read by many nodes, such as a shared
    weight, would make the membership test quadratic)."""
    found: dict[ir.Node, None] = {}
    frontier = list(values)
    for _ in range(depth):
        nxt = []
        for value in frontier:
            for use in value.uses():
                if use.node not in found:
                    found[use.node] = None
                    nxt.extend(use.node.outputs)
        frontier = nxt
    return list(found)


def _graph_opset(graph: ir.Graph | ir.Function, model_opset: int) -> int:
    if isinstance(graph, ir.Function):
        return int(graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", model_opset)))
    return model_opset


def _rewrite_graph(
    scope: _Scope,
    rules: Sequence[Rule],
    max_iters: int,
    stats: RewriteStats,
    names: oir.ModelNames,
) -> None:
    graph = scope.graph
    by_op: dict[str, list[Rule]] = collections.defaultdict(list)
    for rule in rules:
        if scope.opset >= rule.min_opset:
            for op_type in rule.pattern.op_types:
                by_op[op_type].append(rule)
    if not by_op:
        return
    depth = max(rule.pattern.depth() for rule in rules)
    consts: dict[Rule, dict[str, bool]] = {}  # each matched rule's constants (``_consts_of``), read only
    seen_rejections: set[tuple[str, int, str]] = set()
    keep_alive: list[ir.Node] = []  # ids stay unique while the nodes are referenced
    worklist = list(reversed(list(graph)))
    for _ in range(max_iters):
        if not worklist:
            return
        pending: list[ir.Node] = []
        for node in worklist:
            if node.graph is not scope.body:
                continue  # removed by an earlier rewrite
            node_rules = by_op.get(node.op_type)
            if not node_rules:
                continue  # no rule is rooted at this op
            touched = _try_rules(node, scope, node_rules, consts, stats,
                                 seen_rejections, keep_alive, names)
            if touched is not None:
                new_nodes, inputs = touched
                # consumers first (farthest first), as in round 1: the largest pattern wins
                pending.extend(reversed(_downstream([n.outputs[0] for n in new_nodes], depth)))
                pending.extend(reversed(new_nodes))
                pending.extend(_downstream(inputs, depth))
        worklist = list(dict.fromkeys(pending))
    if worklist:
        stats.capped += 1
        warnings.warn(
            f"optcc.rewrite.pattern: graph '{graph.name}' did not reach a fixed point within "
            f"{max_iters} rounds; stopping with rewrites pending",
            RuntimeWarning,
            stacklevel=3,
        )


def _try_rules(
    node: ir.Node,
    scope: _Scope,
    rules: Sequence[Rule],
    consts_by_rule: dict[Rule, dict[str, bool]],
    stats: RewriteStats,
    seen: set[tuple[str, int, str]],
    keep_alive: list[ir.Node],
    names: oir.ModelNames,
) -> tuple[list[ir.Node], list[ir.Value]] | None:
    if node.domain not in DEFAULT_DOMAINS:
        rules = [r for r in rules if r.pattern.domain == node.domain]
    elif rules:
        rules = [r for r in rules if r.pattern.domain in DEFAULT_DOMAINS]
    for rule in rules:
        for bindings in _match_node(rule.pattern, node, scope, {}):
            nodes = [v for v in bindings.values() if _is_node(v)]
            consts = consts_by_rule.get(rule)  # by identity (Rule: eq=False)
            if consts is None:
                consts = consts_by_rule[rule] = _consts_of(rule.pattern, {})
            match = Match(node, scope, bindings, nodes)
            reason = _safety_problem(match, consts)
            if reason is None and rule.check is not None:
                reason = rule.check(match)
            if reason is not None:
                key = (rule.name, id(node), reason)
                if key not in seen:
                    seen.add(key)
                    keep_alive.append(node)
                    stats.rejected[rule.name][reason] += 1
                continue
            builder = Builder(match, rule.name, names)
            new = rule.rewrite(match, builder)
            inputs = [v for n in match.nodes for v in n.inputs if v is not None]
            _replace(match, builder, new, consts, names)
            stats.applied[rule.name] += 1
            return builder.nodes, inputs
    return None


def apply_rules(
    model: ir.Model, rules: Sequence[Rule], *, max_iters: int = 32
) -> RewriteStats:
    """Rewrite every graph of ``model`` in place with ``rules`` to a fixed point (at most
    ``max_iters`` worklist rounds per graph; hitting the cap warns)."""
    stats = RewriteStats()
    model_opset = oir.default_opset(model)
    legacy = oir.initializers_are_constant(model)
    names = oir.ModelNames(model)  # collected on the first name a rewrite takes
    for graph in list(oir.graphs(model)):
        scope = _Scope(graph, _graph_opset(graph, model_opset), legacy)
        _rewrite_graph(scope, rules, max_iters, stats, names)
    return stats


class RewritePass(Pass):
    """A pass made of rules: subclasses set ``name``, ``level``, ``numerics`` and
    ``rules`` (a tuple of ``Rule``; ``active_rules`` when options choose among them).
    Stats: ``applied`` per rule, ``rejected`` per rule and reason, ``capped`` when a graph
    hit the round cap."""

    rules: ClassVar[tuple[Rule, ...]] = ()
    numerics = "fusion"

    def __init__(self, max_iters: int = 32) -> None:
        super().__init__()
        self.max_iters = max_iters

    def active_rules(self) -> tuple[Rule, ...]:
        """The rules this pass applies (``rules`` unless its options choose others)."""
        return self.rules

    def _only_rules(self) -> bool:
        """Whether the pass only applies its rules (no ``call`` of its own, which may do more)."""
        return type(self).call is RewritePass.call

    def changes_nothing(self, ops: Collection[str]) -> bool:
        """For a pass that only applies its rules: whether no rule can match a model whose
        op histogram has the keys ``ops``, i.e. each rule's pattern names an ``Op`` none of
        whose op types is among them (``_rule_ops``); with no match in its first round,
        ``apply_rules`` rewrites nothing. Else ``Pass.changes_nothing``."""
        if not self._only_rules():
            return super().changes_nothing(ops)
        return not any(all(not kinds.isdisjoint(ops) for kinds in _rule_ops(rule)) for rule in self.active_rules())

    def call(self, model: ir.Model) -> PassResult:
        stats = apply_rules(model, self.active_rules(), max_iters=self.max_iters)
        return PassResult(model, stats.modified, stats.as_dict())


def _op_names(pattern: Op) -> frozenset[str]:
    """The ``op_histogram`` keys of the nodes an ``Op`` pattern can match."""
    if pattern.domain in DEFAULT_DOMAINS:
        return frozenset(pattern.op_types)
    return frozenset(f"{pattern.domain}::{op}" for op in pattern.op_types)


def _rule_ops(rule: Rule) -> list[frozenset[str]]:
    """For each ``Op`` in the rule's pattern, the op types (``op_histogram`` keys) of the
    nodes it can match: a model with no node of one of these sets holds no match."""
    found: list[frozenset[str]] = []
    stack: list[Pattern] = [rule.pattern]
    while stack:
        pattern = stack.pop()
        if isinstance(pattern, Op):
            found.append(_op_names(pattern))
            stack.extend(pattern.inputs)
    return found
