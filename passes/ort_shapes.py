"""Symbolic dims from onnxruntime's shape inference, for the -O3 attention fusions.

``OrtShapes(model)`` runs ``onnxruntime.tools.symbolic_shape_infer`` (which knows onnxruntime's
contrib ops) once, lazily, on a copy of the model without its weights (small ones kept for
inference to read by value, except those that are also graph inputs: a caller may feed them)
and answers
``dims(value)``: per axis an int, a symbolic expression such as ``"past + seq"``, or None.
``same_dim(a, b)`` says whether two answers are proved equal: equal ints, or equal
expressions. The inference names one size by one expression, taking declared dims of one
name as one size and the sizes a broadcast operator meets as equal (what the model's
interface and its own operators state); a fusion may rely on that for the inputs the model
accepts. Where inference fails, every answer is None and ``error`` says why.

One merge is added to onnxruntime's: where the inputs of a main-graph broadcasting operator
(or a MatMul's batch axes) meet a size ``a`` and ``Min(k, a)`` at one axis, with ``k`` an
integer >= 2 (the rows sliced from a position-embedding table of ``k`` rows), ``Min(k, a)`` is
renamed ``a`` everywhere. A main-graph node runs on every input; two sizes broadcast only
where they are equal or one is 1, and ``Min(k, a)`` is 1 only where ``a`` is (``k >= 2``), so
``Min(k, a) == a`` on every input the model accepts. ``k = 1`` is left alone (``Min(1, a)``
is 1 where ``a`` is not), and so is ``Min(k, a)`` met by any other size. onnxruntime alone
names the result a new unknown size and stops there, leaving every later value unknown
(every TorchScript BERT export, at its embedding LayerNorm). Its general merge
(``auto_merge``) is not used: it takes ``a`` and ``b`` as equal where one may be 1.

Nodes that no graph output depends on (left by a fusion earlier in the pipeline, before dead
node elimination) are left out of the copy: they do not change a live value's dims, and the
inference stops at the first node it cannot type (e.g. a causal mask built from a cache
Concat that a fused op's present output replaced), leaving every later value unknown.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import onnx
import onnx_ir as ir

import optcc

__all__ = ["OrtShapes", "same_dim"]

_KEEP_ELEMENTS = 64  # initializers inference reads by value (shape targets, Range bounds)

Dim = str | int | None
# operators whose inputs broadcast against each other (MatMul: its batch axes)
_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Where", "Sum", "Max", "Min", "Mean",
                           "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor",
                           "MatMul"})


def same_dim(a: Dim, b: Dim) -> bool:
    """Whether two inferred dims are proved equal (neither unknown)."""
    return a is not None and b is not None and str(a).replace(" ", "") == str(b).replace(" ", "")


class OrtShapes:
    """Symbolic dims of a model's values, inferred once on first use; None where unknown."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self._dims: dict[str, list[Dim]] | None = None
        self.error: str | None = None

    def dims(self, value: ir.Value | None) -> list[Dim] | None:
        if value is None:
            return None
        if self._dims is None:
            self._dims = self._infer()
        return self._dims.get(value.name)

    def _infer(self) -> dict[str, list[Dim]]:
        # its logger warns of sizes it does not merge ("unsupported broadcast between ..."), through
        # logging's last-resort handler onto stderr when nobody configured logging: not optcc's output
        quiet = logging.getLogger(_ORT_LOGGER)
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            proto = optcc.ir.without_weights(optcc.ir.serialize(self.model), keep_elements=_KEEP_ELEMENTS)
            if proto.ir_version >= 4:  # an initializer that is also a graph input may be fed: no constant
                fed = {v.name for v in proto.graph.input}
                kept = [t for t in proto.graph.initializer if t.name not in fed]
                del proto.graph.initializer[:]
                proto.graph.initializer.extend(kept)
            del proto.graph.value_info[:]
            _drop_dead_nodes(proto.graph)
            # its infer_shapes() saves a file in the working directory when some shape stays
            # unknown; run its steps here and read what was found (unknown: the site is refused)
            inference = _inference_class()(2**31 - 1, False, False, 0)
            inference._preprocess(proto)
            while inference.run_:
                inference._infer_impl()
            inference._update_output_from_vi()
            inferred = inference.out_mp_
        except Exception as error:  # noqa: BLE001 - no shapes: every site is refused with this reason
            self.error = f"onnxruntime shape inference failed: {type(error).__name__}"
            return {}
        finally:
            quiet.setLevel(level)
        found = {}
        for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
            t = info.type.tensor_type
            if t.HasField("shape"):
                found[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                    for d in t.shape.dim]
        return found


