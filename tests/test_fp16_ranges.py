"""The ranges the float16 conversion reads (``optcc.fp16.ranges.TensorRange``): per tensor,
the largest finite |x| (infinite once an infinity is seen), the worst fraction of non-zero
values that float16 flushes to zero, and that tensor's SQNR once stored in float16, merged
over samples. Checked against the definitions written out in float64 numpy, for float16,
float32 and float64 arrays with zeros, values below half float16's smallest subnormal,
infinities and NaNs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from optcc.fp16.ranges import FP16_TINY, TensorRange

RNG = np.random.default_rng(7)


def _reference(arrays: list[np.ndarray]) -> tuple[float, float, float, int]:
    max_abs, flushed_fraction, sqnr, size = 0.0, 0.0, math.inf, 0
    for array in arrays:
        a = np.abs(array.astype(np.float64))
        finite = a[np.isfinite(a)]
        if finite.size:
            max_abs = max(max_abs, float(finite.max()))
        if np.isinf(a).any():
            max_abs = math.inf
        nonzero = finite[finite > 0]
        if nonzero.size:
            flushed = int(np.sum(nonzero < FP16_TINY / 2))
            flushed_fraction = max(flushed_fraction, flushed / nonzero.size)
            if flushed:
                stored = np.clip(finite, -65504, 65504).astype(np.float16).astype(np.float64)
                noise = float(np.sum((finite - stored) ** 2))
                sqnr = min(sqnr, 10 * math.log10(float(np.sum(finite ** 2)) / noise) if noise else math.inf)
        size = max(size, array.size)
    return max_abs, flushed_fraction, sqnr, size


def _sample(dtype: type, kind: str) -> np.ndarray:
    a = (RNG.standard_normal(4000) * 10).astype(dtype)
    tiny = np.asarray(1e-9 if dtype != np.float16 else 0, dtype)
    if kind == "zeros":
        a[::7] = 0
    elif kind == "tiny":
        a[::3] = tiny
        a[::5] = 0
    elif kind == "inf":
        a[::9] = tiny
        a[4] = -np.inf
    elif kind == "nan":
        a[1] = np.nan
        a[::11] = tiny
    elif kind == "all-nan":
        a[:] = np.nan
    return a.reshape(40, 100)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("kinds", [("plain", "zeros"), ("tiny", "plain"), ("inf", "tiny"), ("nan", "all-nan"),
                                   ("all-nan", "plain")])
def test_merged_ranges_match_their_definitions(dtype, kinds):
    arrays = [_sample(dtype, kind) for kind in kinds]
    merged = TensorRange()
    for array in arrays:
        merged.merge(array)
    max_abs, flushed_fraction, sqnr, size = _reference(arrays)
    assert merged.max_abs == max_abs
    assert merged.flushed_fraction == flushed_fraction
    assert merged.rounding_sqnr_db == pytest.approx(sqnr, rel=1e-9) if math.isfinite(sqnr) \
        else merged.rounding_sqnr_db == sqnr
    assert merged.size == size
    if "tiny" in kinds and dtype != np.float16:
        assert merged.flushed_fraction > 0.3 and math.isfinite(merged.rounding_sqnr_db)


_RELU_TIMES_THREE = """
    <ir_version: 8, opset_import: ["": 17]>
    g (float[2, 5] x) => (float[2, 5] y) {
        three = Constant <value = float {3.0}> ()
        r = Relu(x)
        y = Mul(r, three)
    }"""


def test_observe_keeps_every_samples_outputs_and_ranges_over_all():
    """``observe`` on Relu(x) * 3 over three samples: every sample's graph outputs (and
    every value's type and size on the first) and each float value's range over all
    three, against numpy."""
    import onnx

    import optcc
    from optcc.fp16.ranges import observe

    samples = [{"x": (RNG.standard_normal((2, 5)) * scale).astype(np.float32)} for scale in (1.0, 50.0, 0.5)]
    samples[2]["x"][0, 0] = 1e-9  # below half float16's smallest subnormal: flushed
    seen = observe(optcc.ir.load(onnx.parser.parse_model(_RELU_TIMES_THREE)), samples)
    relu = [np.maximum(s["x"], 0) for s in samples]
    assert len(seen.outputs) == 3 and all(len(outputs) == 1 for outputs in seen.outputs)
    for outputs, r in zip(seen.outputs, relu):
        np.testing.assert_array_equal(outputs[0], r * np.float32(3))
    assert seen.dtypes == {"three": np.float32, "r": np.float32, "y": np.float32}
    assert seen.nbytes == {"three": 4, "r": 40, "y": 40}
    for name, arrays in {"x": [s["x"] for s in samples], "r": relu, "y": [r * np.float32(3) for r in relu]}.items():
        max_abs, flushed_fraction, _, size = _reference(arrays)
        assert (seen.ranges[name].max_abs, seen.ranges[name].flushed_fraction, seen.ranges[name].size) == \
            (max_abs, flushed_fraction, size), name
    assert seen.ranges["x"].flushed_fraction > 0


def test_observe_holds_one_samples_values_at_a_time(monkeypatch):
    """When ``observe`` takes the next sample, no value of the run before it is alive (the
    graph outputs it keeps are copies of their own): it streams over the samples."""
    import gc
    import weakref

    import onnx

    import optcc
    from optcc.fp16 import ranges

    runs: list[list[weakref.ref]] = []
    numeric = ranges._numeric

    def recorded(names, arrays):
        values = numeric(names, arrays)
        runs.append([weakref.ref(a) for a in values.values()])
        return values

    monkeypatch.setattr(ranges, "_numeric", recorded)
    alive_when_taken: list[int] = []

    def samples():
        for scale in (1.0, 2.0, 3.0, 4.0):
            gc.collect()
            alive_when_taken.append(sum(ref() is not None for run in runs for ref in run))
            yield {"x": np.full((2, 5), scale, np.float32)}

    seen = ranges.observe(optcc.ir.load(onnx.parser.parse_model(_RELU_TIMES_THREE)), samples())
    assert len(runs) == 4
    assert alive_when_taken == [0, 0, 0, 0]
    assert seen.ranges["y"].max_abs == 12.0
    assert [float(outputs[0].max()) for outputs in seen.outputs] == [3.0, 6.0, 9.0, 12.0]


def test_values_sqnr_compares_every_named_value_part_by_part():
    """``values_sqnr`` of Relu(x) * 3 against Relu(x) * 3.01 (and an extra value the
    reference lacks): each common value's SQNR against numpy's, the same whatever the part
    size; the parts are consecutive runs of names of at most that many bytes."""
    import onnx

    import optcc
    from optcc.fp16 import ranges

    candidate = optcc.ir.load(onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[2, 5] x) => (float[2, 5] y) {
            three = Constant <value = float {3.01}> ()
            r = Relu(x)
            extra = Neg(r)
            y = Mul(r, three)
        }"""))
    reference = optcc.ir.load(onnx.parser.parse_model(_RELU_TIMES_THREE))
    sample = {"x": RNG.standard_normal((2, 5)).astype(np.float32)}
    relu = np.maximum(sample["x"], 0)  # the products are float32's, compared in float64
    expected_y = (relu * np.float32(3)).astype(np.float64)
    noise = float(np.sum((expected_y - (relu * np.float32(3.01)).astype(np.float64)) ** 2))
    expected = {"r": math.inf, "y": 10 * math.log10(float(np.sum(expected_y ** 2)) / noise),
                "three": 10 * math.log10(9.0 / (np.float64(np.float32(3)) - np.float64(np.float32(3.01))) ** 2)}
    nbytes = {"three": 4, "r": 40, "y": 40}
    for part_bytes in (0, 44, 1 << 20):
        measured = ranges.values_sqnr(reference, candidate, sample, sample, {"three", "r", "y", "extra"}, nbytes,
                                      part_bytes=part_bytes)
        assert measured.keys() == expected.keys()
        for name, db in expected.items():
            assert measured[name] == pytest.approx(db, rel=1e-9), (part_bytes, name)
    assert ranges._parts(["three", "r", "y"], nbytes, 0) == [["three"], ["r"], ["y"]]
    assert ranges._parts(["three", "r", "y"], nbytes, 44) == [["three", "r"], ["y"]]
    assert ranges._parts(["three", "r", "y"], nbytes, 1 << 20) == [["three", "r", "y"]]
