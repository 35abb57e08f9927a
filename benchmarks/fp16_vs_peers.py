"""optcc's ConvertFloat16Pass against onnxconverter-common's convert_float_to_float16.

    python benchmarks/fp16_vs_peers.py [NAME ...] [--runs 20]

For each corpus model (``fixtures.corpus``; falls back to the onnx wheel's light models
and fixtures/tinycnn.onnx when the corpus module is missing): validity (onnx checker),
loads in onnxruntime CPU, NaN/Inf in outputs, SQNR vs float32 on a realistic input
(scikit-image's astronaut for vision models, a crop of ``page()`` for OCR rec/cls), file
size ratio (beside the best possible one: all float32 weight data halved, the rest of the file
as it is), and onnxruntime CPU latency beside float32 (median of ``--runs``). optcc's own
emulated-float16 SQNR (what a GPU computing in float16 would see; see docs/fp16.md) is
printed beside the CPU one. Prints a Markdown table. No GPU here: CUDA latency is not
measured. Needs: pip install onnxconverter-common scikit-image.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import optcc  # noqa: E402
from optcc.passes.convert_float16 import ConvertFloat16Pass  # noqa: E402
from optcc.runtime.latency import median_seconds  # noqa: E402
from optcc.fp16.ranges import sqnr_db  # noqa: E402


def models() -> list[tuple[str, Path, dict[str, list[int]]]]:
    found = []
    try:
        from fixtures import corpus
    except ImportError:
        corpus = None
    if corpus is not None:
        for model in corpus.corpus_models():
            try:
                path = corpus.fetch(model)
                found.append((model.name, Path(path), corpus.input_shapes(model, path)))
            except Exception as e:  # noqa: BLE001 - offline: say so and go on
                print(f"skip {model.name}: {e}", file=sys.stderr)
    found.append(("tinycnn", ROOT / "fixtures" / "tinycnn.onnx", {"image": [1, 3, 32, 32]}))
    return found


def realistic_input(name: str, shape: list[int]) -> np.ndarray:
    import skimage.data
    import skimage.transform

    n, c, h, w = shape
    if "rec" in name or "cls" in name:  # OCR: a text line from a scanned page, [-1, 1]
        page = skimage.data.page().astype(np.float32) / 255.0
        crop = page[40:40 + h * 2, 20:20 + w * 2]
        img = skimage.transform.resize(crop, (h, w), anti_aliasing=True)
        img = (img - 0.5) / 0.5
        x = np.repeat(img[None], c, axis=0)
    else:  # vision: the astronaut photo, ImageNet normalization
        photo = skimage.data.astronaut().astype(np.float32) / 255.0
        img = skimage.transform.resize(photo, (h, w), anti_aliasing=True)
        mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
        img = (img - mean) / std
        x = img.transpose(2, 0, 1)[:c]
    return np.broadcast_to(x, (n, c, h, w)).astype(np.float32).copy()


def float32_weight_share(proto: onnx.ModelProto) -> float:
    """The share of the file that float32 weight data (initializers, Constants, in every
    graph) takes: the best float16 size ratio is 1 - share / 2."""
    total = sum(4 * math.prod(t.dims) for t in optcc.ir.tensor_protos(proto.graph)
                if t.data_type == onnx.TensorProto.FLOAT)
    return total / max(1, proto.ByteSize())


def session(data: bytes, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def latency_ms(sess: ort.InferenceSession, feeds: dict, runs: int) -> float:
    return median_seconds(sess, feeds, runs=runs, warmup=1) * 1000


def judge(data: bytes, ref: list[np.ndarray], feeds: dict, runs: int) -> dict:
    row: dict = {"size": len(data)}
    try:
        onnx.checker.check_model(onnx.load_from_string(data))
        row["valid"] = "yes"
    except Exception as e:  # noqa: BLE001
        row["valid"] = f"no ({str(e).splitlines()[0][:60]})"
    try:
        exact = session(data, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        outs = exact.run(None, feeds)
    except Exception as e:  # noqa: BLE001
        row["loads"] = f"no ({str(e).splitlines()[0][:80]})"
        return row
    row["loads"] = "yes"
    floats = [np.asarray(o) for o in outs if np.issubdtype(np.asarray(o).dtype, np.floating)]
    row["nonfinite"] = int(sum(np.count_nonzero(~np.isfinite(o.astype(np.float64))) for o in floats))
    row["sqnr"] = min((sqnr_db(r, np.asarray(o)) for r, o in zip(ref, outs)
                       if np.issubdtype(np.asarray(r).dtype, np.floating)), default=math.nan)
    row["ms"] = latency_ms(session(data, ort.GraphOptimizationLevel.ORT_ENABLE_ALL), feeds, runs)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    from onnxconverter_common import float16

    print("| model | tool | valid | loads ORT CPU | NaN/Inf | SQNR CPU dB | SQNR emulated f16 dB "
          "| size ratio (best possible) | CPU ms (fp32 ms) | kept fp32 / fallback |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, path, shapes in models():
        if args.names and name not in args.names:
            continue
        proto = onnx.load(str(path))
        feeds = {k: realistic_input(name, v) for k, v in shapes.items()}
        data32 = proto.SerializeToString()
        best = 1 - float32_weight_share(proto) / 2
        ref = session(data32, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, feeds)
        base_ms = latency_ms(session(data32, ort.GraphOptimizationLevel.ORT_ENABLE_ALL), feeds, args.runs)
        start = time.perf_counter()
        try:
            result = optcc.optimize(proto, passes=[ConvertFloat16Pass(inputs=[feeds])], verify=False)
            stats = result.report.passes[0].stats
            ours = (optcc.ir.serialize(result.ir_model).SerializeToString(), stats)
        except Exception as e:  # noqa: BLE001
            ours = (None, {"error": str(e)[:80]})
        took = time.perf_counter() - start
        try:
            peer = float16.convert_float_to_float16(proto, keep_io_types=True).SerializeToString()
        except Exception as e:  # noqa: BLE001
            peer = None
            print(f"| {name} | onnxconverter-common | failed: {str(e)[:60]} |||||||")
        for tool, data, stats in (("optcc", ours[0], ours[1]), ("onnxconverter-common", peer, {})):
            if data is None:
                if tool == "optcc":
                    print(f"| {name} | optcc | failed: {stats.get('error')} |||||||")
                continue
            row = judge(data, ref, feeds, args.runs)
            emulated = stats.get("sqnr_db", {})
            em = min((float(v) for v in emulated.values()), default=math.nan) if emulated else math.nan
            extra = (f"{len(stats.get('kept_float32', {}))} / {len(stats.get('returned_to_float32', []))}"
                     f" ({took:.0f}s)" if tool == "optcc" else "")
            print(f"| {name} | {tool} | {row['valid']} | {row['loads']} | {row.get('nonfinite', '-')} "
                  f"| {row.get('sqnr', math.nan):.1f} | {em:.1f} | {row['size'] / len(data32):.3f} ({best:.3f}) "
                  f"| {row.get('ms', math.nan):.2f} ({base_ms:.2f}) | {extra} |", flush=True)
    print("\nBest possible = every float32 weight stored in float16 and nothing else changed."
          "\nCUDA latency: not measured (no GPU on this machine).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
