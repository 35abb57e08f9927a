"""onnxruntime: the one session factory, probes that expose intermediates, latency."""

from optcc.runtime.latency import median_seconds

__all__ = ["median_seconds"]
