"""fuse-batchnorm asks each reader of a shared Conv weight for its BatchNormalization
factor once per convolution, and keeps the answer on the BatchNormalization node with the
parameter arrays and attributes it came from. When a parameter changes between two runs
(another pass replaced it), the kept answer must not be used: the refused fold becomes
possible and happens, and the result matches onnx's reference evaluator."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from optcc.passes.fuse_batchnorm import FuseBatchNormPass


def _model(var2: np.ndarray) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    nodes = []
    for i in (1, 2):
        scale, beta, mean = (rng.standard_normal(3).astype(np.float32) for _ in range(3))
        var = np.abs(rng.standard_normal(3)).astype(np.float32) + 0.5 if i == 1 else var2
        inits += [numpy_helper.from_array(a, f"{k}{i}") for k, a in
                  (("scale", scale), ("beta", beta), ("mean", mean), ("var", var))]
        nodes.append(helper.make_node("Conv", ["x", "w"], [f"c{i}"]))
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", f"scale{i}", f"beta{i}", f"mean{i}", f"var{i}"],
                                      [f"y{i}"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 3, 4, 4]) for i in (1, 2)]
    graph = helper.make_graph(nodes, "g", [x], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def test_a_replaced_parameter_is_read_again():
    model = ir.from_proto(_model(np.array([0.75], np.float32)))  # not one per channel: refused
    FuseBatchNormPass()(model)
    assert _ops(model).count("BatchNormalization") == 2  # the shared weight keeps both
    [bn2] = [n for n in model.graph if n.op_type == "BatchNormalization" and n.outputs[0].name == "y2"]
    var = ir.Value(name="var2_fixed", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([3]),
                   const_value=ir.tensor(np.full(3, 0.75, np.float32), name="var2_fixed"))
    model.graph.register_initializer(var)
    bn2.replace_input_with(4, var)
    expected_model = ir.to_proto(model)
    FuseBatchNormPass()(model)
    assert "BatchNormalization" not in _ops(model)
    x = np.random.default_rng(1).standard_normal((1, 2, 4, 4)).astype(np.float32)
    want = onnx.reference.ReferenceEvaluator(expected_model).run(None, {"x": x})
    got = onnx.reference.ReferenceEvaluator(ir.to_proto(model)).run(None, {"x": x})
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
