"""Numerical verification of an optimized model against its original, with onnxruntime.

Both models run with every onnxruntime graph optimization disabled, so onnxruntime's own
fusions can neither hide nor cause a difference. Inputs are the user's (feed dicts) or
generated per dtype: floats standard-normal, integers in a small non-negative range, and
integers used as Gather indices bounded by the size they index when that is static.

Tolerances depend on what changed (the loosest kind of pass that modified the model):
exact rewrites ~1e-5 relative, fusions ~1e-4, FP16/INT8 judged by SQNR/cosine/argmax
agreement. "Relative" is max |result - original| / max |original| per output.

The rounding floor: a rewrite that is exact in real arithmetic (a folded BatchNorm, a
reassociated bias) still rounds differently in float32, and a model can amplify that, most
visibly on generated inputs where an output is nearly zero everywhere. For the max-rel
tolerances the verifier therefore also runs the original with onnxruntime's basic graph
optimizations (constant folding and the same Conv/BatchNorm/Add fusions), the change a user
gets anyway from onnxruntime's defaults, and allows each output ``ROUNDING_FLOOR_FACTOR``
times that change when it exceeds the tolerance; the report shows both numbers.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from optcc import ir as oir
from optcc.errors import BadInputError
from optcc.numerics.inputs import check_feeds, generate_inputs
from optcc.numerics.kinds import Numerics, loosest
from optcc.progress import Progress

__all__ = [
    "Tolerance",
    "TOLERANCES",
    "OutputMetrics",
    "Verification",
    "Verifier",
    "verify",
    "generate_inputs",
    "resolve_providers",
    "loosest",
]

Feeds = Mapping[str, np.ndarray]
ModelRef = Union[ir.Model, str, os.PathLike]

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
ROUNDING_FLOOR_FACTOR = 2.0  # allowed multiple of onnxruntime's own rounding change


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Thresholds an output must meet; None means not enforced."""

    max_rel: float | None = None
    min_sqnr_db: float | None = None
    min_cosine: float | None = None
    min_argmax_agreement: float | None = None


TOLERANCES: dict[Numerics, Tolerance] = {
    "exact": Tolerance(max_rel=1e-5),
    "fusion": Tolerance(max_rel=1e-4),
    "fp16": Tolerance(min_sqnr_db=40.0, min_cosine=0.9999),
    "int8": Tolerance(min_sqnr_db=25.0, min_cosine=0.99, min_argmax_agreement=0.9),
}


@dataclasses.dataclass
class OutputMetrics:
    """How one output of the optimized model compares with the original's."""

    name: str
    provider: str
    passed: bool
    max_abs: float | None = None
    max_rel: float | None = None
    cosine: float | None = None
    sqnr_db: float | None = None
    argmax_agreement: float | None = None
    rounding_floor_rel: float | None = None  # max rel onnxruntime's basic optimizations cause
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_number(v) for k, v in dataclasses.asdict(self).items()}


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    return value


@dataclasses.dataclass
class Verification:
    """The verdict over every output, provider and sample."""

    status: str  # "passed" | "failed" | "skipped"
    numerics: Numerics
    tolerance: Tolerance
    providers: list[str]
    samples: int
    outputs: list[OutputMetrics]
    reason: str | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def worst(self) -> OutputMetrics | None:
        failing = [o for o in self.outputs if not o.passed]
        if failing:
            return failing[0]
        return max(self.outputs, key=lambda o: o.max_rel or 0.0, default=None)

    def describe(self) -> str:
        """One line: the verdict and the worst output's numbers."""
        if self.status == "skipped":
            return f"skipped ({self.reason})"
        worst = self.worst()
        verdict = "PASS" if self.passed else "FAIL"
        where = ", ".join(p.replace("ExecutionProvider", "") for p in self.providers)
        text = f"{verdict} on {where} ({self.numerics} tolerance, {self.samples} sample(s))"
        if worst is not None:
            bits = [f"worst output '{worst.name}'"]
            if worst.problem:
                bits.append(worst.problem)
            if worst.max_rel is not None:
                bits.append(f"max rel {worst.max_rel:.3g}")
                limit = self.tolerance.max_rel
                if worst.passed and limit is not None and worst.max_rel > limit and worst.rounding_floor_rel:
                    bits[-1] += (f" (over {limit:g}, but within {ROUNDING_FLOOR_FACTOR:g}x the "
                                 f"{worst.rounding_floor_rel:.3g} onnxruntime's own optimizations cause)")
            if worst.sqnr_db is not None:
                bits.append(f"SQNR {worst.sqnr_db:.1f} dB")
            text += ": " + ", ".join(bits)
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "numerics": self.numerics,
            "tolerance": {k: v for k, v in dataclasses.asdict(self.tolerance).items()},
            "providers": self.providers,
            "samples": self.samples,
            "reason": self.reason,
            "outputs": [o.to_dict() for o in self.outputs],
        }


