"""Proof of equivalence: does an optimized graph compute the same ONNX function as its original?

Value numbering over both graphs in one table (translation validation in the style of
Necula's validators: it trusts nothing the passes say, only the two graphs). Every value
gets a key, and two values with the same key compute the same thing for every input:

- a graph input: its name (the verifier feeds both models by name), an initializer the
  model also lists as an input included from IR version 4 on (a default a caller may
  replace: ``optcc.ir.is_constant``);
- a constant (initializer, Constant node, or below IR version 4 an initializer the model
  also lists as an input, which onnxruntime reads as a constant): its element type, shape
  and bytes;
- a node's output: its domain, op type and definition (the schema version the model's
  opset gives it, or the oldest version listed as computing the same function on it:
  ``optcc.numerics.op_versions``), its attributes (tensors by bytes, floats by their
  bits), its inputs' keys (optional inputs given empty at the end left out: ONNX reads
  them as not given) and the output's position;
- a ``Softmax`` or ``LogSoftmax`` before opset 13 with an axis that is not negative (the
  input coerced to 2-D there) is keyed by that axis and its input, and so is the form onnx's
  version converter gives it from 13 on, ``Reshape(Softmax(Flatten(x, axis), axis=-1),
  shape of x)`` (the shape as ``Shape(x)`` or x's dims as integers), where onnx's shape
  inference gives every dim of x as a positive integer (a 0 would copy a dim of the 2-D
  value instead of x's);
- ``Identity`` and inference-mode ``Dropout`` (opset >= 7, ``training_mode`` absent or a
  constant false) output the key of their input (and its affine form, below), and so do
  ``x + 0`` (integers), ``x + (-0.0)``, ``x - 0``, ``x * 1`` and ``x / 1`` with a constant
  of x's element type, of rank 0 or of unit dims within x's rank (IEEE 754 returns x bit
  for bit there, signed zeros, infinities and quiet NaNs included, and a signalling NaN as
  a NaN, quieted; ``x + (+0.0)`` does not: it turns -0.0 into +0.0);
- a ``Reshape`` whose target is read symbolically (constants, and dims of the reshaped
  tensor through Shape, Slice, Gather, Concat, Unsqueeze, Squeeze of one element and
  integer Casts; ``0`` copies a dim) is keyed by its input and that target; one whose
  target reads one dim and whose
  other elements are positive integers, with that dim as ``-1`` (where the Reshape runs,
  that dim is the element count over the others', which is what -1 infers), and
  ``allowzero`` only where the target has a ``0``; a Reshape of a Reshape as one
  Reshape of the first one's input (a reshape keeps the elements in order), the middle
  value's dims the second target reads taken from the first target (a copied dim or a
  positive integer; not one a -1 infers); a Reshape whose target reads no dim of its input
  (after the -1 above; dims of other values it may read) as that Reshape of the value the Reshape, Squeeze and Unsqueeze
  nodes before it read (each keeps its input's elements in order, and the target reads
  only their count); a Squeeze or Unsqueeze of such a Reshape as one Reshape, its target
  with the 1s removed (where the target gives them as 1) or inserted;
- a ``Shape`` of an elementwise op of one input (Not, Neg, Relu, Cast, ...) is keyed as the
  Shape of that input (the op keeps the shape), and ``Where(Not(c), a, b)`` as
  ``Where(c, b, a)``; a Reshape whose target is not read still keeps its input's elements
  in order where it runs (a Reshape through it, above);
- a ``Concat`` of a ``Concat`` on the same axis (the same attributes and definition) is
  keyed as one Concat of the inner one's inputs in their place (the same elements in the
  same order, and both run where the same dims agree);
- a ``Transpose`` with an explicit permutation is keyed by its input and that permutation,
  and a Transpose of a Transpose by the composed one (output dim ``i`` is the input's dim
  ``p1[p2[i]]``, element for element); the identity permutation by its input's key;
- a ``Slice`` whose starts, ends, axes and steps are constant integers is keyed by its
  input and its entries per axis (negative axes normalized against a known rank), and a
  Slice of such a Slice on other axes as one Slice over both entries (slicing one axis
  leaves every other dim as it was; each axis is clamped against its own dim);
- an ``Unsqueeze`` at axes none of which is negative is keyed by its input and those axes,
  and an Unsqueeze of such an Unsqueeze as one Unsqueeze of the first one's input (the
  second one's axes, and per axis ``j`` of the first the ``j``-th position outside them:
  the first one's output dims keep their order there; both forms run for the same ranks);
- ``Unsqueeze(Squeeze(x, a), a)`` is keyed as ``x`` (the Squeeze runs only where x's dims
  at ``a`` are 1, and the Unsqueeze puts those dims back where they were: the same
  integers, normalized against the same rank), and ``Squeeze(Unsqueeze(x, a), a)`` too
  (the dims inserted are 1 and removed again); axes as the attribute before opset 13 and
  a constant input from 13, negative ones from 11;
- an op that commutes with a layout change (a unary elementwise op; Clip with constant
  one-element bounds; a binary elementwise op with one constant operand; a constant-mode
  Pad with constant pads, opset 11 on) applied to the output of a Transpose, Squeeze or
  Unsqueeze ``L(y)`` (explicit permutation or axes, ``y``'s rank known) is keyed as
  ``L(f'(y))``, ``f'`` the op with its constant or pads carried back to ``y``'s layout by
  ``optcc.ir.layout_maps`` (what sink-layout-ops writes), so that ``R(fn(..f1(L(x))))``
  and ``fn'(..f1'(x))`` meet where the pair rules above cancel ``R`` against ``L``;
  ``f'(y)`` has y's rank and y's dims on the axes ``L`` removes, so ``L`` runs on it
  wherever it runs on y, which is what the original's nodes establish for the views built
  (a candidate that keeps such a pair relies on the original's own ``L``);
- a ``Conv`` of a constant-mode ``Pad`` (opset 11 on, constant pads that are not negative,
  none on the batch and channel axes, the value absent or +0.0 to the bit), its
  ``auto_pad`` NOTSET, is keyed as the Conv of the Pad's input with the Pad's spatial pads
  added to its own (the Conv's padding is +0.0 on those axes: the same function), also
  where the Pad is reached through layout pairs cancelled above or values passed through;
- a ``Reshape`` to one dim is keyed as ``Reshape(x, [-1])``: where it runs its output is
  x's elements in order, whatever the one element says (a constant ``x``: the key of those
  elements, computed by that definition; an ``x`` of rank 1: x's own key);
- these views (a read target dim as ``-1``, a Reshape pair, a Transpose pair, a Squeeze
  and Unsqueeze pair, a Reshape to one dim, a Reshape through views) hold only where the
  nodes run: a candidate's key that drops one (an identity Transpose or pair, a cancelled
  Squeeze or Unsqueeze pair, the first of two Reshapes, a view before a Reshape that reads
  none of its dims or that a Squeeze or Unsqueeze reshapes, a Reshape to one dim other
  than ``-1``, a read target
  dim as ``-1``) assumes that it does, and its
  output is proved only where the original's own nodes establish that wherever the
  original runs (a Transpose of the same input with a permutation of that length, a
  Squeeze or Unsqueeze of it at the same axes, a Reshape of it to the same target);
- an LSTM, GRU or RNN whose initial state (``initial_h``, an LSTM's ``initial_c``) is a
  constant of zero bits, or a ConstantOfShape of a float zero of any shape (moved or
  selected by Slice, Reshape, Expand, Tile, Squeeze, Unsqueeze, Transpose, Flatten or
  Identity: each element one of the fill's), is keyed without it (the spec's default state is zero), where its
  recurrence weight (and peepholes) are finite constants (an infinite weight times zero
  is NaN); a candidate's key that drops one assumes the state has the shape the node
  needs, which the original's node with the same input and the same zero state shows;
- a ``ConstantOfShape`` whose shape is read as integers (above) is keyed by its elements;
- integer Add, Sub, Mul, Div of a read dim is read as that expression (``2 * dim``), so a
  Reshape target whose one read entry is such an expression gets the ``-1`` above; a scalar
  reshaped to one dim is read as a list of one element;
- a ``Concat`` piece with no elements wherever it is computed (a constant of none, a
  ConstantOfShape whose shape holds a 0, an elementwise op of such a piece) is left out of
  its key, a Concat left with one input keyed as that input; this assumes the Concat runs
  (its pieces' other dims agree), which the original's Concat of the same inputs establishes;
- where a proof is incomplete and a key read a dim or a Cast, a second look reads onnx's
  shape inference of each model (as ranks, below) for static dims and element types: a
  dim read from a shape that inference gives as an integer is that integer (also a dim
  a Reshape's ``0`` copies, and a Reshape's output dims its read target fixes), two such
  integer scalars multiplied are their product (a dim times 1 is that dim, in either
  look), a Reshape whose target reads one dim of its own input, the input's other dims
  integers whose product is the target's other entries', runs wherever that input exists
  (its element count is what the target asks: nothing assumed), and a ``Cast`` to the element type its
  input already has is keyed as its input (it copies every value); a ``Shape``, or an
  integer Cast, Slice, Gather, Squeeze or Unsqueeze of one that copies its elements, whose
  every element inference gives as an integer is a constant of those integers (and what is
  computed from it and constants alone a fold, below, evaluated with it as that constant);
  where that look is still incomplete, another reads the original's small integer folds
  the look before evaluated as those constants in shape inference (so the dims that
  follow from a computed padding are static, as in a candidate that folded it), up to
  ``MAX_LOOKS`` looks and while each evaluates a fold the one before did not;
- a value computed from constants alone that the candidate does not compute the same way
  (a fold) is evaluated once on onnxruntime, with the kernels the original itself runs,
  and keyed by its bytes; where the operator's definition copies or moves bits without
  arithmetic, from constant inputs, it is computed by that definition instead (no kernel
  to ask): a ``ConstantOfShape`` (its value's bits in every element), an ``Unsqueeze``,
  ``Squeeze``, ``Reshape`` or ``Flatten`` (the input's elements in the shape the spec
  gives), an ``Identity``, a ``Cast`` that converts every value exactly;
- an affine chain gets a normal form: a Conv, ConvTranspose (one group), Gemm or MatMul
  with a constant weight, or an inference BatchNormalization, followed by per-channel
  constant Mul, Add, Sub, Div or BatchNormalization, is ``op(x; W) + b`` with ``W`` and
  ``b`` composed in float64; a convolution of ``Mul(x, s)``, ``s`` finite and one element
  or one per input channel of ``x``, is one of ``x`` with ``W`` scaled per input channel.
  Two forms over the same ``x``, attributes and definition (a convolution's, as its
  node's key names it) are equal when
  every weight is within ``ROUNDING_UNITS`` roundings of the stored dtype of the other's,
  and every bias within as many roundings of the magnitude of the terms summed into it
  (an infinity or NaN agrees with nothing):
  what a float fold of the same chain may round, far below the exact tolerance, and far
  below any real fold bug (a BatchNormalization folded with the wrong epsilon is off by
  ~1e-3). A per-channel constant must broadcast along the channel axis of an output of
  known rank (from onnx's shape inference with the model's declared intermediate types
  dropped), and change no shape.

``number_original`` takes the original's side before the passes change its parse in
place (so the verifier needs no copy of it): where every value the original computes from
constants alone is small and computed by its definition, those are keyed by their bytes
first, and a value keyed later with the structural key of one of them (in either model)
gets its bytes' key; ``Premise.prove`` then keys the candidate against it.

Outputs are proved only between models with the same interface: the same fed inputs
(names and dtypes) and the same outputs in the same order (callers read them by position).

Never given a key equal to anything else (so never proved): nodes with subgraphs, calls of
model-local functions, random or dropout-like operators other than the axiom above, and
operators outside the default and ``com.microsoft`` domains. A value left unproved is not
a failure: the verifier then compares the two models on samples, as without a proof.

Equal keys mean the same ONNX computation; onnxruntime may still round the two graphs
differently where it fuses differently, within its own float32 error.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from optcc import ir as oir
from optcc.numerics.op_versions import definition, schema_version
from optcc.runtime.session import make_session, run

__all__ = ["Premise", "Proof", "number_original", "prove_equivalent"]

KNOWN_DOMAINS = ("", "ai.onnx", "com.microsoft")
MAX_FOLD_CHECK_BYTES = 64 * 1024 * 1024  # constants evaluated to check folds, in all (a fill: its one element)
SMALL_TENSOR_ELEMENTS = 1024  # constants keyed by their bytes in the table (larger: a fill, or bucketed)
MAX_DEFINED_DEPTH = 8  # folds computed by definition through at most this many nodes
MAX_LOOKS = 4  # looks at inferred shapes, each reading the folds the one before evaluated
_UNKNOWN = object()  # not looked up yet


@dataclasses.dataclass
class Proof:
    """Which outputs were proved equal to the original's."""

    outputs: dict[str, bool]
    folds_checked: int = 0  # folded constants evaluated on the original and matched

    @property
    def complete(self) -> bool:
        return bool(self.outputs) and all(self.outputs.values())

    def to_dict(self) -> dict[str, Any]:
        return {"outputs": dict(self.outputs), "folds_checked": self.folds_checked}


def prove_equivalent(original: ir.Model, candidate: ir.Model, *,
                     original_proto: onnx.ModelProto | Callable[[], onnx.ModelProto | None] | None = None,
                     candidate_proto: onnx.ModelProto | None = None) -> Proof:
    """Try to prove that ``candidate`` computes what ``original`` computes (module docstring).

    ``original_proto``/``candidate_proto``: the same models already serialized (their
    external data may be left out), handed over to spare serializing them again: the
    proof changes them. The original's may be a function returning it (or None), called
    only if the proof needs it."""
    numbering = _Numbering()
    for model, given in ((original, original_proto), (candidate, candidate_proto)):
        if given is not None:
            numbering.given[id(model)] = given
    looks = [numbering]
    try:
        proof = _prove(original, candidate, numbering)
        if proof.complete or not numbering.would_infer:
            return proof
        fixed: dict[str, np.ndarray] = {}
        while True:
            # a look that reads the static dims and element types onnx's shape inference gives
            # (each model's serialization reused), the original's small integer folds the look
            # before evaluated read by inference as those constants (the dims that follow from
            # them then static, as in a candidate that folded them)
            again = _Numbering(inferred=True, fixed={id(original): fixed})
            again._protos.update(numbering._protos)
            looks.append(again)
            proof = _prove(original, candidate, again)
            if proof.complete or len(looks) > MAX_LOOKS or set(again.integer_folds) <= set(fixed):
                return proof
            fixed = {**fixed, **again.integer_folds}
    finally:
        # views of memory-mapped external data must not outlive the call (the file could
        # not be closed while they exist), and the tables refer to each other
        for look in looks:
            look.release()


def number_original(original: ir.Model, *,
                    original_proto: Callable[[], onnx.ModelProto | None] | None = None) -> Premise | None:
    """The original's side of a proof, taken now, so that ``original`` may change after
    (the parse the passes then rewrite in place): its outputs' keys, its fed inputs, and the
    key of every value they are computed from. Only for an original whose values computed
    from constants alone (its constant frontier) are all computed by their operator's
    definition (``_Keys._defined``), ``SMALL_TENSOR_ELEMENTS`` elements at most each or
    one element repeated (a ConstantOfShape's fill, held as a view of that element): those
    are keyed by their bytes now, in the graph's order (so a fold read by another is keyed
    first), and a value of either model keyed later with the structural key one of them had
    gets its bytes' key and array (``_Numbering.folded``): it computes that value, whose
    bytes these are. A value the candidate computes as the original does so gets the key the
    original's has, and a candidate's constant of the same bytes too, as ``prove_equivalent``
    keys a fold. None otherwise (a fold onnxruntime must evaluate, or a large one: prove with
    ``prove_equivalent`` on an unchanged original). ``original_proto``: a
    function returning ``original`` parsed again (not changed by the passes) for the
    shape inference its numbering may ask for (now, while ``original`` is unchanged).

    The keys are those ``prove_equivalent`` gives the original: its ranks are inferred
    for the original's own static input shapes (``Premise.prove`` declines a candidate
    accepting other ones), and values keyed alike compute alike whichever model is
    numbered first."""
    numbering = _Numbering()
    if original_proto is not None:
        numbering.given[id(original)] = original_proto
    try:
        keys = _Keys(original, numbering, _static_shapes(original))
        folds = keys.fold_by_definition(keys.constant_frontier()) if keys.may_fold_by_definition() else None
        if folds is None:
            numbering.release()
            return None
        outputs = {v.name: (keys.key(v), v.dtype) for v in original.graph.outputs}
        facts = keys.facts()  # now: the passes may change the graph after
        keys.freeze()
    except Exception:
        numbering.release()
        raise
    fed = {v.name: v.dtype for v in _fed_inputs(original)}
    return Premise(numbering, outputs, fed, keys.input_shapes, folds, facts)


@dataclasses.dataclass
class Premise:
    """An original numbered by ``number_original``: its outputs' keys and dtypes by name,
    its fed inputs' dtypes by name, and the static input shapes its ranks were inferred
    for; ``prove`` judges one candidate, then ``release`` drops the tables."""

    numbering: _Numbering
    outputs: dict[str, tuple[int, ir.DataType | None]]
    inputs: dict[str, ir.DataType | None]
    shapes: dict[str, list[int]]
    folds: list[int]  # the structural keys of the original's values folded by definition
    facts: set[tuple] = dataclasses.field(default_factory=set)  # ``_Keys.facts`` of the original

    def prove(self, candidate: ir.Model, *, candidate_proto: onnx.ModelProto | None = None) -> Proof | None:
        """Which of ``candidate``'s outputs are proved equal to the original's, as
        ``prove_equivalent`` decides; None when the candidate's static input shapes are not
        the original's (then ``prove_equivalent`` on the original decides)."""
        if _static_shapes(candidate) != self.shapes:
            return None
        if candidate_proto is not None:
            self.numbering.given[id(candidate)] = candidate_proto
        self.numbering.folded_met.clear()  # from here on, what the candidate computes the original's way
        candidate_keys = _Keys(candidate, self.numbering)
        proof = _compared(candidate, candidate_keys, self.inputs,
                          {name: (lambda key=key: key, dtype) for name, (key, dtype) in self.outputs.items()}, 0,
                          lambda: self.facts)
        # the folds checked: those the candidate does not compute the original's way
        proof.folds_checked = sum(1 for key in self.folds if key not in self.numbering.folded_met)
        return proof

    def release(self) -> None:
        self.numbering.release()


def _static_shapes(model: ir.Model) -> dict[str, list[int]]:
    """The model's graph inputs of static shape, by name: their dims."""
    return {v.name: [int(d) for d in v.shape] for v in _fed_inputs(model)
            if v.shape is not None and all(isinstance(d, int) and d > 0 for d in v.shape)}


