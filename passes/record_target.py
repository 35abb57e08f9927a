"""RecordTargetPass: write the target runtime into the model's ``metadata_props``.

Rewrite: sets ``metadata_props["optcc.target"]`` (default "onnxruntime"), so a model
optimized at -O3 with runtime-specific ops says which runtime it needs.
Exact: metadata only.
"""

from __future__ import annotations

import onnx_ir as ir

import optcc

METADATA_KEY = "optcc.target"


class RecordTargetPass(optcc.Pass):
    """Record the target runtime (-O3) in the model's metadata_props."""

    name = "record-target"
    numerics = "exact"

    def __init__(self, target: str = "onnxruntime") -> None:
        super().__init__()
        self.target = target

    def call(self, model: ir.Model) -> optcc.PassResult:
        modified = model.metadata_props.get(METADATA_KEY) != self.target
        model.metadata_props[METADATA_KEY] = self.target
        return optcc.PassResult(model, modified, {"target": self.target} if modified else {})
