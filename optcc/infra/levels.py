"""The -O levels: the one table that says which passes each level runs, in which order
(the pass classes carry no level of their own).

| level | pipeline |
|---|---|
| 0 | normalize (topological order, names) |
| 1 | Constant nodes lifted to initializers, then 0, initializer dedup, a fixpoint of constant folding and exact eliminations (all-zero RNN initial states dropped among them, elements read back from a sequence just built forwarded, layout round trips around elementwise ops and Pads removed), lift + dedup again, constant graph outputs stored as initializers |
| 2 | 1 + a fixpoint of fusions into standard ops, then the exact fixpoint, lift + dedup again, CSE (fused weights deduplicated make more nodes equal) |
| 3 | 2 + onnxruntime's fused ops (FusedConv, MultiHeadAttention, GroupQueryAttention for causal grouped-query decoders, Attention with packed Q/K/V weights for self-attention without a KV cache, RotaryEmbedding below opset 23, BiasGelu/FastGelu); records the target runtime in metadata_props (SkipLayerNormalization, SkipSimplifiedLayerNormalization and EmbedLayerNormalization are opt-in: not faster than their parts on CPU) |
"""

from __future__ import annotations

__all__ = ["LEVELS", "level_of"]

# A level is a list of pass names; a tuple of names is run as a Fixpoint.
_EXACT = (
    "simplify-reshape-targets",
    "fold-constants",
    "inline-constant-if",
    "fold-sequence-at",
    "eliminate-identities",
    "eliminate-noops",
    "drop-zero-rnn-states",
    "merge-consecutive",
    "sink-layout-ops",
    "cancel-transpose-pairs",
    "eliminate-common-subexpressions",
    "eliminate-dead-nodes",
)
_FUSIONS = (
    "fuse-batchnorm",
    "fuse-conv-affine",
    "fuse-matmul-add",
    "fuse-normalization",
    "fuse-pad",
    "fuse-gemm-transpose",
    "fuse-log-softmax",
    "fuse-attention",
    "fuse-rotary",
    "eliminate-dead-nodes",
)
_TIDY = ["lift-constants", "deduplicate-initializers"]
# lift-constants runs before normalize: the Constant nodes it removes are never named or walked there
_O1 = ["lift-constants", "normalize", "deduplicate-initializers", _EXACT, *_TIDY]
# store-constant-outputs runs last: no later pass sees an initializer as a graph output.
LEVELS: dict[int, list[str | tuple[str, ...]]] = {
    0: ["normalize"],
    1: [*_O1, "store-constant-outputs"],
    # fuse-parallel-matmuls runs after every attention fusion: those match separate Q/K/V MatMuls.
    2: [*_O1, _FUSIONS, _EXACT, *_TIDY, "eliminate-common-subexpressions", "fuse-parallel-matmuls",
        "store-constant-outputs"],
    3: [*_O1, _FUSIONS, _EXACT, *_TIDY, "eliminate-common-subexpressions",
        "fuse-ort-conv-activation",
        ("fuse-ort-attention", "fuse-ort-gqa", "fuse-ort-rotary", "fuse-ort-transformer", "eliminate-dead-nodes"),
        "fuse-parallel-matmuls", _EXACT,
        # after the exact fixpoint: it reads projections whose head split and merge it has cancelled
        "fuse-ort-packed-attention", "eliminate-dead-nodes",
        "store-constant-outputs", "record-target"],
}


def level_of(name: str) -> int | None:
    """The lowest level whose pipeline runs the pass ``name`` (None: opt-in only)."""
    for level in sorted(LEVELS):
        for step in LEVELS[level]:
            if name == step or (isinstance(step, tuple) and name in step):
                return level
    return None