def _compared(candidate: ir.Model, candidate_keys: _Keys, original_inputs: dict[str, ir.DataType | None],
              original_outputs: dict[str, tuple[Callable[[], int], ir.DataType | None]], evaluated: int,
              original_facts: Callable[[], set[tuple]]) -> Proof:
    """Per candidate output: proved when both models are fed the same inputs (names and
    dtypes) and have the same outputs in the same order (a caller reads them by position),
    the original's output of that name has its dtype and key, and what the candidate's
    key assumes (``_Keys.assumed``) the original's nodes establish wherever it runs
    (``original_facts``, called after every original output is keyed)."""
    fed = {v.name: v.dtype for v in _fed_inputs(candidate)}
    same_inputs = fed.keys() == original_inputs.keys() and all(
        dtype is None or dtype == original_inputs[name] for name, dtype in fed.items())
    same_outputs = [v.name for v in candidate.graph.outputs] == list(original_outputs)
    outputs: dict[str, bool] = {}
    for value in candidate.graph.outputs:
        twin = original_outputs.get(value.name)
        outputs[value.name or ""] = (
            same_inputs and same_outputs and twin is not None
            and (value.dtype is None or twin[1] is None or value.dtype == twin[1])
            and candidate_keys.key(value) == twin[0]()
        )
    if candidate_keys._assumed and any(outputs.values()):
        facts = original_facts()
        for value in candidate.graph.outputs:
            if outputs[value.name or ""] and not candidate_keys.assumed([value]) <= facts:
                outputs[value.name or ""] = False
    return Proof(outputs, evaluated)


def _prove(original: ir.Model, candidate: ir.Model, numbering: _Numbering) -> Proof:
    candidate_keys = _Keys(candidate, numbering)
    computed = candidate_keys.all_keys() | candidate_keys.constant_keys()
    # ranks are inferred for the inputs the candidate accepts: its static input shapes
    shapes = _static_shapes(candidate)
    # folds: values the original computes from constants alone and the candidate does not
    # compute the same way, checked by evaluating them
    original_keys = _Keys(original, numbering, shapes)
    folds = [v for v in original_keys.constant_frontier() if original_keys.key(v) not in computed]
    # the folds are keyed by their bytes from here on; values keyed before from a fold's
    # structure keep that key, which still says how they are computed (a frontier value
    # the candidate computes the same way has no fold among its ancestors: the candidate
    # would compute that fold the same way too)
    evaluated = original_keys.evaluate(folds) if folds else 0
    numbering.integer_folds = {v.name: a for v in folds if (a := original_keys._arrays.get(id(v))) is not None
                               and a.dtype.kind in "iu" and a.size <= MAX_SHAPE_ELEMENTS and v.name}
    original_inputs = {v.name: v.dtype for v in _fed_inputs(original)}
    # the original's outputs keyed only when compared, after the folds are keyed by their bytes
    original_outputs = {v.name: (lambda v=v: original_keys.key(v), v.dtype) for v in original.graph.outputs}
    return _compared(candidate, candidate_keys, original_inputs, original_outputs, evaluated, original_keys.facts)


