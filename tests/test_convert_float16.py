"""ConvertFloat16Pass: boundaries, kept inputs, range safety, subgraphs, fallback, fp16 inputs."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto

import optcc
from optcc.passes.convert_float16 import KEEP_MARKER, ConvertFloat16Pass
from reference import lossy_metrics, onnxruntime_outputs, random_feeds

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OPTCC_CACHE", str(tmp_path_factory.getbasetemp() / "optcc-cache"))


def parse(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(text)


def convert(proto: onnx.ModelProto, **options):
    """Run the pass, then check what every converted model must satisfy."""
    onnx.checker.check_model(proto)
    model = optcc.ir.load(proto)
    result = ConvertFloat16Pass(**options)(model)
    out = optcc.ir.serialize(result.model)
    onnx.checker.check_model(out)
    options_ = ort.SessionOptions()
    options_.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ort.InferenceSession(out.SerializeToString(), options_, providers=["CPUExecutionProvider"])
    for node in optcc.ir.nodes(result.model):  # every Cast's `to` matches its declared type
        if node.op_type == "Cast":
            declared = node.outputs[0].dtype
            assert declared is None or int(declared) == node.attributes["to"].as_int(), node.name
    before = optcc.ir.load(proto)
    for old, new in zip([*before.graph.inputs, *before.graph.outputs],
                        [*result.model.graph.inputs, *result.model.graph.outputs]):
        assert (old.name, old.dtype, str(old.shape)) == (new.name, new.dtype, str(new.shape))
    # No value_info bloat: beyond what the input declared, only renamed graph outputs ...
    declared = len(optcc.ir.serialize(optcc.ir.load(proto)).graph.value_info)
    assert len(out.graph.value_info) <= declared + len(proto.graph.output)
    # ... and onnx's inference derives them all, consistent with every Cast's `to`.
    typed = optcc.ir.load(onnx.shape_inference.infer_shapes(out, strict_mode=True))
    for node in optcc.ir.nodes(typed):
        if node.op_type == "Cast":
            assert int(node.outputs[0].dtype) == node.attributes["to"].as_int(), node.name
    return dataclasses.replace(result, model=typed)


def hist(model: ir.Model, graph=None) -> dict[str, int]:
    nodes = list(graph) if graph is not None else list(optcc.ir.nodes(model))
    return dict(collections.Counter(n.op_type for n in nodes))


def node(model: ir.Model, op: str) -> ir.Node:
    return next(n for n in model.graph if n.op_type == op)


def fp16_metrics(proto: onnx.ModelProto, model, samples) -> list[tuple[float, float]]:
    """(SQNR in dB, cosine) per output of ``model`` (ir or proto) against the float32 ``proto``."""
    return lossy_metrics(proto, model, samples)


def check_numerics(proto: onnx.ModelProto, result, min_db: float = 40.0, inputs=None,
                   input_shapes=None) -> None:
    """Every output of the converted model within ``min_db`` SQNR and cosine 0.9999 of the
    float32 original, on ``inputs`` or on two random samples shaped by ``input_shapes``."""
    samples = inputs or [random_feeds(proto, input_shapes, seed=s) for s in (0, 1)]
    for sqnr, cosine in fp16_metrics(proto, result.model, samples):
        assert sqnr >= min_db and cosine >= 0.9999, (sqnr, cosine)


MLP = """<ir_version: 8, opset_import: ["": 17]>
mlp (float[N, 16] x) => (float[N, 8] y, float[N, 16] h) {
  h = Relu(x)
  a = MatMul(x, w1)
  b = Add(a, bias)
  c = Mul(h, h)
  d = MatMul(c, w1)
  y = Add(b, d)
}
"""


def mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    proto = parse(MLP)
    proto.graph.initializer.extend([
        onnx.numpy_helper.from_array((rng.standard_normal((16, 8)) * 0.3).astype(np.float32), "w1"),
        onnx.numpy_helper.from_array((rng.standard_normal(8)).astype(np.float32), "bias"),
    ])
    return proto


def test_boundaries_one_shared_cast_per_input_and_output():
    proto = mlp()
    result = convert(proto)
    model = result.model
    assert result.modified
    casts = [n for n in model.graph if n.op_type == "Cast"]
    # x (read by Relu and MatMul) -> one Cast; outputs y and h -> one Cast each.
    assert len(casts) == 3
    x_cast = [c for c in casts if c.inputs[0].name == "x"]
    assert len(x_cast) == 1 and len(x_cast[0].outputs[0].uses()) == 2
    # h is a graph output in the middle of the computation: Mul reads the float16 value.
    assert node(model, "Mul").inputs[0].dtype == F16
    assert model.graph.outputs[1].producer().op_type == "Cast"
    assert {v.dtype for v in model.graph.initializers.values()} == {F16}
    assert result.stats["initializers_converted"] == 2
    check_numerics(proto, result, input_shapes={"x": [4, 16]})
    # Idempotence: a second run has nothing left to convert.
    again = ConvertFloat16Pass()(model)
    assert not again.modified


def test_keep_io_types_list_converts_the_other_interfaces():
    model = optcc.ir.load(mlp())
    result = ConvertFloat16Pass(keep_io_types=["y"])(model)
    types = {v.name: v.dtype for v in (*result.model.graph.inputs, *result.model.graph.outputs)}
    assert types == {"x": F16, "h": F16, "y": F32}
    assert hist(result.model)["Cast"] == 1


def test_resize_scales_and_roi_stay_float32():
    proto = parse("""<ir_version: 8, opset_import: ["": 17]>
    g (float[1, 2, 4, 4] x) => (float[1, 2, 8, 8] y) {
      roi = Constant <value = float[0] {}> ()
      scales = Constant <value = float[4] {1.0, 1.0, 2.0, 2.0}> ()
      r = Resize <mode = "linear"> (x, roi, scales)
      y = Relu(r)
    }""")
    result = convert(proto)
    resize = node(result.model, "Resize")
    assert resize.inputs[0].dtype == F16 and resize.outputs[0].dtype == F16
    assert resize.inputs[1].dtype == F32 and resize.inputs[2].dtype == F32
    assert resize.inputs[1].producer().op_type == "Constant"
    check_numerics(proto, result)


def test_overflowing_region_stays_float32():
    proto = parse("""<ir_version: 8, opset_import: ["": 17]>
    g (float[4, 8] x) => (float[4, 8] y) {
      k1 = Constant <value = float {300.0}> ()
      k2 = Constant <value = float {1000.0}> ()
      k3 = Constant <value = float {0.0001}> ()
      a = Mul(x, k1)
      big = Mul(a, k2)
      small = Mul(big, k3)
      y = Tanh(small)
    }""")
    result = convert(proto)
    model = result.model
    muls = [n for n in model.graph if n.op_type == "Mul"]
    assert [m.outputs[0].dtype for m in muls] == [F16, F32, F32]  # 'big' reaches ~1e6
    assert node(model, "Tanh").outputs[0].dtype == F16
    kept = result.stats["kept_float32"]
    assert len(kept) == 2 and all(">= 65504" in r for r in kept.values())
    check_numerics(proto, result)


def test_if_body_is_converted_with_its_interface_kept():
    proto = parse("""<ir_version: 8, opset_import: ["": 17]>
    g (float[3, 5] x, bool c) => (float[3, 5] y) {
      y = If(c) <
        then_branch = t () => (float[3, 5] a) {
          k = Constant <value = float {0.5}> ()
          m = Mul(x, k)
          a = Relu(m)
        },
        else_branch = e () => (float[3, 5] b) { b = Neg(x) }
      >
    }""")
    result = convert(proto)
    graphs = list(optcc.ir.graphs(result.model))
    then_body = graphs[1]
    assert hist(result.model, then_body) == {"Cast": 2, "Constant": 1, "Mul": 1, "Relu": 1}
    mul = next(n for n in then_body if n.op_type == "Mul")
    assert mul.outputs[0].dtype == F16 and mul.inputs[1].dtype == F16
    assert then_body.outputs[0].dtype == F32 and node(result.model, "If").outputs[0].dtype == F32
    rng = np.random.default_rng(1)
    for flag in (True, False):
        feeds = {"x": rng.standard_normal((3, 5)).astype(np.float32), "c": np.array(flag)}
        check_numerics(proto, result, inputs=[feeds])


def test_fallback_returns_the_sensitive_nodes_to_float32():
    proto = parse("""<ir_version: 8, opset_import: ["": 17]>
    g (float[16, 16] x) => (float[16, 16] y) {
      h = Relu(x)
      k = Constant <value = float {1000.0}> ()
      up = Add(h, k)
      down = Sub(up, k)
      y = Sigmoid(down)
    }""")
    result = convert(proto)
    model = result.model
    assert node(model, "Relu").outputs[0].dtype == F16
    assert node(model, "Sigmoid").outputs[0].dtype == F16
    assert node(model, "Add").outputs[0].dtype == F32
    assert node(model, "Sub").outputs[0].dtype == F32
    assert len(result.stats["returned_to_float32"]) == 2
    assert result.stats["sqnr_db"]["y"] >= 40
    assert KEEP_MARKER in model.metadata_props
    check_numerics(proto, result)
    assert not ConvertFloat16Pass()(model).modified


def test_partly_float16_model_is_not_double_converted():
    proto = parse("""<ir_version: 8, opset_import: ["": 17]>
    g (float16[4, 6] x) => (float[4, 6] y, float16[4, 6] z) {
      xf = Cast <to = 1> (x)
      y = Mul(xf, w)
      z = Add(x, b16)
    }""")
    rng = np.random.default_rng(2)
    proto.graph.initializer.extend([
        onnx.numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "w"),
        onnx.numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float16), "b16"),
    ])
    result = convert(proto)
    model = result.model
    mul = node(model, "Mul")
    assert mul.inputs[0].name == "x"  # f16 -> f32 -> f16 removed: the original Cast is gone
    assert hist(model) == {"Mul": 1, "Add": 1, "Cast": 1}  # only the output boundary Cast
    assert model.graph.initializers["b16"].const_value.dtype == F16
    check_numerics(proto, result)


def test_custom_domain_op_passes_through():
    proto = parse("""<ir_version: 8, opset_import: ["": 17, "local": 1]>
    g (float[2, 3] x) => (float[2, 3] y) {
      a = Relu(x)
      b = local.Twice(a)
      y = Neg(b)
    }
    <domain: "local", opset_import: ["": 17]>
    Twice (t) => (u) { u = Add(t, t) }""")
    result = convert(proto)
    twice = next(n for n in result.model.graph if n.domain == "local")
    assert twice.inputs[0].dtype == F32 and twice.outputs[0].dtype == F32
    assert node(result.model, "Relu").outputs[0].dtype == F16
    check_numerics(proto, result)


def test_user_block_keeps_op_types_and_named_nodes():
    proto = mlp()
    for node_ in proto.graph.node:
        node_.name = f"n_{node_.output[0]}"
    result = convert(proto, block=["Mul", "n_y"])
    kept = result.stats["kept_float32"]
    assert set(kept) == {"n_c", "n_y"} and set(kept.values()) == {"blocked by the user"}
    assert node(result.model, "Mul").outputs[0].dtype == F32


def _shared_weight_model(values: np.ndarray) -> onnx.ModelProto:
    """``c`` read by a Min that converts and a Mul the user keeps float32."""
    proto = parse("""<ir_version: 8, opset_import: ["": 17]>
    g (float[2, 3] x) => (float[2, 3] y) {
      a = Min(x, c)
      y = Mul(a, c)
    }""")
    proto.graph.initializer.append(onnx.numpy_helper.from_array(values.astype(np.float32), "c"))
    return proto


def test_a_small_weight_read_in_both_types_gets_a_float16_copy_not_a_cast():
    """The float16 reader reads a float16 copy of ``c`` (the float32 reader ``c`` itself):
    the outputs equal, bit for bit, those of the same model with ``Cast(c, to=float16)`` in
    the copy's place (subnormal and rounding-tie values included), and onnxruntime on the
    original within float16's error."""
    values = np.array([0.1, -3.0e-6, 1.0 + 2.0 ** -11], np.float32)  # a float16 subnormal; a tie
    proto = _shared_weight_model(values)
    result = convert(proto, block=["Mul"])
    low, mul = node(result.model, "Min"), node(result.model, "Mul")
    assert not any(n.op_type == "Cast" and n.inputs[0].name == "c" for n in result.model.graph)
    copy = low.inputs[1]
    assert copy.dtype == F16 and copy.is_initializer() and mul.inputs[1].name == "c"
    np.testing.assert_array_equal(copy.const_value.numpy(), values.astype(np.float16))
    out = optcc.ir.serialize(result.model)
    with_cast = onnx.ModelProto()
    with_cast.CopyFrom(out)
    with_cast.graph.initializer.remove(next(t for t in with_cast.graph.initializer if t.name == copy.name))
    with_cast.graph.node.insert(0, onnx.helper.make_node("Cast", ["c"], [copy.name], to=TensorProto.FLOAT16))
    feeds = random_feeds(proto, seed=3)
    got, cast_form = onnxruntime_outputs(out, feeds), onnxruntime_outputs(with_cast, feeds)
    assert got[0].tobytes() == cast_form[0].tobytes()
    want = onnxruntime_outputs(proto, feeds)[0]
    np.testing.assert_allclose(got[0].astype(np.float64), want, rtol=2e-3, atol=1e-3)


