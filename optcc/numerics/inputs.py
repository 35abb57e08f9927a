"""Inputs for running a model: generated feeds that fit the model, and checks of given ones.

Sizes. A static dimension keeps its size; a dynamic one (a symbol, an unknown ``?`` or a
legacy negative ``dim_value`` such as ``-1``) takes the size given for its input by name,
else the size its symbol already took in another input, else the size a direct consumer
implies (the channels a Conv's weight expects, the rows of a constant MatMul/Gemm
operand), else 1 for the first axis and ``DEFAULT_DYNAMIC_DIM`` for the others. The
first axis of an input of rank 2 or more is its batch: where nothing sizes it, the last
sample may give it ``last_batch`` instead (the verifier asks for ``BATCH_SAMPLE``), every
such axis the same size, so that a dim named in several inputs keeps one size in a
sample; the other samples, and inputs of rank 1, keep 1. Where it does, that sample's
other free dynamic dims are ``last_batch`` times shorter (32 instead of 64), so that it
holds about as many elements as the others (as many tokens in a ``[batch, seq]`` input)
and costs about as much to run, unless ``last_dynamic_dim`` sizes them. Samples the model cannot run are made again with the
sizes of ``RETRY_SIZES`` in turn.

Values, per input, first rule that applies:

- a user range (``ranges={"name": (lo, hi)}``): floats uniform in ``[lo, hi)``, integers
  uniform in ``[lo, hi]`` (both ends included), booleans from ``lo != 0`` / ``hi != 0``;
- a sample rate (a rank-0 integer named ``sr``, ``sample_rate`` or ``sampling_rate``):
  16000;
- a streaming model's state (an input its own output returns, ``optcc.numerics.state``):
  zeros, the state a stream starts from (verification runs a second step from the state
  the first returns, ``optcc.numerics.decode.stream_plan``);
- attention masks, by name (the name contains ``mask``): see below;
- position ids, by the graph: an integer input that is a RotaryEmbedding's position ids
  (ai.onnx or com.microsoft), that indexes a cos and a sin cache (two constant tables
  gathered by it whose ``cos**2 + sin**2`` is one constant), or that, cast to float,
  reaches a Cos or Sin (the rotary angle ``position * inv_freq``, as Llama-style
  exports compute it) through shape ops, Mul/MatMul/Div and Concat. Checked before the
  masks by use, because such positions also reach a Mul through a Cast to float;
- attention masks, by use (an integer/bool input of rank >= 2 reaches a Where condition,
  a Mul or a Sub through a Cast to bool/float, optionally behind Unsqueeze/Reshape/Expand):
  0/1 in the input's dtype, each row (last axis) a run of ones of random length at least
  half the row, followed by zeros (right padding); all ones for a KV-cache decoder, whose
  current tokens sit at the end of the mask;
- position ids, by name (an integer input whose name contains ``position``);
  all position ids are ``past + arange(S)`` along the last axis, where ``past`` is the
  KV-cache length (0 without a cache), and their table is the smallest one they index
  (Gather rows, or a RotaryEmbedding's cos cache rows);
- integers that index a table (Gather/GatherElements/GatherND indices, ScatterElements/
  ScatterND indices, directly or through Cast, Reshape, Unsqueeze, Squeeze, Flatten,
  Identity, Expand, a Gather of them as data, or an Add of a constant): uniform in
  ``[0, n)`` for a table of ``n`` rows (token ids within the vocabulary), ``n`` static or
  a dynamic dim named by a symbol some graph input has, at the size this sample gives it
  (a graph network's edge list within its nodes, its graph ids within its graphs);
- image-like floats (rank 4 with 1 or 3 channels on axis 1 or 3): a smooth random image
  (uniform values on a coarse grid, repeated to full size, plus fine noise) mapped to
  ``[-1, 1]``. That is the range of the common ``(x/255 - 0.5)/0.5`` preprocessing and
  lies within ImageNet mean/std normalization (about ``[-2.1, 2.6]``), whereas N(0, 1)
  noise has no spatial structure and unbounded tails that no preprocessed image has;
- waveform-like floats (rank 2 ``[batch, T]`` or rank 3 ``[batch, T, 1]`` /
  ``[batch, 1, T]`` with a static ``T >= AUDIO_MIN_SAMPLES``, or a dynamic ``T`` that the
  given ``shapes`` (``--input-shape``) size so, not read directly by a MatMul or Gemm, as
  a feature vector would be): a speech-like signal
  (harmonics of a gliding pitch under a syllable envelope that falls silent between
  syllables, over a faint noise floor) peaking at 0.5. N(0, 1) noise is loud everywhere,
  whereas real audio has quiet stretches, where float16 (log-spectra, power) loses most.
  A 16-bit integer input (``int16``/``uint16``) of those shapes, whatever its ``T`` (not
  1; dynamic too), is PCM audio: the same signal in the dtype's steps, around its middle,
  peaking half way to its limit (16384 for int16). Its role goes before the masks by use
  (a waveform is cast to float and scaled, as a mask is applied), not before the masks
  by name;
- uint8 pictures (rank 4 with 1, 3 or 4 channels on axis 1 or 3, not named a mask): the
  same smooth random image in grey levels ``0..255``. Their role goes before the masks by
  use (pixels are cast to float and scaled, as a mask is applied);
- other floats standard-normal; other integers uniform in ``[0, 4)``; booleans 0/1.

KV-cache decoders (an input named ``past_key_values.*`` or ``past_*`` and an output whose
name contains ``present``): every past input's sequence axis (its dynamic axis after the
first) takes one past length ``P`` (``DEFAULT_PAST_LENGTH`` unless given through
``shapes``), the attention mask's last axis ``P + S`` and position ids' ``S``, where ``S``
is the current length (the token ids' last axis). A decoder step is verified over a decode
of ``decode_steps`` steps (``DECODE_STEPS`` by default, ``optcc.numerics.decode``), each
after the first one token longer, so the last step feeds position ``P + S + decode_steps
- 2``: when position ids index a table of ``n`` rows, ``S`` and then ``P`` (unless given)
are reduced so that ``P + S + decode_steps - 1 <= n``. A given past length with which even
one step's positions ``P + S`` cannot fit the table is refused.

Everything is drawn from one ``numpy.random.Generator`` seeded with ``seed``, input by
input in graph order, so the feeds are a function of the model, the options and the seed.

Defaults a caller may replace. From IR 4 on, an initializer listed as a graph input is a
default (``optcc.ir.overridable_inputs``): ``generate_inputs`` leaves it out, so a run
reads the default. ``varied_defaults`` gives values that differ from it, for a sample to
feed (the verifier's last generated sample does): each float default with every finite
element ``x`` moved to ``x * (1 + DEFAULT_VARIATION * u)`` and an element that is 0 to
``DEFAULT_VARIATION * u`` times the tensor's root mean square, ``u`` uniform in
``[-1, 1)``, then clipped to the range the default's finite elements and 0 span, in the
default's dtype; NaN and infinities stay. So signs are kept (a variance stays positive),
the weights' scale holds (no layer after layer shrinks), and every value stays within
the default's range (float16 meets no new overflow; an INT8 range calibrated on the
default, which always holds 0, holds them); a default of one value throughout
(LayerNorm's ones) moves towards 0. An all-zero default is moved by
``DEFAULT_VARIATION * u`` itself. Integer and bool defaults are not varied: they are
shapes, axes, indices, counts or flags, whose valid values the model alone knows
(another Reshape target or Slice end would fail, or change the output's shape, not
probe the same computation); nor are float defaults that size a tensor (a Resize's or
Upsample's scales, a Range's operands, directly or through Cast, Identity, Reshape,
Squeeze, Unsqueeze, Concat, Mul or Div) or are cast to an integer type, for the same reason. Drawn from a generator of
their own, seeded by ``seed``, so the other inputs' values do not depend on them.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import onnx_ir as ir
from ml_dtypes import finfo as ml_finfo, iinfo as ml_iinfo

from optcc import ir as oir
from optcc.errors import BadInputError
from optcc.numerics.state import state_pairs

__all__ = ["BATCH_SAMPLE", "DECODE_STEPS", "DEFAULT_DYNAMIC_DIM", "RETRY_DYNAMIC_DIM", "RETRY_SIZES", "DEFAULT_PAST_LENGTH", "generate_inputs",
           "check_feeds", "check_ranges", "check_samples_vary", "decode_room", "input_roles", "sizes_text", "DEFAULT_VARIATION",
           "variable_defaults",
           "varied_defaults"]

DECODE_STEPS = 3  # steps of a KV-cache decoder's verification decode; generated inputs leave room for them

DEFAULT_DYNAMIC_DIM = 64  # size chosen for a dynamic dimension other than the first
# the batch of the verifier's last generated sample: a model whose batch is dynamic is run
# on more than one row, so a result specialized to batch 1 shows
BATCH_SAMPLE = 2
# the size tried next when the model cannot run on the default (a signal reflect-padded by more)
RETRY_DYNAMIC_DIM = 512
# what generated inputs the original cannot run are made again with, in turn (keyword
# arguments of ``generate_inputs``): free dynamic dims ``RETRY_DYNAMIC_DIM`` long, then also
# 1 on the axes between the first and the last (a recurrent state's batch axis, as in
# [layers, batch, hidden], that no dim name ties to the signal's batch)
RETRY_SIZES: tuple[dict[str, int], ...] = (
    {"dynamic_dim": RETRY_DYNAMIC_DIM},
    {"dynamic_dim": RETRY_DYNAMIC_DIM, "interior_dim": 1},
)
# the largest relative change ``varied_defaults`` makes to an element of a float default
DEFAULT_VARIATION = 0.1
# float operands that size a tensor, by op: Resize's scales (input 1 up to opset 10, then its
# roi, kept too), Upsample's scales, Range's operands
_SIZE_OPERANDS = {"Resize": (1, 2), "Upsample": (1,), "Range": (0, 1, 2)}
_SIZE_PASSTHROUGH = frozenset({"Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Concat", "Mul", "Div"})
_DEFAULTS_STREAM = 1  # ``varied_defaults``' generator: seeded by (seed, this), apart from the inputs'
DEFAULT_PAST_LENGTH = 16  # KV-cache length of a generated decoder step
AUDIO_MIN_SAMPLES = 8000  # a static signal axis at least this long makes a float input waveform-like
DEFAULT_SAMPLE_RATE = 16000
_SAMPLE_RATE_NAMES = frozenset({"sr", "sample_rate", "sampling_rate"})
# integer dtypes a waveform is sampled in (16-bit PCM; ``optcc.numerics.task.SIGNAL_INTEGERS``)
_PCM = frozenset({ir.DataType.INT16, ir.DataType.UINT16})
_PIXEL_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA: the channels of a picture fed as uint8
# ops whose output elements are their first input's (a Gather's: of its data)
_INDEX_PASSTHROUGH = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand", "Gather"})
_INDEXING = frozenset({"Gather", "GatherElements", "GatherND", "ScatterElements", "ScatterND"})  # indices at input 1
_MASK_PASSTHROUGH = frozenset({"Unsqueeze", "Reshape", "Expand", "Squeeze", "Identity"})
_POSITION_PASSTHROUGH = frozenset({"Unsqueeze", "Reshape", "Expand", "Squeeze", "Identity", "Transpose"})
_ANGLE_OPS = frozenset({"Mul", "MatMul", "Div", "Concat"})  # position * inv_freq, cat(freqs, freqs)
_TABLE_CHECK_LIMIT = 1 << 22  # elements: cos/sin caches are (max_positions, head_size); larger ones go unread
_PAST_NAME = re.compile(r"^past[._]", re.IGNORECASE)  # past_key_values.0.key, past_0, past.1

Range = tuple[float, float]


# --------------------------------------------------------------------------- dims


def _is_static(dim: object) -> bool:
    """A known size; legacy negative ``dim_value`` (e.g. -1) means dynamic."""
    return isinstance(dim, int) and dim >= 0


def _symbol(dim: object) -> str | None:
    """The name of a symbolic dimension (None for static, unknown or negative ones)."""
    if isinstance(dim, ir.SymbolicDim) and dim.value:
        return dim.value
    return None


def _shape_text(shape: ir.Shape) -> str:
    return "[" + ",".join(
        str(d) if _is_static(d) else (_symbol(d) or "?") for d in shape
    ) + "]"


def _consumer_size(value: ir.Value, axis: int) -> int | None:
    """The size a direct consumer implies for ``axis`` of ``value`` (None when none does)."""
    rank = value.shape.rank() if value.shape is not None else None
    for use in value.uses():
        node, idx = use.node, use.idx
        if idx != 0 or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        other = node.inputs[1].shape
        if other is None or other.rank() == 0:
            continue
        if node.op_type in ("Conv", "ConvInteger") and axis == 1 and other.rank() >= 2:
            group = node.attributes.get_int("group", 1)
            if _is_static(other[1]):
                return int(other[1]) * group
        elif node.op_type == "MatMul" and rank is not None and axis == rank - 1 and other.rank() >= 2:
            if _is_static(other[-2]):
                return int(other[-2])
        elif node.op_type == "Gemm" and rank == 2 and other.rank() == 2:
            trans_a = node.attributes.get_int("transA", 0)
            trans_b = node.attributes.get_int("transB", 0)
            if axis == (0 if trans_a else 1) and _is_static(other[1 if trans_b else 0]):
                return int(other[1 if trans_b else 0])
    return None


def _dim_sizes(
    inputs: Sequence[ir.Value],
    shapes: Mapping[str, Sequence[int]],
    axis_sizes: Mapping[tuple[str, int], int] | None = None,
    dynamic_dim: int = DEFAULT_DYNAMIC_DIM,
    interior_dim: int | None = None,
    batch: int = 1,
) -> dict[str, tuple[int, ...]]:
    """The concrete shape of every input: given shapes first (their symbols recorded),
    then ``axis_sizes`` overrides, then static dims, shared symbols, consumer-implied
    sizes and the defaults (``batch`` for the first axis of an input of rank 2 or more, 1
    for that of a rank-1 input, ``interior_dim`` when given for an axis before the last,
    else ``dynamic_dim``)."""
    axis_sizes = axis_sizes or {}
    symbols: dict[str, int] = {}
    result: dict[str, tuple[int, ...]] = {}
    for value in inputs:
        if value.name in shapes:
            result[value.name] = tuple(int(d) for d in shapes[value.name])
            if value.shape is not None:
                for dim, size in zip(value.shape, result[value.name]):
                    if _symbol(dim):
                        symbols.setdefault(_symbol(dim), size)
    for value in inputs:
        if value.name in result or value.shape is None:
            continue
        for axis, dim in enumerate(value.shape):
            if (value.name, axis) in axis_sizes and _symbol(dim):
                symbols.setdefault(_symbol(dim), axis_sizes[(value.name, axis)])
    for value in inputs:
        if value.name in result:
            continue
        if value.shape is None:
            raise BadInputError(
                f"input '{value.name}' has no shape; give one with --input-shape {value.name}:D1,D2,..."
            )
        dims = []
        for axis, dim in enumerate(value.shape):
            name = _symbol(dim)
            if _is_static(dim):
                size = int(dim)
            elif (value.name, axis) in axis_sizes:
                size = axis_sizes[(value.name, axis)]
            elif name and name in symbols:
                size = symbols[name]
            else:
                size = _consumer_size(value, axis) or _default_size(axis, len(value.shape), dynamic_dim,
                                                                    interior_dim, batch)
                if name:
                    symbols[name] = size
            dims.append(size)
        result[value.name] = tuple(dims)
    return result


def _default_size(axis: int, rank: int, dynamic_dim: int, interior_dim: int | None, batch: int) -> int:
    if axis == 0:
        return batch if rank >= 2 else 1
    return interior_dim if interior_dim is not None and axis < rank - 1 else dynamic_dim


def sizes_text(sizes: Mapping[str, int]) -> str:
    """``generate_inputs``' size arguments in words (``RETRY_SIZES``' entries)."""
    text = f"free dynamic dims {sizes.get('dynamic_dim', DEFAULT_DYNAMIC_DIM)} long"
    if sizes.get("interior_dim") is not None:
        text += f", {sizes['interior_dim']} on the axes between the first and the last"
    return text


# --------------------------------------------------------------------------- roles


def _index_bound(value: ir.Value, symbols: Mapping[str, int] | None = None) -> int | None:
    """For an integer input used as indices (``_index_bounds``), the number of rows it may
    index: the smallest bound over its uses, a dynamic dim's taken from ``symbols`` (the
    sizes the sample gives the graph inputs' symbolic dims); None when no bound is known."""
    bounds = [n if symbol is None else symbols[symbol] + n for symbol, n in _index_bounds(value)
              if symbol is None or (symbols is not None and symbol in symbols)]
    bounds = [b for b in bounds if b > 0]
    return min(bounds) if bounds else None


