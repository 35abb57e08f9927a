"""-O1 and -O2 on the test models of the peers' own suites (fixtures/peer_suites.py):
onnx/optimizer's, onnxscript's optimizer and rewriter tests, onnxslim's tests.

For every model onnxruntime can run: optimize it (no optcc verification: the judge here
is independent), then run both on the same random inputs. The reference is onnx's
reference evaluator on a float64 copy of the original (float32 types and weights widened;
used only when it agrees with the float32 original to 1e-3 of the output's scale, else the
float32 reference evaluator, else onnxruntime on the original). -O1 must reproduce
onnxruntime's outputs of the original bit for bit; -O2 must be within 1e-4 relative of the
reference at each element, or no further from it than 4x the float32 original's own error
there (or, over a whole output, than 4x the original's largest error): ``peer_suites.within``.
(-O1 is compared with onnxruntime's weight prepacking off on both sides: a weight folding
made constant is prepacked, and the packed kernels sum in another order.) A crash of optcc
is a failure. Skips cleanly when no suite is cached.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import optcc
from fixtures import peer_suites

MODELS = {entry.name: entry for entry in peer_suites.suite_models()}
# -O1 and -O2 on every model, except -O1 on the recorded suites' models over 256 KB (whole
# encoders: slow on two cores, and their folds are the small models' folds).
CASES = [(name, level) for name in sorted(MODELS) for level in (1, 2)
         if level == 2 or MODELS[name].suite == peer_suites.REPOSITORY
         or MODELS[name].model.ByteSize() <= 256 << 10]

pytestmark = pytest.mark.corpus


def _session(model: onnx.ModelProto, prepack: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _feeds(session: ort.InferenceSession, shapes: dict[str, list[int]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in session.get_inputs():
        shape = shapes.get(arg.name) or [d if isinstance(d, int) and d > 0 else 2 for d in arg.shape]
        kind = arg.type[len("tensor("):-1]
        if kind in ("float", "double", "float16"):
            dtype = {"float": np.float32, "double": np.float64, "float16": np.float16}[kind]
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        elif kind == "bool":
            feeds[arg.name] = rng.random(shape) < 0.5
        elif kind.startswith(("int", "uint")):
            feeds[arg.name] = rng.integers(0, 3, shape).astype(np.dtype(kind))
        else:
            raise TypeError(kind)
    return feeds


def _bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and (
        a.tobytes() == b.tobytes() or (a.dtype.kind == "f" and np.array_equal(a, b, equal_nan=True)))


@pytest.mark.skipif(not MODELS, reason=f"no peer suite is cached (onnx/optimizer's at {peer_suites.cache_file()};"
                    " python -m fixtures.peer_suites --import-from GIT_MIRROR)")
@pytest.mark.parametrize(("name", "level"), CASES or [("none", 2)])
def test_suite_model(name: str, level: int) -> None:
    entry = MODELS[name]
    try:
        onnx.checker.check_model(entry.model)
        session = _session(entry.model)
        feeds = _feeds(session, entry.input_shapes, seed=0)
        original = session.run(None, feeds)
    except Exception as e:  # noqa: BLE001 - not a runnable model: nothing to compare
        pytest.skip(f"onnxruntime cannot run the suite model: {str(e).splitlines()[0][:120]}")
    result = optcc.optimize(entry.model, level=level, verify=False)
    optimized = result.model
    onnx.checker.check_model(optimized)
    got = _session(optimized).run(None, feeds)
    assert len(got) == len(original)
    if level == 1:
        # Weights that folding turns into initializers are prepacked by onnxruntime, whose
        # packed MatMul/Conv kernels sum in another order: the same kernels on the same
        # values are compared with prepacking off on both sides.
        unpacked = _session(entry.model, prepack=False).run(None, feeds)
        got = _session(optimized, prepack=False).run(None, feeds)
        for a, b in zip(unpacked, got):
            assert _bit_equal(a, b), f"-O1 changed an output of {name}"
        return
    if all(peer_suites.within(o, o, g) for o, g in zip(original, got)):
        return  # within 1e-4 of onnxruntime's own result: no more precise reference needed
    reference = peer_suites.reference_outputs(entry.model, feeds, original)
    for r, o, g in zip(reference, original, got):
        assert peer_suites.within(r, o, g), f"-O2 output of {name} off the reference"


# Suite models whose result optcc -O2 matches the best peer's node count through one rewrite
# (named regression tests; the numerics of every model are checked above).
NODE_COUNTS = {
    "test_eliminate_shape_op": 0,  # store-constant-outputs: Shape of a static value
    "test_fuse_concat_into_reshape_multiple_consumers": 1,  # store-constant-outputs
}


@pytest.mark.skipif(not MODELS, reason="onnx/optimizer's suite is not cached")
@pytest.mark.parametrize("name", sorted(NODE_COUNTS))
def test_suite_model_node_count(name: str) -> None:
    optimized = optcc.optimize(MODELS[name].model, level=2, verify=False).model
    assert len(optimized.graph.node) == NODE_COUNTS[name]
