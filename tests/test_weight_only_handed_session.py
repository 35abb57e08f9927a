"""A session whose weights are handed over (``weighted_session``) is built from the graph
saved to a file, with graph optimizations as without them, and computes what a session of
the whole serialized model computes. A weight-only run on an external-data decoder, whose
checks build such sessions, writes a model that onnxruntime decodes as the verification
says, checked against onnxruntime's greedy decode of the original and against numpy's
dequantization of the stored weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import optcc
from fixtures.gpt2_decoder import gpt2_decoder, greedy_decode
from optcc.numerics.decode import NEXT_TOKEN_STEPS
from optcc.runtime import shared_weights
from optcc.runtime.session import session_options

LAYERS, HIDDEN, HEADS, VOCAB = 2, 128, 4, 16384  # an 8 MiB token table: handed over, not copied inline


def _external(tmp_path) -> str:
    path = str(tmp_path / "decoder.onnx")
    onnx.save_model(gpt2_decoder(layers=LAYERS, hidden=HIDDEN, heads=HEADS, vocab=VOCAB), path,
                    save_as_external_data=True, all_tensors_to_one_file=True, location="decoder.onnx.data",
                    size_threshold=1024)
    return path


def _feeds(batch: int = 2, seq: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    past = {f"past_{kind}_{i}": rng.standard_normal((batch, HEADS, 3, HIDDEN // HEADS)).astype(np.float32)
            for i in range(LAYERS) for kind in ("key", "value")}
    return {"input_ids": rng.integers(0, VOCAB, (batch, seq)), "position_ids": np.tile(np.arange(3, 3 + seq), (batch, 1)),
            "attention_mask": np.ones((batch, 3 + seq), np.int64), **past}


@pytest.mark.parametrize("optimize", [False, "all"])
def test_a_handed_over_session_is_loaded_from_a_file_and_computes_the_whole_models_outputs(monkeypatch, optimize):
    model = gpt2_decoder(layers=LAYERS, hidden=HIDDEN, heads=HEADS, vocab=VOCAB)
    proto, weights = shared_weights.light_proto(optcc.ir.load(model), min_bytes=1 << 20)
    assert sum(w.nbytes for w in weights.values()) > shared_weights.INLINE_MAX_BYTES
    loaded: list[object] = []
    session_type = ort.InferenceSession

    def recorded(source, *args, **kwargs):  # noqa: ANN001, ANN202
        loaded.append(source)
        return session_type(source, *args, **kwargs)

    monkeypatch.setattr(shared_weights.ort, "InferenceSession", recorded)
    handed = shared_weights.weighted_session(proto, weights, session_options(optimize=optimize, prepack=True))
    monkeypatch.undo()
    assert len(loaded) == 1 and isinstance(loaded[0], str)  # a path: no serialized model beside the session's parse
    whole = ort.InferenceSession(model.SerializeToString(), session_options(optimize=optimize, prepack=True),
                                 providers=["CPUExecutionProvider"])
    feeds = _feeds()
    for got, want in zip(handed.run(None, feeds), whole.run(None, feeds)):
        np.testing.assert_array_equal(got, want)


def _dequantized(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Each block-wise DequantizeLinear's output, computed by numpy in float64 from the
    stored levels, scales and zero points (int4/uint4 unpacked by onnx)."""
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        q = arrays[node.input[0]].astype(np.float64)
        scale = arrays[node.input[1]].astype(np.float64)
        zero = arrays[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else 0 * scale
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        block = attrs.get("block_size", 0)
        if block:
            axis = attrs.get("axis", 1) % q.ndim
            scale = np.repeat(scale, block, axis=axis)[tuple(slice(0, n) for n in q.shape)]
            zero = np.repeat(zero, block, axis=axis)[tuple(slice(0, n) for n in q.shape)]
        out[node.output[0]] = (q - zero) * scale
    return out


def _first_step(prompt: np.ndarray) -> dict[str, np.ndarray]:
    """A decode's first feeds: ``prompt`` (1, length) and an empty cache."""
    past = {f"past_{kind}_{i}": np.zeros((1, HEADS, 0, HIDDEN // HEADS), np.float32)
            for i in range(LAYERS) for kind in ("key", "value")}
    length = prompt.shape[1]
    return {"input_ids": prompt, "position_ids": np.arange(length, dtype=np.int64)[None],
            "attention_mask": np.ones((1, length), np.int64), **past}


def test_an_external_data_decoders_weight_only_result_decodes_as_its_verification_says(tmp_path):
    path = _external(tmp_path)
    prompt = np.array([[5, 900, 31, 7000]], np.int64)
    result = optcc.optimize(path, level=2, inputs=[_first_step(prompt)], weight_only="int8")
    result.save(tmp_path / "written.onnx", external_data=False)
    written = onnx.load(str(tmp_path / "written.onnx"))
    record = next(r for r in result.report.passes if r.name == "quantize-weights")
    assert record.status == "changed" and record.stats["quantized"] == {"Gemm int8": 4 * LAYERS}
    # the verification's next-token verdict is what onnxruntime's greedy decodes of the
    # original and of the written model give, the result fed the original's tokens
    original = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    quantized = ort.InferenceSession(written.SerializeToString(), providers=["CPUExecutionProvider"])
    shape = (LAYERS, HEADS, HIDDEN // HEADS)
    want = greedy_decode(lambda f: original.run(None, f), prompt, NEXT_TOKEN_STEPS, *shape)
    got = greedy_decode(lambda f: quantized.run(None, f), prompt, NEXT_TOKEN_STEPS, *shape, fed=want)
    verdict = result.report.verification["next_token"]["CPUExecutionProvider"]
    assert verdict["passed"] and verdict["differing"] == int(np.sum(got != want))
    # the written model is the float graph with each quantized weight replaced by numpy's
    # dequantization of what it stores: onnxruntime runs the original graph on those weights
    reference = onnx.load(path)
    by_name = {t.name: t for t in reference.graph.initializer}
    replaced = 0
    for output, weight in _dequantized(written).items():
        name = output.removesuffix("_dequantized")
        assert name in by_name, output
        by_name[name].CopyFrom(numpy_helper.from_array(weight.astype(np.float32), name))
        replaced += 1
    assert replaced == 4 * LAYERS
    # without graph optimizations (with them onnxruntime fuses DequantizeLinear + Gemm into its
    # MatMulNBits, which rounds activations to int8: docs/weight-only.md)
    plain = session_options()
    as_written = ort.InferenceSession(written.SerializeToString(), plain, providers=["CPUExecutionProvider"])
    session = ort.InferenceSession(reference.SerializeToString(), plain, providers=["CPUExecutionProvider"])
    feeds = _feeds()
    for got_out, want_out in zip(as_written.run(None, feeds), session.run(None, feeds)):
        np.testing.assert_allclose(got_out, want_out, rtol=1e-4, atol=1e-4 * np.abs(want_out).max())
