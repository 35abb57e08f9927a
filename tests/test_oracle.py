"""The verifier cannot be fooled: planted subtle miscompiles are caught (the pass reverted by
bisection and reported), the correct rewrites of the same models are kept, and the
float64 reference's kernels agree with onnx's reference implementation. Judged with the
public API only; the expected numbers come from numpy in float64."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.numerics.float64 import Float64Reference, _kernels

C = 4


def _conv_bn(ill_channels: list[int]) -> onnx.ModelProto:
    """Conv whose outputs are around 1e5 on ``ill_channels``, re-centred by a BatchNorm with
    var 4 and epsilon 1e-2: float32 loses ~1e-3 of the result there to cancellation."""
    rng = np.random.default_rng(0)
    bias = np.zeros(C, np.float32)
    bias[ill_channels] = 1e5
    arrays = {
        "W": rng.standard_normal((C, 3, 3, 3)).astype(np.float32),
        "B": bias,
        "s": np.ones(C, np.float32),
        "b": np.zeros(C, np.float32),
        "m": bias + rng.standard_normal(C).astype(np.float32),
        "v": np.full(C, 4.0, np.float32),
    }
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], epsilon=1e-2)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 16, 16])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _float64_conv_bn(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The model's output computed by numpy in float64."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    padded = np.pad(x.astype(np.float64), [(0, 0), (0, 0), (1, 1), (1, 1)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # [1, 3, 16, 16, 3, 3]
    conv = np.einsum("nchwij,mcij->nmhw", windows, w["W"]) + w["B"][None, :, None, None]
    shape = (1, C, 1, 1)
    return (conv - w["m"].reshape(shape)) / np.sqrt(w["v"].reshape(shape) + 1e-2) * w["s"].reshape(shape) \
        + w["b"].reshape(shape)


class PlantedFoldPass(optcc.Pass):
    """Folds BatchNormalization into the Conv before it with a planted bug: ``epsilon``
    replaces the model's epsilon, ``bias_error`` adds (channel, amount) to one bias."""

    name = "planted-fold"

    def __init__(self, epsilon: float, numerics: str = "fusion", bias_error: tuple[int, float] | None = None):
        super().__init__()
        self.epsilon, self.numerics, self.bias_error = epsilon, numerics, bias_error

    def call(self, model: ir.Model) -> optcc.PassResult:
        graph = model.graph
        bn = next(n for n in graph if n.op_type == "BatchNormalization")
        conv = bn.inputs[0].producer()
        scale, shift, mean, var = (v.const_value.numpy() for v in bn.inputs[1:])
        weight, bias = conv.inputs[1].const_value.numpy(), conv.inputs[2].const_value.numpy()
        k = scale / np.sqrt(var + self.epsilon)
        folded_bias = ((bias - mean) * k + shift).astype(np.float32)
        if self.bias_error is not None:
            folded_bias[self.bias_error[0]] += self.bias_error[1]
        w = ir.Value(name="W_folded", const_value=ir.tensor((weight * k[:, None, None, None]).astype(np.float32)))
        b = ir.Value(name="B_folded", const_value=ir.tensor(folded_bias))
        graph.register_initializer(w)
        graph.register_initializer(b)
        out = ir.Value(name="y_folded", type=bn.outputs[0].type, shape=bn.outputs[0].shape)
        fused = ir.node("Conv", [conv.inputs[0], w, b], attributes={"pads": [1, 1, 1, 1]}, outputs=[out])
        graph.insert_before(conv, fused)
        bn.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
        graph.remove([bn, conv], safe=True)
        for name in ("W", "B", "s", "b", "m", "v"):
            graph.initializers.pop(name)
        out.name = "y"
        return optcc.PassResult(model, True)


def _record(result: optcc.OptimizeResult, name: str):
    (record,) = [r for r in result.report.passes if r.name == name]
    return record


