"""Compare optcc -O2 with peer ONNX optimizers on the real-model corpus.

    python benchmarks/compare_peers.py [--models NAME ...] [--tools TOOL ...] [--out docs/benchmarks.md]

For every corpus model (fixtures/corpus.py) and every tool, in one run:

- optimize: a fresh subprocess loads the model, optimizes it and saves the result
  (imports done before the clock starts; ``--repeat N`` times, the fastest counting); its wall time, and its peak RSS as the kernel
  reports it for that child (``os.wait4`` rusage), are recorded; a crash, an exception or
  a timeout is recorded in the table, never fatal;
- evaluate: another fresh subprocess counts the nodes (subgraphs and functions included)
  and file bytes, checks the file with onnx.checker, runs it on onnxruntime CPU with the
  same seeded random inputs as the original, records the max abs output difference vs the
  original (both with ORT_DISABLE_ALL) and the median latency over ``--runs`` runs (one
  thread) with graph optimizations disabled and with all enabled.

Tools: optcc (-O2, in-process, no verification so the time is the optimizer's own),
onnxsim (``onnxsim.simplify`` defaults), onnxslim (``onnxslim.slim`` defaults),
onnxoptimizer (``onnxoptimizer.optimize`` default passes), ort-extended (onnxruntime's
offline optimizer: ``optimized_model_filepath`` with ORT_ENABLE_EXTENDED, CPU EP). The
"original" row is the unoptimized model. Peers: ``pip install -e .[bench]``; a peer that is
not installed is reported as unavailable.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOOLS = ["optcc", "optcc-verified", "optcc-fold-large", "onnxsim", "onnxslim", "onnxoptimizer", "ort-extended"]
TOOL_MODULES = {
    "optcc": "optcc",
    "optcc-verified": "optcc",
    "optcc-fold-large": "optcc",
    "onnxsim": "onnxsim",
    "onnxslim": "onnxslim",
    "onnxoptimizer": "onnxoptimizer",
    "ort-extended": "onnxruntime",
}
# torch: onnxsim imports it when it is installed, which adds ~180 MiB to onnxsim's peak RSS
DISTRIBUTIONS = ["optcc", "onnx", "onnx-ir", "onnxruntime", "numpy", "onnxsim", "onnxslim", "onnxoptimizer", "torch"]
WARMUP_RUNS = 3


# =========================================================================== workers
# Each runs in its own process: ``compare_peers.py --_worker SPEC_JSON``.


def _optimize_worker(tool: str, source: str, target: str, shapes: dict[str, list[int]], repeat: int) -> dict[str, Any]:
    """Load, optimize and save with ``tool`` ``repeat`` times in this process; the fastest
    run's wall time counts, and the least CPU time (``cpu_s``: every thread of this process,
    onnxruntime's included) of any run, which other processes on the machine disturb less."""
    if tool == "optcc-verified":  # its ratio to the unverified time: both measured here, interleaved
        pairs = [(_optimize_once("optcc", source, target, shapes), _optimize_once(tool, source, target, shapes))
                 for _ in range(repeat)]
        verified = [run for _, run in pairs]
        best = min(verified, key=lambda r: r["time_s"])
        return {**best, "cpu_s": min(r["cpu_s"] for r in verified),
                "unverified_time_s": min(plain["time_s"] for plain, _ in pairs)}
    runs = [_optimize_once(tool, source, target, shapes) for _ in range(repeat)]
    return {**min(runs, key=lambda r: r["time_s"]), "cpu_s": min(r["cpu_s"] for r in runs)}


