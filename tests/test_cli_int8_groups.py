"""INT8 groups from the command line: ``--calibration LABEL=DATA`` (repeatable) labels each
file's samples, ``--int8-metric @GROUP=METRIC`` picks a group's metric; every group is held
out and judged apart, and the report's rows per group hold what the tests' own references
compute (onnx's reference evaluator for float32, onnxruntime for the INT8 model, numpy and
scipy for the metrics)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

import optcc
from optcc import cli
from optcc.errors import BadInputError
from optcc.quant.calibration import holdout_positions, split_holdout
from optcc.quant.driver import quantize_int8

TINYCNN = Path(__file__).resolve().parent.parent / "fixtures" / "tinycnn.onnx"


def _run(*argv: str) -> int:
    return cli.main([*argv, "-q"])


def _int8_stats(report: dict) -> dict:
    return next(p["stats"] for p in report["passes"] if p["name"] == "quantize-int8-calibrated")


def _int8_outputs(path: Path, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """The written INT8 model's first output, as its users run it (onnxruntime, all optimizations)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [session.run(None, f)[0] for f in feeds]


# --------------------------------------------------------------------------- a classifier


def _images(n: int, seed: int, scale: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 1, 3, 32, 32)) / 255.0 * scale).astype(np.float32)


def _top1_errors(reference: list[np.ndarray], got: list[np.ndarray]) -> tuple[int, float]:
    """(confident samples, 1 - top-1 agreement on them): confident where the reference's top
    two probabilities are at least 0.1 apart (all samples when none is)."""
    ref = np.concatenate(reference).astype(np.float64)
    out = np.concatenate(got)
    p = np.exp(ref - ref.max(1, keepdims=True))
    p = np.sort(p / p.sum(1, keepdims=True), 1)
    confident = p[:, -1] - p[:, -2] >= 0.1
    if not confident.any():
        confident[:] = True
    return int(confident.sum()), float(1.0 - np.mean(ref.argmax(1)[confident] == out.argmax(1)[confident]))


def test_each_labelled_file_is_a_group_held_out_and_judged_apart(tmp_path: Path) -> None:
    """Two files, one after the other: each group's last samples are held out (the last 20%
    of all of them would be the second file's alone), and the report judges each group by
    its own metric; the top-1 row counts what the test computes on onnx's reference."""
    bright, dark = _images(12, 0, 1.0), _images(12, 1, 0.5)
    np.savez(tmp_path / "bright.npz", image=bright)
    np.savez(tmp_path / "dark.npz", image=dark)
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    code = _run(str(TINYCNN), "--int8", "--no-int8-speed-check", "--calibration", f"bright={tmp_path / 'bright.npz'}",
                "--calibration", f"dark={tmp_path / 'dark.npz'}", "--int8-metric", "sqnr",
                "--int8-metric", "@dark=argmax", "-o", str(out), "--report", str(report))
    assert code == cli.EXIT_OK and out.exists()
    body = json.loads(report.read_text())
    stats = _int8_stats(body)
    assert stats["acceptance"]["metrics"] == {"logits@bright": "sqnr", "logits@dark": "argmax"}
    held = stats["acceptance"]["groups"]
    assert set(held) == {"bright", "dark"} and all(g["samples"] == 12 and g["held_out"] >= 2 for g in held.values())
    assert {"logits@bright:sqnr", "logits@dark:argmax"} <= set(stats["fallback"]["evaluation"]["task"]["metrics"])
    task = body["verification"]["task"]
    assert task["groups"] == {"bright": {"samples": 12, "passed": True}, "dark": {"samples": 12, "passed": True}}
    feeds = [{"image": x} for x in dark]
    reference = ReferenceEvaluator(str(TINYCNN))
    items, deviation = _top1_errors([reference.run(None, f)[0] for f in feeds], _int8_outputs(out, feeds))
    row = task["metrics"]["logits@dark:argmax"]
    assert row["items"] == items and row["deviation"] == pytest.approx(deviation, abs=1e-6)
    assert row["passed"] == (row["deviation"] <= row["allowed"])
    # the bright group's SQNR, the test's own: summed over its 12 samples
    feeds = [{"image": x} for x in bright]
    ref = np.concatenate([reference.run(None, f)[0] for f in feeds]).astype(np.float64)
    got = np.concatenate(_int8_outputs(out, feeds)).astype(np.float64)
    sqnr = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2))
    assert task["metrics"]["logits@bright:sqnr"]["sqnr_db"] == pytest.approx(sqnr, abs=0.05)
    assert "logits@dark:sqnr" not in task["metrics"]  # the group's own metric replaced the plain one


