"""The fallback's per-layer errors widen each layer's results to float64 over reused
arrays, and bias correction carries its segments' tensors without copying them (their
sessions have no memory arena): the same values as fresh arrays and copies, so the
same decisions and bytes as that path, and a shipped model still within the INT8 target
of the original run by onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import optcc
from optcc.quant import bias_correction, fallback
from optcc.quant.driver import quantize_int8
from optcc.quant.fallback import Target

TINYCNN = Path(__file__).resolve().parent.parent / "fixtures" / "tinycnn.onnx"
TARGET = Target(min_sqnr_db=60.0, min_argmax_agreement=0.0)  # above the fully quantized model's: a fallback


def _images(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.random((1, 3, 32, 32)).astype(np.float32)} for _ in range(n)]


class _Fresh:
    """``fallback._Scratch`` as a new array per request: the path before the reuse."""

    def array(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.empty(shape, np.float64)

    def widened(self, values: np.ndarray) -> np.ndarray:
        return np.array(values, np.float64)


class _Copying:
    """A session whose outputs are copies (``detached``'s way), around one of bias correction's."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session

    def __getattr__(self, name: str):  # noqa: ANN204 - the wrapped session's attributes
        return getattr(self._session, name)

    def run(self, *args, **kwargs) -> list[np.ndarray]:
        return [np.array(v, copy=True) for v in self._session.run(*args, **kwargs)]


def _quantized(data: list[dict[str, np.ndarray]]) -> tuple[bytes, dict]:
    model, stats = quantize_int8(str(TINYCNN), data, target=TARGET, metric=None, require_target=False,
                                 require_speedup=False)
    return optcc.ir.serialize(model).SerializeToString(), stats


def _sqnr_db(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    r = np.concatenate([np.asarray(a, np.float64).ravel() for a in reference])
    g = np.concatenate([np.asarray(a, np.float64).ravel() for a in got])
    return float(10 * np.log10(np.sum(r ** 2) / np.sum((r - g) ** 2)))


def test_reused_arrays_and_uncopied_tensors_write_the_bytes_of_fresh_ones(monkeypatch) -> None:
    data = _images(8)
    widened, carried = [], []
    real_widened, real_carry = fallback._Scratch.widened, bias_correction._Segments._carry
    monkeypatch.setattr(fallback._Scratch, "widened", lambda self, v: widened.append(v.shape) or real_widened(self, v))
    monkeypatch.setattr(bias_correction._Segments, "_carry",
                        lambda self, *a: carried.append(1) or real_carry(self, *a))
    reused, stats = _quantized(data)
    # both changed paths ran: the ranking's per-layer errors, over layers of several sizes, and bias correction
    assert len(set(widened)) > 1 and carried
    assert stats["pass"]["bias_correction"]["layers"] > 0
    assert stats["fallback"]["kept_float"], "the target makes layers go back to float"

    monkeypatch.setattr(fallback, "_Scratch", _Fresh)
    real_session = bias_correction._session
    monkeypatch.setattr(bias_correction, "_session", lambda *a, **k: _Copying(real_session(*a, **k)))
    fresh, fresh_stats = _quantized(data)
    assert reused == fresh
    assert stats["fallback"]["sensitivity"] == fresh_stats["fallback"]["sensitivity"]
    assert stats["fallback"]["kept_float"] == fresh_stats["fallback"]["kept_float"]

    # the shipped model against the original, both run by onnxruntime, by this file's own SQNR
    original = ort.InferenceSession(str(TINYCNN), providers=["CPUExecutionProvider"])
    shipped = ort.InferenceSession(reused, providers=["CPUExecutionProvider"])
    names = [o.name for o in original.get_outputs()]
    for name in names:
        want = [original.run([name], feeds)[0] for feeds in data]
        got = [shipped.run([name], feeds)[0] for feeds in data]
        assert _sqnr_db(want, got) >= 25.0, name


@pytest.mark.parametrize("shapes", [[(3, 5), (2, 4, 6), (3, 5), (), (7,)], [(1, 64, 9, 9), (1, 8, 3, 3)]])
def test_a_scratch_array_sums_to_the_bits_of_a_fresh_one(shapes: list[tuple[int, ...]]) -> None:
    rng = np.random.default_rng(5)
    wide, difference = fallback._Scratch(), fallback._Scratch()
    for shape in shapes:
        a = rng.normal(size=shape).astype(np.float32)
        b = (a + rng.normal(size=shape) * 1e-3).astype(np.float32)
        want_r = np.array(a, np.float64)
        want = float(np.sum((want_r - np.asarray(b, np.float64)) ** 2))
        r = wide.widened(a)
        assert r.shape == np.shape(a) and r.dtype == np.float64 and np.array_equal(r, want_r)
        assert fallback._squared_distance(r, b, difference) == want
        assert fallback._squared_distance(r, b) == want
        assert float(np.sum(np.square(r, out=r))) == float(np.sum(want_r ** 2))
