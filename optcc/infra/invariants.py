"""Structural invariants checked after every pass that modified the model.

A pass that breaks one is reverted by the pass manager (or stops the run when strict).
The checks: nodes in topological order with every input defined, value names unique
within their scope and never shadowing an outer one, the graph's input/output names,
types and (symbolic) dimensions unchanged, and onnx's checker accepting the result.
"""

from __future__ import annotations

import dataclasses

import onnx
import onnx_ir as ir

from optcc import ir as oir
from optcc.ir.serialize_cached import serialize_bytes
from optcc.ir.walk import may_hold_bodies
from optcc.runtime.shared_weights import MIN_SHARED_BYTES, Serialized, shareable

__all__ = ["Signature", "signature", "check_invariants", "checker_problems", "checked"]

# Initializers of this size or more reach onnx's checker as empty tensors (see checker_problems).
CHECKER_BLANK_BYTES = MIN_SHARED_BYTES
# A model in memory with at most this many bytes of weights is checked whole (see checked).
WHOLE_CHECK_MAX_BYTES = 4 << 20


@dataclasses.dataclass(frozen=True)
class Signature:
    """The model's interface: what callers depend on and no pass may change."""

    inputs: tuple[tuple[str, str, tuple[object, ...] | None], ...]
    outputs: tuple[tuple[str, str, tuple[object, ...] | None], ...]


def _describe(value: ir.Value) -> tuple[str, str, tuple[object, ...] | None]:
    shape = None if value.shape is None else tuple(
        d.value if isinstance(d, ir.SymbolicDim) else int(d) for d in value.shape
    )
    return (value.name or "", str(value.type), shape)


def signature(model: ir.Model) -> Signature:
    # Below IR version 4 an initializer listed as a graph input is a constant no caller can
    # feed (onnxruntime does not list it): not part of the interface.
    legacy = int(model.ir_version or 0) < 4
    return Signature(
        inputs=tuple(_describe(v) for v in model.graph.inputs if not (legacy and v.is_initializer())),
        outputs=tuple(_describe(v) for v in model.graph.outputs),
    )


def check_invariants(
    model: ir.Model, expected: Signature, *, run_checker: bool = True, float16_io: bool = False
) -> list[str]:
    """Every invariant the model violates, as one-line descriptions (empty when sound).
    ``float16_io``: a float32 graph input/output may have become float16."""
    order, names = _scope_problems(model)
    problems = [order] if order else []
    problems.extend(names)
    problems.extend(_signature_problems(signature(model), expected, float16_io))
    if run_checker and not problems:
        problems.extend(checker_problems(model))
    return problems


@dataclasses.dataclass
class _ScopeProblems:
    """What one walk of the model's scopes finds: the first use before definition (as
    ``oir.first_order_problem`` reports it) and every naming problem."""

    order: str | None = None
    names: list[str] = dataclasses.field(default_factory=list)


def _scope_problems(model: ir.Model) -> tuple[str | None, list[str]]:
    """The order problem and the name problems of the main graph and every function, found
    in one walk of their nodes (each body visited where its node stands)."""
    found = _ScopeProblems()
    for graph in (model.graph, *model.functions.values()):
        _visit(graph, frozenset(), frozenset(), found)
    return found.order, found.names


def _visit(graph: ir.Graph | ir.Function, outer_values: frozenset[ir.Value | None], outer_names: frozenset[str],
           found: _ScopeProblems) -> None:
    """Check one graph: every node input defined before the node reads it (by a graph input,
    an initializer, an earlier node or an enclosing scope, ``outer_values``), until the
    first problem in the walk; value names unique in the graph and not shadowing a name
    of an enclosing scope defined before the body's node (``outer_names``, as onnx-ir's
    NameFixPass sees scopes: a name defined later outside is not shadowed)."""
    defined: set[ir.Value | None] = set(outer_values)
    defined.add(None)  # an omitted optional input: always "defined"
    defined.update(graph.inputs)
    seen: set[str] = set()
    problems = found.names

    def define(value: ir.Value, what: str) -> None:
        name = value.name
        if not name:
            if value.uses() or value.is_graph_output():
                problems.append(f"{what} has no name but is used")
            return
        if name in seen:
            problems.append(f"value name '{name}' is defined twice")
        elif name in outer_names:
            problems.append(f"value name '{name}' shadows a value of an enclosing graph")
        seen.add(name)

    for value in graph.inputs:
        define(value, "a graph input")
    if isinstance(graph, ir.Graph):
        initializers = graph.initializers.data.values()  # the UserDict's own dict: its Mapping methods are slow
        defined.update(initializers)
        for value in initializers:
            if not value.is_graph_input():
                define(value, "an initializer")
    add = defined.update
    bodies = may_hold_bodies(graph)  # else no node's subgraphs need looking up
    for node in graph:
        if found.order is None and not defined.issuperset(node.inputs):
            found.order = _undefined_input(node, defined)
        for sub in oir.subgraphs(node) if bodies else ():
            _visit(sub, frozenset(defined), outer_names | seen, found)
        outputs = node.outputs
        add(outputs)
        for value in outputs:
            name = value.name
            if name and name not in seen and name not in outer_names:
                seen.add(name)  # the common case, without building a description
            else:
                define(value, f"an output of node '{node.name}' ({node.op_type})")
    if found.order is None:
        missing = next((value for value in graph.outputs if value not in defined), None)
        if missing is not None:
            found.order = f"graph output '{missing.name}' is not defined"


