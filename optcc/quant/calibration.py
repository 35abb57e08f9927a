"""Calibration for INT8 quantization: streaming activation statistics and clipping ranges.

Calibration is an analysis, separate from the rewrite (``QuantizeInt8Pass(ranges=...)``):

1. ``collect_statistics(model, data)`` runs the float model on onnxruntime (graph
   optimizations off), sample by sample. For ``minmax`` (``bins=0``) each tensor's min
   and max are computed inside the graph (ReduceMin/ReduceMax added per tensor), so only
   scalars leave onnxruntime. For the histogram methods the wanted intermediates are
   added as extra graph outputs and each activation is folded into a
   ``TensorHistogram``. Only the running statistics are kept, never the activations:
   memory is (tensors x bins), whatever the number of samples. When one sample's
   activations would exceed ``memory_budget_bytes``, the tensors are split into chunks,
   one onnxruntime session per chunk. Sessions read the weights from the loaded model's
   arrays (``optcc.runtime.shared_weights``), never from a serialized copy.
2. ``CalibrationStats.ranges(method)`` turns the statistics into a ``(lo, hi)`` range per
   tensor: ``minmax``, ``percentile`` (default 99.99), ``entropy`` (KL divergence, as in
   TensorRT) or ``mse`` (the clipping that minimizes the expected quantization error).

Histograms use a symmetric range ``[-2**e, 2**e]`` with a fixed number of bins. When a
value falls outside, the exponent grows and bins are merged pairwise (``2**k`` old bins
make one new bin), which is exact: a histogram built incrementally, or from two merged
shards, equals the one built in one pass over all the data at the final range.

Statistics are mergeable (``a.merge(b)``, for sharded calibration) and cacheable
(``calibrate(..., cache_dir=...)`` stores an .npz, no pickle, keyed by a hash of the
model, the data and the method).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Collection, Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from optcc import ir as oir
from optcc.errors import BadInputError, CacheRecomputedWarning
from optcc.numerics.samples import load_npz_samples
from optcc.progress import Progress
from optcc.numerics import check_feeds
from optcc.runtime.session import session_options
from optcc.runtime.shared_weights import light_proto, release_memory, weighted_session

__all__ = [
    "collect_statistics_sharded",
    "METHODS",
    "DEFAULT_BINS",
    "DEFAULT_PERCENTILE",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "TensorHistogram",
    "CalibrationStats",
    "CalibrationResult",
    "ChannelMeans",
    "channel_mean_nodes",
    "calibration_tensors",
    "collect_statistics",
    "calibrate",
    "load_samples",
    "split_holdout",
    "holdout_positions",
    "split_at",
    "calibration_positions",
    "model_hash",
    "data_hash",
]

Feeds = Mapping[str, np.ndarray]
CalibrationData = Union[str, os.PathLike, Iterable[Feeds]]

METHODS = ("minmax", "percentile", "entropy", "mse")
DEFAULT_BINS = 2048
DEFAULT_PERCENTILE = 99.99
DEFAULT_MEMORY_BUDGET_BYTES = 512 * 1024 * 1024
_MIN_EXPONENT = -40  # ranges below 2**-40 are treated as zero
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)


# --------------------------------------------------------------------------- statistics


class TensorHistogram:
    """Running min/max and a fixed-size histogram of one tensor over ``[-2**e, 2**e]``.

    State: two floats, an exponent, a sample count and ``bins`` int64 counts, so its size
    does not depend on how many values were added. ``bins=0`` keeps the min and max only
    (all ``minmax`` needs).
    """

    __slots__ = ("bins", "counts", "exponent", "min", "max", "count")

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if bins != 0 and (bins < 16 or bins % 2):
            raise BadInputError(f"histogram bins must be 0 (min/max only) or an even number >= 16, got {bins}")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.exponent: int | None = None  # None until a value has been seen
        self.min = math.inf
        self.max = -math.inf
        self.count = 0

    @property
    def limit(self) -> float:
        """Half-width of the histogram's range (0 before any value)."""
        return 0.0 if self.exponent is None else math.ldexp(1.0, self.exponent)

    @property
    def bin_width(self) -> float:
        return 2.0 * self.limit / self.bins

    def edges(self) -> np.ndarray:
        return np.linspace(-self.limit, self.limit, self.bins + 1)

    def _grow_to(self, exponent: int) -> None:
        if self.exponent is None or self.bins == 0:
            self.exponent = exponent if self.exponent is None else max(self.exponent, exponent)
            return
        k = exponent - self.exponent
        if k <= 0:
            return
        factor = 2**k
        half = self.bins // 2
        # old bin i maps to new bin floor((i + (factor - 1) * half) / factor): exact nesting
        index = (np.arange(self.bins, dtype=np.int64) + (factor - 1) * half) // factor
        self.counts = _rebin(self.counts, index, self.bins)
        self.exponent = exponent

    def add(self, values: np.ndarray) -> None:
        """Fold an array of values into the statistics (non-finite values are ignored).

        The bin index is computed in float32 for float32/float16 data (3x faster than
        float64 on large activations): a value within float32 rounding of a bin edge may
        land in the neighbouring bin."""
        flat = np.asarray(values).reshape(-1)
        if flat.size == 0:
            return
        work = np.float64 if flat.dtype == np.float64 else np.float32
        flat = flat.astype(work, copy=False)
        finite = flat if np.isfinite(flat).all() else flat[np.isfinite(flat)]
        if finite.size == 0:
            return
        lo, hi = float(finite.min()), float(finite.max())
        self.add_extremes(lo, hi, int(finite.size))
        if self.bins == 0:
            return
        if self.limit >= 2.0**100:  # float32 cannot hold the histogram's edges
            work = np.float64
        index = finite.astype(work, copy=False) + work(self.limit)
        index *= work(1.0 / self.bin_width)
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index.astype(np.intp), minlength=self.bins)

    def add_extremes(self, lo: float, hi: float, count: int) -> None:
        """Fold in ``count`` finite values known only by their min ``lo`` and max ``hi``.
        With ``bins > 0`` the histogram counts must be added by the caller (``add`` does)."""
        if count <= 0:
            return
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += int(count)
        self._grow_to(_exponent_for(max(abs(lo), abs(hi))))

    def merge(self, other: TensorHistogram) -> TensorHistogram:
        """A new histogram holding both (exact: ranges are powers of two, bins nest)."""
        if other.bins != self.bins:
            raise BadInputError(f"cannot merge histograms of {self.bins} and {other.bins} bins")
        out = self.copy()
        if other.exponent is None:
            return out
        theirs = other.copy()
        target = max(e for e in (out.exponent, theirs.exponent) if e is not None)
        out._grow_to(target)
        theirs._grow_to(target)
        out.counts = out.counts + theirs.counts
        out.min, out.max = min(out.min, other.min), max(out.max, other.max)
        out.count += other.count
        return out

    def copy(self) -> TensorHistogram:
        out = TensorHistogram(self.bins)
        out.counts = self.counts.copy()
        out.exponent, out.min, out.max, out.count = self.exponent, self.min, self.max, self.count
        return out

    def nbytes(self) -> int:
        """Bytes of state (constant in the number of samples)."""
        return int(self.counts.nbytes) + 4 * 8

    # ----------------------------------------------------------------- ranges

    def range(self, method: str = "minmax", **options: Any) -> tuple[float, float]:
        """The clipping range ``(lo, hi)`` by ``method``; always within ``[min, max]``."""
        if self.exponent is None or self.count == 0:
            return (0.0, 0.0)
        if method == "minmax":
            return (self.min, self.max)
        if self.bins == 0:
            raise BadInputError(
                f"calibration method '{method}' needs histograms; these statistics hold min/max only (bins=0)")
        if method == "percentile":
            return self._percentile_range(float(options.get("percentile", DEFAULT_PERCENTILE)))
        if method == "entropy":
            return self._entropy_range(int(options.get("levels", 128)))
        if method == "mse":
            return self._mse_range(int(options.get("levels", 256)))
        raise BadInputError(f"unknown calibration method '{method}' (use {', '.join(METHODS)})")

    def quantile(self, q: float) -> float:
        """The value below which a fraction ``q`` of the values lie (linear within a bin)."""
        cdf = np.cumsum(self.counts)
        target = q * cdf[-1]
        i = int(np.searchsorted(cdf, target, side="left"))
        i = min(i, self.bins - 1)
        before = cdf[i - 1] if i > 0 else 0
        inside = self.counts[i]
        frac = 0.0 if inside == 0 else (target - before) / inside
        value = -self.limit + (i + float(frac)) * self.bin_width
        return float(min(max(value, self.min), self.max))

    def _percentile_range(self, percentile: float) -> tuple[float, float]:
        if not 50.0 < percentile <= 100.0:
            raise BadInputError(f"percentile must be in (50, 100], got {percentile}")
        q = percentile / 100.0
        return (self.quantile(1.0 - q), self.quantile(q))

    def _abs_counts(self) -> np.ndarray:
        """Histogram of |x| over [0, limit] with bins/2 bins (folded at zero)."""
        half = self.bins // 2
        return self.counts[half:] + self.counts[:half][::-1]

    def _entropy_range(self, levels: int) -> tuple[float, float]:
        """TensorRT's KL-divergence threshold on |x|, then intersected with [min, max]."""
        hist = self._abs_counts().astype(np.float64)
        n = hist.size
        nonzero = np.nonzero(hist)[0]
        if nonzero.size == 0:
            return (0.0, 0.0)
        last = int(nonzero[-1]) + 1  # bins past the last value only add empty tail
        if last <= levels:
            return (self.min, self.max)
        stride = max(1, (last - levels) // 256)
        best, best_i = math.inf, last
        for i in range(levels, last + 1, stride):
            p = hist[:i].copy()
            p[-1] += hist[i:].sum()
            edges = np.linspace(0, i, levels + 1).astype(np.int64)
            ref = hist[:i]
            sums = np.add.reduceat(ref, edges[:-1])
            nz = np.add.reduceat((ref > 0).astype(np.float64), edges[:-1])
            per = np.where(nz > 0, sums / np.maximum(nz, 1), 0.0)
            q = np.repeat(per, np.diff(edges)) * (ref > 0)
            kl = _kl(p, q)
            if kl < best:
                best, best_i = kl, i
        threshold = best_i * (self.limit / n)
        return (max(self.min, -threshold), min(self.max, threshold))

    def _mse_range(self, levels: int) -> tuple[float, float]:
        """The scaled range ``a * (min, max)`` minimizing the expected squared error of
        uniform quantization with ``levels`` steps (clipping plus rounding), from bin
        centres weighted by counts."""
        centres = (self.edges()[:-1] + self.edges()[1:]) / 2
        mask = self.counts > 0
        x, w = centres[mask], self.counts[mask].astype(np.float64)
        x = np.clip(x, self.min, self.max)
        lo0, hi0 = min(self.min, 0.0), max(self.max, 0.0)
        if hi0 - lo0 <= 0:
            return (self.min, self.max)
        best, best_range = math.inf, (self.min, self.max)
        for a in np.linspace(0.02, 1.0, 99):
            lo, hi = lo0 * a, hi0 * a
            scale = (hi - lo) / (levels - 1)
            zero = np.round(-lo / scale)
            q = (np.clip(np.round(x / scale) + zero, 0, levels - 1) - zero) * scale
            err = float(np.dot(w, (x - q) ** 2))
            if err < best:
                best, best_range = err, (max(lo, self.min), min(hi, self.max))
        return best_range


def _rebin(counts: np.ndarray, index: np.ndarray, bins: int) -> np.ndarray:
    out = np.zeros(bins, dtype=np.int64)
    np.add.at(out, index, counts)
    return out


def _exponent_for(magnitude: float) -> int:
    if magnitude <= 0.0 or not math.isfinite(magnitude):
        return _MIN_EXPONENT
    _, exponent = math.frexp(magnitude)  # magnitude = m * 2**e with 0.5 <= m < 1: < 2**e
    return max(exponent, _MIN_EXPONENT)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum <= 0 or q_sum <= 0:
        return math.inf
    p = p / p_sum
    q = q / q_sum
    mask = p > 0
    if np.any(q[mask] <= 0):
        # smooth: a bin with reference mass but no candidate mass is heavily penalised
        q = np.where(mask & (q <= 0), 1e-12, q)
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


@dataclasses.dataclass
class CalibrationStats:
    """Per-tensor histograms (keyed by value name), mergeable and serializable."""

    histograms: dict[str, TensorHistogram] = dataclasses.field(default_factory=dict)
    samples: int = 0
    bins: int = DEFAULT_BINS

    def histogram(self, name: str) -> TensorHistogram:
        """The statistics of ``name`` (created empty on first use)."""
        hist = self.histograms.get(name)
        if hist is None:
            hist = self.histograms[name] = TensorHistogram(self.bins)
        return hist

    def add(self, name: str, values: np.ndarray) -> None:
        self.histogram(name).add(values)

    def merge(self, other: CalibrationStats) -> CalibrationStats:
        """Statistics over both shards' samples (a new object; neither input changes)."""
        if other.bins != self.bins:
            raise BadInputError(f"cannot merge statistics of {self.bins} and {other.bins} bins")
        merged = {name: h.copy() for name, h in self.histograms.items()}
        for name, hist in other.histograms.items():
            merged[name] = merged[name].merge(hist) if name in merged else hist.copy()
        return CalibrationStats(merged, self.samples + other.samples, self.bins)

    def ranges(self, method: str = "minmax", **options: Any) -> dict[str, tuple[float, float]]:
        """``{tensor: (lo, hi)}`` by ``method`` (see ``TensorHistogram.range``)."""
        if method not in METHODS:
            raise BadInputError(f"unknown calibration method '{method}' (use {', '.join(METHODS)})")
        return {name: h.range(method, **options) for name, h in self.histograms.items()}

    def nbytes(self) -> int:
        """Bytes of state; bounded by (tensors x bins), independent of the sample count."""
        return sum(h.nbytes() for h in self.histograms.values())

    def save(self, path: str | os.PathLike) -> None:
        """Write as .npz (plain arrays only; loadable without pickle), atomically."""
        names = sorted(self.histograms)
        hists = [self.histograms[n] for n in names]
        arrays = {
            "names": np.array(names, dtype=np.str_),
            "counts": np.stack([h.counts for h in hists]) if hists else np.zeros((0, self.bins), np.int64),
            "exponents": np.array([_MIN_EXPONENT - 1 if h.exponent is None else h.exponent for h in hists], np.int64),
            "minmax": np.array([[h.min, h.max] for h in hists], np.float64).reshape(-1, 2),
            "value_counts": np.array([h.count for h in hists], np.int64),
            "meta": np.array([self.samples, self.bins], np.int64),
        }
        target = Path(path)
        fd, tmp = tempfile.mkstemp(dir=target.resolve().parent, prefix=f".{target.name}.", suffix=".npz")
        os.close(fd)
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationStats:
        try:
            with np.load(path, allow_pickle=False) as data:
                names = [str(n) for n in data["names"]]
                counts, exponents = data["counts"], data["exponents"]
                minmax, value_counts = data["minmax"], data["value_counts"]
                samples, bins = (int(x) for x in data["meta"])
            n = len(names)
            if not (counts.shape == (n, bins) and exponents.shape == value_counts.shape == (n,)
                    and minmax.shape == (n, 2)):
                raise ValueError("arrays of mismatched shapes")
        except Exception as e:  # noqa: BLE001 - any unreadable cache is an input problem
            raise BadInputError(f"not a calibration statistics file ({type(e).__name__})", path) from None
        stats = cls(samples=samples, bins=bins)
        for i, name in enumerate(names):
            hist = TensorHistogram(bins)
            hist.counts = counts[i].astype(np.int64)
            e = int(exponents[i])
            hist.exponent = None if e < _MIN_EXPONENT else e
            hist.min, hist.max = float(minmax[i, 0]), float(minmax[i, 1])
            hist.count = int(value_counts[i])
            stats.histograms[name] = hist
        return stats


# --------------------------------------------------------------------------- data


def load_samples(data: CalibrationData) -> Iterable[Feeds]:
    """Feed dicts from a path (.npz or folder of them, see ``optcc.numerics.samples``), an
    onnxruntime ``CalibrationDataReader`` (anything with ``get_next()`` returning feed
    dicts, then None), or the iterable itself."""
    if isinstance(data, (str, os.PathLike)):
        return load_npz_samples(data, purpose="calibration")
    if isinstance(data, Mapping):
        return [data]
    if callable(getattr(data, "get_next", None)):  # its __len__ may raise: never list() it
        return list(iter(data.get_next, None))
    return data


def split_holdout(samples: Sequence[Feeds], fraction: float = 0.2,
                  groups: Sequence[Hashable] | None = None) -> tuple[list[Feeds], list[Feeds]]:
    """(calibration, held-out): the samples at ``holdout_positions`` are held out, the
    others calibrate, each part in the samples' order. When nothing is left to calibrate
    (fewer than 2 samples, or no fraction), both parts are all the samples."""
    return split_at(samples, holdout_positions(len(list(samples)), fraction, groups))


def split_at(samples: Sequence[Feeds], held: Sequence[int]) -> tuple[list[Feeds], list[Feeds]]:
    """(calibration, held-out): the samples at positions ``held`` are held out (in that
    order), the others calibrate; all of them when none is left."""
    samples = list(samples)
    return [samples[i] for i in calibration_positions(len(samples), held)], [samples[i] for i in held]


def calibration_positions(count: int, held: Sequence[int]) -> list[int]:
    """The positions among ``count`` not in ``held``, which calibrate; all of them when none
    is left."""
    chosen = set(held)
    return [i for i in range(count) if i not in chosen] or list(range(count))


def holdout_positions(count: int, fraction: float = 0.2, groups: Sequence[Hashable] | None = None,
                      *, half: bool = False) -> list[int]:
    """Positions (ascending) of the held-out samples among ``count``: the last ``fraction``
    of them (rounded; ``half``: the last ``n // 2``), at least one and never all. With
    ``groups`` (one label per sample), the last part of each group's samples, so every
    group is held out and calibrates in the same proportion. A part of fewer than 2
    samples, or no fraction, holds out all of them (they calibrate too)."""
    labels = [0] * count if groups is None else list(groups)
    if len(labels) != count:
        raise BadInputError(f"{len(labels)} group labels for {count} samples")
    members: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):
        members.setdefault(label, []).append(i)
    held: list[int] = []
    for part in members.values():
        n = len(part)
        if n < 2 or fraction <= 0:
            held += part
            continue
        taken = n // 2 if half else max(1, int(round(n * fraction)))
        held += part[n - min(max(taken, 1), n - 1):]
    return sorted(held)


