"""FuseOrtSkipRmsNormPass (opt-in): residual Add + decomposed RMSNorm below opset 23 ->
com.microsoft SkipSimplifiedLayerNormalization (its sum output feeding the next residual);
the fused model on onnxruntime against a float64 NumPy reference, and what it refuses."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.infra.levels import level_of
from optcc.passes.fuse_ort_rmsnorm import FuseOrtSkipRmsNormPass

H = 8


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"gamma": (1 + 0.1 * rng.standard_normal(H)).astype(np.float32),
            "w": (rng.standard_normal((H, H)) / np.sqrt(H)).astype(np.float32)}


def block(square: str = "pow", normalize: str = "reciprocal", residual: bool = True, reuse_sum: bool = True,
          axis: int = -1, gamma_input: bool = False, skip_dims: tuple = ("b", "s", H),
          opset: int = 18, casts: int | None = None) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """y = RMSNorm(x + r) @ w (+ (x + r) when ``reuse_sum``), the pre-norm decoder block;
    ``casts``: HF's LlamaRMSNorm Casts to that type around the norm, as TorchScript traces
    them (the residual reads the first Cast's output)."""
    w = _weights()
    inits = [numpy_helper.from_array(w["w"], "w"), numpy_helper.from_array(np.float32(1e-6), "eps"),
             numpy_helper.from_array(np.float32(1.0), "one"),
             numpy_helper.from_array(np.float32(2.0), "two"), numpy_helper.from_array(np.array([axis], np.int64), "axes")]
    if not gamma_input:
        inits.append(numpy_helper.from_array(w["gamma"], "gamma"))
    nodes = [helper.make_node("Add", ["x", "r"], ["sum"] if casts else ["h"])] if residual else [
        helper.make_node("Identity", ["x"], ["h"])]
    if casts:
        nodes.append(helper.make_node("Cast", ["sum"], ["h"], to=casts))
    nodes.append(helper.make_node("Pow", ["h", "two"], ["sq"]) if square == "pow" else
                 helper.make_node("Mul", ["h", "h"], ["sq"]))
    nodes += [helper.make_node("ReduceMean", ["sq", "axes"], ["ms"]),
              helper.make_node("Add", ["ms", "eps"], ["ms_eps"]),
              helper.make_node("Sqrt", ["ms_eps"], ["rms"])]
    if normalize == "reciprocal":
        nodes += [helper.make_node("Reciprocal", ["rms"], ["inv"]), helper.make_node("Mul", ["h", "inv"], ["n"])]
    elif normalize == "div-one":
        nodes += [helper.make_node("Div", ["one", "rms"], ["inv"]), helper.make_node("Mul", ["h", "inv"], ["n"])]
    else:
        nodes.append(helper.make_node("Div", ["h", "rms"], ["n"]))
    if casts:
        nodes.append(helper.make_node("Cast", ["n"], ["n_cast"], to=casts))
    nodes += [helper.make_node("Mul", ["n_cast" if casts else "n", "gamma"], ["normed"]),
              helper.make_node("MatMul", ["normed", "w"], ["proj" if reuse_sum else "y"])]
    if reuse_sum:
        nodes.append(helper.make_node("Add", ["proj", "h"], ["y"]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", H])]
    if residual:
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, list(skip_dims)))
    if gamma_input:
        inputs.append(helper.make_tensor_value_info("gamma", TensorProto.FLOAT, [H]))
    graph = helper.make_graph(nodes, "rms_block", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model)
    return model, w


def _feeds(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((2, 5, H)).astype(np.float32), "r": rng.standard_normal((2, 5, H)).astype(np.float32)}


def _reference(w: dict[str, np.ndarray], feeds: dict, reuse_sum: bool = True) -> np.ndarray:
    h = feeds["x"].astype(np.float64) + feeds["r"]
    y = h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-6) * w["gamma"] @ w["w"].astype(np.float64)
    return y + h if reuse_sum else y


