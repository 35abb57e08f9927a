"""The fallback's search over how many layers return to float (``_search_estimated``) when
the error does not grow with the number of quantized layers.

The search policy is tested alone: each candidate with ``k`` layers float gets a judged
deviation from a table (what the task judge would say), so the test states which ``k``
the search must try and which it must ship."""

from __future__ import annotations

from typing import Any

import pytest

import optcc.quant.fallback as fallback
from optcc.progress import Progress
from optcc.quant.fallback import Evaluation, Target, shortfall


def _evaluation(deviation: float, allowed: float = 1.0) -> Evaluation:
    row = {"metric": "boxes", "deviation": deviation, "floor": allowed / 1.5, "allowed": allowed,
           "passed": deviation <= allowed}
    return Evaluation({}, {}, Target(), {"passed": deviation <= allowed, "metrics": {"out:box_f1": row}})


def _search(deviations: dict[int, float], limit: int, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, list[int]]:
    """Run the search; ``deviations[k]``: the deviation with the first ``k`` layers float
    (a missing ``k`` takes the nearest smaller entry). Returns the report and the ``k`` tried."""
    order = [f"layer{i}" for i in range(limit * 2)]

    def deviation(k: int) -> float:
        return deviations[max(n for n in deviations if n <= k)]

    def quantize(exclude: list[str], only: Any = None) -> tuple[dict, dict]:
        return {"float_layers": len(exclude)}, {}

    monkeypatch.setattr(fallback, "evaluate",
                        lambda reference, candidate, *a, **kw: _evaluation(deviation(candidate["float_layers"])))
    results = {0: (_evaluation(deviation(0)), {"float_layers": 0}, {})}
    report: dict = {}
    tried: list[dict] = []
    with Progress("search", 1, enabled=False) as bar:
        fallback._search_estimated(None, quantize, [], Target(), order, limit, report, results, tried, None, bar)
    return report, [t["float_layers"] for t in tried]


def test_a_budget_worse_than_none_float_still_tries_a_few_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    # fully quantized: a near miss; half the layers float: twice as far; two float layers: passes
    report, tried = _search({0: 1.002, 1: 1.01, 2: 0.9, 40: 2.0}, 40, monkeypatch)
    assert tried == [40, 1, 2]
    assert report["target_met"] is True and report["kept_float"] == ["layer0", "layer1"]


def test_a_budget_that_misses_by_less_is_hopeless_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    report, tried = _search({0: 3.0, 40: 2.0}, 40, monkeypatch)
    assert tried == [40]
    assert report["target_met"] is False and len(report["kept_float"]) == 40


def test_a_few_float_layers_are_tried_at_most_three_times(monkeypatch: pytest.MonkeyPatch) -> None:
    report, tried = _search({0: 1.5, 40: 2.0}, 40, monkeypatch)
    assert tried == [40, 1, 2, 4]
    assert report["target_met"] is False
    assert report["kept_float"] == []  # the closest miss: none float
    assert "nor 1, 2, 4" in report["hopeless"]


def test_a_budget_that_passes_still_finds_the_fewest_float_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    report, tried = _search({0: 2.0, 5: 0.5}, 40, monkeypatch)
    assert tried[0] == 40 and report["target_met"] is True
    assert report["kept_float"] == [f"layer{i}" for i in range(5)]


def test_shortfall_is_the_largest_judged_deviation_over_its_allowance() -> None:
    assert shortfall(_evaluation(0.5, 2.0)) == 0.25
    assert shortfall(_evaluation(3.0, 2.0)) == 1.5