def _index_bounds(value: ir.Value, depth: int = 0) -> list[tuple[str | None, int]]:
    """The bounds on the values of an integer input used as indices, each ``(None, n)``
    (a static dim ``n``) or ``(symbol, n)`` (the size of the symbolic dim ``symbol`` plus
    ``n``): per use, the dim of the axis it indexes (Gather, GatherElements, ScatterElements:
    the data's dim at the node's axis; GatherND, ScatterND: each axis an index tuple
    addresses), directly or through ops whose output elements are the input's
    (``_INDEX_PASSTHROUGH``; a Gather's data), or an Add of a constant (the bound less its
    largest element). A dim that is neither static nor a symbol gives no bound."""
    if depth > 6:
        return []
    bounds: list[tuple[str | None, int]] = []
    for use in value.uses():
        node, idx = use.node, use.idx
        table = _rotary_position_input(node, idx)
        if table is not None:  # position ids select rows of the (max_position, rotary_dim / 2) caches
            cache = node.inputs[table] if len(node.inputs) > table else None
            if cache is not None and cache.shape is not None and cache.shape.rank() == 2 and _is_static(cache.shape[0]):
                bounds.append((None, int(cache.shape[0])))
            continue
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in _INDEXING and idx == 1:
            data = node.inputs[0]
            if data is None or data.shape is None or data.shape.rank() == 0:
                continue
            if node.op_type in ("GatherND", "ScatterND"):  # index k of a tuple addresses axis k: all must fit
                tuples = node.inputs[1].shape
                width = tuples[-1] if tuples is not None and tuples.rank() >= 1 else None
                dims = list(data.shape)[:int(width)] if _is_static(width) and node.attributes.get_int(
                    "batch_dims", 0) == 0 else list(data.shape)
            else:
                dims = [data.shape[node.attributes.get_int("axis", 0) % data.shape.rank()]]
            bounds.extend((None, int(d)) if _is_static(d) else (_symbol(d), 0) for d in dims
                          if _is_static(d) or _symbol(d) is not None)
        elif node.op_type in _INDEX_PASSTHROUGH and idx == 0:
            if node.op_type == "Cast" and not ir.DataType(node.attributes.get_int("to", 0)).is_integer():
                continue
            for out in node.outputs:
                bounds.extend(_index_bounds(out, depth + 1))
        elif node.op_type == "Add" and len(node.inputs) == 2:
            other = node.inputs[1 - idx]
            offset = _constant(other)
            if offset is None or offset.size == 0:
                continue
            bounds.extend((symbol, n - int(np.max(offset))) for symbol, n in _index_bounds(node.outputs[0], depth + 1))
    return bounds


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        node = value.producer()
        if node is not None and node.op_type == "Constant" and "value" in node.attributes:
            tensor = node.attributes["value"].value
    if tensor is None:
        return None
    try:
        return np.asarray(tensor.numpy())
    except Exception:  # noqa: BLE001 - an unreadable constant is no evidence
        return None


