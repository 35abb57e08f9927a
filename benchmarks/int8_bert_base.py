"""Static INT8 on a BERT-base-sized encoder: time per phase, CPU time and peak memory.

    python benchmarks/int8_bert_base.py [--model FILE.onnx] [--samples 16] [--seq 128]

The model: ``--model`` (e.g. a random-init ``transformers.BertModel(BertConfig())`` export
with inputs ``input_ids``, ``attention_mask``, ``token_type_ids``), or by default a BERT-base
graph written with onnx.helper as transformers' eager export does
(``weight_only_vs_ort.build_minilm``: 12 layers, hidden 768, 12 heads, FFN 3072, vocabulary
30522, ~420 MB float32) over random weights (normal, std 0.02, as BERT initializes). Data:
``--samples`` sequences of ``--seq`` random token ids, sample ``i`` right-padded by
``8 * (i % 8)`` positions (padding exercises the masked attention scores).

It runs ``optcc.quant.driver.quantize_int8`` (the ``--int8`` default: minmax calibration,
task judge, fallback, speed model) in this process after loading the model, and prints
the decision, the wall time per phase (``stats["seconds"]``), the process's CPU time
(user + system) and its peak RSS (``getrusage``), and the machine's load average: wall
times on a shared machine are noisy, CPU time less so.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optcc  # noqa: E402
from optcc.quant.driver import quantize_int8  # noqa: E402

LAYERS, HIDDEN, HEADS, FFN, VOCAB, POSITIONS = 12, 768, 12, 3072, 30522, 512


def random_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """BERT-base parameters under Hugging Face names, random as BERT initializes them."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(np.float32)

    w = {"embeddings.word_embeddings.weight": normal(VOCAB, HIDDEN),
         "embeddings.position_embeddings.weight": normal(POSITIONS, HIDDEN),
         "embeddings.token_type_embeddings.weight": normal(2, HIDDEN)}

    def norm(prefix: str) -> None:
        w[f"{prefix}.weight"] = np.ones(HIDDEN, np.float32)
        w[f"{prefix}.bias"] = np.zeros(HIDDEN, np.float32)

    def linear(prefix: str, n_in: int, n_out: int) -> None:
        w[f"{prefix}.weight"] = normal(n_out, n_in)
        w[f"{prefix}.bias"] = np.zeros(n_out, np.float32)

    norm("embeddings.LayerNorm")
    for i in range(LAYERS):
        p = f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            linear(f"{p}.attention.self.{name}", HIDDEN, HIDDEN)
        linear(f"{p}.attention.output.dense", HIDDEN, HIDDEN)
        norm(f"{p}.attention.output.LayerNorm")
        linear(f"{p}.intermediate.dense", HIDDEN, FFN)
        linear(f"{p}.output.dense", FFN, HIDDEN)
        norm(f"{p}.output.LayerNorm")
    return w


def samples(count: int, seq: int, names: list[str], seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        ids = rng.integers(1000, 30000, (1, seq)).astype(np.int64)
        mask = np.ones((1, seq), np.int64)
        mask[0, seq - 8 * (i % 8):] = 0
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        out.append({k: v for k, v in feeds.items() if k in names})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an exported BERT-base .onnx (default: the onnx.helper graph)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    start = time.perf_counter()
    if args.model:
        model = optcc.ir.load(args.model)
    else:
        from weight_only_vs_ort import build_minilm

        model = optcc.ir.load(build_minilm(random_weights(), layers=LAYERS, heads=HEADS))
    names = [v.name for v in model.graph.inputs]
    data = samples(args.samples, args.seq, names)
    loaded = time.perf_counter()
    cpu = os.times()
    result, stats = quantize_int8(model, data)
    after = os.times()
    wall = time.perf_counter() - loaded
    print(f"decision: {'INT8' if stats['modified'] else 'float32 (' + str(stats.get('declined')) + ')'}")
    if stats.get("reason"):
        print(f"reason: {stats['reason']}")
    print("phases (wall s):", stats["seconds"])
    print(f"quantize_int8: wall {wall:.1f} s, CPU {after.user - cpu.user + after.system - cpu.system:.1f} s "
          f"(user {after.user - cpu.user:.1f}, sys {after.system - cpu.system:.1f}); load {loaded - start:.1f} s")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB; "
          f"load average {os.getloadavg()[0]:.2f}")
    del result


if __name__ == "__main__":
    main()
