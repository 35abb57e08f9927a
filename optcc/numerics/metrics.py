"""The one metrics module: how an output compares with its reference, and whether that
meets a tolerance.

Finite magnitudes from ``SENTINEL_FROM`` (1e30) up are mask fills (-3.4e38 standing for
minus infinity): the reference's fills must be fills of the same sign in the candidate,
within the max-rel tolerance of their own magnitude (equal where there is none), and no
other element may be one (``fills_differ``); they count in no scale, SQNR or cosine.

Max-rel tolerances are judged per element. An element passes when its error against the
reference is within ``tolerance x scale`` (scale: the output's largest reference magnitude
in that sample, fills left out), or, when the reference is more precise than float32, when
it is no worse than ``ORIGINAL_ERROR_FACTOR`` times the float32 original's own error at
that element: a rewrite may not be blamed for the original's rounding, and may not hide
inside the rounding of other elements either. An output a bounded kernel makes (Sigmoid,
Softmax, Tanh) may also be off by that factor times the kernel's absolute float32
resolution. The original's own error at an element is the larger
of two float32 evaluations of it (as written, and with onnxruntime's basic optimizations,
which reassociate the same math), the second never counted above the first's largest
error over the output. A tolerance is never widened otherwise.

SQNR and cosine are computed over all of an output's samples together (a blank sample
cannot dominate them).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from optcc.numerics.kinds import Numerics

__all__ = ["Tolerance", "TOLERANCES", "ORIGINAL_ERROR_FACTOR", "OutputMetrics", "compare_outputs", "sqnr_db",
           "bounded_resolution", "fills_differ", "real_values", "special_values_problem", "SATURATED_BELOW",
           "SENTINEL_FROM"]

# An element may be off by this multiple of the float32 original's own error against a
# float64 reference: a correct rewrite's rounding is of the same size as the original's.
ORIGINAL_ERROR_FACTOR = 4.0


# Kernels whose result lies in [-1, 1] compute it to float32's absolute resolution there
# (onnxruntime's Sigmoid returns 0 or one step of 1.2e-7 deep in its tail), however small
# the values are: relative to a saturated output's own scale that step is no rounding.
_BOUNDED = frozenset({"Sigmoid", "HardSigmoid", "Softmax", "Tanh", "Softsign"})


# an output below this on every sample (a detector's map on an input without objects)
# holds rounding only: the samples cannot judge a lossy rewrite of it
SATURATED_BELOW = 1e-3


# A finite magnitude from this up is a mask or fill value (-3.4e38 standing for minus
# infinity), no quantity a model computes: judged against its own magnitude, and no scale.
SENTINEL_FROM = 1e30


def bounded_resolution(producer_op: str | None) -> float:
    """The absolute resolution of an output made by ``producer_op`` (0 for others)."""
    return float(np.finfo(np.float32).eps) if producer_op in _BOUNDED else 0.0


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Thresholds an output must meet; None means not enforced. ``exact_integers``: an
    integer or boolean output must equal the reference's (False: its values are judged
    elsewhere, by the INT8 task judge's ``labels``; its shape still must match)."""

    max_rel: float | None = None
    min_sqnr_db: float | None = None
    min_cosine: float | None = None
    min_argmax_agreement: float | None = None
    exact_integers: bool = True


TOLERANCES: dict[Numerics, Tolerance] = {
    "exact": Tolerance(max_rel=1e-5),
    "fusion": Tolerance(max_rel=1e-4),
    "fp16": Tolerance(min_sqnr_db=40.0, min_cosine=0.9999),
    "int8": Tolerance(min_sqnr_db=25.0, min_cosine=0.99, min_argmax_agreement=0.9),
}


@dataclasses.dataclass
class OutputMetrics:
    """How one output of the candidate compares with the reference, over all samples.

    ``max_rel``: the largest error relative to the output's scale; ``original_max_rel``:
    the float32 original's own max rel against the same reference (None when the
    reference is the float32 original); ``elements_over``: elements beyond what the
    tolerance allows."""

    name: str
    provider: str
    passed: bool
    max_abs: float | None = None
    max_rel: float | None = None
    cosine: float | None = None
    sqnr_db: float | None = None
    argmax_agreement: float | None = None
    original_max_rel: float | None = None
    elements_over: int | None = None
    allowance_used: float | None = None
    problem: str | None = None
    # positions (in the samples compared) of the samples with an element beyond the tolerance
    samples_over: tuple[int, ...] = ()
    # integer or boolean elements that differ from the reference's (judged by the task's
    # ``labels`` where the tolerance does not compare them exactly)
    values_differ: int | None = None
    # a float16 result's output: the rule that accepted it, "sqnr" or "task"
    # (``optcc.numerics.float16``); None elsewhere, and when neither did
    accepted_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_number(v) for k, v in dataclasses.asdict(self).items()
                if k != "samples_over" and not (k in ("accepted_by", "values_differ") and v is None)}


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    return value


