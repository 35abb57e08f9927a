"""How each onnxruntime execution provider is configured for optcc's sessions.

A verification compares two models on the same provider, so every session must compute
each model's function as written, the same way on every run. On CUDA that means two
settings away from onnxruntime's defaults:

- ``use_tf32=0``: float32 matrix products and convolutions in float32. TensorFloat-32
  rounds their operands to 10 mantissa bits; the same loss hits the original and the
  rewrite, but differently where a rewrite changes a product's shape or operands, so an
  exact rewrite could no longer be told from a wrong one at the exact tolerance.
- ``cudnn_conv_algo_search=HEURISTIC``: cuDNN chooses each convolution's algorithm from its
  shapes alone. The default times the candidates when a session first runs, so the choice
  (and with it the rounding) can change from one run to the next, and with it a verdict.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Union

__all__ = ["PROVIDER_OPTIONS", "provider_entry"]

PROVIDER_OPTIONS = MappingProxyType({
    "CUDAExecutionProvider": MappingProxyType({"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}),
})


def provider_entry(provider: str) -> Union[str, tuple[str, dict[str, str]]]:
    """``provider`` as an item of onnxruntime's ``providers`` list, with its options."""
    options = PROVIDER_OPTIONS.get(provider)
    return (provider, dict(options)) if options else provider