# --------------------------------------------------------------------------- a detection map


def _detector() -> bytes:
    """``y = Sigmoid(Conv(x))`` on ``[1, 1, 48, 64]``: a 3x3 mean times 12, minus 6: a
    region of 1s gives ~1, of 0s ~0 (a text detector's probability map, in miniature)."""
    weight = numpy_helper.from_array(np.full((1, 1, 3, 3), 12.0 / 9.0, np.float32), "w")
    bias = numpy_helper.from_array(np.array([-6.0], np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Sigmoid", ["c"], ["y"])],
        "detector", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 48, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 48, 64])], [weight, bias])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _pages(n: int, seed: int) -> np.ndarray:
    """Pages: 6 separate boxes of 1s (4 rows, 6-10 columns) on 0."""
    rng = np.random.default_rng(seed)
    pages = np.zeros((n, 1, 1, 48, 64), np.float32)
    for page in pages:
        for row in range(3):
            for col in range(2):
                y, x = 4 + 15 * row + int(rng.integers(0, 4)), 4 + 30 * col + int(rng.integers(0, 8))
                page[0, 0, y:y + 4, x:x + int(rng.integers(6, 11))] = 1.0
    return pages


def _photos(n: int, seed: int) -> np.ndarray:
    """Photos: smooth shades below 0.3, nothing to detect."""
    rng = np.random.default_rng(seed)
    return ndimage.uniform_filter(rng.uniform(0.0, 0.3, (n, 1, 1, 48, 64)), size=(1, 1, 1, 9, 9)).astype(np.float32)


def _boxes(probability: np.ndarray) -> np.ndarray:
    """Boxes ``[x0, y0, x1, y1]`` of the connected components of ``probability > 0.3``
    whose sides are at least 3 pixels (DB post-processing's minimum)."""
    labels, _ = ndimage.label(np.asarray(probability).reshape(probability.shape[-2:]) > 0.3)
    found = [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(labels)]
    return np.array([b for b in found if min(b[2] - b[0], b[3] - b[1]) >= 3], float).reshape(-1, 4)


