"""A 16-bit integer waveform (MarbleNet VAD's int16 ``audio`` [1, 1, T], T dynamic) is audio,
not an attention mask: it is cast to float and scaled, which reads like a mask's use, and
generated as 0/1 it held no signal."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx_ir as ir
from onnx import TensorProto as TP

from optcc.numerics.inputs import generate_inputs, input_roles


def _model(name: str, dtype: int, shape: list, gather: bool = False) -> ir.Model:
    """``name`` cast to float and scaled (how a PCM input and a mask are both applied),
    or, with ``gather``, cast to int64 and used to pick rows of a table."""
    if gather:
        nodes = [oh.make_node("Cast", [name], ["k"], to=TP.INT64), oh.make_node("Gather", ["table", "k"], ["y"])]
        inits = [nh.from_array(np.ones((100, 2), np.float32), "table")]
    else:
        nodes = [oh.make_node("Cast", [name], ["a"], to=TP.FLOAT), oh.make_node("Mul", ["a", "scale"], ["y"])]
        inits = [nh.from_array(np.array(1 / 32768, np.float32), "scale")]
    graph = oh.make_graph(nodes, "m", [oh.make_tensor_value_info(name, dtype, shape)],
                          [oh.make_tensor_value_info("y", TP.FLOAT, None)], inits)
    return ir.from_proto(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]))


def test_an_int16_waveform_is_audio_and_generated_as_pcm_speech():
    for shape in ([1, 1, "audio_len"], [1, "T"], [1, 16000, 1], [1, 1, 512]):
        model = _model("audio", TP.INT16, shape)
        assert input_roles(model) == {"audio": "audio"}, shape
    model = _model("audio", TP.INT16, [1, 1, "audio_len"])
    pcm = generate_inputs(model, {"audio": [1, 1, 16000]}, samples=1)[0]["audio"]
    assert pcm.dtype == np.int16 and pcm.shape == (1, 1, 16000)
    magnitude = np.abs(pcm.astype(np.int64))
    assert magnitude.max() == 16384  # the signal peaks half way to the dtype's limit
    assert len(np.unique(pcm)) > 1000  # a waveform, not 0/1
    quiet = np.mean(magnitude < 164)  # below 1% of the peak: the pauses between syllables
    assert 0.05 < quiet < 0.9


def test_unsigned_pcm_sits_around_the_middle_of_its_range():
    model = _model("pcm", TP.UINT16, [1, "T"])
    pcm = generate_inputs(model, {"pcm": [1, 8000]}, samples=1)[0]["pcm"].astype(np.int64)
    assert abs(int(np.median(pcm)) - 32768) < 200 and np.abs(pcm - 32768).max() == 16384


def test_masks_and_ids_keep_their_roles():
    assert input_roles(_model("mask", TP.INT16, [1, "T"])) == {"mask": "mask"}  # named a mask
    assert input_roles(_model("attention", TP.INT64, [1, "T"])) == {"attention": "mask"}  # int64, used as one
    assert input_roles(_model("ids", TP.INT16, [1, "T"], gather=True)) == {"ids": "index"}  # indexes a table
    assert input_roles(_model("feats", TP.INT16, [1, 4, "T"])) == {"feats": "mask"}  # no waveform's shape
