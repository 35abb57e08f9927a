"""Sessions whose weights are handed to onnxruntime compute what the model computes, with
and without onnxruntime's graph optimizations (its fusions around user-owned initializers
are wrong; the shared-weight sessions must not rely on them)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import optcc.ir as oir
from optcc.runtime.session import make_session, session_options
from optcc.runtime.shared_weights import light_proto, weighted_session

RNG = np.random.default_rng(7)


def _conv_bn_add() -> onnx.ModelProto:
    weight = RNG.standard_normal((32, 8, 3, 3)).astype(np.float32)
    bias = RNG.standard_normal(32).astype(np.float32)
    scale = (RNG.standard_normal(32) + 2).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "s", "beta", "mean", "var"], ["n"]),
         helper.make_node("Add", ["n", "shift"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 6, 6])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B"),
         numpy_helper.from_array(scale, "s"), numpy_helper.from_array(bias * 0.5, "beta"),
         numpy_helper.from_array(bias * 0.1, "mean"), numpy_helper.from_array(np.abs(scale), "var"),
         numpy_helper.from_array(RNG.standard_normal((1, 32, 1, 1)).astype(np.float32), "shift")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


@pytest.mark.parametrize("inline_max", [0, None], ids=["handed-over", "inline"])
@pytest.mark.parametrize("optimize", [False, True, "extended", "all"])
def test_weighted_session_matches_the_reference_evaluator(optimize, inline_max, monkeypatch):
    if inline_max is not None:  # 0: every weight handed to onnxruntime, none copied into the proto
        monkeypatch.setattr("optcc.runtime.shared_weights.INLINE_MAX_BYTES", inline_max)
    proto = _conv_bn_add()
    x = RNG.standard_normal((1, 8, 6, 6)).astype(np.float32)
    expected = ReferenceEvaluator(proto).run(None, {"x": x})[0]
    model = oir.load(proto)
    light, weights = light_proto(model)
    assert weights  # the Conv weight is handed over, not serialized
    got = weighted_session(light, weights, session_options(optimize=optimize)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(),
                                  numpy_helper.to_array(proto.graph.initializer[0]))  # never written to


@pytest.mark.parametrize("optimize", [False, True])
def test_external_data_session_matches_the_reference_evaluator(tmp_path, optimize, monkeypatch):
    monkeypatch.setattr("optcc.runtime.session.SHARED_MIN_BYTES", 1024)
    proto = _conv_bn_add()
    x = RNG.standard_normal((1, 8, 6, 6)).astype(np.float32)
    expected = ReferenceEvaluator(proto).run(None, {"x": x})[0]
    path = tmp_path / "m.onnx"
    onnx.save(proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=1024)
    session = make_session(oir.load(str(path)), scratch=tmp_path, options=session_options(optimize=optimize))
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)


def test_other_providers_load_a_large_in_memory_model_from_a_saved_file(tmp_path, monkeypatch):
    """Weights are handed over to CPU sessions alone: for any other provider (here the CPU
    standing in for one) a model past the hand-over size is saved with external data into the
    scratch folder and loaded from there, computing what the model computes."""
    monkeypatch.setattr("optcc.runtime.session.CPU", "another provider")
    monkeypatch.setattr("optcc.runtime.session.HANDOVER_MIN_BYTES", 1024)
    proto = _conv_bn_add()
    x = RNG.standard_normal((1, 8, 6, 6)).astype(np.float32)
    expected = ReferenceEvaluator(proto).run(None, {"x": x})[0]
    session = make_session(oir.load(proto), "CPUExecutionProvider", scratch=tmp_path)
    assert not hasattr(session, "optcc_weights")  # nothing handed over
    saved = sorted(p.suffix for p in tmp_path.iterdir())
    assert saved == [".data", ".onnx"]
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)
