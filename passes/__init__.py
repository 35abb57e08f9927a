"""optcc's built-in passes (installed as ``optcc.passes``).

One module per pass; each imports only optcc's public API (``optcc`` and its subpackage
facades). The registry finds them through the entry-point group ``optcc.passes`` in
pyproject.toml, like third-party passes; importing this package registers nothing.
"""

from optcc.passes.convert_float16 import ConvertFloat16Pass
from optcc.passes.deduplicate_initializers import DeduplicateInitializersPass
from optcc.passes.eliminate_common_subexpressions import EliminateCommonSubexpressionsPass
from optcc.passes.eliminate_dead_nodes import EliminateDeadNodesPass
from optcc.passes.eliminate_identities import EliminateIdentitiesPass
from optcc.passes.eliminate_noops import EliminateNoOpsPass
from optcc.passes.fold_constants import FoldConstantsPass
from optcc.passes.fold_shapes import FoldShapesPass
from optcc.passes.fuse_batchnorm import FuseBatchNormPass
from optcc.passes.fuse_conv_affine import FuseConvAffinePass
from optcc.passes.fuse_matmul_add import FuseMatMulAddPass
from optcc.passes.fuse_normalization import FuseNormalizationPass
from optcc.passes.fuse_ort_conv_activation import FuseOrtConvActivationPass
from optcc.passes.lift_constants import LiftConstantsPass
from optcc.passes.merge_consecutive import MergeConsecutivePass
from optcc.passes.normalize_graph import NormalizeGraphPass
from optcc.passes.quantize_dynamic import QuantizeDynamicPass
from optcc.passes.quantize_int8 import QuantizeInt8Pass
from optcc.passes.quantize_int8_calibrated import CalibratedInt8Pass
from optcc.passes.record_target import RecordTargetPass

__all__ = [
    "NormalizeGraphPass",
    "LiftConstantsPass",
    "DeduplicateInitializersPass",
    "FoldShapesPass",
    "FoldConstantsPass",
    "EliminateIdentitiesPass",
    "EliminateNoOpsPass",
    "MergeConsecutivePass",
    "EliminateCommonSubexpressionsPass",
    "EliminateDeadNodesPass",
    "FuseBatchNormPass",
    "FuseConvAffinePass",
    "FuseMatMulAddPass",
    "FuseNormalizationPass",
    "FuseOrtConvActivationPass",
    "RecordTargetPass",
    "ConvertFloat16Pass",
    "QuantizeInt8Pass",
    "QuantizeDynamicPass",
    "CalibratedInt8Pass",
]