def _optimize_once(tool: str, source: str, target: str, shapes: dict[str, list[int]]) -> dict[str, Any]:
    """Load, optimize and save with ``tool``; imports happen before the clock starts, and
    so does a garbage collection: each run starts from a heap without the previous run's
    garbage (onnx-ir models are reference cycles, freed only by a collection), so that the
    peak RSS is one run's and not the sum of the runs' leftovers."""
    import gc

    import onnx
    import onnxruntime as ort

    gc.collect()

    if tool.startswith("optcc"):
        import optcc
        from optcc.infra.registry import available_passes

        available_passes()  # imports the pass modules (import time is excluded for every tool)

        options: dict[str, Any] = {"verify": tool == "optcc-verified", "fold_large": tool == "optcc-fold-large"}
        start, cpu = time.perf_counter(), time.process_time()
        result = optcc.optimize(source, level=2, input_shapes=shapes, **options)
        result.save(target)
        reverted = [f"{p.name}: {p.reason}" for p in result.report.reverted()]
        return {"time_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, "reverted": reverted}
    elif tool == "onnxsim":
        import onnxsim

        start, cpu = time.perf_counter(), time.process_time()
        simplified, ok = onnxsim.simplify(onnx.load(source))
        if not ok:
            raise RuntimeError("onnxsim.simplify reported its check failed")
        onnx.save(simplified, target)
    elif tool == "onnxslim":
        import onnxslim

        start, cpu = time.perf_counter(), time.process_time()
        slimmed = onnxslim.slim(onnx.load(source))
        onnx.save(slimmed, target)
    elif tool == "onnxoptimizer":
        import onnxoptimizer

        start, cpu = time.perf_counter(), time.process_time()
        onnx.save(onnxoptimizer.optimize(onnx.load(source)), target)
    elif tool == "ort-extended":
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = target
        options.log_severity_level = 3
        start, cpu = time.perf_counter(), time.process_time()
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    else:
        raise ValueError(f"unknown tool {tool!r}")
    return {"time_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}


def _file_bytes(path: Path, model: Any) -> int:
    """The model file plus the external data files it references."""
    import onnx

    from optcc.ir import tensor_protos

    files = {path.resolve()}
    for tensor in tensor_protos(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            files.add((path.parent / info["location"]).resolve())
    return sum(f.stat().st_size for f in files if f.is_file())


def _session(path: str, level: Any, ort: Any) -> Any:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _median_ms(session: Any, feeds: dict[str, Any], runs: int) -> float:
    from optcc.runtime.latency import median_seconds  # here: peers' processes do not import optcc

    return median_seconds(session, feeds, runs=runs, warmup=WARMUP_RUNS) * 1000.0


def _max_rel_diff(reference: list[Any], got: list[Any]) -> float | None:
    """The verifier's max rel (max |diff| / max |original| per output), worst output."""
    from optcc.numerics import Tolerance, compare_outputs

    rels = [compare_outputs("", "", ref, out, Tolerance()).max_rel for ref, out in zip(reference, got)]
    return max((r for r in rels if r is not None), default=0.0)


def _max_abs_diff(reference: list[Any], got: list[Any]) -> float | str:
    import numpy as np

    if len(reference) != len(got):
        return f"{len(got)} outputs, original has {len(reference)}"
    worst = 0.0
    for ref, out in zip(reference, got):
        if ref.shape != out.shape:
            return f"shape {out.shape} != {ref.shape}"
        r, g = ref.astype(np.float64), out.astype(np.float64)
        if not np.array_equal(np.isnan(r), np.isnan(g)):
            return "NaN mismatch"
        finite = np.isfinite(r) & np.isfinite(g)
        if np.any((r != g) & ~finite & ~np.isnan(r)):
            return "Inf mismatch"
        if finite.any():
            worst = max(worst, float(np.max(np.abs(r[finite] - g[finite]))))
    return worst


def _evaluate_worker(model: str, feeds_path: str, reference: str, save_reference: bool, runs: int) -> dict[str, Any]:
    """Structure, validity, output difference vs the original and latency of one model."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from optcc.ir import proto_graphs

    proto = onnx.load(model, load_external_data=False)
    nodes = sum(len(g.node) for g in proto_graphs(proto.graph)) + sum(len(f.node) for f in proto.functions)
    result: dict[str, Any] = {
        "nodes": nodes,
        "bytes": _file_bytes(Path(model), proto),
    }
    try:
        onnx.checker.check_model(model)
        result["checker"] = "ok"
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        result["checker"] = _one_line(e)
    with np.load(feeds_path) as data:
        feeds = {k: data[k] for k in data.files}
    plain = _session(model, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort)
    outputs = [np.asarray(o) for o in plain.run(None, feeds)]
    if save_reference:
        np.savez(reference, *outputs)
    else:
        with np.load(reference) as data:
            expected = [data[f"arr_{i}"] for i in range(len(data.files))]
        result["max_abs"] = _max_abs_diff(expected, outputs)
        result["max_rel"] = _max_rel_diff(expected, outputs)
    result["latency_off_ms"] = _median_ms(plain, feeds, runs)
    del plain
    full = _session(model, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort)
    result["latency_all_ms"] = _median_ms(full, feeds, runs)
    return result


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text[:160]


def _worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        if spec["mode"] == "optimize":
            result = _optimize_worker(spec["tool"], spec["source"], spec["target"], spec["shapes"], spec["repeat"])
        else:
            result = _evaluate_worker(
                spec["model"], spec["feeds"], spec["reference"], spec["save_reference"], spec["runs"]
            )
        status = 0
    except Exception as e:  # noqa: BLE001 - reported to the parent
        result, status = {"error": _one_line(e)}, 1
    result["peak_rss_bytes"] = _vm_hwm(os.getpid())
    Path(spec["result"]).write_text(json.dumps(result))
    return status


def _vm_hwm(pid: int) -> int | None:
    """Peak RSS of a live process's current image (Linux VmHWM), None where unknown.

    Unlike ru_maxrss, VmHWM starts afresh at exec, so it does not include the parent's
    memory that a forked child carries until it execs."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# =========================================================================== parent


@dataclasses.dataclass
class ChildOutcome:
    result: dict[str, Any] | None
    problem: str | None  # crash / timeout / exception, in a few words
    peak_rss_bytes: int | None


def run_child(spec: dict[str, Any], workdir: Path, timeout_s: float) -> ChildOutcome:
    """Run one worker in a fresh process. Its peak RSS: the VmHWM it reports when it ends,
    else the last VmHWM polled while it ran (crash, timeout), else ``os.wait4``'s ru_maxrss
    (not Linux; an upper bound that includes the parent's memory at fork)."""
    result_path = workdir / f"result-{time.monotonic_ns()}.json"
    log_path = result_path.with_suffix(".log")
    spec = {**spec, "result": str(result_path)}
    command = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    timed_out = False
    polled_rss = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        polled_rss = _vm_hwm(proc.pid) or polled_rss
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(proc.pid, 0)
            timed_out = True
            break
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    rss = (result or {}).pop("peak_rss_bytes", None) or polled_rss
    if rss is None:
        rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    if timed_out:
        return ChildOutcome(None, f"timeout ({timeout_s:g} s)", rss)
    if result is not None and "error" in result:
        return ChildOutcome(None, f"error: {result['error']}", rss)
    if proc.returncode < 0:
        return ChildOutcome(None, f"crash ({signal.Signals(-proc.returncode).name})", rss)
    if proc.returncode != 0 or result is None:
        tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        return ChildOutcome(None, f"exit {proc.returncode}: {(tail or [''])[-1][:120]}", rss)
    return ChildOutcome(result, None, rss)


@dataclasses.dataclass
class Row:
    model: str
    tool: str
    status: str = "ok"
    nodes: int | None = None
    bytes: int | None = None
    time_s: float | None = None
    cpu_s: float | None = None  # the least CPU time of the repeats (``_optimize_worker``)
    peak_rss_bytes: int | None = None
    max_abs: float | str | None = None
    max_rel: float | None = None
    latency_off_ms: float | None = None
    latency_all_ms: float | None = None
    checker: str | None = None
    reverted: list[str] = dataclasses.field(default_factory=list)
    unverified_time_s: float | None = None  # optcc-verified: the unverified time, same process


def benchmark_inputs(name: str, model: Any, shapes: dict[str, list[int]]) -> dict[str, Any]:
    """A real photo (a text-line crop for the OCR recognizer/classifier) for single-image
    models, as fp16_vs_peers.py uses; seeded random inputs for anything else. Random
    inputs drive detectors to near-zero outputs, where relative differences say little."""
    from fp16_vs_peers import realistic_input

    from optcc.numerics import generate_inputs

    feeds = generate_inputs(model, shapes, samples=1, seed=0)[0]
    if len(feeds) == 1:
        (input_name, array), = feeds.items()
        if array.ndim == 4 and array.shape[1] == 3 and array.dtype.kind == "f":
            feeds[input_name] = realistic_input(name, list(array.shape))
    return feeds


def benchmark_model(name: str, tools: Sequence[str], runs: int, timeout_s: float, workdir: Path,
                    repeat: int = 1) -> list[Row]:
    """All rows for one corpus model: the original, then one per tool."""
    import numpy as np

    import optcc
    from fixtures.corpus import CorpusUnavailable, fetch, find_model, input_shapes

    entry = find_model(name)
    try:
        path = fetch(entry)
    except CorpusUnavailable as e:
        return [Row(name, "original", status=f"unavailable: {e}")]
    shapes = input_shapes(entry, path)
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    feeds = benchmark_inputs(name, optcc.ir.load(path), shapes)
    feeds_path, reference = folder / "feeds.npz", folder / "reference.npz"
    np.savez(feeds_path, **feeds)

    def evaluate(row: Row, model: Path, save_reference: bool) -> None:
        spec = {
            "mode": "evaluate", "model": str(model), "feeds": str(feeds_path),
            "reference": str(reference), "save_reference": save_reference, "runs": runs,
        }  # fmt: skip
        outcome = run_child(spec, folder, timeout_s)
        if outcome.problem:
            row.status = f"evaluate {outcome.problem}"
            return
        res = outcome.result or {}
        row.nodes, row.bytes, row.checker = res["nodes"], res["bytes"], res["checker"]
        row.max_abs, row.max_rel = res.get("max_abs"), res.get("max_rel")
        row.latency_off_ms, row.latency_all_ms = res["latency_off_ms"], res["latency_all_ms"]
        if row.checker != "ok":
            row.status = f"onnx.checker: {row.checker}"

    original = Row(name, "original")
    evaluate(original, path, save_reference=True)
    rows = [original]
    if not reference.exists():
        return rows + [Row(name, t, status="skipped: the original does not run") for t in tools]
    for tool in tools:
        row = Row(name, tool)
        rows.append(row)
        if importlib.util.find_spec(TOOL_MODULES[tool]) is None:
            row.status = f"unavailable ({TOOL_MODULES[tool]} not installed)"
            continue
        target = folder / f"{tool}.onnx"
        spec = {"mode": "optimize", "tool": tool, "source": str(path), "target": str(target), "shapes": shapes,
                "repeat": repeat}
        outcome = run_child(spec, folder, timeout_s)
        row.peak_rss_bytes = outcome.peak_rss_bytes
        if outcome.problem:
            row.status = outcome.problem
            continue
        row.time_s = (outcome.result or {})["time_s"]
        row.cpu_s = (outcome.result or {}).get("cpu_s")
        row.reverted = (outcome.result or {}).get("reverted", [])
        row.unverified_time_s = (outcome.result or {}).get("unverified_time_s")
        evaluate(row, target, save_reference=False)
    return rows


# =========================================================================== report


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if kind == "bytes":
        return f"{value / 1e6:.2f} MB" if value >= 1e5 else f"{value / 1e3:.1f} kB"
    if kind == "rss":
        return f"{value / 2**20:.0f} MiB"
    if kind == "s":
        return f"{value:.3f}"
    if kind == "ms":
        return f"{value:.2f}"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "diff":
        return "0" if value == 0 else f"{value:.1e}"
    return str(value)


def markdown_table(rows: Sequence[Row]) -> str:
    header = (
        "| model | tool | status | nodes | size | optimize s | peak RSS | max rel diff "
        "| ORT off ms | ORT all ms |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for r in rows:
        status = r.status if len(r.status) <= 90 else r.status[:89] + "…"
        status = status.replace("|", "\\|")
        lines.append(
            f"| {r.model} | {r.tool} | {status} | {_fmt(r.nodes, 'n')} | {_fmt(r.bytes, 'bytes')} "
            f"| {_fmt(r.time_s, 's')} | {_fmt(r.peak_rss_bytes, 'rss')} | {_fmt(r.max_rel if isinstance(r.max_abs, (int, float)) else r.max_abs, 'diff')} "
            f"| {_fmt(r.latency_off_ms, 'ms')} | {_fmt(r.latency_all_ms, 'ms')} |"
        )
    return "\n".join(lines)


def summary_table(rows: Sequence[Row], tools: Sequence[str]) -> str:
    """Per tool, over the models where it succeeded: geometric means of the ratios to the
    original (nodes, ORT-off latency, ORT-all latency) and the total optimize time."""
    originals = {r.model: r for r in rows if r.tool == "original" and r.status == "ok"}
    lines = [
        "| tool | models ok | nodes vs original | ORT off latency vs original "
        "| ORT all latency vs original | total optimize s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for tool in tools:
        ok = [r for r in rows if r.tool == tool and r.status == "ok" and r.model in originals]
        attempted = [r for r in rows if r.tool == tool]

        def geomean(attr: str) -> str:
            ratios = [getattr(r, attr) / getattr(originals[r.model], attr) for r in ok]
            ratios = [x for x in ratios if x > 0]
            return f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}" if ratios else "—"

        total = sum(r.time_s or 0.0 for r in ok)
        lines.append(
            f"| {tool} | {len(ok)}/{len(attempted)} | {geomean('nodes')} | {geomean('latency_off_ms')} "
            f"| {geomean('latency_all_ms')} | {total:.2f} |"
        )
    return "\n".join(lines)


NODE_PEERS = ("onnxsim", "onnxslim")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets_section(rows: Sequence[Row]) -> str:
    """The graph-passes issue's targets, computed from this run: per model, optcc's node
    counts (default, as verified by default, with --fold-large) against the smaller of
    onnxsim's and onnxslim's (valid or not), its time and peak RSS against onnxsim's."""
    by = {(r.model, r.tool): r for r in rows}
    models = [r.model for r in rows if r.tool == "original"]
    lines = [
        "| model | optcc nodes | verified nodes | --fold-large nodes | min(onnxsim, onnxslim) "
        "| optcc max rel | time / onnxsim | verified time / onnxsim | peak RSS / onnxsim "
        "| verified time / unverified | reverted with verification |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    counts = {"optcc": 0, "optcc-verified": 0, "optcc-fold-large": 0}
    within5 = dict.fromkeys(counts, 0)
    time_ratios, verified_ratios, cpu_ratios, rss_ok, matched, compared = [], [], [], 0, 0, 0
    verify_ratios: list[float] = []
    for model in models:
        get = lambda tool: by.get((model, tool)) or Row(model, tool, status="missing")  # noqa: E731
        peer_nodes = [get(t).nodes for t in NODE_PEERS if get(t).nodes is not None]
        best = min(peer_nodes) if peer_nodes else None
        for tool in counts:
            nodes = get(tool).nodes
            if best is not None and nodes is not None:
                counts[tool] += nodes <= best
                within5[tool] += nodes <= 1.05 * best
        optcc, sim = get("optcc"), get("onnxsim")
        t = _ratio(optcc.time_s, sim.time_s) if sim.status == "ok" else None
        m = _ratio(optcc.peak_rss_bytes, sim.peak_rss_bytes) if sim.status == "ok" else None
        tv = _ratio(get("optcc-verified").time_s, sim.time_s) if sim.status == "ok" else None
        if t is not None:
            time_ratios.append(t)
        if tv is not None:
            verified_ratios.append(tv)
        if sim.status == "ok" and (c := _ratio(get("optcc-verified").cpu_s, sim.cpu_s)) is not None:
            cpu_ratios.append((c, model))
        if m is not None:
            compared += 1
            rss_ok += m <= 1.0
        matched += optcc.status == "ok" and optcc.max_rel is not None and optcc.max_rel <= 1e-4
        reverted = "; ".join(get("optcc-verified").reverted) or "none"
        v = _ratio(get("optcc-verified").time_s, get("optcc-verified").unverified_time_s)
        if v is not None:
            verify_ratios.append(v)
        lines.append(
            f"| {model} | {_fmt(optcc.nodes, 'n')} | {_fmt(get('optcc-verified').nodes, 'n')} "
            f"| {_fmt(get('optcc-fold-large').nodes, 'n')} | {_fmt(best, 'n')} | {_fmt(optcc.max_rel, 'diff')} "
            f"| {_fmt(t, 'x')} | {_fmt(tv, 'x')} | {_fmt(m, 'x')} | {_fmt(v, 'x')} "
            f"| {reverted.replace('|', '/')[:120]} |"
        )
    n = len(models)
    sim_times = sorted(r.time_s for r in rows if r.tool == "onnxsim" and r.time_s is not None)
    our_times = sorted(r.time_s for r in rows if r.tool == "optcc" and r.time_s is not None)
    median = lambda xs: xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2  # noqa: E731
    bullets = [
        f"- Valid and within 1e-4 relative of the original (real-photo inputs): optcc {matched}/{n}.",
        "- Nodes <= min(onnxsim, onnxslim): "
        + ", ".join(f"{tool} {counts[tool]}/{n} (within 5%: {within5[tool]}/{n})" for tool in counts) + ".",
    ]
    if time_ratios and sim_times and our_times:
        bullets.append(
            f"- Optimize time without verification: median optcc {median(our_times):.3f} s vs onnxsim {median(sim_times):.3f} s; "
            f"per-model ratio median {median(sorted(time_ratios)):.2f}, worst {max(time_ratios):.2f} "
            f"(over 2: {sum(r > 2 for r in time_ratios)})."
        )
    if verified_ratios:
        bullets.append(
            f"- Optimize time with default verification / onnxsim's: per-model ratio median "
            f"{median(sorted(verified_ratios)):.2f}, worst {max(verified_ratios):.2f}, over 2 on "
            f"{sum(r > 2 for r in verified_ratios)}/{len(verified_ratios)} models "
            f"(target: <= 1 in the median and <= 2 on every model)."
        )
    if cpu_ratios:
        worst, worst_model = max(cpu_ratios)
        bullets.append(
            f"- The same in CPU time (every thread of the optimizing process, which other processes on "
            f"the machine disturb less than wall time): per-model ratio median "
            f"{median(sorted(c for c, _ in cpu_ratios)):.2f}, worst {worst:.2f} ({worst_model}), over 2 on "
            f"{sum(c > 2 for c, _ in cpu_ratios)}/{len(cpu_ratios)} models."
        )
    bullets.append(f"- Peak RSS <= onnxsim's: {rss_ok}/{compared} models.")
    if verify_ratios:
        bullets.append(
            f"- Optimize time with default verification / without: at most 1.5x on "
            f"{sum(v <= 1.5 for v in verify_ratios)}/{len(verify_ratios)} models, "
            f"median {median(sorted(verify_ratios)):.2f}, worst {max(verify_ratios):.2f}."
        )
    return "\n".join(lines) + "\n\n" + "\n".join(bullets)


def versions(distributions: Sequence[str] = DISTRIBUTIONS) -> dict[str, str]:
    """Each distribution's installed version (or "not installed"), and Python's."""
    found = {}
    for dist in distributions:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "not installed"
    found["python"] = platform.python_version()
    return found


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} CPU cores ({cpu}), {platform.system()} {platform.release()}"


def _page_arguments(arguments: Sequence[str]) -> list[str]:
    """The arguments that shape the page: where the raw rows or models are kept is not one."""
    shown: list[str] = []
    skip = False
    for argument in arguments:
        if skip:
            skip = False
        elif argument in ("--json", "--keep"):
            skip = True
        elif not argument.startswith(("--json=", "--keep=")):
            shown.append(argument)
    return shown


def document(rows: Sequence[Row], tools: Sequence[str], command: str, runs: int, elapsed_s: float) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    vers = ", ".join(f"{k} {v}" for k, v in versions().items())
    return f"""# Benchmarks: optcc -O2 vs peer optimizers

Generated by `benchmarks/compare_peers.py` (see [benchmarks/README.md](../benchmarks/README.md));
rerun it to refresh this page.

- Command: `{command}`
- Date: {date}; whole run {elapsed_s / 60:.1f} min
- Machine: {machine()}; no GPU
- Versions: {vers}

Columns: **nodes** (subgraphs and functions included) and **size** (file + external data)
of the result; **optimize s**: wall time of load + optimize + save in a fresh process,
imports excluded; **peak RSS**: the optimizing process's peak resident memory (interpreter
and imports included); **max rel diff**: max |result - original| / max |original| of the
worst output, on the inputs described in benchmarks/README.md (a real photo for the image
models, else seeded random inputs; the same for every tool), onnxruntime with
ORT_DISABLE_ALL on both;
**ORT off / ORT all ms**: onnxruntime CPU latency of the result, 1 thread, median of {runs}
runs after {WARMUP_RUNS} warm-up runs, with graph optimizations disabled / all enabled.
optcc runs -O2 with verification off (its default verifies; that time is not counted here);
`optcc-verified` is the same with verification on, i.e. what a user ships by default (its
time includes the proof or the onnxruntime runs; its process also times unverified runs,
interleaved with the verified ones, and "verified time / unverified" is the ratio of the
two fastest, so that both see the same machine); `optcc-fold-large` adds `--fold-large`, which lets
constant folding grow the model past the 1 MiB policy as the peers always do: on the
onnx-wheel models that materializes the ConstantOfShape weights (vgg19: 9 kB -> 513 MB),
the form in which the peers' node counts were reached;
ort-extended is onnxruntime's offline optimizer at ORT_ENABLE_EXTENDED for the CPU EP, whose
output may hold `com.microsoft` ops and is meant for that runtime only. Latencies were taken
on a shared 2-core machine: treat differences under ~10% as noise. The onnx-wheel models
(resnet50 … zfnet512) build their weights with ConstantOfShape at every run unless a tool
folds them, so their ORT-off latency is memory-bound and swings by up to ~40% between
processes running the same graph (zfnet512: 120–180 ms).

Other comparisons, each generated by its own script: INT8 against onnxruntime's
`quantize_static` (same models, same calibration and held-out data, one run:
`benchmarks/int8_vs_ort.py`) in [docs/int8.md](int8.md);
FP16 against onnxconverter-common (`benchmarks/fp16_vs_peers.py`) in [docs/fp16.md](fp16.md).

## Summary

{summary_table(rows, tools)}

## Against the graph-passes targets

{targets_section(rows)}

## Per model

{markdown_table(rows)}
"""


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--_worker":
        return _worker_main(sys.argv[2])
    from fixtures.corpus import corpus_models

    names = [m.name for m in corpus_models()]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=names, default=names, metavar="NAME",
                        help=f"corpus models (default: all: {', '.join(names)})")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=TOOLS, help="tools (default: all)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per latency (default 20)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="optimize runs per tool and model in its process; the fastest counts (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per child process")
    parser.add_argument("--out", type=Path, help="write the markdown page here (e.g. docs/benchmarks.md)")
    parser.add_argument("--json", type=Path, help="also write the raw rows as JSON")
    parser.add_argument("--keep", type=Path, help="keep the optimized models in this folder")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.repeat < 1:
        parser.error("--runs and --repeat must be at least 1")

    start = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="optcc-bench-") as tmp:
        workdir = args.keep or Path(tmp)
        for name in args.models:
            print(f"[{time.monotonic() - start:6.0f} s] {name}", file=sys.stderr, flush=True)
            rows.extend(benchmark_model(name, args.tools, args.runs, args.timeout, workdir, args.repeat))
    command = f"python benchmarks/compare_peers.py {' '.join(_page_arguments(sys.argv[1:] if argv is None else argv))}"
    command = command.strip()
    page = document(rows, args.tools, command, args.runs, time.monotonic() - start)
    print(page)
    if args.out:
        _write_atomic(args.out, page)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.json:
        _write_atomic(args.json, json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
