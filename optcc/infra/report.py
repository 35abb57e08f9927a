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

Added fields: ``"layers": [LayerRecord...]``, the per-layer precision table of FP16/INT8
(empty when nothing chose a precision per layer); ``"interface": [str]``, the declared
graph input and output types that loading filled in or made valid (a type shape inference
gives an untyped output; Paddle's ``FLOAT[]`` and ``-1`` dims made unknown), one line each.

    LayerRecord: {"name": node name (else a label such as "Conv#12"),
                  "op_type": str | null,
                  "precision": "int8" | "float16" | "float32" (what the written model computes),
                  "reason": why this precision, in words,
                  "error_db": SQNR in dB of the error this layer's precision causes (higher is
                              better; for INT8: the model outputs' worst SQNR with this layer
                              alone quantized) | null,
                  "error_rel": max relative error this layer's precision causes | null,
                  "pass": the pass that chose it}

A pass fills the table by putting a list of LayerRecord dicts (``name`` and ``precision``
required, ``pass`` filled in) into its stats under ``"layers"``; other shapes of a
``"layers"`` stat (a list of names, a dict) are not LayerRecords. For passes that do not, the table is derived from what
they already report: ConvertFloat16Pass's ``kept_float32`` (label -> reason) and the INT8
driver's ``pass.layers`` (quantized), ``fallback.kept_float`` and ``fallback.sensitivity``.
Records of reverted or failed passes are left out: their precision is not in the output.

Renderings: ``to_json()``, ``summary()`` (a few lines, with the worst layers by error),
``to_html()`` (one self-contained page, ``optcc.infra.report_html``); ``render_for(path)``
picks HTML for a ``.html``/``.htm`` path, JSON otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
import onnx_ir as ir
import onnxruntime

from optcc import ir as oir
from optcc.numerics.verify import named_task_rows

__all__ = ["LAYER_PRECISIONS", "ModelSummary", "PassRecord", "Report", "layers_from_stats", "peak_rss_bytes"]

