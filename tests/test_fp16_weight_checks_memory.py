"""The whole-weight float16 checks (exact representability, rounding SQNR, finite peak)
agree with numpy float64 computed on the whole array, and hold a chunk's temporaries at a
time rather than copies of the whole weight (numpy's allocations, traced)."""

from __future__ import annotations

import math

import numpy as np

from optcc.fp16.ranges import finite_abs_max, float16_rounding_sqnr_db
from optcc.fp16.rewrite import CHUNK_ELEMENTS, exactly_float16
from calls import traced_peak

SIZE = 8 * CHUNK_ELEMENTS + 12345  # several chunks and a partial one


def _weight(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    array = (rng.standard_normal(SIZE) * 1e-3).astype(np.float32)
    array[[7, SIZE - 3]] = [np.inf, np.nan]
    array[CHUNK_ELEMENTS + 5] = -70000.0  # beyond float16's range: clamped when rounded
    array[3 * CHUNK_ELEMENTS + 1] = 1e-9  # flushes to zero in float16
    return array


def _reference_sqnr_db(array: np.ndarray) -> float:
    a = array.astype(np.float64)
    a = a[np.isfinite(a)]
    rounded = np.clip(a, -65504.0, 65504.0).astype(np.float16).astype(np.float64)
    return 10 * math.log10(np.sum(a ** 2) / np.sum((a - rounded) ** 2))


def test_checks_match_numpy_on_the_whole_array() -> None:
    array = _weight(0)
    assert math.isclose(float16_rounding_sqnr_db(array), _reference_sqnr_db(array), rel_tol=1e-9)
    assert finite_abs_max(array) == float(np.abs(array[np.isfinite(array)]).max()) == 70000.0
    assert not exactly_float16(array)
    with np.errstate(over="ignore"):  # -70000 becomes -inf, which float16 holds exactly
        exact = array.astype(np.float16).astype(np.float32)
    assert exactly_float16(exact)
    exact[SIZE - 1] = np.float32(1.0) + np.float32(2.0 ** -20)  # the last chunk alone is inexact
    assert not exactly_float16(exact)
    assert finite_abs_max(np.full(8, np.nan, dtype=np.float32)) is None


def test_checks_hold_a_chunk_of_temporaries_not_the_weight() -> None:
    array = _weight(1)
    for check in (float16_rounding_sqnr_db, finite_abs_max, exactly_float16):
        _, peak = traced_peak(lambda: check(array))
        # a chunk's float64 temporaries, a few times 8 MiB: less than half of one float64
        # copy of the weight (64 MiB), of which a whole-array computation makes several
        assert peak < 8 * SIZE // 2, (check.__name__, peak)


def test_external_weight_is_read_from_its_file_without_mapping_it(tmp_path) -> None:
    """An external weight's values come back equal to the file's, in an array of their
    own: onnx-ir's map of the file (whose pages would stay resident as long as the
    model) is never opened."""
    import onnx_ir as ir

    from optcc.fp16.weights import float32_values

    array = _weight(2)[:5000].reshape(1000, 5)
    offset = 4096
    with open(tmp_path / "w.bin", "wb") as f:
        f.write(b"\0" * offset)
        f.write(array.astype("<f4").tobytes())
    tensor = ir.ExternalTensor("w.bin", offset, array.nbytes, ir.DataType.FLOAT, shape=ir.Shape(array.shape),
                               name="w", base_dir=str(tmp_path))
    got = float32_values(tensor)
    np.testing.assert_array_equal(got, array)
    assert got.shape == array.shape and got.dtype == np.float32
    assert tensor.raw is None