def _box_f1_and_mask_iou(reference: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    """Deviations 1 - box F1 (one-to-one matches at IoU >= 0.5) and 1 - mask IoU, pooled."""
    matched = counted = 0
    inter = union = 0
    for r, g in zip(reference, got):
        a, b = _boxes(r), _boxes(g)
        if len(a) and len(b):
            x0, y0 = np.maximum(a[:, None, 0], b[None, :, 0]), np.maximum(a[:, None, 1], b[None, :, 1])
            x1, y1 = np.minimum(a[:, None, 2], b[None, :, 2]), np.minimum(a[:, None, 3], b[None, :, 3])
            overlap = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
            area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
            iou = overlap / (area(a)[:, None] + area(b)[None, :] - overlap)
            rows, cols = linear_sum_assignment(-iou)
            matched += int(np.sum(iou[rows, cols] >= 0.5))
        counted += len(a) + len(b)
        inter += int(np.sum((r > 0.3) & (g > 0.3)))
        union += int(np.sum((r > 0.3) | (g > 0.3)))
    return 1.0 - 2.0 * matched / max(counted, 1), 1.0 - inter / max(union, 1)


def test_pages_by_box_f1_and_photos_by_the_boxes_added(tmp_path: Path) -> None:
    """A text detector in miniature: pages judged by box F1 and mask IoU, text-free photos
    by the boxes INT8 adds; each row holds the test's own numbers on the group's samples."""
    model = tmp_path / "det.onnx"
    model.write_bytes(_detector())
    pages, photos = _pages(12, 0), _photos(12, 1)
    np.savez(tmp_path / "pages.npz", x=pages)
    np.savez(tmp_path / "photos.npz", x=photos)
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    code = _run(str(model), "--int8", "--no-int8-speed-check", "--calibration", f"page={tmp_path / 'pages.npz'}",
                "--calibration", f"photo={tmp_path / 'photos.npz'}", "--int8-metric", "@photo=added-boxes",
                "-o", str(out), "--report", str(report))
    assert code == cli.EXIT_OK
    task = json.loads(report.read_text())["verification"]["task"]
    assert {k for k in task["metrics"] if "@photo" in k} == {"y@photo:added_boxes"}
    assert {"y@page:box_f1", "y@page:mask_iou"} <= set(task["metrics"])
    assert set(task["groups"]) == {"page", "photo"} and task["passed"] is True
    reference = ReferenceEvaluator(model.read_bytes())
    ref_pages = [reference.run(None, {"x": x})[0] for x in pages]
    got_pages = _int8_outputs(out, [{"x": x} for x in pages])
    box_f1, mask_iou = _box_f1_and_mask_iou(ref_pages, got_pages)
    assert sum(len(_boxes(m)) for m in ref_pages) == 72  # the pages' 6 boxes each, found by float32
    assert task["metrics"]["y@page:box_f1"]["deviation"] == pytest.approx(box_f1, abs=1e-6)
    assert task["metrics"]["y@page:mask_iou"]["deviation"] == pytest.approx(mask_iou, abs=1e-6)
    ref_photos = [reference.run(None, {"x": x})[0] for x in photos]
    got_photos = _int8_outputs(out, [{"x": x} for x in photos])
    added = sum(len(_boxes(m)) for m in got_photos) - sum(len(_boxes(m)) for m in ref_photos)
    assert sum(len(_boxes(m)) for m in ref_photos) == 0
    # over at least one box: the count added itself
    assert task["metrics"]["y@photo:added_boxes"]["deviation"] == pytest.approx(max(added, 0), abs=1e-6)
    for row in task["metrics"].values():
        if row.get("judged", True) and "allowed" in row and row["metric"] != "sqnr":
            assert row["passed"] == (row["deviation"] <= row["allowed"])


# --------------------------------------------------------------------------- the held-out part


def test_every_group_is_held_out_in_the_same_proportion() -> None:
    groups = ["a"] * 10 + ["b"] * 5
    assert holdout_positions(15, 0.2, groups) == [8, 9, 14]
    assert holdout_positions(15, 0.2, groups, half=True) == [5, 6, 7, 8, 9, 13, 14]
    assert holdout_positions(15, 0.2) == [12, 13, 14]  # without groups: the last 20% of all
    interleaved = ["a", "b"] * 6
    assert holdout_positions(12, 0.2, interleaved) == [10, 11]  # 1 of each 6, as the last 20% of all
    calib, held = split_holdout(list(range(15)), 0.2, groups)
    assert held == [8, 9, 14] and calib == [0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13]
    assert split_holdout(list(range(3)), 0.0, ["a", "a", "b"]) == ([0, 1, 2], [0, 1, 2])


def test_the_python_api_holds_out_each_group_too() -> None:
    """``quantize_int8(groups=...)`` takes the held-out part as the command line does: the
    last 20% of each group (4 of 20 and 10 of 50 here) when each holds at least 10..."""
    data = [{"image": x} for x in np.concatenate([_images(20, 0, 1.0), _images(50, 1, 0.5)])]
    _, stats = quantize_int8(str(TINYCNN), data, groups=["bright"] * 20 + ["dark"] * 50, require_speedup=False,
                             require_target=False, accuracy_fallback=False, bias_correction=False,
                             metric={"*": "sqnr"})
    acceptance = stats["acceptance"]
    # 4 bright ones are too few to judge that group by: half of each group is held out
    assert acceptance["groups"] == {"bright": {"samples": 20, "held_out": 10}, "dark": {"samples": 50, "held_out": 25}}
    assert acceptance["held_out_widened"].startswith("group 'bright' on 4 held-out samples")
    assert acceptance["judged_samples"] == 35 and "all_samples_judged" not in acceptance
    assert set(stats["fallback"]["evaluation"]["task"]["groups"]) == {"bright", "dark"}


def test_a_group_too_small_to_judge_apart_is_judged_on_every_sample() -> None:
    """...and every sample when even half of a group is fewer than 10."""
    data = [{"image": x} for x in np.concatenate([_images(10, 0, 1.0), _images(10, 1, 0.5)])]
    _, stats = quantize_int8(str(TINYCNN), data, groups=["bright"] * 10 + ["dark"] * 10, require_speedup=False,
                             require_target=False, accuracy_fallback=False, bias_correction=False,
                             metric={"*": "sqnr"})
    acceptance = stats["acceptance"]
    assert acceptance["groups"] == {"bright": {"samples": 10, "held_out": 5}, "dark": {"samples": 10, "held_out": 5}}
    assert acceptance["judged_samples"] == 20
    assert "group 'bright' on 5 held-out samples" in acceptance["all_samples_judged"]
    assert stats["fallback"]["evaluation"]["task"]["groups"] == {"bright": {"samples": 10, "passed": True},
                                                                 "dark": {"samples": 10, "passed": True}}


def test_groups_label_the_verification_samples_too() -> None:
    data = [{"image": x} for x in _images(4, 0, 1.0)]
    with pytest.raises(BadInputError, match="give no separate inputs"):
        optcc.optimize(str(TINYCNN), int8_calibration=data, inputs=data[:2],
                       int8_options={"groups": ["a", "a", "b", "b"]})
    with pytest.raises(BadInputError, match="too few samples"):
        quantize_int8(str(TINYCNN), data, groups=["a", "a", "a", "b"], require_speedup=False)
    with pytest.raises(BadInputError, match="no output 'scores'"):
        quantize_int8(str(TINYCNN), data, groups=["a", "a", "b", "b"], metric={"scores@a": "sqnr"})


# --------------------------------------------------------------------------- bad input


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "tinycnn.onnx"
    shutil.copy(TINYCNN, model)
    paths = {"model": model}
    for name, n in (("a", 6), ("b", 6), ("one", 1)):
        paths[name] = tmp_path / f"{name}.npz"
        np.savez(paths[name], image=_images(n, 0, 1.0))
    return paths


@pytest.mark.parametrize("flags, message", [
    (["--calibration", "a=A", "--calibration", "B"], "label every DATA"),
    (["--calibration", "A", "--calibration", "B"], "given more than once"),
    (["--calibration", "a b=A"], "the label 'a b' must be"),
    (["--calibration", ".a=A"], "starting with a letter, digit or '_'"),
    (["--calibration", "=A"], "names no LABEL"),
    (["--calibration", "a="], "names no DATA"),
    (["--calibration", "a=A", "--calibration", "a=B"], "--calibration gives the label 'a' twice"),
    (["--calibration", "a=A", "--calibration", "b=ONE"], "--calibration group 'b' holds 1 sample(s), too few"),
    (["--calibration", "a=A", "--calibration", "b=B", "--int8-metric", "@c=sqnr"],
     "--int8-metric '@c=sqnr' names group 'c', which no --calibration labels (labels: a, b)"),
    (["--calibration", "a=A", "--calibration", "b=B", "--int8-metric", "logits@c=sqnr"],
     "--int8-metric 'logits@c=sqnr' names group 'c', which no --calibration labels"),
    (["--calibration", "A", "--int8-metric", "@a=sqnr"],
     "--int8-metric '@a=sqnr' names group 'a', but no --calibration is labelled"),
    (["--calibration", "a=A", "--int8-metric", "@a=nope"], "unknown metric 'nope'"),
    (["--calibration", "a=A", "--int8-metric", "target", "--int8-metric", "@a=sqnr"], "takes no metric per group"),
    (["--calibration", "a=A", "--calibration", "b=B", "--int8-metric", "@a=target"], "takes no metric per group"),
    (["--calibration", "a=A", "--int8-metric", "@a=sqnr", "--int8-metric", "@a=argmax"], "two metrics"),
    (["--calibration", "a=A", "--inputs", "B"], "--inputs with labelled --calibration"),
    (["--calibration", "a=A", "--calibration", "b=B", "--int8-metric", "scores@a=sqnr"], "no output 'scores'"),
    (["--calibration", "a=A", "--calibration", "b=B", "--int8-metric", "b=sqnr"], "the group 'b' is '@b'"),
])
def test_bad_groups_are_one_line_usage_errors(files: dict[str, Path], tmp_path: Path, capsys,
                                              flags: list[str], message: str) -> None:
    names = {"A": files["a"], "B": files["b"], "ONE": files["one"]}

    def filled(flag: str) -> str:
        label, sep, data = flag.rpartition("=")
        return f"{label}{sep}{names.get(data, data)}" if data in names else flag

    out = tmp_path / "out.onnx"
    code = cli.main([str(files["model"]), "--int8", *[filled(f) for f in flags], "-o", str(out),
                     "--report", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_BAD_INPUT and not out.exists()
    # the report says how the run ended, with the line said (a CI job reads it, not stderr)
    assert json.loads((tmp_path / "r.json").read_text())["outcome"] == {
        "exit_code": cli.EXIT_BAD_INPUT, "output": None, "declined": {}, "error": err[0].removeprefix("optcc: ")}
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("flags, message", [
    (["--int8-metric", "@a=sqnr"], "--int8-metric is used with --int8, --int8-dynamic or --weights"),
    (["--int8-metric", "sqnr", "--inputs", "A"], "--int8-metric is used with --int8, --int8-dynamic or --weights"),
    (["--weights", "int8", "--calibration", "A", "--int8-metric", "@a=sqnr"],
     "--int8-metric '@a=sqnr' names group 'a', but no --calibration is labelled"),
    (["--int8-dynamic", "--int8-metric", "logits@a=sqnr"], "--int8-metric 'logits@a=sqnr' names group 'a', but no"),
    (["--int8-dynamic", "--int8-metric", "scores=sqnr"], "the model has no output 'scores' (outputs: logits)"),
    (["--weights", "int8", "--int8-metric", "sqnr", "--int8-metric", "scores=argmax"], "the model has no output 'scores'"),
    (["--int8-dynamic", "--int8-metric", "target=argmax"], "no output 'target' (outputs: logits); 'target' is a metric"),
    (["--int8-target-sqnr", "30"], "--int8-target-sqnr is used with --int8, --int8-dynamic or --weights"),
    (["--fp16", "--int8-target-sqnr", "30"], "--int8-target-sqnr is used with --int8, --int8-dynamic or --weights"),
    (["--int8-metric-margin", "2"], "--int8-metric-margin is used with --int8, --int8-dynamic or --weights"),
])
def test_a_metric_that_would_judge_nothing_is_refused(files: dict[str, Path], tmp_path: Path, capsys,
                                                      flags: list[str], message: str) -> None:
    """--int8-metric, its margin and --int8-target-sqnr judge an INT8 result (--int8,
    --int8-dynamic, --weights): without one they would be ignored, and a @GROUP key without
    labelled samples, or an OUTPUT key the model lacks, would name nothing."""
    out = tmp_path / "out.onnx"
    argv = [str(files["a"]) if flag == "A" else flag for flag in flags]
    code = cli.main([str(files["model"]), *argv, "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_BAD_INPUT and not out.exists()
    assert len(err) == 1 and message in err[0], err


def test_a_label_given_twice_is_refused_naming_both_files(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    """Two files under one label would merge into one group without a word: refused, and
    the line names both and how to give a group of several files (one folder)."""
    out = tmp_path / "out.onnx"
    code = cli.main([str(files["model"]), "--int8", "--calibration", f"a={files['a']}", "--calibration",
                     f"a={files['b']}", "-o", str(out), "--report", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_BAD_INPUT and not out.exists()
    # the report says how the run ended, with the line said (a CI job reads it, not stderr)
    assert json.loads((tmp_path / "r.json").read_text())["outcome"] == {
        "exit_code": cli.EXIT_BAD_INPUT, "output": None, "declined": {}, "error": err[0].removeprefix("optcc: ")}
    assert len(err) == 1 and str(files["a"]) in err[0] and str(files["b"]) in err[0], err
    assert "label 'a' twice" in err[0] and "one folder (a=FOLDER)" in err[0], err
    folder = tmp_path / "both"
    folder.mkdir()
    for name in ("a", "b"):
        shutil.copy(files[name], folder / f"{name}.npz")
    code = _run(str(files["model"]), "--int8", "--no-int8-speed-check", "--calibration", f"a={folder}",
                "--calibration", f"b={files['b']}", "-o", str(out), "--report", str(tmp_path / "r.json"))
    groups = json.loads((tmp_path / "r.json").read_text())["verification"]["task"]["groups"]
    assert code == cli.EXIT_OK and groups == {"a": {"samples": 12, "passed": True}, "b": {"samples": 6, "passed": True}}


def test_labels_need_int8(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    code = cli.main([str(files["model"]), "--fp16", "--calibration", f"a={files['a']}", "-o", str(tmp_path / "o.onnx")])
    assert code == cli.EXIT_BAD_INPUT and "used with --int8" in capsys.readouterr().err


def test_a_path_with_an_equals_sign_is_named_with_its_folder(files: dict[str, Path], tmp_path: Path, capsys,
                                                            monkeypatch) -> None:
    """A file named ``a=b.npz`` also reads as LABEL a and DATA b.npz: whether b.npz exists
    (the fixture's) or not (``a=c.npz``), one line says how to give either, and
    ``./a=b.npz`` calibrates on the file."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.onnx"
    for name in ("a=b.npz", "a=c.npz"):
        shutil.copy(files["a"], tmp_path / name)
        code = cli.main([str(files["model"]), "--int8", "--calibration", name, "-o", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == cli.EXIT_BAD_INPUT and not out.exists()
        assert len(err) == 1 and f"'{name}' is a file" in err[0] and f"./{name}" in err[0], err
    assert _run(str(files["model"]), "--int8", "--no-int8-speed-check", "--calibration", "./a=b.npz",
                "-o", str(out)) == cli.EXIT_OK and out.exists()


def test_a_file_read_as_one_sample_is_noted_before_its_group_is_refused(files: dict[str, Path], tmp_path: Path,
                                                                        capsys) -> None:
    """Images saved as one [N, 3, H, W] array fit the model's input as one sample of batch
    N: the group then holds one sample, and the note saying why precedes the refusal."""
    batch = tmp_path / "batch.npz"
    np.savez(batch, image=_images(6, 0, 1.0)[:, 0])
    out = tmp_path / "out.onnx"
    code = cli.main([str(files["model"]), "--int8", "--calibration", f"day={batch}", "--calibration",
                     f"night={files['b']}", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_BAD_INPUT and not out.exists()
    assert len(err) == 2 and "read as one sample of batch 6" in err[0], err
    assert err[1] == f"optcc: error: {batch}: --calibration group 'day' holds 1 sample(s), too few: each group " \
                     "needs at least 2 (one calibrates, one is held out)", err


def test_the_note_that_a_file_is_one_sample_prints_with_quiet(files: dict[str, Path], tmp_path: Path,
                                                                capsys) -> None:
    """-q prints nothing on success, but how a file was read decides which samples the run
    uses: a [6, 3, H, W] file verified as one sample of batch 6 is said, naming the file."""
    batch = tmp_path / "batch.npz"
    images = _images(6, 0, 1.0)[:, 0]
    np.savez(batch, image=images)
    out = tmp_path / "out.onnx"
    assert cli.main([str(files["model"]), "--inputs", str(batch), "-q", "-o", str(out)]) == cli.EXIT_OK
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"optcc: note: {batch}: read as one sample of batch 6"), err
    # what was run is one sample of batch 6: onnx's reference gives the written model's outputs on it
    reference = ReferenceEvaluator(str(TINYCNN)).run(None, {"image": images})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": images})[0]
    assert got.shape == (6, 10) and np.allclose(got, reference, rtol=1e-4, atol=1e-5)


def test_a_declined_groups_reason_says_each_sqnr_below_the_target(files: dict[str, Path], tmp_path: Path,
                                                                  capsys) -> None:
    """A target no INT8 model reaches: the first line names both groups' misses, and each
    SQNR row says its SQNR is below the target asked for, not only the floor's margin."""
    out = tmp_path / "out.onnx"
    code = cli.main([str(files["model"]), "--int8", "--no-int8-speed-check", "--calibration", f"a={files['a']}",
                     "--calibration", f"b={files['b']}", "--int8-metric", "sqnr", "--int8-target-sqnr", "200",
                     "-o", str(out)])
    first = capsys.readouterr().err.splitlines()[0]
    assert code == cli.EXIT_PRECISION_NOT_APPLIED and not out.exists()
    assert "groups a misses, b misses" in first, first
    for group in ("a", "b"):
        row = first.split(f"logits@{group}:sqnr deviation", 1)[1].split(")", 1)[0]
        assert "dB < 200 dB target" in row, first


def test_calibration_is_parsed_once_per_run(files: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    """The flag checks, the guard against overwriting a samples file and the loading all
    use one parse of --calibration (the samples run reaches optimize with both groups)."""
    parses: list[list[str]] = []
    parse = cli._calibration_sources
    monkeypatch.setattr(cli, "_calibration_sources", lambda items: parses.append(list(items)) or parse(items))
    seen: list[list[str]] = []

    def recording(*args, **kwargs):
        seen.append(kwargs["int8_options"]["groups"])
        raise BadInputError("stop here")

    monkeypatch.setattr(cli, "optimize", recording)
    flags = ["--calibration", f"a={files['a']}", "--calibration", f"b={files['b']}"]
    code = cli.main([str(files["model"]), "--int8", *flags, "-o", str(tmp_path / "out.onnx"), "-q"])
    assert code == cli.EXIT_BAD_INPUT and len(parses) == 1
    assert seen == [["a"] * 6 + ["b"] * 6]


def test_compare_says_the_one_sample_note_as_optimize_does(files: dict[str, Path], tmp_path: Path,
                                                           capsys) -> None:
    """`optcc compare --inputs` with a file read as one sample of batch 6 prints the same
    `optcc: note:` line as optimizing does (not a Python warning with its source line), and
    compares the model with itself on that batch: equal outputs (onnx's reference agrees)."""
    batch = tmp_path / "batch.npz"
    images = _images(6, 0, 1.0)[:, 0]
    np.savez(batch, image=images)
    code = cli.main(["compare", str(files["model"]), str(files["model"]), "--inputs", str(batch)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_OK
    assert len(err) == 1 and err[0].startswith(f"optcc: note: {batch}: read as one sample of batch 6"), err
    assert ReferenceEvaluator(str(TINYCNN)).run(None, {"image": images})[0].shape[0] == 6
