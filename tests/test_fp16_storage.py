"""ConvertFloat16Pass size rules: weights of float32 nodes stored float16 behind one Cast
(exact ones always, rounded ones only within tolerance), underflow judged by its effect,
shape inputs probed with real data, keep_io_types=False, no value_info bloat."""

from __future__ import annotations

import collections
import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import optcc
from optcc.passes.convert_float16 import ConvertFloat16Pass
from reference import lossy_metrics, onnxruntime_outputs, random_feeds

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OPTCC_CACHE", str(tmp_path_factory.getbasetemp() / "optcc-cache"))


def with_weights(text: str, **weights: np.ndarray) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(a, n) for n, a in weights.items())
    onnx.checker.check_model(proto)
    return proto


def run(proto: onnx.ModelProto, **options) -> optcc.PassResult:
    result = ConvertFloat16Pass(**options)(optcc.ir.load(proto))
    onnx.checker.check_model(optcc.ir.serialize(result.model), full_check=True)
    return result


def hist(model: ir.Model) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in optcc.ir.nodes(model)))


def reader(model: ir.Model, op: str) -> ir.Node:
    return next(n for n in model.graph if n.op_type == op)


def fp16_metrics(proto: onnx.ModelProto, model, samples) -> list[tuple[float, float]]:
    """(SQNR in dB, cosine) per output of ``model`` (ir or proto) against the float32 ``proto``."""
    return lossy_metrics(proto, model, samples)


def assert_fp16_close(proto: onnx.ModelProto, model: ir.Model, samples, min_db: float = 40.0) -> None:
    """Every output within ``min_db`` SQNR and cosine 0.9999 of the float32 original."""
    for sqnr, cosine in fp16_metrics(proto, model, samples):
        assert sqnr >= min_db and cosine >= 0.9999, (sqnr, cosine)


MATMUL = """<ir_version: 8, opset_import: ["": 17]>
g (float[4, 64] x) => (float[4, 64] y) {
  a = MatMul(x, w)
  y = Tanh(a)
}"""


def test_exact_weight_of_a_blocked_node_is_stored_float16_behind_one_cast():
    w = np.random.default_rng(0).integers(-8, 8, (64, 64)).astype(np.float32)  # float16-exact
    proto = with_weights(MATMUL, w=w)
    result = run(proto, block=["MatMul"])
    model = result.model
    assert result.modified
    stored = model.graph.initializers["w"]
    assert stored.const_value.dtype == F16
    matmul = reader(model, "MatMul")
    cast = matmul.inputs[1].producer()
    assert cast.op_type == "Cast" and cast.inputs[0] is stored and cast.attributes["to"].as_int() == int(F32)
    assert matmul.inputs[0].name == "x"  # the blocked MatMul still computes float32
    assert result.stats["float32_nodes_weights_stored_float16"]["exact"] == 1
    # Exact: the blocked part computes bit for bit what the original does.
    feeds = random_feeds(proto)
    for ref, got in zip(onnxruntime_outputs(proto, feeds), onnxruntime_outputs(optcc.ir.serialize(model), feeds)):
        np.testing.assert_array_equal(got, ref)
    assert not ConvertFloat16Pass(block=["MatMul"])(model).modified


def test_small_or_custom_read_weights_are_not_given_a_cast():
    proto = with_weights(
        """<ir_version: 8, opset_import: ["": 17, "local": 1]>
        g (float[4, 64] x, float[4, 4] x4) => (float[4, 64] y, float[64, 64] seen, float[4, 8] z) {
          seen = local.Keep(w)
          y = MatMul(x, w)
          z = MatMul(x4, small)
        }
        <domain: "local", opset_import: ["": 17]>
        Keep (t) => (u) { u = Identity(t) }""",
        w=np.ones((64, 64), np.float32), small=np.full((64, 8), 0.25, np.float32)[:, :1].repeat(8, 1)[:4])
    result = run(proto, block=["MatMul"])
    inits = result.model.graph.initializers
    assert inits["w"].const_value.dtype == F32  # a custom-domain op reads it
    assert inits["small"].const_value.dtype == F32  # 32 values do not pay for a Cast node
    assert hist(result.model).get("Cast", 0) == 0
    assert not result.modified