@pytest.mark.parametrize("ill", [[0, 1, 2, 3], [0]], ids=["all-channels", "one-channel"])
@pytest.mark.parametrize("numerics", ["fusion", "exact"])
def test_a_fold_that_ignores_epsilon_is_caught_and_reverted(ill, numerics):
    model = _conv_bn(ill)
    result = optcc.optimize(model, passes=[PlantedFoldPass(epsilon=0.0, numerics=numerics)])
    record = _record(result, "planted-fold")
    assert record.status == "reverted" and "numerics" in record.reason
    assert result.report.verification["status"] == "passed"
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "BatchNormalization"]


@pytest.mark.parametrize("samples", ["generated", "given"])
@pytest.mark.parametrize("ill", [[0, 1, 2, 3], [0]], ids=["all-channels", "one-channel"])
def test_the_correct_fold_of_the_same_model_is_kept_and_closer_to_float64(ill, samples):
    """Kept by proof (generated samples are then not needed), and judged on float64 when
    the user's samples run."""
    model = _conv_bn(ill)
    x = np.random.default_rng(7).standard_normal((1, 3, 16, 16)).astype(np.float32)
    inputs = [{"x": x * s} for s in (1.0, 0.5, 2.0)] if samples == "given" else None
    result = optcc.optimize(model, passes=["fuse-batchnorm"], inputs=inputs)
    assert _record(result, "fuse-batchnorm").status == "changed"
    expected = "float64" if samples == "given" else "proof"
    assert expected in result.report.verification["reference"]
    truth = _float64_conv_bn(model, x)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written

    def err(m: onnx.ModelProto) -> float:
        session = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": x})[0]
        return float(np.abs(got - truth).max() / np.abs(truth).max())

    assert err(result.model) < 1e-5 < err(model)  # the fold is more accurate than the original


def test_a_bias_error_on_a_well_conditioned_channel_is_caught_beside_an_ill_conditioned_one():
    model = _conv_bn([0])
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    amount = 0.002 * float(np.abs(_float64_conv_bn(model, x)).max())
    for numerics in ("exact", "fusion"):
        planted = PlantedFoldPass(epsilon=1e-2, numerics=numerics, bias_error=(1, amount))
        result = optcc.optimize(model, passes=[planted])
        assert _record(result, "planted-fold").status == "reverted", numerics
    # the same fold without the bias error is kept
    result = optcc.optimize(model, passes=[PlantedFoldPass(epsilon=1e-2)])
    assert _record(result, "planted-fold").status == "changed"



def _upsampling_head(folded: bool = False, bias_error: float = 0.0) -> onnx.ModelProto:
    """ConvTranspose, then a per-channel Add of ~1e5 (a DB text detector's head writes its
    bias this way), then a BatchNormalization that re-centres it (var 4, epsilon 1e-2):
    onnxruntime's basic optimizations leave it as written, so its second float32 evaluation
    rounds alike. ``folded``: the same head as one ConvTranspose (folded in float64, one
    rounding), ``bias_error`` added to its channel 0's bias."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, C, 2, 2)).astype(np.float32)
    bias = np.full(C, 1e5, np.float32)
    mean = (bias + rng.standard_normal(C)).astype(np.float32)
    if folded:
        k = 1.0 / np.sqrt(4.0 + 1e-2)
        folded_bias = (bias.astype(np.float64) - mean) * k
        folded_bias[0] += bias_error
        nodes = [helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], strides=[2, 2])]
        arrays = {"W": (w.astype(np.float64) * k).astype(np.float32), "B": folded_bias.astype(np.float32)}
    else:
        nodes = [helper.make_node("ConvTranspose", ["x", "W"], ["t"], strides=[2, 2]),
                 helper.make_node("Add", ["t", "B"], ["c"]),
                 helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], epsilon=1e-2)]
        arrays = {"W": w, "B": bias.reshape(1, C, 1, 1), "s": np.ones(C, np.float32), "b": np.zeros(C, np.float32),
                  "m": mean, "v": np.full(C, 4.0, np.float32)}
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 16, 16])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _float64_upsampling_head(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """``_upsampling_head``'s output computed by numpy in float64 from its definition."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    t = _conv_transpose_by_definition(x.astype(np.float64), w["W"], None, 1, [2, 2], [1, 1], [0] * 4, [0, 0])
    shape = (1, C, 1, 1)
    return (t + w["B"] - w["m"].reshape(shape)) / np.sqrt(w["v"].reshape(shape) + 1e-2)


