"""Float16 analyses: which ops onnxruntime runs in float16 (support), value ranges on
samples (ranges), and the float16 graph rewriter the conversion pass drives (rewrite)."""

from optcc.fp16 import ranges, rewrite, support
from optcc.fp16.rewrite import (
    FLOAT, FLOAT16, FP16_MAX, KEEP_INPUTS, Emulator, Rewriter, Slots, exactly_float16, float16_slots,
)

__all__ = ["ranges", "rewrite", "support", "FLOAT", "FLOAT16", "FP16_MAX", "KEEP_INPUTS", "Emulator",
           "Rewriter", "Slots", "exactly_float16", "float16_slots"]
