"""Which ops onnxruntime can run in float16, found out from onnxruntime itself.

``probe_op`` builds a one-node model whose floating inputs are float16, creates an
InferenceSession (graph optimizations disabled) on one provider and runs it, then reads
the graph onnxruntime actually executes (``optimized_model_filepath``). The verdict is:

- ``"native"``: the session ran and onnxruntime executes the node on float16 data;
- ``"fallback"``: the session ran, but only because onnxruntime's CPU provider inserted
  its own Casts (``InsertedPrecisionFreeCast_*`` nodes) around the node: there is no
  float16 kernel, the node computes in float32. optcc does not call that a kernel; the
  model is still valid and correct, so such ops are converted (see docs/fp16.md), and the
  pass reports them;
- ``"unsupported"``: the session cannot be created or run with float16 inputs although
  the same node runs with float32 inputs (so the failure is the float16 kernel's absence).

A probe that fails in float32 as well says nothing about float16: it is reported as
``"unknown"`` and never cached. Verdicts are cached as JSON under ``~/.cache/optcc/``
(``OPTCC_CACHE`` overrides the folder), one file per onnxruntime version, provider and
opset, keyed by ``domain::op_type``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from optcc.runtime.providers import provider_entry
from optcc.runtime.session import session_options

__all__ = ["Support", "cache_dir", "cache_path", "cached", "probe_op", "support", "op_key"]

Support = Literal["native", "fallback", "unsupported", "unknown"]

_INSERTED_CAST_PREFIX = "InsertedPrecisionFreeCast"


def cache_dir() -> Path:
    """The folder holding probe results: ``$OPTCC_CACHE`` or ``~/.cache/optcc``."""
    return Path(os.environ.get("OPTCC_CACHE") or Path.home() / ".cache" / "optcc")


def cache_path(provider: str, opset: int) -> Path:
    """The cache file for this onnxruntime version, provider and opset."""
    return cache_dir() / f"fp16-support-ort{ort.__version__}-{provider}-opset{opset}.json"


def op_key(domain: str, op_type: str) -> str:
    return f"{domain or 'ai.onnx'}::{op_type}"


def _read_cache(path: Path) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: Mapping[str, Mapping[str, str]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(dict(sorted(data.items())), f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs time


def cached(domain: str, op_type: str, opset: int, provider: str = "CPUExecutionProvider") -> tuple[Support, str] | None:
    """The cached verdict for an op type, or None when it has not been probed."""
    entry = _read_cache(cache_path(provider, opset)).get(op_key(domain, op_type))
    if entry and entry.get("status") in ("native", "fallback", "unsupported"):
        return entry["status"], entry.get("detail", "")  # type: ignore[return-value]
    return None


def support(
    node: onnx.NodeProto,
    inputs: Sequence[np.ndarray | onnx.ValueInfoProto | None],
    float16_inputs: Sequence[bool],
    opset: int,
    provider: str = "CPUExecutionProvider",
) -> tuple[Support, str]:
    """The cached verdict for ``node``'s op type, probing (and caching) on a miss.

    ``inputs``: per node input, an example array (constants and data), a ValueInfoProto
    (type and shape only: a random array of that shape is made when static) or None for
    an omitted optional input; ``float16_inputs`` marks the float inputs to feed as float16.
    Returns (verdict, detail).
    """
    path = cache_path(provider, opset)
    key = op_key(node.domain, node.op_type)
    cached = _read_cache(path).get(key)
    if cached and cached.get("status") in ("native", "fallback", "unsupported"):
        return cached["status"], cached.get("detail", "")  # type: ignore[return-value]
    status, detail = probe_op(node, inputs, float16_inputs, opset, provider)
    if status != "unknown":
        data = _read_cache(path)
        data[key] = {"status": status, "detail": detail}
        _write_cache(path, data)
    return status, detail


def _example(spec: np.ndarray | onnx.ValueInfoProto, rng: np.random.Generator) -> np.ndarray | None:
    if isinstance(spec, (np.ndarray, np.generic)):
        return np.asarray(spec)
    tensor = spec.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    if not tensor.HasField("shape") or any(d < 0 for d in dims):
        return None
    dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(dims).astype(dtype)
    return np.zeros(dims, dtype=dtype)


def _one_node_model(
    node: onnx.NodeProto,
    examples: Sequence[np.ndarray | None],
    float16: Sequence[bool],
    opset: int,
    use_float16: bool,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    graph_inputs, initializers, feeds, names = [], [], {}, []
    for i, array in enumerate(examples):
        if array is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        if float16[i] and use_float16:
            array = np.clip(array, -65504, 65504).astype(np.float16)
        elif float16[i]:
            array = array.astype(np.float32)
        if array.ndim and (float16[i] or np.issubdtype(array.dtype, np.floating)):
            elem = helper.np_dtype_to_tensor_dtype(array.dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, elem, list(array.shape)))
            feeds[name] = array
        else:  # shapes, indices, axes, scalars: constants, as in the model
            initializers.append(onnx.numpy_helper.from_array(array, name))
    probe = onnx.NodeProto()
    probe.CopyFrom(node)
    del probe.input[:]
    probe.input.extend(names)
    del probe.output[:]
    probe.output.extend(f"out{i}" if o else "" for i, o in enumerate(node.output))
    probe.name = "probe"
    graph = helper.make_graph([probe], "fp16_probe", graph_inputs, [], initializers)
    imports = [helper.make_opsetid("", opset)]
    if node.domain not in ("", "ai.onnx"):  # onnxruntime's contrib ops are at version 1
        imports.append(helper.make_opsetid(node.domain, 1))
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = min(model.ir_version, 10)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types = {v.name: v for v in inferred.graph.value_info}
    for i, out in enumerate(probe.output):
        if out:
            model.graph.output.append(types.get(out) or helper.make_empty_tensor_value_info(out))
    return model, feeds


def _try(model: onnx.ModelProto, feeds: dict[str, np.ndarray], provider: str) -> tuple[bool, str, bool]:
    """(ran, error line, onnxruntime inserted its own Casts)."""
    with tempfile.TemporaryDirectory(prefix="optcc-fp16-probe-") as tmp:
        options = session_options(optimized_path=os.path.join(tmp, "executed.onnx"))
        try:
            session = ort.InferenceSession(model.SerializeToString(), options, providers=[provider_entry(provider)])
            session.run(None, feeds)
        except Exception as e:  # noqa: BLE001 - any onnxruntime failure is the verdict
            lines = [line for line in str(e).splitlines() if line.strip()]
            return False, (lines[0] if lines else type(e).__name__)[:300], False
        try:
            executed = onnx.load(options.optimized_model_filepath)
        except Exception:  # noqa: BLE001
            return True, "", False
        inserted = any(n.name.startswith(_INSERTED_CAST_PREFIX) for n in executed.graph.node)
        return True, "", inserted


def probe_op(
    node: onnx.NodeProto,
    inputs: Sequence[np.ndarray | onnx.ValueInfoProto | None],
    float16_inputs: Sequence[bool],
    opset: int,
    provider: str = "CPUExecutionProvider",
) -> tuple[Support, str]:
    """Probe one node's op type in float16 on ``provider`` (no cache; see ``support``)."""
    rng = np.random.default_rng(0)
    examples = [None if spec is None else _example(spec, rng) for spec in inputs]
    if any(e is None for e, spec in zip(examples, inputs) if spec is not None):
        return "unknown", "an input has no static shape to build an example from"
    try:
        model16, feeds16 = _one_node_model(node, examples, float16_inputs, opset, True)
        model32, feeds32 = _one_node_model(node, examples, float16_inputs, opset, False)
    except Exception as e:  # noqa: BLE001 - the probe could not be built
        return "unknown", f"cannot build a probe: {e}"[:300]
    ran, error, inserted = _try(model16, feeds16, provider)
    if ran:
        if inserted:
            return "fallback", "onnxruntime inserts float32 Casts around it (no float16 kernel)"
        return "native", ""
    ran32, error32, _ = _try(model32, feeds32, provider)
    if not ran32:
        return "unknown", f"the probe fails in float32 too: {error32}"
    return "unsupported", error
