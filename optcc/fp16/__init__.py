"""Float16 analyses: which ops onnxruntime runs in float16 (support), value ranges on
samples (ranges), attention-mask fills float16 can hold (masks), the float16 graph
rewriter the conversion pass drives (rewrite) and the float16 weights its candidates and
result share (weights)."""

from optcc.fp16 import masks, ranges, rewrite, support, weights
from optcc.fp16.masks import MASK_FILL, clamp_mask_fills
from optcc.fp16.rewrite import (
    FLOAT, FLOAT16, FP16_MAX, KEEP_INPUTS, Emulator, Rewriter, Slots, exactly_float16, float16_slots,
)
from optcc.fp16.weights import Float16Weights

__all__ = ["masks", "ranges", "rewrite", "support", "weights", "Float16Weights", "MASK_FILL", "clamp_mask_fills", "FLOAT", "FLOAT16", "FP16_MAX", "KEEP_INPUTS", "Emulator",
           "Rewriter", "Slots", "exactly_float16", "float16_slots"]