def calibration_tensors(model: ir.Model) -> list[str]:
    """Names of the float tensors of the main graph worth calibrating: graph inputs and
    every node output, constants excluded (``optcc.ir.is_constant``: an initializer a
    caller may feed, a graph input with a default from IR 4 on, is calibrated)."""
    names: list[str] = []
    seen: set[str] = set()
    inputs_constant = oir.initializers_are_constant(model)

    def wanted(value: ir.Value | None) -> bool:
        return (
            value is not None
            and bool(value.name)
            and value.name not in seen
            and not oir.is_constant(value, inputs_constant=inputs_constant)
            and (value.dtype is None or value.dtype in _FLOAT_TYPES)
        )

    for value in model.graph.inputs:
        if wanted(value):
            names.append(value.name)
            seen.add(value.name)
    for node in model.graph:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            continue
        for value in node.outputs:
            if wanted(value):
                names.append(value.name)
                seen.add(value.name)
    return names


def _estimate_sizes(model: ir.Model, names: Sequence[str], feeds: Feeds) -> dict[str, int]:
    """Bytes per tensor for one sample, by shape inference at the sample's input shapes.
    Tensors of unknown shape are assumed as large as the largest input."""
    proto, _ = light_proto(model)  # shapes need no weight data
    for value in proto.graph.input:
        if value.name in feeds:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, feeds[value.name].shape):
                dim.Clear()
                dim.dim_value = int(size)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - estimation only
        pass
    known: dict[str, int] = {}
    for info in [*proto.graph.value_info, *proto.graph.output, *proto.graph.input]:
        dims = info.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            known[info.name] = int(np.prod([d.dim_value for d in dims], dtype=np.int64)) * 4
    fallback = max((int(a.nbytes) for a in feeds.values()), default=0)
    return {n: known.get(n, fallback) for n in names}


