"""Calibrated INT8: calibrate, quantize to QDQ and fall back layer by layer, as one pass
(the driver is ``optcc.quant.quantize_int8``)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx_ir as ir

import optcc
from optcc.quant import Int8Options, quantize_int8


class CalibratedInt8Pass(ir.passes.FunctionalPass):
    """Calibrate, quantize to INT8 (QDQ) and fall back layer by layer (optcc.quant.quantize_int8).

    ``options``: an ``Int8Options``, or its fields as keywords."""

    name = "quantize-int8-calibrated"
    numerics = "int8"

    def __init__(self, samples: list[dict[str, np.ndarray]], options: Int8Options | None = None,
                 **fields: Any) -> None:
        super().__init__()
        self.samples = samples
        self.options = Int8Options.of(options, **fields)

    def call(self, model: ir.Model) -> optcc.PassResult:
        quantized, stats = quantize_int8(model.clone(), self.samples, options=self.options)
        modified = any(n.op_type == "QuantizeLinear" for n in optcc.ir.nodes(quantized))
        return optcc.PassResult(quantized, modified, json.loads(json.dumps(stats, default=str)))
