"""The pass infrastructure: the pass contract, the manager that runs pipelines with its
instruments (invariants, numerics) and checkpoints, the registry, the -O levels and the
report."""

from optcc.infra.pass_base import NUMERICS_ORDER, Numerics, Pass, PassResult
from optcc.infra.manager import Fixpoint, PassManager, PipelineResult, pass_name
from optcc.infra.registry import available_passes, create_pass, register
from optcc.infra.report import ModelSummary, PassRecord, Report, format_bytes, short_reason

__all__ = [
    "NUMERICS_ORDER", "Numerics", "Pass", "PassResult", "Fixpoint", "PassManager",
    "PipelineResult", "pass_name", "available_passes", "create_pass", "register",
    "ModelSummary", "PassRecord", "Report", "format_bytes", "short_reason",
]