def test_a_shared_weight_beyond_float16_range_or_large_keeps_its_cast():
    """A copy would clamp 1e6 where the Cast overflows it to infinity; a large weight is
    cast, not stored twice."""
    for values in (np.array([1.0, 1e6, 2.0]), np.linspace(-1.0, 1.0, 3000)):
        shape = (2, values.size) if values.size > 3 else (2, 3)
        proto = _shared_weight_model(values)
        proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value = shape[1]
        proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = shape[1]
        result = convert(proto, block=["Mul"])
        assert node(result.model, "Min").outputs[0].dtype == F16
        assert sum(n.op_type == "Cast" and n.inputs[0].name == "c" for n in result.model.graph) == 1


def test_weights_beyond_float16_range_are_clamped_and_reported():
    proto = parse("""<ir_version: 8, opset_import: ["": 17]>
    g (float[2, 3] x) => (float[2, 3] y) {
      m = Max(x, cap)
      y = Relu(m)
    }""")
    proto.graph.initializer.append(
        onnx.numpy_helper.from_array(np.array([-1e6, 1.0, -1e9], np.float32), "cap"))
    result = convert(proto)
    assert len(result.stats["clamped"]) == 1 and "'cap'" in result.stats["clamped"][0]
    cap = result.model.graph.initializers["cap"].const_value.numpy()
    assert cap.dtype == np.float16 and np.isfinite(cap).all()
    check_numerics(proto, result)


