"""The pass manager: revert on exception, on broken invariants and on broken numerics;
fixpoint warnings; strict mode naming the passes that ran before; per-pass records."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import optcc
from optcc.errors import PassFailedError
from optcc.infra.manager import Fixpoint, PassManager
from optcc.passes import EliminateDeadNodesPass, EliminateIdentitiesPass
from optcc.numerics import Verifier

MODEL_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[N, 4] x) => (float[N, 4] y) {
    a = Add(x, x)
    i = Identity(a)
    dead = Mul(x, x)
    y = Relu(i)
}
"""


def _model() -> ir.Model:
    return ir.from_proto(onnx.parser.parse_model(MODEL_TEXT))


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


class RaisingPass(optcc.Pass):
    """Removes the Relu's input wiring halfway, then raises."""

    name = "test-raising"

    def call(self, model: ir.Model) -> optcc.PassResult:
        relu = next(n for n in model.graph if n.op_type == "Relu")
        relu.replace_input_with(0, model.graph.inputs[0])
        raise RuntimeError("boom")


class WrongNumericsPass(optcc.Pass):
    """Turns Add into Sub: structurally valid, numerically wrong."""

    name = "test-wrong-numerics"

    def call(self, model: ir.Model) -> optcc.PassResult:
        for node in model.graph:
            if node.op_type == "Add":
                node.op_type = "Sub"
                return optcc.PassResult(model, True, {"broken": 1})
        return optcc.PassResult(model, False)


class RenameOutputPass(optcc.Pass):
    """Renames the graph output: breaks the model's interface invariant."""

    name = "test-rename-output"

    def call(self, model: ir.Model) -> optcc.PassResult:
        model.graph.outputs[0].name = "renamed"
        return optcc.PassResult(model, True)


class UseBeforeDefPass(optcc.Pass):
    """Moves the last node to the front: breaks topological order."""

    name = "test-use-before-def"

    def call(self, model: ir.Model) -> optcc.PassResult:
        last = list(model.graph)[-1]
        model.graph.remove(last)
        model.graph.insert_before(model.graph[0], last)
        return optcc.PassResult(model, True)


class AlwaysModifiedPass(optcc.Pass):
    """Claims to modify the model every time: a fixpoint can never converge."""

    name = "test-always-modified"

    def call(self, model: ir.Model) -> optcc.PassResult:
        return optcc.PassResult(model, True)


def test_raising_pass_is_reverted_and_the_run_continues():
    model = _model()
    before = ir.to_proto(model).SerializeToString()
    result = PassManager([RaisingPass(), EliminateIdentitiesPass()]).run(model)
    failed, eliminated = result.records
    assert failed.status == "failed" and "boom" in failed.reason
    assert eliminated.status == "changed"
    # The raising pass left nothing behind: the Relu still reads the Identity's input.
    relu = next(n for n in result.model.graph if n.op_type == "Relu")
    assert relu.inputs[0].producer().op_type == "Add"
    assert "Identity" not in _ops(result.model)
    assert before != ir.to_proto(result.model).SerializeToString()


class UnknownOpPass(optcc.Pass):
    """Renames Relu to an op onnx does not have: only onnx's checker notices."""

    name = "test-unknown-op"

    def call(self, model: ir.Model) -> optcc.PassResult:
        for node in model.graph:
            if node.op_type == "Relu":
                node.op_type = "NoSuchOp"
                return optcc.PassResult(model, True)
        return optcc.PassResult(model, False)


def test_revert_replays_the_passes_kept_before_it():
    result = PassManager([EliminateIdentitiesPass(), EliminateDeadNodesPass(), RaisingPass()]).run(_model())
    identities, dead, failed = result.records
    assert (identities.status, dead.status, failed.status) == ("changed", "changed", "failed")
    # The kept changes survive the revert; the raising pass's half-done rewiring does not.
    assert _ops(result.model) == ["Add", "Relu"]
    relu = result.model.graph[1]
    assert relu.inputs[0].producer().op_type == "Add"


def test_a_pass_only_onnx_checker_rejects_is_found_and_reverted():
    with pytest.warns(RuntimeWarning, match="onnx checker rejected"):
        result = PassManager([EliminateIdentitiesPass(), UnknownOpPass(), EliminateDeadNodesPass()]).run(_model())
    assert "onnx checker rejected" in result.warnings[0]
    statuses = {r.name: r.status for r in result.records}
    assert statuses == {"eliminate-identities": "changed", "test-unknown-op": "reverted",
                        "eliminate-dead-nodes": "changed"}
    assert "onnx checker" in next(r.reason for r in result.records if r.status == "reverted")
    assert _ops(result.model) == ["Add", "Relu"]
    onnx.checker.check_model(ir.to_proto(result.model))


