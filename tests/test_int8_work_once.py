"""The INT8 driver does the work outside its search once: the float model's modelled workload
is read from its graph once however many speed checks compare a candidate with it (and a
candidate's once for both CPU classes), and the fully quantized model it keeps for asking
again is the model itself, not a copy taken in advance. Judged independently: the shipped
model's held-out SQNR, both models run on onnxruntime (``reference.lossy_metrics``)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx_ir as ir
from onnx import TensorProto as TP

from optcc.quant import cost_model, driver
from optcc.quant.cost_model import DEFAULT_CPU_CLASS, CpuClass
from optcc.quant.driver import quantize_int8
from optcc.quant.fallback import Target
from calls import first_arguments
from reference import lossy_metrics


def conv_stack() -> onnx.ModelProto:
    """Three 3x3 convolutions with ReLUs, 8 channels on 16x16."""
    rng = np.random.default_rng(5)
    nodes, inits, x = [], [], "x"
    for i in range(3):
        inits += [nh.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), f"W{i}"),
                  nh.from_array(rng.normal(0, 0.1, 8).astype(np.float32), f"B{i}")]
        nodes += [oh.make_node("Conv", [x, f"W{i}", f"B{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
                  oh.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    graph = oh.make_graph(nodes, "stack", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 8, 16, 16])],
                          [oh.make_tensor_value_info(x, TP.FLOAT, [1, 8, 16, 16])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def samples() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(9)
    return [{"x": rng.uniform(-1, 1, (1, 8, 16, 16)).astype(np.float32)} for _ in range(10)]


def test_float_workload_read_once_and_the_fully_quantized_model_not_copied_ahead(monkeypatch) -> None:
    model, data = conv_stack(), samples()
    read = first_arguments(monkeypatch, cost_model, "features")
    clones = first_arguments(monkeypatch, ir.Model, "clone")
    built = first_arguments(monkeypatch, driver, "create_pass")
    # two CPU classes modelled for every check: the default's, and this machine's (said next to it)
    monkeypatch.setattr(driver, "cpu_class", lambda choice: CpuClass(DEFAULT_CPU_CLASS, "default", "x86-avx2"))
    shipped, stats = quantize_int8(model, data, min_speedup=0.1, target=Target(min_sqnr_db=20.0), metric=None)
    monkeypatch.undo()
    assert stats["modified"], stats.get("reason")
    checks = [key for key in ("fully_quantized", "after_fallback") if key in stats["latency"]]
    assert "modelled_speedup_machine" in stats["latency"]["fully_quantized"]
    float_reads = [m for m in read if not any(n.op_type == "QuantizeLinear" for n in m.graph)]
    assert len(float_reads) == 1  # the float model, read once for every check and both classes
    # a candidate read once per check (the fully quantized model, before and after its bias
    # correction: two checks), for both classes
    assert len(read) - len(float_reads) == len(checks) + 1
    assert len(clones) == 1 + built.count("quantize-int8") + 1

    held = data[-2:]
    (sqnr_db, _), = lossy_metrics(model, shipped, held)
    assert sqnr_db >= 20.0