def _chunks(names: Sequence[str], sizes: Mapping[str, int], budget: int) -> list[list[str]]:
    chunks: list[list[str]] = [[]]
    used = 0
    for name in names:
        size = sizes.get(name, 0)
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size
    return [c for c in chunks if c]


class _Collector:
    """An onnxruntime session that exposes chosen intermediates as extra outputs."""

    def __init__(self, model: ir.Model, names: Sequence[str], threads: int | None) -> None:
        proto, weights = light_proto(model)
        outputs = {o.name for o in proto.graph.output}
        inputs = {i.name for i in proto.graph.input}
        for name in names:
            if name not in outputs and name not in inputs:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
        self.session = weighted_session(proto, weights, session_options(threads=threads))
        self.names = [n for n in names if n not in inputs]
        self.input_names = [n for n in names if n in inputs]
        # what an input a sample does not feed holds: its initializer's default
        self.defaults = {v.name: v for v in model.graph.inputs if v.name in self.input_names and v.is_initializer()}

    def run(self, feeds: Feeds) -> Iterator[tuple[str, np.ndarray]]:
        if self.names:
            for name, array in zip(self.names, self.session.run(self.names, dict(feeds))):
                yield name, array
        for name in self.input_names:
            yield name, feeds[name] if name in feeds else oir.as_numpy(self.defaults[name])


