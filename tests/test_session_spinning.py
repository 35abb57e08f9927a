"""optcc's sessions let their intra-op threads sleep between kernels instead of spinning
(a spinning thread holds a core the caller's own work between runs could use); the
sessions that time a model keep onnxruntime's default, as its users run it. How a thread
waits changes no result: a two-thread convolution computes the same bits either way, and
numpy's float64 convolution is the reference they are both close to."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from optcc.runtime.session import session_options

SPINNING = "session.intra_op.allow_spinning"


def _spinning(options: ort.SessionOptions) -> str | None:
    try:
        return options.get_session_config_entry(SPINNING)
    except RuntimeError:  # not set: onnxruntime's default, spinning
        return None


def _conv() -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 30, 30])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(), w


def test_sessions_sleep_between_kernels_unless_asked_to_spin() -> None:
    assert _spinning(session_options()) == "0"
    assert _spinning(session_options(optimize="all", threads=2, prepack=False)) == "0"
    assert _spinning(session_options(spin=True)) is None


def test_how_threads_wait_changes_no_result() -> None:
    model, w = _conv()
    x = np.random.default_rng(1).standard_normal((1, 4, 32, 32)).astype(np.float32)
    got = [ort.InferenceSession(model, session_options(threads=2, spin=spin), providers=["CPUExecutionProvider"])
           .run(None, {"x": x})[0] for spin in (True, False)]
    windows = np.lib.stride_tricks.sliding_window_view(x[0].astype(np.float64), (3, 3), axis=(1, 2))
    expected = np.einsum("cijkl,ockl->oij", windows, w.astype(np.float64))[None]
    np.testing.assert_array_equal(got[0], got[1])
    np.testing.assert_allclose(got[1], expected, rtol=1e-4, atol=1e-4)