# --------------------------------------------------------------------------- providers


def resolve_providers(names: Sequence[str] | None) -> list[str]:
    """onnxruntime provider names for 'cpu'/'cuda' (or full names). None: CPU, plus CUDA
    when onnxruntime-gpu and a GPU are present."""
    available = ort.get_available_providers()
    if names is None:
        chosen = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in available:
            chosen.append("CUDAExecutionProvider")
        return chosen
    chosen = []
    for name in names:
        full = PROVIDER_ALIASES.get(name.strip().lower(), name.strip())
        if full not in available:
            raise BadInputError(
                f"execution provider '{name}' is not available in this onnxruntime "
                f"(available: {', '.join(available)})"
            )
        chosen.append(full)
    return chosen


# --------------------------------------------------------------------------- running


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return options


class _Runner:
    """One onnxruntime session per (model, provider); sessions load from bytes, or from a
    saved file with external data when the model is large or already external."""

    def __init__(self, model: ModelRef, provider: str, scratch: Path,
                 options: ort.SessionOptions | None = None) -> None:
        if isinstance(model, (str, os.PathLike)):
            source: Any = str(model)
        elif oir.needs_external_data(model):
            path = scratch / f"model_{id(model)}.onnx"
            oir.save(model, path, external_data=True)
            source = str(path)
        else:
            source = oir.serialize(model).SerializeToString()
        self.session = ort.InferenceSession(source, options or _session_options(), providers=[provider])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._float16_inputs = {i.name for i in self.session.get_inputs() if i.type == "tensor(float16)"}

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        """Outputs for ``feeds``; float32 feeds of inputs a float16 conversion turned
        float16 (``keep_io_types=False``) are rounded to float16 first."""
        feeds = {
            name: array.astype(np.float16) if name in self._float16_inputs and array.dtype == np.float32 else array
            for name, array in feeds.items()
        }
        return [np.asarray(x) for x in self.session.run(None, feeds)]


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text[:300]


# --------------------------------------------------------------------------- metrics


def compare_outputs(
    name: str, provider: str, ref: np.ndarray, got: np.ndarray, tolerance: Tolerance,
    rounding_floor_rel: float | None = None,
) -> OutputMetrics:
    """Metrics of one output against the reference, and whether they meet the tolerance
    (a max-rel tolerance widened to ``ROUNDING_FLOOR_FACTOR`` x ``rounding_floor_rel``)."""
    metrics = OutputMetrics(name=name, provider=provider, passed=False,
                            rounding_floor_rel=rounding_floor_rel)
    if ref.shape != got.shape:
        metrics.problem = f"shape {got.shape} != original {ref.shape}"
        return metrics
    if ref.dtype != got.dtype:
        metrics.problem = f"dtype {got.dtype} != original {ref.dtype}"
        return metrics
    if not np.issubdtype(ref.dtype, np.floating):
        mismatched = int(np.count_nonzero(ref != got))
        metrics.max_abs = 0.0 if mismatched == 0 else None
        metrics.passed = mismatched == 0
        if mismatched:
            metrics.problem = f"{mismatched} of {ref.size} values differ"
        return metrics
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    ref_nan, got_nan = np.isnan(ref64), np.isnan(got64)
    if not np.array_equal(ref_nan, got_nan):
        metrics.problem = f"NaN in {int(got_nan.sum())} values, original {int(ref_nan.sum())}"
        return metrics
    finite = np.isfinite(ref64) & np.isfinite(got64)
    inf_mismatch = np.count_nonzero((ref64 != got64) & ~finite & ~ref_nan)
    if inf_mismatch:
        metrics.problem = f"{int(inf_mismatch)} infinities differ"
        return metrics
    r, g = ref64[finite], got64[finite]
    err = np.abs(r - g)
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    metrics.max_abs = float(err.max()) if err.size else 0.0
    metrics.max_rel = metrics.max_abs / scale if scale > 0 else (0.0 if metrics.max_abs == 0 else math.inf)
    signal, noise = float(np.sum(r * r)), float(np.sum(err * err))
    metrics.sqnr_db = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    norms = float(np.linalg.norm(r) * np.linalg.norm(g))
    metrics.cosine = float(np.dot(r, g) / norms) if norms > 0 else (1.0 if noise == 0 else 0.0)
    if ref.ndim == 2 and ref.size > 0 and ref.shape[-1] > 1 and np.all(np.isfinite(ref64)):
        # classifier-like [N, C] outputs only: on feature maps argmax ties are noise
        metrics.argmax_agreement = float(np.mean(np.argmax(ref64, -1) == np.argmax(got64, -1)))
    metrics.passed, metrics.problem = _meets(metrics, tolerance)
    return metrics


