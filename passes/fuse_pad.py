"""FusePadPass: fold a constant Pad into the padding of the Conv or pool that reads it.

Rewrites (default-domain ops; ``p`` the Pad's spatial pads):

- ``pad-conv``: ``Conv(Pad(x, pads, 0), W, b?)`` becomes ``Conv(x, W, b?, pads=pads_conv + p)``.
- ``pad-averagepool``: ``AveragePool(Pad(x, pads, 0))`` becomes
  ``AveragePool(x, pads=p, count_include_pad=1)``.
- ``pad-maxpool``: ``MaxPool(Pad(x, pads, -inf))`` becomes ``MaxPool(x, pads=pads_pool + p)``.

Preconditions: Pad mode ``constant``; pads and value constant (attributes before
opset 11, inputs from 11, ``axes`` from 18), every pad >= 0, none on the batch and
channel axes; the value 0 for Conv and AveragePool, -inf for MaxPool (MaxPool's own
padding never wins a max, exactly like -inf; a zero pad would change all-negative
windows, so it is refused); the consumer's ``auto_pad`` absent or NOTSET; AveragePool
with ``ceil_mode=0`` and no pads of its own (or already ``count_include_pad=1``), so
every window lies inside the padded input and its divisor is the kernel size either
way; MaxPool's Indices output unused. The Pad's result read only by the consumer (the
driver, ``optcc.rewrite.pattern``, enforces it, and keeps graph outputs).

Numerics ("fusion"): the same products and sums over the same zeros (or the same
maximum); onnxruntime may pick another kernel for a padded convolution, which can sum
in another order, so the rule runs at -O2 where results are verified within 1e-4.
"""

from __future__ import annotations

import numpy as np

from optcc.rewrite import Builder, Match, Op, RewritePass, Rule, Var

__all__ = ["FusePadPass", "RULES"]


def _pad_plan(m: Match, fill: float) -> list[int] | str:
    """The Pad's full begin+end pads (rank entries each), or why the rule is refused."""
    pad, x = m["pad"], m["x"]
    if pad.attributes.get_string("mode", "constant") != "constant":
        return "pad mode is not constant"
    if m.opset >= 11:
        pads = m.array("pads")
        if pads is None:
            return "pads are not constant"
        pads = [int(v) for v in pads.reshape(-1)]
        value = m.get("value")
        if value is not None:
            array = m.array("value")
            if array is None or array.size != 1:
                return "pad value is not a constant scalar"
            constant = float(array.reshape(-1)[0])
        else:
            constant = 0.0
    else:
        attribute = pad.attributes.get("pads" if m.opset >= 2 else "paddings")
        if attribute is None:
            return "pads are not constant"
        pads = [int(v) for v in attribute.as_ints()]
        constant = pad.attributes.get_float("value", 0.0)
    if constant != fill:
        return f"pad value {constant} is not {fill}"
    if len(pads) % 2:
        return "odd number of pads"
    if m.get("axes") is not None:
        axes, rank = m.array("axes"), m.rank(x)
        if axes is None or rank is None:
            return "pad axes unknown"
        full = [0] * (2 * rank)
        count = len(pads) // 2
        for i, axis in enumerate(int(a) % rank for a in axes.reshape(-1)):
            full[axis], full[rank + axis] = pads[i], pads[count + i]
        pads = full
    rank = len(pads) // 2
    if rank < 3:
        return "no spatial axes"
    if any(p < 0 for p in pads):
        return "negative pads (a crop)"
    if pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
        return "pads on the batch or channel axis"
    return pads


def _consumer_pads(node, spatial: int) -> list[int] | str:
    if node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        return "auto_pad is set"
    attribute = node.attributes.get("pads")
    own = [0] * (2 * spatial) if attribute is None else [int(v) for v in attribute.as_ints()]
    return own if len(own) == 2 * spatial else "pads of another rank"


def _merged(m: Match, fill: float) -> list[int] | str:
    pads = _pad_plan(m, fill)
    if isinstance(pads, str):
        return pads
    rank = len(pads) // 2
    spatial = rank - 2
    node = m.root
    if node.op_type == "AveragePool":
        if node.attributes.get_int("ceil_mode", 0):
            return "ceil_mode"
        own = _consumer_pads(node, spatial)
        if isinstance(own, str):
            return own
        if any(own) and not node.attributes.get_int("count_include_pad", 0):
            return "pool pads excluded from the average"
    own = _consumer_pads(node, spatial)
    if isinstance(own, str):
        return own
    return [own[i] + pads[2 + i] for i in range(spatial)] + [
        own[spatial + i] + pads[rank + 2 + i] for i in range(spatial)
    ]


def _check(fill: float):
    def check(m: Match) -> str | None:
        plan = _merged(m, fill)
        return plan if isinstance(plan, str) else None
    return check


def _rewrite(fill: float):
    def rewrite(m: Match, b: Builder):
        pads = _merged(m, fill)
        node = m.root
        inputs = [m["x"], *node.inputs[1:]]
        while inputs and inputs[-1] is None:
            inputs.pop()
        extra = {"count_include_pad": 1} if node.op_type == "AveragePool" else {}
        return b.op(node.op_type, *inputs, attributes=node.attributes, pads=pads, **extra)
    return rewrite


def _pad() -> Op:
    return Op("Pad", Var("x"), Var("pads", optional=True), Var("value", optional=True),
              Var("axes", optional=True), name="pad")


RULES: tuple[Rule, ...] = (
    Rule("pad-conv", Op("Conv", _pad(), Var("w"), Var("b", optional=True), name="conv"),
         _rewrite(0.0), _check(0.0)),
    Rule("pad-averagepool", Op("AveragePool", _pad(), name="pool"), _rewrite(0.0), _check(0.0)),
    Rule("pad-maxpool", Op("MaxPool", _pad(), name="pool"), _rewrite(-np.inf), _check(-np.inf)),
)


class FusePadPass(RewritePass):
    """Fold a constant zero Pad into Conv/AveragePool padding (-inf Pad into MaxPool)."""

    name = "fuse-pad"
    numerics = "fusion"
    rules = RULES

