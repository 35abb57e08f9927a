"""Weight-only INT8 of convolution models (``--weights int8``), with and without bias correction.

    pip install scikit-image             # the calibration/held-out images of int8_vs_ort.py
    python -m fixtures.corpus            # fetch the corpus models (once)
    python benchmarks/weight_only_conv.py [--models ppocrv4-rec,ppocrv4-det] [--real-lines] [--out FILE.md]

Data: exactly benchmarks/int8_vs_ort.py's (``samples``: 8 calibration samples, seed 0, and
``HELD_OUT`` different held-out samples, seed 1; ``--real-lines`` gives OCR rec/cls whole
text lines of a page instead of random windows). Configurations, each from the original
file with ``optcc.optimize(level=2, verify=False)``:

- ``fp32 -O2``: the float model the others start from;
- ``int8 weights``: ``weight_only="int8"`` (per-channel int8 Conv weights, block-wise int8
  MatMul/Gemm weights, no bias correction);
- ``int8 weights + bc``: the same with the calibration samples (``weight_only={"bits": 8,
  "samples": calib}``): every Conv's bias shifted by its mean output error on them.

Metrics against the original float32 model (onnxruntime, no graph optimization), on the
held-out samples: file size ratio, worst-output SQNR, CTC greedy exact match (rec), the
task metric next to the float model's own noise floor (int8_vs_ort.task_metrics: the
float model moved by one grey level), and the latency ratio against ``fp32 -O2``
(``compare_latency``: interleaved, 2 threads, ORT_ENABLE_ALL), with the number of
DequantizeLinear nodes left in onnxruntime's optimized graph (0: it folded them back to
float weights at session creation).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def ort_dequantize_count(path: Path, folder: Path) -> int:
    """DequantizeLinear nodes in onnxruntime's optimized graph (ORT_ENABLE_ALL, CPU)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(folder / f"{path.stem}.ort.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    return sum(n.op_type == "DequantizeLinear" for n in optimized.graph.node)


def measure(name: str, args: argparse.Namespace, folder: Path) -> list[dict]:
    import onnx

    import optcc
    from int8_vs_ort import HELD_OUT, _prepare_model, ctc_match, samples, task_metrics
    from optcc.quant.fallback import compare_latency, evaluate

    source = _prepare_model(name, folder)
    input_name = onnx.load(source, load_external_data=False).graph.input[0].name
    calib = samples(name, args.calibration_samples, 0, input_name, False, args.real_lines)
    held = samples(name, args.held_out_samples or HELD_OUT[name], 1, input_name, False, args.real_lines)
    reference = optcc.ir.load(str(source))
    configs = {"fp32 -O2": None, "int8 weights": "int8", "int8 weights + bc": {"bits": 8, "samples": calib}}
    rows, paths = [], {}
    for config, weights in configs.items():
        result = optcc.optimize(str(source), weight_only=weights, verify=False)
        path = folder / f"{name}.{config.replace(' ', '_').replace('+', 'p')}.onnx"
        result.save(path)
        paths[config] = path
        stats = next((r.stats for r in result.report.passes if r.name == "quantize-weights"), {})
        candidate = optcc.ir.load(str(path))
        row = {"model": name, "config": config,
               "size_ratio": round(path.stat().st_size / source.stat().st_size, 4),
               "quantized": stats.get("quantized"), "kept_float": stats.get("kept_float"),
               "bias_correction": stats.get("bias_correction"), "reason": stats.get("reason"),
               "sqnr_db": round(evaluate(reference, candidate, held).worst_sqnr_db, 2),
               "task": task_metrics(name, reference, candidate, held, False),
               "ort_dequantize_nodes": ort_dequantize_count(path, folder)}
        if "rec" in name:
            row["ctc_match"] = round(ctc_match(reference, candidate, held), 4)
        if weights is not None:
            timing = compare_latency(optcc.ir.load(str(paths["fp32 -O2"])), candidate, held, threads=2,
                                     rounds=args.runs, runs=5)
            row["latency_ratio_vs_fp32_O2"] = round(timing["ratio"], 3)
            row["latency_spread"] = [round(s, 3) for s in timing["spread"]]
        rows.append(row)
        print(json.dumps(row, default=float), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | config | size | SQNR dB | CTC match | task (deviation / fp32 floor) | latency vs fp32 -O2 "
             "| DQ left by ORT |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        task = "; ".join(f"{k}: {v[0]} / {v[1]}" for k, v in (r.get("task") or {}).items())
        lines.append(f"| {r['model']} | {r['config']} | {r['size_ratio']:.3f}x | {r['sqnr_db']} | "
                     f"{r.get('ctc_match', '')} | {task} | {r.get('latency_ratio_vs_fp32_O2', '')} | "
                     f"{r['ort_dequantize_nodes']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ppocrv4-rec,ppocrv4-det")
    parser.add_argument("--calibration-samples", type=int, default=8)
    parser.add_argument("--held-out-samples", type=int, default=None)
    parser.add_argument("--real-lines", action="store_true")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", help="write the raw rows here")
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args(argv)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="optcc-wo-conv-") as scratch:
        for name in filter(None, args.models.split(",")):
            rows += measure(name, args, Path(scratch))
    text = table(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
