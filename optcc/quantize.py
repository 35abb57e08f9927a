"""The INT8 driver: calibrate -> QuantizeInt8Pass -> accuracy-aware fallback.

``quantize_int8(model, calibration_data, method="minmax", ...)`` is what the API and CLI
call for ``--int8``. It never modifies its input, and returns ``(ir_model, stats)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import onnx
import onnx.version_converter
import onnx_ir as ir

from optcc import ir as oir
from optcc.calibration import CalibrationData, calibrate, load_samples, split_holdout
from optcc.errors import BadInputError
from optcc.quant_fallback import (
    Target,
    evaluate,
    fallback,
    integer_op_histogram,
    measure_latency,
)

__all__ = ["quantize_int8", "fold_batchnorm", "prepare_float", "upgrade_opset"]


def _run_pass(model: ir.Model, name: str, module: str, cls: str) -> dict[str, Any]:
    """Run a registered pass in place (imported directly when not registered); its stats,
    with ``modified``."""
    try:
        from optcc.registry import create_pass

        pass_ = create_pass(name)
    except Exception:  # noqa: BLE001 - not registered: import the module directly
        try:
            pass_ = getattr(__import__(f"optcc.passes.{module}", fromlist=[cls]), cls)()
        except (ImportError, AttributeError) as e:
            return {"unavailable": str(e)}
    result = pass_(model)
    return {**dict(getattr(result, "stats", {}) or {}), "modified": bool(result.modified)}


def fold_batchnorm(model: ir.Model) -> dict[str, Any]:
    """Fold BatchNormalization with the ``fuse-batchnorm`` pass when it is available
    (returns its stats; ``{"unavailable": ...}`` when it is not)."""
    if not any(n.op_type == "BatchNormalization" for n in oir.nodes(model)):
        return {}
    return _run_pass(model, "fuse-batchnorm", "fuse_batchnorm", "FuseBatchNormPass")


def prepare_float(model: ir.Model) -> dict[str, Any]:
    """Fold what would otherwise be quantized separately into the convolutions, in place:
    BatchNormalization (``fuse-batchnorm``) and per-channel constant Mul/Add after a Conv
    (``fuse-conv-affine``, e.g. PP-LCNet's learnable affine blocks, 2 extra 8-bit roundings
    per layer otherwise). Both are the -O2 fusions (within 1e-4), so a model that went
    through -O2 is unchanged. Returns the passes' stats."""
    stats: dict[str, Any] = {}
    bn = fold_batchnorm(model)
    if bn:
        stats["fuse-batchnorm"] = bn
    if any(n.op_type in ("Mul", "Add") for n in oir.nodes(model)):
        affine = _run_pass(model, "fuse-conv-affine", "fuse_conv_affine", "FuseConvAffinePass")
        if affine.get("modified"):
            stats["fuse-conv-affine"] = affine
            _run_pass(model, "eliminate-dead-nodes", "eliminate_dead_nodes", "EliminateDeadNodesPass")
    return stats


def upgrade_opset(model: ir.Model, version: int = 13) -> tuple[ir.Model, str | None]:
    """The model converted to ``version`` of the default opset with onnx's version
    converter (per-channel QuantizeLinear needs 13), or the model unchanged and why."""
    current = oir.default_opset(model)
    if current >= version:
        return model, None
    try:
        proto = onnx.version_converter.convert_version(oir.serialize(model), version)
        onnx.checker.check_model(proto)
        return oir.load(proto), None
    except Exception as e:  # noqa: BLE001 - the converter fails on some models
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return model, f"cannot convert opset {current} to {version} ({first}); weights per tensor"


