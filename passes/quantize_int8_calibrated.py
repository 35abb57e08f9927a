"""Calibrated INT8: calibrate, quantize to QDQ and fall back layer by layer, as one pass
(the driver is ``optcc.quant.quantize_int8``). With ``stored_weights`` (the model's
weights stored as integer levels before INT8's preparation folded them,
``optcc.quant.stored_weights``), every such weight the result still reads in float32 is
computed from its levels again: exact, and the file does not grow where INT8 keeps a
layer float."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

import optcc
from optcc.quant import METHODS, METRICS, Int8Options, StoredWeight, cpu_class, quantize_int8, restore_stored
from optcc.runtime import RefusedModel


class CalibratedInt8Pass(ir.passes.FunctionalPass):
    """Calibrate, quantize to INT8 (QDQ) and fall back layer by layer (optcc.quant.quantize_int8).

    ``options``: an ``Int8Options``, or its fields as keywords."""

    name = "quantize-int8-calibrated"
    numerics = "int8"

    def __init__(self, samples: list[dict[str, np.ndarray]], options: Int8Options | None = None,
                 stored_weights: Sequence[StoredWeight] = (), **fields: Any) -> None:
        super().__init__()
        self.samples = samples
        self.stored_weights = stored_weights
        self.options = Int8Options.of(options, **fields)
        _check(self.options)

    def call(self, model: ir.Model) -> optcc.PassResult:
        try:
            quantized, stats = quantize_int8(model.clone(), self.samples, options=self.options)
        except RefusedModel as error:  # a session of the float model: the model's limit, not optcc's defect
            return optcc.PassResult(model.clone(), False, {"declined": "refused",
                                                           "reason": f"onnxruntime cannot run the model ({error})"})
        if stats["modified"] and self.stored_weights:
            stats["stored_weights_restored"] = restore_stored(quantized, self.stored_weights)
        return optcc.PassResult(quantized, bool(stats["modified"]), json.loads(json.dumps(stats, default=str)))


def _check(options: Int8Options) -> None:
    """Refuse option values the run would refuse, now: raised inside the pass, they would
    read as INT8 declined for the model instead of the caller's mistake."""
    if options.method not in METHODS:
        raise optcc.BadInputError(f"unknown calibration method '{options.method}' (use {', '.join(METHODS)})")
    if options.cpu is not None:
        cpu_class(options.cpu)  # refuses an unknown class
    if options.activation_type not in ("uint8", "int8"):
        raise optcc.BadInputError(f"activation_type must be 'uint8' or 'int8', got '{options.activation_type}'")
    if options.cache_dir is not None and Path(options.cache_dir).exists() and not Path(options.cache_dir).is_dir():
        raise optcc.BadInputError("calibration cache is not a folder", options.cache_dir)
    metric = options.metric
    for given in (metric.values() if isinstance(metric, Mapping) else [metric]):
        if isinstance(given, str) and given != "auto" and given not in METRICS:
            raise optcc.BadInputError(f"unknown INT8 metric '{given}' (use {', '.join(METRICS)}, 'auto' or a callable)")
