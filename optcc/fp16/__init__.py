"""Float16 analyses: which ops onnxruntime runs in float16 (support), value ranges on
samples (ranges), attention-mask fills float16 can hold (masks), and the float16 graph rewriter the conversion pass drives (rewrite)."""

from optcc.fp16 import masks, ranges, rewrite, support
from optcc.fp16.masks import MASK_FILL, clamp_mask_fills
from optcc.fp16.rewrite import (
    FLOAT, FLOAT16, FP16_MAX, KEEP_INPUTS, Emulator, Rewriter, Slots, exactly_float16, float16_slots,
)

__all__ = ["masks", "ranges", "rewrite", "support", "MASK_FILL", "clamp_mask_fills", "FLOAT", "FLOAT16", "FP16_MAX", "KEEP_INPUTS", "Emulator",
           "Rewriter", "Slots", "exactly_float16", "float16_slots"]