_FINITE_AWARE_OPSET = 11  # IsInf (10), Where with broadcasting (9), ReduceSum without axes


def channel_mean_nodes(names: Sequence[str], ranks: Sequence[int], opset: int, prefix: str
                       ) -> tuple[list[onnx.NodeProto], list[str]]:
    """ReduceMean over every axis but 1 (channels) of each tensor (its axes a Constant from
    opset 18 on), and the means' names, made from ``prefix``."""
    nodes, outputs = [], []
    for i, (name, rank) in enumerate(zip(names, ranks)):
        out, axes = f"{prefix}_mean_{i}", [0, *range(2, rank)]
        if opset >= 18:
            axes_name = f"{prefix}_axes_{i}"
            nodes.append(onnx.helper.make_node(
                "Constant", [], [axes_name], value=onnx.numpy_helper.from_array(np.array(axes, np.int64))))
            nodes.append(onnx.helper.make_node("ReduceMean", [name, axes_name], [out], keepdims=0))
        else:
            nodes.append(onnx.helper.make_node("ReduceMean", [name], [out], axes=axes, keepdims=0))
        outputs.append(out)
    return nodes, outputs


@dataclasses.dataclass
class ChannelMeans:
    """Channel means taken while calibrating by min and max (``bins=0``): of each tensor of
    ``ranks`` (name: rank), ``channel_mean_nodes``' ReduceMean, in the min/max session, on the
    samples at ``positions`` of the data calibrated, into ``taken[position][name]`` (float32,
    as onnxruntime returns them). That session runs the float model as written (graph
    optimizations off, no arena, priority order, default threads): the same kernels on the
    same inputs as any such session of the model with the same ReduceMean, so the same
    means (``optcc.quant.bias_correction.FloatMeans`` takes them instead of running those
    samples again). Nothing is taken when the statistics come from a cache or from shards,
    or with histograms: ``taken`` then lacks the position."""

    ranks: Mapping[str, int]
    positions: Collection[int]
    taken: dict[int, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)