def quantize_int8(
    model: oir.ModelSource,
    calibration_data: CalibrationData,
    method: str = "minmax",
    *,
    per_channel: bool = True,
    activation_type: str = "uint8",
    exclude: Iterable[str] = (),
    holdout_fraction: float = 0.2,
    target: Target = Target(),
    accuracy_fallback: bool = True,
    max_float_layers: int | None = None,
    max_layers_ranked: int = 64,
    require_speedup: bool = False,
    speed_threads: int = 2,
    cache_dir: str | os.PathLike | None = None,
    bins: int | None = None,
    progress: bool = False,
    **method_options: Any,
) -> tuple[ir.Model, dict[str, Any]]:
    """Calibrate on the first ``1 - holdout_fraction`` of the samples, quantize, check the
    held-out rest against ``target`` (SQNR on every output; argmax agreement on
    classifier-like outputs) and return the most sensitive layers to float until it holds.

    With ``require_speedup``, when the INT8 model is not faster than float on onnxruntime
    CPU (``speed_threads`` threads, median), the float model is returned instead and
    ``stats["modified"]`` is False with ``stats["reason"]``.

    ``stats``: method, calibration (samples, cache), ranges (per tensor), pass stats
    (quantized ops, kept float and why), fallback (per-layer sensitivity, layers kept
    float, SQNR before/after), integer_nodes (onnxruntime's fused integer kernels),
    size before/after (weight bytes), latency when measured.
    """
    loaded = oir.load(model)
    working = loaded.clone() if loaded is model else loaded
    samples = list(load_samples(calibration_data))
    if not samples:
        raise BadInputError("no calibration samples given (empty data)")
    stats: dict[str, Any] = {"method": method, "modified": False}
    if per_channel and oir.default_opset(working) < 13:
        before = oir.default_opset(working)
        working, problem = upgrade_opset(working, 13)
        stats["opset"] = {"before": before, "after": oir.default_opset(working), "problem": problem}
    folded = prepare_float(working)
    if folded:
        stats["float_fusions"] = folded
    float_model = working
    calib, held = split_holdout(samples, holdout_fraction)
    options: dict[str, Any] = dict(method_options)
    if bins is not None:
        options["bins"] = bins
    calibration = calibrate(float_model, calib, method, cache_dir=cache_dir, progress=progress, **options)
    stats["calibration"] = {**calibration.to_dict(), "held_out_samples": len(held)}
    stats["ranges"] = {k: [float(v[0]), float(v[1])] for k, v in calibration.ranges.items()}
    user_exclude = list(exclude)

    def make(exclude: Sequence[str] = (), only: Sequence[str] | None = None) -> tuple[ir.Model, dict[str, Any]]:
        from optcc.passes.quantize_int8 import QuantizeInt8Pass  # passes import optcc: import late

        candidate = float_model.clone()
        result = QuantizeInt8Pass(
            calibration.ranges,
            per_channel=per_channel,
            activation_type=activation_type,
            exclude=[*user_exclude, *exclude],
            only=only,
            count_fused=False,
        )(candidate)
        return result.model, dict(result.stats)

    if accuracy_fallback:
        quantized, pass_stats, report = fallback(
            float_model, make, held, target, max_float_layers=max_float_layers,
            max_layers_ranked=max_layers_ranked,
        )
    else:
        quantized, pass_stats = make()
        evaluation = evaluate(float_model, quantized, held, target)
        report = {"evaluation": evaluation.to_dict(), "target_met": evaluation.passed, "kept_float": []}
    stats["pass"] = {k: v for k, v in pass_stats.items() if k != "layer_outputs"}
    stats["fallback"] = report
    histogram = integer_op_histogram(quantized)
    stats["integer_op_histogram"] = histogram
    stats["integer_nodes"] = sum(n for op, n in histogram.items() if op not in ("QuantizeLinear", "DequantizeLinear"))
    stats["size_bytes"] = {"before": oir.weight_bytes(float_model), "after": oir.weight_bytes(quantized)}
    if not pass_stats.get("layers"):
        stats["reason"] = "nothing quantizable (no layer met the preconditions)"
        return float_model, stats
    if require_speedup:
        feeds = held[0]
        t_float = measure_latency(float_model, feeds, threads=speed_threads)
        t_int8 = measure_latency(quantized, feeds, threads=speed_threads)
        stats["latency_s"] = {"float32": t_float, "int8": t_int8, "threads": speed_threads}
        if t_int8 >= t_float:
            stats["reason"] = (
                f"INT8 is not faster than float32 on onnxruntime CPU ({t_int8 * 1e3:.2f} ms vs "
                f"{t_float * 1e3:.2f} ms median, {speed_threads} threads); kept float"
            )
            return float_model, stats
    stats["modified"] = True
    return quantized, stats
