"""The ``optcc`` / ``python -m optcc`` command.

Exit codes: 0 success; 1 verification failed (nothing written unless --force);
2 bad input or usage (one line on stderr, nothing written); 3 internal error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn


from optcc import ir as oir
from optcc.api import OptimizeResult, optimize
from optcc.numerics.samples import load_npz_samples
from optcc.errors import ISSUES_URL, BadInputError, OptccError, VerificationError
from optcc.quant.fallback import Target
from optcc.infra.registry import available_passes
from optcc.numerics import TOLERANCES

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse's code too)
        self.exit(EXIT_BAD_INPUT, f"optcc: usage error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="optcc",
        description="Optimize an ONNX model and verify it against the original with onnxruntime.",
    )
    p.add_argument("model", nargs="?", help="the .onnx model to optimize")
    p.add_argument("-o", "--output", help="output path (default: MODEL with .opt before the suffix)")
    p.add_argument("-O", dest="level", type=int, choices=range(4), default=2, metavar="{0,1,2,3}",
                   help="optimization level: -O0 normalize, -O1 exact, -O2 fusions (default), -O3 runtime ops")
    p.add_argument("--passes", help="comma-separated passes to run instead of the level's pipeline")
    p.add_argument("--disable", default="", help="comma-separated passes to leave out")
    p.add_argument("--fold-large", action="store_true",
                   help="constant-fold even when folded tensors grow the model by more than 1 MiB")
    p.add_argument("--fp16", action="store_true", help="convert to float16 after the pipeline")
    p.add_argument("--int8", action="store_true", help="quantize to INT8 after the pipeline")
    p.add_argument("--calibration", help="calibration data (.npz or a folder of them) for --int8")
    p.add_argument("--calibration-method", choices=["minmax", "percentile", "entropy", "mse"], default="minmax")
    p.add_argument("--no-int8-speed-check", action="store_true",
                   help="keep the INT8 model even when it is not faster than float32")
    p.add_argument("--int8-target-sqnr", type=float, default=25.0,
                   help="INT8 accuracy target: SQNR in dB on every output, held-out samples (default 25)")
    p.add_argument("--calibration-cache", metavar="DIR",
                   help="with --int8: keep calibration statistics in DIR (keyed by model, data and method) and reuse them")
    p.add_argument("--no-int8-bias-correction", action="store_true",
                   help="with --int8: keep the quantized Convs' and Gemms' biases as rounded (no empirical bias correction)")
    p.add_argument("--int8-per-tensor", action="store_true",
                   help="with --int8: one weight scale per tensor instead of per output channel")
    p.add_argument("--int8-activations", choices=["uint8", "int8"], default="uint8",
                   help="with --int8: activations uint8 asymmetric (default) or int8 symmetric")
    p.add_argument("--int8-exclude", action="append", default=[], metavar="OPTYPE|NODE",
                   help="with --int8: keep these op types, node names or output names float (repeatable, comma-separated)")
    p.add_argument("--int8-dynamic", action="store_true",
                   help="quantize MatMuls dynamically to INT8 (no calibration data needed)")
    p.add_argument("--fp16-io", choices=["float32", "float16"], default="float32",
                   help="with --fp16: the graph inputs/outputs' type (default float32: one Cast at each)")
    p.add_argument("--fp16-block", action="append", default=[], metavar="OPTYPE|NODE",
                   help="keep these op types or node names in float32 with --fp16 (repeatable, comma-separated)")
    p.add_argument("--verify", dest="verify", action="store_true", default=True,
                   help="verify numerics against the original (default)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip verification")
    p.add_argument("--verify-each", action="store_true",
                   help="verify after every pass and revert any pass that breaks numerics")
    p.add_argument("--inputs", help="verification inputs: an .npz with one array per graph input, "
                   "each with a leading sample axis")
    p.add_argument("--providers", help="execution providers to verify on, e.g. cpu,cuda "
                   "(default: cpu, plus cuda when available)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D1,D2,...",
                   help="concrete shape for an input with dynamic dimensions (repeatable)")
    p.add_argument("--report", help="write the JSON report to this file")
    p.add_argument("--force", action="store_true", help="write the output even if verification fails")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first pass that fails instead of reverting it")
    p.add_argument("--list-passes", action="store_true", help="list the registered passes and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return p


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _parse_shapes(items: Sequence[str]) -> dict[str, list[int]]:
    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        try:
            values = [int(d) for d in dims.split(",") if d.strip()]
        except ValueError:
            values = []
        if not sep or not name or not values or any(v <= 0 for v in values):
            raise BadInputError(f"--input-shape '{item}' is not NAME:D1,D2,... with positive sizes")
        shapes[name] = values
    return shapes


def default_output(model: str) -> Path:
    path = Path(model)
    return path.with_name(f"{path.stem}.opt{path.suffix or '.onnx'}")


def _list_passes() -> str:
    rows = []
    for info in available_passes().values():
        level = "-" if info.level is None else f"O{info.level}"
        rows.append(f"{info.name:<32} {level:<4} {info.description}")
    return "\n".join(rows)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = oir.create_temp_file(path.resolve().parent, path.name)
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_passes:
        print(_list_passes())
        return EXIT_OK
    if not args.model:
        raise BadInputError("no MODEL given (see --help)")
    if args.int8 and not args.calibration:
        raise BadInputError("--int8 needs --calibration DATA (.npz or a folder of them)")
    if args.int8 and args.fp16:
        raise BadInputError("--int8 and --fp16 exclude each other")
    if args.fp16_io != "float32" and not args.fp16:
        raise BadInputError("--fp16-io is used with --fp16")
    if args.calibration and not (args.int8 or args.fp16):
        raise BadInputError("--calibration is used with --int8 or --fp16")
    int8_only = {"--calibration-cache": args.calibration_cache, "--int8-per-tensor": args.int8_per_tensor,
                 "--int8-activations": args.int8_activations != "uint8", "--int8-exclude": args.int8_exclude,
                 "--no-int8-bias-correction": args.no_int8_bias_correction}
    for flag, given in int8_only.items():
        if given and not args.int8:
            raise BadInputError(f"{flag} is used with --int8")
    output = oir.check_output_path(args.output or default_output(args.model), args.model)
    report_path = oir.check_output_path(args.report, args.model) if args.report else None
    if report_path is not None and report_path.resolve() == output.resolve():
        raise BadInputError("--report and the output are the same file", report_path)
    inputs = load_npz_samples(args.inputs, args.model) if args.inputs else None
    calibration = (load_npz_samples(args.calibration, args.model, purpose="calibration")
                   if args.calibration else None)

    status = EXIT_OK
    try:
        result = optimize(
            args.model,
            passes=_split(args.passes) or None,
            level=args.level,
            verify=args.verify,
            inputs=inputs,
            disable=_split(args.disable),
            verify_each=args.verify_each,
            providers=_split(args.providers) or None,
            input_shapes=_parse_shapes(args.input_shape),
            strict=args.strict,
            progress=not args.quiet,
            fp16=args.fp16,
            fp16_block=[b for item in args.fp16_block for b in _split(item)],
            fp16_keep_io=args.fp16_io == "float32",
            int8_calibration=calibration,
            int8_method=args.calibration_method,
            int8_options={"require_speedup": not args.no_int8_speed_check,
                          "target": Target(min_sqnr_db=args.int8_target_sqnr),
                          "cache_dir": args.calibration_cache,
                          "per_channel": not args.int8_per_tensor,
                          "bias_correction": not args.no_int8_bias_correction,
                          "activation_type": args.int8_activations,
                          "exclude": [e for item in args.int8_exclude for e in _split(item)]},
            tolerances={"int8": dataclasses.replace(TOLERANCES["int8"], min_sqnr_db=args.int8_target_sqnr)},
            int8_dynamic=args.int8_dynamic,
            fold_large=args.fold_large,
        )
    except VerificationError as error:
        result = error.result  # type: ignore[attr-defined]
        status = EXIT_VERIFY_FAILED
        print(f"optcc: {args.model}: {error}", file=sys.stderr)
    written = status == EXIT_OK or args.force
    if written:
        result.save(output)
    if report_path is not None:
        _write_text_atomic(report_path, result.report.render_for(report_path, model=args.model))
    if not args.quiet or status != EXIT_OK:
        _print_summary(args, result, output if written else None)
    return status


def _print_summary(args: argparse.Namespace, result: OptimizeResult, output: Path | None) -> None:
    level = f"-O{args.level}" if not args.passes else f"passes {args.passes}"
    target = str(output) if output else "nothing written (use --force to write anyway)"
    print(f"optcc {level}: {args.model} -> {target}", file=sys.stderr)
    print(result.report.summary(), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except SystemExit as stop:  # argparse's --help and usage errors
        return stop.code if isinstance(stop.code, int) else EXIT_BAD_INPUT
    except OptccError as error:
        print(f"optcc: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("optcc: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the last line of defence
        if os.environ.get("OPTCC_DEBUG"):
            raise
        where = ""
        tb = error.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            where = f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"
        print(
            f"optcc: internal error: {type(error).__name__}: {error}{where}. "
            f"Please report it at {ISSUES_URL} (set OPTCC_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
