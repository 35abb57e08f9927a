"""UpgradeOpsetPass: convert the model to a newer version of the default ONNX opset.

Rewrite: onnx's version converter (``onnx.version_converter.convert_version``) rewrites
every node whose operator changed between the model's default opset and ``version``
(e.g. ``Split``'s ``split`` attribute becoming an input at 13, ``Resize`` modes), and the
model then imports ``version``; the IR version is raised to what that opset needs. Run
first, it lets the later passes use operators the model's opset lacks (standard
``Attention`` and ``RMSNormalization`` at 23, ``Gelu`` at 20). It never runs unless asked
(``optimize(target_opset=N)``, ``--target-opset N``).

Preconditions: ``version`` is at least the model's default opset (a model is never
downgraded) and at most what the installed onnx knows; the model has no functions (the
converter leaves their bodies unconverted). Otherwise the pass fails with the reason and
the model is left as it was. Whether onnxruntime implements ``version`` is checked where
every pass's result is: the verifier loads it.

Exact: each adapter re-expresses an operator by its newer definition with the same
semantics. The converter's output is not trusted: the pass manager verifies the result
against the original like any other pass (the proof of equivalence keys operators by
opset, so the upgraded model is checked on samples). The weights are set aside while
converting (``optcc.ir.convert_opset``: the converter never reads them), so a large
model is not copied.
"""

from __future__ import annotations

import onnx_ir as ir

import optcc


class UpgradeOpsetPass(optcc.Pass):
    """Convert the model to ``version`` of the default opset (onnx's version converter)."""

    name = "upgrade-opset"
    numerics = "exact"

    def __init__(self, version: int) -> None:
        super().__init__()
        self.version = int(version)

    def call(self, model: ir.Model) -> optcc.PassResult:
        current = optcc.ir.default_opset(model)
        if self.version == current:
            return optcc.PassResult(model, False, {"opset": current})
        problem = optcc.ir.upgrade_problem(model, self.version)
        if problem is not None:
            raise ValueError(problem)
        if model.functions:
            raise ValueError("the model has functions, whose bodies the version converter does not convert")
        optcc.ir.convert_opset(model, self.version)
        return optcc.PassResult(model, True, {"opset": [current, self.version]})