def test_strict_mode_raises_naming_the_passes_run_before():
    with pytest.raises(PassFailedError, match=r"test-raising.*passes run before it: eliminate-identities"):
        PassManager([EliminateIdentitiesPass(), RaisingPass()], strict=True).run(_model())


@pytest.mark.parametrize(
    "broken, expected",
    [(RenameOutputPass, "graph outputs changed"), (UseBeforeDefPass, "before it is defined")],
)
def test_invariants_catch_a_broken_pass(broken, expected):
    result = PassManager([broken()]).run(_model())
    (record,) = result.records
    assert record.status == "reverted"
    assert expected in record.reason
    assert result.model.graph.outputs[0].name == "y"
    assert _ops(result.model) == ["Add", "Identity", "Mul", "Relu"]


def test_verify_each_reverts_a_pass_that_breaks_numerics():
    model = _model()
    original = model.clone()
    with Verifier(original) as verifier:
        result = PassManager(
            [WrongNumericsPass(), EliminateDeadNodesPass()], verifier=verifier, verify_each=True
        ).run(model)
        wrong, dead = result.records
        assert wrong.status == "reverted" and "numerics" in wrong.reason
        assert wrong.verification["status"] == "failed"
        assert dead.status == "changed" and dead.verification["status"] == "passed"
        assert "Add" in _ops(result.model) and "Sub" not in _ops(result.model)
        assert verifier.check(result.model).passed


def test_optimize_reports_the_reverted_pass_and_verifies():
    proto = onnx.parser.parse_model(MODEL_TEXT)
    result = optcc.optimize(proto, passes=[WrongNumericsPass(), "eliminate-identities"], verify_each=True)
    names = {r.name: r for r in result.report.passes}
    assert names["test-wrong-numerics"].status == "reverted"
    assert result.report.verification["status"] == "passed"
    assert [r.name for r in result.report.reverted()] == ["test-wrong-numerics"]


def test_a_final_verification_failure_is_traced_to_its_pass_and_reverted():
    proto = onnx.parser.parse_model(MODEL_TEXT)
    result = optcc.optimize(proto, passes=["eliminate-identities", WrongNumericsPass(), "eliminate-dead-nodes"])
    statuses = {r.name: r.status for r in result.report.passes}
    assert statuses["test-wrong-numerics"] == "reverted"
    assert statuses["eliminate-identities"] == "changed"
    assert result.report.verification["status"] == "passed"
    (record,) = [r for r in result.report.passes if r.name == "test-wrong-numerics"]
    assert "numerics" in record.reason and "max rel" in record.reason


class BreaksOnceWrongPass(WrongNumericsPass):
    """Wrong on its first run only: a replay would find it right."""

    name = "test-breaks-once"

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0

    def call(self, model: ir.Model) -> optcc.PassResult:
        self.runs += 1
        if self.runs > 1:
            return optcc.PassResult(model, True)
        return super().call(model)


def test_the_last_pass_is_blamed_without_running_every_pass_again():
    # the model after every kept pass is the result, which failed: the bisection replays
    # shorter runs only (a pass wrong on its first run only shows it: it ran once)
    proto = onnx.parser.parse_model(MODEL_TEXT)
    wrong = BreaksOnceWrongPass()
    result = optcc.optimize(proto, passes=["eliminate-identities", wrong])
    assert wrong.runs == 1
    assert {r.name: r.status for r in result.report.passes} == {"eliminate-identities": "changed",
                                                                "test-breaks-once": "reverted"}
    (record,) = [r for r in result.report.passes if r.name == "test-breaks-once"]
    assert "max rel" in record.reason
    assert result.report.verification["status"] == "passed"
    x = np.linspace(-3, 3, 8, dtype=np.float32).reshape(2, 4)
    (y,) = onnx.reference.ReferenceEvaluator(ir.to_proto(result.ir_model)).run(None, {"x": x})
    np.testing.assert_array_equal(y, np.maximum(x + x, 0))


def test_fixpoint_warns_when_it_stops_unconverged():
    manager = PassManager([Fixpoint([AlwaysModifiedPass()], max_iters=3, name="loop")])
    with pytest.warns(optcc.PipelineWarning, match="loop stopped unconverged after 3 iterations"):
        result = manager.run(_model())
    assert len(result.records) == 3
    assert [r.iteration for r in result.records] == [1, 2, 3]
    assert any("unconverged" in w for w in result.warnings)


def test_fixpoint_stops_once_nothing_changes():
    result = PassManager(
        [Fixpoint([EliminateIdentitiesPass(), EliminateDeadNodesPass()], max_iters=8)]
    ).run(_model())
    assert max(r.iteration for r in result.records) == 2
    assert not result.warnings
    assert _ops(result.model) == ["Add", "Relu"]


