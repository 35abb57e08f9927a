"""The pipeline table is the one source of truth for -O levels: a registered pass that
claims a level runs in that level's pipeline and every higher one, and nothing runs below
the level it claims."""

from __future__ import annotations

from optcc.infra import pipelines
from optcc.infra.registry import available_passes


def test_every_level_claim_matches_the_pipelines():
    passes = available_passes()
    for name, info in passes.items():
        if info.level is None:
            continue
        for level in range(info.level, max(pipelines.LEVELS) + 1):
            assert name in pipelines.pipeline_names(level), f"{name} claims -O{info.level} but is not in -O{level}"
    for level in pipelines.LEVELS:
        for name in pipelines.pipeline_names(level):
            claimed = passes[name].level
            assert claimed is not None and claimed <= level, f"-O{level} runs {name}, which claims {claimed}"