def _undefined_input(node: ir.Node, defined: set[ir.Value | None]) -> str:
    """The first input of ``node`` not in ``defined``, described."""
    value = next(v for v in node.inputs if v not in defined)
    assert value is not None
    what = "a cycle" if value.producer() is not None else "an undefined value"
    return f"node '{node.name}' ({node.op_type}) reads '{value.name}' before it is defined ({what})"


_FLOAT32, _FLOAT16 = str(ir.TensorType(ir.DataType.FLOAT)), str(ir.TensorType(ir.DataType.FLOAT16))


def _same(got: tuple, want: tuple, float16_io: bool) -> bool:
    if got == want:
        return True
    return float16_io and (got[0], got[2]) == (want[0], want[2]) and (got[1], want[1]) == (_FLOAT16, _FLOAT32)


def _signature_problems(actual: Signature, expected: Signature, float16_io: bool = False) -> list[str]:
    problems = []
    for kind, got, want in (
        ("input", actual.inputs, expected.inputs),
        ("output", actual.outputs, expected.outputs),
    ):
        if len(got) != len(want) or not all(_same(g, w, float16_io) for g, w in zip(got, want)):
            problems.append(f"graph {kind}s changed: {list(want)} -> {list(got)}")
    return problems


def checker_problems(model: ir.Model) -> list[str]:
    """What onnx's checker rejects in the model (empty when it accepts it).

    The checker needs a serialized copy but not the weights' bytes: initializers of
    ``CHECKER_BLANK_BYTES`` or more (and external ones, whose files it would look for
    relative to the working directory; load validated them) are set aside while the copy
    is made, so checking costs O(nodes), not O(weights) (VGG-19 with its 513 MB of folded
    weights: a full copy took peak memory from 0.7 to 2.4 GB)."""
    return checked(model)[0]


def checked(model: ir.Model) -> tuple[list[str], Serialized | None]:
    """``checker_problems(model)``, and the bytes the checker read, for whoever needs the
    model's bytes next (the verifier, which loads the result on onnxruntime) instead of
    serializing it again: a model whose weights are in memory and at most
    ``WHOLE_CHECK_MAX_BYTES`` is checked whole (reading them costs little); a larger one
    as ``checker_problems`` says, and its bytes are handed on when the initializers set
    aside are exactly its shareable main-graph ones (no external data, none in a body,
    none of a dtype ``shareable`` refuses: ``Serialized``). None otherwise."""
    external = oir.uses_external_data(model)
    if not external and oir.weight_bytes(model) <= WHOLE_CHECK_MAX_BYTES:
        data = serialize_bytes(model)
        return _verdict(data), Serialized(data)

    def blanked(tensor: ir.TensorProtocol) -> bool:
        return isinstance(tensor, ir.ExternalTensor) or tensor.nbytes >= CHECKER_BLANK_BYTES

    with oir.initializers_set_aside(model, blanked, bodies=True) as aside:
        data = serialize_bytes(model)  # the proto's bytes, which is what the checker reads
    main = model.graph.initializers
    light = not external and all(main.get(value.name) is value and shareable(tensor) for value, tensor in aside)
    return _verdict(data), Serialized(data, tuple((v.name, t) for v, t in aside)) if light else None


def _verdict(data: bytes) -> list[str]:
    """What onnx's checker rejects in a serialized model (empty when it accepts it)."""
    try:
        onnx.checker.check_model(data)
    except Exception as e:  # the checker's error types vary across onnx versions
        return ["onnx checker: " + " ".join(str(e).split())[:300]]
    return []
