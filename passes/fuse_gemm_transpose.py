"""FuseGemmTransposePass: a 2-D Transpose feeding Gemm becomes Gemm's transA/transB flag.

Rewrites: ``Gemm(Transpose(a), B, C?)`` becomes ``Gemm(a, B, C?, transA=1-transA)``
(``gemm-transpose-a``), and likewise for ``B`` (``gemm-transpose-b``).

Preconditions: default-domain ops; the Transpose's perm is ``[1, 0]`` or absent (Gemm's
operands are 2-D, where no perm means ``[1, 0]``); its result read only by the Gemm and
not a graph output (enforced by the driver, ``optcc.rewrite.pattern``).

Numerics ("fusion"): the same products and sums; only the memory order the Gemm
kernel reads may change its accumulation order, so it runs at -O2 (verified, 1e-4).
"""

from __future__ import annotations

from optcc.rewrite import Builder, Match, Op, RewritePass, Rule, Var

__all__ = ["FuseGemmTransposePass", "RULES"]


def _check(m: Match) -> str | None:
    perm = m["t"].attributes.get("perm")
    if perm is not None and list(perm.as_ints()) != [1, 0]:
        return "not a 2-D transposition"
    return None


def _rewrite(flag: str, position: int):
    def rewrite(m: Match, b: Builder):
        gemm = m.root
        inputs = list(gemm.inputs)
        inputs[position] = m["t"].inputs[0]
        while inputs and inputs[-1] is None:
            inputs.pop()
        return b.op("Gemm", *inputs, attributes=gemm.attributes,
                    **{flag: 1 - gemm.attributes.get_int(flag, 0)})
    return rewrite


RULES: tuple[Rule, ...] = (
    Rule("gemm-transpose-a",
         Op("Gemm", Op("Transpose", Var("a"), name="t"), Var("b"), Var("c", optional=True)),
         _rewrite("transA", 0), _check),
    Rule("gemm-transpose-b",
         Op("Gemm", Var("a"), Op("Transpose", Var("b"), name="t"), Var("c", optional=True)),
         _rewrite("transB", 1), _check),
)


class FuseGemmTransposePass(RewritePass):
    """Absorb a 2-D Transpose of a Gemm operand into the Gemm's transA/transB."""

    name = "fuse-gemm-transpose"
    numerics = "fusion"
    rules = RULES
