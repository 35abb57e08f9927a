"""An INT8 candidate a pass had the verifier run (``Verifier.outputs``) is not run again
by the check of that very model, and only of that model: outputs are kept by the
model's content digest. The expected SQNRs are numpy's, from the models' arithmetic."""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import optcc
from optcc.numerics import Verifier

verify = importlib.import_module("optcc.numerics.verify")  # the module (the package's ``verify`` is a function)

SHAPE = (1, 3, 8, 8)


def _scaled(factor: float) -> optcc.ir.Model:
    """``y = x * factor``."""
    proto = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,3,8,8] x) => (float[1,3,8,8] y) {{
            k = Constant <value = float {{{factor}}}> ()
            y = Mul(x, k)
        }}""")
    return optcc.ir.load(proto)


def _sqnr_db(factor: float, samples: list[dict[str, np.ndarray]]) -> float:
    """SQNR of ``x * factor`` against ``x * 2`` over every sample, in float64."""
    ref = np.concatenate([2.0 * s["x"].astype(np.float64).ravel() for s in samples])
    noise = np.sum((ref - factor * np.concatenate([s["x"].astype(np.float64).ravel() for s in samples])) ** 2)
    return float(10 * np.log10(np.sum(ref**2) / noise))


@pytest.fixture
def optimized_runs(monkeypatch) -> list[int]:
    """How many times onnxruntime ran a session with all its optimizations (an INT8
    candidate as the verifier runs it; the original runs as written)."""
    runs: list[int] = []
    run = ort.InferenceSession.run

    def counting(self, names, feeds, options=None):
        if self.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
            runs.append(1)
        return run(self, names, feeds, options)

    monkeypatch.setattr(ort.InferenceSession, "run", counting)
    return runs


def test_the_check_of_the_model_a_pass_had_run_runs_it_no_more(optimized_runs: list[int]) -> None:
    rng = np.random.default_rng(0)
    samples = [{"x": rng.uniform(0.1, 1.0, SHAPE).astype(np.float32)} for _ in range(4)]
    candidate = _scaled(1.9)
    with Verifier(_scaled(2.0), inputs=samples, providers=["cpu"]) as verifier:
        held = verifier.outputs(candidate, [2, 3])
        every = verifier.outputs(candidate, range(4))  # the held-out ones are not run again
        assert len(optimized_runs) == 4
        np.testing.assert_allclose(every["y"][3], held["y"][1])
        np.testing.assert_allclose(every["y"][0], samples[0]["x"] * np.float32(1.9), rtol=1e-6)
        check = verifier.check(_scaled(1.9), "int8")  # another copy of the same model: the same digest
        assert len(optimized_runs) == 4
        again = verifier.check(candidate, "int8")  # what was kept served one check
        assert len(optimized_runs) == 8
    for result in (check, again):
        (metrics,) = result.outputs
        assert metrics.sqnr_db == pytest.approx(_sqnr_db(1.9, samples), abs=0.01)


def test_a_check_of_another_model_runs_that_model(optimized_runs: list[int]) -> None:
    rng = np.random.default_rng(1)
    samples = [{"x": rng.uniform(0.1, 1.0, SHAPE).astype(np.float32)} for _ in range(3)]
    with Verifier(_scaled(2.0), inputs=samples, providers=["cpu"]) as verifier:
        verifier.outputs(_scaled(1.9), range(3))
        check = verifier.check(_scaled(2.5), "int8")
    assert len(optimized_runs) == 6
    (metrics,) = check.outputs
    assert metrics.sqnr_db == pytest.approx(_sqnr_db(2.5, samples), abs=0.01)


def test_a_candidate_is_serialized_once_per_call(optimized_runs: list[int], monkeypatch) -> None:
    """Its bytes are both what onnxruntime loads and what identifies it: the outputs kept
    for it serve its check, and nothing serializes it a second time to digest it."""
    rng = np.random.default_rng(2)
    samples = [{"x": rng.uniform(0.1, 1.0, SHAPE).astype(np.float32)} for _ in range(3)]
    candidate = _scaled(1.9)
    serialized: list[int] = []
    serialize = optcc.ir.serialize

    def counting(model, *args, **kwargs):
        if model is candidate:
            serialized.append(1)
        return serialize(model, *args, **kwargs)

    with Verifier(_scaled(2.0), inputs=samples, providers=["cpu"]) as verifier:
        monkeypatch.setattr(optcc.ir, "serialize", counting)
        verifier.outputs(candidate, range(3))
        assert len(serialized) == 1
        check = verifier.check(candidate, "int8")
        assert len(serialized) == 2  # the check's own bytes, digested to find what was kept
    assert len(optimized_runs) == 3
    (metrics,) = check.outputs
    assert metrics.sqnr_db == pytest.approx(_sqnr_db(1.9, samples), abs=0.01)


def test_a_model_asked_about_again_after_another_runs_only_on_samples_it_has_not(
        optimized_runs: list[int]) -> None:
    """The fallback's confirmation asks again about the model its search found, which it
    may have measured before others: that model runs on the other samples alone, and its
    check on none."""
    rng = np.random.default_rng(3)
    samples = [{"x": rng.uniform(0.1, 1.0, SHAPE).astype(np.float32)} for _ in range(4)]
    with Verifier(_scaled(2.0), inputs=samples, providers=["cpu"]) as verifier:
        found = verifier.outputs(_scaled(1.9), [2, 3])
        verifier.outputs(_scaled(1.5), [2, 3])
        assert len(optimized_runs) == 4
        every = verifier.outputs(_scaled(1.9), range(4))
        assert len(optimized_runs) == 6  # samples 0 and 1 alone
        np.testing.assert_array_equal(every["y"][2], found["y"][0])
        np.testing.assert_allclose(every["y"][0], samples[0]["x"] * np.float32(1.9), rtol=1e-6)
        check = verifier.check(_scaled(1.9), "int8")
        assert len(optimized_runs) == 6
        verifier.outputs(_scaled(1.5), [2, 3])  # the check released what was kept
        assert len(optimized_runs) == 8
    (metrics,) = check.outputs
    assert metrics.sqnr_db == pytest.approx(_sqnr_db(1.9, samples), abs=0.01)


def test_the_outputs_kept_before_the_last_model_come_to_no_more_than_its_own(optimized_runs: list[int],
                                                                           monkeypatch) -> None:
    monkeypatch.setattr(verify, "KEPT_OUTPUT_BYTES", 0)  # no floor: the last model's bytes bound the rest
    rng = np.random.default_rng(4)
    samples = [{"x": rng.uniform(0.1, 1.0, SHAPE).astype(np.float32)} for _ in range(4)]
    with Verifier(_scaled(2.0), inputs=samples, providers=["cpu"]) as verifier:
        verifier.outputs(_scaled(1.9), [0, 1])
        verifier.outputs(_scaled(1.5), range(4))  # the 2 samples before fit beside its 4
        verifier.outputs(_scaled(1.9), [0, 1])
        assert len(optimized_runs) == 6
        verifier.outputs(_scaled(1.2), [0])  # 1 sample: neither the 4 nor the 2 before it fit
        verifier.outputs(_scaled(1.5), range(4))
        assert len(optimized_runs) == 6 + 1 + 4


def test_small_outputs_of_every_model_asked_about_are_kept(optimized_runs: list[int]) -> None:
    """Below ``KEPT_OUTPUT_BYTES`` the outputs of every model asked about are kept, not only
    those of the last: a search's first candidate, judged again after several others (the
    fastest of those that met the target), runs on no sample again."""
    rng = np.random.default_rng(5)
    samples = [{"x": rng.uniform(0.1, 1.0, SHAPE).astype(np.float32)} for _ in range(3)]
    factors = (1.9, 1.5, 1.2, 2.5)
    with Verifier(_scaled(2.0), inputs=samples, providers=["cpu"]) as verifier:
        first = {f: verifier.outputs(_scaled(f), range(3)) for f in factors}
        assert len(optimized_runs) == 3 * len(factors)
        again = verifier.outputs(_scaled(1.9), range(3))  # a copy of the first: the same digest
        assert len(optimized_runs) == 3 * len(factors)
        check = verifier.check(_scaled(1.9), "int8")
        assert len(optimized_runs) == 3 * len(factors)
    for i, sample in enumerate(samples):
        np.testing.assert_array_equal(again["y"][i], first[1.9]["y"][i])
        expected = sample["x"].astype(np.float64) * np.float64(np.float32(1.9))
        np.testing.assert_allclose(again["y"][i], expected, rtol=1e-6)
    (metrics,) = check.outputs
    assert metrics.sqnr_db == pytest.approx(_sqnr_db(1.9, samples), abs=0.01)