_INTEGER_KINDS = frozenset("iub")  # numpy dtype kinds of integer and boolean outputs


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """10·log10(signal/noise), +inf without noise, -inf without signal."""
    if noise_power == 0:
        return math.inf
    return 10 * math.log10(signal_power / noise_power) if signal_power > 0 else -math.inf


def _structural_problem(ref: np.ndarray, got: np.ndarray, dtype: np.dtype, fill_rel: float) -> str | None:
    """Another shape, or a dtype other than the original's ``dtype`` (a caller gets the
    candidate's: float64 for float32 or int32 for int64 is another interface); values that
    differ in a non-numeric output; NaN or infinities that differ. Integer and boolean
    values are counted by the caller. Mask fills may be off by ``fill_rel`` of their own
    magnitude (``fills_differ``)."""
    if ref.shape != got.shape:
        return f"shape {got.shape} != original {ref.shape}"
    if got.dtype != dtype or ref.dtype.kind != got.dtype.kind:
        return f"dtype {got.dtype} != original {dtype}"
    if ref.dtype.kind in _INTEGER_KINDS:
        return None
    if ref.dtype.kind != "f":
        mismatched = int(np.count_nonzero(ref != got))
        return f"{mismatched} of {ref.size} values differ" if mismatched else None
    return special_values_problem(ref, got, fill_rel)


def special_values_problem(ref: np.ndarray, got: np.ndarray, fill_rel: float | None = None) -> str | None:
    """Where float ``got``'s NaN, infinities or mask fills are not ``ref``'s (NaN for NaN, the
    same infinity, a fill as ``fills_differ`` with ``fill_rel`` says): what differs, or None."""
    ref_nan, got_nan = np.isnan(ref), np.isnan(got)
    if not np.array_equal(ref_nan, got_nan):
        return f"NaN in {int(got_nan.sum())} values, original {int(ref_nan.sum())}"
    infinite = ~np.isfinite(ref) | ~np.isfinite(got)
    differ = int(np.count_nonzero((ref != got) & infinite & ~ref_nan))
    if differ:
        return f"{differ} infinities differ"
    differ = fills_differ(ref, got, fill_rel)
    return f"{differ} values of magnitude {SENTINEL_FROM:g} or more (mask fills) differ" if differ else None