SCHEMA_VERSION = 1
LAYER_PRECISIONS = ("int8", "float16", "float32")
LAYER_FIELDS = ("name", "op_type", "precision", "reason", "error_db", "error_rel", "pass")
SUMMARY_LAYERS = 10  # rows of the per-layer table in summary()


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
    def of(cls, model: ir.Model, summary: tuple[dict[str, int], int] | None = None) -> ModelSummary:
        """``summary``: the model's ``oir.histogram_and_weight_bytes`` when the caller has it."""
        histogram, weights = summary if summary is not None else oir.histogram_and_weight_bytes(model)
        return cls(
            nodes=sum(histogram.values()),
            op_histogram=histogram,
            weight_bytes=weights,
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
    # the declared graph input/output types loading changed, one line each (``optcc.ir.interface``)
    interface: list[str] = dataclasses.field(default_factory=list)
    # how the command line ended, for a job that reads the report instead of the exit code:
    # ``exit_code``, ``output`` (the path written, or None: nothing written), ``declined``
    # (each precision asked for and not applied: why) and, when the run ended with an error,
    # ``error`` (the line said, after "optcc: "); a run that ended before it had a result
    # writes a report holding this alone; None from the Python API
    outcome: dict[str, Any] | None = None

    def reverted(self) -> list[PassRecord]:
        return [p for p in self.passes if p.status in ("reverted", "failed")]

    def layer_table(self) -> list[dict[str, Any]]:
        """The per-layer precision table (LayerRecord dicts, graph order, pass by pass)."""
        rows: list[dict[str, Any]] = []
        for record in self.passes:
            if record.status in ("reverted", "failed"):
                continue
            rows.extend(layers_from_stats(record.name, record.stats))
        return rows

    def to_dict(self) -> dict[str, Any]:
        from optcc.version import __version__

        body = dataclasses.asdict(self)
        return {
            "schema_version": SCHEMA_VERSION,
            "optcc_version": __version__,
            "onnx_version": onnx.__version__,
            "onnxruntime_version": onnxruntime.__version__,
            **body,
            "layers": self.layer_table(),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    def to_html(self, model: str | None = None) -> str:
        """One self-contained HTML page (inline CSS, SVG charts and script; nothing fetched).
        Charts need the ``report`` extra (pygal); without it the page has the tables and
        says so. ``model``: the name shown in the title."""
        from optcc.infra.report_html import render_html

        return render_html(self.to_dict(), model=model)

    def render_for(self, path: str | os.PathLike, model: str | None = None) -> str:
        """The report as the text to write to ``path``: HTML for ``.html``/``.htm``, else JSON."""
        if os.fspath(path).lower().endswith((".html", ".htm")):
            return self.to_html(model=None if model is None else os.path.basename(os.fspath(model)))
        return self.to_json()

    def summary(self, top: int = SUMMARY_LAYERS) -> str:
        """A few lines for a person: op counts before -> after, size, time, the ``top``
        layers by error of the per-layer precision table (FP16/INT8), verdict."""
        lines = []
        before, after = self.model_before, self.model_after
        if before and after:
            delta = op_delta(before.op_histogram, after.op_histogram)
            changes = ", ".join(f"{op} {n:+d}" for op, n in delta.items()) or "no op changes"
            lines.append(f"nodes {before.nodes} -> {after.nodes} ({changes})")
            lines.append(f"weights {format_bytes(before.weight_bytes)} -> {format_bytes(after.weight_bytes)}")
        lines.extend(f"interface: {note}" for note in self.interface)
        changed = sum(p.status == "changed" for p in self.passes)
        lines.append(
            f"passes: {len(self.passes)} run, {changed} changed the model, "
            f"{len(self.reverted())} reverted; {self.total_time_s:.2f} s, "
            f"peak RSS {format_bytes(self.peak_rss_bytes)}"
        )
        for record in self.reverted():
            lines.append(f"  reverted {record.name}: {record.reason}")
        kept = (_kept_float_line(record) for record in self.passes if record.status != "reverted")
        lines.extend(line for line in kept if line)
        lines.extend(_layer_lines(self.layer_table(), top))
        lines.extend(line for line in map(_fallback_line, self.passes) if line)
        lines.extend(f"int8 speed: {r.stats['speed']}" for r in self.passes if isinstance(r.stats.get("speed"), str))
        lines.extend(f"weights: {r.stats['mixed']['summary']}" for r in self.passes
                     if isinstance(r.stats.get("mixed"), Mapping) and isinstance(r.stats["mixed"].get("summary"), str))
        lines.extend(f"{r.name}: {r.stats['search']['summary']}" for r in self.passes
                     if isinstance(r.stats.get("search"), Mapping) and isinstance(r.stats["search"].get("summary"), str))
        if self.verification is not None:
            lines.append(f"verify: {self.verification['summary']}")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def _kept_float_line(record: PassRecord) -> str:
    """Why a quantizing pass left nodes float, counted by reason (its ``stats["kept_float"]``:
    reason -> count); "" when it reports none."""
    kept = record.stats.get("kept_float")
    if not isinstance(kept, Mapping) or not kept or not all(isinstance(n, int) for n in kept.values()):
        return ""
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(kept.items(), key=lambda item: (-item[1], item[0])))
    return f"{record.name} kept float: {reasons}"


def _fallback_line(record: PassRecord) -> str:
    """Why INT8's accuracy fallback returned layers to float: the fully quantized model's
    deviation on the samples the fallback judged (each output's task rows, else its SQNR
    and the target); "" when the model shipped returns none to float for accuracy."""
    fallback = record.stats.get("fallback")
    if record.status != "changed" or not isinstance(fallback, Mapping) or not fallback.get("kept_float"):
        return ""
    initial = fallback.get("initial")
    if not isinstance(initial, Mapping) or initial.get("passed") is not False:
        return ""
    sqnr = initial.get("sqnr_db") if isinstance(initial.get("sqnr_db"), Mapping) else {}
    task = initial.get("task")
    if isinstance(task, Mapping):
        said = named_task_rows(task, sqnr)
    else:
        target = _number((initial.get("target") or {}).get("min_sqnr_db"))
        said = [f"'{name}' SQNR {value:.1f} dB" + (f" < {target:g} dB target" if target is not None and value < target
                                                   else "") for name, db in sqnr.items()
                for value in [_number(db)] if value is not None]
    count = len(fallback["kept_float"])
    return (f"int8 fallback: {count} layer{'s' if count != 1 else ''} returned to float; fully quantized, on the "
            f"samples it judged: {'; '.join(said) or 'missed the target'}")


def format_bytes(n: float) -> str:
    """A byte count for people: 512 B, 31.4 KiB, 1.8 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def short_reason(reason: str, limit: int) -> str:
    """``reason`` within ``limit`` characters, cut only between words and never inside
    parentheses: whole when it fits; else without its parenthesized asides; else its
    leading clauses (each ended by '; ') that fit, then '; ...'; else its leading words,
    then ' ...'."""
    if len(reason) <= limit:
        return reason
    plain = _without_asides(reason).strip() or reason  # a reason all aside is cut as words
    if len(plain) <= limit:
        return plain
    clauses = plain.split("; ")
    kept = [c for i, c in enumerate(clauses) if len("; ".join(clauses[:i + 1])) + len("; ...") <= limit]
    if kept:
        return "; ".join(kept) + "; ..."
    return plain[:limit - len(" ...")].rsplit(" ", 1)[0] + " ..."


def _without_asides(text: str) -> str:
    """``text`` without its parenthesized parts (and the space before each); ``text`` itself
    when its parentheses do not pair up."""
    kept, depth = [], 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                return text
        elif depth == 0:
            kept.append(char)
    return text if depth else re.sub(r" +(?=[;:,.]|$)", "", re.sub(r" {2,}", " ", "".join(kept)))


# --------------------------------------------------------------------------- per-layer table


def layers_from_stats(pass_name: str, stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The LayerRecords one pass's stats describe (see the module docstring); [] if none."""
    given = stats.get("layers")
    if isinstance(given, list) and given and all(isinstance(r, Mapping) and "precision" in r for r in given):
        return [_record(pass_name=pass_name, **{k: r.get(k) for k in LAYER_FIELDS if k != "pass"})
                for r in given]
    if isinstance(stats.get("kept_float32"), Mapping):
        return _float16_layers(pass_name, stats)
    if isinstance(stats.get("pass"), Mapping) and isinstance(stats.get("fallback"), Mapping):
        return _int8_layers(pass_name, stats)
    if isinstance(given, list) and isinstance(stats.get("kept_float"), Mapping):  # QuantizeInt8Pass alone
        return [_record(name, None, "int8", "quantized", pass_name=pass_name) for name in given]
    return []


def _record(name: Any, op_type: Any = None, precision: Any = "float32", reason: Any = "",
            error_db: Any = None, error_rel: Any = None, *, pass_name: str) -> dict[str, Any]:
    return {"name": str(name), "op_type": None if op_type is None else str(op_type),
            "precision": str(precision), "reason": "" if reason is None else str(reason),
            "error_db": _number(error_db), "error_rel": _number(error_rel), "pass": pass_name}


def _number(value: Any) -> float | None:
    """A finite float, or None (JSON writes NaN and infinities as strings elsewhere)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _plus_infinity(value: Any) -> bool:
    """Whether ``value`` is +inf (a float, or the string JSON writes for it)."""
    try:
        return float(value) == math.inf
    except (TypeError, ValueError):
        return False


def _op_from_label(label: str) -> str | None:
    """ConvertFloat16Pass labels unnamed nodes "<op>#<key>"."""
    op, sep, key = label.rpartition("#")
    return op if sep and key.isdigit() and op else None


def _float16_layers(pass_name: str, stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    kept = stats.get("kept_float32") or {}
    ops = stats.get("kept_float32_ops") or {}
    return [_record(label, ops.get(label) or _op_from_label(label), "float32", reason, pass_name=pass_name)
            for label, reason in kept.items()]


def _int8_layers(pass_name: str, stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    fallback = stats.get("fallback") or {}
    sensitivity = {row.get("layer"): row for row in fallback.get("sensitivity") or [] if isinstance(row, Mapping)}

    def error(name: str) -> float | None:
        """The first measured of the layer's SQNRs, the outputs' view of it first, then its
        result's (accumulated in the quantized model, or its own error alone): infinite when
        its error alone leaves the outputs unchanged (that is measured too)."""
        row = sensitivity.get(name) or {}
        for key in ("model_sqnr_db", "output_sqnr_db", "propagated_sqnr_db", "local_sqnr_db"):
            value = _number(row.get(key))
            if value is None and key in ("model_sqnr_db", "output_sqnr_db") and _plus_infinity(row.get(key)):
                return math.inf
            if value is not None:
                return value
        return None

    def alone(name: str) -> str:  # a finite SQNR is the row's ``error_db``, said there alone
        return " (quantized alone: the outputs do not change)" if error(name) == math.inf else ""

    ops = stats.get("layer_ops") or {}
    if stats.get("declined"):
        why = f"INT8 declined ({stats['declined']}): {stats.get('reason') or 'see warnings'}"
        return [_record(name, ops.get(name), "float32", why + alone(name), error(name), pass_name=pass_name)
                for name in sensitivity]
    quantized = (stats.get("pass") or {}).get("layers") or []
    rows = [_record(name, ops.get(name), "int8", "quantized" + alone(name), error(name), pass_name=pass_name)
            for name in quantized]
    rows += [_record(name, ops.get(name), "float32", "returned to float by the accuracy fallback" + alone(name),
                     error(name), pass_name=pass_name)
             for name in fallback.get("kept_float") or []]
    return rows


def _worst_first(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows with an error first, worst first (lowest SQNR, else highest relative error);
    then those without, the wider precisions first (layers kept back, with their reason)."""
    def key(row: Mapping[str, Any]) -> tuple[int, float]:
        if row.get("error_db") is not None:
            return (0, row["error_db"])
        if row.get("error_rel") is not None:
            return (1, -row["error_rel"])
        wide = LAYER_PRECISIONS.index(row["precision"]) if row["precision"] in LAYER_PRECISIONS else -1
        return (2, -wide)
    return sorted(rows, key=key)


SHORT_REASON = 48  # a reason at most this long is written in its rows; a longer one once, below the table
SQNR_LEGEND = "SQNR dB: the outputs' SQNR with that layer alone quantized, lower is worse"


def _layer_lines(rows: Sequence[Mapping[str, Any]], top: int) -> list[str]:
    """The per-layer table of summary(): counts by precision, then the ``top`` worst rows.
    Each name is written whole, in the last column (a name ``--int8-exclude`` can be
    given); a reason shared by every row is written once above the table, a long one once
    below it (the rows say ``[n]``), a short one in its rows."""
    if not rows or top <= 0:
        return []
    order = [*LAYER_PRECISIONS, *sorted({r["precision"] for r in rows} - set(LAYER_PRECISIONS))]
    counts = {p: sum(r["precision"] == p for r in rows) for p in order}
    head = "layers: " + ", ".join(f"{p} {n}" for p, n in counts.items() if n)
    measured = any(r.get("error_db") is not None or r.get("error_rel") is not None for r in rows)
    # rows all of one narrow precision say the same thing; rows all kept float32 each say why
    precisions = {r["precision"] for r in rows}
    if not measured and len(precisions) == 1 and precisions != {"float32"} and len(rows) > top:
        return [head + " (no per-layer error measured)"]
    shown = _worst_first(rows)[:top]
    by_db = any(r.get("error_db") is not None for r in shown)
    by_rel = any(r.get("error_rel") is not None for r in shown)
    if len(shown) < len(rows):
        head += (f" (worst {len(shown)} by {'SQNR' if by_db else 'max rel'})" if measured
                 else f" ({len(shown)} shown)")
    lines = [head]
    if by_db:
        lines.append(f"  {SQNR_LEGEND}")
    reasons = list(dict.fromkeys(r.get("reason") or "-" for r in shown))
    if len(reasons) == 1 and reasons != ["-"]:
        lines.append(f"  every row: {reasons[0]}")
    long = [reason for reason in reasons if len(reasons) > 1 and len(reason) > SHORT_REASON]

    def why(row: Mapping[str, Any]) -> str:
        reason = row.get("reason") or "-"
        return f"[{long.index(reason) + 1}]" if reason in long else reason

    columns: list[tuple[str, Any]] = []
    if by_db:
        columns.append(("SQNR dB", lambda r: "-" if r.get("error_db") is None else f"{r['error_db']:.1f}"))
    if by_rel:
        columns.append(("max rel", lambda r: "-" if r.get("error_rel") is None else f"{r['error_rel']:.3g}"))
    if any(r.get("op_type") for r in shown):
        columns.append(("op", lambda r: r.get("op_type") or "-"))
    columns.append(("precision", lambda r: r["precision"]))
    if len(reasons) > 1:
        columns.append(("why", why))
    table = [[title for title, _ in columns]] + [[cell(r) for _, cell in columns] for r in shown]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    names = ["layer"] + [str(r["name"]) for r in shown]
    for row, name in zip(table, names):
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + name)
    lines.extend(f"  [{i}] {reason}" for i, reason in enumerate(long, 1))
    return lines
