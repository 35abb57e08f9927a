"""The ``optcc`` / ``python -m optcc`` command, and its ``inspect`` and ``compare`` verbs.

Exit codes (EXIT_HELP is the table ``--help`` and docs/cli.md show): 0 success; 1
verification failed; 2 bad input or usage; 3 internal error; 4 not verified; 5 requested
precision not applied. Nothing is written on 1, 2, 4 and 5 unless the matching opt-in
flag is given (--force, --allow-unverified, --allow-float-fallback).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
import signal
import sys
import textwrap
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import onnx
import onnx_ir
import onnxruntime

from optcc import ir as oir
from optcc.api import CACHE_RECOMPUTED, OptimizeResult, check_fixed_feeds, optimize
from optcc.compare import compare_models, format_comparison
from optcc.errors import (
    ISSUES_URL, BadInputError, CacheRecomputedWarning, OptccError, PipelineWarning, PrecisionNotAppliedError, PrecisionPassFailedError,
    Terminated, UnverifiedError, VerificationError, raise_terminated, stopped,
)
from optcc.infra.registry import available_passes
from optcc.infra.report import Report, short_reason
from optcc.inspect import format_inspection, inspect_model
from optcc.numerics import DEFAULT_SAMPLES, TOLERANCES, SampleAxisWarning, check_samples_vary, load_npz_samples
from optcc.numerics.task import DEFAULT_MARGIN, METRICS
from optcc.progress import Progress
from optcc.quant.cost_model import CPU_CLASSES
from optcc.quant.driver import MIN_GROUP_SAMPLES, SPEED_MACHINE_PREFIX, check_distinct
from optcc.quant.fallback import Target
from optcc.version import __version__

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_NOT_VERIFIED, EXIT_PRECISION_NOT_APPLIED = 4, 5
DEFAULT_TARGET_SQNR_DB = TOLERANCES["int8"].min_sqnr_db
SUBCOMMANDS = ("inspect", "compare")
# the command's own progress phases, before and after optimize()'s
READING_PHASE, WRITING_PHASE = "reading the model and samples", "writing the output"

EXIT_HELP = """\
exit codes ('nothing written' means no model: a --report is written on every exit):
  0  success (the output is written)
  1  verification failed: nothing written (--force writes it, still exit 1)
  2  bad input or usage: one line on stderr naming the file; nothing written
  3  internal error: one line saying where; please report it (nothing written; when it is
     a --fp16/--int8/--weights pass that raised, --allow-float-fallback writes the model
     without that precision and exits 0 with a warning)
  4  not verified: verification could not run (onnxruntime cannot run the original
     with the available inputs, custom ops without their library, a string input and no
     --inputs, ...); nothing written
     (--allow-unverified writes it and exits 0 with a warning)
  5  requested precision not applied: --fp16/--int8/--int8-dynamic/--weights was declined or
     reverted, so the result would be float32 (float16 when --fp16 --weights declines the
     weights); nothing written (--allow-float-fallback writes it and exits 0 with a warning)"""

EXAMPLES = """\
examples:
  optcc model.onnx                          -O2, verified, writes model.opt.onnx
  optcc model.onnx -O3 -o fast.onnx --report report.json
  optcc model.onnx --fp16                   float16 weights and compute, verified
  optcc model.onnx -O3 --fp16 --weights int4
                                            LLM on a GPU: float16 compute, int4 MatMulNBits weights
  optcc model.onnx --int8 --calibration calib.npz
  optcc det.onnx --int8 --calibration page=pages.npz --calibration photo=photos.npz \\
        --int8-metric @photo=added-boxes    each kind of input held out and judged apart
  optcc model.onnx --overwrite-input-shape images:1,3,640,640
  optcc inspect model.onnx                  inputs, outputs, opsets, ops, sizes
  optcc compare model.onnx model.opt.onnx --numerics fusion