def _meets(m: OutputMetrics, t: Tolerance) -> tuple[bool, str | None]:
    if t.max_rel is not None and m.max_rel is not None and m.max_rel > t.max_rel:
        floor = m.rounding_floor_rel or 0.0
        allowed = ROUNDING_FLOOR_FACTOR * floor
        if m.max_rel > allowed:
            if allowed > t.max_rel:
                return False, (f"max rel {m.max_rel:.3g} > {allowed:.3g} ({ROUNDING_FLOOR_FACTOR:g}x the "
                               f"{floor:.3g} onnxruntime's own optimizations cause)")
            return False, f"max rel {m.max_rel:.3g} > {t.max_rel:g}"
    if t.min_sqnr_db is not None and m.sqnr_db is not None and m.sqnr_db < t.min_sqnr_db:
        return False, f"SQNR {m.sqnr_db:.1f} dB < {t.min_sqnr_db:g} dB"
    if t.min_cosine is not None and m.cosine is not None and m.cosine < t.min_cosine:
        return False, f"cosine {m.cosine:.6f} < {t.min_cosine:g}"
    if (
        t.min_argmax_agreement is not None
        and m.argmax_agreement is not None
        and m.argmax_agreement < t.min_argmax_agreement
    ):
        return False, f"argmax agreement {m.argmax_agreement:.3f} < {t.min_argmax_agreement:g}"
    return True, None


# --------------------------------------------------------------------------- verifier


