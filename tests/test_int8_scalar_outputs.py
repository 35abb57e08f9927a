"""The INT8 search measures a model whose output is a scalar (rank 0: PLCMOS's MOS): the
squared distance of two 0-d outputs is a number, as numpy computes it in float64."""

from __future__ import annotations

import numpy as np

from optcc.quant.fallback import _squared_distance


def test_the_squared_distance_of_scalar_outputs_is_measured():
    reference, other = np.array(2.5, dtype=np.float32), np.array(0.75, dtype=np.float32)
    assert _squared_distance(reference, other) == (2.5 - 0.75) ** 2
    rows = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert _squared_distance(rows, rows[::-1]) == float(np.sum((rows.astype(np.float64) - rows[::-1]) ** 2))
