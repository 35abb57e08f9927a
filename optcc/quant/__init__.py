"""INT8 quantization analyses and driver: calibration, bias correction, fallback."""

from optcc.quant.calibration import calibrate
from optcc.quant.driver import quantize_int8
from optcc.quant.fallback import Target, count_integer_nodes
from optcc.quant import weight_only

__all__ = ["calibrate", "quantize_int8", "Target", "count_integer_nodes", "weight_only"]