def _used_as_mask(value: ir.Value, cast_seen: bool = False, depth: int = 0) -> bool:
    """Whether the value reaches a Where condition, a Mul or a Sub through a Cast to
    bool/float (shape-only ops allowed on the way): how exporters apply attention masks."""
    if depth > 5:
        return False
    for use in value.uses():
        node, idx = use.node, use.idx
        if node.domain not in ("", "ai.onnx"):
            continue
        if cast_seen and ((node.op_type == "Where" and idx == 0) or node.op_type in ("Mul", "Sub")):
            return True
        if node.op_type == "Cast":
            to = ir.DataType(node.attributes.get_int("to", 0))
            if to == ir.DataType.BOOL or to.is_floating_point():
                if _used_as_mask(node.outputs[0], True, depth + 1):
                    return True
        elif node.op_type in _MASK_PASSTHROUGH and idx == 0:
            if _used_as_mask(node.outputs[0], cast_seen, depth + 1):
                return True
    return False


def _rotary_position_input(node: ir.Node, idx: int) -> int | None:
    """For ``node`` a RotaryEmbedding whose input ``idx`` is its position ids, the index
    of its cos table (whose rows the positions select); else None."""
    if node.op_type != "RotaryEmbedding":
        return None
    if node.domain in ("", "ai.onnx") and idx == 3:  # X, cos_cache, sin_cache, position_ids
        return 1
    if node.domain == "com.microsoft" and idx == 1:  # input, position_ids, cos_cache, sin_cache
        return 2
    return None


