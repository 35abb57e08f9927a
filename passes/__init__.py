"""optcc's built-in passes (installed as ``optcc.passes``).

One module per pass family; each imports only optcc's public API. ``BUILTIN_PASSES`` is
the list the registry reads; importing this package registers nothing by itself.
"""

from optcc.passes.eliminate_dead_nodes import EliminateDeadNodesPass
from optcc.passes.eliminate_identities import EliminateIdentitiesPass
from optcc.passes.normalize_graph import NormalizeGraphPass
from optcc.passes.record_target import RecordTargetPass

BUILTIN_PASSES = [
    NormalizeGraphPass,
    EliminateIdentitiesPass,
    EliminateDeadNodesPass,
    RecordTargetPass,
]

__all__ = [cls.__name__ for cls in BUILTIN_PASSES] + ["BUILTIN_PASSES"]