class _Numbering:
    """Interns keys as small ints shared by both graphs; hands out keys equal to nothing.
    ``inferred``: read the static dims and element types onnx's shape inference gives each
    model's values (``types``) where the keys ask for them (``_Keys.inferred_dim``,
    ``_Keys.inferred_type``)."""

    def __init__(self, inferred: bool = False, fixed: dict[int, dict[str, np.ndarray]] | None = None) -> None:
        self.inferred = inferred
        self.would_infer = False  # a key read a dim or a Cast that inferred types might settle
        # id(model) -> values shape inference reads as these constants (folds an earlier look evaluated)
        self.fixed = fixed or {}
        self.integer_folds: dict[str, np.ndarray] = {}  # the original's small integer folds evaluated, by name
        self._types: dict[int, tuple[dict[str, tuple[int, tuple]], ir.Model]] = {}
        self._table: dict[tuple, int] = {}
        self._fresh: Iterator[int] = itertools.count()
        self._tensor_keys: dict[int, tuple[int, ir.TensorProtocol]] = {}
        self._tensor_arrays: dict[int, tuple[ir.TensorProtocol, np.ndarray]] = {}
        self._decoded: dict[tuple, np.ndarray] = {}  # small parsed tensors' arrays, by stored content
        self._affine: dict[tuple, list[tuple[_Affine, int]]] = {}
        self._buckets: dict[tuple, list[tuple[np.ndarray, int]]] = {}
        self._fills: dict[tuple, np.ndarray] = {}  # (dtype, dims, element bytes) -> the one read-only view
        self._ranks: dict[int, tuple[dict[str, int], ir.Model]] = {}
        self.models: list[_Keys] = []
        self.forms: dict[int, tuple[int, _Affine]] = {}  # structural key -> affine key and form
        self._protos: dict[int, tuple[onnx.ModelProto, set[str], set[str], ir.Model]] = {}
        self.given: dict[int, Any] = {}  # id(model) -> that model serialized (or a function returning it)
        # the structural key of an original's value computed from constants alone -> the key of
        # its bytes and its array (``number_original``); the structural keys met again since
        self.folded: dict[int, tuple[int, np.ndarray]] = {}
        self.folded_met: set[int] = set()
        self.schemas: dict[tuple[str, str, int], int | None] = {}  # (domain, op, opset) -> schema version
        self.definitions: dict[tuple[str, str, int], tuple] = {}  # (domain, op, opset) -> ``definition``'s answer

    def release(self) -> None:
        """Drop every table (and with them the tensor views they hold)."""
        for keys in self.models:
            keys.__dict__.clear()
        for table in (self._table, self._tensor_keys, self._tensor_arrays, self._decoded, self._affine, self._buckets, self._fills,
                      self._ranks, self._types, self._protos, self.forms, self.given, self.folded, self.folded_met):
            table.clear()
        self.models.clear()

    def proto(self, model: ir.Model) -> onnx.ModelProto:
        """``model`` serialized (once, or the serialization handed over) without the data of
        initializers and main-graph Constant nodes' ``value`` tensors longer than
        ``MAX_SHAPE_ELEMENTS`` or stored outside (their type and shape only: enough for
        shape inference). Only ``ranks`` changes it, fixing its graph inputs' shapes, which
        the fold evaluation does not read."""
        if id(model) not in self._protos:
            proto = self.given.pop(id(model), None)
            if callable(proto):
                proto = proto()
            if proto is not None:
                aside = _strip_large(proto)
            else:
                with oir.initializers_set_aside(model, _large_or_external) as set_aside:
                    proto = oir.serialize(model)
                dims = {v.name: [int(d) for d in t.shape] for v, t in set_aside}
                for tensor in proto.graph.initializer:  # no data, only their shapes (what inference reads)
                    if tensor.name in dims:
                        del tensor.dims[:]
                        tensor.dims.extend(dims[tensor.name])
                aside = set(dims)
            constants = _strip_large_constants(proto)
            del proto.graph.value_info[:]  # declared intermediate types are not trusted
            self._protos[id(model)] = (proto, aside, constants, model)
        return self._protos[id(model)][0]

    def forget(self, model: ir.Model) -> None:
        """Drop ``model``'s serialization, handed-over parse and inferred ranks."""
        for table in (self._protos, self.given, self._ranks):
            table.pop(id(model), None)

    def without_data(self, model: ir.Model) -> tuple[set[str], set[str]]:
        """The initializers whose data ``proto(model)`` leaves out, and the outputs of the
        Constant nodes whose tensor it leaves out."""
        self.proto(model)
        return self._protos[id(model)][1], self._protos[id(model)][2]

    def ranks(self, model: ir.Model, input_shapes: dict[str, list[int]]) -> dict[str, int]:
        """Value ranks by name from onnx's shape inference on ``model`` with its declared
        intermediate types dropped and ``input_shapes`` for its inputs (once per model); none
        for a model that holds packed attributes (``optcc.ir.PackedAttr``: millions of list
        elements, which inference would copy several times over; what the proof cannot
        decide without them, samples judge)."""
        if id(model) not in self._ranks:
            try:
                ranks = {} if oir.holds_packed(model) else _inferred_ranks(self.proto(model), input_shapes)
            except Exception:  # noqa: BLE001 - then no rank is known
                ranks = {}
            self._ranks[id(model)] = (ranks, model)
        return self._ranks[id(model)][0]

    def types(self, model: ir.Model, input_shapes: dict[str, list[int]]) -> dict[str, tuple[int, tuple]]:
        """Value element types and dims (an int where static, else None) by name from onnx's
        shape inference, as ``ranks`` (once per model)."""
        if id(model) not in self._types:
            try:
                if oir.holds_packed(model):  # inference would copy its packed lists several times over
                    types = {}
                else:
                    proto = self.proto(model)
                    if self.fixed.get(id(model)):
                        proto = _with_constants(proto, self.fixed[id(model)])
                    types = _inferred_types(proto, input_shapes)
            except Exception:  # noqa: BLE001 - then nothing is known
                types = {}
            self._types[id(model)] = (types, model)
        return self._types[id(model)][0]

    def parse_ranks(self, parse: onnx.ModelProto | None, input_shapes: dict[str, list[int]]) -> dict[str, int]:
        """``ranks`` of a model from ``parse``, a parse of its file (changed: its large tensors
        emptied and its declared intermediate types dropped, as ``proto`` does); none without one."""
        if parse is None:
            return {}
        try:
            _strip_large(parse)
            _strip_large_constants(parse)
            del parse.graph.value_info[:]
            return _inferred_ranks(parse, input_shapes)
        except Exception:  # noqa: BLE001 - then no rank is known
            return {}

    def numpy(self, tensor: ir.TensorProtocol, *, shared: bool = False) -> np.ndarray:
        """``tensor.numpy()``, decoded once per tensor object (clones share them); with
        ``shared``, a small parsed tensor once per stored content (``_stored``: the shapes and
        values of many ConstantOfShape nodes are one), then read-only."""
        known = self._tensor_arrays.get(id(tensor))
        if known is None or known[0] is not tensor:
            stored = _stored(tensor) if shared else None
            array = None if stored is None else self._decoded.get(stored)
            if array is None:
                array = oir.decoded(tensor)
                if stored is not None:
                    array.flags.writeable = False  # shared by every tensor of this content
                    self._decoded[stored] = array
            else:
                oir.share_decoded(tensor, array)  # the passes' later reads of it decode nothing
            known = self._tensor_arrays[id(tensor)] = (tensor, array)  # the tensor keeps its id unique
        return known[1]

    def intern(self, key: tuple) -> int:
        return self._table.setdefault(key, len(self._table))

    def unique(self) -> int:
        return self.intern(("unique", next(self._fresh)))

    def tensor(self, tensor: ir.TensorProtocol) -> int:
        """A constant's key: equal for tensors of one element type, shape and bytes (cached
        per tensor object, which clones share). Tensors of at most ``SMALL_TENSOR_ELEMENTS``
        are interned by their type, shape and stored bytes; a larger one whose elements all
        have the same bytes (a plain array: ``_filled_element``) by its type, shape and that
        element; other larger ones are bucketed by type, shape, size and their first and last
        bytes, and compared byte for byte within a bucket (which way is decided by type,
        shape and bytes alone, so equal tensors go one way)."""
        cached = self._tensor_keys.get(id(tensor))
        if cached is not None and cached[1] is tensor:
            return cached[0]
        dtype = tensor.dtype
        array = tensor.raw if type(tensor) is ir.Tensor else None
        if isinstance(array, np.ndarray) and array.size <= SMALL_TENSOR_ELEMENTS \
                and _PLAIN_ARRAYS.get(array.dtype) == dtype:
            # a plain little-endian array of the tensor's own type: its bytes are tobytes()'s
            key = self.intern(("bytes", int(dtype), array.shape, array.tobytes()))
            self._tensor_keys[id(tensor)] = (key, tensor)  # the reference keeps the id unique
            return key
        proto = tensor.raw if type(tensor) is ir.serde.TensorProtoTensor else None
        # its dims: a parsed tensor's read from its proto (``shape`` builds a Shape each time)
        dims = tuple(proto.dims) if proto is not None else tuple(int(d) for d in tensor.shape)
        if proto is not None and proto.HasField("raw_data") and proto.data_location != onnx.TensorProto.EXTERNAL \
                and proto.data_type != onnx.TensorProto.STRING and math.prod(dims) <= SMALL_TENSOR_ELEMENTS:
            # a parsed tensor with its bytes in raw_data: those are tobytes()'s
            key = self.intern(("bytes", proto.data_type, dims, proto.raw_data))
            self._tensor_keys[id(tensor)] = (key, tensor)  # the reference keeps the id unique
            return key
        if math.prod(dims) <= SMALL_TENSOR_ELEMENTS and dtype != ir.DataType.STRING:
            # small: keyed by its bytes as the format stores them (the same for a tensor of
            # the same type, shape and values, however it is held), compared exactly by the table
            try:
                stored = self._repeated_bytes(tensor, proto, dtype) if proto is not None else None
                if stored is None:
                    # an external tensor's read from its file: onnx-ir's tobytes() maps the
                    # whole file and keeps that map as long as the tensor
                    stored = oir.stored_bytes(tensor)
            except ValueError:  # e.g. an undefined type: a key equal to nothing
                stored = None
            key = self.unique() if stored is None else self.intern(("bytes", int(dtype), dims, stored))
            self._tensor_keys[id(tensor)] = (key, tensor)  # the reference keeps the id unique
            return key
        array = self.numpy(tensor)
        raw = _raw_bytes(tensor, array)
        element = _filled_element(array, dtype, raw)
        if element is not None:  # every element the same bytes: keyed by them and the shape alone
            key = self.intern(("filled", int(dtype), dims, element))
            self._tensor_keys[id(tensor)] = (key, tensor)  # the reference keeps the id unique
            return key
        mask = _PACKED_MASKS.get(tensor.dtype)
        head, tail = (raw[:64], raw[-64:]) if mask is None else (raw[:64] & mask, raw[-64:] & mask)
        bucket = self._buckets.setdefault((int(tensor.dtype), dims, raw.size, bytes(head), bytes(tail)), [])
        key = next((k for other, k in bucket if _same_values(raw, other, mask)), None)
        if key is None:
            key = self.unique()
            bucket.append((raw, key))
        self._tensor_keys[id(tensor)] = (key, tensor)  # the reference keeps the id unique
        return key

    def _repeated_bytes(self, tensor: ir.TensorProtocol, proto: onnx.TensorProto, dtype: ir.DataType) -> bytes | None:
        """The bytes of a parsed FLOAT or INT64 tensor whose values are stored in a repeated
        field (``float_data``, ``int64_data``): those of its decoded array (``numpy``, kept
        for the affine forms that read it), which are ``tobytes()``'s, little-endian values
        of the tensor's own type; None for any other tensor."""
        if not (dtype == ir.DataType.FLOAT and proto.float_data or dtype == ir.DataType.INT64 and proto.int64_data):
            return None
        array = self.numpy(tensor)
        return array.tobytes() if _PLAIN_ARRAYS.get(array.dtype) == dtype else None

    def array(self, array: np.ndarray) -> int:
        """The key ``tensor`` gives a tensor of ``array``'s type, shape and values (a fill of
        more than ``SMALL_TENSOR_ELEMENTS`` elements keyed without being materialized)."""
        dtype = _PLAIN_ARRAYS.get(array.dtype)
        if dtype is not None and array.size > SMALL_TENSOR_ELEMENTS:
            element = _filled_element(array, dtype)
            if element is not None:
                return self.intern(("filled", int(dtype), tuple(int(d) for d in array.shape), element))
        return self.tensor(ir.Tensor(np.ascontiguousarray(array)))

    def fill(self, element: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A read-only array of ``shape`` whose every element is ``element`` (a one-element
        array), without materializing it: one view per type, shape and element bytes, so
        that equal fills are one object (``_Affine.agrees`` then compares their forms without
        reading them)."""
        index = (element.dtype.str, shape, element.tobytes())
        known = self._fills.get(index)
        if known is None:
            known = self._fills[index] = oir.filled_view(element, shape)
        return known

    def affine(self, form: _Affine) -> int:
        """The key of an affine normal form: that of an earlier form with the same structure
        whose constants agree within rounding, else a new one."""
        entries = self._affine.setdefault(form.structure, [])
        for other, key in entries:
            if form.agrees(other):
                return key
        key = self.unique()
        entries.append((form, key))
        return key


_INTEGER_ARITHMETIC = ("Add", "Sub", "Mul", "Div")


def _mentions(entry: Any, key: int) -> bool:
    """Whether a symbolic shape entry (a tuple: a dim read, arithmetic) reads the value of
    ``key``; any integer inside it equal to ``key`` counts (a literal as much as a key)."""
    return isinstance(entry, tuple) and any(part == key or _mentions(part, key) for part in entry)


def _integer_arithmetic(op: str, parts: list[tuple[bool, list]]) -> tuple[bool, list] | None:
    """``op`` on two shape-like integer tensors whose elements are all integers, by ONNX's
    broadcasting (one element against a list; a scalar only with a scalar stays one), as
    ``_shape_elements`` gives them; None where an element is a dim of unknown size, the
    lengths do not broadcast, a Div has a negative operand or a zero divisor (integer
    division rounds toward zero in onnxruntime, down in NumPy: the same only there), or a
    result leaves int64 with room to spare."""
    (scalar_a, a), (scalar_b, b) = parts
    if not all(isinstance(e, int) for e in (*a, *b)) or len(a) != len(b) and 1 not in (len(a), len(b)):
        return None
    n = max(len(a), len(b))
    pairs = list(zip(a * n if len(a) == 1 else a, b * n if len(b) == 1 else b))
    if op == "Div" and any(x < 0 or y <= 0 for x, y in pairs):
        return None
    compute = {"Add": lambda x, y: x + y, "Sub": lambda x, y: x - y, "Mul": lambda x, y: x * y,
               "Div": lambda x, y: x // y}[op]
    result = [compute(x, y) for x, y in pairs]
    if any(abs(r) >= 1 << 62 for r in result):
        return None
    return scalar_a and scalar_b, result


def _symbolic_arithmetic(op: str, parts: list[tuple[bool, list]]) -> tuple[bool, list] | None:
    """``op`` on two shape-like integer tensors, broadcast as ``_integer_arithmetic`` does,
    where an element is not an integer: each result element the expression
    ``("arithmetic", op, a, b)`` of its operands (a dim read or an integer). Sound as a
    name of the value it computes: two equal expressions are the same operator on the same
    elements. Only where an operand is not all integers (``_integer_arithmetic`` first)."""
    (scalar_a, a), (scalar_b, b) = parts
    if len(a) != len(b) and 1 not in (len(a), len(b)):
        return None
    n = max(len(a), len(b))
    pairs = zip(a * n if len(a) == 1 else a, b * n if len(b) == 1 else b)
    return scalar_a and scalar_b, [("arithmetic", op, x, y) for x, y in pairs]


class _Keys:
    """The keys of one model's top-level values, computed on demand."""

    def __init__(self, model: ir.Model, numbering: _Numbering,
                 input_shapes: dict[str, list[int]] | None = None) -> None:
        self.model = model
        self.numbering = numbering
        self.input_shapes = input_shapes or {}  # static input shapes to infer ranks with
        numbering.models.append(self)
        self.opsets = {("" if d == "ai.onnx" else d): v for d, v in model.opset_imports.items()}
        self.functions = {(f.domain, f.name, f.overload) for f in model.functions.values()}
        self.fed = {v.name for v in _fed_inputs(model)}
        self._keys: dict[int, int] = {}  # id(value) -> key
        self._values: dict[int, ir.Value] = {}  # keeps the ids of keyed values unique
        self._arrays: dict[int, np.ndarray] = {}  # evaluated folds, by id(value)
        self._forms: dict[int, _Affine] = {}  # affine normal forms, by id(value)
        self._ranks: dict[str, int] | None = None
        self._ranks_by_key: tuple[int, dict[int, int]] | None = None  # (len(_keys) then, ranks)
        self._held: tuple[int, set[int]] | None = None  # (len(_keys) then, the keys)
        self._frozen_names: dict[int, str] | None = None  # the keyed values' names when frozen
        self._frozen_parse: Any = None  # when frozen uninferred: its parse (or a function returning it)
        self._rank_memo: dict[int, tuple[ir.Value, int]] = {}  # ranks found, by id(value)
        # ranks not found, by id(value): (the value, ``_rank_state()`` then, the depth asked at)
        self._rank_failures: dict[int, tuple[ir.Value, tuple, int]] = {}
        self._ranks_warmed = False  # every node output ranked by definition in graph order (``_warm_ranks``)
        self._warming = False  # while warming: ``rank`` answers from the memo alone
        self._shapes: dict[int, tuple[bool, list] | None] = {}  # shape-like values, by id(value)
        self._constants: dict[int, tuple[ir.Value, ir.TensorProtocol | None]] = {}  # by id(value)
        self._selections: dict[str, np.ndarray] = {}  # static selections of a Shape, by name (``_static_selection``)
        self._node_attributes: dict[int, tuple[ir.Node, tuple | None]] = {}  # by id(node)
        # layout views (``_view``): the key of a Transpose's, Squeeze's or Unsqueeze's output ->
        # (key of its input, its permutation or sorted axes, ``_VIEW_KIND``)
        self._views: dict[int, tuple[int, tuple[int, ...], str]] = {}
        # facts a node's success establishes about its input, and facts a cancelled pair
        # relies on, by id(node): (node, (kind, key of the input, permutation length or axes))
        self._facts: dict[int, tuple[ir.Node, list[tuple]]] = {}
        self._assumed: dict[int, tuple[ir.Node, list[tuple]]] = {}
        # a Reshape's key with a read target -> (its input's key, that target, its fact)
        self._reshapes: dict[int, tuple[int, tuple, tuple]] = {}
        # a Reshape's key with a read target -> (its input's key, its fact, and its target and
        # allowzero where the target reads no dim): its elements are that input's in order
        # (``_order_source``, ``_reshaped_view``)
        self._ordered: dict[int, tuple[int, tuple, tuple | None]] = {}
        # a Slice's key with constant arguments -> (its input's key, {axis: (start, end, step)})
        self._slices: dict[int, tuple[int, dict[int, tuple[int, int, int]]]] = {}
        # a Concat's key -> ((its definition, its attributes), the keys it concatenates)
        self._concats: dict[int, tuple[tuple, tuple[int, ...]]] = {}
        # values an op that commutes with a layout change was keyed through (``_sunk``), by
        # id(value): (the value, the Transpose, Squeeze or Unsqueeze node whose output it
        # equals wherever the model runs, that node's input, the input's rank)
        self._layouts: dict[int, tuple[ir.Value, ir.Node, ir.Value, int]] = {}
        self._shadows: list[ir.Node] = []  # the nodes ``_sunk`` built, in order
        # a layout op's output that undoes the layout op before it (``_layout_of``), or a
        # value passed through (``_passed``), by id: (that value, the value it equals
        # wherever the model runs)
        self._aliases: dict[int, tuple[ir.Value, ir.Value]] = {}

    # ------------------------------------------------------------------ keys

    def key(self, value: ir.Value | None) -> int:
        if value is None:
            return self.numbering.intern(("absent",))
        keys = self._keys
        known = keys.get(id(value))
        if known is not None:
            return known
        # iterative post-order: graphs can be deeper than Python's recursion limit
        stack = [value]
        while stack:
            top = stack[-1]
            if id(top) in keys:
                stack.pop()
                continue
            node = top.producer()
            if node is not None and not self._leaf(top):
                pending = [v for v in node.inputs if v is not None and id(v) not in keys]
                if pending:
                    stack.extend(pending)
                    continue
            stack.pop()
            key = self._compute(top)
            folded = self.numbering.folded.get(key) if self.numbering.folded else None
            if folded is not None:  # computes an original's fold: keyed by its bytes, read as its array
                self.numbering.folded_met.add(key)
                key, self._arrays[id(top)] = folded
            self._set(top, key)
        return keys[id(value)]

    def _set(self, value: ir.Value, key: int) -> None:
        self._keys[id(value)] = key
        self._values[id(value)] = value

    def _leaf(self, value: ir.Value) -> bool:
        """Keyed without looking at inputs: graph inputs and constants."""
        return value.name in self.fed or self._constant(value) is not None

    def _is_constant(self, value: ir.Value) -> bool:
        return value.name not in self.fed and self._constant(value) is not None

    def _constant(self, value: ir.Value) -> ir.TensorProtocol | None:
        """The constant tensor behind ``value`` (once per value: a Constant's list
        attribute makes a new tensor on every read), else None."""
        known = self._constants.get(id(value))
        if known is None:
            tensor = _constant(value)
            if tensor is None and value.name not in self.fed:
                tensor = self._static_selection(value)
            known = self._constants[id(value)] = (value, tensor)  # the value keeps its id unique
        return known[1]

    def _static_selection(self, value: ir.Value) -> ir.TensorProtocol | None:
        """A ``Shape`` output, or a selection of one (``_selected``), whose every element
        onnx's shape inference gives as an integer (in the second look:
        ``_Numbering.inferred``), as the constant of those integers in its element type.
        Sound where the inferred dims are the dims the model runs with (its static input
        shapes, for which every inferred dim here is inferred): each of these operators
        copies dims or elements of its input without arithmetic, so the selection holds the
        same integers wherever the model runs, as the constant does. A dim inference leaves
        symbolic (a dynamic dim) is no integer, so no selection that holds one is a constant.
        Read without keying anything (the folds are keyed by their bytes only after this)."""
        node = value.producer()
        if node is None or node.op_type not in _SELECTING or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Shape":
            self.numbering.would_infer = True
        if not self.numbering.inferred:
            return None
        found = self._selected(value, 0)
        if found is None or None in found[2]:
            return None
        dtype, scalar, elements = found
        array = self._selections[value.name] = np.array(elements, dtype=dtype).reshape(() if scalar else (-1,))
        return ir.Tensor(array)

    def _selected(self, value: ir.Value, depth: int) -> tuple[type, bool, list[int | None]] | None:
        """A ``Shape`` output (its start and end attributes clamped as the spec clamps them)
        or what an integer Cast, an Identity, a Slice (constant arguments, axis 0, a positive
        step), a Gather (axis 0, constant indices within the length), a Squeeze of one element
        or an Unsqueeze of a scalar at axis 0 makes of one: (element type, whether a scalar,
        its elements: a dim's integer where onnx's shape inference gives it, else None);
        None for any other value, and where a Cast to int32 could not hold an integer."""
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx") or value.index() != 0 or depth > MAX_DEFINED_DEPTH \
                or node.op_type not in _SELECTING or not node.inputs or node.inputs[0] is None:
            return None
        op, inputs, opset = node.op_type, list(node.inputs), self.opsets.get("", 0)
        attrs = {name: attr.value for name, attr in node.attributes.data.items()}
        if op == "Shape":
            found = self.numbering.types(self.model, self.input_shapes).get(inputs[0].name)
            if found is None or found[1] is None or set(attrs) - {"start", "end"}:
                return None
            dims = [d if isinstance(d, int) and d >= 0 else None for d in found[1]]
            return np.int64, False, dims[slice(attrs.get("start", 0), attrs.get("end", len(dims)))]
        source = self._selected(inputs[0], depth + 1)
        if source is None:
            return None
        dtype, scalar, elements = source
        arguments = [self._array(v) for v in inputs[1:]]
        if any(a is None or a.dtype.kind not in "iu" for a in arguments):
            return None
        numbers = [[int(e) for e in a.reshape(-1)] for a in arguments]
        if op == "Identity":
            return source
        if op == "Cast":
            to = {ir.DataType.INT64.value: np.int64, ir.DataType.INT32.value: np.int32}.get(attrs.get("to"))
            if to is None or set(attrs) - {"to", "saturate"}:
                return None
            info = np.iinfo(to)
            fits = all(e is None or info.min <= e <= info.max for e in elements)  # a None: no integer kept
            return (to, scalar, elements) if to is np.int64 or fits else None
        if op == "Slice":
            if scalar or opset < 10 or attrs or not 2 <= len(numbers) <= 4 \
                    or any(len(n) != 1 for n in numbers) or (len(numbers) > 2 and numbers[2] not in ([0], [-1])):
                return None
            step = numbers[3][0] if len(numbers) > 3 else 1
            return (dtype, False, elements[slice(numbers[0][0], numbers[1][0], step)]) if step >= 1 else None
        if op == "Gather":
            if scalar or len(numbers) != 1 or attrs.get("axis", 0) != 0 or arguments[0].ndim > 1 \
                    or not all(-len(elements) <= i < len(elements) for i in numbers[0]):
                return None
            return dtype, arguments[0].ndim == 0, [elements[i] for i in numbers[0]]
        axes = numbers[0] if opset >= 13 and numbers else attrs.get("axes")
        if (opset >= 13 and (attrs or len(numbers) > 1)) or (opset < 13 and (numbers or set(attrs) - {"axes"})):
            return None
        allowed = ([0], [-1]) if opset >= 11 else ([0],)  # negative axes from opset 11
        if op == "Squeeze" and not scalar and len(elements) == 1 and (not axes or list(axes) in allowed):
            return dtype, True, elements
        if op == "Unsqueeze" and scalar and axes and list(axes) in allowed:
            return dtype, False, elements
        return None

    def _shape_elements(self, value: ir.Value | None) -> tuple[bool, list] | None:
        """A shape-like integer tensor as (is_scalar, elements), each element an int or
        ``("dim", key of x, i)`` (dim ``i`` of ``x``): constants, ``Shape`` and what
        Gather, Slice, Concat, Unsqueeze, Squeeze (of one element), a Reshape of a list to
        one dim, integer Casts and integer Add, Sub, Mul, Div (``_integer_arithmetic``) make
        of them; else None."""
        if value is None:
            return None
        if id(value) in self._shapes:
            return self._shapes[id(value)]
        self._shapes[id(value)] = found = self._shape_elements_of(value)
        return found

    def _shape_elements_of(self, value: ir.Value) -> tuple[bool, list] | None:
        array = self._array(value)
        if array is not None:
            if array.dtype.kind not in "iu" or array.ndim > 1 or array.size > MAX_SHAPE_ELEMENTS:
                return None
            return array.ndim == 0, [int(v) for v in array.reshape(-1)]
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx") or value.index() != 0:
            return None
        attrs = {name: attr.value for name, attr in node.attributes.data.items()}  # the UserDict's own dict: faster
        op, inputs = node.op_type, list(node.inputs)
        if op == "Shape":
            rank = self.rank(inputs[0])
            if rank is None:
                return None
            start, end = attrs.get("start", 0), attrs.get("end", rank)
            indices = range(rank)[slice(start, end)]
            self.numbering.would_infer = True
            dims = self.inferred_dims(inputs[0], rank)
            return False, [("dim", self.key(inputs[0]), i) if dims[i] is None else dims[i] for i in indices]
        if op in ("Cast", "Identity"):
            if op == "Cast" and attrs.get("to") not in (ir.DataType.INT64.value, ir.DataType.INT32.value):
                return None
            return self._shape_elements(inputs[0])
        if op not in ("Concat", "Unsqueeze", "Squeeze", "Gather", "Slice", "Reshape", *_INTEGER_ARITHMETIC):
            return None
        parts = [self._shape_elements(v) for v in inputs]
        if op == "Reshape":  # a list or a scalar in one dim is that list (-1, or its length)
            vector, target = (parts + [None])[:2]
            if vector is None or target is None or target[1] not in ([-1], [len(vector[1])]):
                return None
            return False, vector[1]
        if op == "Mul" and len(parts) == 2 and all(p is not None and p[0] for p in parts) \
                and 1 in (parts[0][1][0], parts[1][1][0]):
            return parts[1] if parts[0][1][0] == 1 else parts[0]  # a dim times 1
        if op in _INTEGER_ARITHMETIC:
            if len(parts) != 2 or None in parts:
                return None
            return _integer_arithmetic(op, parts) or _symbolic_arithmetic(op, parts)
        if op == "Concat" and attrs.get("axis") in (0, -1) and parts and all(p is not None and not p[0] for p in parts):
            return False, [e for p in parts for e in p[1]]
        if op == "Unsqueeze" and parts and parts[0] is not None and parts[0][0]:
            axes = attrs.get("axes") if len(inputs) == 1 else (parts[1][1] if len(parts) > 1 and parts[1] else None)
            return (False, parts[0][1]) if list(axes or []) in ([0], [-1]) else None
        if op == "Squeeze" and parts and parts[0] is not None and not parts[0][0] and len(parts[0][1]) == 1:
            # one element in one dim: squeezed (all unit dims, or axis 0, or -1 from opset 11) to a scalar
            axes = attrs.get("axes") if len(inputs) == 1 else (parts[1][1] if len(parts) > 1 and parts[1] else None)
            if len(inputs) > 1 and parts[1] is None:
                return None
            allowed = ([], [0], [-1]) if self.opsets.get("", 0) >= 11 else ([], [0])
            return (True, parts[0][1]) if list(axes or []) in allowed else None
        if op == "Gather" and len(parts) == 2 and all(p is not None for p in parts) and attrs.get("axis", 0) == 0 \
                and not parts[0][0] and all(isinstance(i, int) for i in parts[1][1]):
            data, (scalar, indices) = parts[0][1], parts[1]
            if not all(-len(data) <= i < len(data) for i in indices):
                return None
            return scalar, [data[i] for i in indices]
        if op == "Slice" and len(parts) >= 3 and all(p is not None for p in parts) and not parts[0][0]:
            starts, ends = parts[1][1], parts[2][1]
            axes = parts[3][1] if len(parts) > 3 else [0]
            steps = parts[4][1] if len(parts) > 4 else [1]
            numbers = [*starts, *ends, *axes, *steps]
            if len(starts) != 1 or not all(isinstance(n, int) for n in numbers) or axes not in ([0], [-1]) \
                    or steps[0] < 1:
                return None
            return False, parts[0][1][slice(starts[0], ends[0], steps[0])]
        return None

    def _integer_list(self, value: ir.Value) -> list[int] | None:
        """A computed 1-D integer tensor's elements, where ``_shape_elements`` reads them all
        as integers (dims it finds static included), else None."""
        found = self._shape_elements(value)
        if found is None or found[0] or not all(isinstance(e, int) for e in found[1]):
            return None
        return found[1]

    def rank(self, value: ir.Value, depth: int = 0) -> int | None:
        """A value's rank (once per value): a fed graph input's, its declared rank (what
        onnxruntime accepts for it); a Reshape's, the length of its target where that is read
        (``_shape_elements``: the spec's output has one dim per element); else by the
        operator's definition from its inputs' ranks (``_rank_by_definition``,
        ``MAX_RANK_DEPTH`` nodes up); else from onnx's own shape inference (ranks only).
        Values with one key
        have one rank, whichever model shows it: a model whose ranks are already inferred
        is asked first, then another model that has keyed a value with this key (the model
        keyed first, the candidate, is usually the smaller one to infer), then this model.
        A model that holds no value with this key is never inferred for it, so inference
        runs on a second model only for what the first lacks."""
        known = self._rank_memo.get(id(value))
        if known is not None and known[0] is value:
            return known[1]
        if self._warming:
            return None
        state = self._rank_state()
        failed = self._rank_failures.get(id(value))
        if failed is not None and failed[0] is value and failed[1] == state and failed[2] <= depth:
            return None  # not found from here with as many nodes left to read, nothing learnt since
        rank = self._rank_of(value, depth)
        if rank is not None:
            self._rank_memo[id(value)] = (value, rank)  # the value keeps its id unique
        elif self._rank_state() == state:
            self._rank_failures[id(value)] = (value, state, depth)
        return rank

    def _rank_state(self) -> tuple:
        """All that a rank ``_rank_of`` cannot find now may be found by later: this model's
        ranks warmed, and per numbered model whether its ranks are inferred and frozen, how
        many values it has keyed and how many folds it has evaluated. In one state, a rank not found at some depth is not
        found at a larger one either (the definitions are read through fewer nodes, the rest
        is the same): without remembering that, a value every path of a wide graph reaches
        was ranked again along each path."""
        return (self._ranks_warmed, tuple((m._ranks is None, m._frozen_parse is None, m._frozen_names is None,
                                           len(m._keys), len(m._arrays)) for m in self.numbering.models))

    def _rank_of(self, value: ir.Value, depth: int) -> int | None:
        key = self.key(value)
        node = value.producer()
        if node is None and value.name in self.fed and value.shape is not None:
            return value.shape.rank()
        if node is not None and node.op_type == "Reshape" and node.domain in ("", "ai.onnx") and len(node.inputs) == 2:
            target = self._shape_elements(node.inputs[1])
            if target is not None and not target[0]:
                return len(target[1])  # a Reshape's output has one dim per element of its target
        if node is not None and depth < MAX_RANK_DEPTH:
            rank = self._rank_by_definition(node, value, depth)
            if rank is not None:
                return rank
        if not self._ranks_warmed and self._frozen_names is None:
            # before inferring: the ranks the definitions give, read in graph order
            self._warm_ranks()
            known = self._rank_memo.get(id(value))
            if known is not None and known[0] is value:
                return known[1]
        models = sorted(self.numbering.models, key=lambda m: (m._ranks is None, m is self))
        for model in models:
            if model is self:
                rank = model._rank_map().get(value.name)
            elif key in model.held_keys():
                rank = model.ranks_by_key().get(key)
            else:
                continue
            if rank is not None:
                return rank
        return None

    def _rank_by_definition(self, node: ir.Node, value: ir.Value, depth: int) -> int | None:
        """The rank the spec gives a default-domain node's first output from its inputs'
        ranks (opset 7 on, multidirectional broadcasting): an elementwise unary operator's
        is its input's, and so is that of the operators whose output has their first input's
        rank (``_RANK_KEEPING_FIRST``: convolutions, pools, normalizations, Resize, Pad,
        Slice, Concat, each output of a Split); an elementwise binary operator's, the
        largest of its inputs'; a
        Transpose's, its permutation's length (else its input's); a reduction that keeps its
        dims, its input's; a MatMul's, numpy's matmul's (the larger rank where both are at
        least 2, one less where one operand is 1-D, 0 for two 1-D ones). None otherwise, or
        where an input's rank is unknown."""
        op = node.op_type
        if node.domain not in ("", "ai.onnx") or (value.index() != 0 and op != "Split") \
                or self.opsets.get("", 0) < 7 or not node.inputs or node.inputs[0] is None:
            return None
        if op in _RANK_KEEPING_FIRST:
            return self._input_rank(node.inputs[0], depth)
        if any(v is None for v in node.inputs):
            return None
        if op in _RANK_KEEPING or (op.startswith("Reduce") and node.attributes.get_int("keepdims", 1) == 1):
            return self._input_rank(node.inputs[0], depth)
        if op == "Transpose" and len(node.inputs) == 1:
            perm = node.attributes.get_ints("perm")
            return len(perm) if perm is not None else self._input_rank(node.inputs[0], depth)
        if op in _BROADCASTING and len(node.inputs) == 2:
            ranks = [self._input_rank(v, depth) for v in node.inputs]
            return None if None in ranks else max(ranks)
        if op == "MatMul" and len(node.inputs) == 2:
            ranks = [self._input_rank(v, depth) for v in node.inputs]
            if None in ranks or min(ranks) < 1:
                return None
            # numpy's matmul: the batch dims broadcast; a 1-D operand loses its one dim
            return 0 if ranks == [1, 1] else max(ranks) - (1 if min(ranks) == 1 else 0)
        return None

    def _warm_ranks(self) -> None:
        """Rank every main-graph node output by ``_rank_by_definition`` in graph order, each
        from its inputs' ranks found before it (fed graph inputs: their declared rank;
        constants: their array's), into the memo: without ``MAX_RANK_DEPTH``'s bound on a
        chain of nodes, without keying a value or asking shape inference. Only while this
        model's graph is the one keyed (not frozen)."""
        self._ranks_warmed = True
        memo = self._rank_memo
        for value in self.model.graph.inputs:
            if value.name in self.fed and value.shape is not None and id(value) not in memo:
                memo[id(value)] = (value, value.shape.rank())
        self._warming = True
        try:
            for node in self.model.graph:
                for value in node.outputs:
                    if id(value) not in memo:
                        rank = self._rank_by_definition(node, value, 0)
                        if rank is not None:
                            memo[id(value)] = (value, rank)  # the value keeps its id unique
        finally:
            self._warming = False

    def _input_rank(self, value: ir.Value, depth: int) -> int | None:
        array = self._array(value)
        return array.ndim if array is not None else self.rank(value, depth + 1)

    def held_keys(self) -> set[int]:
        """The keys of this model's keyed values."""
        if self._held is None or self._held[0] != len(self._keys):
            self._held = (len(self._keys), set(self._keys.values()))
        return self._held[1]

    def ranks_by_key(self) -> dict[int, int]:
        """The inferred ranks of this model's keyed values, by key."""
        if self._ranks_by_key is None or self._ranks_by_key[0] != len(self._keys):
            ranks = self._rank_map()
            names = self._frozen_names or {i: value.name for i, value in self._values.items()}
            self._ranks_by_key = (len(self._keys), {key: ranks[names[i]] for i, key in self._keys.items()
                                                    if names[i] in ranks})
        return self._ranks_by_key[1]

    def freeze(self) -> None:
        """Keep what later questions of the other model read (``held_keys``,
        ``ranks_by_key``) independent of this model's graph, which may change from now on
        (into the candidate itself, the same object): the keyed values' names as they are
        now, and the ranks inferred so far, else the handed-over parse of the unchanged model
        to infer them from when asked (without one, they are inferred now). The numbering
        forgets the model's serialization, parse and inference, so that a candidate of the
        same identity gets its own. No value is keyed after."""
        self._frozen_names = {i: value.name for i, value in self._values.items()}
        if self._ranks is None:
            given = self.numbering.given.get(id(self.model))
            if given is None:  # no parse of the unchanged model to infer from later: now
                self._rank_map()
            else:
                self._frozen_parse = given
        self.numbering.forget(self.model)

    def _rank_map(self) -> dict[str, int]:
        if self._ranks is None:
            if self._frozen_parse is not None:  # frozen: from the parse of the model as it was
                parse, self._frozen_parse = self._frozen_parse, None
                self._ranks = self.numbering.parse_ranks(parse() if callable(parse) else parse, self.input_shapes)
            else:
                self._ranks = self.numbering.ranks(self.model, self.input_shapes)
        return self._ranks

    def _array(self, value: ir.Value | None, *, shared: bool = False) -> np.ndarray | None:
        """A constant's array (initializer, Constant node or evaluated fold), else None
        (``shared``: as ``_Numbering.numpy``)."""
        if value is None or value.name in self.fed:
            return None
        if id(value) in self._arrays:
            return self._arrays[id(value)]
        tensor = self._constant(value)
        return None if tensor is None else self.numbering.numpy(tensor, shared=shared)

    def _compute(self, value: ir.Value) -> int:
        numbering = self.numbering
        node = value.producer()
        if node is None and value.name in self.fed:
            return numbering.intern(("input", value.name))
        tensor = self._constant(value)
        if tensor is not None:
            return numbering.tensor(tensor)
        if node is None:  # an outer-scope or dangling reference
            return numbering.unique()
        domain = node.domain
        if domain == "ai.onnx":
            domain = ""
        version = self.opsets.get(domain)
        if domain not in KNOWN_DOMAINS or version is None or self._opaque(node):
            return numbering.unique()
        op = node.op_type
        if domain == "" and op == "Identity":
            return self._passed(value, node.inputs[0])
        if domain == "" and op == "Dropout":
            return self._dropout(node, value, version)
        if domain == "" and op == "Cast" and len(node.inputs) == 1 and node.inputs[0] is not None \
                and set(node.attributes.data) <= {"to", "saturate"}:
            self.numbering.would_infer = True
            to = node.attributes.get_int("to")
            if to is not None and to == self.inferred_type(node.inputs[0]):
                return self._passed(value, node.inputs[0])  # a Cast to the type it has copies it
        if domain == "" and op in ("Add", "Sub", "Mul", "Div") and len(node.inputs) == 2 and not node.attributes.data:
            kept = self._neutral_operand(node, op)
            if kept is not None:
                return self._passed(value, kept)  # x op (its identity element) returns x
        if domain == "" and op == "ConstantOfShape" and len(node.inputs) == 1 and self._constant(value) is None:
            filled = self._filled_read(node)
            if filled is not None:
                self._arrays[id(value)] = filled
                return numbering.array(filled)
        attributes = self._attributes(node)
        if attributes is None:
            return numbering.unique()
        if domain == "" and (op in oir.LAYOUT_FREE_UNARY or op in oir.LAYOUT_FREE_BINARY or op in ("Clip", "Pad")):
            sunk = self._sunk(node, value, op, version)
            if sunk is not None:
                return sunk
        if domain == "" and op == "Conv" and self.opsets.get("", 0) >= 11:
            padded = self._padded_conv(node, self.opsets.get("", 0))
            if padded is not None:
                return padded
        if domain == "" and op in _COERCED_OPS:
            coerced = self._coerced(node, op, version)
            if coerced is not None:
                return coerced
        if domain == "" and op == "Reshape" and len(node.inputs) == 2:
            converted = self._converted_coerced(node, version)
            if converted is not None:
                return converted
            target = self._shape_elements(node.inputs[1])
            if target is not None and not target[0]:
                copy = dict(attributes).get("allowzero", ("INT", 0))[1] == 0
                x = self.key(node.inputs[0])
                canonical = tuple(("dim", x, i) if copy and e == 0 else e for i, e in enumerate(target[1]))
                if copy and 0 in target[1] and self.numbering.inferred:  # the dims copied, where static
                    rank = self.rank(node.inputs[0])
                    dims = [None] * len(canonical) if rank is None else self.inferred_dims(node.inputs[0], rank)
                    canonical = tuple(dims[i] if e == ("dim", x, i) and i < len(dims) and dims[i] is not None else e
                                      for i, e in enumerate(canonical))
                inner = self._reshapes.get(x)
                if inner is not None:
                    # Reshape(Reshape(x0, s1), s2): x0's elements in s2's shape, s2's dims of the
                    # middle value read from s1 (where a -1 or literal 0 there is not read: as it is)
                    composed = []
                    for e in canonical:
                        if isinstance(e, tuple) and e[0] == "dim" and e[1] == x:
                            f = inner[1][e[2]] if e[2] < len(inner[1]) else None
                            if not (isinstance(f, int) and f > 0 or isinstance(f, tuple) and f[0] == "dim"):
                                break
                            e = f
                        composed.append(e)
                    else:
                        self._assume(node, inner[2])  # the first Reshape runs
                        x, canonical = inner[0], tuple(composed)
                fact = ("Reshape", x, canonical, copy)
                self._fact(node, fact)
                if len(canonical) == 1:
                    return self._flattened(node, value, x, canonical)
                read = [i for i, e in enumerate(canonical) if not isinstance(e, int)]
                if len(read) == 1 and all(isinstance(e, int) and e > 0 for e in canonical if not isinstance(e, tuple)):
                    # one dim read from a shape, the others positive: where the Reshape runs that
                    # dim is the element count over theirs, as -1 infers it
                    if not self._runs_always(node, x, canonical, read[0]):
                        self._assume(node, ("Reshape", x, canonical, copy))
                    canonical = tuple(-1 if i == read[0] else e for i, e in enumerate(canonical))
                if not any(_mentions(e, x) for e in canonical):
                    x = self._order_source(node, x)
                if 0 not in canonical:
                    copy = True  # allowzero only tells what a 0 means
                key = numbering.intern(("reshape", x, canonical, copy))
                self._ordered[key] = (x, fact, (canonical, copy) if all(isinstance(e, int) for e in canonical) else None)
                if -1 not in canonical:
                    self._reshapes[key] = (x, canonical, fact)
                return key
        if domain == "" and op in _VIEW_OPS:
            viewed = self._view(node, op, version)
            if viewed is not None:
                layout = self._layout_of(node.inputs[0]) if len(node.outputs) == 1 else None
                if layout is not None and viewed == self.key(layout[1]):
                    self._aliases[id(value)] = (value, layout[1])  # the pair undone: its source
                return viewed
        if domain == "" and op == "Slice":
            sliced = self._slice(node, version)
            if sliced is not None:
                return sliced
        keys = self._keys
        inputs = tuple(keys[id(v)] if v is not None and id(v) in keys else self.key(v) for v in node.inputs)
        if domain == "" and op in _INITIAL_STATES and len(inputs) > 5:
            inputs = self._without_zero_states(node, inputs, _INITIAL_STATES[op])
        absent = numbering.intern(("absent",))
        while inputs and inputs[-1] == absent:  # an optional input given empty at the end is one not given
            inputs = inputs[:-1]
        semantics = self._semantics(node, domain, op, version)
        if domain == "" and op == "Shape" and inputs:
            # an elementwise unary op keeps its input's shape
            source = node.inputs[0].producer() if node.inputs[0] is not None else None
            while source is not None and source.domain in ("", "ai.onnx") and source.op_type in _SHAPE_KEEPING \
                    and len(source.inputs) == 1 and source.inputs[0] is not None and len(source.outputs) == 1:
                inputs = (self.key(source.inputs[0]),)
                source = source.inputs[0].producer()
        if domain == "" and op == "Where" and len(inputs) == 3:
            # Where(Not(c), a, b) selects as Where(c, b, a)
            condition = node.inputs[0].producer() if node.inputs[0] is not None else None
            if condition is not None and condition.domain in ("", "ai.onnx") and condition.op_type == "Not" \
                    and len(condition.inputs) == 1 and condition.inputs[0] is not None:
                inputs = (self.key(condition.inputs[0]), inputs[2], inputs[1])
        if domain == "" and op == "Concat" and len(inputs) == len(node.inputs) > 1 \
                and any(self._empty(v, None, 0) for v in node.inputs):
            # a piece of no elements along the Concat's axis adds none: where the Concat runs, it
            # is that of the others (a piece empty along another axis still adds its length);
            # read only where some piece is empty along some axis (no rank needed otherwise)
            axis = node.attributes.get_int("axis", 0)
            rank = next((r for r in (self.rank(v) for v in node.inputs if v is not None) if r is not None), None)
            along = axis if axis < 0 else (axis - rank if rank is not None else None)
            kept = inputs if along is None else \
                tuple(key for key, v in zip(inputs, node.inputs) if not self._empty(v, along, 0))
            if kept and len(kept) < len(inputs):
                fact = ("Concat", semantics, attributes, inputs)
                self._fact(node, fact)
                self._assume(node, fact)
                if len(kept) == 1:
                    return kept[0]  # a Concat of one input copies it
                inputs = kept
        if domain == "" and op == "Concat":
            # Concat(.., Concat(a, b), ..) on one axis: the elements of Concat(.., a, b, ..)
            spliced: list[int] = []
            for key in inputs:
                inner = self._concats.get(key)
                spliced.extend(inner[1] if inner is not None and inner[0] == (semantics, attributes) else (key,))
            inputs = tuple(spliced)
        structural = numbering.intern(("node", domain, op, semantics, attributes, inputs, value.index()))
        if domain == "" and op == "Concat":
            self._concats[structural] = ((semantics, attributes), inputs)
        if domain == "" and op == "Reshape" and len(inputs) == 2 and structural not in self._ordered:
            # a target not read: the elements are still its input's in order, where it runs
            fact = ("Reshape", inputs[0], inputs[1], attributes)
            self._fact(node, fact)
            self._ordered[structural] = (inputs[0], fact, None)
        if domain == "" and op in ("Squeeze", "Unsqueeze"):
            axes = self._axes(node, version)
            if axes is not None:
                self._views[structural] = (inputs[0], axes, op)
                self._fact(node, (op, inputs[0], axes))
        if domain == "" and op in _AFFINE_OPS:
            # the same node over the same inputs has the same form: built once for both models
            known = numbering.forms.get(structural)
            form = known[1] if known else _affine_form(self, node, value, attributes)
            if form is not None:
                self._forms[id(value)] = form
                key = known[0] if known else numbering.affine(form)
                numbering.forms[structural] = (key, form)
                return key
        return structural

    def _coerced(self, node: ir.Node, op: str, version: int) -> int | None:
        """The key of a Softmax or LogSoftmax before opset 13 (the input coerced to 2-D at
        ``axis``, default 1, normalized along the second of those dims) with an axis that is
        not negative: ``("coerced", op, axis, key of x)``; None for another."""
        if len(node.inputs) != 1 or node.inputs[0] is None or set(node.attributes.data) - {"axis"} \
                or self._schema("", op, version) not in (1, 11):
            return None
        axis = node.attributes.get_int("axis", 1)
        return self.numbering.intern(("coerced", op, axis, self.key(node.inputs[0]))) if axis >= 0 else None

    def _converted_coerced(self, node: ir.Node, version: int) -> int | None:
        """``Reshape(Softmax(Flatten(x, a), axis=-1), shape of x)`` from opset 13 on (onnx's
        version converter writes it, the shape as ``Shape(x)``, for a Softmax or LogSoftmax
        of an older opset) keyed as that older node (``_coerced``): Flatten coerces x to 2-D
        at ``a`` as the older node does, the newer one normalizes along the last of those
        dims, and the Reshape gives x's shape back. Only where onnx's shape inference gives
        every dim of x as a positive integer (the second look, ``_Numbering.inferred``): a 0
        in the target would copy a dim of the 2-D value instead. The target's elements are
        read as ``_shape_elements`` reads them: each dim ``i`` of x, or that dim's integer."""
        if node.attributes.get_int("allowzero", 0) != 0 or node.inputs[0] is None:
            return None
        softmax = node.inputs[0].producer()
        if softmax is None or softmax.op_type not in _COERCED_OPS or softmax.domain not in ("", "ai.onnx") \
                or len(softmax.inputs) != 1 or softmax.inputs[0] is None \
                or set(softmax.attributes.data) - {"axis"} or softmax.attributes.get_int("axis", -1) not in (-1, 1) \
                or (self._schema("", softmax.op_type, version) or 0) < 13:
            return None
        flatten = softmax.inputs[0].producer()
        if flatten is None or flatten.op_type != "Flatten" or flatten.domain not in ("", "ai.onnx") \
                or set(flatten.attributes.data) - {"axis"} or len(flatten.inputs) != 1 or flatten.inputs[0] is None:
            return None
        x, axis = flatten.inputs[0], flatten.attributes.get_int("axis", 1)
        target = self._shape_elements(node.inputs[1])
        if axis < 0 or target is None or target[0]:
            return None
        self.numbering.would_infer = True
        rank = self.rank(x) if self.numbering.inferred else None
        if rank is None or axis > rank or len(target[1]) != rank:
            return None
        dims, key = self.inferred_dims(x, rank), self.key(x)
        if not all(isinstance(d, int) and d > 0 and e in (d, ("dim", key, i))
                   for i, (d, e) in enumerate(zip(dims, target[1]))):
            return None
        return self.numbering.intern(("coerced", softmax.op_type, axis, key))

    def _schema(self, domain: str, op: str, version: int) -> int | None:
        """``op_versions.schema_version``, looked up once per proof."""
        known = self.numbering.schemas
        since = known.get((domain, op, version), _UNKNOWN)
        if since is _UNKNOWN:
            since = known[(domain, op, version)] = schema_version(domain, op, version)
        return since  # type: ignore[return-value]

    def _semantics(self, node: ir.Node, domain: str, op: str, version: int) -> tuple[str, int]:
        """The definition ``node`` computes (``op_versions.definition``, looked up once per
        operator and opset): its schema, or the oldest of the versions that compute its
        function (``SAME_FUNCTION``)."""
        known = self.numbering.definitions.get((domain, op, version))
        if known is None:
            known = self.numbering.definitions[(domain, op, version)] = definition(domain, op, version)
        key, condition, same = known
        if condition is None:
            return key
        return same if condition({name: attr.value for name, attr in node.attributes.data.items()}) else key

    def _empty(self, value: ir.Value | None, axis: int | None, depth: int) -> bool:
        """Whether ``value`` has no elements along ``axis`` (negative: counted from the last
        dim; None: along some dim) wherever it is computed: a constant whose dim there is 0, a
        ConstantOfShape whose shape holds a 0 there (read by ``_shape_elements``: the other
        dims may be dynamic), or an elementwise op of such a value (one input, or two that
        broadcast: dims align from the right, and a 0 broadcasts to 0). Only the ops'
        definitions are read, so a dynamic dim never makes a value empty. Empty along an
        axis, it is empty along some dim: None answers True wherever an axis does."""
        if value is None or depth > _ZERO_DEPTH:
            return False
        array = self._array(value)
        if array is not None:
            return 0 in array.shape if axis is None else -array.ndim <= axis and array.shape[axis] == 0
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1 or value.name in self.fed:
            return False
        if node.op_type == "ConstantOfShape" and len(node.inputs) == 1:
            shape = self._shape_elements(node.inputs[0])
            if shape is None or shape[0]:
                return False
            return any(d == 0 for d in shape[1]) if axis is None else -len(shape[1]) <= axis and shape[1][axis] == 0
        if node.op_type in _SHAPE_KEEPING and len(node.inputs) == 1 \
                or node.op_type in _BROADCASTING and len(node.inputs) == 2:
            return any(self._empty(v, axis, depth + 1) for v in node.inputs)
        return False

    def _flattened(self, node: ir.Node, value: ir.Value, x: int, target: tuple) -> int:
        """The key of ``Reshape(x, [e])``: wherever it succeeds (``e`` is x's element count,
        or -1) it is x's elements in order, as ``Reshape(x, [-1])``; for a constant x of at
        most ``SMALL_TENSOR_ELEMENTS`` elements, the key of those elements in one dim (and
        that array). Unless ``e`` is -1, or x's constant element count, this assumes the
        Reshape succeeds (``_assumed``)."""
        fact = ("Reshape", x, target)
        self._fact(node, fact)
        array = self._array(node.inputs[0])
        if target[0] != -1 and not (array is not None and target[0] == array.size):
            self._assume(node, fact)
        if array is not None and array.size <= SMALL_TENSOR_ELEMENTS and _PLAIN_ARRAYS.get(array.dtype) is not None:
            flat = self._arrays[id(value)] = array.reshape(-1)
            return self.numbering.array(flat)
        if self.rank(node.inputs[0]) == 1:
            return self.key(node.inputs[0])  # a vector in one dim is that vector, element for element
        return self.numbering.intern(("reshape", x, (-1,), True))

    def _runs_always(self, node: ir.Node, x: int, canonical: tuple, at: int) -> bool:
        """Whether ``Reshape(x, canonical)`` (``node``'s, x its own input) runs wherever x
        exists: the entry at ``at`` is x's dim ``j`` and onnx's shape inference gives x's other
        dims as integers whose product is that of the other entries (x's element count is then
        dim ``j`` times it, what the target asks)."""
        entry = canonical[at]
        value = node.inputs[0]
        if value is None or self.key(value) != x or not (isinstance(entry, tuple) and entry[0] == "dim"
                                                          and entry[1] == x):
            return False
        self.numbering.would_infer = True
        if not self.numbering.inferred:
            return False
        rank = self.rank(value)
        if rank is None or not 0 <= entry[2] < rank:
            return False
        dims = self.inferred_dims(value, rank)
        others = [d for i, d in enumerate(dims) if i != entry[2]]
        return None not in others and math.prod(others) == math.prod(e for i, e in enumerate(canonical) if i != at)

    def inferred_dims(self, value: ir.Value, rank: int) -> list[int | None]:
        """``value``'s dims, each an int where onnx's shape inference on this model gives it
        statically (only with ``_Numbering.inferred``), else None."""
        if not self.numbering.inferred:
            return [None] * rank
        found = self.numbering.types(self.model, self.input_shapes).get(value.name)
        dims = None if found is None else found[1]
        dims = [None] * rank if dims is None or len(dims) != rank else \
            [d if isinstance(d, int) and d >= 0 else None for d in dims]
        node = value.producer()
        if None in dims and node is not None and node.op_type == "Reshape" and node.domain in ("", "ai.onnx") \
                and len(node.inputs) == 2 and node.inputs[0] is not None:
            # a Reshape's output has its target's dims where it runs (a 0 without allowzero: its input's)
            target = self._shape_elements(node.inputs[1])
            if target is not None and not target[0] and len(target[1]) == rank:
                copy = node.attributes.get_int("allowzero", 0) == 0
                for i, e in enumerate(target[1]):
                    if dims[i] is None and isinstance(e, int) and (e > 0 or e == 0 and not copy):
                        dims[i] = e
        return dims

    def inferred_type(self, value: ir.Value) -> int | None:
        """``value``'s element type from onnx's shape inference on this model (only with
        ``_Numbering.inferred``), else None."""
        if not self.numbering.inferred:
            return None
        found = self.numbering.types(self.model, self.input_shapes).get(value.name)
        return found[0] if found is not None and found[0] else None

    def _without_zero_states(self, node: ir.Node, inputs: tuple, states: tuple[int, ...]) -> tuple:
        """A recurrent node's input keys with each initial state (``states``: its input
        positions) that is a constant of zero bits keyed as absent (the spec's default state
        is zero), and absent inputs at the end left out (an optional input not given), where
        the recurrence weight ``R`` (and an LSTM's peepholes ``P``) are finite constants
        (an infinite weight times the zero state is NaN, not the absent state's zero).
        A state of the wrong shape would fail the node: dropping one assumes it has the
        shape the node needs, which the original's node of the same input and state
        shape establishes (``_assumed``)."""
        absent = self.numbering.intern(("absent",))
        keys, dropped = list(inputs), []
        weights = [self._array(node.inputs[2])] + \
            ([self._array(node.inputs[7])] if len(node.inputs) > 7 and node.inputs[7] is not None else [])
        if any(w is None or w.dtype.kind != "f" or not np.isfinite(w).all() for w in weights):
            return inputs  # the recurrence (and peephole) weights times a zero state: zero only where finite
        for i in states:
            if i >= len(keys) or node.inputs[i] is None:
                continue
            array = self._array(node.inputs[i])
            if array is None:
                dtype = self._zero_fill(node.inputs[i])
                if dtype is not None:  # a shape read at run time: the state's key stands for it
                    dropped.append((i, ("key", inputs[i]), dtype))
                    keys[i] = absent
                continue
            if array.size == 0 or array.dtype.kind != "f":
                continue
            element = array if any(array.strides) else array.reshape(-1)[:1]  # a fill: its one element
            if np.frombuffer(np.ascontiguousarray(element).tobytes(), np.uint8).any():
                continue
            dropped.append((i, tuple(array.shape), str(array.dtype)))
            keys[i] = absent
        if dropped:
            fact = ("state", inputs[0], tuple(dropped))
            self._fact(node, fact)
            self._assume(node, fact)
        while keys and keys[-1] == absent:
            keys.pop()
        return tuple(keys)

    def _zero_fill(self, value: ir.Value, depth: int = 0) -> str | None:
        """The float element type of ``value`` where every element of it has zero bits
        whatever its shape: a default-domain ConstantOfShape whose value is absent (float32
        0) or one float element of zero bits, or an op whose every output element is one
        of its first input's (``_ZERO_KEEPING``) of such a value, followed back at most
        ``_ZERO_DEPTH`` producers; else None."""
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None \
                or depth > _ZERO_DEPTH or value.name in self.fed:
            return None
        if node.op_type in _ZERO_KEEPING:
            return self._zero_fill(node.inputs[0], depth + 1)
        if node.op_type != "ConstantOfShape" or len(node.inputs) != 1:
            return None
        fill = node.attributes.get("value")
        if fill is None:
            return str(np.dtype(np.float32))
        if fill.type != ir.AttributeType.TENSOR:
            return None
        element = self.numbering.numpy(fill.value, shared=True).reshape(-1)
        if element.size != 1 or element.dtype.kind != "f" or np.frombuffer(element.tobytes(), np.uint8).any():
            return None
        return str(element.dtype)

    def _order_source(self, node: ir.Node, x: int) -> int:
        """The key of the value that the Reshape, Squeeze and Unsqueeze nodes ``x`` is
        computed through (none of them a Transpose) read: a Reshape whose target reads no dim
        of its input keeps only its input's elements in order, which those views keep from
        their own input. The views' success is assumed (``_assumed``) for ``_compared`` to
        discharge."""
        while True:
            step = self._ordered.get(x)
            if step is None:
                view = self._views.get(x)
                if view is None or view[2] == "Transpose":
                    return x
                step = (view[0], (view[2], view[0], view[1]))
            self._assume(node, step[1])
            x = step[0]

    def _view(self, node: ir.Node, op: str, version: int) -> int | None:
        """The key of a default-domain Transpose, or of a Squeeze or Unsqueeze that undoes
        the other, where it has a canonical one (module docstring), else None (then the node
        is keyed by its structure; a Squeeze or Unsqueeze is recorded as a view). A Transpose
        with an explicit permutation is ``("transpose", key of x, perm)``, a Transpose of a Transpose over their composed
        permutation; the identity, the key of x, assuming x has that rank. An ``Unsqueeze``
        of ``Squeeze(x, a)`` at the same axes ``a`` (the same integers, so normalized against
        the same rank) is keyed as x, assuming x's dims at ``a`` are 1; a ``Squeeze`` of
        ``Unsqueeze(x, a)`` at ``a``, assuming that Unsqueeze is valid for x. Each
        assumption is recorded (``_assumed``) for ``_compared`` to discharge."""
        x = node.inputs[0] if len(node.inputs) >= 1 else None
        if x is None:
            return None
        if op == "Transpose":
            if len(node.inputs) != 1 or any(name != "perm" for name in node.attributes.data):
                return None
            perm = node.attributes.get_ints("perm")
            if perm is None:  # the reversal of a rank not read here
                return None
            perm = tuple(int(p) for p in perm)
            if sorted(perm) != list(range(len(perm))):
                return None
            base = self.key(x)
            self._fact(node, ("rank", base, len(perm)))
            inner = self._views.get(base)
            if inner is not None and inner[2] == "Transpose" and len(inner[1]) == len(perm):
                base, first = inner[0], inner[1]
                perm = tuple(first[i] for i in perm)  # output dim i is x's dim first[perm[i]]
            if perm == tuple(range(len(perm))):
                self._assume(node, ("rank", base, len(perm)))
                return base
            key = self.numbering.intern(("transpose", base, perm))
            self._views[key] = (base, perm, "Transpose")
            return key
        axes = self._axes(node, version)
        if axes is not None:
            reshaped = self._reshaped_view(node, op, axes)
            if reshaped is not None:
                return reshaped
        inner = self._views.get(self.key(x)) if axes is not None else None
        if inner is not None and inner[1] == axes and inner[2] != op and inner[2] != "Transpose":
            # Unsqueeze(Squeeze(x, a), a): Squeeze succeeds only where x's dims at a are 1;
            # Squeeze(Unsqueeze(x, a), a): where that Unsqueeze is valid for x's rank
            self._assume(node, (inner[2], inner[0], axes))
            return inner[0]
        if op == "Unsqueeze" and axes is not None and axes[0] >= 0:
            return self._unsqueezed(node, axes, inner)
        return None

    def _layout_of(self, value: ir.Value) -> tuple[ir.Node, ir.Value, int, oir.AxisMap] | None:
        """``value`` as the output of a layout op: (the node, its input, the input's rank, the
        node's axis map); the value's own producer where that is a default-domain Transpose
        with an explicit permutation or a Squeeze or Unsqueeze with explicit axes, else what
        ``_sunk`` recorded for it; None otherwise."""
        value = self._unaliased(value)
        recorded = self._layouts.get(id(value))
        if recorded is not None and recorded[0] is value:
            node, source, rank = recorded[1:]
        else:
            node = value.producer()
            if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in _VIEW_OPS \
                    or len(node.outputs) != 1 or not node.inputs or node.inputs[0] is None:
                return None
            source = node.inputs[0]
            rank = self.rank(source)
            if rank is None:
                return None
        if node.op_type == "Transpose":
            perm = node.attributes.get_ints("perm")
            if len(node.inputs) != 1 or set(node.attributes.data) != {"perm"} or perm is None \
                    or sorted(perm) != list(range(rank)):
                return None
            return node, source, rank, [int(p) for p in perm]
        version = self.opsets.get("", 0)
        axes = self._axes(node, version)
        step = None if axes is None else oir.squeeze_map(node.op_type, axes, rank)
        return None if step is None else (node, source, rank, step)

    def _unaliased(self, value: ir.Value) -> ir.Value:
        """The value a chain of undone layout pairs and values passed through
        (``_aliases``) ending at ``value`` starts from."""
        while id(value) in self._aliases and self._aliases[id(value)][0] is value:
            value = self._aliases[id(value)][1]
        return value

    def _sunk(self, node: ir.Node, value: ir.Value, op: str, version: int) -> int | None:
        """The key of an op that commutes with a layout change (``oir.LAYOUT_FREE_UNARY``;
        Clip with constant one-element bounds; ``oir.LAYOUT_FREE_BINARY`` with one constant
        operand; a constant-mode Pad with constant pads, opset 11 on) whose other input is a
        layout op's output ``L(y)``: the key of ``L(f'(y))``, ``f'`` being the op with its
        constant operand or pads carried back to ``y``'s layout (``oir.carried_back``,
        ``oir.carried_pads``: what sink-layout-ops writes), built as nodes outside the model
        (``f'`` keyed through ``y``'s own layout op in turn); None otherwise.

        Exact wherever the model runs: a layout op moves elements without changing them, and
        the carried constant pairs each element of ``y`` with the constant element it met
        after the move (its dims on the axes the move inserts are 1). ``f'(y)`` has ``y``'s
        rank (the carried constant has at most ``y``'s) and ``y``'s dims on the axes ``L``
        removes (the carried constant has 1 there, and no pads), so ``L`` runs on ``f'(y)``
        wherever it runs on ``y``: what the built nodes establish (``_facts``) and assume
        (``_assumed``) is recorded on ``node``, where the model's own ``L``, computed
        before it, ran."""
        if len(node.outputs) != 1 or value.index() != 0 or version < 7:
            return None
        inputs = list(node.inputs)
        if op in oir.LAYOUT_FREE_UNARY:
            index = 0 if len(inputs) == 1 else None
        elif op == "Clip":
            bounds = [self._operand(v) for v in inputs[1:] if v is not None]
            index = 0 if all(b is not None and b.size == 1 for b in bounds) else None
        elif op == "Pad":
            index = 0 if node.attributes.get_string("mode", "constant") == "constant" and version >= 11 \
                and set(node.attributes.data) <= {"mode"} and 2 <= len(inputs) <= 4 else None
        else:  # binary: exactly one constant operand (PRelu's the slope), no legacy broadcast
            constant = [v is not None and self._operand(v) is not None for v in inputs]
            index = constant.index(False) if len(inputs) == 2 and constant.count(True) == 1 \
                and not node.attributes.data else None
            if op == "PRelu" and index != 0 or not oir.broadcasts(op, version):
                index = None
        if index is None or inputs[index] is None:
            return None
        layout = self._layout_of(inputs[index])
        if layout is None:
            return None
        layout_node, source, rank, src = layout
        moved = list(inputs)
        if op == "Pad":
            pads = self._operand(inputs[1]) if inputs[1] is not None else None
            axes = self._operand(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
            if pads is None or pads.dtype != np.int64 or len(inputs) > 3 and inputs[3] is not None and axes is None:
                return None
            full = oir.full_pads([int(p) for p in pads.reshape(-1)],
                                 None if axes is None else [int(a) for a in axes.reshape(-1)], len(src))
            carried = None if full is None else oir.carried_pads(full, src, rank)
            if carried is None:
                return None
            moved = moved[:3]
            moved[1] = self._shadow_constant(inputs[1], pads, carried)
        elif op in oir.LAYOUT_FREE_BINARY:
            other = 1 - index
            array = self._operand(inputs[other])
            carried = oir.carried_back(array, src, rank)
            if carried is None:
                return None
            moved[other] = self._shadow_constant(inputs[other], array, carried)
        moved[index] = source
        start = len(self._shadows)
        inner = self._shadow(node, moved)
        outer = self._shadow(layout_node, [inner, *layout_node.inputs[1:]])
        self._layouts[id(value)] = (value, layout_node, inner, rank)
        return self._keyed_for(value, outer, start)

    def _operand(self, value: ir.Value | None) -> np.ndarray | None:
        """A constant's array, also through values passed through (``_aliases``)."""
        return None if value is None else self._array(self._unaliased(value))

    def _keyed_for(self, value: ir.Value, shadow: ir.Value, start: int) -> int:
        """The key of ``shadow``, the last of the nodes built from ``self._shadows[start]``
        on, which ``value`` equals wherever its producer runs: what those nodes establish
        and assume is recorded as that producer's, and ``value`` takes ``shadow``'s affine
        form."""
        key = self.key(shadow)
        node = value.producer()
        for built in self._shadows[start:]:
            for table in (self._facts, self._assumed):
                recorded = table.pop(id(built), None)
                if recorded is not None:
                    table.setdefault(id(node), (node, []))[1].extend(recorded[1])
        if id(shadow) in self._forms:
            self._forms[id(value)] = self._forms[id(shadow)]
        return key

    def _padded_conv(self, node: ir.Node, version: int) -> int | None:
        """The key of ``Conv(Pad(x, p), W, b?)``, the Pad in ``constant`` mode (opset 11 on)
        with constant pads (and axes) that are not negative and none on the batch and
        channel axes, and a value absent or a one-element constant of zero bits (+0.0): the
        key of ``Conv(x, W, b?)`` with ``p``'s spatial pads added to the Conv's own (the
        padding a Conv defines is of +0.0, on the spatial axes, before the kernel reads
        them: the same function, what fuse-pad writes); None otherwise, or where the
        Conv's ``auto_pad`` is other than NOTSET."""
        x = self._unaliased(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None
        pad = x.producer() if x is not None else None
        if pad is None or pad.domain not in ("", "ai.onnx") or pad.op_type != "Pad" or version < 11 \
                or set(pad.attributes.data) - {"mode"} or pad.attributes.get_string("mode", "constant") != "constant" \
                or not 2 <= len(pad.inputs) <= 4 or pad.inputs[0] is None or pad.inputs[1] is None \
                or set(node.attributes.data) - {"pads", "strides", "dilations", "group", "kernel_shape", "auto_pad"} \
                or node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
            return None
        pads = self._array(pad.inputs[1])
        value_given, axes_given = [*pad.inputs[2:], None, None][:2]
        fill = self._array(value_given) if value_given is not None else np.zeros(1, np.float32)
        axes = self._array(axes_given) if axes_given is not None else None
        if pads is None or fill is None or fill.size != 1 or any(fill.tobytes()) \
                or axes_given is not None and axes is None:
            return None
        rank = self.rank(pad.inputs[0])
        if rank is None or rank < 3:
            return None
        full = oir.full_pads([int(p) for p in pads.reshape(-1)],
                             None if axes is None else [int(a) for a in axes.reshape(-1)], rank)
        own = node.attributes.get_ints("pads", [0] * (2 * (rank - 2)))
        if full is None or min(full) < 0 or full[0] or full[1] or full[rank] or full[rank + 1] \
                or len(own) != 2 * (rank - 2):
            return None
        spatial = rank - 2
        merged = [int(own[i]) + full[2 + i] for i in range(spatial)] + \
            [int(own[spatial + i]) + full[rank + 2 + i] for i in range(spatial)]
        start = len(self._shadows)
        shadow = self._shadow(node, [pad.inputs[0], *node.inputs[1:]])
        shadow.producer().attributes["pads"] = ir.AttrInt64s("pads", merged)
        return self._keyed_for(node.outputs[0], shadow, start)

    def _shadow_constant(self, value: ir.Value, array: np.ndarray, carried: np.ndarray) -> ir.Value:
        """``value`` where ``carried`` is its array to the byte, else a new constant value
        holding ``carried`` (as sink-layout-ops keeps or replaces an operand)."""
        if oir.same_operand(array, carried):
            return value
        return ir.Value(const_value=ir.Tensor(np.ascontiguousarray(carried)))

    def _shadow(self, node: ir.Node, inputs: list[ir.Value | None]) -> ir.Value:
        """The output of a copy of ``node`` (its domain, op type and attributes) over
        ``inputs``, outside the model: the values of the model it reads are stood for by
        values of the same key, so that no value of the model gets a use."""
        stand_ins = [v if v is None or not _in_model(v) else self._stand_in(v) for v in inputs]
        shadow = ir.Node(node.domain, node.op_type, stand_ins, attributes=list(node.attributes.values()),
                         overload=node.overload, version=node.version, num_outputs=1)
        self._shadows.append(shadow)
        return shadow.outputs[0]

    def _stand_in(self, value: ir.Value) -> ir.Value:
        """A value outside the model keyed as ``value`` (with its constant, rank, affine form
        and evaluated array)."""
        key = self.key(value)
        tensor = self._constant(value) if self._is_constant(value) else None  # a fed input is none
        stand_in = ir.Value(type=value.type, const_value=tensor)
        self._set(stand_in, key)
        rank = self.rank(value)
        if rank is not None:
            self._rank_memo[id(stand_in)] = (stand_in, rank)
        self._constants[id(stand_in)] = (stand_in, tensor)
        for table in (self._forms, self._arrays):
            if id(value) in table:
                table[id(stand_in)] = table[id(value)]
        layout = self._layout_of(value)
        if layout is not None:
            self._layouts[id(stand_in)] = (stand_in, *layout[:3])
        return stand_in

    def _reshaped_view(self, node: ir.Node, op: str, axes: tuple[int, ...]) -> int | None:
        """The key of a Squeeze or Unsqueeze at ``axes`` of ``Reshape(x, t)``, ``t`` reading no
        dim of x: ``Reshape(x, t')``, ``t'`` being ``t`` with a 1 inserted at each axis of the
        Unsqueeze (normalized against its output's rank), or with the Squeeze's axes removed
        where ``t`` has a 1 there (either keeps x's elements in order); None otherwise, and
        for a ``t'`` of fewer than two dims (``_flattened`` keys a Reshape to one dim). The
        Reshape's success is assumed (``_assumed``)."""
        x = self.key(node.inputs[0])
        inner = self._ordered.get(x)
        if inner is None or inner[2] is None:
            return None
        source, fact, (target, copy) = inner
        rank = len(target) + len(axes) if op == "Unsqueeze" else len(target)
        at = {a + rank if a < 0 else a for a in axes}
        if len(at) != len(axes) or not all(0 <= a < rank for a in at):
            return None
        if op == "Unsqueeze":
            rest = iter(target)
            shape = tuple(1 if i in at else next(rest) for i in range(rank))
        elif all(target[a] == 1 for a in at):
            shape = tuple(e for i, e in enumerate(target) if i not in at)
        else:
            return None
        if len(shape) < 2:
            return None
        self._assume(node, fact)
        own = (op, x, axes)
        self._fact(node, own)
        copy = copy or 0 not in shape
        key = self.numbering.intern(("reshape", source, shape, copy))
        self._ordered[key] = (source, own, (shape, copy))
        if -1 not in shape:
            self._reshapes[key] = (source, shape, own)
        return key

    def _unsqueezed(self, node: ir.Node, axes: tuple[int, ...], inner: tuple | None) -> int:
        """The key of an Unsqueeze of x at axes ``b`` none of which is negative:
        ``("unsqueeze", key of x, b)``, recorded as a view; of ``Unsqueeze(x0, a)``, ``a``
        not negative either (``inner``: that view), the key of one Unsqueeze of x0 at ``c``:
        ``b`` and, per ``j`` in ``a``, the ``j``-th position not in ``b`` (the second
        Unsqueeze puts the first one's output dims, in order, on the positions outside
        ``b``; those positions do not depend on x0's rank). Exact wherever either runs: ``c``
        is valid for x0's rank r exactly where ``a`` is (below r + |a|) and ``b`` is (below
        r + |a| + |b|), as the positions outside ``b`` below r + |a| + |b| number r + |a|."""
        base = self.key(node.inputs[0])
        if inner is not None and inner[2] == "Unsqueeze" and inner[1][0] >= 0:
            taken = set(axes)
            outside = [p for p in range(max(inner[1]) + len(axes) + 1) if p not in taken]
            base, axes = inner[0], tuple(sorted(taken | {outside[j] for j in inner[1]}))
        key = self.numbering.intern(("unsqueeze", base, axes))
        self._views[key] = (base, axes, "Unsqueeze")
        self._fact(node, ("Unsqueeze", base, axes))
        return key

    def _slice(self, node: ir.Node, version: int) -> int | None:
        """The key of a Slice whose starts, ends, axes and steps are constant integers (inputs
        from opset 10, attributes before): ``("slice", key of x, ((axis, start, end, step),
        ...))`` sorted by axis, negative axes normalized against x's rank; a Slice of such a
        Slice on other axes is keyed as one Slice of the first one's input over both axes' entries
        (slicing one axis leaves every other dim as it was, and each axis is clamped against its
        own dim). None where an element is not a constant integer, an axis repeats, a step is
        0, or a negative axis meets an unknown rank (then the node is keyed by its structure)."""
        if version < 10:
            data = node.attributes.data
            if len(node.inputs) != 1 or not set(data) <= {"starts", "ends", "axes"} \
                    or not {"starts", "ends"} <= set(data) \
                    or any(a.type != ir.AttributeType.INTS for a in data.values()):
                return None
            parts = [[int(e) for e in data[n].value] if n in data else None for n in ("starts", "ends", "axes")]
            parts.append(None)
        else:
            if not 3 <= len(node.inputs) <= 5 or node.attributes.data:
                return None
            inputs = [*node.inputs[1:], None, None][:4]  # starts, ends, axes, steps (None: omitted)
            if inputs[0] is None or inputs[1] is None:
                return None
            arrays = [None if v is None else self._array(v) for v in inputs]
            given = [a for a in arrays if a is not None]
            if any(a.ndim != 1 for a in given) or len({a.dtype for a in given}) > 1 \
                    or any(a.dtype not in (np.int32, np.int64) for a in given):
                return None  # a constant that is not a list, or not one index type (Tind)
            parts = [None if v is None else [int(e) for e in a] if a is not None else self._integer_list(v)
                     for v, a in zip(inputs, arrays)]
            if any(part is None for v, part in zip(inputs, parts) if v is not None):
                return None  # an entry that is not an integer read here
        starts, ends, axes, steps = parts
        count = len(starts)
        axes = list(range(count)) if axes is None else axes
        steps = [1] * count if steps is None else steps
        if count == 0 or len(ends) != count or len(axes) != count or len(steps) != count or 0 in steps:
            return None
        x = node.inputs[0]
        if x is None:
            return None
        if any(a < 0 for a in axes):
            rank = self.rank(x)
            if rank is None:
                return None
            axes = [a + rank if a < 0 else a for a in axes]
        if any(a < 0 for a in axes) or len(set(axes)) != count:
            return None
        base = self.key(x)
        entries = dict(zip(axes, zip(starts, ends, steps)))
        inner = self._slices.get(base)
        if inner is not None and not set(inner[1]) & set(entries):
            base, entries = inner[0], {**inner[1], **entries}
        key = self.numbering.intern(("slice", base, tuple(sorted(entries.items()))))
        self._slices[key] = (base, entries)
        return key

    def _axes(self, node: ir.Node, version: int) -> tuple[int, ...] | None:
        """A Squeeze's or Unsqueeze's axes, sorted, when given explicitly (an attribute
        before opset 13, a constant int64 list from 13; negative ones from opset 11) and
        distinct as integers; else None."""
        if version < 13:
            attr = node.attributes.data.get("axes")
            if len(node.inputs) != 1 or len(node.attributes.data) != 1 or attr is None \
                    or attr.type != ir.AttributeType.INTS:
                return None
            axes = [int(a) for a in attr.value]
            if version < 11 and any(a < 0 for a in axes):
                return None
        else:
            if len(node.inputs) != 2 or node.inputs[1] is None or node.attributes.data:
                return None
            array = self._array(node.inputs[1])
            if array is None or array.dtype != np.int64 or array.ndim != 1:
                return None
            axes = [int(a) for a in array]
        if not axes or len(set(axes)) != len(axes):
            return None
        return tuple(sorted(axes))

    def facts(self) -> set[tuple]:
        """What this model's nodes that its outputs are computed from establish where the
        model runs (``_facts``): a Transpose's input has its permutation's rank; a Squeeze's
        input has dims 1 at its axes; an Unsqueeze's axes are valid for its input."""
        if not self._facts:
            return set()
        return {f for i in _ancestors(self.model.graph.outputs) if i in self._facts for f in self._facts[i][1]}

    def assumed(self, outputs: list[ir.Value]) -> set[tuple]:
        """What the keys of ``outputs`` assume (``_view``): facts of the nodes they are
        computed from."""
        if not self._assumed:
            return set()
        return {f for i in _ancestors(outputs) if i in self._assumed for f in self._assumed[i][1]}

    def _fact(self, node: ir.Node, fact: tuple) -> None:
        self._facts.setdefault(id(node), (node, []))[1].append(fact)

    def _assume(self, node: ir.Node, fact: tuple) -> None:
        self._assumed.setdefault(id(node), (node, []))[1].append(fact)

    def _attributes(self, node: ir.Node) -> tuple | None:
        """A node's attributes as a sorted tuple of (name, hashable value); None when one
        holds a graph or another kind never proved (once per node: every output reads it)."""
        known = self._node_attributes.get(id(node))
        if known is None or known[0] is not node:
            items = node.attributes.data  # the UserDict's own dict: its Mapping views are slow
            attributes = tuple(sorted((name, self._attribute(attr)) for name, attr in items.items())) if items else ()
            if any(a[1] is None for a in attributes):
                attributes = None
            known = self._node_attributes[id(node)] = (node, attributes)  # the node keeps its id unique
        return known[1]

    def _opaque(self, node: ir.Node) -> bool:
        if (node.domain, node.op_type, node.overload) in self.functions:
            return True
        return "Random" in node.op_type or "Dropout" in node.op_type and node.op_type != "Dropout" \
            or node.op_type in ("Multinomial", "Bernoulli")

    def _dropout(self, node: ir.Node, value: ir.Value, version: int) -> int:
        """Inference-mode Dropout passes its input through; its mask is unique."""
        if version < 7 or value.index() != 0:
            return self.numbering.unique()
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            mode = self._array(node.inputs[2])
            if mode is None or bool(np.any(mode)):
                return self.numbering.unique()
        return self._passed(value, node.inputs[0])

    def _neutral_operand(self, node: ir.Node, op: str) -> ir.Value | None:
        """The input ``x`` that ``node`` returns bit for bit (a signalling NaN quieted): the other operand a constant
        whose every element is the identity of ``op`` in x's (the constant's) element type
        (``x + 0`` for integers, ``x + (-0.0)``, ``x - 0``, ``x * 1``, ``x / 1``; the
        constant on either side of Add and Mul), of rank 0, or of dims all 1 within x's
        known rank (the broadcast keeps x's shape); else None."""
        pairs = [(node.inputs[0], node.inputs[1])]
        if op in ("Add", "Mul"):
            pairs.append((node.inputs[1], node.inputs[0]))
        for x, c in pairs:
            array = None if x is None or self._is_constant(x) else self._array(c)
            if array is None or array.dtype.kind not in "fiu" or array.size == 0:
                continue
            if op in ("Mul", "Div"):
                neutral = bool(np.all(array == 1))
            elif array.dtype.kind == "f":  # -0.0 + -0.0 is -0.0, -0.0 - -0.0 is +0.0
                neutral = bool(np.all(array == 0) and np.all(np.signbit(array) == (op == "Add")))
            else:
                neutral = bool(np.all(array == 0))
            if not neutral:
                continue
            if array.ndim == 0 or all(d == 1 for d in array.shape) and (self.rank(x) or 0) >= array.ndim:
                return x
        return None

    def _passed(self, value: ir.Value, source: ir.Value) -> int:
        """``source``'s key for ``value``, which passes it through, and its affine form too
        (so that a chain through an Identity keeps its normal form)."""
        key = self.key(source)
        form = self._forms.get(id(source))
        if form is not None:
            self._forms[id(value)] = form
        self._aliases[id(value)] = (value, source)  # a layout op's output passed on stays one
        return key

    def _attribute(self, attr: ir.Attr) -> Any:
        """A hashable form of an attribute's value; None when it holds a graph."""
        if attr.is_ref():
            return None
        if isinstance(attr, oir.PackedAttr) and attr.as_packed:  # its bytes: the same elements, the same bytes
            return ("packed", attr.serialized)
        kind = attr.type
        tag = _PLAIN_ATTRIBUTES.get(kind)
        if tag is not None:
            return (tag, attr.value) if kind in _SCALAR_ATTRIBUTES else (tag, tuple(attr.value))
        if kind == ir.AttributeType.TENSOR:
            return ("t", self.numbering.tensor(attr.value))
        if kind == ir.AttributeType.TENSORS:
            return ("ts", tuple(self.numbering.tensor(t) for t in attr.value))
        if kind == ir.AttributeType.FLOAT:
            return ("f", float(attr.value).hex())
        if kind == ir.AttributeType.FLOATS:
            return ("fs", tuple(float(v).hex() for v in attr.value))
        return None  # graphs, sparse tensors, type protos: never proved

    # ------------------------------------------------------------------ constants and folds

    def constant_keys(self) -> set[int]:
        return {self.key(v) for v in _top_values(self.model.graph) if self._is_constant(v)}

    def all_keys(self) -> set[int]:
        keys = {self.key(v) for v in self.model.graph.outputs}
        for node in self.model.graph:
            keys.update(self.key(v) for v in node.outputs)
        return keys

    def constant_frontier(self) -> list[ir.Value]:
        """Values computed from constants alone (deterministically) that another node or
        the graph's outputs read."""
        computed: set[int] = set()
        readers: list[ir.Node] = []
        graphs = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        is_constant = self._is_constant
        for node in self.model.graph:
            # inputs first: most nodes read a value computed from the graph's inputs
            for v in node.inputs:
                if v is not None and id(v) not in computed and not is_constant(v):
                    readers.append(node)
                    break
            else:
                if not self._opaque(node) and not any(a.type in graphs for a in node.attributes.data.values()):
                    computed.update(id(v) for v in node.outputs if v is not None)
                else:
                    readers.append(node)
        frontier: dict[int, ir.Value] = {}
        for value in [v for n in readers for v in n.inputs] + list(self.model.graph.outputs):
            if value is not None and id(value) in computed and not self._is_constant(value):
                frontier[id(value)] = value
        return list(frontier.values())

    def fold_by_definition(self, frontier: list[ir.Value]) -> list[int] | None:
        """Key each value of ``frontier`` (values computed from constants alone) by its bytes,
        computed by its operator's definition (``_defined``), in the graph's order, and record
        its structural key for either model (``_Numbering.folded``); their structural keys,
        or None (nothing recorded) when one is not so computed or is larger than
        ``SMALL_TENSOR_ELEMENTS`` elements without being a fill (``_small_defined``)."""
        if not frontier:
            return []
        if not all(self._may_fold_small(value) for value in frontier):  # before computing any
            return None
        order = {id(node): i for i, node in enumerate(self.model.graph)}
        arrays = []
        for value in sorted(frontier, key=lambda v: order[id(v.producer())]):
            array = self._small_defined(value)
            if array is None:
                return None
            arrays.append((value, array))
        folds = []
        for value, array in arrays:  # each keyed after the folds it reads
            structural = self.key(value)
            if id(value) in self._arrays:  # its structure is an earlier fold's: keyed by those bytes
                continue
            folded = self.numbering.array(array)
            self._arrays[id(value)] = array
            self._set(value, folded)
            self.numbering.folded[structural] = (folded, array)
            folds.append(structural)
        self._ranks_by_key = self._held = None  # keys changed
        return folds

    def may_fold_by_definition(self) -> bool:
        """False where ``fold_by_definition`` of the constant frontier would be None, read in
        one cheap pass: a node reading constants alone (initializers and Constant nodes'
        outputs) whose output ``_small_defined`` does not compute (an operator it does not
        define, a large ConstantOfShape) is, or is read on the way to, a fold it cannot key
        (or is read by nothing: False then only declines early numbering, which is never
        needed for a proof)."""
        for node in self.model.graph:
            if node.op_type == "Constant" or not node.inputs or not all(
                    v is None or (v.const_value is not None and v.name not in self.fed) or (v.producer() is not None
                                                               and v.producer().op_type == "Constant")
                    for v in node.inputs):
                continue
            if self._opaque(node) or not all(self._may_fold_small(v) for v in node.outputs if v is not None):
                return False
        return True

    def _may_fold_small(self, value: ir.Value) -> bool:
        """False where ``_small_defined(value)`` is None for certain, read without computing
        anything: an operator ``_defined`` does not compute, or a ConstantOfShape without a
        constant one-dimensional integer shape."""
        node = value.producer()
        if node is None or node.op_type not in _DEFINED_OPS:
            return False
        if node.op_type == "ConstantOfShape":
            shape = self._array(node.inputs[0], shared=True) if len(node.inputs) == 1 else None
            return shape is not None and shape.dtype.kind in "iu" and shape.ndim == 1
        return True

    def _small_defined(self, value: ir.Value) -> np.ndarray | None:
        """``_defined(value)`` when it has at most ``SMALL_TENSOR_ELEMENTS`` elements or
        repeats one element (a fill, ``_Numbering.fill``, or a view of one: no bytes to hold
        but that element's); else None."""
        array = self._defined(value)
        if array is None or array.size > SMALL_TENSOR_ELEMENTS and any(array.strides):
            return None
        return array

    def evaluate(self, values: list[ir.Value]) -> int:
        """Key ``values`` (computed from constants alone) by their bytes, computed by their
        operator's definition where it does no arithmetic (``_defined``), the rest evaluated on
        onnxruntime; returns how many were evaluated (0 when they cannot be, or are too big)."""
        filled = {id(v): a for v in values if (a := self._defined(v)) is not None}
        try:
            rest = [v for v in values if id(v) not in filled]
            computed = dict(zip(map(id, rest), self._evaluate(rest) if rest else []))
        except Exception:  # noqa: BLE001 - unevaluated folds stay unproved, and are checked on samples
            return 0
        arrays = [filled.get(id(v), computed.get(id(v))) for v in values]
        if sum(_held_bytes(a) for a in arrays) > MAX_FOLD_CHECK_BYTES:
            return 0
        for value, array in zip(values, arrays):
            self._arrays[id(value)] = array
            self._set(value, self.numbering.array(array))
        self._ranks_by_key = self._held = None  # keys changed
        return len(values)

    def _defined(self, value: ir.Value, depth: int = 0) -> np.ndarray | None:
        """A fold computed by its operator's definition where that copies or moves bits
        without arithmetic (so there is no kernel to ask), from constant inputs or inputs so
        computed (``MAX_DEFINED_DEPTH`` nodes up): a ConstantOfShape (its value's bits in
        every element); an Identity; an Unsqueeze, Squeeze, Reshape or Flatten (the input's
        elements in order, in the output shape the operator's spec gives, or None wherever
        the spec calls the node invalid); a Cast that converts every value exactly
        (``_exact_cast``). Else None (onnxruntime decides)."""
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1 or self._opaque(node) \
                or node.op_type not in _DEFINED_OPS:
            return None
        op, inputs, version = node.op_type, list(node.inputs), self.opsets.get("", 0)
        if op == "ConstantOfShape":
            return self._filled(node)
        if not inputs or inputs[0] is None or any(a.is_ref() for a in node.attributes.values()):
            return None

        def array(v: ir.Value) -> np.ndarray | None:
            known = self._array(v)
            if known is None and depth < MAX_DEFINED_DEPTH and not self._leaf(v):
                known = self._defined(v, depth + 1)
            return known

        data = array(inputs[0])
        if data is None:
            return None
        attrs = {name: attr.value for name, attr in node.attributes.data.items()}  # the UserDict's own dict: faster
        second = array(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else None
        if len(inputs) > 1 and (second is None or second.dtype != np.int64 or second.ndim != 1):
            return None  # a second input that is not a constant int64 list
        if op == "Identity":
            return data if len(inputs) == 1 else None
        if op == "Cast":
            return _exact_cast(data, attrs.get("to")) if len(inputs) == 1 and set(attrs) <= {"to", "saturate"} \
                else None
        if op == "Flatten":
            axis = attrs.get("axis", 1)
            if len(inputs) != 1 or set(attrs) - {"axis"} or (axis < 0 and version < 11):
                return None
            axis = axis + data.ndim if axis < 0 else axis
            if not 0 <= axis <= data.ndim:
                return None
            return data.reshape(math.prod(data.shape[:axis]), math.prod(data.shape[axis:]))
        if op in ("Unsqueeze", "Squeeze"):
            if version < 13:  # axes an attribute, no second input; negative ones from opset 11
                axes = attrs.get("axes")
                if len(inputs) != 1 or set(attrs) - {"axes"} or (version < 11 and axes and min(axes) < 0):
                    return None
            else:
                axes = None if second is None else [int(a) for a in second]
                if len(inputs) > 2 or attrs:
                    return None
            if op == "Unsqueeze":
                return None if axes is None else oir.unsqueezed(data, list(axes))
            return oir.squeezed(data, None if axes is None else list(axes))
        # Reshape with its shape as the second input (opset 5 on); allowzero from opset 14
        allowzero = attrs.get("allowzero", 0) if version >= 14 else 0
        if version < 5 or len(inputs) != 2 or set(attrs) - ({"allowzero"} if version >= 14 else set()):
            return None
        return oir.reshaped(data, [int(d) for d in second], bool(allowzero))

    def _filled_read(self, node: ir.Node) -> np.ndarray | None:
        """A ConstantOfShape whose shape is not a constant but is read (``_shape_elements``)
        as integers only: its value in every element, as ``_filled`` (else None)."""
        if self._array(node.inputs[0]) is not None:
            return None  # a constant shape: a fold, as any
        read = self._shape_elements(node.inputs[0])
        if read is None or read[0] or not all(isinstance(e, int) and e >= 0 for e in read[1]):
            return None
        return self._fill_of(node, tuple(read[1]))

    def _filled(self, node: ir.Node) -> np.ndarray | None:
        """A ConstantOfShape output with a constant shape, by the operator's definition: its
        value's bits copied to every element (more than ``SMALL_TENSOR_ELEMENTS`` of them: a
        read-only view of the one element, ``_Numbering.fill``); else None."""
        if len(node.inputs) != 1:
            return None
        shape = self._array(node.inputs[0], shared=True)
        if shape is None or shape.dtype != np.int64 or shape.ndim != 1 or (shape < 0).any():
            return None
        return self._fill_of(node, tuple(int(d) for d in shape))

    def _fill_of(self, node: ir.Node, dims: tuple[int, ...]) -> np.ndarray | None:
        """ConstantOfShape ``node``'s output of ``dims``: its ``value`` (default float 0) in
        every element; more than ``SMALL_TENSOR_ELEMENTS`` of them, a read-only view of the
        one element (``_Numbering.fill``, never materialized, whatever its size). None for a
        ``value`` that is not a one-element tensor."""
        fill = node.attributes.get("value")
        if fill is None:
            element = np.zeros(1, np.float32)
        elif fill.type == ir.AttributeType.TENSOR:
            element = self.numbering.numpy(fill.value, shared=True).reshape(-1)
            if element.size != 1:
                return None
        else:
            return None
        if math.prod(dims) <= SMALL_TENSOR_ELEMENTS:
            return np.full(dims, element[0], element.dtype)
        return self.numbering.fill(element[:1], dims)

    def _evaluate(self, values: list[ir.Value]) -> list[np.ndarray]:
        """``values`` computed by the original's own nodes, on onnxruntime's CPU kernels (a
        model of their ancestors only, so only the weights they read are serialized)."""
        proto = self.numbering.proto(self.model)
        producers = {out: node for node in proto.graph.node for out in node.output}
        needed: set[str] = set()
        selections: dict[str, np.ndarray] = {}  # static selections read: given as constants
        stack = [v.name for v in values]
        while stack:
            name = stack.pop()
            if name in self._selections and name not in selections:
                selections[name] = self._selections[name]
            elif name and name not in needed and name not in selections:
                needed.add(name)
                node = producers.get(name)
                if node is not None:
                    stack.extend(node.input)
        aside, constants = self.numbering.without_data(self.model)
        initializers = [_in_memory(self.model.graph.initializers[t.name].const_value, t.name)
                        if t.name in aside else t for t in proto.graph.initializer if t.name in needed]
        initializers += [onnx.numpy_helper.from_array(array, name) for name, array in selections.items()]
        nodes = [n for n in proto.graph.node if any(out in needed for out in n.output)]
        if constants.intersection(needed):  # their tensors back, read from the model's own nodes
            outputs = {v.name: v for node in self.model.graph for v in node.outputs if v.name in constants}
            nodes = [_with_tensor(n, outputs[n.output[0]]) if n.output and n.output[0] in constants else n
                     for n in nodes]
        graph = onnx.helper.make_graph(nodes, "folds", [], [onnx.helper.make_empty_tensor_value_info(v.name)
                                                           for v in values], initializers)
        sub = onnx.helper.make_model(graph, opset_imports=proto.opset_import, ir_version=max(4, proto.ir_version))
        return run(make_session(sub.SerializeToString()), {})


def _inferred_types(proto: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> dict[str, tuple[int, tuple]]:
    """Value element types and dims (static ones as ints, else None) by name from onnx's
    shape inference on ``proto`` (changed: its inputs given ``input_shapes``)."""
    return {i.name: (i.type.tensor_type.elem_type,
                     tuple(d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim)
                     if i.type.tensor_type.HasField("shape") else None)
            for i in _inferred_infos(proto, input_shapes) if i.type.HasField("tensor_type")}


def _inferred_infos(proto: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> list[onnx.ValueInfoProto]:
    """The value infos onnx's shape inference gives on ``proto`` (changed: its inputs given
    ``input_shapes``, its outputs' declared dims dropped): intermediates, inputs, outputs."""
    for given in proto.graph.input:
        dims = given.type.tensor_type.shape.dim
        if given.name in input_shapes and len(dims) == len(input_shapes[given.name]):
            for dim, size in zip(dims, input_shapes[given.name]):
                dim.Clear()
                dim.dim_value = size
    for declared in proto.graph.output:  # onnxruntime does not hold outputs to their declared dims:
        declared.type.tensor_type.ClearField("shape")  # only what inference derives counts
    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    return [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]


def _with_constants(proto: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``proto`` whose main-graph nodes with one output among ``values`` are
    Constant nodes of that array instead (what shape inference then reads as data)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for i, node in enumerate(copy.graph.node):
        if len(node.output) == 1 and node.output[0] in values:
            tensor = onnx.numpy_helper.from_array(values[node.output[0]])
            copy.graph.node[i].CopyFrom(onnx.helper.make_node("Constant", [], [node.output[0]], value=tensor))
    return copy


def _inferred_ranks(proto: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> dict[str, int]:
    """Value ranks by name from onnx's shape inference on ``proto``: the number of dims
    ``_inferred_types`` gives each value (a later info of a name replaces an earlier one, as
    there), read without building the dims."""
    ranks: dict[str, int | None] = {}
    for info in _inferred_infos(proto, input_shapes):
        if info.type.HasField("tensor_type"):
            tensor_type = info.type.tensor_type
            ranks[info.name] = len(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
    return {name: rank for name, rank in ranks.items() if rank is not None}


def _large_or_external(tensor: ir.TensorProtocol) -> bool:
    return tensor.size > MAX_SHAPE_ELEMENTS or isinstance(tensor, ir.ExternalTensor)


def _in_memory(tensor: ir.TensorProtocol, name: str) -> onnx.TensorProto:
    """``tensor`` serialized with its data inline (a session built from bytes cannot read
    external data)."""
    return ir.serde.serialize_tensor(ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=name))


def _emptied(tensor: onnx.TensorProto) -> bool:
    """Empties ``tensor`` when it is longer than ``MAX_SHAPE_ELEMENTS`` or stored outside
    (keeping its name, type and shape: what inference reads); whether it did."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return False
    if tensor.data_location != onnx.TensorProto.EXTERNAL and math.prod(tensor.dims) <= MAX_SHAPE_ELEMENTS:
        return False
    name, dtype, dims = tensor.name, tensor.data_type, list(tensor.dims)
    tensor.Clear()
    tensor.name, tensor.data_type = name, dtype
    tensor.dims.extend(dims)
    return True


def _strip_large(proto: onnx.ModelProto) -> set[str]:
    """Empties the main graph's large initializers (``_emptied``); their names."""
    return {tensor.name for tensor in proto.graph.initializer if _emptied(tensor)}


def _strip_large_constants(proto: onnx.ModelProto) -> set[str]:
    """Empties the large ``value`` tensors of the main graph's Constant nodes
    (``_emptied``); the outputs of the nodes emptied."""
    stripped = set()
    for node in proto.graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR and _emptied(attr.t):
                stripped.add(node.output[0])
    return stripped


def _with_tensor(node: onnx.NodeProto, value: ir.Value) -> onnx.NodeProto:
    """A copy of a Constant node emptied by ``_strip_large_constants``, its ``value`` tensor
    serialized again from ``value`` (that node's output in the model)."""
    restored = onnx.NodeProto()
    restored.CopyFrom(node)
    tensor = oir.const_tensor(value)
    if tensor is None:
        raise ValueError(f"constant '{value.name}' has no tensor")
    for attr in restored.attribute:
        if attr.name == "value":
            attr.t.CopyFrom(_in_memory(tensor, attr.t.name))
    return restored


def _filled_element(array: np.ndarray, dtype: ir.DataType, raw: np.ndarray | None = None) -> bytes | None:
    """The bytes of the one element value of ``array`` (a plain little-endian array of
    ONNX type ``dtype``; ``raw``: its bytes, ``_raw_bytes``, when already read) when it has
    more than ``SMALL_TENSOR_ELEMENTS`` elements whose bytes are all the same; else None.
    Such a tensor is keyed by that element, its type and its shape, which fix every one of
    its bytes; a view that repeats one element (strides all 0) is read at that element."""
    if array.size <= SMALL_TENSOR_ELEMENTS or _PLAIN_ARRAYS.get(array.dtype) != dtype:
        return None
    if raw is None and not any(array.strides):
        return array[(0,) * array.ndim].tobytes()
    if raw is None:
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    size = array.itemsize
    if bytes(raw[:size]) != bytes(raw[size:2 * size]):  # most tensors differ in their first two elements
        return None
    # compared as unsigned integers of the element's size: bit for bit (NaN payloads, -0.0)
    bits = raw.view(np.dtype(f"<u{size}"))
    if not bool((bits == bits[0]).all()):
        return None
    return bits[:1].tobytes()


def _stored(tensor: ir.TensorProtocol) -> tuple | None:
    """What a small parsed tensor stores, as a key of its decoded array: its type, dims and
    ``raw_data``, or else its whole serialization (values in repeated fields, name
    included); None for any other tensor. Equal keys decode to equal arrays."""
    if type(tensor) is not ir.serde.TensorProtoTensor:
        return None
    proto = tensor.raw
    if proto.data_location == onnx.TensorProto.EXTERNAL or proto.ByteSize() > 8 * MAX_SHAPE_ELEMENTS:
        return None
    if proto.HasField("raw_data") and not proto.HasField("segment"):
        return ("raw", proto.data_type, tuple(proto.dims), proto.raw_data)
    return ("proto", proto.SerializeToString())


def _raw_bytes(tensor: ir.TensorProtocol, array: np.ndarray) -> np.ndarray:
    """A tensor's bytes (``array``: its ``numpy()``) as a flat uint8 array (a view where it
    can be); a packed type's are compared on their written bits alone (``_same_values``)."""
    if tensor.dtype == ir.DataType.STRING:
        items = [x if isinstance(x, bytes) else str(x).encode() for x in array.reshape(-1).tolist()]
        return np.frombuffer(b"".join(len(x).to_bytes(8, "little") + x for x in items) or b"\0", np.uint8)
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _same_values(raw: np.ndarray, other: np.ndarray, mask: np.uint8 | None) -> bool:
    """Whether two tensors' bytes (``_raw_bytes``, one type and size) hold the same values; a
    packed type's (``mask``: the bits of its value) compared on those bits alone, a block at
    a time, so that neither array is copied whole."""
    if mask is None:
        return bool(np.array_equal(raw, other))
    block = 1 << 20
    return all(np.array_equal(raw[i:i + block] & mask, other[i:i + block] & mask) for i in range(0, raw.size, block))


_PLAIN_ATTRIBUTES = {kind: kind.name for kind in (ir.AttributeType.INT, ir.AttributeType.STRING,
                                                   ir.AttributeType.INTS, ir.AttributeType.STRINGS)}
_SCALAR_ATTRIBUTES = (ir.AttributeType.INT, ir.AttributeType.STRING)


def _fed_inputs(model: ir.Model) -> list[ir.Value]:
    """The main graph's inputs a caller feeds: all but the constants (``optcc.ir.is_constant``:
    below IR version 4 an initializer listed as an input is one; from IR 4 on it is a default
    a caller may replace, so it is fed)."""
    inputs_constant = oir.initializers_are_constant(model)
    return [v for v in model.graph.inputs if not oir.is_constant(v, inputs_constant=inputs_constant)]


def _constant(value: ir.Value) -> ir.TensorProtocol | None:
    try:
        return oir.const_tensor(value)
    except ValueError:
        return None


def _in_model(value: ir.Value) -> bool:
    """Whether ``value`` belongs to a graph (an input, initializer or node output of one)."""
    producer = value.producer()
    return value.graph is not None or producer is not None and producer.graph is not None


def _ancestors(outputs: Any) -> set[int]:
    """The ids of the nodes ``outputs`` are computed from (in their graph)."""
    seen: set[int] = set()
    stack = [v.producer() for v in outputs if v is not None and v.producer() is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
    return seen


def _top_values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.initializers.values()
    for node in graph:
        yield from (v for v in node.outputs if v is not None)


# numpy dtypes whose array bytes (little-endian, one element per item) are the ONNX bytes
# of that ONNX type, by dtype
_PLAIN_ARRAYS = {np.dtype(t).newbyteorder("<"): ir.DataType.from_numpy(np.dtype(t)) for t in (
    np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
    np.uint64, np.bool_)}


def _bitwidth(dtype: ir.DataType) -> int | None:
    try:
        return dtype.bitwidth
    except TypeError:  # UNDEFINED, STRING
        return None


# the packed types (two or four values to a byte: int4, uint4, float4, int2, ...) and the bits of
# one value, which ml_dtypes holds one to a byte: onnx-ir writes a value as its byte's low bits
# (packing drops the rest), and a view of wider levels (int8 levels as int4, as weight-only
# quantization holds them) keeps the sign's bits above them, so only the low bits are compared
_PACKED_MASKS = {dtype: np.uint8((1 << bits) - 1) for dtype in ir.DataType
                 if (bits := _bitwidth(dtype)) is not None and bits < 8 and 8 % bits == 0}
MAX_RANK_DEPTH = 64  # ranks read by definition through at most this many nodes
_RANK_KEEPING = frozenset(("Sqrt", "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Neg", "Abs", "Erf", "Reciprocal",
                           "Identity", "Floor", "Ceil", "Sin", "Cos", "HardSwish", "HardSigmoid", "LeakyRelu", "Elu",
                           "Softplus", "Not", "Sign", "Round"))
# operators whose (first, or Split's every) output has their first input's rank, by the spec
_RANK_KEEPING_FIRST = frozenset(("Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
                                 "GlobalMaxPool", "GlobalLpPool", "BatchNormalization", "InstanceNormalization",
                                 "LRN", "Softmax", "LogSoftmax", "Clip", "Cast", "Dropout", "Resize", "Upsample",
                                 "Pad", "Slice", "Concat", "Split", "PRelu"))
_BROADCASTING = frozenset(("Add", "Sub", "Mul", "Div", "Pow", "Equal", "Less", "Greater", "And", "Or", "Xor",
                           "LessOrEqual", "GreaterOrEqual"))
_VIEW_OPS = frozenset(("Transpose", "Squeeze", "Unsqueeze"))
# elementwise ops of one input: the output has the input's shape (a Shape of it reads the input's)
_SHAPE_KEEPING = frozenset(("Not", "Neg", "Abs", "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Erf", "Cast",
                            "Identity", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "IsNaN", "IsInf"))
_COERCED_OPS = frozenset(("Softmax", "LogSoftmax"))  # over the input coerced to 2-D before opset 13
_INITIAL_STATES = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}  # initial_h (and initial_c): input positions
# ops whose every output element is one of their first input's: a zero fill stays zero
_ZERO_KEEPING = frozenset(("Slice", "Reshape", "Expand", "Tile", "Squeeze", "Unsqueeze", "Transpose", "Flatten",
                           "Identity"))
_ZERO_DEPTH = 16  # the producers ``_zero_fill`` follows back at most
# a Shape and the ops that copy its elements without arithmetic (``_Keys._selected``)
_SELECTING = frozenset(("Shape", "Cast", "Slice", "Gather", "Squeeze", "Unsqueeze", "Identity"))
_DEFINED_OPS = frozenset(("ConstantOfShape", "Identity", "Cast", "Flatten", "Unsqueeze", "Squeeze", "Reshape"))
_EXACT_INTEGERS = {np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                                          np.uint64)}
_EXACT_FLOATS = {np.dtype(np.float16): 11, np.dtype(np.float32): 24, np.dtype(np.float64): 53}  # significand bits


def _held_bytes(array: np.ndarray) -> int:
    """The bytes ``array`` holds: a view repeating one element (strides all 0) holds one."""
    return array.nbytes if any(array.strides) or array.size == 0 else array.itemsize


def _exact_cast(data: np.ndarray, to: Any) -> np.ndarray | None:
    """``data`` cast to ONNX type ``to`` when every value converts exactly: an integer or
    boolean to an integer type holding all its values, or to a float whose significand
    holds them all; a float to a float at least as wide, without NaNs (whose payloads a
    kernel may change); the same type. Else None (no exactness to rely on). A view repeating
    one element is cast at that element, and stays such a view."""
    if data.size > 1 and not any(data.strides):  # one element repeated: cast once, repeated alike
        one = _exact_cast(data.reshape(-1)[:1], to)
        return None if one is None else oir.filled_view(one, data.shape)
    try:
        target = np.dtype(ir.DataType(int(to)).numpy())
    except (TypeError, ValueError):
        return None
    if data.dtype == target:
        return data
    if target not in _EXACT_INTEGERS and target not in _EXACT_FLOATS:
        return None
    if data.dtype.kind in "biu":
        if data.size == 0:
            return data.astype(target)
        low, high = int(data.min()), int(data.max())
        if target in _EXACT_INTEGERS:
            info = np.iinfo(target)
            return data.astype(target) if info.min <= low and high <= info.max else None
        limit = 1 << _EXACT_FLOATS[target]  # every integer of at most this magnitude is exact
        return data.astype(target) if -limit <= low and high <= limit else None
    if data.dtype in _EXACT_FLOATS and target in _EXACT_FLOATS \
            and _EXACT_FLOATS[target] >= _EXACT_FLOATS[data.dtype] and not np.isnan(data).any():
        return data.astype(target)
    return None


# --------------------------------------------------------------------------- affine forms

ROUNDING_UNITS = 16  # a proved fold's constants may differ from the exact fold by this many roundings
MAX_FORM_ELEMENTS = 1 << 24  # larger weights are compared by their bytes only
MAX_SHAPE_ELEMENTS = 64  # longer integer constants are not read as shapes
_LARGEST = float(np.finfo(np.float64).max)
CHUNK_ELEMENTS = 1 << 14  # weights are compared in float64 chunks of this many elements (in cache)
# a weight of at most this many elements is compared in one run: a first run of 64 elements,
# which spares reading the rest of a weight that differs there, would save less than it costs
WHOLE_PART_ELEMENTS = 1 << 12


@dataclasses.dataclass
class _Affine:
    """``value = op(x; weight * scale) + bias`` per output channel, in float64: ``op`` a
    Conv, ConvTranspose, Gemm or MatMul with a constant weight, or ``Scale`` (an
    elementwise factor along axis 1, from BatchNormalization); ``scale`` the product of the
    per-channel factors composed into it, along the weight's output-channel axis (None:
    1), kept apart so that the weight is never copied, only read chunk by chunk where
    compared. ``bias_terms`` bounds the magnitude of the terms summed into each bias (the
    rounding a float fold may add to it)."""

    structure: tuple  # the op, its attributes and the key of x: forms compare only within one
    weight: np.ndarray  # in its stored dtype (a view of the constant's array)
    weight_axis: int  # the weight's output-channel axis
    bias: np.ndarray
    bias_terms: np.ndarray
    unit: float  # the stored dtype's rounding unit
    tiny: float
    axis: int  # the output's channel axis: 1, or -1 (last)
    rank: int | None  # the output's rank, when known
    scale: np.ndarray | None = None  # float64, one factor per output channel; None: all 1

    @property
    def channels(self) -> int:
        return self.bias.shape[0]

    def agrees(self, other: _Affine) -> bool:
        """Every bias within ``allowed`` of the magnitude of its terms, and every element
        of the composed weights within ``allowed`` of the larger of the two, in float64."""
        if self.weight.shape != other.weight.shape or self.weight_axis != other.weight_axis \
                or self.bias.shape != other.bias.shape:
            return False
        allowed = ROUNDING_UNITS * max(self.unit, other.unit)
        tiny = max(self.tiny, other.tiny)
        # every bound is capped at the largest finite float64: an infinity (or NaN) on either
        # side then agrees with nothing, as its bound would otherwise let anything through
        if self.bias.size and not _within(self.bias.item(0), other.bias.item(0),
                                          max(self.bias_terms.item(0), other.bias_terms.item(0)), allowed, tiny):
            return False  # most different forms differ in their first bias already
        bound = np.maximum(self.bias_terms, other.bias_terms)
        bound *= allowed
        bound += tiny
        np.minimum(bound, _LARGEST, out=bound)
        difference = self.bias - other.bias
        np.abs(difference, out=difference)
        if not (difference <= bound).all():
            return False
        if self.weight is other.weight and _same_factors(self.scale, other.scale):
            # one stored weight on both sides, the same factors composed in: equal element for
            # element, so within any bound where finite (a non-finite element agrees with nothing)
            finite = _composed_finite(self.weight, self.weight_axis, self.scale)
            if finite is not None:
                return finite
        # a form whose weight is stored as it is (no factor composed in) takes the place of
        # ``exact``: where the other's composed weight rounds to it exactly, each element is
        # within one rounding of the stored dtype (a subnormal's half step below ``tiny``),
        # and a finite stored element makes that rounding no overflow: within ``allowed``
        exact, composed = (other, self) if other.scale is None else (self, other)
        stored = np.finfo(exact.weight.dtype) if exact.weight.dtype.kind == "f" else None
        rounded = exact.scale is None and stored is not None and float(stored.eps) / 2 <= allowed \
            and float(stored.smallest_subnormal) / 2 <= tiny
        # most different forms differ in their first weights already: a small first chunk
        with np.errstate(over="ignore", invalid="ignore"):
            for (x_part, x_scale), (y_part, y_scale) in zip(composed._parts(), exact._parts()):
                if rounded and x_scale is not None:
                    # the product in float64, rounded once to the stored dtype (one pass)
                    if (np.multiply(x_part, x_scale, dtype=np.float64, casting="same_kind",
                                    out=np.empty(y_part.shape, y_part.dtype)) == y_part).all() \
                            and np.isfinite(y_part).all():
                        continue
                elif rounded and (x_part.astype(np.float64).astype(y_part.dtype) == y_part).all() \
                        and np.isfinite(y_part).all():
                    continue
                x = _composed(x_part, x_scale)
                y = _composed(y_part, y_scale)
                difference = x - y
                np.abs(difference, out=difference)
                np.abs(x, out=x)
                np.abs(y, out=y)
                np.maximum(x, y, out=x)
                x *= allowed
                x += tiny
                np.minimum(x, _LARGEST, out=x)
                if not (difference <= x).all():
                    return False
        return True

    def _parts(self) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """The weight in consecutive runs of elements in C order (views in its stored
        dtype, the same cuts for every form of one weight shape and axis: of a weight of
        more than ``WHOLE_PART_ELEMENTS``, a first one of about 64 elements, then
        ``CHUNK_ELEMENTS``, small enough to stay in cache; a smaller weight in one run),
        each with the part of ``scale`` that broadcasts against it (None: no scale)."""
        shape = self.weight.shape
        channels = shape[self.weight_axis]
        before = math.prod(shape[:self.weight_axis])
        after = math.prod(shape[self.weight_axis + 1:])
        weight = self.weight.reshape(before, channels, after)  # a view, also of a transposed Gemm weight
        scale = None if self.scale is None else self.scale.reshape(1, channels, 1)
        along = 0 if before > 1 else 1  # cut whole rows of the first axis longer than 1
        row = channels * after if along == 0 else after
        start, count = 0, max(1, (64 if weight.size > WHOLE_PART_ELEMENTS else CHUNK_ELEMENTS) // max(row, 1))
        while start < weight.shape[along]:
            part = slice(start, start + count)
            if along == 0:
                yield weight[part], scale
            else:
                yield weight[:, part], None if scale is None else scale[:, part]
            start += count
            count = max(1, CHUNK_ELEMENTS // max(row, 1))

    def scaled(self, factor: np.ndarray) -> _Affine:
        return dataclasses.replace(self, scale=factor if self.scale is None else self.scale * factor,
                                   bias=self.bias * factor, bias_terms=self.bias_terms * np.abs(factor))

    def shifted(self, shift: np.ndarray, terms: np.ndarray | None = None) -> _Affine:
        return dataclasses.replace(self, bias=self.bias + shift,
                                   bias_terms=self.bias_terms + (np.abs(shift) if terms is None else terms))


def _within(bias: float, other: float, terms: float, allowed: float, tiny: float) -> bool:
    """One channel of ``_Affine.agrees``' bias test in Python floats (float64, as numpy
    computes it): False only where that test fails for this channel (with a NaN among the
    terms Python's ``max`` may drop it, giving a bound numpy would not: then this test
    passes where numpy's fails, never the other way)."""
    return abs(bias - other) <= min(allowed * terms + tiny, _LARGEST)


def _same_factors(scale: np.ndarray | None, other: np.ndarray | None) -> bool:
    """Whether two forms' per-channel factors are the same numbers (None: all 1)."""
    if scale is None or other is None:
        return scale is None and other is None
    return scale is other or (scale.shape == other.shape and bool(np.array_equal(scale, other)))


def _composed_finite(weight: np.ndarray, axis: int, scale: np.ndarray | None) -> bool | None:
    """Whether every element of ``weight * scale`` (``scale`` along ``axis``; None: 1) is
    finite in float64, as ``_Affine.agrees`` composes it; None where finding out would
    read a stored weight composed with factors (``agrees`` then compares it chunk by chunk).
    A view repeating one element (strides all 0) is read at that element."""
    repeated = weight.size > 0 and not any(weight.strides)
    if scale is None:
        element = weight[(0,) * weight.ndim] if repeated else weight
        return bool(np.isfinite(element).all())
    if not repeated:
        return None
    if weight.shape[axis] != scale.size:
        return None
    return bool(np.isfinite(np.float64(weight[(0,) * weight.ndim]) * scale).all())


def _composed(part: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """``part * scale`` in float64, a new array."""
    array = part.astype(np.float64)
    if scale is not None:
        array *= scale
    return array


def _affine_form(keys: _Keys, node: ir.Node, value: ir.Value, attributes: tuple) -> _Affine | None:
    """The affine normal form of a default-domain node's first output, if it has one."""
    if node.op_type not in _AFFINE_OPS or value.index() != 0 \
            or any(out.uses() or out in keys.model.graph.outputs for out in node.outputs[1:]):
        return None
    op, inputs = node.op_type, list(node.inputs)
    attrs = {name: attr.value for name, attr in node.attributes.data.items()}  # the UserDict's own dict: faster
    # before opset 7: legacy broadcasting (broadcast/axis) and training-mode BatchNormalization
    if keys.opsets.get("", 0) < 7 and op != "Conv":
        return None
    if op in ("Mul", "Add", "Sub", "Div") and attrs or op == "Gemm" and set(attrs) - {"alpha", "beta", "transA", "transB"}:
        return None
    if op in ("Conv", "ConvTranspose") and len(inputs) >= 2:
        weight = keys._array(inputs[1])
        bias = keys._array(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else None
        if weight is None or weight.dtype.kind != "f" or weight.ndim < 3 or weight.size > MAX_FORM_ELEMENTS \
                or (len(inputs) > 2 and inputs[2] is not None and bias is None):
            return None
        if op == "ConvTranspose" and attrs.get("group", 1) != 1:
            return None
        axis = 0 if op == "Conv" else 1
        bias = np.zeros(weight.shape[axis]) if bias is None else bias.astype(np.float64)
        x, factor = _input_factor(keys, inputs[0], weight)
        stored, group = weight.dtype, attrs.get("group", 1)
        if factor is not None and factor.size > 1:  # per input channel: the weight entries reading each
            in_channels = weight.shape[1] * group if op == "Conv" else weight.shape[0]
            if factor.size != in_channels or weight.shape[0] % group:
                return None
            weight, factor = _scaled_per_input_channel(op, weight, factor, group), None
        # the definition as the node's own key names it: the padding auto_pad asks for changed
        # between versions (op_versions), and forms of equal structure share one key
        definition = keys._semantics(node, "", op, keys.opsets.get("", 0))
        form = _new_form((op, definition, attributes, keys.key(x)), weight, axis, bias, rank=weight.ndim, axis=1,
                         dtype=stored)
        return form if factor is None else dataclasses.replace(form, scale=np.full(len(bias), factor[0]))
    if op in ("Gemm", "MatMul") and len(inputs) >= 2:
        weight = keys._array(inputs[1])
        if weight is None or weight.dtype.kind != "f" or weight.ndim != 2 or attrs.get("transA", 0):
            return None
        if weight.size > MAX_FORM_ELEMENTS:
            return None
        weight = weight.T if attrs.get("transB", 0) else weight
        bias = np.zeros(weight.shape[1])
        if op == "Gemm" and len(inputs) > 2 and inputs[2] is not None:
            c = keys._array(inputs[2])
            if c is None or c.ndim > 2 or c.size not in (1, weight.shape[1]) or (c.ndim == 2 and c.shape[0] != 1):
                return None
            bias = bias + attrs.get("beta", 1.0) * c.astype(np.float64).reshape(-1)
        # MatMul of a rank-2 x is Gemm's product: both fold to the same form
        dense = op == "Gemm" or keys.rank(inputs[0]) == 2
        form = _new_form(("Gemm" if dense else op, keys.key(inputs[0])), weight, 1, bias, rank=2 if dense else None,
                         axis=-1)
        alpha = attrs.get("alpha", 1.0)
        return form if alpha == 1.0 else dataclasses.replace(form, scale=np.full(weight.shape[1], float(alpha)))
    base = next((keys._forms.get(id(v)) for v in inputs if v is not None and id(v) in keys._forms), None)
    if op == "BatchNormalization" and len(inputs) == 5:
        params = [keys._array(v) for v in inputs[1:]]
        if any(p is None or p.ndim != 1 or p.dtype.kind != "f" for p in params) or attrs.get("training_mode", 0) \
                or attrs.get("spatial", 1) != 1:
            return None
        scale, beta, mean, var = (p.astype(np.float64) for p in params)
        factor = scale / np.sqrt(var + float(np.float32(attrs.get("epsilon", 1e-5))))
        shift, terms = beta - mean * factor, np.abs(beta) + np.abs(mean * factor)
        if base is None:
            base = _new_form(("Scale", keys.key(inputs[0])), np.ones(len(factor)), 0, np.zeros(len(factor)),
                             rank=keys.rank(inputs[0]), axis=1, dtype=params[0].dtype)
        elif not (base.axis == 1 or base.rank == 2) or base.channels != len(factor):
            return None
        return base.scaled(factor).shifted(shift, terms)
    if op in ("Mul", "Add", "Sub", "Div") and base is not None and len(inputs) == 2:
        first = id(inputs[0]) in keys._forms
        constant = keys._array(inputs[1] if first else inputs[0])
        vector = None if constant is None else _per_channel(constant, base)
        if vector is None:
            return None
        if op == "Mul":
            return base.scaled(vector)
        if op == "Add":
            return base.shifted(vector)
        if op == "Sub":
            return base.shifted(-vector) if first else base.scaled(-np.ones_like(vector)).shifted(vector)
        if first and np.all(vector != 0):
            return base.scaled(1.0 / vector)
    return None


def _input_factor(keys: _Keys, x: ir.Value, weight: np.ndarray) -> tuple[ir.Value, np.ndarray | None]:
    """A convolution's input ``x`` as ``Mul(x0, s)`` with ``s`` finite and constant, one
    element or one per input channel: ``x0`` and ``s`` (float64, one element or one per
    channel), else ``x`` itself (and None). The convolution is linear in its input per
    input channel and its zero padding stays zero when scaled, so ``conv(x0 * s; W) + b``
    is ``conv(x0; W * s) + b`` with ``s`` scaling the weight entries that read each
    channel (one element: all of them, the form's weight factor; never its bias).
    ``Mul`` must keep ``x0``'s shape: ``s`` is one element of rank <= 1; or ``x0``'s rank
    is the weight's (the rank a convolution's input has) and ``s`` has no more, its dims
    all 1 but the channel axis, which is 1 or the channels ``x0`` is known to have
    (``_channels``; one channel broadcast to many would give the fold a wrong input). A
    non-finite ``s`` is left as it is: padding would multiply it by zero in the one form
    and not in the other."""
    node = x.producer()
    if node is None or node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or node.attributes \
            or len(node.inputs) != 2 or keys.opsets.get("", 0) < 7:
        return x, None
    rank = weight.ndim
    for i in (0, 1):
        x0, s = node.inputs[i], keys._array(node.inputs[1 - i])
        if x0 is None or s is None or keys._array(x0) is not None:
            continue
        if s.dtype != weight.dtype or not np.isfinite(s).all() or s.ndim > rank:
            continue
        if s.size == 1 and s.ndim <= 1:
            return x0, s.astype(np.float64).reshape(-1)
        dims = (1,) * (rank - s.ndim) + s.shape
        if dims[0] != 1 or any(d != 1 for d in dims[2:]) or keys.rank(x0) != rank:
            continue
        if dims[1] == 1 or dims[1] == _channels(keys, x0):
            return x0, s.astype(np.float64).reshape(-1)
    return x, None


def _scaled_per_input_channel(op: str, weight: np.ndarray, factor: np.ndarray, group: int) -> np.ndarray:
    """``weight`` (float64) with the entries reading input channel ``c`` times
    ``factor[c]``: Conv ``[Cout, Cin/group, k...]``, output group ``g`` reading channels
    ``g*Cin/group ...``; ConvTranspose ``[Cin, Cout/group, k...]``."""
    w64, tail = weight.astype(np.float64), (1,) * (weight.ndim - 2)
    if op == "ConvTranspose":
        return w64 * factor.reshape((-1, 1) + tail)
    cout, cin_group = weight.shape[0], weight.shape[1]
    grouped = w64.reshape((group, cout // group, cin_group) + weight.shape[2:])
    return (grouped * factor.reshape((group, 1, cin_group) + tail)).reshape(weight.shape)


# default-domain ops whose first output has their first input's channels (axis 1)
_CHANNEL_KEEPING = frozenset((
    "Relu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Softplus", "Erf",
    "Abs", "Neg", "Clip", "Identity", "AveragePool", "MaxPool", "GlobalAveragePool", "GlobalMaxPool",
    "BatchNormalization",
))


def _channels(keys: _Keys, value: ir.Value) -> int | None:
    """The size of ``value``'s axis 1, when known: a fed input's declared static dim (what
    onnxruntime accepts for it), an affine form's channels along axis 1 (a convolution's
    output channels, a BatchNormalization's parameters), or through ops that keep their
    first input's channels; else None."""
    for _ in range(MAX_RANK_DEPTH):
        keys.key(value)  # its affine form, if it has one
        form = keys._forms.get(id(value))
        if form is not None:
            return form.channels if form.axis == 1 else None
        node = value.producer()
        if node is None:
            dims = value.shape if value.name in keys.fed else None
            return dims[1] if dims is not None and dims.rank() >= 2 and isinstance(dims[1], int) else None
        if node.domain not in ("", "ai.onnx") or node.op_type not in _CHANNEL_KEEPING or value.index() != 0 \
                or not node.inputs or node.inputs[0] is None:
            return None
        value = node.inputs[0]
    return None


_AFFINE_OPS = frozenset(("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Mul", "Add", "Sub", "Div"))


def _new_form(structure: tuple, weight: np.ndarray, weight_axis: int, bias: np.ndarray, *, rank: int | None,
              axis: int, dtype: np.dtype | None = None) -> _Affine:
    info = np.finfo(dtype or weight.dtype)
    bias = bias.astype(np.float64)
    return _Affine(structure, weight, weight_axis, bias, np.abs(bias), float(info.eps) / 2,
                   float(info.tiny), axis, rank)


def _per_channel(constant: np.ndarray, form: _Affine) -> np.ndarray | None:
    """``constant`` as one float64 value per output channel of ``form``, when broadcasting it
    against the output scales (or shifts) each channel and changes no shape; else None."""
    if constant.dtype.kind != "f" or constant.dtype.itemsize * 8 < 16:
        return None
    channels = form.channels
    if form.rank is None:
        if form.axis != -1 or constant.ndim > 1 or constant.size not in (1, channels):
            return None
        return np.broadcast_to(constant.astype(np.float64).reshape(-1), (channels,)).copy()
    if constant.ndim > form.rank:
        return None
    at = constant.ndim - (form.rank - form.axis % form.rank)  # the channel axis, right-aligned
    for i, size in enumerate(constant.shape):
        if size != 1 and not (i == at and size == channels):
            return None
    return np.broadcast_to(constant.astype(np.float64).reshape(-1), (channels,)).copy()
