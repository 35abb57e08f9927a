"""The errors optcc raises on purpose, each tied to a command-line exit code."""

from __future__ import annotations

from typing import NoReturn

__all__ = ["Terminated", "raise_terminated", "stopped", "OptccError", "BadInputError", "UnsafeInputError", "VerificationError", "PassFailedError",
           "PrecisionPassFailedError", "UnverifiedError", "PrecisionNotAppliedError"]

ISSUES_URL = "https://github.com/optcc/optcc/issues"


class Terminated(BaseException):
    """SIGTERM, raised where the run is: not an ``Exception``, so no pass or check takes
    it for a failure of its own, and the run unwinds as on Ctrl-C."""


def raise_terminated(signum: int, frame: object) -> NoReturn:
    """A SIGTERM handler: ``Terminated`` where the run is."""
    raise Terminated


def stopped(error: BaseException) -> tuple[int, str] | None:
    """The command's exit code and line (after ``optcc: ``) for a run Ctrl-C
    (``KeyboardInterrupt``, 128 + SIGINT) or SIGTERM (``Terminated``, 128 + SIGTERM) ended;
    None for any other error."""
    if isinstance(error, KeyboardInterrupt):
        return 130, "interrupted; nothing written"
    if isinstance(error, Terminated):
        return 143, "terminated; nothing written"
    return None


class OptccError(Exception):
    """Base of every error optcc raises deliberately."""

    exit_code = 3


class BadInputError(OptccError, ValueError):
    """The model, data or options given to optcc are unusable (exit code 2).

    The message is one line that names the file (when there is one) and the problem.
    """

    exit_code = 2

    def __init__(self, message: str, path: object | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class UnsafeInputError(BadInputError):
    """The model tries something optcc refuses for safety, e.g. external data outside its folder."""


class VerificationError(OptccError):
    """The optimized model does not match the original within tolerance (exit code 1)."""

    exit_code = 1


class UnverifiedError(OptccError):
    """Verification could not run (onnxruntime cannot run the original with the available
    inputs, custom ops without their library, ...), so the result is unverified (exit code 4).
    ``result`` holds the model and report."""

    exit_code = 4


class PrecisionNotAppliedError(OptccError):
    """FP16 or INT8 was requested but declined or reverted, so the result would still be
    float32 (exit code 5). ``result`` holds the float model and report."""

    exit_code = 5


class PassFailedError(OptccError):
    """A pass raised or broke an invariant while the pass manager ran with ``strict=True``."""

    exit_code = 3


class PrecisionPassFailedError(PassFailedError):
    """A requested precision pass (FP16, INT8, weight-only) raised: a defect in optcc, not
    a decline about the model (exit code 3). ``result`` holds the model without that
    precision and its report; ``allow_float_fallback`` returns it instead, with a warning."""


class CacheRecomputedWarning(UserWarning):
    """A cache entry that could not be read (corrupt, or not the cache's format) was
    recomputed and written again; the message names the file and why, on one line."""


class PipelineWarning(RuntimeWarning):
    """Something the pass manager did that the report's warnings record as well: a
    fixpoint stopped unconverged, onnx's checker rejected the pipeline's result, a replay
    after a revert failed. The command line says it once, in its summary."""