def _head_samples() -> list[dict[str, np.ndarray]]:
    """Three samples; on the second alone the head's output is small beside the ~1e5 its
    BatchNormalization cancels, so a fold's rounding is beyond 1e-4 of its scale there."""
    x = np.random.default_rng(7).standard_normal((1, 3, 8, 8)).astype(np.float32)
    return [{"x": x * s} for s in (1e4, 1.0, 2e4)]


def _budget_for_one_sample(monkeypatch, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    """A float64 budget that one sample and the node check fit in, and three do not."""
    from optcc.numerics import float64

    one = float64._macs(model, float64._inferred_shapes(model, feeds), 1)
    monkeypatch.setattr(float64, "MAX_REFERENCE_MACS", one + one // 2)


def test_float64_judges_only_the_samples_a_fold_fails_on(monkeypatch):
    """The float64 reference of the three samples is over the budget; of the one sample
    the fold is beyond the tolerance of the float32 original on, it is not. Judged on that
    sample against float64, the fold is kept (against the float32 original alone, it would
    be blamed for the original's own rounding), and it is closer to float64 than the original."""
    model = _upsampling_head()
    inputs = _head_samples()
    _budget_for_one_sample(monkeypatch, model, inputs[0])
    result = optcc.optimize(model, passes=["fuse-conv-affine", "fuse-batchnorm"], inputs=inputs)
    assert [_record(result, name).status for name in ("fuse-conv-affine", "fuse-batchnorm")] == ["changed"] * 2
    assert [n.op_type for n in result.model.graph.node] == ["ConvTranspose"]
    assert "float64" in result.report.verification["reference"]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    x = inputs[1]["x"]
    truth = _float64_upsampling_head(model, x)

    def err(m: onnx.ModelProto) -> float:
        session = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return float(np.abs(session.run(None, {"x": x})[0] - truth).max() / np.abs(truth).max())

    assert err(result.model) < 1e-4 < err(model)


def test_a_bias_error_seen_on_one_sample_is_caught_against_float64_there(monkeypatch):
    """A fold whose channel-0 bias is 0.05 off: within the tolerance on the samples of
    scale ~3e4, beyond it and beyond 4x the original's own error on the other."""
    model = _upsampling_head()
    inputs = _head_samples()
    _budget_for_one_sample(monkeypatch, model, inputs[0])
    right = optcc.verify(model, _upsampling_head(folded=True), numerics="fusion", inputs=inputs)
    wrong = optcc.verify(model, _upsampling_head(folded=True, bias_error=0.05), numerics="fusion", inputs=inputs)
    assert right.status == "passed" and "float64" in right.reference
    assert wrong.status == "failed" and "float64" in wrong.reference
    assert wrong.samples_over() == [1]

def test_verify_each_reverts_the_planted_fold_too():
    result = optcc.optimize(_conv_bn([0]), passes=[PlantedFoldPass(epsilon=0.0)], verify_each=True)
    assert _record(result, "planted-fold").status == "reverted"


def test_bisection_reverts_only_the_offending_pass_of_a_pipeline():
    model = _conv_bn([0, 1, 2, 3])
    passes = ["eliminate-identities", PlantedFoldPass(epsilon=0.0), "eliminate-dead-nodes"]
    result = optcc.optimize(model, passes=passes)
    statuses = {r.name: r.status for r in result.report.passes}
    assert statuses["planted-fold"] == "reverted"
    assert result.report.verification["status"] == "passed"


def test_a_blamed_pass_is_reverted_in_every_later_step_of_that_name_after_one_bisection(monkeypatch):
    """Two steps of the same miscompiling rewrite (as a level's pipeline and the INT8
    preparation each run fuse-conv-affine): one bisection reverts both; the result is the
    original's computation (onnx's reference evaluator)."""
    from optcc.infra.manager import PassManager

    bisections = []
    bisect = PassManager._bisect
    monkeypatch.setattr(PassManager, "_bisect", lambda self, run, check: bisections.append(1) or bisect(self, run, check))
    model = _conv_bn([0, 1, 2, 3])
    passes = [PlantedFoldPass(epsilon=0.0), "eliminate-dead-nodes", PlantedFoldPass(epsilon=0.0)]
    result = optcc.optimize(model, passes=passes, inputs=[{"x": np.ones((1, 3, 16, 16), np.float32)}])
    assert [r.status for r in result.report.passes if r.name == "planted-fold"] == ["reverted", "reverted"]
    assert len(bisections) == 1 and result.report.verification["status"] == "passed"
    x = np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(ReferenceEvaluator(result.model).run(None, {"x": x})[0],
                                  ReferenceEvaluator(model).run(None, {"x": x})[0])


def test_default_verification_uses_three_samples():
    model = _conv_bn([0])
    planted = PlantedFoldPass(epsilon=0.0, numerics="fusion")(optcc.ir.load(model)).model
    with optcc.Verifier(model) as verifier:
        check = verifier.check(planted, "fusion")
    assert check.proof is None and check.samples == 3 and not check.passed


# --------------------------------------------------------------------------- kernels


def _one_node(op: str, inputs: dict[str, np.ndarray], **attrs) -> onnx.ModelProto:
    node = helper.make_node(op, list(inputs), ["Y"], **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(n, TensorProto.DOUBLE, None) for n in inputs],
        [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("c,m,k,group,stride,dilation,pads", [
    (3, 8, (3, 3), 1, 1, 1, [1, 1, 1, 1]),
    (8, 8, (3, 3), 8, 2, 1, [1, 1, 1, 1]),  # depthwise
    (8, 16, (1, 1), 1, 2, 1, [0, 0, 0, 0]),  # pointwise, strided
    (8, 12, (3, 3), 4, 2, 2, [0, 1, 2, 1]),  # grouped, dilated, asymmetric pads
    (4, 6, (3, 1), 1, 1, 1, [1, 0, 1, 0]),
])
def test_float64_conv_kernel_matches_onnx_reference(c, m, k, group, stride, dilation, pads):
    rng = np.random.default_rng(0)
    feeds = {"X": rng.standard_normal((2, c, 11, 13)), "W": rng.standard_normal((m, c // group, *k)),
             "B": rng.standard_normal(m)}
    model = _one_node("Conv", feeds, group=group, strides=[stride] * 2, dilations=[dilation] * 2,
                      kernel_shape=list(k), pads=pads)
    want = ReferenceEvaluator(model).run(None, feeds)[0]
    got = ReferenceEvaluator(model, new_ops=_kernels(17)).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _conv_transpose_by_definition(x, w, b, group, strides, dilations, pads, extra):
    """ConvTranspose from its definition: each input element adds its value times the kernel
    of its channel at ``position * stride + offset * dilation``; pads are then cropped."""
    n, c, *inner = x.shape
    cg, mg, *kernel = w.shape
    cg = c // group
    full = [s * (i - 1) + (k - 1) * d + 1 + e for s, i, k, d, e in zip(strides, inner, kernel, dilations, extra)]
    y = np.zeros((n, mg * group, *full))
    for image, channel, *position in np.ndindex(n, c, *inner):
        g = channel // cg
        for offset in np.ndindex(*kernel):
            at = tuple(p * s + o * d for p, s, o, d in zip(position, strides, offset, dilations))
            y[(image, slice(g * mg, (g + 1) * mg), *at)] += \
                x[(image, channel, *position)] * w[(channel, slice(None), *offset)]
    spatial = len(inner)
    y = y[(slice(None), slice(None), *(slice(pads[i], full[i] - pads[i + spatial]) for i in range(spatial)))]
    return y if b is None else y + b.reshape(1, -1, *([1] * spatial))


@pytest.mark.parametrize("c,m,k,group,stride,dilation,pads,extra", [
    (8, 4, (2, 2), 1, 2, 1, [0, 0, 0, 0], [0, 0]),  # the upsampling of a DB text detector's head
    (3, 6, (3, 3), 1, 2, 1, [1, 1, 1, 1], [1, 1]),  # output_padding
    (8, 3, (3, 3), 4, 2, 2, [0, 1, 2, 1], [1, 0]),  # grouped, dilated, asymmetric pads
    (6, 1, (4, 4), 6, 3, 1, [1, 2, 1, 0], [0, 0]),  # depthwise
    (4, 5, (3,), 1, 2, 1, [1, 0], [1]),  # 1-D
    (2, 3, (2, 3, 2), 1, 2, 1, [0, 1, 0, 0, 0, 1], [0, 0, 0]),  # 3-D
])
@pytest.mark.parametrize("bias", [True, False])
def test_float64_conv_transpose_kernel_matches_its_definition(c, m, k, group, stride, dilation, pads, extra, bias):
    rng = np.random.default_rng(3)
    feeds = {"X": rng.standard_normal((2, c, *[5 + i for i in range(len(k))])),
             "W": rng.standard_normal((c, m, *k))}
    if bias:
        feeds["B"] = rng.standard_normal(m * group)
    model = _one_node("ConvTranspose", feeds, group=group, strides=[stride] * len(k),
                      dilations=[dilation] * len(k), pads=pads, output_padding=extra)
    want = _conv_transpose_by_definition(feeds["X"], feeds["W"], feeds.get("B"), group, [stride] * len(k),
                                         [dilation] * len(k), pads, extra)
    got = ReferenceEvaluator(model, new_ops=_kernels(17)).run(None, feeds)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    if group == 1:  # onnx's own evaluator reshapes grouped weights wrongly
        np.testing.assert_allclose(got, ReferenceEvaluator(model).run(None, feeds)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("attrs", [{"output_shape": [12, 9]}, {"auto_pad": "SAME_UPPER"},
                                   {"auto_pad": "SAME_LOWER", "output_padding": [1, 0]}])
def test_float64_conv_transpose_kernel_leaves_output_shape_and_auto_pad_to_onnx(attrs):
    rng = np.random.default_rng(4)
    feeds = {"X": rng.standard_normal((1, 3, 5, 4)), "W": rng.standard_normal((3, 2, 3, 3))}
    model = _one_node("ConvTranspose", feeds, strides=[2, 2], **attrs)
    want = ReferenceEvaluator(model).run(None, feeds)[0]
    got = ReferenceEvaluator(model, new_ops=_kernels(17)).run(None, feeds)[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("k,stride,pads,ceil", [(3, 2, [1, 1, 1, 1], 0), (2, 2, [0, 0, 0, 0], 1),
                                                (3, 2, [1, 1, 1, 1], 1), (3, 1, [1, 1, 1, 1], 0)])
def test_float64_pool_kernels_match_onnx_reference(op, k, stride, pads, ceil):
    feeds = {"X": np.random.default_rng(1).standard_normal((2, 3, 11, 13))}
    model = _one_node(op, feeds, kernel_shape=[k, k], strides=[stride] * 2, pads=pads, ceil_mode=ceil)
    want = ReferenceEvaluator(model).run(None, feeds)[0]
    got = ReferenceEvaluator(model, new_ops=_kernels(17)).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_legacy_softmax_flattens_from_its_axis():
    x = np.random.default_rng(2).standard_normal((2, 3, 4))
    model = _one_node("Softmax", {"X": x}, axis=1)
    model.opset_import[0].version = 11
    got = ReferenceEvaluator(model, new_ops=_kernels(11)).run(None, {"X": x})[0]
    flat = np.exp(x.reshape(2, 12) - x.reshape(2, 12).max(1, keepdims=True))
    np.testing.assert_allclose(got, (flat / flat.sum(1, keepdims=True)).reshape(x.shape), rtol=1e-12)


def test_a_reference_that_disagrees_with_onnxruntime_is_not_used():
    """onnx's reference evaluator and onnxruntime read an old Dropout differently: the
    node check refuses the float64 reference instead of trusting it."""
    x = np.random.default_rng(3).standard_normal((2, 5)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Dropout", ["x"], ["y"], ratio=0.5, is_test=0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)])
    model.ir_version = 3
    reference = Float64Reference.build(model, [{"x": x}])
    if reference.outputs is not None:  # the two agree on this onnx version: then the values must too
        np.testing.assert_allclose(reference.outputs[0]["y"], x.astype(np.float64), rtol=1e-6)
    else:
        assert "Dropout" in reference.reason or "evaluator" in reference.reason


class PlantedInFixpointPass(optcc.Pass):
    """Adds 1e-3 to the first Conv bias it has not touched yet: a wrong rewrite that a
    fixpoint would repeat on every round."""

    name = "planted-in-fixpoint"
    numerics = "fusion"

    def call(self, model: ir.Model) -> optcc.PassResult:
        for node in model.graph:
            if node.op_type == "Conv" and "planted" not in node.meta:
                bias = node.inputs[2]
                shifted = ir.Value(name=f"{bias.name}_planted",
                                   const_value=ir.tensor(bias.const_value.numpy() + np.float32(1e-3)))
                model.graph.register_initializer(shifted)
                node.replace_input_with(2, shifted)
                node.meta["planted"] = True
                return optcc.PassResult(model, True)
        return optcc.PassResult(model, False)


def test_a_wrong_pass_inside_a_fixpoint_is_reverted_for_the_rest_of_the_run():
    from optcc.infra import Fixpoint

    model = _conv_bn([0])
    planted = PlantedInFixpointPass()
    steps = [Fixpoint([planted, optcc.create_pass("eliminate-dead-nodes")], max_iters=8, name="loop")]
    result = optcc.optimize(model, passes=steps)
    statuses = [r.status for r in result.report.passes if r.name == "planted-in-fixpoint"]
    assert statuses and set(statuses) == {"reverted"}
    assert result.report.verification["status"] == "passed"


def test_a_reference_over_the_work_budget_is_refused_from_inferred_shapes(monkeypatch):
    """A Conv whose float64 evaluation would exceed the budget (128x128 channels, 3x3, on a
    256x256 input given by the sample: the graph's spatial axes are free) is refused with
    the work counted from onnx's inferred shapes, before any run that returns every
    intermediate tensor."""
    from optcc.numerics import float64

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((128, 128, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128, "h", "w"])],
        [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    monkeypatch.setattr(float64, "_float32_values", lambda *a: pytest.fail("probed every intermediate"))
    feeds = [{"x": rng.standard_normal((1, 128, 256, 256)).astype(np.float32)}]
    reference = Float64Reference.build(model, feeds)  # onnxruntime has no float64 Conv: the evaluator's path
    expected = 128 * 128 * 9 * 256 * 256 * (len(feeds) + 1)  # MACs of the sample and the node check
    assert reference.outputs is None
    assert f"at least {(expected + 2 * 2 * float64.NODE_COST_MACS) / 1e9:.2g} GMAC" in reference.reason


def _long_chain(length: int, channels: int, size: int) -> tuple[onnx.ModelProto, list[float]]:
    """x -> 1x1 Conv (no float64 kernel in onnxruntime: onnx's evaluator runs it) -> ``length``
    nodes alternating Mul by a constant and Tanh; the constants, in order."""
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((channels, channels, 1, 1)).astype(np.float32) / channels
    scales = [float(np.float32(s)) for s in rng.uniform(0.5, 2.0, length)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["v0"])]
    inits = [numpy_helper.from_array(weight, "W")]
    for i, s in enumerate(scales):
        out = "y" if i == length - 1 else f"v{i + 1}"
        if i % 2:
            nodes.append(helper.make_node("Tanh", [f"v{i}"], [out]))
        else:
            inits.append(numpy_helper.from_array(np.array(s, np.float32), f"s{i}"))
            nodes.append(helper.make_node("Mul", [f"v{i}", f"s{i}"], [out]))
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, size, size])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), scales


def test_the_float64_evaluation_of_a_long_chain_holds_a_few_intermediates(monkeypatch):
    """Each intermediate of a 60-node chain is dropped once its reader has run: the float64
    evaluation's peak of traced memory stays within a few intermediates, not the chain's 60,
    and its output equals the chain computed by numpy in float64."""
    import tracemalloc

    from optcc.numerics import float64

    channels, size, length = 8, 128, 60
    model, scales = _long_chain(length, channels, size)
    x = np.random.default_rng(4).standard_normal((1, channels, size, size)).astype(np.float32)
    peaks: list[int] = []
    evaluate = float64._evaluate

    def traced(*args, **kwargs):
        tracemalloc.reset_peak()
        result = evaluate(*args, **kwargs)
        peaks.append(tracemalloc.get_traced_memory()[1] - before[0])
        return result

    monkeypatch.setattr(float64, "_evaluate", traced)
    tracemalloc.start()
    try:
        before = [tracemalloc.get_traced_memory()[0]]
        reference = Float64Reference.build(model, [{"x": x}])
    finally:
        tracemalloc.stop()
    assert reference.kind == "float64 (onnx reference evaluator)", reference.reason
    intermediate = channels * size * size * 8
    assert len(peaks) == 1 and peaks[0] < 6 * intermediate < length * intermediate
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64).reshape(channels, channels)
    expected = np.einsum("mc,nchw->nmhw", w, x.astype(np.float64))
    for i, s in enumerate(scales):
        expected = np.tanh(expected) if i % 2 else expected * s
    np.testing.assert_allclose(reference.outputs[0]["y"], expected, rtol=1e-12, atol=1e-14)


def test_a_value_read_only_inside_a_subgraph_is_kept_until_that_node_runs():
    """``c`` is read by no node of the main graph after the Conv, only by the If's branches:
    the float64 evaluation drops it after the If, never before; the graph output ``y`` and
    the kept ``total`` are never dropped, the unread ``unused`` right after its producer."""
    from optcc.numerics import float64

    def branch(op: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node(op, ["c"], ["out"])], op,
                                 [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"]),
         helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
         helper.make_node("Greater", ["total", "zero"], ["positive"]),
         helper.make_node("Neg", ["x"], ["unused"]),
         helper.make_node("If", ["positive"], ["y"], then_branch=branch("Neg"), else_branch=branch("Abs"))],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    releases = [sorted(names) for names in float64._releases(graph, ["total"])]
    assert releases == [["W"], [], ["zero"], ["unused", "x"], ["c", "positive"]]



def test_conv_transpose_work_counts_each_input_element_times_its_footprint():
    """A grouped, strided ConvTranspose's multiply-accumulates equal its products counted by
    its definition: all ones, without padding, every product adds 1 to the output, so the
    output's sum is their number (not the output's size times the kernel's)."""
    from optcc.numerics.float64 import estimated_macs

    n, c, h, w, group, out_per_group, kernel, strides = 2, 6, 5, 7, 2, 4, (3, 2), [2, 3]
    x, weight = np.ones((n, c, h, w)), np.ones((c, out_per_group, *kernel))
    y = _conv_transpose_by_definition(x, weight, None, group, strides, [1, 1], [0] * 4, [0, 0])
    node = helper.make_node("ConvTranspose", ["x", "W"], ["y"], group=group, strides=strides)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    macs = estimated_macs(model, {"x": x.shape, "W": weight.shape, "y": y.shape})
    assert macs == int(y.sum()) == n * c * h * w * out_per_group * kernel[0] * kernel[1]


def test_float64_references_of_several_sample_sets_serialize_the_original_once(monkeypatch):
    """Bisection asks for the float64 outputs of several sets of samples: the original is
    serialized and checked once, and each set's outputs equal numpy's in float64."""
    from optcc import ir as oir

    model = _conv_bn([1])
    rng = np.random.default_rng(8)
    inputs = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(3)]
    calls = []
    serialize = oir.serialize
    monkeypatch.setattr(oir, "serialize", lambda *a, **k: calls.append(1) or serialize(*a, **k))
    with optcc.Verifier(model, inputs=inputs) as verifier:
        references = [verifier.float64_reference(positions) for positions in ([1], [0, 2], [1])]
    assert len(calls) == 1
    for reference, positions in zip(references, ([1], [0, 2], [1])):
        assert reference.outputs is not None, reference.reason
        for outputs, i in zip(reference.outputs, positions):
            np.testing.assert_allclose(outputs["y"], _float64_conv_bn(model, inputs[i]["x"]), rtol=1e-12, atol=1e-9)


def test_the_node_check_and_evaluation_carry_non_finite_values():
    """A picture with an infinite and a missing pixel through a 1x1 Conv (no float64 kernel
    in onnxruntime: onnx's evaluator, checked node by node against onnxruntime): the
    float64 outputs are numpy's, infinities and NaNs in the same places."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((3, 2, 1, 1)).astype(np.float32)
    x = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    x[0, 0, 1, 1], x[0, 1, 2, 3] = np.inf, np.nan
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    reference = Float64Reference.build(model, [{"x": x}])
    assert reference.kind == "float64 (onnx reference evaluator)", reference.reason
    expected = np.maximum(np.einsum("mc,nchw->nmhw", w[:, :, 0, 0].astype(np.float64), x.astype(np.float64)), 0)
    np.testing.assert_array_equal(np.isnan(reference.outputs[0]["y"]), np.isnan(expected))
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(reference.outputs[0]["y"][~finite & ~np.isnan(expected)],
                                  expected[~finite & ~np.isnan(expected)])
    np.testing.assert_allclose(reference.outputs[0]["y"][finite], expected[finite], rtol=1e-12)


@pytest.mark.parametrize("missing_pixel", [False, True])
def test_the_node_check_refuses_an_evaluator_that_disagrees_with_onnxruntime(missing_pixel):
    """onnxruntime's Conv output nudged by 1% (as a kernel that computed something else
    would): the node check names that Conv, whether or not the values hold a NaN."""
    from optcc.numerics.float64 import _check_nodes, _float32_values, _opset, _releases, to_float64

    rng = np.random.default_rng(6)
    w = rng.standard_normal((3, 2, 1, 1)).astype(np.float32)
    x = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    if missing_pixel:
        x[0, 1, 2, 3] = np.nan
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model64, _ = to_float64(model)
    evaluator = ReferenceEvaluator(model64, new_ops=_kernels(_opset(model)))
    values, problem = _float32_values(model, {"x": x})
    assert problem is None
    assert _check_nodes(model, evaluator, dict(values), _releases(model.graph, ["y"])) is None
    values["c"] = values["c"] * np.float32(1.01)
    problem = _check_nodes(model, evaluator, dict(values), _releases(model.graph, ["y"]))
    assert problem is not None and "Conv 'conv'" in problem and "rel" in problem
