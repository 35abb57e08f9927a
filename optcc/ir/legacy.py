"""Models below IR version 4, where every initializer is also listed as a graph input (a
constant there, not a default a caller may replace)."""

from __future__ import annotations

import onnx_ir as ir


def upgrade_legacy_ir(model: ir.Model) -> int:
    """Move a model below IR version 4 to 4, in place: initializers are no longer graph
    inputs (those that nothing reads are dropped). Below IR 4 such inputs are constants no
    caller can feed (onnxruntime does not list them), so the interface is unchanged; from
    IR 4 on, a pass may add initializers without listing them as inputs. Returns how many
    inputs were unlisted (0 for a model at IR 4 or above, which is left alone)."""
    if int(model.ir_version or 0) >= 4:
        return 0
    graph = model.graph
    constant_inputs = [v for v in graph.inputs if v.is_initializer()]
    for value in constant_inputs:
        graph.inputs.remove(value)
        if not value.uses() and not value.is_graph_output():
            graph.initializers.pop(value.name)
    model.ir_version = 4
    return len(constant_inputs)
