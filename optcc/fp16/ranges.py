"""Observe a model's main-graph values in onnxruntime: ranges for float16 safety, and the
values themselves for comparing a float16 candidate with its float32 original.

Every node output of the main graph is added as an extra graph output, the model runs on
onnxruntime's CPU provider with graph optimizations disabled, and per float tensor the
largest |value|, the fraction of non-zero values that float16 flushes to zero (and the
tensor's SQNR once stored in float16, which says whether those values matter), and the
reduction extent seen by reduce ops are recorded over all samples. (Values inside
If/Loop/Scan bodies cannot be graph outputs; the pass judges bodies by the control-flow
node's outputs and by the final accuracy check.)

One sample's values of every main-graph tensor are many times the model's size for a
convolutional net on a large image, so no function here holds more than one sample's
values at once: ``observe`` merges each sample into the ranges and drops it before the
next run (keeping only its graph outputs), and ``values_sqnr`` fetches the values it compares
a part at a time. Both hand what they freed back to the system (``release_memory``): left
in the C heap, one sample's values (a sizeable share of a large model's weights) would stay
resident for the rest of the run, beside every later session's weights.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from optcc import ir as oir
from optcc.fp16.rewrite import flat_chunks
from optcc.ir.heap import release_memory
from optcc.numerics.metrics import sqnr_db as powers_db
from optcc.runtime import detached, make_session, session_options

FP16_TINY = 2.0**-24  # smallest float16 subnormal; half of it rounds to zero


@dataclasses.dataclass
class TensorRange:
    max_abs: float = 0.0
    flushed_fraction: float = 0.0  # of the non-zero values, how many become 0 in float16
    size: int = 0
    rounding_sqnr_db: float = math.inf  # the tensor's own SQNR once stored in float16 (worst sample)

    def merge(self, array: np.ndarray) -> None:
        # in the array's own float type: |x|, its maximum and comparisons with a power of two
        # are exact there, so no float64 copy is needed
        a = np.abs(array)
        finite = np.isfinite(a)
        if not finite.all():
            if np.isinf(a).any():
                self.max_abs = math.inf
            a = a[finite]
        if a.size and self.max_abs != math.inf:
            self.max_abs = max(self.max_abs, float(a.max()))
        nonzero = np.count_nonzero(a)
        if nonzero:
            # |x| < tiny/2, not 0 (no float16 value lies there, and tiny/2 rounds to 0 in float16)
            flushed = 0 if a.dtype == np.float16 else np.count_nonzero(a < FP16_TINY / 2) - (a.size - nonzero)
            self.flushed_fraction = max(self.flushed_fraction, flushed / nonzero)
            if flushed:
                self.rounding_sqnr_db = min(self.rounding_sqnr_db, float16_rounding_sqnr_db(a))
        self.size = max(self.size, int(array.size))


def float16_rounding_sqnr_db(array: np.ndarray) -> float:
    """SQNR of ``array`` against itself stored in float16 (values beyond +-65504 clamped):
    about 70 dB for normal values; far lower when values that carry the signal flush to 0."""
    signal = noise = 0.0
    for chunk in flat_chunks(array):  # a chunk's float64 temporaries at a time
        a = np.asarray(chunk, dtype=np.float64)
        a = a[np.isfinite(a)]
        rounded = np.clip(a, -65504.0, 65504.0).astype(np.float16).astype(np.float64)
        signal += float(np.sum(a ** 2))
        noise += float(np.sum((a - rounded) ** 2))
    return powers_db(signal, noise)


def finite_abs_max(array: np.ndarray) -> float | None:
    """The largest |x| over the finite values of ``array`` (None: none is finite), read a
    chunk at a time."""
    peaks = [float(np.abs(finite).max()) for chunk in flat_chunks(array)
             if (finite := chunk[np.isfinite(chunk)]).size]
    return max(peaks) if peaks else None


def with_all_outputs(model: ir.Model) -> onnx.ModelProto:
    """The model's proto with every named node output of the main graph as a graph output."""
    proto = oir.serialize(model)
    present = {o.name for o in proto.graph.output}
    inferred = {v.name: v for v in proto.graph.value_info}
    for node in proto.graph.node:
        for name in node.output:
            if name and name not in present:
                present.add(name)
                info = inferred.get(name) or onnx.ValueInfoProto(name=name)
                proto.graph.output.append(info)
    return proto


