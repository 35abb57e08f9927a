"""The pattern engine: patterns that read like the math, rules, and the worklist driver."""

from optcc.rewrite.pattern import (
    Builder, Const, Match, Op, Pattern, RewritePass, RewriteStats, Rule, Var, apply_rules, static_rank,
)
from optcc.rewrite.dims import dim_origin, same_dim

__all__ = ["Op", "Var", "Const", "Pattern", "Match", "Builder", "Rule", "RewriteStats",
           "apply_rules", "RewritePass", "static_rank", "dim_origin", "same_dim"]
