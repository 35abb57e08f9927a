"""Static INT8 on a BERT-base-sized encoder: time per phase, CPU time and peak memory.

    python benchmarks/int8_bert_base.py [--model FILE.onnx] [--samples 16] [--seq 128] [--cli]
    python benchmarks/int8_bert_base.py --write-model FILE.onnx --write-data FILE.npz

The model: ``--model`` (e.g. a random-init ``transformers.BertModel(BertConfig())`` export
with inputs ``input_ids``, ``attention_mask``, ``token_type_ids``), or by default a BERT-base
graph written with onnx.helper as transformers' eager export does
(``weight_only_vs_ort.build_minilm``: 12 layers, hidden 768, 12 heads, FFN 3072, vocabulary
30522, ~420 MB float32) over random weights (normal, std 0.02, as BERT initializes). The
default model is built and saved by a child process (``--write-model``), so that the
memory its construction takes is not counted in the peak of the process that quantizes.
Data: ``--samples`` sequences of ``--seq`` random token ids, sample ``i`` right-padded by
``8 * (i % 8)`` positions (padding exercises the masked attention scores);
``--write-data`` saves them as the CLI's calibration ``.npz`` (one sample per index of
the leading axis).

It loads the model file with ``optcc.ir.load`` and runs
``optcc.quant.driver.quantize_int8`` (the ``--int8`` default: minmax calibration, task
judge, fallback, speed model) in this process, and prints the decision, the wall time
per phase (``stats["seconds"]``), the process's CPU time (user + system), its peak RSS
(``getrusage``) and the peak RSS during ``quantize_int8`` alone (Linux: ``VmHWM`` reset
before the call), and the machine's load average: wall times on a shared machine are
noisy, CPU time less so. ``--cli`` also runs ``python -m optcc MODEL --int8
--calibration DATA --allow-float-fallback`` on the same files in a child process and
prints its exit code, wall and CPU time, peak RSS and the sha256 of the file it writes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import subprocess
import sys
import tempfile
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


def write_model(path: str | os.PathLike) -> None:
    """The default BERT-base graph (``build_minilm`` over ``random_weights``) saved to ``path``."""
    import onnx
    from weight_only_vs_ort import build_minilm

    onnx.save(build_minilm(random_weights(), layers=LAYERS, heads=HEADS), str(path))


def write_data(path: str | os.PathLike, data: list[dict[str, np.ndarray]]) -> None:
    """``data`` as a calibration ``.npz``: one key per input, sample ``i`` at index ``i``."""
    np.savez(path, **{name: np.stack([feeds[name] for feeds in data]) for name in data[0]})


def _peak_reset() -> bool:
    """Reset this process's peak RSS (``VmHWM``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB ({n / 1e9:.2f} GB)"


def run_cli(model: str, data: str, folder: str) -> None:
    """The CLI on ``model`` and ``data`` in a child process: its exit code, wall and CPU
    time, peak RSS and the sha256 of what it writes."""
    out = os.path.join(folder, "int8_cli.onnx")
    command = [sys.executable, "-m", "optcc", model, "--int8", "--calibration", data, "-o", out,
               "--allow-float-fallback", "--quiet"]
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1])
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    digest = hashlib.sha256(Path(out).read_bytes()).hexdigest() if os.path.exists(out) else "nothing written"
    print(f"CLI ({' '.join(command[1:4])} --int8 ...): exit {code}, wall {wall:.1f} s, "
          f"CPU {usage.ru_utime + usage.ru_stime:.1f} s, peak RSS {_gib(usage.ru_maxrss * 1024)}; "
          f"output sha256 {digest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an exported BERT-base .onnx (default: the onnx.helper graph)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--cli", action="store_true", help="also run the CLI on the same model and data")
    parser.add_argument("--write-model", metavar="FILE", help="only save the default model to FILE")
    parser.add_argument("--write-data", metavar="FILE", help="only save the samples to FILE (.npz)")
    args = parser.parse_args()
    if args.write_model or args.write_data:
        if args.write_model:
            write_model(args.write_model)
        if args.write_data:
            names = ["input_ids", "attention_mask", "token_type_ids"]
            if args.model or args.write_model:
                import onnx

                graph = onnx.load(args.model or args.write_model, load_external_data=False).graph
                names = [v.name for v in graph.input]
            write_data(args.write_data, samples(args.samples, args.seq, names))
        return
    with tempfile.TemporaryDirectory(prefix="int8_bert_base-") as folder:
        path = args.model
        if not path:
            path = os.path.join(folder, "bert_base.onnx")
            subprocess.run([sys.executable, __file__, "--write-model", path], check=True)
        start = time.perf_counter()
        model = optcc.ir.load(path)
        names = [v.name for v in model.graph.inputs]
        data = samples(args.samples, args.seq, names)
        loaded = time.perf_counter()
        cpu = os.times()
        resettable = _peak_reset()
        result, stats = quantize_int8(model, data)
        after = os.times()
        wall = time.perf_counter() - loaded
        phase_peak = _status_bytes("VmHWM") if resettable else None
        print(f"decision: {'INT8' if stats['modified'] else 'float32 (' + str(stats.get('declined')) + ')'}")
        if stats.get("reason"):
            print(f"reason: {stats['reason']}")
        print("phases (wall s):", stats["seconds"])
        print(f"quantize_int8: wall {wall:.1f} s, CPU {after.user - cpu.user + after.system - cpu.system:.1f} s "
              f"(user {after.user - cpu.user:.1f}, sys {after.system - cpu.system:.1f}); load {loaded - start:.1f} s")
        print(f"peak RSS {_gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}"
              + (f", during quantize_int8 {_gib(phase_peak)}" if phase_peak else "")
              + f"; load average {os.getloadavg()[0]:.2f}")
        del result, model
        if args.cli:
            calibration = os.path.join(folder, "calibration.npz")
            write_data(calibration, data)
            run_cli(path, calibration, folder)


if __name__ == "__main__":
    main()
