"""``optcc.optimize``: load, run a level's pipeline (or given passes), verify, report;
``optcc.verify``: one candidate against its original."""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx
import onnx_ir as ir

from optcc import ir as oir
from optcc.errors import (ISSUES_URL, BadInputError, PrecisionNotAppliedError, PrecisionPassFailedError,
                          UnverifiedError, VerificationError)
from optcc.infra.pass_base import Numerics
from optcc.infra.manager import PassManager, Prepared, pass_name, step_passes
from optcc.infra.pipelines import build_pipeline
from optcc.infra.registry import create_pass
from optcc.infra.report import ModelSummary, PassRecord, Report, format_bytes, peak_rss_bytes
from optcc.ir.interface import notes_as_written
from optcc.ir.overwrite import check_input_shapes
from optcc.ir.zipmap import DetachedZipMaps, check_same_zipmaps, load_apart
from optcc.ir.overwrite import overwrite_input_shapes as fix_input_shapes
from optcc.numerics import (DEFAULT_MARGIN, TOLERANCES, Tolerance, Verification, Verifier, check_ranges,
                            check_samples_vary, input_roles, resolve_providers)
from optcc.numerics.decode import NEXT_TOKEN_AGREEMENT
from optcc.numerics.verify import REPARSE_MAX_BYTES
from optcc.progress import Progress
from optcc.quant import quantization_ops, stored_weights
from optcc.quant.driver import check_distinct, check_groups

__all__ = ["optimize", "OptimizeResult", "verify", "FOLD_GROWTH_WARNING", "CACHE_RECOMPUTED"]

Feeds = Mapping[str, np.ndarray]
INT8_PASS = "quantize-int8-calibrated"
# requested precision -> the pass that applies it
PRECISION_PASSES = {"fp16": "convert-float16", "int8": INT8_PASS, "int8-dynamic": "quantize-dynamic",
                    "weights": "quantize-weights"}
FOLD_GROWTH_WARNING = 0.05  # constant folding that grows the weights by more than this is said
CACHE_RECOMPUTED = "calibration cache: "  # begins the report's warning for each cache entry recomputed
_INT8_DTYPES = frozenset({ir.DataType.INT8, ir.DataType.UINT8})
_PRECISION_DTYPES = {"fp16": frozenset({ir.DataType.FLOAT16}), "int8": _INT8_DTYPES, "int8-dynamic": _INT8_DTYPES,
                     "weights": _INT8_DTYPES | {ir.DataType.INT4, ir.DataType.UINT4}}


@dataclasses.dataclass
class OptimizeResult:
    """The optimized model, the report, and the onnx-ir model behind both."""

    ir_model: ir.Model
    report: Report
    given_as_ir: bool = False
    source: str | None = None  # the input model's file, which save() never overwrites
    source_files: frozenset[Path] = frozenset()  # the files its weights are read from: never overwritten either
    # precision requested (fp16, int8, int8-dynamic) -> None when applied, else the reason
    precision: dict[str, str | None] = dataclasses.field(default_factory=dict)
    zipmaps: DetachedZipMaps | None = None  # the input's trailing ZipMaps, which the model gets back when written

    @property
    def applied_precision(self) -> list[str]:
        return [kind for kind, reason in self.precision.items() if reason is None]

    @property
    def declined_precision(self) -> dict[str, str]:
        return {kind: reason for kind, reason in self.precision.items() if reason is not None}

    @property
    def model(self) -> Union[onnx.ModelProto, ir.Model]:
        """The optimized model in the form it was given (a path or bytes give a ModelProto),
        with the input's trailing ZipMaps put back."""
        if self.given_as_ir:
            return self.ir_model
        proto = oir.serialize(self.ir_model)
        return proto if self.zipmaps is None else self.zipmaps.attach(proto)

    def save(
        self,
        path: str | os.PathLike,
        *,
        external_data: bool | None = None,
        external_data_threshold: int | None = None,
        external_data_location: str | None = None,
    ) -> None:
        """Write the optimized model atomically. ``external_data``: None decides (when the
        input had it or the weights near 2 GB), True/False force it; with external data,
        tensors of at least ``external_data_threshold`` bytes (default 1024) go to
        ``external_data_location`` (a file name beside the model; default ``NAME.data``)."""
        oir.check_output_path(path, self.source, self.source_files)  # never the input model's own files
        if self.zipmaps is not None:  # a model with maps has no external data (``detach_zipmaps``)
            if external_data:
                raise BadInputError("a model with ZipMap outputs is written without external data", path)
            oir.save_proto(self.model, path)
            return
        if external_data is not False and self.source_files:  # nor the data file written beside the output
            data = Path(path).resolve().parent / (external_data_location or f"{Path(path).name}.data")
            oir.check_output_path(data, self.source, self.source_files)
        if external_data is None and self.source_files:
            # the input had external data: so does the output, even when every tensor it
            # read from the file was rewritten (--fp16, INT8) and none refers to it any more
            external_data = True
        options: dict[str, Any] = {}
        if external_data_threshold is not None:
            options["size_threshold_bytes"] = external_data_threshold
        if external_data_location is not None:
            options["location"] = external_data_location
        oir.save(self.ir_model, path, external_data=external_data, **options)


# with --fp16 (no --fold-large), the most one constant fold may grow the model: enough for the
# shape and pad vectors a graph computes from static dims, far below any weight worth keeping computed
FP16_MAX_GROWTH_BYTES = 1024