def _probe(model: ir.Model, skip: Collection[str] = (), only: Collection[str] | None = None) -> ir.Model:
    """A clone of ``model`` (tensors shared, not copied) whose graph also outputs every
    named node output of the main graph (but those named in ``skip``; with ``only``, those
    named there alone). onnxruntime holds every graph output until the run ends, fetched
    or not: a probe's run holds all the values it outputs."""
    probe = model.clone()
    for value in _probed_values(probe.graph, skip, only):
        probe.graph.outputs.append(value)
    return probe


def _probed_names(model: ir.Model, skip: Collection[str] = ()) -> list[str]:
    """The names of the values ``_probe(model, skip)`` outputs, in its order."""
    return [v.name for v in (*model.graph.outputs, *_probed_values(model.graph, skip))]


def _probed_values(graph: ir.Graph, skip: Collection[str] = (), only: Collection[str] | None = None) -> list[ir.Value]:
    """The named node outputs of ``graph`` a probe adds to its outputs, in graph order: not
    graph outputs already, none named in ``skip``, and with ``only`` those named there alone."""
    present = set(graph.outputs)
    found = []
    for node in graph:
        for value in node.outputs:
            if value.name and value not in present and value.name not in skip and (only is None or value.name in only):
                present.add(value)
                found.append(value)
    return found


def session(model: ir.Model, provider: str = "CPUExecutionProvider",
            scratch: str | os.PathLike | None = None, *, arena: bool = True) -> ort.InferenceSession:
    """A session on ``model`` with onnxruntime's graph optimizations off. A model with
    external data (or too large for one protobuf) is saved into ``scratch`` and loaded from
    that path: a session built from bytes cannot find external data. ``arena`` off: memory
    freed during a run goes back to the system (the float32 copies of float16 weights that
    onnxruntime's CPU kernels make are then not kept)."""
    return make_session(model, provider, scratch=scratch, options=session_options(arena=arena))


def values_of(model: ir.Model, sample: Mapping[str, np.ndarray], names: Collection[str],
              scratch: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The numeric main-graph values named in ``names`` (node or graph outputs; others are
    left out) of one run of ``model`` on ``sample`` that outputs only those (and the graph's)."""
    probe = session(_probe(model, only=names), scratch=scratch, arena=False)
    outputs = [o.name for o in probe.get_outputs()]
    return {name: array for name, array in _numeric(outputs, probe.run(None, dict(sample))).items() if name in names}


@dataclasses.dataclass
class Observation:
    """What ``observe`` saw: per float value (node outputs and feeds) its range over all
    samples; per one-element boolean the values it took; per numeric node output its element
    type and size in bytes on the first sample; and per sample, the model's graph outputs."""

    ranges: dict[str, TensorRange]
    taken: dict[str, frozenset[bool]]
    dtypes: dict[str, np.dtype]
    nbytes: dict[str, int]
    outputs: list[list[np.ndarray]]  # per sample, the graph outputs in the graph's order


def observe(model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]],
            scratch: str | os.PathLike | None = None) -> Observation:
    """Run ``model`` on every sample, fetching every main-graph value, into an
    ``Observation``: the ranges of every float node output and float feed over all samples,
    the values each one-element boolean (an If's condition) took, of the first sample the
    node outputs' types and sizes, and of every sample the graph outputs. Each sample's
    other values are merged and dropped before the next run: one sample's values are held
    at once, and every sample's graph outputs. The graph outputs are those a session on
    ``model`` alone computes (``session``'s options but the arena, which places values
    without changing them): a probe's added outputs keep values alive, they change none."""
    probe = session(_probe(model), scratch=scratch, arena=False)
    names = [o.name for o in probe.get_outputs()]
    graph_outputs = len(model.graph.outputs)  # the probe's first outputs (``_probe``)
    seen = Observation({}, {}, {}, {}, [])
    for i, sample in enumerate(feeds):
        arrays = probe.run(None, dict(sample))
        seen.outputs.append(detached(arrays[:graph_outputs]))
        values = _numeric(names, arrays)
        del arrays
        for name, array in [*values.items(), *sample.items()]:
            if isinstance(array, np.ndarray) and np.issubdtype(array.dtype, np.floating):
                seen.ranges.setdefault(name, TensorRange()).merge(array)
            elif isinstance(array, np.ndarray) and array.dtype == bool and array.size == 1:
                seen.taken[name] = seen.taken.get(name, frozenset()) | {bool(array.reshape(-1)[0])}
        if i == 0:
            seen.dtypes = {name: array.dtype for name, array in values.items()}
            seen.nbytes = {name: int(array.nbytes) for name, array in values.items()}
        del values  # before the next run: its values replace these
    del probe
    release_memory()  # a sample's values, freed, would stay in the C heap for the rest of the run
    return seen