class _ExtremesCollector:
    """One onnxruntime session that computes each tensor's min, max and size inside the
    graph (ReduceMin/ReduceMax/Size to scalars, added per tensor). Nothing large leaves
    onnxruntime, so a sample needs no more memory than inference itself.

    A tensor whose min or max comes out infinite or NaN (BERT's masked attention scores,
    on every padded sample) is measured over its finite values only, as
    ``TensorHistogram.add`` does: once a sample shows such a tensor, the session
    is rebuilt (once per newly infinite set, not per sample) with, for those tensors, the
    min and max of the tensor with its non-finite values masked out and the count of its
    finite values, and the sample runs again. Every sample then runs once. Models below
    opset 11 fetch such tensors whole instead (one extra session)."""

    def __init__(self, model: ir.Model, names: Sequence[str], dtypes: Mapping[str, ir.DataType],
                 threads: int | None, means: ChannelMeans | None = None) -> None:
        self.model, self.names, self.dtypes, self.threads = model, list(names), dtypes, threads
        self.means = means  # taken on the samples it asks for, fetched on those only
        self.finite_aware: list[str] = []  # measured over their finite values, in graph
        self.can_mask = oir.default_opset(model) >= _FINITE_AWARE_OPSET
        self.session: ort.InferenceSession | None = None
        self._build()
        # the sessions that fetch non-finite tensors whole (old opsets only), one per set of names
        self.whole: dict[tuple[str, ...], _Collector] = {}

    def _build(self) -> None:
        if self.session is not None:  # the previous session is released before the next is built
            self.session = None
            release_memory()
        proto, weights = light_proto(self.model)
        taken = {v.name for v in proto.graph.input} | {v.name for v in proto.graph.output}
        taken |= {o for node in proto.graph.node for o in node.output} | {i.name for i in proto.graph.initializer}
        del proto.graph.output[:]
        self.outputs: list[tuple[str, str, str, str]] = []  # tensor, min, max, size
        self.masked: dict[str, tuple[str, str, str]] = {}  # tensor: finite min, max, count
        reductions: dict[str, list[onnx.NodeProto]] = {}
        masking = set(self.finite_aware)
        constants: list[onnx.TensorProto] = []

        def fresh(base: str) -> str:
            name = base
            while name in taken:
                name = "_" + name
            taken.add(name)
            return name

        limits: dict[int, tuple[str, str]] = {}  # element type: (+inf, -inf) constant names

        def infinities(elem: int) -> tuple[str, str]:
            if elem not in limits:
                pos, neg = fresh(f"optcc_calib_posinf_{elem}"), fresh(f"optcc_calib_neginf_{elem}")
                dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
                constants.append(onnx.numpy_helper.from_array(np.array(np.inf, dtype), pos))
                constants.append(onnx.numpy_helper.from_array(np.array(-np.inf, dtype), neg))
                limits[elem] = (pos, neg)
            return limits[elem]

        for i, name in enumerate(self.names):
            out = [fresh(f"optcc_calib_{kind}_{i}") for kind in ("min", "max", "size")]
            nodes = reductions.setdefault(name, [])
            for op, result in zip(("ReduceMin", "ReduceMax", "Size"), out):
                attrs = {"keepdims": 0} if op != "Size" else {}
                nodes.append(onnx.helper.make_node(op, [name], [result], **attrs))
                proto.graph.output.append(onnx.ValueInfoProto(name=result))
            self.outputs.append((name, *out))
            if name not in masking:
                continue
            # min and max over the finite values (non-finite ones replaced by +inf for the
            # min, -inf for the max) and their count; float16/bfloat16 widened to float32
            # first, as TensorHistogram.add does
            x = name
            elem = onnx.TensorProto.DOUBLE if self.dtypes.get(name) == ir.DataType.DOUBLE else onnx.TensorProto.FLOAT
            if self.dtypes.get(name) not in (ir.DataType.FLOAT, ir.DataType.DOUBLE):
                x = fresh(f"optcc_calib_wide_{i}")
                nodes.append(onnx.helper.make_node("Cast", [name], [x], to=elem))
            pos, neg = infinities(elem)
            inf, nan, bad, good = (fresh(f"optcc_calib_{k}_{i}") for k in ("isinf", "isnan", "bad", "good"))
            low_in, high_in, ones = (fresh(f"optcc_calib_{k}_{i}") for k in ("lowin", "highin", "ones"))
            masked = tuple(fresh(f"optcc_calib_finite_{k}_{i}") for k in ("min", "max", "count"))
            nodes += [
                onnx.helper.make_node("IsInf", [x], [inf]),
                onnx.helper.make_node("IsNaN", [x], [nan]),
                onnx.helper.make_node("Or", [inf, nan], [bad]),
                onnx.helper.make_node("Where", [bad, pos, x], [low_in]),
                onnx.helper.make_node("ReduceMin", [low_in], [masked[0]], keepdims=0),
                onnx.helper.make_node("Where", [bad, neg, x], [high_in]),
                onnx.helper.make_node("ReduceMax", [high_in], [masked[1]], keepdims=0),
                onnx.helper.make_node("Not", [bad], [good]),
                onnx.helper.make_node("Cast", [good], [ones], to=onnx.TensorProto.INT64),
                onnx.helper.make_node("ReduceSum", [ones], [masked[2]], keepdims=0),
            ]
            proto.graph.output.extend(onnx.ValueInfoProto(name=m) for m in masked)
            self.masked[name] = masked  # type: ignore[assignment]
        proto.graph.initializer.extend(constants)
        self.mean_outputs: dict[str, str] = {}  # tensor: its channel means (``ChannelMeans``)
        if self.means is not None:
            produced = {o for node in proto.graph.node for o in node.output}
            opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
            prefix = oir.unique_prefix(taken, "optcc_calib_channel")
            for i, (name, rank) in enumerate(self.means.ranks.items()):
                if name in produced:
                    made, (out,) = channel_mean_nodes([name], [rank], opset, f"{prefix}{i}")
                    reductions.setdefault(name, []).extend(made)
                    proto.graph.output.append(onnx.ValueInfoProto(name=out))
                    self.mean_outputs[name] = out
        # each reduction right after its producer, so onnxruntime can free the tensor early
        nodes = [r for v in proto.graph.input for r in reductions.get(v.name, ())]
        for node in proto.graph.node:
            nodes.append(node)
            nodes.extend(r for o in node.output for r in reductions.get(o, ()))
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
        # onnxruntime's default order runs the reductions last, keeping every activation
        # alive; without its arena, each activation's memory goes back as soon as it is read
        options = session_options(threads=self.threads, priority_order=True, arena=False)
        self.session = weighted_session(proto, weights, options)
        del proto, weights
        self.fetch = [o for _, *outs in self.outputs for o in outs] + [o for m in self.masked.values() for o in m]

    def run(self, feeds: Feeds, stats: CalibrationStats, position: int = -1) -> None:
        """Add sample ``position``'s min and max to ``stats`` (and its channel means, where
        ``self.means`` asks for that position)."""
        assert self.session is not None
        means = self.mean_outputs if self.means is not None and position in self.means.positions else {}
        fetch = [*self.fetch, *means.values()]
        values = dict(zip(fetch, self.session.run(fetch, dict(feeds))))
        infinite: list[str] = []
        for name, lo_name, hi_name, _ in self.outputs:
            lo, hi = float(values[lo_name]), float(values[hi_name])
            if not lo > hi and not (math.isfinite(lo) and math.isfinite(hi)):  # NaN compares False
                infinite.append(name)
        unmasked = [name for name in infinite if name not in self.masked]
        if unmasked and self.can_mask:  # measured again, these tensors over their finite values
            self.finite_aware = [n for n in self.names if n in self.masked or n in unmasked]
            self._build()
            self.run(feeds, stats, position)
            return
        if means:
            assert self.means is not None
            self.means.taken[position] = {name: values[out] for name, out in means.items()}
        for name, lo_name, hi_name, size_name in self.outputs:
            lo, hi = float(values[lo_name]), float(values[hi_name])
            if lo > hi:  # empty, or only NaN
                continue
            if math.isfinite(lo) and math.isfinite(hi):
                stats.histogram(name).add_extremes(lo, hi, int(values[size_name]))
            elif name in self.masked:
                low, high, count = (values[m] for m in self.masked[name])
                hist = stats.histogram(name)  # made even when no value is finite, as add() does
                if int(count) > 0:
                    hist.add_extremes(float(low), float(high), int(count))
        if unmasked:
            key = tuple(unmasked)
            if key not in self.whole:
                self.whole[key] = _Collector(self.model, unmasked, self.threads)
            for name, array in self.whole[key].run(feeds):
                stats.add(name, array)


