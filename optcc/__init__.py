"""optcc: an ONNX graph-optimization and quantization compiler that verifies what it emits.

Public API (what ``optcc.passes`` and third-party passes may import):

- ``optimize(model, passes=None, level=2, verify=True, inputs=None, ...)`` -> OptimizeResult
- ``Pass``, ``PassResult``: the pass contract; ``PassManager``, ``Fixpoint``
- ``register``, ``available_passes``, ``create_pass``: the pass registry
- ``Report``, ``Verifier``, ``verify``, ``Tolerance``
- ``optcc.ir``: load/save and the graph walker; errors in ``optcc.errors``
"""

from __future__ import annotations

from optcc.version import __version__

from optcc import ir
from optcc.api import OptimizeResult, optimize, verify
from optcc.errors import (
    BadInputError, OptccError, PipelineWarning, PrecisionNotAppliedError, UnsafeInputError, UnverifiedError,
    VerificationError,
)
from optcc.infra.pass_base import Pass, PassResult
from optcc.infra.manager import Fixpoint, PassManager
from optcc.infra.registry import available_passes, create_pass, register
from optcc.infra.report import Report
from optcc.numerics import Tolerance, Verifier

__all__ = [
    "__version__",
    "ir",
    "optimize",
    "OptimizeResult",
    "Pass",
    "PassResult",
    "PassManager",
    "Fixpoint",
    "register",
    "available_passes",
    "create_pass",
    "Report",
    "Verifier",
    "verify",
    "Tolerance",
    "OptccError",
    "BadInputError",
    "UnsafeInputError",
    "VerificationError",
    "UnverifiedError",
    "PrecisionNotAppliedError",
    "PipelineWarning",
]
