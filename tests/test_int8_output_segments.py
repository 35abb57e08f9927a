"""``output_sqnr`` runs each layer's error from the last of several cuts before it
(``optcc.quant.suffix``): a network long enough to be cut, with a skip connection across
the cuts and a graph output computed before the later ones, gives every layer the output
SQNR its error alone gives the float model, as onnxruntime measures the model with that
layer alone quantized."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

import optcc
from reference import onnxruntime_outputs
from optcc.infra.registry import create_pass
from optcc.quant import fallback
from optcc.quant.calibration import calibrate
from optcc.quant.suffix import suffix

DEPTH = 12  # MatMul layers: more than ``fallback.OUTPUT_SEGMENTS``, so runs start at several cuts


def _model() -> onnx.ModelProto:
    """``h_i = Relu(h_{i-1} W_i)``, the first layer's result added to the last (a skip over
    every cut), output ``y``; ``early``, minus the third layer's result, is an output too."""
    rng = np.random.default_rng(5)
    nodes, inits = [], []
    previous = "x"
    for i in range(DEPTH):
        w = (rng.normal(size=(16, 16)) / 4).astype(np.float32)
        inits.append(nh.from_array(w, f"W{i}"))
        nodes.append(oh.make_node("MatMul", [previous, f"W{i}"], [f"m{i}"], name=f"mm{i}"))
        nodes.append(oh.make_node("Relu", [f"m{i}"], [f"h{i}"], name=f"relu{i}"))
        previous = f"h{i}"
    nodes.append(oh.make_node("Add", [previous, "h0"], ["y"], name="skip"))
    nodes.append(oh.make_node("Neg", ["m2"], ["early"], name="early"))
    graph = oh.make_graph(nodes, "chain", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 16])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 16]),
                           oh.make_tensor_value_info("early", TP.FLOAT, ["N", 16])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _sqnr(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    r = np.concatenate([a.ravel() for a in ref]).astype(np.float64)
    g = np.concatenate([a.ravel() for a in got]).astype(np.float64)
    noise = float(np.sum((r - g) ** 2))
    return np.inf if noise == 0 else 10 * np.log10(float(np.sum(r * r)) / noise)


def _assert_seen_as_quantized_alone(proto: onnx.ModelProto, samples: list[dict[str, np.ndarray]],
                                    layers: list[str] | None) -> None:
    """``output_sqnr`` on the first 2 samples gives each of ``layers`` (default: every
    quantized layer) the worst output SQNR of the model with that layer alone quantized,
    run by onnxruntime, within 0.01 dB."""
    float_model = optcc.ir.load(proto)
    ranges = calibrate(float_model, samples, "minmax").ranges
    result = create_pass("quantize-int8", ranges=ranges, count_fused=False)(float_model.clone())
    layer_outputs = result.stats["layer_outputs"]
    measured = fallback.output_sqnr(float_model, result.model, layer_outputs, samples[:2])
    reference = [onnxruntime_outputs(proto, feeds) for feeds in samples[:2]]
    for layer in layer_outputs if layers is None else layers:
        alone = create_pass("quantize-int8", ranges=ranges, only=[layer], count_fused=False)(float_model.clone())
        got = [onnxruntime_outputs(optcc.ir.serialize(alone.model), feeds) for feeds in samples[:2]]
        expected = min(_sqnr([r[j] for r in reference], [g[j] for g in got]) for j in range(len(reference[0])))
        assert abs(measured[layer] - expected) < 0.01, (layer, measured[layer], expected)


def test_each_layer_seen_at_the_outputs_as_when_quantized_alone(monkeypatch) -> None:
    cuts = []
    monkeypatch.setattr(fallback, "suffix", lambda proto, start, types: cuts.append(start) or
                        suffix(proto, start, types))
    rng = np.random.default_rng(8)
    samples = [{"x": rng.normal(size=(8, 16)).astype(np.float32)} for _ in range(4)]
    proto = _model()
    _assert_seen_as_quantized_alone(proto, samples, None)
    assert len(cuts) >= 4  # the later layers' runs started at cuts


def test_a_fed_input_with_a_default_is_read_from_the_samples() -> None:
    """A graph input that is also an initializer (a default a sample may replace), read
    before the cuts and after them: every layer's run reads the sample's value, as
    onnxruntime does for the model with that layer alone quantized."""
    proto = _model()
    graph = proto.graph
    graph.initializer.append(nh.from_array(np.full((16,), 0.5, np.float32), "scale"))
    graph.input.append(oh.make_tensor_value_info("scale", TP.FLOAT, [16]))
    first = next(i for i, node in enumerate(graph.node) if node.name == "relu0")
    graph.node.insert(first, oh.make_node("Mul", ["m0", "scale"], ["m0s"], name="scaled"))
    graph.node[first + 1].input[0] = "m0s"
    skip = next(node for node in graph.node if node.name == "skip")
    skip.op_type, skip.input[1] = "Mul", "scale"  # y = h_last * scale
    onnx.checker.check_model(proto)
    rng = np.random.default_rng(9)
    samples = [{"x": rng.normal(size=(8, 16)).astype(np.float32),
                "scale": rng.uniform(2, 4, size=16).astype(np.float32)} for _ in range(4)]
    _assert_seen_as_quantized_alone(proto, samples, ["mm1", "mm10"])  # one before the cuts, one after them
