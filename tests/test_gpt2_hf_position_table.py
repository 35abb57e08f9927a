"""transformers' GPT-2 (random seeded weights) exported by torch with a KV cache and a
64-row position table: optcc verifies it by default over a multi-step decode, and every
position the generated inputs lead the decode to is inside the table (checked by a decode
written here on onnxruntime with its optimizations off). Needs torch and transformers
(the optional extra ``transformers``); skipped without them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import optcc
from fixtures.gpt2_decoder import greedy_decode
from optcc.numerics import Verifier
from optcc.numerics.decode import DECODE_STEPS, NEXT_TOKEN_AGREEMENT, NEXT_TOKEN_STEPS
from optcc.numerics.inputs import generate_inputs

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

import fixtures.gpt2_hf as gpt2_hf  # noqa: E402

POSITIONS = 64


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> onnx.ModelProto:
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(gpt2_hf.CONFIG, "n_positions", POSITIONS)
        return onnx.load(gpt2_hf.export(tmp_path_factory.mktemp("gpt2") / "gpt2_pos64.onnx"))


def test_the_export_has_the_short_table(original):
    tables = [t for t in original.graph.initializer if list(t.dims) == [POSITIONS, gpt2_hf.CONFIG["n_embd"]]]
    assert tables, "no position table of 64 rows in the export"


def test_generated_inputs_keep_the_decode_within_the_table(original):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(original.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    for feeds in generate_inputs(optcc.ir.load(original), samples=2):
        past = feeds["past_key_0"].shape[2]
        for _ in range(DECODE_STEPS):
            current = feeds["input_ids"].shape[1]
            assert feeds["attention_mask"].shape[1] == past + current
            np.testing.assert_array_equal(feeds["position_ids"][0], past + np.arange(current))
            assert feeds["position_ids"].max() < POSITIONS
            out = dict(zip(names, session.run(None, feeds)))
            token = np.argmax(out["logits"][:, -1], -1)[:, None].astype(np.int64)
            mask = feeds["attention_mask"]
            feeds = {**{n: out[n.replace("past", "present")] for n in feeds if n.startswith("past_")},
                     "input_ids": token, "position_ids": feeds["position_ids"][:, -1:] + 1,
                     "attention_mask": np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)}
            past += current


def _next_token_agreement(original: onnx.ModelProto, candidate: onnx.ModelProto, prompts: list[np.ndarray]) -> float:
    """The share of steps at which ``candidate``'s argmax is ``original``'s over a greedy decode
    of ``NEXT_TOKEN_STEPS`` steps from each prompt (an empty cache), the candidate fed the
    original's tokens: decoded here on onnxruntime (optimizations off), counted with numpy."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    heads = gpt2_hf.CONFIG["n_head"]
    shape = (gpt2_hf.CONFIG["n_layer"], heads, gpt2_hf.CONFIG["n_embd"] // heads)

    def decode(model: onnx.ModelProto, prompt: np.ndarray, fed: np.ndarray | None = None) -> np.ndarray:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return greedy_decode(lambda f: session.run(None, f), prompt, NEXT_TOKEN_STEPS, *shape, fed)

    same = []
    for prompt in prompts:
        want = decode(original, prompt)
        same.append(decode(candidate, prompt, want) == want)
    return float(np.concatenate(same).mean())


@pytest.mark.parametrize("options", [{"level": 2}, {"level": 3}, {"level": 2, "weight_only": "int8"},
                                     {"level": 2, "int8_dynamic": True}],
                         ids=["O2", "O3", "weights-int8", "int8-dynamic"])
def test_verified_by_a_multi_step_decode(original, options):
    if "weight_only" in options or "int8_dynamic" in options:
        # a lossy result: judged by its next-token decode, which runs within the table (a
        # random-weight decoder's near-ties may refuse it: judged on its tokens either way)
        candidate = optcc.optimize(original, verify=False, **options).model
        with Verifier(optcc.ir.load(original)) as verifier:
            judged = verifier.check(optcc.ir.load(candidate), "int8")
            prompts = [feeds["input_ids"] for feeds in verifier.next_token_feeds]
        assert judged.next_token["CPUExecutionProvider"]["steps"] == NEXT_TOKEN_STEPS, judged.describe()
        agreement = _next_token_agreement(original, candidate, prompts)
        assert judged.status == ("passed" if agreement >= NEXT_TOKEN_AGREEMENT else "failed"), \
            (agreement, judged.describe())
        return
    verification = optcc.optimize(original, **options).report.verification
    assert verification["status"] == "passed", verification
    proved = bool(verification.get("proof")) and all(verification["proof"]["outputs"].values())
    assert (verification["decode_steps"] or 0) > 1 or proved, verification