def real_values(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Where both hold a value a model computes: finite, and below a mask fill's magnitude."""
    return np.isfinite(ref) & np.isfinite(got) & (np.abs(ref) < SENTINEL_FROM) & (np.abs(got) < SENTINEL_FROM)


def fills_differ(ref: np.ndarray, got: np.ndarray, max_rel: float | None = None) -> int:
    """How many finite elements are a mask fill (magnitude ``SENTINEL_FROM`` or more) in one
    of ``ref`` and ``got`` and not a fill of the same sign in the other, or, with
    ``max_rel``, one off by more than ``max_rel`` of its own magnitude (a fill's only scale:
    -3.4e38 scaled by a folded constant rounds by a few ulp, as does a float64 reference's)."""
    with np.errstate(invalid="ignore", over="ignore"):  # float16 holds no sentinel: 1e30 is its inf
        fill_r, fill_g = np.abs(ref) >= SENTINEL_FROM, np.abs(got) >= SENTINEL_FROM
        finite = np.isfinite(ref) & np.isfinite(got)
        wrong = (fill_r != fill_g) | (np.sign(ref) != np.sign(got))
        if max_rel is not None:
            r, g = ref.astype(np.float64), got.astype(np.float64)
            wrong |= np.abs(r - g) > max_rel * np.abs(r)
    return int(np.count_nonzero(finite & (fill_r | fill_g) & wrong))


def _real(values: np.ndarray, kept: np.ndarray | None) -> np.ndarray:
    """``values`` where ``kept`` holds (None: all of them), in order, as one row."""
    return values.ravel() if kept is None else values[kept]


def compare_outputs(
    name: str,
    provider: str,
    refs: Sequence[np.ndarray] | np.ndarray,
    gots: Sequence[np.ndarray] | np.ndarray,
    tolerance: Tolerance,
    originals: Sequence[np.ndarray] | None = None,
    alternates: Sequence[np.ndarray] | None = None,
    resolution: float = 0.0,
) -> OutputMetrics:
    """Metrics of one output over its samples (``refs[i]`` against ``gots[i]``) and whether
    they meet ``tolerance``. ``resolution``: the absolute step of the kernel that produces
    the output (``bounded_resolution``), allowed ``ORIGINAL_ERROR_FACTOR`` times at every
    element (never for "exact"). ``originals``: the float32 original's outputs when the
    reference is more precise than float32 (enables the per-element allowance);
    ``alternates``: a second float32 evaluation of the original (see the module docstring)."""
    if isinstance(refs, np.ndarray):
        refs, gots = [refs], [gots]
        originals = None if originals is None else [originals]  # type: ignore[list-item]
        alternates = None if alternates is None else [alternates]  # type: ignore[list-item]
    metrics = OutputMetrics(name=name, provider=provider, passed=False)
    worst_rel = worst_abs = original_rel = used = 0.0
    over = 0
    samples_over: list[int] = []
    signal = noise = dot = norm_r = norm_g = 0.0
    agree: list[float] = []
    differing = counted = 0  # integer and boolean elements: those that differ, of all
    for i, (ref, got) in enumerate(zip(refs, gots)):
        ref, got = np.asarray(ref), np.asarray(got)
        original = None if originals is None else np.asarray(originals[i])
        problem = _structural_problem(ref, got, (ref if original is None else original).dtype,
                                      tolerance.max_rel or 0.0)
        if problem:
            metrics.problem = problem
            return metrics
        if ref.dtype.kind in _INTEGER_KINDS:
            differing += int(np.count_nonzero(ref != got))
            counted += ref.size
            continue
        if ref.dtype.kind != "f":
            continue
        r, g = ref.astype(np.float64), got.astype(np.float64)
        finite = real_values(r, g)
        kept = None if finite.all() else finite  # None: every value is real
        r, g = _real(r, kept), _real(g, kept)
        err = np.abs(r - g)
        scale = float(np.abs(r).max()) if r.size else 0.0
        worst_abs = max(worst_abs, float(err.max()) if err.size else 0.0)
        rel = (float(err.max()) / scale if scale > 0 else (0.0 if not err.size or err.max() == 0 else math.inf)) \
            if err.size else 0.0
        worst_rel = max(worst_rel, rel)
        if tolerance.max_rel is not None and err.size:
            allowed = np.full(err.shape, max(tolerance.max_rel * scale, ORIGINAL_ERROR_FACTOR * resolution))
            if original is not None:
                own = np.abs(_real(original.astype(np.float64), kept) - r)
                original_rel = max(original_rel, float(own.max()) / scale if scale > 0 else 0.0)
                if alternates is not None and np.shape(alternates[i]) == ref.shape:
                    other = np.abs(_real(np.asarray(alternates[i], np.float64), kept) - r)
                    own = np.maximum(own, np.minimum(np.nan_to_num(other, nan=0.0), own.max()))
                allowed = np.maximum(allowed, ORIGINAL_ERROR_FACTOR * own)
            sample_over = int(np.count_nonzero(err > allowed))
            share = np.divide(err, allowed, out=np.where(err > 0, math.inf, 0.0), where=allowed > 0)
            used = max(used, float(share.max()))
            over += sample_over
            if sample_over:
                samples_over.append(i)
        power = float(np.dot(r, r))
        signal += power
        noise += float(np.dot(err, err))
        dot += float(np.dot(r, g))
        norm_r += power
        norm_g += float(np.dot(g, g))
        if ref.ndim == 2 and ref.shape[-1] > 1 and ref.shape[0] and np.all(np.isfinite(ref)):
            # classifier-like [N, C] outputs only: on feature maps argmax ties are noise
            agree.append(float(np.mean(np.argmax(ref, -1) == np.argmax(got, -1))))
    if differing:
        metrics.values_differ = differing
        if tolerance.exact_integers:
            metrics.problem = f"{differing} of {counted} values differ"
            return metrics
    metrics.max_abs, metrics.max_rel = worst_abs, worst_rel
    metrics.sqnr_db = sqnr_db(signal, noise)
    norms = math.sqrt(norm_r * norm_g)
    metrics.cosine = dot / norms if norms > 0 else (1.0 if noise == 0 else 0.0)
    metrics.argmax_agreement = float(np.mean(agree)) if agree else None
    if originals is not None:
        metrics.original_max_rel = original_rel
    if tolerance.max_rel is not None:
        metrics.elements_over = over
        metrics.allowance_used = used
        metrics.samples_over = tuple(samples_over)
    metrics.passed, metrics.problem = _meets(metrics, tolerance, per_element=originals is not None)
    return metrics


def _meets(m: OutputMetrics, t: Tolerance, *, per_element: bool) -> tuple[bool, str | None]:
    if t.max_rel is not None and m.elements_over:
        if per_element:
            return False, (f"{m.elements_over} element(s) off by more than {t.max_rel:g} of the output's scale "
                           f"and {ORIGINAL_ERROR_FACTOR:g}x the float32 original's own error "
                           f"(max rel {m.max_rel:.3g}, original's {m.original_max_rel:.3g})")
        return False, f"max rel {m.max_rel:.3g} > {t.max_rel:g}"
    if t.min_sqnr_db is not None and m.sqnr_db is not None and m.sqnr_db < t.min_sqnr_db:
        return False, f"SQNR {m.sqnr_db:.1f} dB < {t.min_sqnr_db:g} dB"
    if t.min_cosine is not None and m.cosine is not None and m.cosine < t.min_cosine:
        return False, f"cosine {m.cosine:.6f} < {t.min_cosine:g}"
    if t.min_argmax_agreement is not None and m.argmax_agreement is not None \
            and m.argmax_agreement < t.min_argmax_agreement:
        return False, f"argmax agreement {m.argmax_agreement:.3f} < {t.min_argmax_agreement:g}"
    return True, None
