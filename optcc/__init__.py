"""optcc: an ONNX graph-optimization and quantization compiler that verifies what it emits.

Public API (what ``optcc.passes`` and third-party passes may import):

- ``optimize(model, passes=None, level=2, verify=True, inputs=None, ...)`` -> OptimizeResult
- ``Pass``, ``PassResult``: the pass contract; ``PassManager``, ``Fixpoint``
- ``register``, ``available_passes``, ``create_pass``: the pass registry
- ``Report``, ``Verifier``, ``verify``, ``Tolerance``
- ``optcc.ir``: load/save and the graph walker; errors in ``optcc.errors``
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from optcc.version import __version__

if TYPE_CHECKING:
    from optcc import ir
    from optcc.api import OptimizeResult, optimize, verify
    from optcc.errors import (
        BadInputError, OptccError, PipelineWarning, PrecisionNotAppliedError, UnsafeInputError, UnverifiedError,
        VerificationError,
    )
    from optcc.infra.manager import Fixpoint, PassManager
    from optcc.infra.pass_base import Pass, PassResult
    from optcc.infra.registry import available_passes, create_pass, register
    from optcc.infra.report import Report
    from optcc.numerics import Tolerance, Verifier

# each public name and the module that defines it: imported when first read, so that
# ``import optcc`` (and the command line's start, which must answer Ctrl-C with one line
# from its first instant) does not load onnx and onnxruntime before they are needed
_EXPORTS = {
    "ir": "optcc.ir",
    **dict.fromkeys(("optimize", "OptimizeResult", "verify"), "optcc.api"),
    **dict.fromkeys(("OptccError", "BadInputError", "UnsafeInputError", "VerificationError", "UnverifiedError",
                     "PrecisionNotAppliedError", "PipelineWarning"), "optcc.errors"),
    **dict.fromkeys(("Pass", "PassResult"), "optcc.infra.pass_base"),
    **dict.fromkeys(("PassManager", "Fixpoint"), "optcc.infra.manager"),
    **dict.fromkeys(("register", "available_passes", "create_pass"), "optcc.infra.registry"),
    "Report": "optcc.infra.report",
    **dict.fromkeys(("Tolerance", "Verifier"), "optcc.numerics"),
}


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use (``_EXPORTS``)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'optcc' has no attribute {name!r}")
    loaded = importlib.import_module(module)
    value = loaded if module == f"{__name__}.{name}" else getattr(loaded, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


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