def values_sqnr(reference: ir.Model, candidate: ir.Model, reference_sample: Mapping[str, np.ndarray],
                candidate_sample: Mapping[str, np.ndarray], names: Collection[str], nbytes: Mapping[str, int],
                *, part_bytes: int, scratch: str | os.PathLike | None = None,
                skip: Collection[str] = ()) -> dict[str, float]:
    """``sqnr_db`` of each numeric main-graph value named in ``names`` that both models
    compute (the candidate's named in ``skip`` aside), the candidate's against the
    reference's, each model run on its sample. The values are compared in parts, in the
    reference's order, each part holding at most ``part_bytes`` of the reference's values
    by ``nbytes`` (a value larger than that alone): per part, each model runs once as a
    probe that outputs that part alone, one session at a time, so about twice
    ``part_bytes`` of values are held at once, never every value of a sample."""
    computed = set(_probed_names(candidate, skip))
    wanted = [name for name in _probed_names(reference) if name in names and name in computed]
    result: dict[str, float] = {}
    for part in _parts(wanted, nbytes, part_bytes):
        ref = values_of(reference, reference_sample, part, scratch)
        got = values_of(candidate, candidate_sample, part, scratch)
        result.update({name: sqnr_db(ref[name], got[name]) for name in part if name in ref and name in got})
        del ref, got  # before the next part's runs
        release_memory()  # the part's values go back to the system, not to the C heap
    return result


def _parts(names: Sequence[str], nbytes: Mapping[str, int], limit: int) -> list[list[str]]:
    """``names`` in order, cut into consecutive parts of at most ``limit`` bytes by
    ``nbytes`` (a name missing there counts 0; one larger than ``limit`` is a part alone)."""
    parts: list[list[str]] = []
    held = 0
    for name in names:
        size = nbytes.get(name, 0)
        if not parts or held + size > limit:
            parts.append([])
            held = 0
        parts[-1].append(name)
        held += size
    return parts


def _numeric(names: Sequence[str], arrays: Sequence[object]) -> dict[str, np.ndarray]:
    """The numeric and boolean arrays among a run's outputs, by name."""
    return {n: np.asarray(a) for n, a in zip(names, arrays)
            if isinstance(a, np.ndarray) and (np.issubdtype(a.dtype, np.number) or a.dtype == bool)}


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``candidate`` against ``reference`` in dB
    (inf when equal; -inf when shapes differ or non-finite values disagree)."""
    if reference.shape != candidate.shape:
        return -math.inf
    r = reference.astype(np.float64)
    c = candidate.astype(np.float64)
    finite = np.isfinite(r)
    if not np.array_equal(finite, np.isfinite(c)):
        return -math.inf
    noise = float(np.sum((r[finite] - c[finite]) ** 2))
    return powers_db(float(np.sum(r[finite] ** 2)), noise)
