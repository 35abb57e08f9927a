"""Numerics: what a rewrite may change (kinds), inputs that fit a model, metrics, the float64
reference, and the verifier (the oracle)."""

from optcc.numerics.float16 import ACCEPTED_BY_SQNR, ACCEPTED_BY_TASK, accept_float16, widen_float16
from optcc.numerics.inputs import (DEFAULT_DYNAMIC_DIM, RETRY_DYNAMIC_DIM, RETRY_SIZES, UngeneratedInputError,
                                   check_feeds, check_ranges, check_samples_vary, generate_inputs, input_roles, sizes_text)
from optcc.numerics.kinds import NUMERICS_ORDER, Numerics, loosest
from optcc.numerics.metrics import ORIGINAL_ERROR_FACTOR, SATURATED_BELOW, TOLERANCES, OutputMetrics, Tolerance, compare_outputs
from optcc.numerics.samples import SampleAxisWarning, load_npz_samples
from optcc.numerics.task import DEFAULT_MARGIN, METRICS, TaskJudge, choose_metric, perturb
from optcc.numerics.verify import DEFAULT_SAMPLES, Verification, Verifier, verify
from optcc.runtime.session import resolve_providers

__all__ = ["DEFAULT_DYNAMIC_DIM", "RETRY_DYNAMIC_DIM", "RETRY_SIZES", "SATURATED_BELOW", "sizes_text", "check_feeds", "check_ranges", "check_samples_vary", "generate_inputs", "input_roles", "UngeneratedInputError", "NUMERICS_ORDER", "Numerics", "loosest",
           "load_npz_samples", "SampleAxisWarning", "ORIGINAL_ERROR_FACTOR", "TOLERANCES", "OutputMetrics", "Tolerance",
           "compare_outputs", "DEFAULT_SAMPLES", "Verification", "Verifier", "verify", "resolve_providers",
           "DEFAULT_MARGIN", "METRICS", "TaskJudge", "choose_metric", "perturb",
           "ACCEPTED_BY_SQNR", "ACCEPTED_BY_TASK", "accept_float16", "widen_float16"]