class CountingIdentitiesPass(EliminateIdentitiesPass):
    """eliminate-identities, counting its runs; without triggers, so that the manager skips it
    only for having seen the model (the skip for absent triggers: tests/test_fixpoint_skip.py)."""

    triggers = None

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0

    def call(self, model: ir.Model) -> optcc.PassResult:
        self.runs += 1
        return super().call(model)


def test_a_pass_is_not_run_again_on_the_model_its_last_run_left_unchanged():
    identities, dead = CountingIdentitiesPass(), EliminateDeadNodesPass()
    # run 1 changes, run 2 (the fixpoint's round 2) leaves it unchanged; nothing changes
    # after it (dead is done in round 1), so the later fixpoint and step skip it
    result = PassManager([Fixpoint([identities, dead], max_iters=8), Fixpoint([identities], max_iters=8),
                          identities]).run(_model())
    assert identities.runs == 2
    assert [r.name for r in result.records].count("eliminate-identities") == 2
    assert _ops(result.model) == ["Add", "Relu"]
    # runs 1 (changed) and 2 (unchanged), then run 3 only when a change was kept since
    identities = CountingIdentitiesPass()
    PassManager([identities, identities, identities]).run(_model())
    assert identities.runs == 2
    identities = CountingIdentitiesPass()
    PassManager([identities, identities, EliminateDeadNodesPass(), identities]).run(_model())
    assert identities.runs == 3


def test_build_pipeline_shares_one_object_per_pass_name():
    from optcc.infra.pipelines import build_pipeline
    from optcc.infra.manager import step_passes
    passes = [p for step in build_pipeline(2) for p in step_passes(step)]
    by_name: dict[str, set[int]] = {}
    for p in passes:
        by_name.setdefault(p.name, set()).add(id(p))
    assert all(len(ids) == 1 for ids in by_name.values())
    assert len(passes) > len(by_name)  # some names do appear in several steps


def test_records_hold_time_op_delta_bytes_and_stats():
    proto = onnx.parser.parse_model(MODEL_TEXT)
    report = optcc.optimize(proto, level=1).report
    changed = [r for r in report.passes if r.status == "changed"]
    identities = next(r for r in changed if r.name == "eliminate-identities")
    assert identities.op_delta == {"Identity": -1}
    assert identities.stats == {"Identity": 1}
    assert identities.nodes_before - identities.nodes_after == 1
    assert all(r.time_s >= 0 for r in report.passes)
    assert report.model_before.nodes == 4 and report.model_after.nodes == 2
    assert report.peak_rss_bytes > 0


def test_input_model_is_not_modified():
    model = _model()
    before = ir.to_proto(model).SerializeToString()
    result = optcc.optimize(model, level=2)
    assert ir.to_proto(model).SerializeToString() == before
    assert result.model is not model and isinstance(result.model, ir.Model)


def test_user_inputs_drive_verification():
    proto = onnx.parser.parse_model(MODEL_TEXT)
    feeds = [{"x": np.full((3, 4), v, np.float32)} for v in (-1.0, 2.0)]
    report = optcc.optimize(proto, level=2, inputs=feeds).report
    assert report.verification["samples"] == 2
    assert report.verification["status"] == "passed"


class ScaleOutputPass(optcc.Pass):
    """Scales the Relu's input by 1.001: a float rewrite wrong at any float tolerance, yet
    far inside what INT8 is allowed to change."""

    name = "test-scale-output"
    numerics = "fusion"

    def call(self, model: ir.Model) -> optcc.PassResult:
        relu = next(n for n in model.graph if n.op_type == "Relu")
        if relu.inputs[0].producer() is not None and relu.inputs[0].producer().op_type == "Mul":
            return optcc.PassResult(model, False)
        scale = ir.Value(name="scale", const_value=ir.tensor(np.array(1.001, np.float32)))
        model.graph.initializers["scale"] = scale
        mul = ir.node("Mul", [relu.inputs[0], scale])
        model.graph.insert_before(relu, mul)
        relu.replace_input_with(0, mul.outputs[0])
        return optcc.PassResult(model, True)


class CountingLossyPass(optcc.Pass):
    """Claims INT8 numerics and changes nothing the numbers see (renames the Relu node)."""

    name = "test-lossy"
    numerics = "int8"

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0

    def call(self, model: ir.Model) -> optcc.PassResult:
        self.runs += 1
        relu = next(n for n in model.graph if n.op_type == "Relu")
        relu.name = f"relu_{self.runs}"
        return optcc.PassResult(model, True)


