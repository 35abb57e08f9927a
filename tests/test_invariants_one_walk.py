"""check_invariants finds the order and naming problems in one walk of the scopes: the
same problems, in the same order, as the two separate walks it replaced (the first use
before definition, as optcc.ir.first_order_problem reports it, then every naming problem),
on models broken in every way those walks tell apart: cycles, undefined inputs and graph
outputs, unnamed used values, names defined twice, shadowing in bodies, functions."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest

import optcc
from optcc.infra.invariants import check_invariants, signature
from test_invariants import _if_model as _if_proto


def _reference_names(model: ir.Model) -> list[str]:
    """The naming walk as it was before (each scope visited on its own)."""
    problems: list[str] = []

    def visit(graph: ir.Graph | ir.Function, outer: frozenset[str]) -> None:
        seen: set[str] = set()

        def define(value: ir.Value, what: str) -> None:
            name = value.name
            if not name:
                if value.uses() or value.is_graph_output():
                    problems.append(f"{what} has no name but is used")
                return
            if name in seen:
                problems.append(f"value name '{name}' is defined twice")
            elif name in outer:
                problems.append(f"value name '{name}' shadows a value of an enclosing graph")
            seen.add(name)

        for value in graph.inputs:
            define(value, "a graph input")
        if isinstance(graph, ir.Graph):
            for value in graph.initializers.values():
                if not value.is_graph_input():
                    define(value, "an initializer")
        for node in graph:
            for sub in optcc.ir.subgraphs(node):
                visit(sub, outer | seen)
            for value in node.outputs:
                define(value, f"an output of node '{node.name}' ({node.op_type})")

    visit(model.graph, frozenset())
    for function in model.functions.values():
        visit(function, frozenset())
    return problems


def _reference(model: ir.Model) -> list[str]:
    order = optcc.ir.first_order_problem(model)
    return ([order] if order else []) + _reference_names(model)


def _if_model(body_name: str, body_reads: str = "x") -> ir.Model:
    return ir.serde.deserialize_model(_if_proto(body_name, body_reads))


def _chain_model() -> ir.Model:
    return ir.from_proto(onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
        agraph (float[2] x) => (float[2] y) {
            a = Relu(x)
            b = local.Twice(a)
            c = Neg(b)
            y = Abs(c)
        }
        <domain: "local", opset_import: ["" : 17]>
        Twice (t) => (u) {
            d = Add(t, t)
            u = Identity(d)
        }
    """))


def _move_last_first(graph: ir.Graph) -> None:
    last = list(graph)[-1]
    graph.remove(last)
    graph.insert_before(graph[0], last)


def _rename(model: ir.Model, old: str, new: str | None) -> None:
    for node in optcc.ir.nodes(model):
        for value in node.outputs:
            if value.name == old:
                value.name = new


def _cases() -> dict[str, ir.Model]:
    cases = {"sound chain": _chain_model(), "sound body": _if_model("late")}
    model = _chain_model()
    _move_last_first(model.graph)
    cases["a cycle"] = model
    model = _chain_model()
    node = list(model.graph)[2]
    node.replace_input_with(0, ir.Value(name="nowhere"))
    cases["an undefined input"] = model
    model = _chain_model()
    model.graph.outputs[0] = ir.Value(name="lost")
    cases["an undefined graph output"] = model
    model = _chain_model()
    _rename(model, "c", None)
    cases["an unnamed used value"] = model
    model = _chain_model()
    _rename(model, "c", "a")
    cases["a name defined twice"] = model
    model = _chain_model()
    function = next(iter(model.functions.values()))
    next(iter(function)).outputs[0].name = "t"
    cases["a name defined twice in a function"] = model
    cases["a body shadowing an earlier name"] = _if_model("s")
    cases["a body reading a value defined later"] = _if_model("k", body_reads="late")
    model = _if_model("s", body_reads="late")
    _move_last_first(model.graph)
    cases["a cycle and a body's problems after it"] = model
    model = _if_model("s")
    _rename(model, "late", "cond")
    node = list(model.graph)[-1]
    node.replace_input_with(0, ir.Value(name="nowhere"))
    cases["everything at once"] = model
    return cases


@pytest.mark.parametrize("case", list(_cases()))
def test_one_walk_finds_what_the_two_walks_found(case):
    model = _cases()[case]
    problems = check_invariants(model, signature(model), run_checker=False)
    assert problems == _reference(model)
    assert bool(problems) == (not case.startswith("sound"))
