"""The fewest layers a lossy rewrite must leave float for the whole model to pass a check.

``fewest_float_layers`` searches prefixes of a ranking (most damaging first): the
candidate with no layer float, then 1, 2, 4, ... layers float until one passes ``judge``,
then bisection between the last count that missed and the first that passed. Where
``confirm`` is given, the count found must also pass it (a check on samples ``judge`` did
not see); where it does not, one more layer at a time is left float, each candidate
judged by ``judge`` and then by ``confirm``. At least one layer stays quantized (unless
``keep_one`` is False: a caller whose prefix raises layers to a wider width, every one of
which may be raised), and at most ``budget`` candidates are built, each judged once by
each check. Once the budget is spent, only candidates already built are judged: in the
bisection, the fewest that passed ``judge`` so far is the count found (confirmed as
above); after a refused confirmation, the larger counts built before; ``bounded`` says
that fewer layers might have passed. When no candidate passes within the budget, the
search declines (None). Deterministic: the same ranking and verdicts give the same choice.

``KeptCandidates(build)`` builds a candidate once while it is kept: its ``retain`` handed
to the search, it keeps the ``KEPT_CANDIDATES`` candidate with the fewest float layers of
those the search may still confirm (they passed ``judge`` and await ``confirm``): the one
the bisection ends on, confirmed without a build again even when the bisection's last
step failed after it. At most two candidates live at a time (the one kept and the one
being judged), each holding only the arrays its own rewrite made (the float model's
tensors are shared): a bound on memory that does not grow with the model's layers; a
candidate a refused confirmation returns to is built again. Without ``confirm`` none is
kept past its verdict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["BOUNDED_NOTE", "FLOAT_LAYER_CANDIDATES", "FloatLayerSearch", "KeptCandidates", "fewest_float_layers"]

FLOAT_LAYER_CANDIDATES = 12  # the most candidates a search builds and judges before it declines
KEPT_CANDIDATES = 1  # the most built candidates awaiting confirmation that ``KeptCandidates`` keeps
# what a summary line says of a ``bounded`` search
BOUNDED_NOTE = "the search was bounded: its candidate budget ran out, so fewer layers may pass"

Built = TypeVar("Built")
Check = Callable[[Sequence[str]], "str | None"]  # the float layers of a candidate -> None, or why it misses


@dataclasses.dataclass
class FloatLayerSearch:
    """A search's outcome: the layers left float (None: declined) and every check made."""

    chosen: list[str] | None
    checks: list[dict[str, Any]]
    ranked: Sequence[str] = ()  # the ranking searched (empty: none was needed)
    # whether the budget ran out before the search had judged every count it would have: a
    # choice may leave more layers float than the fewest that pass
    bounded: bool = False

    @property
    def candidates(self) -> int:
        """How many candidates were built (each judged once, some confirmed after)."""
        return len({check["float_layers"] for check in self.checks})


def fewest_float_layers(rank: Callable[[], Sequence[str]], judge: Check, confirm: Check | None = None,
                        budget: int | None = None, keep_one: bool = True,
                        retain: Callable[[list[list[str]]], None] | None = None) -> FloatLayerSearch:
    """The fewest of the first layers of ``rank()`` (called only when the candidate with no
    layer float misses) whose candidate passes ``judge`` and ``confirm`` (module doc);
    ``budget``: ``FLOAT_LAYER_CANDIDATES`` when None; ``retain``, after each verdict: the
    float layers of every candidate the search may still confirm (``KeptCandidates.retain``)."""
    budget = FLOAT_LAYER_CANDIDATES if budget is None else budget
    checks: list[dict[str, Any]] = []
    ranked: Sequence[str] = ()
    bounded = False
    # each candidate's verdict by each check, judged once; the candidates built are the counts here
    verdicts: dict[tuple[int, str], bool] = {}

    def passes(count: int, name: str, check: Check | None) -> bool | None:
        """Whether the candidate with ``count`` layers float passes ``check`` (True when there
        is none); None when it would be a new candidate past the budget."""
        if check is None:
            return True
        if (count, name) in verdicts:
            return verdicts[count, name]
        nonlocal bounded
        built = {built_count for built_count, _ in verdicts}
        if count not in built and len(built) >= budget:
            bounded = True
            return None
        reason = check(list(ranked[:count]))
        checks.append({"float_layers": count, "check": name, "passed": reason is None,
                       **({"reason": reason} if reason is not None else {})})
        verdicts[count, name] = reason is None
        if retain is not None:  # a candidate is confirmed only after it passed ``judge``, and once
            awaiting = sorted(c for (c, check_name), passed in verdicts.items() if check_name == "judge"
                              and passed and confirm is not None and (c, "confirm") not in verdicts)
            retain([list(ranked[:c]) for c in awaiting[:KEPT_CANDIDATES]])
        return reason is None

    first = passes(0, "judge", judge)
    if first and passes(0, "confirm", confirm):
        return FloatLayerSearch([], checks)
    ranked = rank()
    most = len(ranked) - 1 if keep_one else len(ranked)  # the longest prefix a candidate may take
    start = 1
    if not first:
        low, high, count = 0, None, 1
        while high is None and count <= most:  # 1, 2, 4, ... layers float, all but one last
            verdict = passes(count, "judge", judge)
            if verdict is None:
                return FloatLayerSearch(None, checks, ranked, bounded)
            if verdict:
                high = count
            elif count == most:
                break
            else:
                low, count = count, min(count * 2, most)
        while high is not None and high - low > 1:  # low misses, high passes
            middle = (low + high) // 2
            verdict = passes(middle, "judge", judge)
            if verdict is None:  # out of budget: the fewest that passed so far is the count found
                break
            low, high = (low, middle) if verdict else (middle, high)
        if high is None:
            return FloatLayerSearch(None, checks, ranked, bounded)
        if passes(high, "confirm", confirm):  # ``high`` was built: its confirmation is within the budget
            return FloatLayerSearch(list(ranked[:high]), checks, ranked, bounded)
        start = high + 1
    # the confirmation refused the judge's choice: one more layer float at a time, each judged
    # first; past the budget, only the candidates already built (a larger one may have passed)
    for count in range(start, most + 1):
        if passes(count, "judge", judge) and passes(count, "confirm", confirm):
            return FloatLayerSearch(list(ranked[:count]), checks, ranked, bounded)
    return FloatLayerSearch(None, checks, ranked, bounded)


class KeptCandidates(Generic[Built]):
    """``build`` called once per candidate (its float layers), the candidate kept until
    ``retain`` leaves it out (module doc)."""

    def __init__(self, build: Callable[[Sequence[str]], Built]) -> None:
        self._build = build
        self._kept: dict[tuple[str, ...], Built] = {}

    def __call__(self, layers: Sequence[str]) -> Built:
        key = tuple(layers)
        if key not in self._kept:
            self._kept[key] = self._build(layers)
        return self._kept[key]

    def retain(self, candidates: list[list[str]]) -> None:
        """Drop every kept candidate but ``candidates``."""
        keep = {tuple(layers) for layers in candidates}
        for key in [key for key in self._kept if key not in keep]:
            del self._kept[key]
