"""INT8 quantization analyses and driver: calibration, bias correction, the runtime cost
model, task metrics and the accuracy-aware fallback."""

from optcc.quant.calibration import METHODS, calibrate, collect_statistics_sharded
from optcc.quant.cost_model import CPU_CLASSES, CostModel, compare_modelled, cpu_class
from optcc.quant.dynamic_error import dynamic_int8_errors
from optcc.quant.float_layers import BOUNDED_NOTE, FLOAT_LAYER_CANDIDATES, FloatLayerSearch, KeptCandidates, fewest_float_layers
from optcc.quant.probe import probed_values
from optcc.quant.driver import Int8Options, quantize_int8
from optcc.quant.integer_range import MIN_WEIGHT_SCALE, WEIGHT_QMAX, symmetric_weight_scale, weight_levels
from optcc.quant.stored_weights import StoredWeight, restore_stored, stored_weights
from optcc.quant.fallback import Target, count_integer_nodes, quantization_ops, quantized_already
from optcc.numerics.task import METRICS, TaskJudge
from optcc.quant import weight_only  # block-wise weight-only numerics (quantize-weights)

__all__ = ["METHODS", "calibrate", "collect_statistics_sharded", "quantize_int8", "Int8Options", "Target", "count_integer_nodes",
           "quantization_ops", "quantized_already",
           "CPU_CLASSES", "CostModel", "compare_modelled", "cpu_class", "METRICS", "TaskJudge", "weight_only", "WEIGHT_QMAX",
           "MIN_WEIGHT_SCALE", "symmetric_weight_scale", "weight_levels", "StoredWeight", "restore_stored", "stored_weights",
           "dynamic_int8_errors", "BOUNDED_NOTE", "FLOAT_LAYER_CANDIDATES", "FloatLayerSearch", "fewest_float_layers", "KeptCandidates", "probed_values"]
