"""FuseLogSoftmaxPass: ``Log(Softmax(x))`` becomes ``LogSoftmax(x)``.

Rewrite (``log-softmax``): ``y = Log(Softmax(x, axis))`` becomes ``y = LogSoftmax(x, axis)``
with the Softmax's attributes as they are (in every opset LogSoftmax reads ``axis`` with
the same default and the same meaning as Softmax of that opset).

Preconditions: default-domain ops; the Softmax result read only by the Log and not a
graph output (enforced by the driver, ``optcc.rewrite.pattern``).

Numerics ("fusion"): mathematically equal; LogSoftmax computes ``x - max - log(sum)``
instead of rounding the probabilities first, so it differs by rounding and is more
accurate (where a probability underflows to 0, ``Log`` gives -inf and LogSoftmax the
finite value). Runs at -O2, verified.
"""

from __future__ import annotations

from optcc.rewrite import Builder, Match, Op, RewritePass, Rule, Var

__all__ = ["FuseLogSoftmaxPass", "RULES"]


def _rewrite(m: Match, b: Builder):
    return b.op("LogSoftmax", m["x"], attributes=m["softmax"].attributes)


RULES: tuple[Rule, ...] = (
    Rule("log-softmax", Op("Log", Op("Softmax", Var("x"), name="softmax")), _rewrite),
)


class FuseLogSoftmaxPass(RewritePass):
    """Replace Log(Softmax(x)) by LogSoftmax(x)."""

    name = "fuse-log-softmax"
    numerics = "fusion"
    rules = RULES
