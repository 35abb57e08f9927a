"""The verifier of a KV-cache decoder builds its onnxruntime sessions one at a time: the
original's (its reference outputs and its greedy decode) is gone before a candidate's is
built, so that no two copies of a model's session memory are held at once. The verdict is
checked against onnxruntime's own greedy decode of the original."""

from __future__ import annotations

import importlib
import weakref

import numpy as np
import onnxruntime as ort
import pytest

import optcc
from optcc.numerics.decode import NEXT_TOKEN_STEPS
from tests.test_decode_verification import _decoder, _greedy, prompt

verify_module = importlib.import_module("optcc.numerics.verify")  # the module: the package exports a function so named


def test_no_two_verification_sessions_are_alive_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _decoder()
    prompts = [prompt([4, 7, 1]), prompt([2, 5, 9])]  # two: the original decodes the second once it is reached
    candidate = optcc.optimize(model, level=2, weight_only="int8", verify=False).model
    alive: weakref.WeakSet = weakref.WeakSet()
    alive_at_build: list[int] = []
    build = verify_module.make_session

    def counting(*args: object, **kwargs: object) -> ort.InferenceSession:
        alive_at_build.append(len(alive))  # sessions of this verifier still alive as another is built
        session = build(*args, **kwargs)
        alive.add(session)
        return session

    monkeypatch.setattr(verify_module, "make_session", counting)
    verification = optcc.verify(model, candidate, numerics="int8", inputs=prompts)
    assert len(alive_at_build) >= 4  # the original's outputs, its greedy decodes, the candidate's
    assert set(alive_at_build) == {0}
    # the verdict: onnxruntime's greedy decode of the original, and the candidate fed its tokens
    original, written = (ort.InferenceSession(data, providers=["CPUExecutionProvider"])
                         for data in (model.SerializeToString(), candidate.SerializeToString()))
    same = []
    for feeds in prompts:
        want = _greedy(original, feeds, NEXT_TOKEN_STEPS)
        same += [a == b for a, b in zip(want, _greedy(written, feeds, NEXT_TOKEN_STEPS, fed=want))]
    judged = verification.next_token["CPUExecutionProvider"]
    assert judged["agreement"] == np.mean(same)