def _gathers_rotary_tables(value: ir.Value) -> bool:
    """Whether ``value`` indexes (Gather, axis 0) two constant tables of one shape that are
    a cos and a sin cache: ``cos**2 + sin**2`` the same positive constant everywhere
    (``attention_scaling**2``), which no embedding table pair satisfies by chance."""
    by_shape: dict[tuple[int, int], list[ir.Value]] = {}
    for use in value.uses():
        node = use.node
        if (node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or use.idx != 1
                or node.attributes.get_int("axis", 0) != 0):
            continue
        data = node.inputs[0]
        shape = data.shape if data is not None else None
        if shape is None or shape.rank() != 2 or not all(_is_static(d) for d in shape):
            continue
        rows, cols = int(shape[0]), int(shape[1])
        if 0 < rows * cols <= _TABLE_CHECK_LIMIT and data.dtype is not None and data.dtype.is_floating_point():
            by_shape.setdefault((rows, cols), []).append(data)
    for candidates in by_shape.values():  # only tables that have a partner of their shape are read
        tables = [t.astype(np.float64) for v in candidates if len(candidates) > 1 and (t := _constant(v)) is not None]
        for i, first in enumerate(tables):
            for second in tables[i + 1:]:
                norm = first * first + second * second
                if norm.flat[0] > 0 and np.allclose(norm, norm.flat[0], rtol=1e-3, atol=0):
                    return True
    return False


def _used_as_position(value: ir.Value, cast_seen: bool = False, depth: int = 0,
                      seen: set[tuple[int, bool]] | None = None) -> bool:
    """Whether the integer value holds positions, by the graph: it is a RotaryEmbedding's
    position ids, it indexes a cos and a sin cache (``_gathers_rotary_tables``), or, cast
    to float, it reaches a Cos or Sin (the rotary angle ``position * inv_freq``) through
    shape ops, Mul/MatMul/Div and Concat. Each (value, cast seen) is visited once."""
    seen = set() if seen is None else seen
    if depth > 8 or (id(value), cast_seen) in seen:
        return False
    seen.add((id(value), cast_seen))
    if not cast_seen and _gathers_rotary_tables(value):
        return True
    for use in value.uses():
        node, idx = use.node, use.idx
        if not cast_seen and _rotary_position_input(node, idx) is not None:
            return True
        if node.domain not in ("", "ai.onnx"):
            continue
        if cast_seen and node.op_type in ("Cos", "Sin"):
            return True
        if node.op_type == "Cast":
            to = ir.DataType(node.attributes.get_int("to", 0))
            if (to.is_floating_point() or to.is_integer()) and _used_as_position(
                    node.outputs[0], cast_seen or to.is_floating_point(), depth + 1, seen):
                return True
        elif node.op_type in _POSITION_PASSTHROUGH or (cast_seen and node.op_type in _ANGLE_OPS):
            if any(_used_as_position(out, cast_seen, depth + 1, seen) for out in node.outputs):
                return True
    return False


def _is_kv_decoder(model: ir.Model) -> bool:
    pasts = [v for v in model.graph.inputs if _PAST_NAME.match(v.name or "")]
    presents = [v for v in model.graph.outputs if "present" in (v.name or "").lower()]
    return bool(pasts and presents)


def input_roles(model: ir.Model) -> dict[str, str]:
    """What each fed graph input is taken to be: ``mask``, ``position``, ``index``,
    ``past``, ``state``, ``sample_rate``, ``image``, ``audio`` or ``plain`` (see the module
    docstring)."""
    kv = _is_kv_decoder(model)
    states = set(state_pairs(model))
    fed = _fed_inputs(model)
    symbols = {_symbol(d) for v in fed if v.shape is not None for d in v.shape} - {None}
    roles = {}
    for value in fed:
        roles[value.name] = _role(value, kv, value.name in states, symbols)
    return roles


