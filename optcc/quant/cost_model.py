"""A deterministic model of onnxruntime CPU's run time for a float model and its QDQ form.

The INT8 speed decision is taken on this model, never on a clock: the same model and the
same calibration data give the same decision on any machine and under any load.
Measured latency may be reported next to it; it never decides.

What is modelled (the QDQ rules of onnxruntime's CPU execution provider, level >= 2):

- **Integer kernels.** A Conv, MatMul or Gemm whose data input and weight come from
  DequantizeLinear and whose result's only reader is a QuantizeLinear runs as
  QLinearConv / QLinearMatMul / QGemm; Add and Mul with both inputs dequantized and a
  quantized result run as QLinearAdd / QLinearMul; AveragePool, GlobalAveragePool and
  Concat likewise (QLinearAveragePool, QLinearGlobalAveragePool, QLinearConcat). Their
  DQ inputs and Q output are absorbed: no separate pass over the data.
- **Data movement on 8 bits.** Reshape, Transpose, Slice, Flatten, Squeeze, Unsqueeze,
  MaxPool, Resize and Split between a DQ and a Q run on the 8-bit tensor (the pair is
  dropped), moving a quarter of the float bytes.
- **Float islands and boundaries.** Every other op runs float; a DQ that feeds one of
  them, or a Q after one, is a separate kernel: one pass reading and writing the tensor.
- A Conv whose weight has one input channel per group (depthwise) is memory-bound: it
  gets its own MAC rates (onnxruntime's integer depthwise kernel is not faster than
  the float one).

Modelled seconds = the sum over ``FEATURES`` of the feature times its constant in
``CostModel``: kernels launched, multiply-accumulates (float, integer, depthwise float,
depthwise integer; from the weight's shape and the output's element count), bytes moved
by float kernels (4 per element read or written), elements moved by integer kernels,
and Q/DQ kernels left on their own with the elements they convert. Element counts of
the tensors come from calibration (mean elements per sample, ``CalibrationStats``), so
no shape inference is needed and the model sees the shapes the data have.

The constants depend on the CPU: onnxruntime's integer kernels run about four times as
many multiply-accumulates per second as its float ones on an x86-64 CPU with integer
dot-product instructions (VNNI), and about as many on one without them. ``CPU_CLASSES``
holds one ``CostModel`` per class; ``cpu_class`` picks the one asked for, else
``DEFAULT_CPU_CLASS`` on every machine (so that the same call writes the same bytes
anywhere), and says next to it the class of this machine's CPU by its feature flags
(``optcc.runtime.cpu``, never a timing) where that differs.

The constants were fitted by least squares on the log of the float32/INT8 latency ratio,
to interleaved measurements on onnxruntime CPU (MLAS, 2 intra-op threads, default graph
optimizations) of ``fixtures/tinycnn.onnx`` and corpus models, each fully quantized and
with Add/Mul/Concat kept float: "x86-vnni" on onnxruntime 1.2x (modelled vs measured
speedup: tinycnn 0.98 vs 0.95, PP-OCR cls 0.85 vs 0.75-0.80, YOLOv8 320n 2.3 vs 1.6-2.6,
PP-OCRv4 rec 1.84 vs 1.86, det 2.06 vs 2.1-2.5); "x86-avx2" on onnxruntime 1.32 (AMD
EPYC, AVX2), where only ``int8_macs`` was fitted and the other constants kept (freeing
the integer bytes, the depthwise rate or the Q/DQ costs lowered the error by no more
than the measurements' noise): ``benchmarks/fit_cost_model.py`` redoes the fit and
docs/int8.md shows its table. Only the ratio of the two
modelled times is used, so the decision does not depend on the machine's speed. The
model is deliberately coarse: it exists to tell "INT8 pays off" (large convolutions
and matrix products on 8 bits) from "INT8 costs more than it saves" (small models
where the per-kernel and Q/DQ overheads dominate), not to predict milliseconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx_ir as ir

from optcc import ir as oir
from optcc.errors import BadInputError
from optcc.runtime.cpu import CpuFeatures, this_cpu

__all__ = ["CostModel", "CPU_CLASSES", "DEFAULT_CPU_CLASS", "CpuClass", "class_of", "cpu_class", "Costs", "FEATURES",
           "features", "Workload", "modelled_seconds", "compare_modelled", "compare_workloads", "element_counts"]

# ops onnxruntime turns into integer kernels when wrapped in DQ -> op -> Q
_INTEGER = frozenset({"Conv", "MatMul", "Gemm", "Add", "Mul", "AveragePool", "GlobalAveragePool", "Concat"})
# ops that run on the 8-bit tensor when between DQ and Q (onnxruntime drops the pair)
_DROP_QDQ = frozenset({"Reshape", "Transpose", "Slice", "Flatten", "Squeeze", "Unsqueeze", "MaxPool",
                       "Resize", "Split"})
_SHAPE_ONLY = frozenset({"Shape", "Constant", "Identity", "Size"})


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Seconds per unit of each of ``FEATURES`` (see the module docstring)."""

    kernels: float = 2e-6  # per kernel launched (float or integer)
    float_macs: float = 1 / 22e9
    int8_macs: float = 1 / 85e9
    float_depthwise_macs: float = 1 / 11e9
    int8_depthwise_macs: float = 1 / 5e9  # onnxruntime's depthwise QLinearConv is slower than float's
    float_bytes: float = 1 / 40e9  # bytes read and written by float kernels
    int8_bytes: float = 1 / 9e9  # elements read and written by integer kernels (requantization included)
    boundary_kernels: float = 13e-6  # a Q or DQ that runs on its own
    boundary_elements: float = 1 / 2e9


