"""Fit the INT8 speed model's constants for one CPU class (``optcc.quant.cost_model``).

    pip install -e ".[bench]"                                  # scipy, for the least-squares fit
    python -m fixtures.corpus                                  # fetch the corpus models (once)
    python benchmarks/fit_cost_model.py --cpu-class x86-avx2 --json FILE.json     # measure + fit
    python benchmarks/fit_cost_model.py --cpu-class x86-avx2 --from FILE.json     # fit again, no timing

For each model (``fixtures/tinycnn.onnx`` and corpus models), three variants are built as
``quantize_int8`` builds its first candidate: the float model after the INT8 preparation
(opset 13, ``prepare_float``, ``equalize-cross-layer``), minmax calibration on generated
image-like inputs of the model's corpus shape, then ``quantize-int8`` (per-channel int8
weights, uint8 activations) with every layer quantized ("full") and with Add, Mul and
Concat kept float ("keep-float"). Only their sizes and graphs matter to the speed, not
the values, so generated inputs serve.

Timing: the three onnxruntime CPU sessions (default graph optimization level, as a
user's session runs; ``--threads`` intra-op threads) run in one process, interleaved:
``--rounds`` rounds, each running every session ``--runs`` times in a rotating order;
the ratio float32 / INT8 is taken within each round and its median over rounds is the
measured speedup ("spread": the 10th and 90th percentiles of the per-round ratios).
Run it with the machine otherwise idle or at a high priority (``nice -n -10``).

Fit: the float constants of ``CostModel`` are kept; the constants named by ``--free``
(default: the integer MAC rates and the integer bytes, the ones that differ by
instruction set) are fitted by least squares on the log of the speedup over every
variant. It prints the fitted constants as a ``CostModel(...)`` and, per variant, the
modelled speedup under the fitted constants and under the current class's constants
next to the measured one. ``--json`` keeps the features and measurements, so the fit can
be redone (``--from``) without timing anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("tinycnn", "ppocr-mobile-cls", "ppocrv4-rec", "ppocrv4-det", "nudenet-320n", "squeezenet", "shufflenet",
          "resnet50")
VARIANTS = {"full": (), "keep-float": ("Add", "Mul", "Concat")}
ISA_CONSTANTS = ("int8_macs",)


def _model_and_shape(name: str) -> tuple[Path, tuple[int, ...]]:
    if name == "tinycnn":
        return ROOT / "fixtures" / "tinycnn.onnx", (1, 3, 32, 32)
    sys.path.insert(0, str(ROOT))
    from fixtures import corpus

    entry = corpus.find_model(name)
    return Path(corpus.cached_path(entry)), tuple(entry.shapes[0])


def _inputs(model, shape: tuple[int, ...], n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Smooth image-like inputs (normalized to about [-2, 2]) of ``shape``."""
    rng = np.random.default_rng(seed)
    name = model.graph.inputs[0].name
    out = []
    for _ in range(n):
        coarse = rng.uniform(0.0, 1.0, (*shape[:2], max(shape[2] // 8, 1), max(shape[3] // 8, 1)))
        image = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)[:, :, :shape[2], :shape[3]]
        image = image + rng.normal(0, 0.05, image.shape)
        out.append({name: ((image - 0.45) / 0.25).astype(np.float32)})
    return out


def build(name: str, samples: int) -> dict:
    """The float model and its INT8 variants, with the cost model's features of each."""
    from optcc import ir as oir
    from optcc.infra.registry import create_pass
    from optcc.quant.calibration import calibrate
    from optcc.quant.cost_model import element_counts, features
    from optcc.quant.driver import prepare_float, upgrade_opset

    path, shape = _model_and_shape(name)
    model = oir.load(str(path))
    model, _ = upgrade_opset(model, 13)
    prepare_float(model)
    create_pass("equalize-cross-layer")(model)
    feeds = _inputs(model, shape, samples, seed=0)
    calibration = calibrate(model, feeds, "minmax")
    counts = element_counts(calibration.stats)
    models = {"float32": model}
    for variant, exclude in VARIANTS.items():
        quantize = create_pass("quantize-int8", ranges=calibration.ranges, per_channel=True,
                               activation_type="uint8", exclude=list(exclude), count_fused=False)
        models[variant] = quantize(model.clone()).model
    return {"models": models, "feeds": feeds[0],
            "features": {key: features(m, counts)[0] for key, m in models.items()}}


def measure(models: dict, feeds: dict, threads: int, rounds: int, runs: int) -> dict:
    """Interleaved timing (module doc): per INT8 variant, the median float32/INT8 ratio
    over rounds and its 10th/90th percentiles; per model, the median seconds."""
    from optcc.quant.fallback import _session

    keys = list(models)
    sessions = {k: _session(models[k], "all", threads=threads) for k in keys}
    for k in keys:
        for _ in range(3):
            sessions[k].run(None, feeds)
    per_round: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                sessions[k].run(None, feeds)
                times.append(time.perf_counter() - start)
            per_round[k].append(float(np.median(times)))
    base = np.array(per_round["float32"])
    result = {"seconds": {k: float(np.median(v)) for k, v in per_round.items()}, "speedup": {}}
    for k in keys[1:]:
        ratios = base / np.array(per_round[k])
        result["speedup"][k] = {"median": float(np.median(ratios)), "p10": float(np.percentile(ratios, 10)),
                                "p90": float(np.percentile(ratios, 90))}
    return result


def modelled(f: dict, constants) -> float:
    from optcc.quant.cost_model import FEATURES

    return sum(f[n] * getattr(constants, n) for n in FEATURES)


def fit(rows: list[dict], start, free: tuple[str, ...]):
    """``start`` with the ``free`` constants fitted (least squares on log speedup)."""
    from scipy.optimize import least_squares

    points = [(row["features"]["float32"], row["features"][v], np.log(row["measured"]["speedup"][v]["median"]))
              for row in rows for v in VARIANTS]

    def constants(theta: np.ndarray):
        return dataclasses.replace(start, **{n: float(np.exp(t)) for n, t in zip(free, theta)})

    def residuals(theta: np.ndarray) -> np.ndarray:
        c = constants(theta)
        return np.array([np.log(modelled(fl, c) / modelled(q, c)) - m for fl, q, m in points])

    theta0 = np.log([getattr(start, n) for n in free])
    solution = least_squares(residuals, theta0, bounds=(theta0 - 6, theta0 + 6))
    return constants(solution.x), float(np.sqrt(np.mean(solution.fun ** 2)))


def _rate(seconds: float) -> str:
    return f"1 / {1 / seconds:.3g}"


def report(rows: list[dict], fitted, current, cpu_class: str, rms: float) -> str:
    lines = [f"fitted constants for {cpu_class} (rms log error {rms:.3f}):", "CostModel("]
    for field in dataclasses.fields(fitted):
        value = getattr(fitted, field.name)
        rate = field.name.endswith(("macs", "bytes", "elements"))  # per unit: written as 1 / rate
        lines.append(f"    {field.name}={_rate(value) if rate else repr(value)},")
    lines += [")", "", f"| model | variant | measured speedup (p10-p90) | modelled, fitted | modelled, {cpu_class} now "
                       "| float32 ms measured | float32 ms modelled |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        f, m = row["features"], row["measured"]
        for v in VARIANTS:
            s = m["speedup"][v]
            lines.append(f"| {row['model']} | {v} | {s['median']:.2f} ({s['p10']:.2f}-{s['p90']:.2f}) | "
                         f"{modelled(f['float32'], fitted) / modelled(f[v], fitted):.2f} | "
                         f"{modelled(f['float32'], current) / modelled(f[v], current):.2f} | "
                         f"{1e3 * m['seconds']['float32']:.2f} | {1e3 * modelled(f['float32'], fitted):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-class", required=True, help="the class the measurements are for (optcc.quant.cost_model)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--json", help="write the features and measurements here")
    p.add_argument("--from", dest="source", help="fit from this JSON instead of measuring")
    p.add_argument("--free", default=",".join(ISA_CONSTANTS), help="the constants to fit")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--samples", type=int, default=4, help="calibration samples (sizes only)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from optcc.quant.cost_model import CPU_CLASSES, CostModel

    if args.source:
        data = json.loads(Path(args.source).read_text())
        rows = data["rows"]
    else:
        import onnxruntime

        rows = []
        for name in args.models.split(","):
            built = build(name, args.samples)
            measured = measure(built["models"], built["feeds"], args.threads, args.rounds, args.runs)
            rows.append({"model": name, "features": built["features"], "measured": measured})
            print(name, {k: round(v["median"], 3) for k, v in measured["speedup"].items()}, file=sys.stderr, flush=True)
        data = {"cpu_class": args.cpu_class, "machine": platform.processor() or platform.machine(),
                "onnxruntime": onnxruntime.__version__, "threads": args.threads, "rounds": args.rounds,
                "runs": args.runs, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
        if args.json:
            Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    current = CPU_CLASSES.get(args.cpu_class, CostModel())
    fitted, rms = fit(rows, current, tuple(args.free.split(",")))
    print(report(rows, fitted, current, args.cpu_class, rms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