def test_tinycnn_through_optimize_meets_40db():
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "fixtures" / "tinycnn.onnx"
    result = optcc.optimize(str(path), passes=[ConvertFloat16Pass()], verify=True)
    proto = onnx.load(str(path))
    check_numerics(proto, result, input_shapes={"image": [2, 3, 32, 32]})
    assert result.report.model_after.weight_bytes <= 0.52 * result.report.model_before.weight_bytes


def test_fp16_support_probes_onnxruntime_and_caches_the_verdict():
    from optcc.fp16 import support as fp16_support

    x = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
    relu = onnx.helper.make_node("Relu", ["a"], ["b"])
    norm = onnx.helper.make_node("LayerNormalization", ["a", "s", "c"], ["b"])
    ones, zeros = np.ones(8, np.float32), np.zeros(8, np.float32)
    assert fp16_support.support(relu, [x], [True], 17)[0] == "fallback"  # ORT casts around it
    assert fp16_support.support(norm, [x, ones, zeros], [True] * 3, 17)[0] == "native"
    path = fp16_support.cache_path("CPUExecutionProvider", 17)
    assert ort.__version__ in path.name
    import json

    cached = json.loads(path.read_text())
    assert cached["ai.onnx::Relu"]["status"] == "fallback"


@pytest.mark.parametrize("style", ["sdpa", "eager"])
def test_attention_mask_fills_are_clamped_so_the_mask_path_converts(style):
    """-inf / finfo(float32).min mask fills would keep the mask Where/Mul, the Add and the
    Softmax float32 in every layer; clamped, the whole layer runs float16, and the result
    still matches float64 attention within float16's tolerance."""
    from fixtures.transformers import bert_feeds, bert_layer, bert_reference

    proto, weights = bert_layer(style, opset=17)
    feeds = [bert_feeds(), bert_feeds(seed=2)]
    result = ConvertFloat16Pass(inputs=feeds)(optcc.ir.load(proto))
    assert result.stats["mask_fills_clamped"]["constants"] == ["neg_inf" if style == "sdpa" else "f32_min"]
    assert result.stats["kept_float32"] == {}
    assert "float16 on CPU is for size" in result.stats["note"]
    casts = [n for n in optcc.ir.nodes(result.model) if n.op_type == "Cast"]
    assert len(casts) <= 4  # the boundaries (hidden states in/out) and the mask's own Cast(s)
    session = ort.InferenceSession(optcc.ir.serialize(result.model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, feeds[0])[0].astype(np.float64)
    ref = bert_reference(weights, feeds[0]["hidden_states"], feeds[0]["attention_mask"])
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()


def test_mask_fill_clamp_leaves_other_large_constants_alone():
    from optcc.fp16 import clamp_mask_fills

    proto = parse("""<ir_version: 10, opset_import: ["" : 17]>
        g (float[2, 3] x, bool[2, 3] keep) => (float[2, 3] y, float[2, 3] z) {
            low = Constant <value = float {-3.0e38}> ()
            zero = Constant <value = float {0.0}> ()
            big = Constant <value = float {-1.0e30}> ()
            mask = Where(keep, zero, low)
            s = Add(x, mask)
            y = Softmax <axis = -1> (s)
            z = Mul(x, big)
        }""")
    model = optcc.ir.load(proto)
    assert clamp_mask_fills(model) == ["low"]
    values = {n.outputs[0].name: optcc.ir.as_numpy(n.outputs[0]) for n in model.graph if n.op_type == "Constant"}
    assert float(values["low"]) == -16384.0 and values["big"] == np.float32(-1.0e30)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    keep = np.array([[True, False, True], [False, True, True]])
    session = ort.InferenceSession(optcc.ir.serialize(model).SerializeToString(), providers=["CPUExecutionProvider"])
    y, _ = session.run(None, {"x": x, "keep": keep})
    e = np.where(keep, np.exp(x.astype(np.float64)), 0.0)
    np.testing.assert_allclose(y, e / e.sum(-1, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize("to, reader", [(1, "Add"), (7, None)])
def test_original_cast_reads_a_float16_value_as_it_is(to, reader):
    """An exporter's Cast(to=float) after a converted node (GPT-2's position embeddings) gets
    no Cast pair around it: converted readers read the float16 value itself, and a Cast to
    another type reads it as it is (f16 -> f32 is exact)."""
    out_type = "float" if to == 1 else "int64"
    body = "s = Add(c, x)\n  y = Relu(s)" if reader else "y = Identity(c)"
    proto = parse(f"""<ir_version: 8, opset_import: ["": 17]>
    g (float[2, 8] x) => ({out_type}[2, 8] y) {{
      e = Mul(x, x)
      c = Cast <to = {to}> (e)
      {body}
    }}""")
    result = convert(proto)
    casts = [n for n in result.model.graph if n.op_type == "Cast"]
    if reader:  # the input's Cast to float16 and the output's back: the original Cast is gone
        assert len(casts) == 2 and result.stats["casts_removed"] == 1, [n.name for n in casts]
        check_numerics(proto, result)
    else:  # Cast(e16, to=int64): no float32 Cast in front of it
        assert len(casts) == 2 and casts[-1].inputs[0].producer().op_type == "Mul"
        feeds = random_feeds(proto, seed=0)
        feeds["x"] *= 10
        got = onnxruntime_outputs(result.model, feeds)[0]
        x16 = feeds["x"].astype(np.float16)
        np.testing.assert_array_equal(got, np.trunc((x16 * x16).astype(np.float64)).astype(np.int64))


def _tiny_output() -> onnx.ModelProto:
    """An output 2^-20 of its input: near zero on generated inputs (float16 holds
    such values as subnormals, a few bits of them, so its SQNR there is rounding alone),
    about 0.01 on inputs of about 1e4."""
    return parse("""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[1, 64] x) => (float[1, 64] y) {
            s = Constant <value = float {9.5367431640625e-07}> ()
            y = Mul(x, s)
        }""")


def test_declined_on_an_output_near_zero_says_the_generated_samples_cannot_judge_it() -> None:
    with pytest.raises(optcc.PrecisionNotAppliedError) as caught:
        optcc.optimize(_tiny_output(), fp16=True)
    reason = caught.value.result.precision["fp16"]  # type: ignore[attr-defined]
    assert "went back to float32" in reason and "'y' stays below" in reason and "--inputs" in reason
    rng = np.random.default_rng(0)
    feeds = [{"x": (1e4 * rng.standard_normal((1, 64))).astype(np.float32)} for _ in range(3)]
    result = optcc.optimize(_tiny_output(), fp16=True, inputs=feeds)
    assert result.applied_precision == ["fp16"]
    want = feeds[0]["x"].astype(np.float64) * 2.0 ** -20
    got = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": feeds[0]["x"]})[0]
    assert np.max(np.abs(got - want)) <= 1e-3 * np.max(np.abs(want))


@pytest.mark.parametrize("given", ["inputs", "checked_samples"])
def test_the_original_runs_once_per_sample(monkeypatch, given):
    """Each sample runs the model as given once: on the samples whose ranges it observes, the
    pass takes its outputs from that run (the probe's graph outputs); a sample past those
    (the third of the verifier's samples, whose first two the ranges observe) runs alone.
    The result meets 40 dB against the float32 original on every sample."""
    from optcc import fp16

    proto = mlp()
    feeds = [random_feeds(proto, {"N": 4}, seed=s) for s in range(3)]
    ops = dict(collections.Counter(n.op_type for n in proto.graph.node))
    runs = collections.Counter()  # (outputs, op histogram) of the session's model -> runs
    made = fp16.ranges.session

    def session(model, *args, **kwargs):
        built = made(model, *args, **kwargs)
        key = (len(model.graph.outputs), tuple(sorted(hist(model, model.graph).items())))
        original_run = built.run

        def run(*a, **k):
            runs[key] += 1
            return original_run(*a, **k)

        built.run = run
        return built

    monkeypatch.setattr(fp16.ranges, "session", session)
    options = {"inputs": feeds} if given == "inputs" else {"checked_samples": lambda: feeds}
    result = convert(proto, **options)
    plain = runs[(2, tuple(sorted(ops.items())))]
    observed = runs[(len(proto.graph.node), tuple(sorted(ops.items())))]  # the probe of every node output
    assert (plain, observed) == ((0, 3) if given == "inputs" else (1, 2))
    check_numerics(proto, result, inputs=feeds)