def _role(value: ir.Value, kv: bool, state: bool = False, symbols: Collection[str | None] = ()) -> str:
    dtype, name = value.dtype, (value.name or "").lower()
    rank = value.shape.rank() if value.shape is not None else None
    if dtype is None:
        return "plain"
    if kv and _PAST_NAME.match(value.name or ""):
        return "past"
    if state:  # a streaming model's own output fed back (``optcc.numerics.state``)
        return "state"
    if dtype.is_integer() and rank == 0 and name in _SAMPLE_RATE_NAMES:
        return "sample_rate"
    numeric_or_bool = dtype == ir.DataType.BOOL or dtype.is_integer() or dtype.is_floating_point()
    if numeric_or_bool and "mask" in name:
        return "mask"
    # rotary positions reach a Mul after a Cast to float too: the graph's evidence of
    # positions (an angle or a rotary op's position ids) goes before the mask guess by use
    if dtype.is_integer() and _used_as_position(value):
        return "position"
    # a 16-bit waveform is cast to float and scaled, as a mask is applied: its dtype and
    # shape go before the mask guess by use
    if dtype in _PCM and _signal_axis(value) is not None and _index_bound(value) is None:
        return "audio"
    # 8-bit pixels are cast to float and scaled, as a mask is applied: a picture's dtype
    # and shape go before the mask guess by use
    if dtype == ir.DataType.UINT8 and _channel_axis(value, _PIXEL_CHANNELS) is not None:
        return "image"
    # by use only from rank 2 on: a (batch, length) mask or wider, not a cast scalar
    if numeric_or_bool and not dtype.is_floating_point() and (rank or 0) >= 2 and _used_as_mask(value):
        return "mask"
    if dtype.is_integer():
        if "position" in name:
            return "position"
        if _index_bound(value) is not None or any(symbol in symbols for symbol, _ in _index_bounds(value)):
            return "index"  # a table of static rows, or of a dim a graph input's symbol sizes
    if dtype.is_floating_point() and _channel_axis(value, (1, 3)) is not None:
        return "image"
    if dtype.is_floating_point() and _signal_axis(value) is not None:
        return "audio"
    return "plain"


def _channel_axis(value: ir.Value, channels: Collection[int]) -> int | None:
    """Axis 1 or 3 of a rank-4 input when its static size is one of ``channels``."""
    if value.shape is None or value.shape.rank() != 4:
        return None
    return next((a for a in (1, 3) if _is_static(value.shape[a]) and int(value.shape[a]) in channels), None)


def _signal_axis(value: ir.Value, sizes: Sequence[int] | None = None) -> int | None:
    """The axis of a waveform-like input's samples: ``[batch, T]``, ``[batch, T, 1]`` or
    ``[batch, 1, T]`` with a static ``T >= AUDIO_MIN_SAMPLES`` (a 16-bit integer input,
    ``_PCM``: any ``T`` other than 1, dynamic too), not read by a MatMul or Gemm (a feature
    vector); else None. ``sizes``, the sizes the input is generated with, stand for its
    dims where given, so a dynamic ``T`` sized that long counts too."""
    shape = value.shape
    if shape is None or shape.rank() not in (2, 3):
        return None
    if any(use.node.op_type in ("MatMul", "Gemm") for use in value.uses()):
        return None
    static = [int(d) if _is_static(d) else None for d in shape]
    if sizes is not None and len(sizes) == len(static):
        static = [int(n) for n in sizes]
    if value.dtype in _PCM:  # a sampled signal however long: the one axis after the first that is not 1
        long_axes = [a for a in range(1, len(static)) if static[a] != 1]
    else:
        long_axes = [a for a in range(1, len(static)) if (static[a] or 0) >= AUDIO_MIN_SAMPLES]
    if len(long_axes) != 1 or any(static[a] != 1 for a in range(1, len(static)) if a != long_axes[0]):
        return None
    return long_axes[0]


def _fed_inputs(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if not v.is_initializer()]


# --------------------------------------------------------------------------- generation


