"""The collector pause used while models are parsed and cloned leaves gc as it found it."""

import gc

import numpy as np
import onnx
from onnx import TensorProto, helper

import optcc.ir as oir


def test_collector_paused_disables_inside_and_restores_enabled_state():
    assert gc.isenabled()
    with oir.collector_paused():
        assert not gc.isenabled()
        with oir.collector_paused():  # nested: the inner exit must not re-enable
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_collector_paused_keeps_a_disabled_collector_disabled_even_on_error():
    gc.disable()
    try:
        try:
            with oir.collector_paused():
                raise ValueError("boom")
        except ValueError:
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_clone_is_an_independent_copy_sharing_tensors():
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [onnx.numpy_helper.from_array(weight, "w")])
    model = oir.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    copy = oir.clone(model)
    copy.graph.remove(next(iter(copy.graph)), safe=False)
    assert len(model.graph) == 1 and len(copy.graph) == 0
    np.testing.assert_array_equal(copy.graph.initializers["w"].const_value.numpy(), weight)
    assert gc.isenabled()