def test_float_passes_before_a_lossy_pass_are_judged_at_their_own_tolerance():
    proto = onnx.parser.parse_model(MODEL_TEXT)
    lossy = CountingLossyPass()
    result = optcc.optimize(proto, passes=["eliminate-identities", ScaleOutputPass(), lossy])
    statuses = {r.name: r.status for r in result.report.passes}
    assert statuses == {"eliminate-identities": "changed", "test-scale-output": "reverted", "test-lossy": "changed"}
    assert lossy.runs == 1  # the float pass at fault was found without running the lossy pass again
    x = np.linspace(-3, 3, 8, dtype=np.float32).reshape(2, 4)
    (y,) = onnx.reference.ReferenceEvaluator(ir.to_proto(result.ir_model)).run(None, {"x": x})
    np.testing.assert_array_equal(y, np.maximum(x + x, 0))


def test_a_lossy_pipeline_is_bisected_among_its_lossy_steps_only():
    proto = onnx.parser.parse_model(MODEL_TEXT)

    class WrongLossyPass(WrongNumericsPass):
        name = "test-wrong-lossy"
        numerics = "int8"
        runs = 0

        def call(self, model: ir.Model) -> optcc.PassResult:
            self.runs += 1
            return super().call(model)

    lossy = WrongLossyPass()
    result = optcc.optimize(proto, passes=["eliminate-identities", lossy])
    statuses = {r.name: r.status for r in result.report.passes}
    assert statuses == {"eliminate-identities": "changed", "test-wrong-lossy": "reverted"}
    assert lossy.runs == 1  # blamed without running it again (an INT8 step would calibrate twice)
    x = np.linspace(-3, 3, 8, dtype=np.float32).reshape(2, 4)
    (y,) = onnx.reference.ReferenceEvaluator(ir.to_proto(result.ir_model)).run(None, {"x": x})
    np.testing.assert_array_equal(y, np.maximum(x + x, 0))


class ReluToAbsPass(optcc.Pass):
    """Turns Relu into Abs: wrong only where the Relu's input is negative."""

    name = "test-relu-to-abs"
    numerics = "fusion"

    def call(self, model: ir.Model) -> optcc.PassResult:
        for node in model.graph:
            if node.op_type == "Relu":
                node.op_type = "Abs"
                return optcc.PassResult(model, True)
        return optcc.PassResult(model, False)


def test_a_failure_is_bisected_on_the_samples_it_failed_on():
    rng = np.random.default_rng(0)
    samples = [{"x": np.abs(rng.standard_normal((2, 4))).astype(np.float32)} for _ in range(3)]
    samples.insert(2, {"x": -np.abs(rng.standard_normal((2, 4))).astype(np.float32)})  # Relu and Abs differ here only
    wrong = ReluToAbsPass()(_model()).model
    verifier = Verifier(_model(), inputs=samples)
    full = verifier.check(wrong, "fusion")
    assert full.status == "failed" and full.samples_over() == [2] and full.samples == 4
    alone = verifier.check(wrong, "fusion", samples=[2])
    assert alone.status == "failed" and alone.samples == 1 and alone.samples_over() == [2]
    assert verifier.check(wrong, "fusion", samples=[0, 1, 3]).status == "passed"

    seen: list[int] = []
    original_check = Verifier.check

    class Counting(Verifier):
        def check(self, model, numerics="exact", samples=None, **options):
            result = original_check(self, model, numerics, samples, **options)
            seen.append(result.samples)
            return result

    manager = PassManager([EliminateIdentitiesPass(), ReluToAbsPass(), EliminateDeadNodesPass()],
                          verifier=Counting(_model(), inputs=samples))
    result = manager.run(_model())
    assert {r.name: r.status for r in result.records}["test-relu-to-abs"] == "reverted"
    assert result.verification.status == "passed"
    assert seen[0] == 4 and seen[-1] == 4 and set(seen[1:-1]) == {1}  # the bisection ran the failing sample only
    for feeds in samples:
        (y,) = onnx.reference.ReferenceEvaluator(ir.to_proto(result.model)).run(None, feeds)
        np.testing.assert_array_equal(y, np.maximum(feeds["x"] + feeds["x"], 0))


@pytest.mark.parametrize("verify_each", [False, True])
def test_a_pass_reverted_for_its_numerics_keeps_the_stats_of_its_run(verify_each):
    # what the pass did is in the report whether the check after it (verify_each) or the final
    # verification's bisection reverted it; the model is the original's computation either way
    proto = onnx.parser.parse_model(MODEL_TEXT)
    result = optcc.optimize(proto, passes=["eliminate-identities", WrongNumericsPass(), "eliminate-dead-nodes"],
                            verify_each=verify_each)
    (record,) = [r for r in result.report.passes if r.name == "test-wrong-numerics"]
    assert record.status == "reverted" and "numerics" in record.reason
    assert record.stats == {"broken": 1} and record.op_delta == {}
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    from onnx.reference import ReferenceEvaluator

    got = ReferenceEvaluator(result.model).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, np.maximum(2.0 * x.astype(np.float64), 0.0), rtol=1e-6)
