"""``optcc inspect MODEL``: what a model is, without running it.

Graph inputs and outputs with element types and shapes (dynamic dimensions by name, ``?``
where unnamed or legacy ``-1``), opsets, the op histogram over every graph (If/Loop/Scan
bodies included), node and initializer counts, weight and file sizes, and the external
data files the model reads. The model is loaded with optcc's validation, so a broken file
is refused with one line naming it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from optcc import ir as oir
from optcc.ir.zipmap import load_apart

__all__ = ["inspect_model", "format_inspection", "dim_text"]


def dim_text(dim: int | ir.SymbolicDim) -> int | str:
    """A dimension as an int (static) or its name; ``?`` for an unnamed or negative one."""
    if isinstance(dim, int):
        return dim if dim >= 0 else "?"
    return dim.value or "?"


def _value(value: ir.Value) -> dict[str, Any]:
    dtype = value.dtype.name.lower() if value.dtype is not None else None
    if value.type is not None and not isinstance(value.type, ir.TensorType):
        dtype = str(value.type)
    shape = None if value.shape is None else [dim_text(d) for d in value.shape.dims]
    dynamic = [] if shape is None else [d for d in shape if isinstance(d, str)]
    return {"name": value.name, "dtype": dtype, "shape": shape, "dynamic": dynamic}


def inspect_model(source: oir.ModelSource) -> dict[str, Any]:
    """A JSON-ready description of ``source`` (path, bytes, ModelProto or onnx_ir.Model); a
    classifier's trailing ZipMaps, which optcc's IR cannot hold, are described from the file
    (their outputs' types, their nodes in the counts) and the rest from the IR."""
    model, zipmaps = load_apart(source)
    graph = model.graph
    inputs = [_value(v) for v in graph.inputs if not v.is_initializer()]
    outputs = [_value(v) for v in graph.outputs]
    counts = oir.op_histogram(model)
    if zipmaps is not None:  # the original's outputs, in its order, and its ZipMaps counted
        described = {v["name"]: v for v in outputs}
        zipped = {node.output[0] for node in zipmaps.nodes}
        outputs = [_map_value(info) if info.name in zipped else described[info.name] for info in zipmaps.outputs]
        counts = {**counts, "ai.onnx.ml::ZipMap": counts.get("ai.onnx.ml::ZipMap", 0) + len(zipmaps.nodes)}
    histogram = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    files = sorted(oir.external_data_files(model))
    info: dict[str, Any] = {
        "path": str(source) if isinstance(source, (str, os.PathLike)) else None,
        "ir_version": model.ir_version,
        "producer": " ".join(p for p in (model.producer_name, model.producer_version) if p) or None,
        "opsets": {domain or "ai.onnx": version for domain, version in sorted(model.opset_imports.items())},
        "inputs": inputs,
        "outputs": outputs,
        "dynamic_dims": sorted({d for v in (*inputs, *outputs) for d in v["dynamic"] if d != "?"}),
        "nodes": sum(histogram.values()),
        "nodes_main_graph": len(graph),
        "subgraphs": sum(1 for g in oir.graphs(model) if g is not graph),
        "op_histogram": histogram,
        "initializers": len(graph.initializers),
        "weight_bytes": oir.weight_bytes(model),
        "file_bytes": Path(source).stat().st_size if isinstance(source, (str, os.PathLike)) else None,
        "external_data": [{"file": f.name, "bytes": f.stat().st_size if f.is_file() else None} for f in files],
        "metadata": dict(model.metadata_props),
    }
    return info


def _map_value(info: onnx.ValueInfoProto) -> dict[str, Any]:
    """A ZipMap's output: its type as ``seq(map(KEY,VALUE))`` (element types named as a
    tensor's are), and no shape (None)."""
    def text(type_: onnx.TypeProto) -> str:
        kind = type_.WhichOneof("value")
        if kind == "tensor_type":
            return ir.DataType(type_.tensor_type.elem_type).name.lower()
        if kind == "sequence_type":
            return f"seq({text(type_.sequence_type.elem_type)})"
        if kind == "map_type":
            return f"map({ir.DataType(type_.map_type.key_type).name.lower()},{text(type_.map_type.value_type)})"
        return "?"
    return {"name": info.name, "dtype": text(info.type), "shape": None, "dynamic": []}


def _shape(shape: list[int | str] | None) -> str:
    return "unknown rank" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def format_inspection(info: dict[str, Any]) -> str:
    """``inspect_model``'s result as text for a person."""
    lines = [f"model: {info['path'] or '<in memory>'}"]
    producer = f", producer {info['producer']}" if info["producer"] else ""
    opsets = ", ".join(f"{d} {v}" for d, v in info["opsets"].items())
    lines.append(f"ir_version {info['ir_version']}{producer}; opsets: {opsets}")
    for title in ("inputs", "outputs"):
        lines.append(f"{title}:")
        width = max((len(v["name"]) for v in info[title]), default=0)
        for v in info[title]:
            shape = "" if (v["dtype"] or "").startswith("seq(") else f" {_shape(v['shape'])}"
            lines.append(f"  {v['name']:<{width}}  {v['dtype'] or '?':<8}{shape}")
    if info["dynamic_dims"]:
        lines.append("dynamic dims: " + ", ".join(info["dynamic_dims"]))
    sub = f" ({info['subgraphs']} subgraph(s))" if info["subgraphs"] else ""
    lines.append(f"nodes: {info['nodes']}{sub}; initializers: {info['initializers']}")
    lines.append("ops: " + ", ".join(f"{op} {n}" for op, n in info["op_histogram"].items()))
    lines.append(f"size: file {_size(info['file_bytes'])}, weights {_size(info['weight_bytes'])}")
    if info["external_data"]:
        lines.append("external data: " + ", ".join(f"{e['file']} ({_size(e['bytes'])})" for e in info["external_data"]))
    return "\n".join(lines)
