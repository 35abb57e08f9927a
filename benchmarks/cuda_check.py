"""optcc on onnxruntime's CUDA execution provider: verification verdicts, determinism,
numerics and latency, on a machine with a GPU and onnxruntime-gpu.

    python benchmarks/cuda_check.py [--json OUT.json] [--runs 100] [--models NAME,...]

Models: fixtures/tinycnn.onnx, every corpus model already in the fixtures cache or
fetchable (``fixtures.corpus``), and, where torch and transformers import, a MiniLM-sized
BERT with random weights exported by torch (SDPA attention, opset 17; batch 4 of 128
tokens with right padding). Per model:

- numerics of the float32 original on CUDA against CPU float32, largest difference
  relative to the output's largest magnitude: with onnxruntime's defaults (TF32 on,
  exhaustive cuDNN search) and with the options optcc's sessions use
  (``optcc.runtime.providers``); and whether two default sessions agree bit for bit;
- ``optcc.optimize`` at -O2, -O3 and -O2 with float16, verified on CPU and CUDA: the
  verdict, the passes reverted, and (-O2, run twice) whether the two results are the same
  bytes;
- CUDA latency with inputs and outputs bound on the device (median of ``--runs`` after
  warm-up, the variants measured in turn in 5 rounds), each session as a user deploys it
  (onnxruntime's defaults, all graph optimizations on), as a ratio to the original's; and
  each result's SQNR on CUDA against the CPU float32 original.

Without CUDA it exits 0 saying so. Prints a Markdown page (``--page`` writes it); ``--json``
keeps every number, and ``--from-json`` renders earlier runs into a page.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import optcc  # noqa: E402
from optcc import ir as oir  # noqa: E402
from optcc.errors import VerificationError  # noqa: E402
from optcc.numerics import generate_inputs  # noqa: E402
from optcc.runtime import provider_entry  # noqa: E402

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
VERIFY_ON = ["cpu", "cuda"]
DEVICE = "cuda"  # where cuda_latency binds inputs and outputs
VARIANTS = {"O2": dict(level=2), "O3": dict(level=3), "fp16": dict(level=2, fp16=True)}


def models(names: set[str] | None, scratch: Path) -> list[tuple[str, Path, dict[str, np.ndarray] | None]]:
    """(name, path, feeds or None for generated ones) for each model that can be had."""
    found: list[tuple[str, Path, dict[str, np.ndarray] | None]] = [
        ("tinycnn", ROOT / "fixtures" / "tinycnn.onnx", None)]
    try:
        from fixtures import corpus
    except ImportError:
        corpus = None
    if corpus is not None:
        for model in corpus.corpus_models():
            if names is not None and model.name not in names:
                continue
            try:
                path = corpus.fetch(model)
            except Exception as e:  # noqa: BLE001 - offline, or not in this onnx wheel
                print(f"{model.name}: not available ({str(e).splitlines()[0][:120]})", file=sys.stderr)
                continue
            shapes = corpus.input_shapes(model, path)
            feeds = generate_inputs(oir.load(path), shapes)[0]
            found.append((model.name, path, feeds))
    minilm = _random_minilm(scratch) if names is None or "minilm-random" in names else None
    if minilm is not None:
        found.append(minilm)
    return [m for m in found if names is None or m[0] in names]


def _random_minilm(scratch: Path) -> tuple[str, Path, dict[str, np.ndarray]] | None:
    """all-MiniLM-L6-v2's architecture with random weights, exported by torch (None where
    torch or transformers is missing or the export fails)."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    config = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, a, b, c):  # noqa: ANN001, ANN201
            return self.m(input_ids=a, attention_mask=b, token_type_ids=c).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    ids = torch.randint(0, 1000, (2, 16))
    path = scratch / "minilm_random.onnx"
    try:
        torch.onnx.export(Hidden().eval(), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(path),
                          dynamo=False, opset_version=17, input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "b", 1: "s"} for n in [*names, "last_hidden_state"]})
    except Exception as e:  # noqa: BLE001
        print(f"minilm-random: export failed ({str(e).splitlines()[0][:160]})", file=sys.stderr)
        return None
    rng = np.random.default_rng(0)
    batch, seq = 4, 128
    mask = np.ones((batch, seq), np.int64)
    for i in range(1, batch):
        mask[i, seq - 16 * i:] = 0
    feeds = {"input_ids": rng.integers(1000, 30000, (batch, seq)).astype(np.int64), "attention_mask": mask,
             "token_type_ids": np.zeros((batch, seq), np.int64)}
    return "minilm-random", path, feeds


def _session(model: bytes | str, provider: Any, *, optimize: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, options, providers=[provider])


