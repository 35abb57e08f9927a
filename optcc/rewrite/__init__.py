"""The pattern engine: patterns that read like the math, rules, and the worklist driver."""

from optcc.rewrite.pattern import (
    Builder, Const, Match, Op, Pattern, RewritePass, RewriteStats, Rule, Var, apply_rules, static_rank,
)

__all__ = ["Op", "Var", "Const", "Pattern", "Match", "Builder", "Rule", "RewriteStats",
           "apply_rules", "RewritePass", "static_rank"]
