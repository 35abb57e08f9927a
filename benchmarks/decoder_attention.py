"""Per-step onnxruntime CPU latency of KV-cache decoders: unfused vs -O3.

Models, random seeded weights, KV cache inputs:

- ``gpt2``: transformers' ``GPT2LMHeadModel`` with ``past_key_values`` and an
  ``attention_mask`` (``fixtures/gpt2_hf.py``'s TorchScript export, opset 17), 4 layers,
  hidden 256, 4 heads: -O3 writes ``com.microsoft.MultiHeadAttention``;
- ``llama``: transformers' ``LlamaForCausalLM`` the same way (``fixtures/llama_hf.py``'s
  ``export_kv``), 4 layers, hidden 512, 8 query and 2 key/value heads: MultiHeadAttention
  over the repeated cache (its padding mask keeps ``GroupQueryAttention`` out);
- ``llama-causal``: ``fixtures/llama_decoder.py``'s onnx-helper decoder of the same sizes
  without an ``attention_mask`` (causal by shapes only): -O3 writes
  ``com.microsoft.GroupQueryAttention``. Needs no torch.

Each is run as built (``unfused``), after ``optcc -O3`` with the attention fusions disabled
(``-O3 no attention``: ``--disable fuse-ort-attention,fuse-ort-gqa``, every other -O3 fusion
applied) and after ``optcc -O3`` (``-O3``; ``--baseline MODEL=FILE`` adds a column for an
-O3 model written by another optcc, e.g. from another checkout). Steps, batch 1: a prompt
of ``--prompt`` tokens with an empty past, and one-token decode steps after a past of each
``--pasts`` length (mask all ones). onnxruntime CPU, one intra-op thread, ``ORT_ENABLE_ALL``;
each model gets ``--sessions`` sessions (two sessions of one model differ by up to several
percent on their own: where their buffers land), which share its ``--runs`` runs per step:
every session runs once per round, ``runs / sessions`` rounds, the order reversed every
other round, timed by the process's CPU time (``time.process_time``: the machine may be
shared); a model's time is the median over its sessions' runs. The ``A/A`` column is the
ratio of the medians of the two halves of the ``-O3 no attention`` sessions: what the same
model measures against itself, the noise floor of the last column.

Usage: python benchmarks/decoder_attention.py [--out DIR] [--models gpt2,llama,llama-causal]
       [--runs 200] [--sessions 4] [--prompt 128] [--pasts 128,512] [--profile] [--page FILE.md]

``--page FILE.md`` writes the table as a page with the command, date, versions and machine.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optcc  # noqa: E402

GPT2 = {"n_layer": 4, "n_embd": 256, "n_head": 4, "vocab_size": 2000, "n_positions": 1024}
LLAMA = {"vocab_size": 2000, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 1024}


ATTENTION_PASSES = ("fuse-ort-attention", "fuse-ort-gqa")
REFERENCE = "-O3 no attention"


def export(model: str, out: Path) -> Path:
    """The cached TorchScript export of ``model`` (opset 17), or the onnx-helper decoder."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{model}_kv.onnx"
    if path.exists():
        return path
    if model == "llama-causal":
        from fixtures.llama_decoder import llama_decoder

        onnx.save(llama_decoder(layers=LLAMA["num_hidden_layers"], hidden=LLAMA["hidden_size"],
                                heads=LLAMA["num_attention_heads"], kv_heads=LLAMA["num_key_value_heads"],
                                vocab=LLAMA["vocab_size"], positions=LLAMA["max_position_embeddings"],
                                padding=False), path)
        return path
    if model == "llama":
        from fixtures import llama_hf

        return llama_hf.export_kv(path, exporter="torchscript", opset=17, config=LLAMA)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from fixtures import gpt2_hf

    torch.manual_seed(0)
    return gpt2_hf.export_model(GPT2LMHeadModel(GPT2Config(**GPT2)).eval(), path)


