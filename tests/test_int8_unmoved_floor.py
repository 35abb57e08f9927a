"""A model whose inputs cannot be perturbed (token ids, masks) has its noise floor from the
float model's outputs on the samples themselves: the judge holds exactly those outputs, and
neither the driver nor the verifier runs the model a second time for them. Expected values
are computed here with numpy."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import pytest

import optcc
from optcc.numerics import task as tm
from optcc.quant import driver
from calls import first_arguments

VOCAB, HIDDEN, SEQ = 50, 16, 12


def _encoder() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """``hidden = (table[input_ids] * attention_mask[..., None]) @ w``, and its two weights."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    w = rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32)
    nodes = [oh.make_node("Gather", ["table", "input_ids"], ["embedded"]),
             oh.make_node("Cast", ["attention_mask"], ["maskf"], to=onnx.TensorProto.FLOAT),
             oh.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
             oh.make_node("Mul", ["embedded", "mask3"], ["masked"]),
             oh.make_node("MatMul", ["masked", "w"], ["last_hidden_state"])]
    graph = oh.make_graph(
        nodes, "encoder",
        [oh.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, SEQ]),
         oh.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, [1, SEQ])],
        [oh.make_tensor_value_info("last_hidden_state", onnx.TensorProto.FLOAT, [1, SEQ, HIDDEN])],
        [nh.from_array(table, "table"), nh.from_array(w, "w"), nh.from_array(np.array([2], np.int64), "last")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), table, w


def _samples(count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    samples = []
    for i in range(count):
        mask = np.ones((1, SEQ), np.int64)
        mask[0, SEQ - 2 * (i % 3):] = 0
        samples.append({"input_ids": rng.integers(0, VOCAB, (1, SEQ)).astype(np.int64), "attention_mask": mask})
    return samples


def _expected(samples: list[dict[str, np.ndarray]], table: np.ndarray, w: np.ndarray) -> list[np.ndarray]:
    return [(table.astype(np.float64)[s["input_ids"]] * s["attention_mask"][..., None]) @ w.astype(np.float64)
            for s in samples]


def test_unmoved_compares_dtypes_and_values() -> None:
    ids = {"input_ids": np.arange(6, dtype=np.int64).reshape(1, 6)}
    assert tm.unmoved([ids], [{"input_ids": ids["input_ids"].copy()}])
    assert not tm.unmoved([ids], [{"input_ids": ids["input_ids"].astype(np.int32)}])
    assert not tm.unmoved([ids], [{"input_ids": ids["input_ids"] + 1}])
    assert not tm.unmoved([ids], [])
    picture = {"image": np.random.default_rng(0).uniform(0, 1, (1, 3, 16, 16)).astype(np.float32)}
    (moved,), _ = tm.perturbation_draws([picture], 1)
    assert not tm.unmoved([picture], moved)  # an image moves by a grey level


def test_moves_nothing_is_unmoved_of_a_whole_draw_and_stops_at_the_first_moved_sample(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    ids = _samples(5)
    pictures = [{"image": rng.uniform(0, 1, (1, 3, 16, 16)).astype(np.float32)} for _ in range(5)]
    roles = {"not_images": set(), "ids": {"input_ids", "attention_mask"}}
    perturbed = first_arguments(monkeypatch, tm, "perturb")
    for draw in (1, 2, 3):
        (ids_draw,), _ = tm.perturbation_draws(ids, draw + 1, first=draw, **roles)
        (picture_draw,), _ = tm.perturbation_draws(pictures, draw + 1, first=draw)
        assert tm.unmoved(ids, ids_draw) and not tm.unmoved(pictures, picture_draw)
        del perturbed[:]
        assert tm.moves_nothing(ids, draw, **roles) and len(perturbed) == len(ids)  # every sample seen
        del perturbed[:]
        assert not tm.moves_nothing(pictures, draw) and len(perturbed) == 1  # the first image moves


def test_the_drivers_floor_of_token_ids_is_the_reference_run_once(monkeypatch: pytest.MonkeyPatch) -> None:
    proto, table, w = _encoder()
    held = _samples(6)
    (moved,), how = tm.perturbation_draws(held, 1, ids={"input_ids", "attention_mask"})
    assert tm.unmoved(held, moved)
    runs: list[int] = []
    real = driver.model_outputs
    monkeypatch.setattr(driver, "model_outputs", lambda model, samples: runs.append(len(samples)) or real(model, samples))
    judge = driver._task_judge(optcc.ir.load(proto), held, "auto", 1.5, None, 25.0, draws=4)
    assert runs == [len(held)]  # the held-out samples once; no perturbed or further draws run
    expected = _expected(held, table, w)
    for values in (judge.reference["last_hidden_state"], judge.perturbed["last_hidden_state"],
                   *(draw["last_hidden_state"] for draw in judge.draws)):
        assert len(values) == len(held)
        for got, want in zip(values, expected):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert judge.metric_names() == {"last_hidden_state": "embedding"}
    assert all(abs(v) < 1e-12 for v in judge.floor["last_hidden_state"].values())


def test_the_verifiers_floor_of_token_ids_needs_no_second_run(monkeypatch: pytest.MonkeyPatch) -> None:
    proto, table, w = _encoder()
    samples = _samples(5)
    verify_module = __import__("sys").modules["optcc.numerics.verify"]
    with optcc.Verifier(proto, inputs=samples) as verifier:
        provider = verifier.providers[0]
        verifier._float32_outputs()  # the original's own run
        runs: list[int] = []
        real = verify_module.run
        monkeypatch.setattr(verify_module, "run", lambda *a, **k: runs.append(1) or real(*a, **k))
        judge = verifier.task_judge(provider)
    assert runs == []
    expected = _expected(samples, table, w)
    for got, want in zip(judge.perturbed["last_hidden_state"], expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