def generate_inputs(
    model: ir.Model,
    shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    samples: int = 1,
    seed: int = 0,
    ranges: Mapping[str, Range] | None = None,
    decode_steps: int = DECODE_STEPS,
    dynamic_dim: int = DEFAULT_DYNAMIC_DIM,
    interior_dim: int | None = None,
    last_batch: int = 1,
    last_dynamic_dim: int | None = None,
    past_length: int = DEFAULT_PAST_LENGTH,
) -> list[dict[str, np.ndarray]]:
    """``samples`` feed dicts that fit the model's graph inputs (see the module docstring
    for the sizes and values chosen). ``shapes`` sizes inputs by name; ``ranges`` gives
    ``(lo, hi)`` value ranges by name; a KV-cache decoder's positions leave room for a
    decode of ``decode_steps`` steps; ``dynamic_dim`` sizes the dynamic dims that nothing
    else sizes, past the first axis (``interior_dim``, when given, those before the last
    axis); ``last_batch`` sizes the batch axes that nothing else sizes in the last sample
    (1 in the others), whose other free dims it then divides (``last_dynamic_dim``, when
    given, sizes those instead). The samples before the last do not depend on
    ``last_batch`` or ``last_dynamic_dim``. ``past_length``: a KV-cache decoder's past
    length where ``shapes`` gives none (0: a prompt from an empty cache). Raises BadInputError for a name that is not a
    graph input, an empty range, an input whose shape or dtype cannot be generated, or a
    given past length that does not fit the position table."""
    shapes = dict(shapes or {})
    ranges = dict(ranges or {})
    fed = _fed_inputs(model)
    _check_names(fed, shapes, ranges)
    check_ranges(model, ranges)
    roles = input_roles(model)
    sizes = _sizes(model, fed, shapes, roles, max(0, decode_steps - 1), dynamic_dim, interior_dim,
                   past_length=past_length)
    last_sizes = sizes
    # a batch to size: the other free dims shrink by as much
    if last_batch != 1 and _sizes(model, fed, shapes, roles, max(0, decode_steps - 1), dynamic_dim, interior_dim,
                                  last_batch, past_length) != sizes:
        last_dim = max(1, dynamic_dim // last_batch) if last_dynamic_dim is None else last_dynamic_dim
        last_sizes = _sizes(model, fed, shapes, roles, max(0, decode_steps - 1), last_dim, interior_dim, last_batch,
                            past_length)
    for value in fed:  # a waveform whose length is dynamic in the model but given in ``shapes``
        if roles[value.name] == "plain" and value.name in shapes and value.dtype is not None \
                and value.dtype.is_floating_point() and _signal_axis(value, sizes[value.name]) is not None:
            roles[value.name] = "audio"
    past = _past_length(fed, sizes, roles)
    kv = any(role == "past" for role in roles.values())
    rng = np.random.default_rng(seed)
    feeds_list = []
    for index in range(samples):
        feeds = {}
        shapes_now = last_sizes if index == samples - 1 else sizes
        symbols = {_symbol(d): n for v in fed if v.shape is not None and v.shape.rank() == len(shapes_now[v.name])
                   for d, n in zip(v.shape, shapes_now[v.name]) if _symbol(d) is not None}
        for value in fed:
            shape = shapes_now[value.name]
            if value.name in ranges:
                feeds[value.name] = _in_range(value, shape, _range(value.name, ranges[value.name]), rng)
            else:
                feeds[value.name] = _random_array(value, shape, roles[value.name], past, kv, rng, symbols)
        feeds_list.append(feeds)
    return feeds_list


def decode_room(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> int | None:
    """How many steps of a decode from ``feeds`` (each one position further) keep every
    position within the table its position ids index, the first step included; None when
    no position input fed in ``feeds`` indexes a table of known size."""
    roles = input_roles(model)
    rooms = [bound - int(np.max(feeds[v.name])) for v in _fed_inputs(model)
             if roles[v.name] == "position" and v.name in feeds and np.size(feeds[v.name])
             and (bound := _index_bound(v)) is not None]
    return min(rooms) if rooms else None


def variable_defaults(model: ir.Model) -> list[ir.Value]:
    """The graph inputs whose default ``varied_defaults`` varies: float defaults a caller
    may replace that size no tensor, in graph order."""
    return [v for v in oir.overridable_inputs(model)
            if v.const_value is not None and v.const_value.dtype.is_floating_point() and not _read_as_size(v)]


def varied_defaults(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    """Per float graph input with a default a caller may replace, in graph order, values
    that differ from that default at its own scale and dtype (module docstring); empty
    when the model has none (below IR 4 there are none)."""
    rng = np.random.default_rng((seed, _DEFAULTS_STREAM))
    varied: dict[str, np.ndarray] = {}
    for value in variable_defaults(model):
        default = np.asarray(value.const_value.numpy())
        x = default.astype(np.float64)
        finite = np.isfinite(x)
        u = rng.uniform(-1.0, 1.0, x.shape)
        spanned = x[finite]
        rms = float(np.sqrt(np.mean(np.square(spanned)))) if spanned.size else 0.0
        moved = np.where(x == 0, DEFAULT_VARIATION * u * (rms or 1.0), x * (1.0 + DEFAULT_VARIATION * u))
        if rms:  # within the range the default spans, 0 included
            moved = np.clip(moved, min(spanned.min(), 0.0), max(spanned.max(), 0.0))
        varied[value.name] = np.where(finite, moved, x).astype(default.dtype)
    return varied


def _read_as_size(value: ir.Value, depth: int = 0) -> bool:
    """Whether a float value sizes a tensor (``_SIZE_OPERANDS``), directly or through
    ``_SIZE_PASSTHROUGH`` ops."""
    if depth > 6:
        return False
    for use in value.uses():
        node = use.node
        if node.domain not in ("", "ai.onnx"):
            continue
        if use.idx in _SIZE_OPERANDS.get(node.op_type, ()):
            return True
        to = node.attributes.get("to") if node.op_type == "Cast" else None
        if to is not None and not ir.DataType(to.value).is_floating_point():  # a count, index or shape
            return True
        if node.op_type in _SIZE_PASSTHROUGH and any(_read_as_size(out, depth + 1) for out in node.outputs):
            return True
    return False


def _check_names(
    fed: list[ir.Value], shapes: Mapping[str, Sequence[int]], ranges: Mapping[str, Range]
) -> None:
    by_name = {v.name: v for v in fed}
    for label, given in (("--input-shape", shapes), ("--input-range", ranges)):
        unknown = sorted(set(given) - set(by_name))
        if unknown:
            raise BadInputError(
                f"{label} names {unknown}, which {'is' if len(unknown) == 1 else 'are'} not a "
                f"graph input; the inputs are {sorted(by_name)}"
            )
    for name, dims in shapes.items():
        shape = by_name[name].shape
        if shape is not None and len(dims) != shape.rank():
            raise BadInputError(
                f"--input-shape {name}: {len(dims)} sizes given, the input has rank "
                f"{shape.rank()} {_shape_text(shape)}"
            )


def check_ranges(model: ir.Model, ranges: Mapping[str, Range]) -> None:
    """Each ``(lo, hi)`` of ``ranges`` names a graph input and is a range values can be
    drawn from for that input's dtype: finite, ``lo <= hi``, a width ``hi - lo`` that is a
    finite float64 (what the uniform draw computes), and both bounds within the dtype's
    limits; else BadInputError naming the input and the bound."""
    fed = _fed_inputs(model)
    _check_names(fed, {}, ranges)
    by_name = {v.name: v for v in fed}
    for name, bounds in ranges.items():
        lo, hi = _range(name, bounds)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise BadInputError(f"--input-range {name}: low and high must be finite numbers, got {lo:g}, {hi:g}")
        if not lo <= hi:
            raise BadInputError(f"--input-range {name}: low {lo:g} is above high {hi:g}")
        if not np.isfinite(hi - lo):
            raise BadInputError(f"--input-range {name}: the width high - low exceeds the largest float64 "
                                f"({np.finfo(np.float64).max:.4g}); give a narrower range")
        dtype = by_name[name].dtype
        if dtype is None or dtype == ir.DataType.BOOL or not (dtype.is_integer() or dtype.is_floating_point()):
            continue  # no dtype limit to hold (an input that cannot be generated is refused when drawn)
        if dtype.is_integer():
            limits = ml_iinfo(dtype.numpy())
            low, high = int(limits.min), int(limits.max)
        else:
            high = float(ml_finfo(dtype.numpy()).max)
            low = -high
        if lo < low or hi > high:
            raise BadInputError(f"--input-range {name}: range [{lo:g}, {hi:g}] exceeds {np.dtype(dtype.numpy()).name} "
                                f"(values from {low:g} to {high:g})")


def _range(name: str, bounds: object) -> tuple[float, float]:
    try:
        lo, hi = bounds  # type: ignore[misc]
        return float(lo), float(hi)
    except (TypeError, ValueError, OverflowError):  # an int beyond float64 overflows
        raise BadInputError(f"--input-range {name}: give two numbers, low and high") from None


def _sizes(
    model: ir.Model, fed: list[ir.Value], shapes: Mapping[str, Sequence[int]], roles: Mapping[str, str],
    more_steps: int = 0, dynamic_dim: int = DEFAULT_DYNAMIC_DIM, interior_dim: int | None = None,
    batch: int = 1, past_length: int = DEFAULT_PAST_LENGTH,
) -> dict[str, tuple[int, ...]]:
    """Input shapes, with KV-cache lengths made consistent and the positions of the step
    and of ``more_steps`` one-token steps after it kept within the position table."""
    sizes = _dim_sizes(fed, shapes, dynamic_dim=dynamic_dim, interior_dim=interior_dim, batch=batch)
    positions = [v for v in fed if roles[v.name] == "position"]
    pasts = [v for v in fed if roles[v.name] == "past"]
    table = min((b for v in positions if (b := _index_bound(v)) is not None), default=None)
    if not pasts and table is None:
        return sizes
    current = _current_length(fed, sizes, roles)
    past_given = any(v.name in shapes for v in pasts) or any(
        v.shape is not None and _past_axis(v) is None and v.shape.rank() >= 3 for v in pasts)
    past = _given_past_length(pasts, shapes, sizes, past_length) if pasts else 0
    room = more_steps if pasts else 0  # only a KV-cache decoder is decoded
    if table is not None and past + current + room > table:
        current_given = any(v.name in shapes for v in fed if roles[v.name] in ("index", "position"))
        if not current_given:
            current = max(1, min(current, table - past - room))
        if not past_given:
            past = max(0, min(past, table - current - room))
        if past + current > table:
            lengths = f"a past length of {past} and {current} current tokens" if pasts else f"{current} tokens"
            raise BadInputError(
                f"{lengths} reach position {past + current - 1}, beyond the position table of "
                f"{table} rows; give shorter lengths with --input-shape"
            )
    overrides: dict[tuple[str, int], int] = {}
    for value in pasts:
        axis = _past_axis(value)
        if axis is not None and value.name not in shapes:
            overrides[(value.name, axis)] = past
    for value in fed:
        if value.name in shapes or value.shape is None or value.shape.rank() == 0:
            continue
        last = value.shape.rank() - 1
        if _is_static(value.shape[last]):
            continue
        role = roles[value.name]
        if role == "mask" and value.shape.rank() == 2:
            overrides[(value.name, last)] = past + current
        elif role in ("position", "index") and value.shape.rank() >= 2:
            overrides[(value.name, last)] = current
    return _dim_sizes(fed, shapes, overrides, dynamic_dim, interior_dim, batch)


def _current_length(
    fed: list[ir.Value], sizes: Mapping[str, tuple[int, ...]], roles: Mapping[str, str]
) -> int:
    """The current sequence length: the last axis of the token ids (else of the position
    ids), 1 when there are neither."""
    for role in ("index", "position"):
        for value in fed:
            if roles[value.name] == role and len(sizes[value.name]) >= 1:
                return sizes[value.name][-1]
    return 1


def _past_axis(value: ir.Value) -> int | None:
    """The sequence axis of a past key/value: its last dynamic axis before the head size."""
    if value.shape is None:
        return None
    dynamic = [a for a, d in enumerate(value.shape) if a > 0 and not _is_static(d)]
    if not dynamic:
        return None
    rank = value.shape.rank()
    inner = [a for a in dynamic if a < rank - 1]
    return inner[-1] if inner else dynamic[-1]


def _given_past_length(pasts: list[ir.Value], shapes: Mapping[str, Sequence[int]], sizes,
                       default: int = DEFAULT_PAST_LENGTH) -> int:
    for value in pasts:
        axis = _past_axis(value)
        if value.name in shapes and axis is not None:
            return int(shapes[value.name][axis])
    for value in pasts:  # a static past length
        if value.shape is not None and _past_axis(value) is None and value.shape.rank() >= 3:
            return int(sizes[value.name][-2])
    return default


def _past_length(fed: list[ir.Value], sizes: Mapping[str, tuple[int, ...]], roles: Mapping[str, str]) -> int:
    for value in fed:
        if roles[value.name] == "past":
            axis = _past_axis(value)
            shape = sizes[value.name]
            return shape[axis] if axis is not None else (shape[-2] if len(shape) >= 2 else 0)
    return 0


def _in_range(value: ir.Value, shape: tuple[int, ...], bounds: tuple[float, float], rng) -> np.ndarray:
    dtype = _dtype(value)
    lo, hi = bounds
    if dtype == ir.DataType.BOOL:
        return rng.integers(int(lo != 0), int(hi != 0) + 1, shape).astype(bool)
    if dtype.is_integer():
        return rng.integers(int(np.ceil(lo)), int(np.floor(hi)) + 1, shape).astype(dtype.numpy())
    return np.asarray(rng.uniform(lo, hi, shape)).astype(dtype.numpy())


class UngeneratedInputError(BadInputError):
    """A graph input no sample can be generated for (not a tensor, or a dtype such as
    string): only the user's samples can feed it."""


def _dtype(value: ir.Value) -> ir.DataType:
    dtype = value.dtype
    if dtype is None:
        raise UngeneratedInputError(f"input '{value.name}' is not a tensor; pass inputs explicitly")
    if not (dtype.is_floating_point() or dtype.is_integer() or dtype == ir.DataType.BOOL):
        raise UngeneratedInputError(
            f"input '{value.name}' has dtype {dtype.name}, which optcc cannot generate; "
            "pass inputs explicitly" + (" (--inputs: an .npz with a NumPy str array for it)"
                                         if dtype == ir.DataType.STRING else "")
        )
    return dtype


def _random_array(
    value: ir.Value, shape: tuple[int, ...], role: str, past: int, kv: bool, rng: np.random.Generator,
    symbols: Mapping[str, int] | None = None,
) -> np.ndarray:
    dtype = _dtype(value)
    np_dtype = dtype.numpy()
    if role == "mask":  # a decoder's current tokens sit at the end of its mask: no padding
        return _mask(shape, all_ones=kv, rng=rng).astype(np_dtype)
    if role == "position":
        positions = past + np.arange(shape[-1] if shape else 1)
        bound = _index_bound(value)
        if bound is not None:
            positions = np.minimum(positions, bound - 1)
        if not shape:
            return np.asarray(positions[0], dtype=np_dtype)
        return np.broadcast_to(positions, shape).astype(np_dtype)
    if role == "sample_rate":
        return np.asarray(DEFAULT_SAMPLE_RATE, dtype=np_dtype)
    if role == "state":  # a stream's first chunk: the state its caller starts from
        return np.zeros(shape, dtype=np_dtype)
    if dtype == ir.DataType.BOOL:
        return rng.integers(0, 2, shape).astype(bool)
    if role == "audio":
        axis = _signal_axis(value, shape)
        assert axis is not None
        speech = np.moveaxis(_speech(shape[:axis] + shape[axis + 1:] + (shape[axis],), rng), -1, axis)
        if dtype.is_integer():  # PCM: the signal around the dtype's middle, its peak half the way to its limit
            info = np.iinfo(np_dtype)
            middle = (int(info.min) + int(info.max) + 1) // 2
            return np.round(middle + speech * (int(info.max) - middle)).astype(np_dtype)
        return speech.astype(np_dtype)
    if role == "image" and dtype.is_integer():  # 8-bit pixels: the same picture in grey levels
        return np.round((_image(shape, rng) + 1.0) * 127.5).astype(np_dtype)
    if role == "image":
        return _image(shape, rng).astype(np_dtype)
    if dtype.is_integer():
        high = _index_bound(value, symbols) if role == "index" else None
        return rng.integers(0, high or 4, shape).astype(np_dtype)
    return np.asarray(rng.standard_normal(shape)).astype(np_dtype)


def _mask(shape: tuple[int, ...], *, all_ones: bool, rng: np.random.Generator) -> np.ndarray:
    """0/1 with a leading run of ones of at least half of each row (last axis)."""
    if not shape or all_ones or shape[-1] == 0:
        return np.ones(shape, dtype=np.int64)
    length = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    valid = rng.integers(max(1, (length + 1) // 2), length + 1, rows)
    mask = (np.arange(length)[None, :] < valid[:, None]).astype(np.int64)
    return mask.reshape(shape)


def _image(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A smooth random image in [-1, 1]: coarse uniform values repeated over blocks of
    up to 8x8 pixels, plus a little fine noise."""
    channels_last = shape[1] not in (1, 3) and shape[3] in _PIXEL_CHANNELS
    n, c, h, w = (shape[0], shape[3], shape[1], shape[2]) if channels_last else shape
    block = 8
    coarse = rng.uniform(0.0, 1.0, (n, c, -(-h // block) if h else 0, -(-w // block) if w else 0))
    image = np.repeat(np.repeat(coarse, block, axis=2), block, axis=3)[:, :, :h, :w]
    image = np.clip(image + rng.normal(0.0, 0.05, image.shape), 0.0, 1.0) * 2.0 - 1.0
    return image.transpose(0, 2, 3, 1) if channels_last else image


def _speech(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Speech-like signals along the last axis, peak 0.5: 1 to 29 harmonics of a pitch
    gliding around 0.6-1.5% of the sample rate (100-240 Hz at 16 kHz), weighted by a
    formant bump, under a syllable envelope (a half-wave sine, 0 between syllables), plus
    a noise floor 60 dB down."""
    length = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    t = np.arange(length, dtype=np.float64)
    out = np.empty((rows, length))
    for row in range(rows):
        f0 = rng.uniform(0.006, 0.015) * (1 + 0.2 * np.sin(2 * np.pi * t / rng.uniform(4000, 16000) + rng.uniform(0, 6)))
        phase = 2 * np.pi * np.cumsum(f0)
        formant = rng.uniform(0.02, 0.06)
        voiced = sum(np.sin(k * phase) / k * np.exp(-(((k * f0 - formant) / 0.025) ** 2)) for k in range(1, 30))
        envelope = np.clip(np.sin(2 * np.pi * t / rng.uniform(3000, 6000) + rng.uniform(0, 6)), 0, None) ** 0.7
        x = voiced * envelope
        x = x / max(float(np.abs(x).max()), 1e-12) + 1e-3 * rng.standard_normal(length)
        out[row] = 0.5 * x / float(np.abs(x).max())
    return out.reshape(shape)


# --------------------------------------------------------------------------- checks


def check_samples_vary(samples: Sequence[Mapping[str, np.ndarray]], label: str | None = None,
                       source: str = "") -> None:
    """Refuse calibration samples that carry nothing to calibrate on: every float input of
    more than one element holds a single value throughout, in every sample (all-zero
    images, say). Ranges fitted on such samples, and an accuracy judged on them, say
    nothing about real inputs. Samples without such float inputs (token ids) pass.
    ``source``: where the samples came from, said after "calibration data" (e.g. the files)."""
    names: set[str] = set()
    for sample in samples:
        for name, value in sample.items():
            array = np.asarray(value)
            if np.issubdtype(array.dtype, np.floating) and array.size > 1:
                names.add(name)
                if array.max() != array.min():
                    return
    if names:
        listed = ", ".join(f"'{n}'" for n in sorted(names))
        raise BadInputError(f"calibration data{source}: in each of the {len(samples)} sample(s), {listed} holds one value "
                            "throughout (all-zero images?); ranges fitted and accuracy judged on them say nothing "
                            "about real inputs: give real samples", label)


def _kind_text(array: object) -> str:
    return f"dtype {array.dtype}" if isinstance(array, np.ndarray) else type(array).__name__


def check_feeds(model: ir.Model, feeds: Mapping[str, np.ndarray], label: str = "inputs") -> None:
    """Refuse feeds whose names, ranks, static sizes or dtypes do not fit the model's
    graph inputs (dynamic dims, including legacy negative ones, take any size). ``label``
    starts each message (e.g. "calibration sample 3 in calib.npz")."""
    expected = {v.name: v for v in model.graph.inputs}
    missing = sorted(n for n, v in expected.items() if n not in feeds and not v.is_initializer())
    extra = sorted(set(feeds) - set(expected))
    if missing or extra:
        wrong = "; ".join(f"{what} {names}" for what, names in (("missing", missing), ("unexpected", extra)) if names)
        raise BadInputError(f"{label}: names do not match the model's inputs: {wrong}")
    for name, array in feeds.items():
        value = expected[name]
        if isinstance(array, np.generic):
            raise BadInputError(
                f"{label}: '{name}' is a NumPy scalar; pass a 0-d array (np.asarray(value))"
            )
        if value.dtype == ir.DataType.STRING:
            # a text input: a NumPy str or bytes array (as an .npz holds it without pickling;
            # onnxruntime takes both as a string tensor)
            if not isinstance(array, np.ndarray) or array.dtype.kind not in "US":
                raise BadInputError(f"{label}: '{name}' is a string input; give a NumPy str array "
                                    f"(e.g. np.array(texts, dtype=str)), not {_kind_text(array)}")
        elif not isinstance(array, np.ndarray) or array.dtype == object:
            raise BadInputError(f"{label}: '{name}' is not a numeric array")
        elif value.dtype is not None and array.dtype != value.dtype.numpy():
            raise BadInputError(
                f"{label}: '{name}' has dtype {array.dtype}, the model expects "
                f"{value.dtype.numpy()} (convert it: arr.astype('{value.dtype.numpy()}'))"
            )
        if value.shape is not None and (
            array.ndim != value.shape.rank()
            or any(_is_static(d) and int(d) != s for d, s in zip(value.shape, array.shape))
        ):
            raise BadInputError(
                f"{label}: '{name}' has shape {list(array.shape)}, the model expects "
                f"{_shape_text(value.shape)}"
            )