def step_feeds(model: onnx.ModelProto, seq: int, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Batch-1 feeds for one step: ``seq`` new tokens after ``past`` cached ones, mask all ones."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for graph_input in model.graph.input:
        name = graph_input.name
        dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
        if name == "input_ids":
            feeds[name] = rng.integers(0, 1000, (1, seq)).astype(np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((1, past + seq), np.int64)
        elif name == "position_ids":
            feeds[name] = np.arange(past, past + seq, dtype=np.int64)[None]
        else:  # (batch, heads, past, head)
            feeds[name] = rng.standard_normal((1, dims[1], past, dims[3])).astype(np.float32)
    return feeds


def session(model: str | bytes, profile: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def interleaved(sessions: dict[str, list[ort.InferenceSession]], feeds: dict[str, np.ndarray],
                rounds: int) -> dict[str, list[list[float]]]:
    """CPU milliseconds of each run per session, per model: every session runs once per
    round, the order reversed every other round."""
    order = [(name, i, s) for name, group in sessions.items() for i, s in enumerate(group)]
    times: dict[str, list[list[float]]] = {k: [[] for _ in group] for k, group in sessions.items()}
    for _, _, s in order:
        for _ in range(3):
            s.run(None, feeds)
    for round_ in range(rounds):
        for name, i, s in order if round_ % 2 == 0 else order[::-1]:
            start = time.process_time()
            s.run(None, feeds)
            times[name][i].append(1e3 * (time.process_time() - start))
    return times


def medians(times: dict[str, list[list[float]]]) -> dict[str, float]:
    """Median over all sessions' runs per model, and ``A/A``: the reference model's first half
    of sessions over its second half (1 session: its first half of rounds over the second)."""
    ms = {k: float(np.median(np.concatenate(v))) for k, v in times.items()}
    reference = times[REFERENCE]
    if len(reference) > 1:
        half = len(reference) // 2
        first, second = np.concatenate(reference[:half]), np.concatenate(reference[half:])
    else:
        first, second = np.array_split(np.array(reference[0]), 2)
    ms["A/A"] = float(np.median(first) / np.median(second))
    return ms


def attention_ops(model: onnx.ModelProto) -> str:
    ops = [n.op_type for n in model.graph.node if n.op_type in ("MultiHeadAttention", "GroupQueryAttention",
                                                                  "Attention")]
    return ", ".join(f"{ops.count(o)} {o}" for o in sorted(set(ops))) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/optcc_decoder_attention"))
    parser.add_argument("--models", default="gpt2,llama,llama-causal")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=4, help="sessions per model, sharing its runs")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--pasts", default="128,512")
    parser.add_argument("--baseline", action="append", default=[], metavar="MODEL=FILE",
                        help="an earlier -O3 output of MODEL, timed as column 'before'")
    parser.add_argument("--profile", action="store_true", help="write onnxruntime profiles beside the models")
    parser.add_argument("--page", type=Path, help="write the table as a page (command, date, versions, machine)")
    args = parser.parse_args()
    start = time.perf_counter()
    baselines = dict(item.split("=", 1) for item in args.baseline)
    rows = []
    written: dict[str, str] = {}
    for name in args.models.split(","):
        path = export(name, args.out)
        optimized = args.out / f"{name}_kv.O3.onnx"
        optcc.optimize(str(path), level=3, verify=False).save(optimized)
        no_attention = args.out / f"{name}_kv.O3-noattn.onnx"
        optcc.optimize(str(path), level=3, verify=False, disable=ATTENTION_PASSES).save(no_attention)
        written[name] = attention_ops(onnx.load(optimized))
        print(f"{name}: -O3 writes {written[name]}", file=sys.stderr)
        models = {"unfused": str(path), REFERENCE: str(no_attention), **({"before": baselines[name]} if name in baselines else {}),
                  "-O3": str(optimized)}
        original = onnx.load(path, load_external_data=False)
        steps = [(f"prompt {args.prompt}", args.prompt, 0)] + [
            (f"decode, past {p}", 1, int(p)) for p in args.pasts.split(",")]
        for label, seq, past in steps:
            feeds = step_feeds(original, seq, past)
            prefix = str(args.out / f"{name}_{seq}_{past}") if args.profile else None  # one profile per session
            sessions = {k: [session(v, f"{prefix}_{k.strip('-').replace(' ', '_')}_{i}" if prefix else None)
                            for i in range(args.sessions)] for k, v in models.items()}
            ms = medians(interleaved(sessions, feeds, max(1, args.runs // args.sessions)))
            if args.profile:
                for group in sessions.values():
                    for s in group:
                        s.end_profiling()
            rows.append((name, label, ms))
            print(name, label, {k: round(v, 3) for k, v in ms.items()}, file=sys.stderr, flush=True)
    table = markdown(rows, written)
    print(table)
    if args.page is not None:
        args.page.write_text(page(table, time.perf_counter() - start))


def markdown(rows: list[tuple[str, str, dict[str, float]]], written: dict[str, str]) -> str:
    columns = [c for c in rows[0][2] if c != "A/A"]
    lines = ["| model | -O3 writes | step | " + " | ".join(f"{c} (ms)" for c in columns)
             + " | A/A | -O3 / -O3 no attention |",
             "|---|---|---|" + "---|" * (len(columns) + 2)]
    for name, label, ms in rows:
        cells = " | ".join(f"{ms[c]:.3f}" for c in columns)
        lines.append(f"| {name} | {written[name]} | {label} | {cells} | {ms['A/A']:.3f} | {ms['-O3'] / ms[REFERENCE]:.3f} |")
    return "\n".join(lines)


def page(table: str, seconds: float) -> str:
    """The generated page: how it was made, then the table."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compare_peers import machine, versions  # the benchmark pages' one description of both

    found = versions(("optcc", "onnx", "onnxruntime", "numpy", "torch", "transformers"))
    command = "python benchmarks/decoder_attention.py " + " ".join(sys.argv[1:])
    return f"""# Decoder attention: per-step latency, unfused vs -O3 (generated)

Generated by `benchmarks/decoder_attention.py` (its docstring says what is measured); rerun it
to refresh this page.

- Command: `{command}`
- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; whole run {seconds / 60:.1f} min
- Machine: {machine()}; onnxruntime CPU, 1 intra-op thread
- Versions: {", ".join(f"{dist} {version}" for dist, version in found.items())}

Milliseconds of process CPU time per step, median of the interleaved runs of each model's
sessions; A/A is -O3 no attention against itself (half its sessions over the other half):
ratios within about that distance of 1 are noise.

{table}
"""


if __name__ == "__main__":
    main()
