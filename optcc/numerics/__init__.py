"""Numerics: what a rewrite may change (kinds), inputs that fit a model, metrics, and the
verifier (the oracle)."""

from optcc.numerics.inputs import DEFAULT_DYNAMIC_DIM, check_feeds, generate_inputs
from optcc.numerics.kinds import NUMERICS_ORDER, Numerics, loosest
from optcc.numerics.samples import load_npz_samples
from optcc.numerics.verify import (
    TOLERANCES, OutputMetrics, Tolerance, Verification, Verifier, compare_outputs, resolve_providers, verify,
)

__all__ = ["DEFAULT_DYNAMIC_DIM", "check_feeds", "generate_inputs", "NUMERICS_ORDER", "Numerics", "loosest",
           "load_npz_samples", "TOLERANCES", "OutputMetrics", "Tolerance", "Verification", "Verifier",
           "compare_outputs", "resolve_providers", "verify"]