class Verifier:
    """Runs the original once per provider, then checks candidate models against it.

    ``inputs``: feed dicts (an iterable is consumed once); None generates ``samples``
    feeds with ``input_shapes`` for dynamic dimensions.
    """

    def __init__(
        self,
        original: ModelRef,
        *,
        inputs: Iterable[Feeds] | Feeds | None = None,
        providers: Sequence[str] | None = None,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        samples: int = 1,
        seed: int = 0,
        tolerances: Mapping[Numerics, Tolerance] | None = None,
        progress: bool = False,
    ) -> None:
        self.original = original
        self.providers = resolve_providers(providers)
        self.tolerances = {**TOLERANCES, **(tolerances or {})}
        self._progress = progress
        self._scratch = tempfile.TemporaryDirectory(prefix="optcc-verify-")
        model = original if isinstance(original, ir.Model) else oir.load(original)
        if not isinstance(original, (str, os.PathLike)):
            self.original = model  # bytes / ModelProto: run the loaded model
        if inputs is None:
            self.feeds = generate_inputs(model, input_shapes, samples=samples, seed=seed)
        else:
            self.feeds = [dict(inputs)] if isinstance(inputs, Mapping) else [dict(f) for f in inputs]
            if not self.feeds:
                raise BadInputError("no verification inputs given (empty iterable)")
            for i, feeds in enumerate(self.feeds):
                check_feeds(model, feeds, label=f"verification sample {i}")
        self._references: dict[str, list[list[np.ndarray]]] | None = None
        self._reference_error: str | None = None
        self._floors: dict[tuple[str, str], float] | None = None

    def close(self) -> None:
        self._scratch.cleanup()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reference_outputs(self) -> dict[str, list[list[np.ndarray]]] | None:
        if self._references is None and self._reference_error is None:
            try:
                self._references = {}
                for provider in self.providers:
                    runner = _Runner(self.original, provider, Path(self._scratch.name))
                    self._references[provider] = [runner.run(f) for f in self.feeds]
            except Exception as e:  # noqa: BLE001 - anything onnxruntime raises
                self._references = None
                self._reference_error = f"onnxruntime cannot run the original model: {_first_line(e)}"
        return self._references

    def _rounding_floors(self, references: dict[str, list[list[np.ndarray]]]) -> dict[tuple[str, str], float]:
        """Per (provider, output): the max rel change onnxruntime's basic optimizations
        make to the original's output (0 when they cannot run)."""
        if self._floors is None:
            self._floors = {}
            options = _session_options()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            for provider in self.providers:
                try:
                    runner = _Runner(self.original, provider, Path(self._scratch.name), options)
                    for feeds, ref_outputs in zip(self.feeds, references[provider]):
                        for name, ref, got in zip(runner.output_names, ref_outputs, runner.run(feeds)):
                            rel = compare_outputs(name, provider, ref, got, Tolerance()).max_rel
                            if rel is not None and math.isfinite(rel):
                                key = (provider, name)
                                self._floors[key] = max(self._floors.get(key, 0.0), rel)
                except Exception:  # noqa: BLE001 - no floor: the plain tolerance applies
                    continue
        return self._floors

    def check(self, model: ir.Model, numerics: Numerics = "exact") -> Verification:
        """Compare ``model`` with the original on every provider and sample."""
        tolerance = self.tolerances[numerics]
        references = self._reference_outputs()
        base = dict(numerics=numerics, tolerance=tolerance, providers=self.providers, samples=len(self.feeds))
        if references is None:
            return Verification(status="skipped", outputs=[], reason=self._reference_error, **base)
        floors = self._rounding_floors(references) if tolerance.max_rel is not None else None
        metrics: list[OutputMetrics] = []
        total = len(self.providers) * len(self.feeds)
        with Progress("verifying", total, enabled=self._progress) as bar:
            for provider in self.providers:
                try:
                    runner = _Runner(model, provider, Path(self._scratch.name))
                except Exception as e:  # noqa: BLE001
                    reason = f"onnxruntime cannot load the optimized model: {_first_line(e)}"
                    return Verification(status="failed", outputs=metrics, reason=reason, **base)
                for feeds, ref_outputs in zip(self.feeds, references[provider]):
                    try:
                        outputs = runner.run(feeds)
                    except Exception as e:  # noqa: BLE001
                        reason = f"onnxruntime cannot run the optimized model: {_first_line(e)}"
                        return Verification(status="failed", outputs=metrics, reason=reason, **base)
                    for name, ref, got in zip(runner.output_names, ref_outputs, outputs):
                        if numerics in ("fp16", "int8") and got.dtype == np.float16 and ref.dtype == np.float32:
                            got = got.astype(np.float32)  # a float16 interface, judged by SQNR
                        floor = floors.get((provider, name)) if floors is not None else None
                        metrics.append(compare_outputs(name, provider, ref, got, tolerance, floor))
                    bar.advance()
        merged = _merge_samples(metrics)
        status = "passed" if all(m.passed for m in merged) else "failed"
        reason = None if status == "passed" else "; ".join(
            f"'{m.name}' on {m.provider}: {m.problem}" for m in merged if not m.passed
        )
        return Verification(status=status, outputs=merged, reason=reason, **base)


def _merge_samples(metrics: list[OutputMetrics]) -> list[OutputMetrics]:
    """Keep, per (output, provider), the worst sample's metrics."""
    worst: dict[tuple[str, str], OutputMetrics] = {}
    for m in metrics:
        key = (m.name, m.provider)
        current = worst.get(key)
        if current is None or _badness(m) > _badness(current):
            worst[key] = m
    return list(worst.values())


def _badness(m: OutputMetrics) -> tuple[int, float]:
    return (0 if m.passed else 1, m.max_rel if m.max_rel is not None else 0.0)


def verify(
    original: ModelRef,
    optimized: ir.Model,
    *,
    numerics: Numerics = "exact",
    **verifier_options: Any,
) -> Verification:
    """One-shot verification of ``optimized`` against ``original`` (see ``Verifier``)."""
    with Verifier(original, **verifier_options) as verifier:
        return verifier.check(optimized, numerics)