"""

_VERSION = (f"optcc {__version__} (onnx {onnx.__version__}, onnx-ir {onnx_ir.__version__}, "
            f"onnxruntime {onnxruntime.__version__})")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse's code too)
        self.exit(EXIT_BAD_INPUT, f"optcc: usage error: {message} (see --help)\n")


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=34, width=100)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="optcc",
        usage="optcc MODEL [options]\n       optcc inspect MODEL [--json]\n"
              "       optcc compare A B [--inputs X.npz] [--numerics KIND | --rtol R --atol A]",
        description="Optimize an ONNX model and verify it against the original with onnxruntime.",
        epilog=EXAMPLES + "\n" + EXIT_HELP,
        formatter_class=_formatter,
    )
    p.add_argument("model", nargs="?", help="the .onnx model to optimize")
    p.add_argument("--version", action="version", version=_VERSION)

    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", metavar="OUT",
                   help="output path (default: beside MODEL, .opt before its .onnx suffix, else MODEL.opt.onnx)")
    g.add_argument("--external-data", choices=["auto", "on", "off"], default="auto",
                   help="weights in a separate file: auto (when the input had it or the weights near 2 GB), "
                        "on, off (default auto)")
    g.add_argument("--external-data-threshold", type=int, metavar="BYTES",
                   help="with external data: tensors of at least BYTES go to the data file (default 1024)")
    g.add_argument("--external-data-location", metavar="NAME",
                   help="with external data: the data file's name beside the output (default OUT.data)")
    g.add_argument("--report", metavar="FILE", help="write the report: HTML for FILE.html, else JSON "
                                                     "(also when nothing else is written)")

    g = p.add_argument_group("optimization")
    g.add_argument("-O", dest="levels", type=int, choices=range(4), action="append", default=[], metavar="{0,1,2,3}",
                   help="optimization level: -O0 normalize, -O1 exact, -O2 fusions (default), -O3 runtime ops; "
                        "two different levels are refused")
    g.add_argument("--passes", help="comma-separated passes to run instead of the level's pipeline")
    g.add_argument("--disable", default="", help="comma-separated passes to leave out")
    g.add_argument("--fold-large", action="store_true",
                   help="constant-fold even when folded tensors grow the model by more than 1 MiB")
    g.add_argument("--strict", action="store_true",
                   help="stop at the first pass that fails instead of reverting it")
    g.add_argument("--target-opset", type=int, metavar="N",
                   help="first convert the model to opset N (onnx's version converter, verified), so -O2 can "
                        "use newer standard ops such as Attention (23); never downgrades")

    g = p.add_argument_group("input shapes")
    g.add_argument("--overwrite-input-shape", action="append", default=[], metavar="NAME:D0,D1,...",
                   help="fix this input's shape in the written model, so folding can specialise (repeatable; "
                        "also sizes the verification inputs)")
    g.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...",
                   help="sizes for an input's dynamic dims in the generated verification inputs only "
                        "(repeatable; the written model keeps its dynamic dims)")
    g.add_argument("--input-range", action="append", default=[], metavar="NAME:LO,HI",
                   help="value range of an input in the generated verification inputs (repeatable), "
                        "e.g. pixel_values:0,1 or sr:16000,16000")

    g = p.add_argument_group("FP16")
    g.add_argument("--fp16", action="store_true", help="convert to float16 after the pipeline")
    g.add_argument("--fp16-io", choices=["float32", "float16"], default="float32",
                   help="with --fp16: the graph inputs/outputs' type (default float32: one Cast at each)")
    g.add_argument("--fp16-block", action="append", default=[], metavar="OPTYPE|NODE",
                   help="keep these op types or node names in float32 with --fp16 (repeatable, comma-separated)")

    g = p.add_argument_group("INT8")
    g.add_argument("--int8", action="store_true", help="quantize to INT8 after the pipeline")
    g.add_argument("--calibration", action="append", default=[], metavar="[LABEL=]DATA",
                   help="calibration data (.npz or a folder of them) for --int8, or for --weights int8's bias "
                        "correction; with --int8, repeat it as LABEL=DATA to label each kind of input (a group; "
                        "one DATA per LABEL): every group is held out and judged apart; docs/int8.md")
    g.add_argument("--calibration-method", choices=["minmax", "percentile", "entropy", "mse"], default="minmax")
    g.add_argument("--no-int8-speed-check", action="store_true",
                   help="keep the INT8 model even when it is not faster than float32")
    g.add_argument("--int8-cpu", choices=list(CPU_CLASSES), metavar="{" + ",".join(CPU_CLASSES) + "}",
                   help="with --int8: the CPU class the speed decision is modelled for (default x86-vnni on every "
                        "machine; the summary names this machine's class where it differs); docs/int8.md")
    g.add_argument("--int8-target-sqnr", type=float, metavar="DB",
                   help="with --int8, --int8-dynamic or --weights: an output judged by SQNR (--int8-metric sqnr or "
                        f"target) passes at this SQNR in dB (default {DEFAULT_TARGET_SQNR_DB:g}); another value is "
                        "also required of every output by the final verification; docs/int8.md")
    g.add_argument("--calibration-cache", metavar="DIR",
                   help="with --int8: keep calibration statistics in DIR (keyed by model, data and method) and reuse them")
    g.add_argument("--no-int8-bias-correction", action="store_true",
                   help="with --int8: keep the quantized Convs' and Gemms' biases as rounded (no empirical bias correction)")
    g.add_argument("--int8-metric", action="append", default=[], metavar="[KEY=]METRIC",
                   help="with --int8, --int8-dynamic or --weights: how the quantized model is judged against "
                   "float32's noise floor: "
                   f"{', '.join(('auto', *METRICS))} (auto, the default: from each output's nature), or target "
                   "(SQNR and argmax thresholds only); repeatable as @GROUP=METRIC, OUTPUT=METRIC or "
                   "OUTPUT@GROUP=METRIC for one group or output; docs/int8.md")
    g.add_argument("--int8-metric-margin", type=float, default=None, metavar="X",
                   help="with --int8, --int8-dynamic or --weights: accept a deviation up to X times float32's own "
                   "noise floor (default "
                   f"{DEFAULT_MARGIN:g}; 1 asks for the floor itself); docs/int8.md")
    g.add_argument("--int8-per-tensor", action="store_true",
                   help="with --int8: one weight scale per tensor instead of per output channel")
    g.add_argument("--int8-activations", choices=["uint8", "int8"], default="uint8",
                   help="with --int8: activations uint8 asymmetric (default) or int8 symmetric")
    g.add_argument("--int8-exclude", action="append", default=[], metavar="OPTYPE|NODE",
                   help="with --int8: keep these op types, node names or output names float (repeatable, comma-separated)")
    g.add_argument("--int8-dynamic", action="store_true",
                   help="quantize MatMuls dynamically to INT8 (no calibration data needed)")
    g.add_argument("--weights", choices=["int4", "int8"],
                   help="weight-only quantization: MatMul/Gemm weights block-wise (MatMulNBits at -O3, else "
                        "DequantizeLinear); with int8 also Conv weights per channel (biases corrected on --calibration); "
                        "int4 that misses the verification raises its most sensitive layers to int8 until it passes; "
                        "with --fp16, after it: float16 layers get float16 scales")
    g.add_argument("--allow-float-fallback", action="store_true",
                   help="when FP16/INT8 is declined or reverted, write the float model (exit 0, a warning) "
                        "instead of exit 5")

    g = p.add_argument_group("verification")
    g.add_argument("--verify", dest="verify", action="store_true", default=True,
                   help="verify numerics against the original (default)")
    g.add_argument("--no-verify", dest="verify", action="store_false", help="skip verification")
    g.add_argument("--verify-each", action="store_true",
                   help="verify after every pass and revert any pass that breaks numerics")
    g.add_argument("--inputs", metavar="DATA", help="verification inputs: an .npz with one array per graph input, "
                   "each with a leading sample axis, or a folder of them")
    g.add_argument("--providers", help="execution providers to verify on, e.g. cpu,cuda "
                   "(default: cpu, plus cuda when available)")
    g.add_argument("--force", action="store_true", help="write the output even if verification fails (exit 1)")
    g.add_argument("--allow-unverified", action="store_true",
                   help="when verification cannot run, write the output (exit 0, a warning) instead of exit 4")

    g = p.add_argument_group("information")
    g.add_argument("--list-passes", action="store_true", help="list the registered passes and exit")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="also print every pass (status, time, op changes) and every output's metrics")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing on success but the opt-in warnings and the note on a samples file read "
                        "as one sample")
    return p


def build_inspect_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="optcc inspect", formatter_class=_formatter,
                description="Describe a model: inputs/outputs (dtypes, shapes, dynamic dims), opsets, "
                            "op histogram, node count, sizes, external data files.",
                epilog="exit codes: 0 described; 2 bad input (one line naming the file)")
    p.add_argument("model", help="the .onnx model")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def build_compare_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="optcc compare", formatter_class=_formatter,
                description="Run two models on the same inputs and judge every output of B against A, the "
                            "reference, as optcc's verifier judges an optimized model against its original "
                            "(--numerics), or by numpy's allclose rule (--rtol/--atol).",
                epilog="exit codes: 0 every output matches; 1 a mismatch (or an output only one model has); "
                       "2 bad input; 4 onnxruntime cannot run A or B, or the samples compare nothing")
    p.add_argument("a", metavar="A", help="the reference model")
    p.add_argument("b", metavar="B", help="the model compared with it")
    p.add_argument("--inputs", metavar="DATA", help="inputs: an .npz with one array per graph input, leading "
                                                    "sample axis, or a folder of them (default: generated from A's "
                                                    "inputs)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...",
                   help="sizes for an input's dynamic dims in generated inputs (repeatable)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help=f"generated samples, as verification generates them (default {DEFAULT_SAMPLES})")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated inputs (default 0)")
    p.add_argument("--numerics", choices=list(TOLERANCES), default=None,
                   help="judge B as optcc's verifier judges this kind of change (default exact): max relative "
                        "error (exact; fusion with the verifier's per-element allowances), SQNR or the task "
                        "(fp16), the task against A's noise floor (int8)")
    p.add_argument("--int8-metric", action="append", default=[], metavar="[OUTPUT=]METRIC",
                   help="with --numerics int8: the task metric, as optimizing's --int8-metric (repeatable as "
                        "OUTPUT=METRIC)")
    p.add_argument("--int8-metric-margin", type=float, default=None, metavar="X",
                   help=f"with --numerics int8: accept a deviation up to X times A's own noise floor "
                        f"(default {DEFAULT_MARGIN:g})")
    p.add_argument("--rtol", type=float, help="elementwise |b - a| <= atol + rtol * |a| instead of --numerics")
    p.add_argument("--atol", type=float, help="see --rtol")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _parse_shapes(items: Sequence[str], flag: str = "--input-shape") -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        try:
            values = [int(d) for d in dims.split(",") if d.strip()]
        except ValueError:
            values = []
        if not sep or not name or not values or any(v <= 0 for v in values):
            raise BadInputError(f"{flag} '{item}' is not NAME:D0,D1,... with positive sizes")
        if name in shapes and shapes[name] != values:
            raise BadInputError(f"{flag} gives '{name}' twice with different sizes")
        shapes[name] = values
    return shapes


def _parse_ranges(items: Sequence[str]) -> dict[str, tuple[float, float]]:
    ranges: dict[str, tuple[float, float]] = {}
    for item in items:
        name, sep, bounds = item.rpartition(":")
        try:
            lo, hi = (float(b) for b in bounds.split(","))
        except ValueError:
            lo = hi = float("nan")
        if not sep or not name or not lo <= hi:
            raise BadInputError(f"--input-range '{item}' is not NAME:LO,HI with LO <= HI")
        ranges[name] = (lo, hi)
    return ranges


_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_METRIC_NAMES = ("auto", *METRICS)


def _calibration_sources(items: Sequence[str]) -> list[tuple[str | None, str]]:
    """(label or None, DATA) per ``--calibration``: ``LABEL=DATA`` when the text before the
    first '=' holds no '/' (a path with '=' in a name is given with a folder: ``./a=b.npz``),
    else the whole text is DATA; a file named ``LABEL=DATA`` is refused as ambiguous. Every
    DATA is labelled, or one is given; a label is given once (a group of several files is
    one folder)."""
    sources: list[tuple[str | None, str]] = []
    for item in items:
        label, sep, data = item.partition("=")
        if not sep or "/" in label or os.sep in label:
            sources.append((None, item))
            continue
        if not label:
            raise BadInputError(f"--calibration '{item}' names no LABEL before '=' (LABEL=DATA)")
        if not _LABEL.fullmatch(label):
            raise BadInputError(f"--calibration '{item}': the label '{label}' must be letters, digits, '_', '-' "
                                "or '.', starting with a letter, digit or '_' (LABEL=DATA)")
        if not data:
            raise BadInputError(f"--calibration '{item}' names no DATA after '{label}='")
        if os.path.exists(item):  # a file named LABEL=DATA: which was meant is not for optcc to guess
            raise BadInputError(f"--calibration '{item}' is a file and reads as LABEL '{label}', DATA '{data}': give "
                                f"the file with its folder (./{item}), or the label's DATA so ({label}=./{data})")
        given = next((d for other, d in sources if other == label), None)
        if given is not None:
            raise BadInputError(f"--calibration gives the label '{label}' twice ({label}={given}, {item}): one DATA "
                                f"per label; for a group of several files, put them in one folder ({label}=FOLDER)")
        sources.append((label, data))
    labelled = sum(label is not None for label, _ in sources)
    if labelled and labelled < len(sources):
        raise BadInputError("--calibration: label every DATA (LABEL=DATA) or give one unlabelled DATA")
    if not labelled and len(sources) > 1:
        raise BadInputError("--calibration is given more than once: label each DATA (LABEL=DATA) to judge "
                            "each kind of input apart, or put the files in one folder")
    return sources


def _check_metric_groups(items: Sequence[str], labels: Sequence[str]) -> None:
    """BadInputError unless every ``@GROUP`` of ``--int8-metric`` (``@GROUP=METRIC`` or
    ``OUTPUT@GROUP=METRIC``) is the LABEL of a ``--calibration LABEL=DATA``."""
    for item in items:
        key = item.rpartition("=")[0]
        at, group = key.rpartition("@")[1:]
        if not at or group in labels:
            continue
        if not labels:
            raise BadInputError(f"--int8-metric '{item}' names group '{group}', but no --calibration is labelled "
                                f"(give the samples of group '{group}' as --calibration {group}=DATA)")
        raise BadInputError(f"--int8-metric '{item}' names group '{group}', which no --calibration labels "
                            f"(labels: {', '.join(labels)})")


def _int8_metric(items: Sequence[str]) -> str | dict[str, str] | None:
    """The ``metric`` of ``quantize_int8`` from ``--int8-metric``: one plain METRIC
    (default auto; "target" is None: the plain thresholds), and ``KEY=METRIC`` for an
    output, ``@GROUP`` or ``OUTPUT@GROUP``, which make a mapping (``*``: the plain one)."""
    plain: list[str] = []
    keyed: dict[str, str] = {}
    for item in items:
        key, sep, name = item.rpartition("=")
        if sep and name == "target":
            raise BadInputError(f"--int8-metric '{item}': target (the SQNR and argmax thresholds alone) judges every "
                                "output: it takes no metric per group or output (give --int8-metric target alone)")
        if name not in _METRIC_NAMES and (sep or name != "target"):
            allowed = ", ".join((*_METRIC_NAMES, *(() if sep else ("target",))))
            raise BadInputError(f"--int8-metric '{item}': unknown metric '{name}' (use {allowed})")
        if not sep:
            plain.append(name)
        elif not key or key == "@":
            raise BadInputError(f"--int8-metric '{item}' names no output or @GROUP before '='")
        elif keyed.setdefault(key, name) != name:
            raise BadInputError(f"--int8-metric gives '{key}' two metrics ({keyed[key]}, {name})")
    if len(set(plain)) > 1:
        raise BadInputError(f"--int8-metric gives two metrics for every output ({', '.join(dict.fromkeys(plain))})")
    default = plain[0] if plain else "auto"
    if not keyed:
        return None if default == "target" else default
    if default == "target":
        raise BadInputError("--int8-metric target (the SQNR and argmax thresholds alone) judges every output: "
                            "it takes no metric per group or output")
    return {**({"*": default} if default != "auto" else {}), **keyed}


def default_output(model: str) -> Path:
    """Beside ``model``: ``.opt`` before its ``.onnx`` suffix (any case), else ``.opt.onnx``
    after its whole name (a dot in ``net-v1.5`` starts no suffix: ``net-v1.5.opt.onnx``)."""
    path = Path(model)
    if path.suffix.lower() == ".onnx":
        return path.with_name(f"{path.stem}.opt{path.suffix}")
    return path.with_name(f"{path.name}.opt.onnx")


def optimization_level(args: argparse.Namespace) -> int:
    """The one ``-O`` level given (2 when none); BadInputError when two differ: which was
    meant is not for optcc to guess (the same level repeated is one level)."""
    levels = list(dict.fromkeys(args.levels))
    if len(levels) > 1:
        raise BadInputError(f"{' and '.join(f'-O{n}' for n in levels)} conflict: give one optimization level")
    return levels[0] if levels else 2


def _first_paragraph(text: str) -> str:
    paragraph = []
    for line in text.strip().splitlines():
        if not line.strip():
            break
        paragraph.append(line.strip())
    return " ".join(paragraph)


def _list_passes() -> str:
    """Every registered pass: name, lowest level, and the first paragraph of its docstring."""
    rows = []
    for info in available_passes().values():
        level = "-" if info.level is None else f"O{info.level}"
        doc = inspect.getdoc(info.factory) or info.description or ""
        head = f"{info.name:<32} {level:<4} "
        text = _first_paragraph(doc) or "(no description)"
        rows.append(textwrap.fill(text, width=100, initial_indent=head, subsequent_indent=" " * len(head)))
    return "\n".join(rows)


def _write_text_atomic(path: Path, text: str) -> None:
    with oir.replacing(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def _check_flags(
    args: argparse.Namespace, sources: Sequence[tuple[str | None, str]]
) -> str | dict[str, str] | None:
    """Usage errors, before anything is read; ``sources``: ``--calibration`` parsed. Returns
    ``--int8-metric`` parsed (``_int8_metric``)."""
    if not args.model:
        raise BadInputError("no MODEL given (see --help)")
    if args.int8 and not args.calibration:
        raise BadInputError("--int8 needs --calibration DATA (.npz or a folder of them)")
    labels = [label for label, _ in sources if label is not None]
    if labels:
        if not args.int8:
            raise BadInputError("labelled --calibration (LABEL=DATA) is used with --int8")
        if args.inputs:
            raise BadInputError("--inputs with labelled --calibration: the verification judges each group on "
                                "the calibration samples (leave --inputs out)")
    metric = _int8_metric(args.int8_metric)  # a bad entry is a usage error before anything runs
    # the flags that say how an INT8 result is judged: without one, nothing they judge
    judging = {"--int8-metric": bool(args.int8_metric), "--int8-metric-margin": args.int8_metric_margin is not None,
               "--int8-target-sqnr": args.int8_target_sqnr is not None}
    for flag, given in judging.items():
        if given and not (args.int8 or args.int8_dynamic or args.weights):
            raise BadInputError(f"{flag} is used with --int8, --int8-dynamic or --weights (it judges their result)")
    _check_metric_groups(args.int8_metric, labels)
    optimization_level(args)
    if args.quiet and args.verbose:
        raise BadInputError("-q and -v exclude each other (print nothing on success, or everything)")
    modes = [flag for flag, given in (("--fp16", args.fp16), ("--int8", args.int8),
                                      ("--int8-dynamic", args.int8_dynamic), ("--weights", args.weights)) if given]
    if len(modes) > 1 and modes != ["--fp16", "--weights"]:
        # each is a whole precision plan for the model; combined, one would undo the other's (FP16 then
        # weight-only composes: the weights are quantized in each layer's float type)
        why = ("; a mix gains nothing on the providers optcc models: onnxruntime on x86 runs float16 as float32, "
               "its CUDA provider runs QDQ INT8 through float kernels (docs/int8.md, Providers)"
               if {"--fp16", "--int8"} <= set(modes) else "")
        raise BadInputError(f"{' and '.join(modes)} exclude each other (choose one precision{why})")
    if args.passes is not None and not _split(args.passes):
        raise BadInputError("--passes names no pass (give a comma-separated list, or leave it out for -O's)")
    for flag, given in (("--fp16-io", args.fp16_io != "float32"), ("--fp16-block", args.fp16_block)):
        if given and not args.fp16:
            raise BadInputError(f"{flag} is used with --fp16")
    if args.calibration and not (args.int8 or args.fp16 or args.weights):
        raise BadInputError("--calibration is used with --int8, --fp16 or --weights")
    int8_only = {"--calibration-method": args.calibration_method != "minmax",
                 "--no-int8-speed-check": args.no_int8_speed_check,
                 "--calibration-cache": args.calibration_cache, "--int8-per-tensor": args.int8_per_tensor,
                 "--int8-activations": args.int8_activations != "uint8", "--int8-exclude": args.int8_exclude,
                 "--no-int8-bias-correction": args.no_int8_bias_correction, "--int8-cpu": args.int8_cpu}
    for flag, given in int8_only.items():
        if given and not args.int8:
            raise BadInputError(f"{flag} is used with --int8")
    _check_margin(args.int8_metric_margin)
    _check_target_sqnr(args.int8_target_sqnr)
    if args.allow_float_fallback and not (args.int8 or args.fp16 or args.int8_dynamic or args.weights):
        raise BadInputError("--allow-float-fallback is used with --fp16, --int8, --int8-dynamic or --weights")
    if args.external_data == "off" and (args.external_data_threshold is not None or args.external_data_location):
        raise BadInputError("--external-data-threshold and --external-data-location need external data "
                            "(--external-data on or auto)")
    if args.external_data_threshold is not None and args.external_data_threshold < 0:
        raise BadInputError("--external-data-threshold must be 0 or more bytes")
    location = args.external_data_location
    if location is not None and (not location or Path(location).name != location or location in (".", "..")):
        raise BadInputError(f"--external-data-location '{location}' must be a file name (no folder)")
    return metric


def _check_not_sample_data(written: Sequence[tuple[str, Path | None]], inputs: str | None,
                           sources: Sequence[tuple[str | None, str]]) -> None:
    """No file written (``written``: what it is, as the error names it, and its path) may be
    one the samples are read from (--inputs, --calibration: a file, or the .npz files of a
    folder): writing it would destroy the user's data."""
    given_data = [("--inputs", inputs)] if inputs else []
    given_data += [("--calibration", data) for _, data in sources]
    for flag, given in given_data:
        source = Path(given)
        read = sorted(source.glob("*.npz")) if source.is_dir() else [source] if source.is_file() else []
        for what, path in ((w, p) for w, p in written if p is not None and p.exists()):
            if any(os.path.samefile(path, data) for data in read):
                raise BadInputError(f"{what} is a file of the {flag} data; refusing to overwrite it", path)


