"""A fixpoint does not run again a pass whose last run left the model unchanged while
nothing changed since, and runs again every pass that ran before a change."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir

import optcc
from optcc.infra.manager import Fixpoint, PassManager
from optcc.passes import EliminateDeadNodesPass, EliminateIdentitiesPass
from optcc.rewrite import Op, RewritePass, Rule, Var

MODEL_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x) => (float[2,3] y) {
    a = Neg(x)
    b = Neg(a)
    c = Relu(b)
    d = Sigmoid(c)
    y = Mul(d, c)
}"""


class NegNegToIdentityPass(optcc.Pass):
    """Neg(Neg(x)) -> Identity(x): a change only the earlier eliminate-identities can finish."""

    name, numerics = "neg-neg-to-identity", "exact"

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0

    def call(self, model: ir.Model) -> optcc.PassResult:
        self.runs += 1
        count = 0
        for node in list(model.graph):
            inner = node.inputs[0].producer() if node.op_type == "Neg" else None
            if inner is None or inner.op_type != "Neg" or node.outputs[0].is_graph_output():
                continue
            identity = ir.node("Identity", [inner.inputs[0]])
            model.graph.insert_before(node, identity)
            node.outputs[0].replace_all_uses_with(identity.outputs[0])
            count += 1
        return optcc.PassResult(model, count > 0, {"replaced": count})


class CountingPass(optcc.Pass):
    """Changes nothing; counts its runs."""

    name, numerics = "counting", "exact"

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0

    def call(self, model: ir.Model) -> optcc.PassResult:
        self.runs += 1
        return optcc.PassResult(model, False, {})


