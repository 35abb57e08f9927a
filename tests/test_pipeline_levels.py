"""The levels table (optcc.infra.levels) is the one source of truth for -O levels: no pass
class claims a level of its own, a pass's reported level is the lowest whose pipeline runs
it, and every level runs what the level below it runs."""

from __future__ import annotations

from optcc.infra import levels, pipelines, registry


def test_no_pass_class_claims_a_level():
    for name, info in registry.available_passes().items():
        assert "level" not in vars(info.factory), f"{name} sets a level of its own; the levels table places it"


def test_a_pass_reports_the_lowest_level_that_runs_it():
    for name, info in registry.available_passes().items():
        running = [level for level in levels.LEVELS if name in pipelines.pipeline_names(level)]
        assert info.level == (min(running) if running else None), name


def test_each_level_runs_what_the_level_below_runs():
    for level in sorted(levels.LEVELS)[1:]:
        assert set(pipelines.pipeline_names(level - 1)) <= set(pipelines.pipeline_names(level)), level
