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
opset, so the upgraded model is checked on samples). Weights of 1 MiB or more are set
aside while converting (the converter never reads them), so a large model is not copied.
"""

from __future__ import annotations

import onnx
import onnx.version_converter
import onnx_ir as ir

import optcc

MIN_ASIDE_BYTES = 1 << 20


def _ir_version_for(opset: int) -> int | None:
    """The IR version of the first onnx release carrying ``opset`` (onnx.helper.VERSION_TABLE)."""
    return next((ir_version for _, ir_version, release_opset, *_ in onnx.helper.VERSION_TABLE
                 if release_opset == opset), None)


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
        if self.version < current:
            raise ValueError(f"the model's opset {current} is newer than {self.version}; it is never downgraded")
        newest = onnx.defs.onnx_opset_version()
        if self.version > newest:
            raise ValueError(f"opset {self.version} is newer than the installed onnx supports ({newest})")
        if model.functions:
            raise ValueError("the model has functions, whose bodies the version converter does not convert")
        with optcc.ir.initializers_set_aside(model, lambda t: t.nbytes >= MIN_ASIDE_BYTES) as aside:
            proto = optcc.ir.serialize(model)
        shapes = {value.name: [int(d) for d in tensor.shape] for value, tensor in aside}
        for init in proto.graph.initializer:  # placeholders: their shape (what inference reads), no data
            if init.name in shapes:
                del init.dims[:]
                init.dims.extend(shapes[init.name])
        proto = onnx.version_converter.convert_version(proto, self.version)
        converted = ir.serde.deserialize_model(proto)  # the converter's output of optcc's own serialization
        for value, tensor in aside:  # the weights set aside, back under their names
            twin = converted.graph.initializers.get(value.name)
            if twin is None or twin.const_value is None or twin.const_value.dtype != tensor.dtype:
                raise ValueError(f"the version converter changed initializer '{value.name}'")
            twin.const_value = tensor
        model.graph = converted.graph
        model.ir_version = max(model.ir_version, _ir_version_for(self.version) or model.ir_version)
        return optcc.PassResult(model, True, {"opset": [current, self.version]})