# The constants by CPU class (module doc): x86-64 with integer dot-product instructions
# (AVX512-VNNI or AVX-VNNI), and x86-64 without them, where onnxruntime multiplies uint8 x
# int8 with AVX2's pairwise products (or AVX-512's, without VNNI). They differ in the
# integer MAC rate alone.
CPU_CLASSES: Mapping[str, CostModel] = MappingProxyType({
    "x86-vnni": CostModel(),
    "x86-avx2": CostModel(int8_macs=1 / 26e9),
})
# The class modelled unless one is chosen, whatever machine optcc runs on: the same call
# writes the same bytes on every machine (the design's determinism contract)
DEFAULT_CPU_CLASS = "x86-vnni"


def class_of(cpu: CpuFeatures) -> str | None:
    """The CPU class of ``cpu`` by its feature flags: "x86-vnni" or "x86-avx2" for x86-64,
    None for a CPU of no measured class."""
    if not cpu.x86:
        return None
    return "x86-vnni" if cpu.vnni else "x86-avx2"


@dataclasses.dataclass(frozen=True)
class CpuClass:
    """The CPU class whose constants decide, and how: ``source`` is "chosen" (by the
    caller) or "default" (``DEFAULT_CPU_CLASS``). ``machine``: the class of the CPU this
    runs on by its feature flags (None: of no measured class), said next to a default
    that differs from it, never used to decide."""

    name: str
    source: str
    machine: str | None = None

    @property
    def constants(self) -> CostModel:
        return CPU_CLASSES[self.name]

    def describe(self) -> str:
        """``x86-vnni (the default; this machine's CPU is x86-avx2: --int8-cpu x86-avx2 models it)``
        and the like."""
        if self.source == "chosen":
            return f"{self.name} (chosen)"
        if self.machine is None:
            return f"{self.name} (the default; this machine's CPU is of no measured class; --int8-cpu chooses one)"
        if self.machine != self.name:
            return f"{self.name} (the default; this machine's CPU is {self.machine}: --int8-cpu {self.machine} models it)"
        return f"{self.name} (the default, this machine's CPU's class; --int8-cpu chooses another)"

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.name, "source": self.source, "machine": self.machine, "description": self.describe()}


def cpu_class(choice: str | None = None, cpu: CpuFeatures | None = None) -> CpuClass:
    """The class ``choice`` names (BadInputError when it names none of ``CPU_CLASSES``), or,
    without one, ``DEFAULT_CPU_CLASS``, with the class of ``cpu`` (default: this machine's,
    by its feature flags) to say next to it."""
    if choice is not None:
        if choice not in CPU_CLASSES:
            raise BadInputError(f"unknown INT8 CPU class {choice!r} (use {', '.join(CPU_CLASSES)})")
        return CpuClass(choice, "chosen")
    return CpuClass(DEFAULT_CPU_CLASS, "default", class_of(this_cpu() if cpu is None else cpu))