# INT8's speed is modelled for onnxruntime's CPU provider; a user who verifies on CUDA is
# likely to deploy there, where the written model is not what was modelled
CUDA_INT8_WARNING = ("INT8 is modelled for onnxruntime's CPU provider: its CUDA provider runs QDQ Conv, MatMul and "
                     "Gemm as DequantizeLinear, a float kernel and QuantizeLinear, so this model is not faster "
                     "there; for a GPU, --fp16 (docs/int8.md, Providers)")


def optimize(
    model: oir.ModelSource,
    passes: Sequence[Union[str, ir.passes.PassBase]] | None = None,
    level: int = 2,
    verify: bool = True,
    inputs: Iterable[Feeds] | Feeds | None = None,
    *,
    disable: Iterable[str] = (),
    verify_each: bool = False,
    providers: Sequence[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    tolerances: Mapping[Numerics, Tolerance] | None = None,
    strict: bool = False,
    progress: bool = False,
    fp16: bool = False,
    fp16_block: Iterable[str] = (),
    fp16_keep_io: bool | Sequence[str] = True,
    fp16_samples: Iterable[Feeds] | None = None,
    int8_calibration: Iterable[Feeds] | None = None,
    int8_method: str = "minmax",
    int8_dynamic: bool = False,
    weight_only: str | Mapping[str, Any] | None = None,
    int8_options: Mapping[str, Any] | None = None,
    fold_large: bool = False,
    target_opset: int | None = None,
    overwrite_input_shapes: Mapping[str, Sequence[int]] | None = None,
    input_ranges: Mapping[str, tuple[float, float]] | None = None,
    allow_unverified: bool = False,
    allow_float_fallback: bool = False,
) -> OptimizeResult:
    """Optimize ``model`` (path, bytes, onnx.ModelProto or onnx_ir.Model).

    ``passes`` (names or pass objects) replaces the level's pipeline. With ``verify``, the
    result is compared with the original on onnxruntime (``inputs``: feed dicts, or
    generated); a mismatch raises VerificationError whose ``result`` holds the model and
    report. The input is never modified: an ``onnx_ir.Model`` is cloned first.
    ``fold_large`` lets constant folding materialize tensors that grow the model by more
    than 1 MiB. ``target_opset`` first converts the model to that default-opset version
    (the ``upgrade-opset`` pass: onnx's version converter, verified like every pass), so
    the fusions can use newer standard ops (``Attention``, ``RMSNormalization`` at 23);
    a model is never downgraded (BadInputError).

    After the level's pipeline: ``fp16`` converts to float16 (``fp16_keep_io``: True keeps
    float32 graph inputs/outputs, False makes them float16, a list keeps those names
    float32; ``fp16_samples``, feed dicts, are its range data and what its accuracy is
    judged on, and without ``inputs`` what the result is verified on, as ``inputs``
    alone would be; ``int8_calibration`` with ``fp16`` is refused: INT8 and FP16 exclude
    each other); ``int8_calibration`` (feed dicts) quantizes to INT8 with
    ``int8_method`` calibration, judged on the held-out last 20% of the samples (of each
    group's, with ``int8_options["groups"]``: one label per sample, by which the final
    verification judges every sample too, so no separate ``inputs``); the result is verified
    on every calibration sample, followed by ``inputs`` when given;
    ``int8_options`` are passed to ``optcc.quant.driver.quantize_int8`` (e.g.
    ``{"require_speedup": False}``, ``{"target": Target(min_sqnr_db=30)}``, ``{"cpu": "x86-avx2"}``: the CPU
    class its speed is modelled for, default "x86-vnni" on every machine); when INT8 is
    declined (not faster, or misses the target) the report says why in a warning.
    ``int8_dynamic`` quantizes MatMuls dynamically. ``weight_only`` ("int4", "int8", or the
    options of the ``quantize-weights`` pass; MatMulNBits at -O3, else portable) quantizes
    MatMul/Gemm weights block-wise, and with 8 bits Conv weights per output channel (their
    biases corrected on the option ``samples``). With 4 bits and verification, int4 that
    misses the verification's check has its most sensitive layers raised to int8 until it
    passes (the pass's ``gate``, unless the options give one; docs/weight-only.md, Mixed
    int4/int8): for a KV-cache decoder the search judges other samples than the
    verification's (``Verifier.held_apart``, asking more of the next tokens), and the
    verification's check confirms what it chose (the pass's ``held_out``). These change
    what is computed, so the final verification uses the
    FP16/INT8 tolerances. ``fp16`` and ``weight_only`` together
    convert to float16 first (judged as ``fp16`` alone, its float32 fallback layers
    included), then quantize the weights of that model, float16 layers with float16 scales
    (docs/weight-only.md, With float16); the result is verified with the INT8 tolerances.

    ``input_shapes`` sizes the generated verification inputs only (``input_ranges``: their
    value range per input name, ``(lo, hi)``); ``overwrite_input_shapes``
    fixes those graph inputs' shapes in the result (``optcc.ir.overwrite``), which also
    sizes the verification inputs. Either names a graph input and gives its full rank,
    else BadInputError.

    Raises VerificationError (a mismatch), UnverifiedError (``verify`` asked for but
    verification could not run; unless ``allow_unverified``) and PrecisionNotAppliedError
    (FP16/INT8 requested but declined or reverted; unless ``allow_float_fallback``), in
    that order of precedence, each carrying ``result``. ``result.precision`` says, per
    requested precision, None when applied or the reason it was not.
    """
    if inputs is not None and inputs is not int8_calibration and dict(int8_options or {}).get("groups") is not None:
        # the final verification judges each group apart: on samples that carry the labels
        raise BadInputError("int8_options 'groups' label the calibration samples, and the verification judges "
                            "each group on them: give no separate inputs")
    if fp16 and int8_calibration is not None:  # which precision was meant is not for optcc to guess
        raise BadInputError("fp16 and int8_calibration exclude each other (choose one precision); give FP16's samples "
                            "as fp16_samples= (its ranges, accuracy check and, without inputs=, the verification)")
    if fp16_samples is not None and not fp16:
        raise BadInputError("fp16_samples is used with fp16=True")
    given = fp16_samples if fp16 else int8_calibration  # the samples of the precision asked for
    if fp16 and given is not None and inputs is None:
        inputs = given  # what FP16 was judged on judges the result, not generated inputs
    if inputs is not None and not isinstance(inputs, (Mapping, list)):
        same = given is inputs
        inputs = [dict(f) for f in inputs]  # read by the FP16 pass and the verifier: consumed once here
        given = inputs if same else given
    samples = None if given is None else [dict(f) for f in given]
    if fp16 and samples == []:
        raise BadInputError("fp16_samples is empty: give at least one feed dict, or none at all")
    fp16_block = list(fp16_block)
    start = time.perf_counter()
    label = str(model) if isinstance(model, (str, os.PathLike)) else None
    # the file's parse, for the verifier's numbering of the original (handed over below, else dropped)
    file_parse = None

    def load_given(source: oir.ModelSource) -> ir.Model:
        nonlocal file_parse
        if isinstance(source, (str, os.PathLike)) and verify and os.path.isfile(source) \
                and os.path.getsize(source) <= REPARSE_MAX_BYTES:
            given, file_parse = oir.load_keeping_parse(source)
            return given
        return oir.load(source)

    # trailing ZipMaps are set apart: the tensors they read are optimized and verified as graph
    # outputs (kept float32 by FP16), and the ZipMaps are put back, unchanged, on the result
    loaded, zipmaps = load_apart(model, load_given)
    if zipmaps is not None and fp16_keep_io is not True:  # ZipMap reads float32 only
        fp16_keep_io = [*(fp16_keep_io or ()), *zipmaps.inputs]
    input_shapes = _merged_shapes(loaded, input_shapes, overwrite_input_shapes, label)
    if input_ranges:  # at every level, whether or not samples are drawn from them
        try:
            check_ranges(loaded, input_ranges)
        except BadInputError as error:
            raise BadInputError(str(error), label) from None
    working = oir.clone(loaded) if loaded is model else loaded
    # a path the verifier loads itself, unless it holds the ZipMaps set apart from ``loaded``
    original: Any = model if isinstance(model, (str, os.PathLike)) and zipmaps is None else loaded
    if original is loaded and working is loaded:
        original = oir.clone(loaded)  # the passes modify ``working`` in place
    # the verifier's parse of a path: a clone sharing the (immutable) tensors, no second load (taken
    # before the input shapes are overwritten, else when the verifier is made)
    parse_for_verifier = isinstance(original, (str, os.PathLike)) and (verify or verify_each)
    untouched = oir.clone(loaded) if parse_for_verifier and overwrite_input_shapes else None
    report = Report(level=None if passes is not None else level)
    summary = oir.histogram_and_weight_bytes(working)  # the manager's first summary too: the input
    # shapes fixed below change neither the op histogram nor the weights
    report.model_before = ModelSummary.of(working, summary)
    report.interface = list(loaded.meta.get(oir.FILLED_INTERFACE_KEY, []))
    oir.collect_for(report.model_before.weight_bytes)
    source_files = frozenset(oir.external_data_files(working)) if label is not None else frozenset()
    if overwrite_input_shapes:
        fix_input_shapes(working, overwrite_input_shapes, label=label)
        report.interface = notes_as_written(report.interface, working)
        if inputs is not None:
            inputs = [dict(inputs)] if isinstance(inputs, Mapping) else [dict(f) for f in inputs]
            check_fixed_feeds(inputs, overwrite_input_shapes, label)
        if samples is not None:
            check_fixed_feeds(samples, overwrite_input_shapes, label, purpose="calibration")
    if samples is not None:
        check_samples_vary(samples, label)
    quantizing = samples is not None and not fp16
    if quantizing:
        check_distinct(samples, label, groups=dict(int8_options or {}).get("groups"))
    modes = [name for name, given in (("fp16", fp16), ("int8_calibration", quantizing), ("int8_dynamic", int8_dynamic),
                                      ("weight_only", weight_only)) if given]
    if len(modes) > 1 and modes != ["fp16", "weight_only"]:
        # each is a whole precision plan for the model; combined, one would undo the other's.
        # FP16 then weight-only composes: the weights' quantization keeps each layer's float type
        raise BadInputError(f"{' and '.join(modes)} exclude each other (choose one precision)")
    metric = dict(int8_options or {}).get("metric")
    if isinstance(metric, Mapping) and (int8_dynamic or weight_only):
        # the verifier judges their result by it: a key naming no output or group would judge
        # nothing (the INT8 quantizer checks its own, with the groups' sizes)
        try:
            check_groups(None, 0, metric, [value.name for value in loaded.graph.outputs])
        except BadInputError as error:
            raise BadInputError(str(error), label) from None
    # entries that keep layers float: each should name something in the model (checked after the run)
    keep_float = {"fp16 block": fp16_block if fp16 else [],
                  "int8 exclude": list(dict(int8_options or {}).get("exclude") or []) if quantizing else []}
    names_before = _layer_names(working) if any(keep_float.values()) else set()
    # float inputs FP16 can only measure on generated standard-normal values (no samples, range or role)
    unscaled = _unscaled_inputs(working, input_ranges or {}) if fp16 and inputs is None and samples is None else []
    # graph inputs with a default that no calibration sample feeds: INT8 sees their default only
    unfed = [v.name for v in oir.overridable_inputs(working)
             if not any(v.name in sample for sample in samples)] if quantizing and samples else []
    if fp16 or quantizing or int8_dynamic:
        disable = [*disable, "fuse-ort-conv-activation"]  # quantizers/fp16 skip contrib ops
    if int8_dynamic or weight_only:  # embeddings are quantized as Gathers
        disable = [*disable, "fuse-ort-embed-layernorm"]
    if weight_only:  # the packed Q/K/V weights of com.microsoft.Attention would stay float
        disable = [*disable, "fuse-ort-packed-attention"]
    options = {"fold-constants": {"fold_large": True}} if fold_large else None
    if fp16 and not fold_large:  # a float16 model is wanted for its size: a fold grows it by a shape vector at most
        options = {"fold-constants": {"max_growth_bytes": FP16_MAX_GROWTH_BYTES}}
    # FusedConv's activations differ by provider: the model must build on each one it is verified on
    verified_on = resolve_providers(providers)
    options = {**(options or {}), "fuse-ort-conv-activation": {"providers": verified_on}}
    pipeline = build_pipeline(level, passes=passes, disable=disable, options=options)
    if target_opset is not None:
        problem = oir.upgrade_problem(working, target_opset)
        if problem is not None:
            raise BadInputError(problem, label)
        pipeline.insert(0, create_pass("upgrade-opset", version=target_opset))
    if fp16:
        shared16: dict[str, Any] = {}
        if inputs is not None and (given is None or given is inputs) and (verify or verify_each):
            # the pass judges the verifier's samples: it judges with the verifier's task judge, so
            # the float model's noise floor runs once and the pass accepts what the check accepts
            shared16["judge"] = lambda provider: None if verifier is None else verifier.sample_judge(provider)
        if inputs is None and samples is None and (verify or verify_each):
            # the pass judges the samples the verifier generates, so it accepts what the check accepts
            shared16["checked_samples"] = lambda: None if verifier is None else verifier.generated_samples()
        if not _judged_by_task(tolerances, "fp16"):
            shared16["judge"] = lambda provider: None  # a tolerance of the user's own: the verifier asks no task
        if verify or verify_each:
            # a KV-cache decoder's result is judged by its next tokens, which the SQNR rule reads differently:
            # the SQNR rule's model is confirmed by that very check (the verification of the same model
            # reuses the verdict); any model tried after it, chosen because that one was refused, on
            # prompts apart, so that the verification judges the model chosen on prompts it was not chosen on
            shared16["confirms"] = lambda: verifier is not None and verifier.judges_by_tokens("fp16")
            shared16["confirm"] = lambda candidate, before: _gate_reason(
                verifier if before == 0 else verifier.held_apart(), candidate, "fp16")
            # a result a user's session (onnxruntime's default options) cannot build keeps float32 the nodes
            # the build needs so, found by asking the verification's own build check, which then has its verdict
            shared16["builds"] = lambda candidate: (None, None) if verifier is None else \
                verifier.default_build_problem(candidate)
        pipeline.append(create_pass("convert-float16", keep_io_types=fp16_keep_io, block=fp16_block,
                                    inputs=samples or inputs, input_shapes=input_shapes,
                                    input_ranges=input_ranges, providers=providers, **shared16))
    elif quantizing:
        if not samples:
            raise BadInputError("INT8 calibration data holds no samples")
        # the float model INT8 starts from, by ordinary (recorded, verified, revertible) passes:
        # generated weights folded whatever their size, BatchNorm and affine layers fused;
        # a pass the user disabled stays out here too (--disable fold-constants is what the
        # fold-growth warning offers to keep computed weights computed). Kept only with INT8:
        # a declined INT8 leaves the model the float passes made (``Prepared``)
        preparation = [create_pass(name, **kwargs) for name, kwargs in (
            ("fold-constants", {"fold_large": True}), ("fuse-batchnorm", {}), ("fuse-conv-affine", {}),
            ("eliminate-dead-nodes", {})) if name not in disable]
        shared: dict[str, Any] = {}
        if inputs is not None and inputs is not given:
            # the result is judged on every calibration sample, with or without inputs of the user's
            # own, and on those inputs after them
            inputs = [*samples, *([dict(inputs)] if isinstance(inputs, Mapping) else [dict(f) for f in inputs])]
        elif inputs is None:
            inputs = samples  # all of them: a task metric over the held-out part alone can lack items
            if (verify or verify_each) and _judged_by_task(tolerances, "int8"):
                # the verifier (built below) judges the same samples by the task: the pass judges
                # with its judge, so the float model and its noise floor run once, and the pass
                # confirms its result on every sample as the verification will, on the
                # verifier's runs of it, which the verification then reuses
                shared["judge"] = lambda positions: None if verifier is None else \
                    verifier.sample_judge(positions=positions)
                shared["outputs"] = lambda model, positions, stop=None: None if verifier is None else \
                    verifier.outputs(model, positions, stop=stop)
        quantizer = create_pass(INT8_PASS, samples=samples, method=int8_method, progress=progress,
                                stored_weights=stored_weights(working),
                                **{"prepare": False, **shared, **dict(int8_options or {})})
        pipeline.append(Prepared(preparation, quantizer))
    # the verification's own check of a candidate whose choice was made on the samples held apart from
    # it (a decoder's; for any other model the search's check is the verification's: nothing to confirm)
    confirmed = lambda candidate: None if verifier is None or verifier.held_apart() is verifier \
        else _gate_reason(verifier, candidate)  # noqa: E731
    if int8_dynamic:
        searched: dict[str, Any] = {}
        if verify or verify_each:
            # a decoder's dynamic INT8 leaves its most damaging layers float until it passes the check the
            # result gets on the samples held apart from the verification's, with the same margin a mixed
            # weight search keeps; the verification's own samples confirm the choice. Any other model is
            # judged by the verification alone (its task judge holds out nothing a search could fit)
            # (the pass asks ``searched`` first: the others are called only where it holds)
            searched = {"searched": lambda: verifier is not None and verifier.held_apart() is not verifier,
                        "gate": lambda candidate: _gate_reason(verifier.held_apart(), candidate),
                        "held_out": confirmed,
                        "samples": lambda: verifier.held_apart().next_token_feeds}
        pipeline.append(create_pass("quantize-dynamic", **searched))
    searched_weights = False  # whether the weight-only search judges its candidates by the held-apart check
    if weight_only:
        if isinstance(weight_only, str) and weight_only not in ("int4", "int8"):
            raise BadInputError(f"weight_only must be 'int4' or 'int8', got {weight_only!r}")
        wo = {"bits": int(weight_only[3:])} if isinstance(weight_only, str) else dict(weight_only)
        wo.setdefault("target", "onnxruntime" if level >= 3 and passes is None else "portable")
        if verify or verify_each:
            searched_weights = wo["bits"] == 4 and "gate" not in wo
            # int4 that misses the verification raises its most sensitive layers to int8 until it passes:
            # each mixed candidate is judged by the check the result gets, on the samples held apart
            # from the verification's for a decoder, whose choice the verification's own samples confirm
            wo.setdefault("gate", lambda candidate: None if verifier is None else
                          _gate_reason(verifier.held_apart(), candidate))
            wo.setdefault("held_out", confirmed)
        pipeline.append(create_pass("quantize-weights", **wo))

    verifier: Verifier | None = None
    int8 = dict(int8_options or {})
    # for the final check alone of a float result that the proof may prove, the parse itself, unchanged
    # until the passes run: the verifier numbers it for its proof first (``Verifier``'s ``parsed_changes``)
    handed = parse_for_verifier and untouched is None and verify and not verify_each and target_opset is None \
        and not (fp16 or samples is not None or int8_dynamic or weight_only) and not _contrib_fusions(pipeline) \
        and not oir.holds_packed(loaded)  # a clone shares the packed attributes: cheaper than a parse again
    if parse_for_verifier and untouched is None and not handed:
        untouched = oir.clone(loaded)
    if verify or verify_each:
        verifier = Verifier(
            original,
            inputs=inputs,
            providers=providers,
            input_shapes=input_shapes,
            input_ranges=input_ranges,
            tolerances=tolerances,
            progress=progress,
            # INT8 is judged by the same task metric the quantizer was asked to meet
            task_metric=int8.get("metric"),
            task_margin=int8.get("metric_margin", DEFAULT_MARGIN),
            task_target=int8.get("metric_target"),
            task_groups=int8.get("groups"),
            **({"task_min_sqnr_db": int8["target"].min_sqnr_db} if "target" in int8 else {}),
            parsed=loaded if handed else untouched,
            parsed_changes=handed,
            original_parse=file_parse if handed else None,
        )
    file_parse = None
    requested = {"fp16": fp16, "int8": quantizing, "int8-dynamic": int8_dynamic, "weights": bool(weight_only)}

    def applied(records: Sequence[PassRecord], result: ir.Model) -> bool:
        """Whether every precision requested holds in ``result``: else it is raised, not returned."""
        return not any(_precision(result, records, requested)[0].values())

    # the run is one progress phase: what no inner phase covers (the passes' bookkeeping) is named too,
    # and the inner phases' log lines share its clock
    with Progress("optimizing", 1, enabled=progress, bar=False) as run_phase:
        try:
            if verifier is not None:
                # a decoder's checks start from the original's decode of every prompt (a search's check, on
                # the samples held apart, the verification of a weight-only result when the pass changed the
                # model, and the float16 pass's confirmation of its choice): it decodes now, before any
                # quantized or float16 weight exists, so that the original's weights and those are never held
                # at once
                if searched_weights or int8_dynamic:
                    verifier.held_apart().decode_prompts()
                if weight_only or fp16:  # the result's check, or the float16 pass's confirmation of its choice
                    verifier.decode_prompts("int8" if weight_only else "fp16")
            manager = PassManager(pipeline, strict=strict, verifier=verifier, verify_each=verify_each,
                                  progress=progress, returns_float=None if allow_float_fallback else applied)
            fresh = _fresh_copies(model, original)
            if overwrite_input_shapes:
                fresh = _with_overwrite(fresh, overwrite_input_shapes, label)
            try:
                outcome = manager.run(working, fresh=fresh, summary=summary)
            except BadInputError as error:  # raised by a pass or the verifier: it names the model given
                if error.path is not None or label is None:
                    raise
                raise BadInputError(str(error), label) from None
            report.passes = outcome.records
            report.warnings.extend(outcome.warnings)
            report.warnings.extend(CACHE_RECOMPUTED + said for said in _cache_recomputed(outcome.records))
            if passes is not None:
                report.warnings.extend(f"pass '{r.name}' changed nothing: {r.stats['reason']}" for r in outcome.records
                                       if r.status == "unchanged" and r.stats.get("reason")
                                       and r.name not in PRECISION_PASSES.values())
            if verify and verifier is not None:
                check = outcome.verification  # the manager verifies the result whenever it has a verifier
                assert check is not None
                report.verification = _verification_record(check, weight_only)
                if check.status == "skipped":
                    report.warnings.append(f"numerics not verified: {check.reason}")
                elif check.notes:
                    report.warnings.append("the verification's samples could hardly show an error: "
                                           + "; ".join(check.notes))
        finally:
            if verifier is not None:
                verifier.close()
        run_phase.advance()
    oir.collect_for(report.model_before.weight_bytes)
    report.model_after = ModelSummary.of(outcome.model, outcome.summary)  # the manager's, of its result
    report.total_time_s = round(time.perf_counter() - start, 6)
    report.peak_rss_bytes = peak_rss_bytes()
    precision, held = _precision(outcome.model, outcome.records, requested, generated=inputs is None)
    report.warnings.extend(held.values())
    if unfed and precision.get("int8", "") is None:
        report.warnings.append(
            f"INT8 calibrated {', '.join(map(repr, unfed))} on the default value only: a graph input with a default "
            "that no calibration sample feeds; values fed later outside that range saturate (give calibration "
            "samples that feed it)")
    if unscaled and precision.get("fp16", "") is None and "fp16" not in held:  # no range judged: nothing converted
        report.warnings.append(
            f"FP16 ranges were judged on generated standard-normal values for {', '.join(map(repr, unscaled))} "
            "(nothing tells their scale): real inputs of another scale may overflow float16 where these did "
            "not; give samples (--inputs) or the range (--input-range)")
    report.warnings.extend(f"{kind.upper()} not applied: {reason}" for kind, reason in precision.items()
                           if reason is not None)
    if precision.get("int8", "") is None and "CUDAExecutionProvider" in verified_on:
        report.warnings.append(CUDA_INT8_WARNING)
    if precision.get("int8", "") is None:  # the CPU class modelled decides; this machine's would not
        report.warnings.extend(r.stats["speed_machine"] for r in outcome.records
                               if r.status == "changed" and isinstance(r.stats.get("speed_machine"), str))
    if target_opset is not None and oir.default_opset(outcome.model) != target_opset:
        why = next((r.reason for r in outcome.records if r.name == "upgrade-opset" and r.reason), "not run")
        report.warnings.append(f"opset not upgraded to {target_opset}: {why}")
    names_after = _layer_names(outcome.model) if any(keep_float.values()) else set()
    for what, entries in keep_float.items():
        unknown = [e for e in entries if e not in names_before and e not in names_after]
        if unknown:
            report.warnings.append(f"{what} {', '.join(map(repr, unknown))} matches no op type, node name or output "
                                   "name of the model: it kept nothing float")
    growth = _fold_growth(report)
    if growth is not None:
        report.warnings.append(growth)
    result = OptimizeResult(outcome.model, report, given_as_ir=isinstance(model, ir.Model), precision=precision,
                            source=label, source_files=source_files, zipmaps=zipmaps)
    status = report.verification["status"] if report.verification is not None else None
    if status == "failed":
        _raise(VerificationError(f"verification failed: {report.verification['summary']}"), result)
    if status == "skipped" and not allow_unverified:
        reason = report.verification.get("reason") or report.verification["summary"]
        _raise(UnverifiedError(f"not verified: {reason}"), result)
    declined = result.declined_precision
    crashed = {kind: why for kind, why in declined.items() if _crashed(outcome.records, kind)}
    if crashed and not allow_float_fallback:
        text = "; ".join(f"{kind} not applied: {why}" for kind, why in crashed.items())
        applied = " + ".join(result.applied_precision)
        _raise(PrecisionPassFailedError(f"internal error: {text}{_would_be(text, applied, outcome.model)}"), result)
    if declined and not allow_float_fallback:
        text = "; ".join(f"{kind} not applied: {why}" for kind, why in declined.items())
        applied = " + ".join(result.applied_precision)  # --fp16 --weights without its weights: float16
        _raise(PrecisionNotAppliedError(f"{text}{_would_be(text, applied, outcome.model)}"), result)
    return result


def _cache_recomputed(records: Sequence[PassRecord]) -> list[str]:
    """Why each calibration cache entry the passes found was recomputed, not read (the
    warning the user saw, kept in the report)."""
    return [calibration["cache_recomputed"] for record in records
            for calibration in [record.stats.get("calibration")]
            if isinstance(calibration, Mapping) and calibration.get("cache_recomputed")]


def _verification_record(check: Verification, weight_only: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """The report's ``verification``: ``check``'s dict and one-line summary, saying what judged
    it. An INT8 result judged by the task against float32's noise floor met no threshold of
    its tolerance's own (each task row says what it met, and its target): those are null,
    with ``judged_by`` and the task's margin. A lossy decoder judged by its next tokens met
    none for the outputs they judge: ``judged_by`` names those and the agreement needed, and
    the thresholds left are those its other outputs met (null where it has none). A
    weight-only result is judged with the tolerance named int8, every integer quantization's:
    the summary names its weights."""
    quantized = None
    if weight_only and check.numerics == "int8":
        quantized = f"{weight_only} weights" if isinstance(weight_only, str) else \
            f"int{weight_only['bits']} weights" if "bits" in weight_only else "weight-only quantization"
    record = {**check.to_dict(), "summary": check.describe(quantized)}
    if check.token_judged:
        others = [o.name for o in check.outputs if o.name not in check.token_judged]
        kept = dataclasses.replace(check.tolerance, min_argmax_agreement=None) if others else Tolerance()
        agreement = {run["threshold"] for run in (check.next_token or {}).values()} or {NEXT_TOKEN_AGREEMENT}
        record["tolerance"] = {**dataclasses.asdict(kept),
                               "judged_by": "next tokens, each step fed the original's tokens",
                               "next_token_outputs": list(check.token_judged),
                               "min_next_token_agreement": max(agreement)}
    elif check.numerics == "int8" and check.task is not None and check.tolerance == TOLERANCES["int8"]:
        record["tolerance"] = {**dataclasses.asdict(Tolerance()), "judged_by": "task against float32's noise floor",
                               "margin": check.task.get("margin")}
    return record


def _would_be(text: str, applied: str, model: ir.Model) -> str:
    """What a declined precision leaves, said once: nothing when ``text``'s last clause says it
    (``...; kept float32 (why)``). With nothing applied that is the model's own float type."""
    left = applied or oir.interface_float_type(model)
    return "" if re.search(rf"(^|; )kept {re.escape(left)}( \(.*\))?$", text) else f" (the result would be {left})"


def _gate_reason(verifier: Verifier, candidate: ir.Model, numerics: Numerics = "int8") -> str | None:
    """None when ``candidate`` passes ``verifier``'s ``numerics`` check (or the check cannot
    run: the verification says so later); else why it failed."""
    check = verifier.check(candidate, numerics)
    return (check.reason or "verification failed") if check.status == "failed" else None


def verify(
    original: oir.ModelSource,
    candidate: oir.ModelSource,
    *,
    numerics: str = "exact",
    **verifier_options: Any,
) -> Verification:
    """One-shot verification of ``candidate`` against ``original``, each a path, bytes,
    onnx.ModelProto or onnx_ir.Model (``verifier_options``: see ``optcc.Verifier``).
    Classifiers that end in ZipMap are verified as ``optimize`` verifies them: the tensors
    their ZipMaps read, the ZipMaps the same in both (BadInputError otherwise)."""
    model, zipmaps = (candidate, None) if isinstance(candidate, ir.Model) else load_apart(candidate)
    reference: Any = original  # a path is loaded by the verifier, unless ZipMaps are set apart from it
    if zipmaps is not None or not isinstance(original, (str, os.PathLike, ir.Model)):
        reference, original_zipmaps = (original, None) if isinstance(original, ir.Model) else load_apart(original)
        check_same_zipmaps(original_zipmaps, zipmaps)
    with Verifier(reference, **verifier_options) as verifier:
        return verifier.check(model, numerics)  # type: ignore[arg-type]


def _contrib_fusions(pipeline: Sequence[Any]) -> bool:
    """Whether a step of ``pipeline`` fuses into onnxruntime contrib ops (``fuse-ort-*``), which
    the proof never proves equal to what they replace: the samples then judge the result."""
    names = (pass_name(p) for step in pipeline for p in step_passes(step))
    return any(name.startswith("fuse-ort-") for name in names)


def _raise(error: Exception, result: OptimizeResult) -> None:
    error.result = result  # type: ignore[attr-defined]
    raise error


def _layer_names(model: ir.Model) -> set[str]:
    """What a block or exclude entry may name: op types, node names and node output names."""
    names: set[str] = set()
    for node in oir.nodes(model):
        names.update((node.op_type, node.name or "", *(v.name or "" for v in node.outputs)))
    return names


def _merged_shapes(
    model: ir.Model,
    sizing: Mapping[str, Sequence[int]] | None,
    fixed: Mapping[str, Sequence[int]] | None,
    label: str | None,
) -> dict[str, list[int]] | None:
    """Verification input sizes: ``sizing`` and the ``fixed`` (overwritten) shapes, both
    checked against the graph inputs; the two may not disagree on an input."""
    for shapes in (sizing, fixed):
        if shapes:
            check_input_shapes(model, shapes, label=label)
    if not sizing and not fixed:
        return None
    merged = {name: list(dims) for name, dims in (fixed or {}).items()}
    for name, dims in (sizing or {}).items():
        if name in merged and merged[name] != list(dims):
            raise BadInputError(f"input '{name}': the input shape {list(dims)} differs from the "
                                f"overwritten shape {merged[name]}", label)
        merged[name] = list(dims)
    return merged


def check_fixed_feeds(
    feeds: Sequence[Mapping[str, np.ndarray]], fixed: Mapping[str, Sequence[int]], label: str | os.PathLike | None,
    purpose: str = "verification",
) -> None:
    """User samples must have the shapes the result's inputs are fixed to, else
    BadInputError naming ``label`` (the model, or the file the samples came from)."""
    for i, sample in enumerate(feeds):
        for name, dims in fixed.items():
            if name in sample and list(np.shape(sample[name])) != list(dims):
                raise BadInputError(f"{purpose} sample {i}: '{name}' has shape {list(np.shape(sample[name]))}, "
                                    f"but its shape is overwritten to {list(dims)}", label)


def _with_overwrite(
    fresh: Callable[[], ir.Model], shapes: Mapping[str, Sequence[int]], label: str | None
) -> Callable[[], ir.Model]:
    return lambda: fix_input_shapes(fresh(), shapes, label=label)


def _judged_by_task(tolerances: Mapping[Numerics, Tolerance] | None, numerics: Numerics) -> bool:
    """Whether the verifier judges ``numerics`` results with its default tolerance, under
    which its task judge decides (a tolerance of the user's own asks no task)."""
    return dict(tolerances or {}).get(numerics, TOLERANCES[numerics]) == TOLERANCES[numerics]


def _has_dtype(model: ir.Model, dtypes: frozenset[ir.DataType]) -> bool:
    """Whether some tensor of any graph (an initializer, or a node's tensor attribute: a
    branch's Constant), a main-graph input or output, some annotated node output or some
    Cast's result holds one of ``dtypes``. A pass need not annotate what it computes (FP16
    leaves the types it infers undeclared): a model without float16 weights computes in
    float16 behind its input Casts, or from float16 inputs."""
    if any(v.dtype in dtypes for v in (*model.graph.inputs, *model.graph.outputs)):
        return True
    for graph in oir.graphs(model):
        if isinstance(graph, ir.Graph) and any(v.dtype in dtypes for v in graph.initializers.values()):
            return True
    for node in oir.nodes(model):
        if any(o.dtype in dtypes for o in node.outputs):
            return True
        if any(a.type == ir.AttributeType.TENSOR and a.value.dtype in dtypes for a in node.attributes.values()):
            return True
        if node.op_type == "Cast" and node.domain == "" and \
                ir.DataType(node.attributes.get_int("to", 0)) in dtypes:
            return True
    return False


def _unscaled_inputs(model: ir.Model, ranges: Mapping[str, Any]) -> list[str]:
    """The float graph inputs generated as plain standard-normal values: no range given and
    no role (image, audio, mask, ...) that sets their scale."""
    floats = {v.name for v in model.graph.inputs if v.dtype is not None and v.dtype.is_floating_point()}
    return [name for name, role in input_roles(model).items()
            if role == "plain" and name in floats and name not in ranges]


def _precision(model: ir.Model, records: Sequence[Any], requested: Mapping[str, bool],
               generated: bool = False) -> tuple[dict[str, str | None], dict[str, str]]:
    """Per requested precision: None when the result holds tensors of that precision and
    its pass changed the model, or changed nothing for want of anything left to convert
    (the input held that precision already: a note says so); else why not (the pass's own
    reason when it gave one, under "reason" or "skipped"; a revert for its numerics judged
    on ``generated`` inputs says that real samples may judge otherwise). And the notes, by
    precision, for those the input held already."""
    found: dict[str, str | None] = {}
    held: dict[str, str] = {}
    for kind, wanted in requested.items():
        if not wanted:
            continue
        name = PRECISION_PASSES[kind]
        runs = [r for r in records if r.name == name]
        dtypes = _PRECISION_DTYPES[kind]
        if any(r.status == "changed" for r in runs) and _has_dtype(model, dtypes):
            found[kind] = None
        elif not runs:
            found[kind] = f"pass '{name}' did not run"
        else:
            record = runs[-1]
            reason = (record.stats or {}).get("reason") or record.reason
            if record.status == "failed":
                found[kind] = (f"pass '{name}' {record.reason}: a defect in optcc, not a property of the "
                               f"model; please report it at {ISSUES_URL}")
            elif record.status == "reverted":
                found[kind] = f"reverted ({reason})" if reason else "reverted"
                if generated and (record.reason or "").startswith("changed the numerics"):
                    found[kind] += "; judged on generated inputs: real samples (--inputs) may judge otherwise"
            elif _held_already(model, kind, record):
                found[kind] = None
                held[kind] = f"{kind.upper()}: nothing left to convert: " + (reason or _HELD_ALREADY[kind])
            else:
                # a pass that declined without a "reason" may say why under "skipped" (FP16:
                # no reference ranges, or no conversion met the tolerance); that is the
                # reason, not a model with nothing to convert
                found[kind] = reason or (record.stats or {}).get("skipped") \
                    or "nothing in the model could be converted"
    return found, held


def _crashed(records: Sequence[Any], kind: str) -> bool:
    """Whether the last run of ``kind``'s precision pass raised (the manager recorded it as
    failed and kept the model from before it)."""
    runs = [r for r in records if r.name == PRECISION_PASSES[kind]]
    return bool(runs) and runs[-1].status == "failed"


_HELD_ALREADY = {"fp16": "every float weight is float16 already", "int8": "the model is quantized already",
                 "int8-dynamic": "the model is quantized already", "weights": "the model is quantized already"}


def _held_already(model: ir.Model, kind: str, record: Any) -> bool:
    """Whether a precision pass that changed nothing found the model in that precision
    already: quantization ops for the integer kinds (INT8's own pass declines such a model
    as ``"nothing"``), float16 and no float32 weights for FP16; never when the pass gave
    another reason of its own."""
    stats = record.stats or {}
    if kind == "int8":
        return stats.get("declined") == "nothing" and bool(quantization_ops(model))
    if stats.get("reason"):
        return False
    if kind == "fp16":
        weights = [v.const_value.dtype for g in oir.graphs(model) if isinstance(g, ir.Graph)
                   for v in g.initializers.values() if v.const_value is not None]
        return ir.DataType.FLOAT16 in weights and ir.DataType.FLOAT not in weights
    return bool(quantization_ops(model))


def _fold_growth(report: Report) -> str | None:
    """A warning when constant folding grew the written weights by more than
    FOLD_GROWTH_WARNING: the folds' growth, as far as the result still holds it (a fold whose
    old weights a later pass drops, or that quantization shrinks, grows nothing written)."""
    before = report.model_before.weight_bytes if report.model_before else 0
    after = report.model_after.weight_bytes if report.model_after else before
    growth = min(after - before, sum(r.bytes_after - r.bytes_before for r in report.passes
                                     if r.name.startswith("fold-") and r.status == "changed"))
    if growth <= 0 or growth <= FOLD_GROWTH_WARNING * max(before, 1):
        return None
    percent = 100.0 * growth / before if before else float("inf")
    return (f"constant folding grew the weights by {percent:.0f}% (+{format_bytes(growth)}); "
            "--disable fold-constants keeps those tensors computed at run time")


def _fresh_copies(given: oir.ModelSource, original: Any) -> Callable[[], ir.Model]:
    """New copies of the model as given, for the pass manager's reverts: reloaded from a
    path, else cloned from the untouched original."""
    if isinstance(original, ir.Model):
        return lambda: oir.clone(original)
    return lambda: oir.load(given)