def _run(model: ir.Model, feeds: dict) -> np.ndarray:
    proto = ir.to_proto(model)
    names = {i.name for i in proto.graph.input}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    assert np.abs(got.astype(np.float64) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("square", ["pow", "mul"])
@pytest.mark.parametrize("normalize", ["reciprocal", "div", "div-one"])
@pytest.mark.parametrize("reuse_sum", [True, False])
def test_residual_rmsnorm_fuses(square: str, normalize: str, reuse_sum: bool) -> None:
    proto, w = block(square, normalize, reuse_sum=reuse_sum)
    result = FuseOrtSkipRmsNormPass()(ir.from_proto(proto))
    assert result.stats["applied"] == {"skip-rmsnorm": 1}
    hist = optcc.ir.op_histogram(result.model)
    assert hist.get("com.microsoft::SkipSimplifiedLayerNormalization") == 1
    assert not {"ReduceMean", "Sqrt", "Pow", "Reciprocal", "Div"} & set(hist)
    assert hist.get("Add", 0) == (1 if reuse_sum else 0)  # the residual after the MatMul; the sum is fused
    onnx.checker.check_model(ir.to_proto(result.model))
    assert not FuseOrtSkipRmsNormPass()(result.model).modified
    feeds = _feeds()
    _close(_run(result.model, feeds), _reference(w, feeds, reuse_sum))
    _close(_run(ir.from_proto(proto), feeds), _reference(w, feeds, reuse_sum))  # the reference is the graph's


def test_hf_llama_casts_fuse() -> None:
    """The TorchScript trace of LlamaRMSNorm: Cast(h, float) read by the norm and by the next
    residual, 1 / sqrt as a Div, Cast back before gamma."""
    proto, w = block(normalize="div-one", casts=TensorProto.FLOAT)
    result = FuseOrtSkipRmsNormPass()(ir.from_proto(proto))
    assert result.stats["applied"] == {"skip-rmsnorm": 1}
    hist = optcc.ir.op_histogram(result.model)
    assert hist.get("com.microsoft::SkipSimplifiedLayerNormalization") == 1
    assert "Cast" not in hist and hist.get("Add") == 1
    feeds = _feeds()
    _close(_run(result.model, feeds), _reference(w, feeds))


@pytest.mark.parametrize("case, reason", [
    ({"casts": TensorProto.DOUBLE}, "a Cast that is not float32 to float32"),
    ({"residual": False}, "input is not a residual Add (no onnxruntime op for a standalone RMSNorm below opset 23)"),
    ({"axis": 1}, "not a mean over the last axis"),
    ({"skip_dims": (1, "s", H)}, "Add operands not both rank 3 with the same declared dims"),
    ({"opset": 23}, "opset >= 23: fuse-normalization writes the standard RMSNormalization"),
])
def test_refused(case: dict, reason: str) -> None:
    proto, _ = block(**case)
    result = FuseOrtSkipRmsNormPass()(ir.from_proto(proto))
    assert not result.modified
    assert reason in result.stats["rejected"]["skip-rmsnorm"], result.stats


def test_gamma_not_constant_is_not_matched() -> None:
    proto, w = block(gamma_input=True)
    result = FuseOrtSkipRmsNormPass()(ir.from_proto(proto))
    assert not result.modified
    feeds = {**_feeds(), "gamma": w["gamma"]}
    _close(_run(result.model, feeds), _reference(w, feeds))


def test_opt_in_and_opset_23_gets_the_standard_op() -> None:
    assert level_of("fuse-ort-skip-rmsnorm") is None
    proto, w = block(opset=23)
    feeds = _feeds()
    o3 = optcc.optimize(proto, level=3, inputs=feeds)
    hist = optcc.ir.op_histogram(optcc.ir.load(o3.model))
    assert hist.get("RMSNormalization") == 1  # fuse-normalization at -O2 and above
    _close(_run(optcc.ir.load(o3.model), feeds), _reference(w, feeds))
    named = optcc.optimize(block()[0], level=3, passes=None, inputs=feeds)
    assert "SkipSimplifiedLayerNormalization" not in str(optcc.ir.op_histogram(optcc.ir.load(named.model)))
