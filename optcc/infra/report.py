"""What a run did, pass by pass: the Report object, its stable JSON form and a short summary.

JSON schema (``schema_version`` 1; fields are only ever added):

    {"schema_version": 1, "optcc_version", "onnx_version", "onnxruntime_version",
     "level", "model_before": ModelSummary, "model_after": ModelSummary,
     "passes": [PassRecord...], "verification": Verification | null,
     "warnings": [str], "total_time_s", "peak_rss_bytes"}
    ModelSummary: {"nodes", "op_histogram": {op: n}, "weight_bytes", "opset", "ir_version"}
    PassRecord:   {"name", "iteration" (round inside a fixpoint, else null),
                   "status": "changed"|"unchanged"|"reverted"|"failed",
                   "reason", "time_s", "nodes_before", "nodes_after",
                   "op_delta": {op: +/-n}, "bytes_before", "bytes_after", "stats",
                   "verification": Verification | null}
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
from typing import Any

import onnx
import onnx_ir as ir
import onnxruntime

from optcc import ir as oir

__all__ = ["ModelSummary", "PassRecord", "Report", "peak_rss_bytes"]

SCHEMA_VERSION = 1


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclasses.dataclass
class ModelSummary:
    nodes: int
    op_histogram: dict[str, int]
    weight_bytes: int
    opset: int
    ir_version: int

    @classmethod
    def of(cls, model: ir.Model) -> ModelSummary:
        histogram = oir.op_histogram(model)
        return cls(
            nodes=sum(histogram.values()),
            op_histogram=histogram,
            weight_bytes=oir.weight_bytes(model),
            opset=oir.default_opset(model),
            ir_version=int(model.ir_version or 0),
        )


def op_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Per op type, nodes after minus before; unchanged op types left out."""
    ops = sorted(set(before) | set(after))
    return {op: after.get(op, 0) - before.get(op, 0) for op in ops if after.get(op, 0) != before.get(op, 0)}


@dataclasses.dataclass
class PassRecord:
    name: str
    status: str
    iteration: int | None
    time_s: float
    nodes_before: int
    nodes_after: int
    op_delta: dict[str, int]
    bytes_before: int
    bytes_after: int
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    reason: str | None = None
    verification: dict[str, Any] | None = None


@dataclasses.dataclass
class Report:
    level: int | None = None
    model_before: ModelSummary | None = None
    model_after: ModelSummary | None = None
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    verification: dict[str, Any] | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    total_time_s: float = 0.0
    peak_rss_bytes: int = 0

    def reverted(self) -> list[PassRecord]:
        return [p for p in self.passes if p.status in ("reverted", "failed")]

    def to_dict(self) -> dict[str, Any]:
        from optcc.version import __version__

        body = dataclasses.asdict(self)
        return {
            "schema_version": SCHEMA_VERSION,
            "optcc_version": __version__,
            "onnx_version": onnx.__version__,
            "onnxruntime_version": onnxruntime.__version__,
            **body,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    def summary(self) -> str:
        """A few lines for a person: op counts before -> after, size, time, verdict."""
        lines = []
        before, after = self.model_before, self.model_after
        if before and after:
            delta = op_delta(before.op_histogram, after.op_histogram)
            changes = ", ".join(f"{op} {n:+d}" for op, n in delta.items()) or "no op changes"
            lines.append(f"nodes {before.nodes} -> {after.nodes} ({changes})")
            lines.append(f"weights {_size(before.weight_bytes)} -> {_size(after.weight_bytes)}")
        changed = sum(p.status == "changed" for p in self.passes)
        lines.append(
            f"passes: {len(self.passes)} run, {changed} changed the model, "
            f"{len(self.reverted())} reverted; {self.total_time_s:.2f} s, "
            f"peak RSS {_size(self.peak_rss_bytes)}"
        )
        for record in self.reverted():
            lines.append(f"  reverted {record.name}: {record.reason}")
        if self.verification is not None:
            lines.append(f"verify: {self.verification['summary']}")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