def _bounded_sizes(dims: list, symbolic: dict) -> dict[str, str]:
    """Each dim of ``dims`` that is ``Min(k, a)`` (integer ``k >= 2``) with ``a`` also in ``dims``, mapped to ``a``."""
    import sympy  # onnxruntime's inference needs it; optcc does not otherwise

    named = {d: symbolic[d] for d in dims if isinstance(d, str) and d in symbolic}
    found = {}
    for dim, expr in named.items():
        if not isinstance(expr, sympy.Min) or len(expr.args) != 2:
            continue
        for bound, size in (expr.args, expr.args[::-1]):
            if bound.is_Integer and int(bound) >= 2:
                found.update({dim: other for other, e in named.items() if other != dim and e == size})
    return found


def _aligned_dims(op_type: str, shapes: list[list]) -> list[list]:
    """The dims that broadcasting lines up, per axis from the right (a MatMul's batch axes only)."""
    if op_type == "MatMul":
        shapes = [s[:-2] for s in shapes if len(s) > 2]
    rank = max((len(s) for s in shapes), default=0)
    return [[s[-i] for s in shapes if len(s) >= i] for i in range(1, rank + 1)]


_ALONE = "optcc_ort_symbolic_shape_infer"  # the name onnxruntime's module is imported by itself under
_ORT_LOGGER = "onnxruntime.tools.symbolic_shape_infer"  # the logger its module logs to, however imported


def _symbolic_shape_inference() -> type:
    """onnxruntime's SymbolicShapeInference, its module run by itself where it was not
    imported yet: importing it as ``onnxruntime.tools.symbolic_shape_infer`` first runs
    that package's ``__init__``, which imports torch wherever torch is installed (hundreds
    of megabytes resident, seconds) for a helper this never calls. The module imports
    nothing of its package."""
    imported = sys.modules.get("onnxruntime.tools.symbolic_shape_infer") or sys.modules.get(_ALONE)
    if imported is not None:
        return imported.SymbolicShapeInference
    import onnxruntime

    path = Path(onnxruntime.__file__).parent / "tools" / "symbolic_shape_infer.py"
    spec = importlib.util.spec_from_file_location(_ALONE, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.logger = logging.getLogger(_ORT_LOGGER)  # its logger keeps its package's name (``_infer`` quiets it)
    sys.modules[_ALONE] = module  # imported once, as any module is
    return module.SymbolicShapeInference


def _inference_class() -> type:
    """onnxruntime's SymbolicShapeInference with the ``Min(k, a)`` merge the module docstring states."""
    SymbolicShapeInference = _symbolic_shape_inference()  # noqa: N806 - the class, as onnxruntime names it

    class _Inference(SymbolicShapeInference):
        def _onnx_infer_single_node(self, node: onnx.NodeProto) -> None:
            # before onnx's inference of the node's outputs, which names a new size where the
            # input dims differ
            if node.op_type in _BROADCASTING and node.domain in ("", "ai.onnx"):
                shapes = [self._get_shape(node, i) for i, name in enumerate(node.input) if name]
                if all(shape is not None for shape in shapes):
                    for dims in _aligned_dims(node.op_type, shapes):
                        self._merge_bounded(dims)
            super()._onnx_infer_single_node(node)

        def _merge_bounded(self, dims: list) -> None:
            for bounded, size in _bounded_sizes(dims, self.symbolic_dims_).items():
                # computed dims of this expression later in the graph resolve to ``size`` too
                self.suggested_merge_[bounded] = size
                for info in self.known_vi_.values():
                    for dim in info.type.tensor_type.shape.dim:
                        if dim.dim_param == bounded:
                            dim.dim_param = size

    return _Inference


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every name that the node's subgraphs (If/Loop/Scan bodies, nested too) read."""
    names: set[str] = set()
    for attr in node.attribute:
        for graph in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in graph.node:
                names.update(inner.input)
                names.update(_subgraph_reads(inner))
    return names


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove the main-graph nodes that no graph output depends on (kept in their order)."""
    nodes = list(graph.node)
    producer = {name: index for index, node in enumerate(nodes) for name in node.output if name}
    live: set[int] = set()
    stack = [o.name for o in graph.output]
    while stack:
        index = producer.get(stack.pop())
        if index is not None and index not in live:
            live.add(index)
            stack.extend(nodes[index].input)
            stack.extend(_subgraph_reads(nodes[index]))
    if len(live) < len(nodes):
        kept = [onnx.NodeProto.FromString(nodes[i].SerializeToString()) for i in sorted(live)]
        del graph.node[:]
        graph.node.extend(kept)
