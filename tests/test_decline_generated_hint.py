"""A lossy precision reverted for its numerics on generated inputs says that real samples
may judge otherwise; judged on the user's own samples, it does not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import optcc
from optcc.errors import PrecisionNotAppliedError
from optcc.numerics import Tolerance

TINYCNN = Path(__file__).resolve().parent.parent / "fixtures" / "tinycnn.onnx"
STRICT = {"int8": Tolerance(min_sqnr_db=200.0)}  # no 8-bit weight reaches it


def test_a_revert_judged_on_generated_inputs_suggests_real_samples() -> None:
    with pytest.raises(PrecisionNotAppliedError) as raised:
        optcc.optimize(str(TINYCNN), weight_only="int8", tolerances=STRICT)
    message = str(raised.value)
    assert message.startswith("weights not applied: reverted (changed the numerics:")
    assert "judged on generated inputs: real samples (--inputs) may judge otherwise" in message


def test_a_revert_judged_on_the_users_samples_does_not() -> None:
    rng = np.random.default_rng(0)
    samples = [{"image": rng.random((1, 3, 32, 32)).astype(np.float32)} for _ in range(3)]
    with pytest.raises(PrecisionNotAppliedError) as raised:
        optcc.optimize(str(TINYCNN), weight_only="int8", tolerances=STRICT, inputs=samples)
    assert "reverted (changed the numerics:" in str(raised.value)
    assert "generated inputs" not in str(raised.value)
