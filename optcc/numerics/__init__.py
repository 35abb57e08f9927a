"""Numerics: metrics, generated inputs and the verifier (the oracle)."""

from optcc.numerics.verify import (
    TOLERANCES, OutputMetrics, Tolerance, Verification, Verifier, check_feeds, compare_outputs,
    generate_inputs, loosest, resolve_providers, verify,
)

__all__ = ["TOLERANCES", "OutputMetrics", "Tolerance", "Verification", "Verifier", "check_feeds",
           "compare_outputs", "generate_inputs", "loosest", "resolve_providers", "verify"]
