"""Observe a model's main-graph values in onnxruntime: ranges for float16 safety, and the
values themselves for comparing a float16 candidate with its float32 original.

Every node output of the main graph is added as an extra graph output, the model runs on
onnxruntime's CPU provider with graph optimizations disabled, and per float tensor the
largest |value|, the fraction of non-zero values that float16 flushes to zero (and the
tensor's SQNR once stored in float16, which says whether those values matter), and the
reduction extent seen by reduce ops are recorded over all samples. (Values inside
If/Loop/Scan bodies cannot be graph outputs; the pass judges bodies by the control-flow
node's outputs and by the final accuracy check.)
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
from optcc.numerics.metrics import sqnr_db as powers_db
from optcc.runtime import make_session, session_options

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
    a = np.asarray(array, dtype=np.float64)
    a = a[np.isfinite(a)]
    rounded = np.clip(a, -65504.0, 65504.0).astype(np.float16).astype(np.float64)
    return sqnr_db(a, rounded)


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


def _probe(model: ir.Model, skip: Collection[str] = ()) -> ir.Model:
    """A clone of ``model`` (tensors shared, not copied) whose graph also outputs every
    named node output of the main graph (but those named in ``skip``)."""
    probe = model.clone()
    present = set(probe.graph.outputs)
    for node in probe.graph:
        for value in node.outputs:
            if value.name and value not in present and value.name not in skip:
                present.add(value)
                probe.graph.outputs.append(value)
    return probe


def session(model: ir.Model, provider: str = "CPUExecutionProvider",
            scratch: str | os.PathLike | None = None, *, arena: bool = True) -> ort.InferenceSession:
    """A session on ``model`` with onnxruntime's graph optimizations off. A model with
    external data (or too large for one protobuf) is saved into ``scratch`` and loaded from
    that path: a session built from bytes cannot find external data. ``arena`` off: memory
    freed during a run goes back to the system (the float32 copies of float16 weights that
    onnxruntime's CPU kernels make are then not kept)."""
    return make_session(model, provider, scratch=scratch, options=session_options(arena=arena))


def run_all(model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]],
            scratch: str | os.PathLike | None = None, skip: Collection[str] = ()) -> list[dict[str, np.ndarray]]:
    """Every main-graph value of the model (but those named in ``skip``), per sample
    (numeric tensors: floats for ranges and comparison, integers so that shape/index
    inputs can be probed with real data)."""
    probe = session(_probe(model, skip), scratch=scratch)
    names = [o.name for o in probe.get_outputs()]
    return [_numeric(names, probe.run(None, dict(sample))) for sample in feeds]


def observe(model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]],
            scratch: str | os.PathLike | None = None
            ) -> tuple[dict[str, np.ndarray], dict[str, TensorRange], dict[str, frozenset[bool]]]:
    """The first sample's main-graph values (as ``run_all``), the ranges of every float
    node output and float feed over all samples, and the values each one-element boolean
    (an If's condition) took over the samples; a later sample's values are merged into the
    ranges and dropped, so at most two samples' values are held at once."""
    probe = session(_probe(model), scratch=scratch)
    names = [o.name for o in probe.get_outputs()]
    first: dict[str, np.ndarray] = {}
    found: dict[str, TensorRange] = {}
    taken: dict[str, frozenset[bool]] = {}
    for i, sample in enumerate(feeds):
        values = _numeric(names, probe.run(None, dict(sample)))
        for name, array in [*values.items(), *sample.items()]:
            if isinstance(array, np.ndarray) and np.issubdtype(array.dtype, np.floating):
                found.setdefault(name, TensorRange()).merge(array)
            elif isinstance(array, np.ndarray) and array.dtype == bool and array.size == 1:
                taken[name] = taken.get(name, frozenset()) | {bool(array.reshape(-1)[0])}
        if i == 0:
            first = values
    return first, found, taken


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