@dataclasses.dataclass
class Costs:
    """Modelled seconds of one model, and how its kernels were classified."""

    seconds: float
    integer_kernels: int
    float_kernels: int
    boundaries: int  # Q or DQ kernels that run on their own

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def element_counts(stats: Any) -> dict[str, float]:
    """Mean elements per sample of every calibrated tensor (``CalibrationStats``)."""
    samples = max(int(getattr(stats, "samples", 0)), 1)
    return {name: h.count / samples for name, h in stats.histograms.items()}


def _const(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None else oir.as_numpy(value)


class _Counts:
    """Element count of a value, following Q/DQ back to the float tensor they carry, or
    forward through its Q -> DQ to the float tensor it became (a Conv whose Relu the
    quantization absorbed writes a new name; the graph output after its DQ keeps the old)."""

    def __init__(self, counts: Mapping[str, float]) -> None:
        self.counts = counts

    def __call__(self, value: ir.Value | None) -> float:
        start, seen = value, 0
        while value is not None and seen < 4:
            if value.name in self.counts:
                return float(self.counts[value.name])
            c = _const(value)
            if c is not None:
                return float(c.size)
            producer = value.producer()
            if producer is None or producer.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                break
            value = producer.inputs[0]
            seen += 1
        return self._after(start)

    def _after(self, value: ir.Value | None) -> float:
        for use in [] if value is None else value.uses():
            if use.node.op_type != "QuantizeLinear":
                continue
            for dq in use.node.outputs[0].uses():
                name = dq.node.outputs[0].name if dq.node.op_type == "DequantizeLinear" else None
                if name in self.counts:
                    return float(self.counts[name])
        return 0.0


def _is(value: ir.Value | None, op: str) -> bool:
    return value is not None and value.producer() is not None and value.producer().op_type == op


def _dq_of_const(value: ir.Value | None) -> bool:
    return _is(value, "DequantizeLinear") and _const(value.producer().inputs[0]) is not None  # type: ignore[union-attr]


def _only_read_by_q(value: ir.Value) -> bool:
    uses = list(value.uses())
    return bool(uses) and not value.is_graph_output() and all(u.node.op_type == "QuantizeLinear" for u in uses)


def _integer_node(node: ir.Node) -> bool:
    """Whether onnxruntime fuses ``node`` with its DQ inputs and Q output into one
    integer kernel (or runs it on the 8-bit tensor, for data movement)."""
    if node.domain not in ("", "ai.onnx") or not node.outputs:
        return False
    if node.op_type in _DROP_QDQ:
        data = node.inputs[0] if node.inputs else None
        return _is(data, "DequantizeLinear") and all(_only_read_by_q(o) for o in node.outputs)
    if node.op_type not in _INTEGER or len(node.outputs) != 1:
        return False
    inputs = [v for v in node.inputs if v is not None]
    if node.op_type in ("Conv", "Gemm"):
        data, weight = inputs[0], inputs[1] if len(inputs) > 1 else None
        if not (_is(data, "DequantizeLinear") and _dq_of_const(weight)):
            return False
    elif not all(_is(v, "DequantizeLinear") for v in inputs):
        return False
    if node.op_type == "Gemm" or node.op_type == "MatMul":
        return True  # QGemm / MatMulIntegerToFloat keep a float result when no Q follows
    return _only_read_by_q(node.outputs[0])


def _macs(node: ir.Node, count: _Counts) -> tuple[float, bool]:
    """Multiply-accumulates of a Conv/MatMul/Gemm (and whether it is depthwise)."""
    out = count(node.outputs[0]) if node.outputs else 0.0
    if node.op_type == "Conv" and len(node.inputs) > 1:
        w = _weight_shape(node.inputs[1])
        if w is None or len(w) < 3:
            return 0.0, False
        per_output = float(np.prod(w[1:]))
        group = node.attributes.get("group")
        depthwise = w[1] == 1 and group is not None and group.as_int() > 1
        return out * per_output, depthwise
    if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1:
        w = _weight_shape(node.inputs[1])
        if w is not None and len(w) >= 2:
            transposed = node.op_type == "Gemm" and node.attributes.get("transB") is not None and \
                node.attributes["transB"].as_int() == 1
            k = w[-1] if transposed else w[-2]
            return out * float(k), False
        a, b = count(node.inputs[0]), count(node.inputs[1])
        return float(np.sqrt(max(a * b * out, 0.0))), False
    return 0.0, False


def _weight_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    while value is not None:
        c = _const(value)
        if c is not None:
            return tuple(c.shape)
        producer = value.producer()
        if producer is None or producer.op_type != "DequantizeLinear":
            return None
        value = producer.inputs[0]
    return None


FEATURES = ("kernels", "float_macs", "int8_macs", "float_depthwise_macs", "int8_depthwise_macs",
            "float_bytes", "int8_bytes", "boundary_kernels", "boundary_elements")


def features(model: ir.Model, counts: Mapping[str, float]) -> tuple[dict[str, float], Costs]:
    """What the model's run time is made of (``FEATURES``), from its main graph."""
    count = _Counts(counts)
    f = dict.fromkeys(FEATURES, 0.0)
    integer = floating = boundaries = 0
    fused: set[ir.Node] = {n for n in model.graph if _integer_node(n)}
    for node in model.graph:
        op = node.op_type
        if op in _SHAPE_ONLY:
            continue
        if op in ("DequantizeLinear", "QuantizeLinear"):
            if op == "DequantizeLinear":
                readers = [u.node for u in node.outputs[0].uses()]
                if readers and all(r in fused for r in readers) and not node.outputs[0].is_graph_output():
                    continue  # absorbed by the integer kernels that read it (weights: prepacked)
            else:
                producer = node.inputs[0].producer() if node.inputs[0] is not None else None
                if producer is not None and producer in fused:
                    continue
            f["boundary_kernels"] += 1
            f["boundary_elements"] += count(node.inputs[0])
            boundaries += 1
            continue
        macs, depthwise = _macs(node, count)
        data = [v for v in node.inputs if v is not None and _const(v) is None and not _dq_of_const(v)]
        elements = sum(count(v) for v in data) + sum(count(v) for v in node.outputs)
        f["kernels"] += 1
        if node in fused:
            integer += 1
            f["int8_depthwise_macs" if depthwise else "int8_macs"] += macs
            f["int8_bytes"] += elements
        else:
            floating += 1
            f["float_depthwise_macs" if depthwise else "float_macs"] += macs
            f["float_bytes"] += 4.0 * elements
    return f, Costs(0.0, integer, floating, boundaries)


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one model's modelled run time is made of (``features``), read from its graph
    once and then costed for any CPU class's constants: the features do not depend on the
    constants, so a model costed for two classes, or compared with many candidates, is
    read once (``costs`` gives what ``modelled_seconds`` gives, to the bit)."""

    features: dict[str, float]
    kernels: Costs  # the kernels as classified; ``seconds`` unset

    @classmethod
    def of(cls, model: ir.Model, counts: Mapping[str, float]) -> Workload:
        """``model``'s workload (``counts``: mean elements per sample of the float tensors)."""
        found, kernels = features(model, counts)
        return cls(found, kernels)

    def costs(self, constants: CostModel = CostModel()) -> Costs:
        """The modelled seconds with ``constants``, and the kernels as classified."""
        seconds = sum(self.features[name] * getattr(constants, name) for name in FEATURES)
        return dataclasses.replace(self.kernels, seconds=seconds)


def modelled_seconds(model: ir.Model, counts: Mapping[str, float], constants: CostModel = CostModel()) -> Costs:
    """The modelled run time of ``model``'s main graph on onnxruntime CPU (see module doc).
    ``counts``: mean elements per sample of the float tensors, by name."""
    return Workload.of(model, counts).costs(constants)


def compare_modelled(reference: ir.Model, candidate: ir.Model, counts: Mapping[str, float],
                     constants: CostModel = CostModel()) -> dict[str, Any]:
    """Modelled seconds of both models and ``speedup`` = float32 / candidate."""
    return compare_workloads(Workload.of(reference, counts), Workload.of(candidate, counts), constants)


def compare_workloads(reference: Workload, candidate: Workload, constants: CostModel = CostModel()) -> dict[str, Any]:
    """``compare_modelled`` of the models whose workloads these are."""
    ref = reference.costs(constants)
    cand = candidate.costs(constants)
    return {
        "float32": ref.to_dict(),
        "int8": cand.to_dict(),
        "speedup": ref.seconds / cand.seconds if cand.seconds > 0 else float("inf"),
        "constants": dataclasses.asdict(constants),
    }