def run(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # onnxruntime's process-wide logger (sessions set their own level): optcc reports errors once, itself
    onnxruntime.set_default_logger_severity(4)
    if argv and argv[0] in SUBCOMMANDS and not Path(argv[0]).exists():
        return _run_inspect(argv[1:]) if argv[0] == "inspect" else _run_compare(argv[1:])
    args = build_parser().parse_args(argv)
    if args.list_passes:
        print(_list_passes())
        return EXIT_OK
    report = _ReportWritten()
    try:
        # the command is one progress phase: reading the model and samples and writing the
        # result are named too, and the log lines' clock starts here
        with Progress(READING_PHASE, 1, enabled=not args.quiet, bar=False) as phase:
            return _optimize(args, report, phase)
    except BaseException as error:  # the run ends without a result: the report says how, where it may be written
        if not report.written:
            _write_failure_report(args, error)
        raise


@dataclasses.dataclass
class _ReportWritten:
    """Whether ``--report`` was written by the run itself (its full report)."""

    written: bool = False


def _usable_report_path(args: argparse.Namespace) -> Path | None:
    """The ``--report`` path when the report may be written there by the rules every
    output follows (not the input model, a file it reads its weights from, the output, a
    file of the samples, a folder, a link, a device; its folder exists and is writable);
    else None. Used when the run ended before it checked the path itself."""
    if not args.report:
        return None
    try:
        path = oir.check_output_path(args.report, args.model, what="report")
        if args.model:
            _check_report_path(path, *_written_paths(args))
        # every DATA as given, and as the text after a LABEL=: the calibration flags may be what failed
        data = {part for item in args.calibration for part in (item, item.partition("=")[2]) if part}
        _check_not_sample_data([("report path", path)], args.inputs, [(None, item) for item in sorted(data)])
    except (BadInputError, OSError):
        return None
    return path


def _written_paths(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The output (default: beside the model) and the external-data file it may write
    beside it (None with ``--external-data off``)."""
    output = Path(args.output or default_output(args.model))
    data_file = None if args.external_data == "off" else \
        output.resolve().parent / (args.external_data_location or f"{output.name}.data")
    return output, data_file


def _check_report_path(report: Path, output: Path, data_file: Path | None) -> None:
    """BadInputError when ``--report`` is the output or the external-data file it may write."""
    if report.resolve() == output.resolve():
        raise BadInputError("--report and the output are the same file", report)
    if data_file is not None and report.resolve() == data_file.resolve():
        raise BadInputError("--report is the output's external-data file", report)


def _write_failure_report(args: argparse.Namespace, error: BaseException) -> None:
    """A minimal report for a run that ended by ``error`` before it had a result: its
    ``outcome`` (exit code, the one line said on stderr, nothing written), written
    atomically where ``_usable_report_path`` allows."""
    ended = _exit_of(error)
    path = _usable_report_path(args) if ended is not None else None
    if ended is None or path is None:
        return
    code, line = ended
    report = Report()
    report.outcome = {"exit_code": code, "output": None, "declined": {}, "error": line}
    try:
        _write_text_atomic(path, report.render_for(path, model=args.model))
    except (OSError, OptccError):  # the run's own error is what matters: said on stderr as before
        pass


def _optimize(args: argparse.Namespace, report: _ReportWritten, phase: Progress) -> int:
    """The optimizing command on parsed ``args``; ``report.written`` once ``--report`` is;
    ``phase``: the command's progress phase, renamed as it goes."""
    sources = _calibration_sources(args.calibration)
    metric = _check_flags(args, sources)
    # no file written may be the input model or one it reads its weights from (those are
    # found once, by loading the input, and only when one of the files exists already)
    output, data_file = _written_paths(args)
    written = [output, *([Path(args.report)] if args.report else []), *([data_file] if data_file else [])]
    reads = oir.read_weight_files(args.model) if any(p.exists() for p in written) else set()
    output = oir.check_output_path(args.output or output, args.model, reads)  # as given: a trailing '/'
    report_path = oir.check_output_path(args.report, args.model, reads, what="report") if args.report else None
    if report_path is not None:
        _check_report_path(report_path, output, data_file)
    if args.external_data_location and Path(args.external_data_location).name == output.name:
        raise BadInputError("--external-data-location is the output file itself", output)
    if data_file is not None:
        oir.check_output_path(data_file, args.model, reads)
    _check_not_sample_data([("output path", output), ("report path", report_path),
                            ("external data file", data_file)], args.inputs, sources)
    input_shapes = _parse_shapes(args.input_shape)
    fixed_shapes = _parse_shapes(args.overwrite_input_shape, "--overwrite-input-shape")
    with _sample_axis_notes() as notes:
        inputs = load_npz_samples(args.inputs, args.model) if args.inputs else None
        read_before = len(notes)
        loaded = [(label, path, load_npz_samples(path, args.model, purpose="calibration"))
                  for label, path in sources]
    # the calibration files read as one sample
    one_sample_files = [w.message for w in notes[read_before:] if isinstance(w.message, SampleAxisWarning)]
    if fixed_shapes:  # samples that cannot feed the fixed inputs are the samples file's fault
        given_samples = [(inputs, args.inputs, "verification")] if inputs is not None else []
        for given, path, purpose in [*given_samples, *((s, path, "calibration") for _, path, s in loaded)]:
            check_fixed_feeds(given, fixed_shapes, path, purpose)
    # the samples of every file in the order given; with labels, each sample's group
    calibration = [sample for _, _, samples in loaded for sample in samples] if loaded else None
    groups = [label for label, _, samples in loaded for _ in samples] if sources and sources[0][0] else None
    for label, path, samples in loaded:  # each group is one file's samples: a label is given once
        if label is not None and len(samples) < MIN_GROUP_SAMPLES:
            raise BadInputError(f"--calibration group '{label}' holds {len(samples)} sample(s), too few: each group "
                                f"needs at least {MIN_GROUP_SAMPLES} (one calibrates, one is held out)", path)
    given_files = f" (--calibration {', '.join(p for _, p in sources)})"
    if (args.int8 or args.fp16 or args.weights) and calibration is not None:  # said here, where the files are known
        check_samples_vary(calibration, args.model, given_files)
    if args.int8 and calibration is not None:  # said here, where the files and how they were read are known
        read_as = "".join(f"; {w.file} was read as one sample of batch {w.batch}: for {w.batch} samples, give each "
                          "array a leading sample axis (sample i is arr[i], e.g. arr[:, None])" for w in one_sample_files)
        check_distinct(calibration, args.model, f"{given_files}{read_as}", groups)
    weight_only: str | dict | None = args.weights
    if args.weights and calibration is not None and not args.int8:
        # weight-only: the samples correct the convolutions' biases and are what the result is judged
        # on (with --fp16 they also judge the float16 conversion)
        weight_only = {"bits": int(args.weights[3:]), "samples": calibration}
        inputs = calibration if inputs is None else inputs
        calibration = None

    target_sqnr = DEFAULT_TARGET_SQNR_DB if args.int8_target_sqnr is None else args.int8_target_sqnr
    status, hint, error_line = EXIT_OK, None, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PipelineWarning)  # the summary says the report's warnings
            warnings.showwarning = _cache_notes_one_line(warnings.showwarning)  # restored on leaving the block
            result = optimize(
                args.model,
                passes=_split(args.passes) or None,
                level=optimization_level(args),
                verify=args.verify,
                inputs=inputs,
                disable=_split(args.disable),
                verify_each=args.verify_each,
                providers=_split(args.providers) or None,
                input_shapes=input_shapes,
                input_ranges=_parse_ranges(args.input_range),
                overwrite_input_shapes=fixed_shapes,
                strict=args.strict,
                progress=not args.quiet,
                fp16=args.fp16,
                fp16_block=[b for item in args.fp16_block for b in _split(item)],
                fp16_keep_io=args.fp16_io == "float32",
                fp16_samples=calibration if args.fp16 else None,  # without --inputs they also judge the result
                int8_calibration=None if args.fp16 else calibration,
                int8_method=args.calibration_method,
                int8_options={"require_speedup": not args.no_int8_speed_check, "cpu": args.int8_cpu,
                              "target": Target(min_sqnr_db=target_sqnr),
                              "cache_dir": args.calibration_cache,
                              "per_channel": not args.int8_per_tensor,
                              "bias_correction": not args.no_int8_bias_correction,
                              "activation_type": args.int8_activations,
                              "metric": metric, "groups": groups,
                              "metric_margin": DEFAULT_MARGIN if args.int8_metric_margin is None
                              else args.int8_metric_margin,
                              "exclude": [e for item in args.int8_exclude for e in _split(item)]},
                tolerances={"int8": dataclasses.replace(TOLERANCES["int8"], min_sqnr_db=target_sqnr)},
                int8_dynamic=args.int8_dynamic,
                weight_only=weight_only,
                fold_large=args.fold_large,
                target_opset=args.target_opset,
                allow_unverified=args.allow_unverified,
                allow_float_fallback=args.allow_float_fallback,
            )
        said = _note_one_sample_judgement(result, one_sample_files, len(calibration or ()))
    except (VerificationError, UnverifiedError, PrecisionNotAppliedError, PrecisionPassFailedError) as error:
        result = error.result  # type: ignore[attr-defined]
        status = error.exit_code
        hint = {EXIT_VERIFY_FAILED: "--force", EXIT_NOT_VERIFIED: "--allow-unverified",
                EXIT_PRECISION_NOT_APPLIED: "--allow-float-fallback", EXIT_INTERNAL: "--allow-float-fallback"}[status]
        said = _note_one_sample_judgement(result, one_sample_files, len(calibration or ())) + _other_precision(result)
        error_line = f"{args.model}: {error}{said}; nothing written ({hint} writes it)"
        print(f"optcc: {error_line}", file=sys.stderr)
    if not args.quiet:
        for line in result.report.warnings:
            if line.startswith(SPEED_MACHINE_PREFIX):
                print(f"optcc: warning: {args.model}: {line}", file=sys.stderr)
    written = status == EXIT_OK or (status == EXIT_VERIFY_FAILED and args.force)
    phase.set_phase(WRITING_PHASE)
    if report_path is not None:
        # the report before the model: a report file that may not be replaced stops the run
        # with nothing written; a save failing after it has the report rewritten as that
        # failure (``run``: ``report.written`` is set once the model is saved)
        result.report.outcome = {"exit_code": status, "output": str(output) if written else None,
                                 "declined": dict(result.declined_precision),
                                 **({"error": error_line} if error_line is not None else {})}
        _write_text_atomic(report_path, result.report.render_for(report_path, model=args.model))
    if written:
        try:
            result.save(output, external_data={"auto": None, "on": True, "off": False}[args.external_data],
                        external_data_threshold=args.external_data_threshold,
                        external_data_location=args.external_data_location)
        except BaseException:
            if report_path is not None:  # it says the output was written: gone before ``run`` writes the failure
                report_path.unlink(missing_ok=True)
            raise
    report.written = report_path is not None
    if status == EXIT_OK:
        for line in _opt_in_warnings(args, result):
            print(line, file=sys.stderr)  # also with --quiet: the output is not what a clean run gives
    if not args.quiet or status != EXIT_OK:
        _print_summary(args, result, output if written else None, hint)
    return status


def _check_margin(margin: float | None) -> None:
    """--int8-metric-margin, where given, is a positive number (NaN is not)."""
    if margin is not None and not margin > 0:
        raise BadInputError("--int8-metric-margin must be a positive number")


def _check_target_sqnr(target_db: float | None) -> None:
    """--int8-target-sqnr, where given, is a finite number of dB above 0: at or below 0 dB
    (noise as strong as the signal) or NaN every candidate would pass."""
    if target_db is not None and not (math.isfinite(target_db) and target_db > 0):
        raise BadInputError(f"--int8-target-sqnr must be a finite number of dB above 0, got {target_db:g}")


def _note_one_sample_judgement(result: OptimizeResult, one_sample_files: Sequence[SampleAxisWarning],
                               samples: int) -> str:
    """When INT8 was declined and calibration files were read as one sample each
    (``SampleAxisWarning``), the sentence that says the judgement rested on ``samples``
    sample(s) because of it and how to give many, appended to the decline's reason (the
    summary, the warning and the report's outcome read it there); "" otherwise."""
    reason = result.precision.get("int8")
    if not reason or not one_sample_files:
        return ""
    files = ", ".join(f"{w.file} was read as one sample of batch {w.batch}" for w in one_sample_files)
    batch = one_sample_files[0].batch
    said = (f"; INT8 was judged on {samples} calibration sample{'' if samples == 1 else 's'}: {files}; for "
            f"{batch} samples, give each array a leading sample axis (sample i is arr[i], e.g. arr[:, None])")
    result.precision["int8"] = reason + said
    return said


def _verification_skipped(result: OptimizeResult) -> str | None:
    verification = result.report.verification
    if verification is None or verification.get("status") != "skipped":
        return None
    return verification.get("reason") or verification.get("summary") or "unknown reason"


def _opt_in_warnings(args: argparse.Namespace, result: OptimizeResult) -> list[str]:
    """One line per thing the user opted into that leaves the output less than asked for."""
    lines = []
    skipped = _verification_skipped(result)
    if skipped is not None:
        lines.append(f"optcc: warning: {args.model}: not verified ({skipped}); written because of --allow-unverified")
    # with --fp16 --weights, declined weights leave the float16 model: what is written is said as it is
    written = " + ".join(result.applied_precision) + " model" if result.applied_precision else "float model"
    for kind, reason in result.declined_precision.items():
        lines.append(f"optcc: warning: {args.model}: {kind} not applied ({reason}); the {written} is written "
                     "because of --allow-float-fallback")
    return lines


def _header(args: argparse.Namespace, result: OptimizeResult) -> str:
    """``optcc -O2 +int8`` or ``optcc -O2 (int8 declined: reason)``."""
    parts = [f"-O{optimization_level(args)}" if not args.passes else f"passes {args.passes}"]
    parts += [f"+{kind}" for kind in result.applied_precision]
    for kind, reason in result.declined_precision.items():
        parts.append(f"({kind} declined: {short_reason(reason, HEADER_REASON_CHARS)})")
    return "optcc " + " ".join(parts)


HEADER_REASON_CHARS = 120  # a decline's reason in the header; the error or warning line above says it whole


# summary warnings the CLI says in its own line (the JSON report keeps them)
_SAID_ELSEWHERE = ("warning: numerics not verified", "warning: INT8 not applied", "warning: FP16 not applied",
                   "warning: INT8-DYNAMIC not applied", "warning: WEIGHTS not applied",
                   f"warning: {SPEED_MACHINE_PREFIX}", f"warning: {CACHE_RECOMPUTED}")


def _other_precision(result: OptimizeResult) -> str:
    """Where INT8 was declined as not faster on a model of matrix products (a transformer),
    the modes that quantize those without a speed requirement; else ""."""
    why = result.declined_precision.get("int8") or ""
    ops = result.report.model_before.op_histogram if result.report.model_before else {}
    products = ops.get("MatMul", 0) + ops.get("Gemm", 0)
    if not why.startswith("INT8 is not faster") or products <= ops.get("Conv", 0):
        return ""
    return "; for its MatMul/Gemm weights, --int8-dynamic or --weights int8 quantize without a speed requirement"


def _print_summary(args: argparse.Namespace, result: OptimizeResult, output: Path | None, hint: str | None) -> None:
    target = str(output) if output else f"nothing written (use {hint or '--force'} to write anyway)"
    print(f"{_header(args, result)}: {args.model} -> {target}", file=sys.stderr)
    lines = [line for line in result.report.summary().splitlines() if not line.startswith(_SAID_ELSEWHERE)]
    if args.verbose:
        lines += _verbose_lines(result)
    print("\n".join(lines), file=sys.stderr)


def _verbose_lines(result: OptimizeResult) -> list[str]:
    lines = ["passes:"]
    for record in result.report.passes:
        delta = ", ".join(f"{op} {n:+d}" for op, n in record.op_delta.items()) or "-"
        reason = f" ({record.reason})" if record.reason else ""
        lines.append(f"  {record.name:<32} {record.status:<9} {record.time_s * 1000:8.1f} ms  "
                     f"nodes {record.nodes_before} -> {record.nodes_after}  {delta}{reason}")
    verification = result.report.verification or {}
    for out in verification.get("outputs", []):
        metrics = ", ".join(f"{label} {_g(out.get(key))}" for label, key in
                            (("max abs", "max_abs"), ("max rel", "max_rel"), ("SQNR dB", "sqnr_db"),
                             ("cosine", "cosine")))
        verdict = "" if out.get("passed") else f"  FAILED: {out.get('problem')}"
        lines.append(f"  output '{out.get('name')}' on {out.get('provider')}: {metrics}{verdict}")
    proof = verification.get("proof")
    if proof:
        lines += [f"  output '{name}': {'proved equal' if proved else 'not proved'}" for name, proved in proof["outputs"].items()]
    return lines


def _g(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _run_inspect(argv: Sequence[str]) -> int:
    args = build_inspect_parser().parse_args(argv)
    info = inspect_model(args.model)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return EXIT_OK


def _cache_notes_one_line(show: Callable[..., None]) -> Callable[..., None]:
    """``show`` (a ``warnings.showwarning``), except that a recomputed cache entry
    (``CacheRecomputedWarning``) is said as one ``optcc: warning:`` line."""
    def shown(message: Warning | str, category: type[Warning], *where: Any, **how: Any) -> None:
        if issubclass(category, CacheRecomputedWarning):
            print(f"optcc: warning: {message}", file=sys.stderr)
        else:
            show(message, category, *where, **how)
    return shown


@contextlib.contextmanager
def _sample_axis_notes() -> Iterator[list[warnings.WarningMessage]]:
    """Samples files read in the body; after it, each note that a file was read as one
    sample (``SampleAxisWarning``) printed as an ``optcc: note:`` line, before any check of
    the samples (a file read as one sample explains a group refused as too small). With -q
    too: how a file was read decides which samples the run uses, whatever it prints. The
    body is given the warnings recorded so far, in the order said."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", SampleAxisWarning)
        yield said
    for warning in said:
        if issubclass(warning.category, SampleAxisWarning):
            print(f"optcc: note: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


def _run_compare(argv: Sequence[str]) -> int:
    args = build_compare_parser().parse_args(argv)
    if args.numerics is not None and (args.rtol is not None or args.atol is not None):
        raise BadInputError("--numerics and --rtol/--atol exclude each other")
    if args.samples < 1:
        raise BadInputError("--samples must be at least 1")
    if (args.int8_metric or args.int8_metric_margin is not None) and args.numerics != "int8":
        raise BadInputError("--int8-metric and --int8-metric-margin judge --numerics int8 alone")
    if any("@" in item.rpartition("=")[0] for item in args.int8_metric):
        raise BadInputError("--int8-metric: compare judges one set of samples (no @GROUP)")
    _check_margin(args.int8_metric_margin)
    metric = _int8_metric(args.int8_metric)
    with _sample_axis_notes():
        inputs = load_npz_samples(args.inputs, args.a) if args.inputs else None
    result = compare_models(
        args.a, args.b,
        inputs=inputs,
        input_shapes=_parse_shapes(args.input_shape),
        samples=args.samples, seed=args.seed,
        numerics=args.numerics or "exact", rtol=args.rtol, atol=args.atol, inputs_label=args.inputs,
        task_metric=metric, task_margin=DEFAULT_MARGIN if args.int8_metric_margin is None else args.int8_metric_margin,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_comparison(result))
    return EXIT_OK if result.passed else EXIT_VERIFY_FAILED


class _ReaderMayLeave:
    """A text stream whose reader may go away (``| head``, ``| grep -q``): what is written
    after that is dropped, so a closed pipe changes neither the result nor the exit code."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._gone = False

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._gone = True
                _silence(self._stream)
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._gone = True
                _silence(self._stream)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _silence(stream: Any) -> None:
    """Point ``stream``'s descriptor at /dev/null: the interpreter's final flush of what is
    left in its buffer then meets no closed pipe."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's capture): nothing to flush
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _ReaderMayLeave(sys.stdout), _ReaderMayLeave(sys.stderr)
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = streams


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While the block runs in the main thread, SIGTERM (a timeout, a cancelled CI job, a
    stopped container) unwinds the run instead of ending the process where it stands, so
    that scratch folders and a half-written output's temporary file are removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_of(error: BaseException) -> tuple[int, str] | None:
    """The exit code of a run that ``error`` ended, and the line said on stderr for it
    (after ``optcc: ``); None for what is no end of a run (argparse's exits)."""
    if isinstance(error, OptccError):
        return error.exit_code, f"error: {error}"
    ended = stopped(error)
    if ended is not None:
        return ended
    if isinstance(error, BrokenPipeError):  # the reader of optcc's messages went away: nothing to say
        return EXIT_INTERNAL, "the reader of optcc's messages went away; nothing written"
    if isinstance(error, Exception):
        where = ""
        tb = error.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            where = f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"
        return EXIT_INTERNAL, (f"internal error: {type(error).__name__}: {error}{where}. "
                               f"Please report it at {ISSUES_URL} (set OPTCC_DEBUG=1 for the traceback)")
    return None


def _main(argv: Sequence[str] | None) -> int:
    try:
        with _sigterm_unwinds():
            return run(argv)
    except SystemExit as stop:  # argparse's --help, --version and usage errors
        return stop.code if isinstance(stop.code, int) else EXIT_BAD_INPUT
    except BrokenPipeError:  # the reader of optcc's messages went away mid-run: the run stops there
        for stream in (sys.stdout, sys.stderr):
            _silence(stream)
        return EXIT_INTERNAL
    except Exception as error:  # noqa: BLE001 - the last line of defence
        if os.environ.get("OPTCC_DEBUG") and not isinstance(error, OptccError):
            raise
        code, line = _exit_of(error)  # type: ignore[misc]
        print(f"optcc: {line}", file=sys.stderr)
        return code
    except (KeyboardInterrupt, Terminated) as error:
        code, line = _exit_of(error)  # type: ignore[misc]
        print(f"optcc: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
