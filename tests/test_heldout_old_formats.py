"""Two held-out models in old or unusual formats, each run through the command line and
judged against onnxruntime on the ORIGINAL model (optcc's verifier is code under test):

- ``ort-logreg-iris`` (onnxruntime 1.16.3's bundled scikit-learn logistic regression:
  IR 3, ``ai.onnx.ml`` only, no default-domain opset, a ZipMap's sequence of maps as an
  output): -O1, -O2 and -O3 give the same labels and the same probabilities; ``--fp16``
  and ``--int8-dynamic`` are declined because nothing in it can be converted;
- ``clash-side-cnn`` (a PyTorch 1.11 export at IR 4, opset 9): -O3 within the fusion
  tolerance, ``--fp16`` within the float16 tolerance (SQNR 40 dB, cosine 0.9999), and
  ``--int8-dynamic --target-opset 13`` with the same top-1 class on every sample.

Both are read from the held-out cache only (``python -m fixtures.heldout NAME``): a
model not there is skipped, and nothing is downloaded by the suite.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fixtures.corpus import cached_path
from fixtures.heldout import find_heldout
from optcc import cli
from reference import FUSION_RTOL, assert_close

pytestmark = pytest.mark.corpus


def _cached(name: str) -> Path:
    path = cached_path(find_heldout(name))
    if not path.is_file():
        pytest.skip(f"{name} is not cached (python -m fixtures.heldout {name})")
    return path


def _run(path: Path, feeds: list[dict[str, np.ndarray]]) -> list[list[object]]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [session.run(None, feed) for feed in feeds]


def _as_array(value: object) -> np.ndarray:
    """An output as an array; a ZipMap's list of {class: probability} as rows by class."""
    if isinstance(value, list):
        return np.array([[row[k] for k in sorted(row)] for row in value])
    return np.asarray(value)


@pytest.mark.parametrize("level", ["-O1", "-O2", "-O3"])
def test_logistic_regression_keeps_labels_and_probabilities(tmp_path: Path, level: str) -> None:
    source = _cached("ort-logreg-iris")
    out = tmp_path / "out.onnx"
    assert cli.main([str(source), level, "-o", str(out)]) == 0
    onnx.checker.check_model(str(out), full_check=True)
    rng = np.random.default_rng(5)
    feeds = [{"float_input": rng.normal(3.0, 2.0, (3, 2)).astype(np.float32)} for _ in range(4)]
    for want, got in zip(_run(source, feeds), _run(out, feeds), strict=True):
        np.testing.assert_array_equal(got[0], want[0])  # labels
        assert_close([_as_array(got[1])], [_as_array(want[1])], FUSION_RTOL, what="probabilities")


@pytest.mark.parametrize("mode", ["--fp16", "--int8-dynamic"])
def test_logistic_regression_declines_what_it_cannot_convert(tmp_path: Path, capsys, mode: str) -> None:
    source = _cached("ort-logreg-iris")
    assert cli.main([str(source), mode, "-o", str(tmp_path / "out.onnx")]) == 5
    first = capsys.readouterr().err.splitlines()[0]
    assert "nothing in the model could be converted" in first and "--target-opset" not in first, first
    assert not (tmp_path / "out.onnx").exists()


def _side_feeds(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(11)
    return [{"input.1": rng.random((1, 16, 16, 3)).astype(np.float32)} for _ in range(n)]


def test_old_ir_classifier_at_o3_and_fp16(tmp_path: Path) -> None:
    source = _cached("clash-side-cnn")
    feeds = _side_feeds(8)
    want = np.concatenate([o[0] for o in _run(source, feeds)]).astype(np.float64)
    assert cli.main([str(source), "-O3", "-o", str(tmp_path / "o3.onnx")]) == 0
    onnx.checker.check_model(str(tmp_path / "o3.onnx"), full_check=True)
    got = np.concatenate([o[0] for o in _run(tmp_path / "o3.onnx", feeds)])
    assert_close([got], [want], FUSION_RTOL, what="-O3")
    assert cli.main([str(source), "--fp16", "-o", str(tmp_path / "h.onnx")]) == 0
    onnx.checker.check_model(str(tmp_path / "h.onnx"), full_check=True)
    got = np.concatenate([o[0] for o in _run(tmp_path / "h.onnx", feeds)]).astype(np.float64)
    sqnr = 10 * np.log10((want ** 2).sum() / ((got - want) ** 2).sum())
    cosine = (got * want).sum() / (np.linalg.norm(got) * np.linalg.norm(want))
    assert sqnr >= 40.0 and cosine >= 0.9999, (sqnr, cosine)


def test_old_opset_classifier_quantizes_dynamically_after_conversion(tmp_path: Path) -> None:
    source = _cached("clash-side-cnn")
    out = tmp_path / "q.onnx"
    assert cli.main([str(source), "--int8-dynamic", "--target-opset", "13", "-o", str(out)]) == 0
    onnx.checker.check_model(str(out), full_check=True)
    assert any(n.op_type == "DynamicQuantizeLinear" for n in onnx.load(out).graph.node)
    feeds = _side_feeds(16)
    want = np.concatenate([o[0] for o in _run(source, feeds)])
    got = np.concatenate([o[0] for o in _run(out, feeds)])
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
