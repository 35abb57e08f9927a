"""Pipelines: the -O levels' tables (``optcc.infra.levels``) turned into pass objects."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from optcc.errors import BadInputError
from optcc.infra.manager import Fixpoint, PipelineStep
from optcc.infra.levels import LEVELS
from optcc.infra.registry import available_passes, create_pass, unknown_pass

__all__ = ["LEVELS", "build_pipeline", "pipeline_names"]

FIXPOINT_MAX_ITERS = 8


def pipeline_names(level: int) -> list[str]:
    """Every pass name the level's pipeline uses, in order."""
    if level not in LEVELS:
        raise BadInputError(f"unknown optimization level {level!r} (use 0, 1, 2 or 3)")
    names: list[str] = []
    for step in LEVELS[level]:
        names.extend(step if isinstance(step, tuple) else [step])
    return names


def build_pipeline(
    level: int = 2,
    *,
    passes: Sequence[object] | None = None,
    disable: Iterable[str] = (),
    options: Mapping[str, Mapping[str, object]] | None = None,
) -> list[PipelineStep]:
    """The pipeline to run: the level's, or exactly ``passes`` (names or pass objects)
    when given; ``disable`` drops passes by name; ``options`` holds constructor options
    per pass name (e.g. ``{"fold-constants": {"fold_large": True}}``)."""
    options = options or {}
    for what, names in (("passes", passes), ("disable", disable)):
        if isinstance(names, str):  # iterated, it would be one pass name per character
            raise BadInputError(f"{what} must be a list of pass names, not the string {names!r}")
    created: dict[str, PipelineStep] = {}

    def create(name: str) -> PipelineStep:
        # one object per name: the same pass with the same options in every step, which lets
        # the manager skip a run that would see the model its last run left unchanged
        if name not in created:
            created[name] = create_pass(name, **options.get(name, {}))
        return created[name]

    disabled = set(disable)
    unknown = disabled - set(available_passes())
    if unknown:
        raise BadInputError(f"cannot disable {unknown_pass(sorted(unknown)[0])}")
    if passes is not None:
        return [
            create(p) if isinstance(p, str) else p
            for p in passes
            if not (isinstance(p, str) and p in disabled)
        ]
    pipeline_names(level)  # validates the level
    steps: list[PipelineStep] = []
    for step in LEVELS[level]:
        if isinstance(step, tuple):
            inner = [create(name) for name in step if name not in disabled]
            if inner:
                steps.append(Fixpoint(inner, FIXPOINT_MAX_ITERS, name="+".join(step)))
        elif step not in disabled:
            steps.append(create(step))
    return steps