def test_rounded_weight_of_a_range_kept_node_is_stored_float16_within_tolerance():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 64)) * 3000).astype(np.float32)  # |w| < 65504, |x @ w| > 65504
    proto = with_weights(
        """<ir_version: 8, opset_import: ["": 17]>
        g (float[4, 64] x) => (float[4, 64] y) {
          h = Relu(x)
          a = MatMul(h, w)
          s = Mul(a, k)
          y = Tanh(s)
        }""", w=w, k=np.array(1e-5, np.float32))
    feeds = {"x": (rng.standard_normal((4, 64)) * 4).astype(np.float32)}
    result = run(proto, inputs=[feeds])
    model = result.model
    kept = result.stats["kept_float32"]
    assert any(">= 65504" in why for why in kept.values())
    matmul = reader(model, "MatMul")
    assert matmul.outputs[0].name == "a" and matmul.inputs[1].producer().op_type == "Cast"
    assert model.graph.initializers["w"].const_value.dtype == F16
    assert reader(model, "Relu").outputs[0].dtype in (F16, None)  # converted (type left to inference)
    report = result.stats["float32_nodes_weights_stored_float16"]
    assert report["rounded"] == 1 and report["bytes_saved"] == 2 * w.size
    assert_fp16_close(proto, model, [feeds])


def test_rounded_weight_that_breaks_the_tolerance_stays_float32():
    # y = (x @ w) - (x @ w_near): the difference of two close products; rounding w_near to
    # float16 destroys it, so the check must refuse storing it in float16.
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((64, 64)) * 3000).astype(np.float32)
    w_near = w + (rng.standard_normal((64, 64)) * 1e-3).astype(np.float32)
    proto = with_weights(
        """<ir_version: 8, opset_import: ["": 17]>
        g (float[4, 64] x) => (float[4, 64] y) {
          a = MatMul(x, w)
          b = MatMul(x, w_near)
          y = Sub(a, b)
        }""", w=w, w_near=w_near)
    feeds = {"x": (rng.standard_normal((4, 64)) * 4).astype(np.float32)}
    result = run(proto, inputs=[feeds])
    inits = result.model.graph.initializers
    assert inits["w"].const_value.dtype == F32 and inits["w_near"].const_value.dtype == F32
    # with both weights float32 float16 would save none of the weight bytes: declined
    assert not result.modified and "save 0.0% of the float32 weight bytes" in result.stats["reason"]
    assert result.stats["float_weight_bytes"] == {"float32": 8 * w.size, "float16": 8 * w.size, "min_saving": 0.25}
    assert_fp16_close(proto, result.model, [feeds])


def test_underflow_is_judged_by_its_effect():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    w[rng.random((64, 64)) < 0.3] = 1e-9  # 30% flush to zero in float16, carrying no signal
    proto = with_weights(
        """<ir_version: 8, opset_import: ["": 17]>
        g (float[4, 64] x) => (float[4, 64] y, float[4, 64] z) {
          a = MatMul(x, w)
          y = Tanh(a)
          t = Mul(x, tiny)
          z = Mul(t, huge)
        }""", w=w, tiny=np.array(1e-9, np.float32), huge=np.array(1e9, np.float32))
    result = run(proto)
    kept = result.stats["kept_float32"]
    assert not any("MatMul" in k for k in kept)  # the flushed weights do not matter
    assert any("underflows" in why for why in kept.values())  # x * 1e-9 does: all of it flushes
    assert result.model.graph.initializers["w"].const_value.dtype == F16
    assert_fp16_close(proto, result.model, [random_feeds(proto, seed=s) for s in (0, 1)])


# Relu -> Reshape to a shape computed from the input's -> Sigmoid
_COMPUTED_SHAPE_RESHAPE = """<ir_version: 8, opset_import: ["": 17]>
    g (float[N, 3, 4] x) => (float[N, 12] y) {
      s = Shape <end = 1> (x)
      minus1 = Constant <value = int64[1] {-1}> ()
      shape = Concat <axis = 0> (s, minus1)
      h = Relu(x)
      r = Reshape(h, shape)
      y = Sigmoid(r)
    }"""


def test_reshape_with_a_computed_shape_is_probed_and_converted():
    proto = onnx.parser.parse_model(_COMPUTED_SHAPE_RESHAPE)
    result = run(proto, input_shapes={"x": [2, 3, 4]})
    assert not any("Reshape" in k for k in result.stats["kept_float32"])
    assert result.stats["converted"].get("Reshape") == 1
    assert hist(result.model)["Cast"] == 2  # one at each boundary
    assert_fp16_close(proto, result.model, [random_feeds(proto, {"x": [2, 3, 4]}, seed=s) for s in (0, 1)])