def collect_statistics(
    model: oir.ModelSource,
    data: CalibrationData,
    *,
    tensors: Sequence[str] | None = None,
    bins: int = DEFAULT_BINS,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    threads: int | None = None,
    progress: bool = False,
    means: ChannelMeans | None = None,
) -> CalibrationStats:
    """Stream ``data`` (feed dicts, or an .npz path/folder) through the float model and
    return the per-tensor statistics of ``tensors`` (default: ``calibration_tensors``).
    ``means``: channel means to take on the way (``ChannelMeans``; with ``bins=0`` only).

    Tensors known (declared or inferred) not to be float have no statistics and are
    not collected.

    ``bins=0`` (min/max only, all ``minmax`` needs): one session computes each tensor's
    min and max inside onnxruntime (``_ExtremesCollector``); memory is that of inference.
    Tensors of unknown element type go the histogram way below.

    ``bins > 0``: one onnxruntime session exposes all tensors as outputs, unless one
    sample's activations exceed ``memory_budget_bytes``; then the tensors are split into
    chunks with one session each (every sample then runs once per chunk). Only histograms
    are kept between samples.
    """
    ir_model = oir.load(model)
    names = list(tensors) if tensors is not None else calibration_tensors(ir_model)
    samples = load_samples(data)
    total = len(samples) if hasattr(samples, "__len__") else 0
    stats = CalibrationStats(bins=bins)
    known = oir.inferred_dtypes(ir_model)
    names = [n for n in names if known.get(n) is None or known[n] in _FLOAT_TYPES]
    in_graph: list[str] = []
    dtypes = {n: t for n, t in known.items() if t in _FLOAT_TYPES}
    if bins == 0:
        in_graph = [n for n in names if n in dtypes]
        names = [n for n in names if n not in dtypes]
    extremes: _ExtremesCollector | None = None
    collectors: list[_Collector] | None = None
    with Progress("calibrating", total or 1, enabled=progress if total > 0 else False) as bar:
        for i, feeds in enumerate(samples):
            if not isinstance(feeds, Mapping):
                raise BadInputError(f"calibration sample {i} is a {type(feeds).__name__}, not a dict of arrays")
            feeds = dict(feeds)
            check_feeds(ir_model, feeds, label=f"calibration sample {i}")
            if in_graph:
                if extremes is None:
                    extremes = _ExtremesCollector(ir_model, in_graph, dtypes, threads, means)
                extremes.run(feeds, stats, i)
            if names and collectors is None:
                sizes = _estimate_sizes(ir_model, names, feeds)
                collectors = [
                    _Collector(ir_model, chunk, threads)
                    for chunk in _chunks(names, sizes, memory_budget_bytes)
                ]
            for collector in collectors or ():
                for name, array in collector.run(feeds):
                    if np.issubdtype(np.asarray(array).dtype, np.floating):
                        stats.add(name, array)
            stats.samples += 1
            bar.advance()
    del extremes, collectors
    release_memory()
    if stats.samples == 0:
        raise BadInputError("no calibration samples given (empty data)")
    return stats