def _reference(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return onnx.reference.ReferenceEvaluator(proto).run(None, {"x": x})[0]


def test_a_pass_before_a_change_runs_again_and_one_after_it_does_not():
    proto = onnx.parser.parse_model(MODEL_TEXT)
    model = ir.from_proto(proto)
    rewrite, counting = NegNegToIdentityPass(), CountingPass()
    result = PassManager(
        [Fixpoint([EliminateIdentitiesPass(), rewrite, counting, EliminateDeadNodesPass()], max_iters=8)]
    ).run(model)
    runs = [(r.name, r.iteration, r.status) for r in result.records]
    # round 1: the rewrite makes an Identity and dead Negs; round 2: eliminate-identities (which ran
    # before that change) must run again and removes the Identity; the rewrite runs (its own change
    # came last in its run); counting is not run again once nothing changed since its last run
    assert ("eliminate-identities", 2, "changed") in runs
    assert counting.runs == 2
    assert not result.warnings
    ops = [n.op_type for n in result.model.graph]
    assert ops == ["Relu", "Sigmoid", "Mul"]
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    got = _reference(ir.to_proto(result.model), x)
    np.testing.assert_allclose(got, _reference(proto, x), rtol=0, atol=0)
    c = np.maximum(x.astype(np.float64), 0.0)
    np.testing.assert_allclose(got, c / (1.0 + np.exp(-c)), rtol=1e-5)  # sigmoid(c) * c


def test_o1_result_is_the_same_with_the_skips():
    """The -O1 pipeline on a model whose second round has work for its first pass: the
    Identity the first round leaves is removed (structure), and the result computes what
    the original computes (onnx's reference evaluator)."""
    proto = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x) => (float[2,3] y) {
    s = Shape(x)
    t = Reshape(x, s)
    u = Identity(t)
    v = Add(u, x)
    y = Relu(v)
}""")
    result = optcc.optimize(proto, level=1, verify=False)
    assert [n.op_type for n in result.model.graph.node] == ["Add", "Relu"]
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_allclose(_reference(result.model, x), _reference(proto, x), rtol=0, atol=0)


class TransposeCountingPass(CountingPass):
    """Changes nothing; claims to act only where a Transpose is."""

    name = "transpose-counting"
    triggers = frozenset({"Transpose"})


def test_a_pass_whose_triggers_are_absent_is_not_run_until_one_appears():
    """The manager skips a pass while the model holds none of its triggers (read from the
    op histogram it keeps after every change), and runs it once a pass makes one."""

    class MakeTransposePass(optcc.Pass):
        name, numerics = "make-transpose", "exact"

        def call(self, model: ir.Model) -> optcc.PassResult:
            relu = next((n for n in model.graph if n.op_type == "Relu"), None)
            if relu is None or any(n.op_type == "Transpose" for n in model.graph):
                return optcc.PassResult(model, False, {})
            # a 2-D Transpose and the Transpose back, between the Relu and its readers
            uses = list(relu.outputs[0].uses())
            there = ir.node("Transpose", [relu.outputs[0]], attributes={"perm": [1, 0]})
            back = ir.node("Transpose", [there.outputs[0]], attributes={"perm": [1, 0]})
            there.outputs[0].name, back.outputs[0].name = "transposed", "transposed_back"
            model.graph.insert_after(relu, [there, back])
            for use in uses:
                use.node.replace_input_with(use.idx, back.outputs[0])
            return optcc.PassResult(model, True, {})

    watcher = TransposeCountingPass()
    PassManager([watcher]).run(ir.from_proto(onnx.parser.parse_model(MODEL_TEXT)))
    assert watcher.runs == 0

    proto = onnx.parser.parse_model(MODEL_TEXT)
    watcher = TransposeCountingPass()
    result = PassManager([watcher, MakeTransposePass(), watcher]).run(ir.from_proto(proto))
    assert watcher.runs == 1  # after the Transposes appear only
    assert [r.name for r in result.records] == ["make-transpose", "transpose-counting"]
    x = np.random.default_rng(2).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_allclose(_reference(ir.to_proto(result.model), x), _reference(proto, x), rtol=0, atol=0)


def test_rule_passes_change_nothing_without_their_rules_ops():
    """A pass that only applies rules changes nothing in a model without one of each rule's
    ops; one with a call of its own says so only through its own triggers (none here)."""
    from optcc.passes import FuseBatchNormPass, FuseMatMulAddPass
    from optcc.rewrite import RewritePass

    assert FuseMatMulAddPass().changes_nothing({"MatMul", "Relu"})
    assert not FuseMatMulAddPass().changes_nothing({"MatMul", "Add"})
    assert FuseBatchNormPass().changes_nothing({"Conv", "Relu"})

    class OwnCall(RewritePass):
        rules = FuseMatMulAddPass.rules

        def call(self, model: ir.Model) -> optcc.PassResult:
            return super().call(model)

    assert not OwnCall().changes_nothing({"Relu"})


class AbsOfNegPass(RewritePass):
    """Abs(Neg(x)) -> Abs(x): a rule pass whose pattern names an op besides its root."""

    name, numerics = "abs-of-neg", "exact"
    rules = (Rule("abs-neg", Op("Abs", Op("Neg", Var("x"))), lambda m, b: b.op("Abs", m["x"])),)


def test_a_rule_pass_is_not_run_while_an_op_each_rule_names_is_absent():
    """The manager skips a rule pass while each rule's pattern names an op the model holds
    no node of (here Neg, though the root Abs is there), and runs it once there is one."""
    assert AbsOfNegPass().changes_nothing({"Abs", "Relu"})
    assert not AbsOfNegPass().changes_nothing({"Abs", "Neg"})
    header = '<ir_version: 8, opset_import: ["" : 17]>\ng (float[2,3] x) => (float[2,3] y) '
    without = onnx.parser.parse_model(header + "{\n    a = Relu(x)\n    y = Abs(a)\n}")
    assert PassManager([AbsOfNegPass()]).run(ir.from_proto(without)).records == []

    proto = onnx.parser.parse_model(header + "{\n    a = Neg(x)\n    y = Abs(a)\n}")
    result = PassManager([AbsOfNegPass()]).run(ir.from_proto(proto))
    assert [(r.name, r.status) for r in result.records] == [("abs-of-neg", "changed")]
    assert [n.op_type for n in result.model.graph] == ["Abs"]
    x = np.random.default_rng(3).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(_reference(ir.to_proto(result.model), x), np.abs(x))