def test_a_fresh_probe_reads_the_first_samples_computed_shape(tmp_path, monkeypatch):
    """With no cached verdict, the probe of Reshape is given the first sample's computed
    shape (what the reference computes there, fetched for the probes), not a placeholder
    of its type; Reshape converts and the result stays within float16's tolerance."""
    from optcc.fp16 import support

    monkeypatch.setenv("OPTCC_CACHE", str(tmp_path))
    probed: dict[str, list] = {}
    probe_op = support.probe_op

    def recorded(node, inputs, float16_inputs, opset, provider="CPUExecutionProvider"):
        probed[node.op_type] = list(inputs)
        return probe_op(node, inputs, float16_inputs, opset, provider)

    monkeypatch.setattr(support, "probe_op", recorded)
    proto = onnx.parser.parse_model(_COMPUTED_SHAPE_RESHAPE)
    samples = [random_feeds(proto, {"x": [n, 3, 4]}, seed=n) for n in (2, 5)]
    result = run(proto, inputs=samples)
    data, shape = probed["Reshape"]
    np.testing.assert_array_equal(shape, [2, -1])
    np.testing.assert_array_equal(data, np.maximum(samples[0]["x"], 0))
    assert result.stats["converted"].get("Reshape") == 1
    assert_fp16_close(proto, result.model, samples)


def test_keep_io_types_false_gives_a_float16_interface_without_boundary_casts():
    w = (np.random.default_rng(4).standard_normal((64, 64)) * 0.2).astype(np.float32)
    proto = with_weights(MATMUL, w=w)
    result = run(proto, keep_io_types=False)
    model = result.model
    assert model.graph.inputs[0].dtype == F16 and model.graph.outputs[0].dtype == F16
    assert hist(model) == {"MatMul": 1, "Tanh": 1}
    x = np.random.default_rng(5).standard_normal((4, 64)).astype(np.float32)
    (got,) = onnxruntime_outputs(optcc.ir.serialize(model), {"x": x.astype(np.float16)})
    assert got.dtype == np.float16
    assert_fp16_close(proto, model, [{"x": x}])
    assert not ConvertFloat16Pass(keep_io_types=False)(model).modified


def test_no_value_info_is_added_for_intermediate_values():
    proto = with_weights(
        """<ir_version: 8, opset_import: ["": 17]>
        g (float[4, 64] x) => (float[4, 64] y) {
          a = MatMul(x, w)
          b = Relu(a)
          c = Add(b, a)
          y = Tanh(c)
        }""", w=np.full((64, 64), 0.01, np.float32))
    result = run(proto)
    out = optcc.ir.serialize(result.model)
    before = {v.name for v in optcc.ir.serialize(optcc.ir.load(proto)).graph.value_info}
    assert {v.name for v in out.graph.value_info} <= before  # the initializer's entry only
    inferred = onnx.shape_inference.infer_shapes(out, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    assert types["a"] == types["b"] == types["c"] == onnx.TensorProto.FLOAT16
    assert math.isfinite(result.stats["sqnr_db"]["y"])


def test_model_with_external_data_converts(tmp_path):
    """Sessions on a model whose weights live in an external file must load it from a path
    (a session built from bytes cannot find the data): the pass converts it as it would the
    same model held in memory, and the file on disk is left as it was."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    proto = with_weights(
        """<ir_version: 8, opset_import: ["": 17]>
        g (float[4, 64] x) => (float[4, 64] y) {
          a = MatMul(x, w)
          y = Tanh(a)
        }""", w=w)
    path = tmp_path / "ext.onnx"
    onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    data = (tmp_path / "ext.onnx.data").read_bytes()
    model = optcc.ir.load(path)
    assert optcc.ir.uses_external_data(model)
    feeds = {"x": rng.standard_normal((4, 64)).astype(np.float32)}
    result = ConvertFloat16Pass(inputs=[feeds])(model)
    assert "skipped" not in result.stats and "ranges" not in result.stats, result.stats
    assert result.stats["converted"]
    assert result.model.graph.initializers["w"].const_value.dtype == F16
    session = ort.InferenceSession(optcc.ir.serialize(result.model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)[0].astype(np.float64)
    ref = np.tanh(feeds["x"].astype(np.float64) @ w.astype(np.float64))
    assert np.abs(got - ref).max() < 1e-2
    assert (tmp_path / "ext.onnx.data").read_bytes() == data