def _collect_shard(model_bytes: bytes, samples: list[Feeds], tensors: list[str] | None, bins: int,
                   memory_budget_bytes: int, offset: int) -> CalibrationStats:
    """One shard's statistics (module-level and given bytes, so a process pool can run it)."""
    try:
        return collect_statistics(model_bytes, samples, tensors=tensors, bins=bins,
                                  memory_budget_bytes=memory_budget_bytes, threads=1)
    except BadInputError as e:  # name the sample as the whole data set counts it
        raise BadInputError(f"{e} (shard starting at calibration sample {offset})") from None


def collect_statistics_sharded(
    model: oir.ModelSource,
    data: CalibrationData,
    executor: Any,
    *,
    shards: int | None = None,
    tensors: Sequence[str] | None = None,
    bins: int = DEFAULT_BINS,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> CalibrationStats:
    """``collect_statistics`` with the samples split into ``shards`` contiguous shards
    (default: one per 4 samples, at most 16) run by ``executor`` (any
    ``concurrent.futures.Executor``: a thread or process pool, Dask's
    ``client.get_executor()``, ...) and merged in shard order.

    Identical to a single-process run: min, max and counts merge exactly, and histogram
    bins nest when a range grows (``TensorHistogram.merge``), so the ranges every method
    computes are the same bit for bit. The model travels as serialized bytes."""
    ir_model = oir.load(model)
    samples = [dict(f) for f in load_samples(data)]
    if not samples:
        raise BadInputError("no calibration samples given (empty data)")
    count = shards if shards is not None else min(16, max(1, len(samples) // 4))
    count = max(1, min(count, len(samples)))
    bounds = [round(i * len(samples) / count) for i in range(count + 1)]
    model_bytes = oir.serialize(ir_model).SerializeToString()
    names = list(tensors) if tensors is not None else None
    futures = [executor.submit(_collect_shard, model_bytes, samples[lo:hi], names, bins, memory_budget_bytes, lo)
               for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
    merged: CalibrationStats | None = None
    for future in futures:  # in shard order, whatever order they finish in
        part = future.result()
        merged = part if merged is None else merged.merge(part)
    assert merged is not None
    return merged


# --------------------------------------------------------------------------- caching


def model_hash(model: ir.Model) -> str:
    """SHA-256 of the model's serialized graph (and opsets)."""
    proto = oir.serialize(model)
    digest = hashlib.sha256()
    digest.update(proto.graph.SerializeToString(deterministic=True))
    for opset in proto.opset_import:
        digest.update(f"{opset.domain}:{opset.version};".encode())
    return digest.hexdigest()


def data_hash(samples: Iterable[Feeds]) -> str:
    """SHA-256 over every sample's names, dtypes, shapes and bytes, in order."""
    digest = hashlib.sha256()
    for feeds in samples:
        for name in sorted(feeds):
            array = np.ascontiguousarray(feeds[name])
            digest.update(f"{name}|{array.dtype.str}|{array.shape};".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


@dataclasses.dataclass
class CalibrationResult:
    """What ``calibrate`` produced: the ranges, the statistics behind them, and whether
    they came from the cache."""

    ranges: dict[str, tuple[float, float]]
    stats: CalibrationStats
    method: str
    cache_hit: bool = False
    cache_path: str | None = None
    cache_recomputed: str | None = None  # why the cache's entry was not read but recomputed

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "samples": self.stats.samples,
            "tensors": len(self.ranges),
            "cache_hit": self.cache_hit,
            "cache_path": self.cache_path,
            "cache_recomputed": self.cache_recomputed,
            "state_bytes": self.stats.nbytes(),
        }


def calibrate(
    model: oir.ModelSource,
    data: CalibrationData,
    method: str = "minmax",
    *,
    tensors: Sequence[str] | None = None,
    bins: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    progress: bool = False,
    executor: Any = None,
    shards: int | None = None,
    means: ChannelMeans | None = None,
    **method_options: Any,
) -> CalibrationResult:
    """Collect statistics (or read them from ``cache_dir``) and compute ranges by ``method``.

    ``bins``: histogram size; by default 0 (min/max only, computed inside onnxruntime)
    for ``minmax`` and ``DEFAULT_BINS`` for the histogram methods.
    The model's graph outputs always keep their min..max range (never clipped).
    ``executor`` (a ``concurrent.futures.Executor``): collect shard by shard on it
    (``collect_statistics_sharded``; the same statistics as one process).
    The cache file is ``calib-<hash>.npz`` where the hash covers the model graph, the data,
    the method with its options, the bins and the tensor list. Caching needs data that can
    be read twice (a list, a tuple or a path); a one-shot iterator is not cached.
    ``means``: channel means taken while collecting (``ChannelMeans``), where the statistics
    are collected here, in one process.
    """
    if method not in METHODS:
        raise BadInputError(f"unknown calibration method '{method}' (use {', '.join(METHODS)})")
    if bins is None:
        bins = 0 if method == "minmax" else DEFAULT_BINS
    ir_model = oir.load(model)
    samples = load_samples(data)
    cache_path: Path | None = None
    recomputed: str | None = None  # why an entry found was not read
    if cache_dir is not None and isinstance(samples, (list, tuple)):
        key = hashlib.sha256(
            json.dumps(
                {
                    "model": model_hash(ir_model),
                    "data": data_hash(samples),
                    "method": method,
                    "options": {k: repr(v) for k, v in sorted(method_options.items())},
                    "bins": bins,
                    "tensors": list(tensors) if tensors is not None else None,
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()[:32]
        folder = Path(cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
        cache_path = folder / f"calib-{key}.npz"
        if cache_path.is_file():
            try:
                stats = CalibrationStats.load(cache_path)
            except BadInputError as error:  # a corrupt entry is recomputed (and rewritten) below
                recomputed = f"{error}; recomputed it"
                warnings.warn(recomputed, CacheRecomputedWarning, stacklevel=2)
            else:
                return CalibrationResult(_ranges(ir_model, stats, method, method_options), stats, method, True,
                                         str(cache_path))
    if executor is not None:
        stats = collect_statistics_sharded(ir_model, samples, executor, shards=shards, tensors=tensors, bins=bins,
                                           memory_budget_bytes=memory_budget_bytes)
    else:
        stats = collect_statistics(
            ir_model,
            samples,
            tensors=tensors,
            bins=bins,
            memory_budget_bytes=memory_budget_bytes,
            progress=progress,
            means=means,
        )
    if cache_path is not None:
        stats.save(cache_path)
    return CalibrationResult(
        _ranges(ir_model, stats, method, method_options), stats, method, False,
        None if cache_path is None else str(cache_path), recomputed,
    )


def _ranges(model: ir.Model, stats: CalibrationStats, method: str, options: Mapping[str, Any]
            ) -> dict[str, tuple[float, float]]:
    """Ranges by ``method``, except that the model's outputs keep their full min..max:
    clipping a model output (box coordinates, logits) is never what the user wants."""
    ranges = stats.ranges(method, **options)
    if method != "minmax":
        for value in model.graph.outputs:
            hist = stats.histograms.get(value.name or "")
            if hist is not None:
                ranges[value.name] = hist.range("minmax")
    return ranges
