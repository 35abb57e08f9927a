"""Task rows are named ``OUTPUT:PART``, or ``OUTPUT@GROUP:PART`` when samples come in
groups; an output's own name may hold '@' (and ':'). The report's notes read a group from
a row only when there are groups, and only one of theirs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx

import optcc
from optcc.numerics.verify import FEW_EXPECTED_ERRORS, _few_items, task_rows_text

TINYCNN = Path(__file__).resolve().parent.parent / "fixtures" / "tinycnn.onnx"


def _tinycnn_output_named(name: str) -> onnx.ModelProto:
    model = onnx.load(str(TINYCNN))
    (old,) = [o.name for o in model.graph.output]
    for node in model.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
    model.graph.output[0].name = name
    onnx.checker.check_model(model)
    return model


def test_an_output_named_with_an_at_sign_is_no_group() -> None:
    """TINYCNN's classifier output renamed 'logits@v2', calibrated without groups: the note on
    too few items asks for more samples, not for more of a group 'v2' that was never given."""
    rng = np.random.default_rng(0)
    data = [{"image": (rng.integers(0, 256, (1, 3, 32, 32)) / 255.0).astype(np.float32)} for _ in range(24)]
    result = optcc.optimize(_tinycnn_output_named("logits@v2"), int8_calibration=data,
                            int8_options={"require_speedup": False})
    assert result.applied_precision == ["int8"]
    row = result.report.verification["task"]["metrics"]["logits@v2:argmax"]
    more = math.ceil(FEW_EXPECTED_ERRORS / (row["items"] * row["allowed"]))
    weak = [w for w in result.report.warnings if "'logits@v2:argmax' passed over" in w]
    assert len(weak) == 1 and weak[0].endswith(f"give about {more}x as many samples"), weak


def test_a_group_is_one_of_the_verdicts_groups() -> None:
    """40 items at 0.015 hold 0.6 errors: 3 / 0.6 -> 5x as many samples (of the row's group)."""
    row = {"passed": True, "items": 40, "allowed": 0.015}
    groups = {"day": {"samples": 4, "passed": True}, "night": {"samples": 4, "passed": True}}
    grouped = _few_items({"metrics": {"logits@v2@day:argmax": row}, "groups": groups})
    assert len(grouped) == 1 and grouped[0].endswith("give group 'day' about 5x as many samples")
    plain = _few_items({"metrics": {"logits@day:argmax": row}})  # no groups: '@day' is part of the name
    assert len(plain) == 1 and plain[0].endswith("give about 5x as many samples")


def test_rows_of_an_output_named_with_an_at_sign_are_its_own() -> None:
    rows = {"scores@v2:argmax": {"deviation": 0.01, "allowed": 0.02, "floor": 0.005, "items": 80},
            "scores:argmax": {"deviation": 0.5, "allowed": 0.02, "floor": 0.005, "items": 80}}
    text = task_rows_text({"metrics": rows}, "scores@v2")
    assert text == "argmax 0.01 <= 0.02 (floor 0.005, 80 items)", text
    grouped = {"scores@v2@day:argmax": rows["scores@v2:argmax"], "scores@day:argmax": rows["scores:argmax"]}
    text = task_rows_text({"metrics": grouped, "groups": {"day": {"samples": 4, "passed": True}}}, "scores@v2")
    assert text == "argmax 0.01 <= 0.02 (floor 0.005, 80 items)", text