def _relative(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    worst = 0.0
    for g, r in zip(got, ref):
        if not np.issubdtype(r.dtype, np.floating):
            worst = max(worst, float(np.any(g != r)))
            continue
        scale = float(np.max(np.abs(r))) or 1.0
        worst = max(worst, float(np.max(np.abs(g.astype(np.float64) - r.astype(np.float64)))) / scale)
    return worst


def _sqnr(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref if np.issubdtype(r.dtype, np.floating))
    noise = sum(float(np.sum((g.astype(np.float64) - r.astype(np.float64)) ** 2))
                for g, r in zip(got, ref) if np.issubdtype(r.dtype, np.floating))
    return float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)


def _bound(model: bytes | str, feeds: dict[str, np.ndarray]) -> tuple[ort.InferenceSession, Any]:
    """A deployment-configured CUDA session with its inputs and outputs bound on the device."""
    session = _session(model, CUDA, optimize=True)
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, DEVICE, 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, DEVICE)
    for _ in range(5):
        session.run_with_iobinding(binding)
    return session, binding


def cuda_latencies(models: dict[str, bytes | str], feeds: dict[str, np.ndarray], runs: int,
                   rounds: int = 5) -> dict[str, float]:
    """Median seconds of one run per model, the models measured in turn ``rounds`` times
    (``runs`` runs each time), so that a drift in clocks or load reaches them alike."""
    bound = {tag: _bound(model, feeds) for tag, model in models.items()}
    times: dict[str, list[float]] = {tag: [] for tag in bound}
    for _ in range(rounds):
        for tag, (session, binding) in bound.items():
            for _ in range(max(1, runs // rounds)):
                start = time.perf_counter()
                session.run_with_iobinding(binding)
                times[tag].append(time.perf_counter() - start)
    return {tag: statistics.median(values) for tag, values in times.items()}


def _optimize(path: Path, feeds: list[dict[str, np.ndarray]] | None, **options: Any) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        result = optcc.optimize(str(path), providers=VERIFY_ON, inputs=feeds, **options)
        error = None
    except VerificationError as e:
        result, error = e.result, str(e).splitlines()[0][:200]
    except Exception as e:  # noqa: BLE001 - a crash is a finding
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    report = result.report
    verification = report.verification or {}
    data = result.model.SerializeToString()
    return {"seconds": round(seconds, 2), "error": error, "status": verification.get("status"),
            "reference": verification.get("reference"), "providers": verification.get("providers"),
            "reason": verification.get("reason"), "declined": result.declined_precision,
            "reverted": [f"{p.name}: {p.reason}"[:600] for p in report.reverted()],
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": data}


def check(name: str, path: Path, feeds: dict[str, np.ndarray] | None, runs: int, int8: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name}
    if feeds is None:
        feeds = generate_inputs(oir.load(path))[0]
    source = str(path)
    cpu = _session(source, CPU, optimize=False).run(None, feeds)
    default_a = _session(source, CUDA, optimize=False).run(None, feeds)
    default_b = _session(source, CUDA, optimize=False).run(None, feeds)
    precise = _session(source, provider_entry(CUDA), optimize=False).run(None, feeds)
    row["cuda_default_rel"] = _relative(default_a, cpu)
    row["cuda_optcc_rel"] = _relative(precise, cpu)
    row["cuda_default_repeatable"] = all(np.array_equal(a, b) for a, b in zip(default_a, default_b))
    timed: dict[str, bytes | str] = {"original": source}
    own = [feeds] if name.startswith("minilm") else None  # padded token batches: not what generated inputs hold
    variants = dict(VARIANTS)
    if int8:  # generated calibration samples: the speed of INT8 kernels on CUDA, not its accuracy
        variants["int8"] = dict(level=2, int8_calibration=generate_inputs(oir.load(path), _shapes(feeds), samples=8,
                                                                          seed=1))
    for tag, options in variants.items():
        got = _optimize(path, own, **options)
        data = got.pop("bytes", None)
        row[tag] = got
        if data is None:
            continue
        if tag == "O2":
            again = _optimize(path, own, **options)
            again.pop("bytes", None)
            got["same_bytes_twice"] = again.get("sha256") == got["sha256"]
        try:
            out = _session(data, provider_entry(CUDA), optimize=False).run(None, feeds)
            timed[tag] = data
            got["sqnr_cuda_vs_cpu_f32"] = _sqnr(out, cpu)
        except Exception as e:  # noqa: BLE001
            got["run_error"] = str(e).splitlines()[0][:200]
    latency = cuda_latencies(timed, feeds, runs)
    row["latency_original_ms"] = latency.pop("original") * 1e3
    for tag, seconds in latency.items():
        row[tag]["latency_ratio"] = seconds * 1e3 / row["latency_original_ms"]
    return row


def _shapes(feeds: dict[str, np.ndarray]) -> dict[str, list[int]]:
    return {name: list(value.shape) for name, value in feeds.items()}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | CUDA rel. err (default / optcc) | default repeatable | original ms | "
             + " | ".join(f"{t}: verdict, reverted, ×latency, SQNR dB" for t in VARIANTS) + " | -O2 same bytes |",
             "|" + "---|" * (5 + len(VARIANTS))]
    for r in rows:
        cells = [r["model"], f"{r['cuda_default_rel']:.1e} / {r['cuda_optcc_rel']:.1e}",
                 "yes" if r["cuda_default_repeatable"] else "no", f"{r['latency_original_ms']:.2f}"]
        for tag in VARIANTS:
            v = r[tag]
            if v.get("error") and v.get("status") is None:
                declined = v["error"].startswith("PrecisionNotAppliedError")
                cells.append(f"{'declined' if declined else 'crash'}: {v['error'].split(': ', 1)[-1][:60]}")
                continue
            verdict = v.get("status") or "-"
            if v.get("declined"):
                verdict += f" (declined: {', '.join(v['declined'])})"
            cells.append(f"{verdict}, {len(v.get('reverted') or [])}, {v.get('latency_ratio', float('nan')):.2f}, "
                         f"{v.get('sqnr_cuda_vs_cpu_f32', float('nan')):.1f}")
        cells.append("yes" if r["O2"].get("same_bytes_twice") else "no")
        if "int8" in r:
            v = r["int8"]
            cells.append(f"int8: {v.get('status') or v.get('error')}, declined {v.get('declined')}, "
                         f"×{v.get('latency_ratio', float('nan')):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def details(rows: list[dict[str, Any]]) -> list[str]:
    """One line per reverted pass, declined precision, crash or failed model."""
    lines = []
    for r in rows:
        if "failure" in r:
            lines.append(f"- {r['model']}: {r['failure']}")
            continue
        for tag in (*VARIANTS, "int8"):
            v = r.get(tag) or {}
            for what in v.get("reverted") or []:
                lines.append(f"- {r['model']} {tag}: reverted {what[:300]}")
            if v.get("error"):
                lines.append(f"- {r['model']} {tag}: {v['error'][:300]}")
            if v.get("run_error"):
                lines.append(f"- {r['model']} {tag}: the result does not run on CUDA: {v['run_error'][:300]}")
    return lines


def page(runs: list[dict[str, Any]]) -> str:
    """The Markdown page of one or more runs (each as written by ``--json``)."""
    out = ["# optcc on onnxruntime's CUDA execution provider", "",
           "Generated by `benchmarks/cuda_check.py` (see its docstring for what each column measures).", ""]
    for n, run_ in enumerate(runs, 1):
        when = run_.get("measured", "at a time not recorded")
        out += [f"## Run {n}: onnxruntime {run_.get('onnxruntime')}, {run_.get('gpu', 'GPU not recorded')}, "
                f"measured {when}, optcc {run_.get('commit', 'not recorded')}", ""]
        if run_.get("note"):
            out += [run_["note"], ""]
        out += [table([r for r in run_["rows"] if "failure" not in r]), ""]
        out += details(run_["rows"]) + [""]
    return "\n".join(out)


def _provenance() -> dict[str, str]:
    import datetime
    import subprocess

    found = {"measured": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    for key, command in (("commit", ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
                         ("gpu", ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])):
        try:
            found[key] = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip() or "?"
        except OSError:
            pass
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--models", help="comma-separated names (default: all available)")
    parser.add_argument("--int8", default="", help="comma-separated names also quantized to INT8 (calibrated on "
                        "generated samples: for the latency of onnxruntime's INT8 kernels on CUDA)")
    parser.add_argument("--page", type=Path, help="also write the results as a Markdown page")
    parser.add_argument("--from-json", type=Path, nargs="+", help="render earlier --json results (each a run, "
                        "in order) into --page instead of measuring")
    args = parser.parse_args()
    if args.from_json:
        text = page([json.loads(p.read_text()) for p in args.from_json])
        if args.page:
            args.page.write_text(text)
        print(text)
        return
    if CUDA not in ort.get_available_providers():
        print(f"no CUDA execution provider in onnxruntime {ort.__version__}: nothing measured")
        return
    names = set(args.models.split(",")) if args.models else None
    rows: list[dict[str, Any]] = []
    run_ = {"onnxruntime": ort.__version__, **_provenance(), "rows": rows}
    with tempfile.TemporaryDirectory(prefix="optcc-cuda-") as scratch:
        for name, path, feeds in models(names, Path(scratch)):
            print(f"{name} ...", file=sys.stderr, flush=True)
            try:
                rows.append(check(name, path, feeds, args.runs, int8=name in args.int8.split(",")))
            except Exception as e:  # noqa: BLE001 - one model's failure is a row, not the end
                rows.append({"model": name, "failure": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
                print(rows[-1]["failure"], file=sys.stderr)
            if args.json:
                args.json.write_text(json.dumps(run_, indent=1, default=str))
    text = page([json.loads(json.dumps(run_, default=str))])
    if args.page:
        args.page.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
