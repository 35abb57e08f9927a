"""Acceptance of a quantized model by the task, relative to the float model's noise floor.

A quantized model is compared with the float model on held-out samples by a *task
metric* per output, chosen from the output's nature (``choose_metric``) or given:

========================  ==============================================================
output                    metric (deviation: 0 when identical)
========================  ==============================================================
``[N, C]`` float          ``argmax``: 1 - agreement of the top class, on the samples the
                          float model is confident about (top-1 probability at least
                          ``CONFIDENT_GAP`` above the second); ``sqnr`` when it is
                          confident about none (coordinates or measured values, whose
                          softmax is near uniform, ``_confident_somewhere``), when every
                          value is positive, some above 1, within ``SCORE_SPAN`` of the
                          smallest (scores on a scale, a MOS per aspect:
                          ``_positive_scores``; not where a word of its name begins
                          with one of ``CLASS_NAMES``: logit, prob, class...), and when a
                          word of its name begins with one of ``REGRESSION_NAMES``
                          (landmark, keypoint, bbox, coord, offset...); ``embedding``
                          (below) for a pooled vector: an output named as one
                          (``EMBEDDING_NAMES``: embedding, pooler, sentence, feature...),
                          one whose rows (8 entries or more, not probabilities) all have
                          Euclidean length 1 (an L2-normalized embedding,
                          ``_unit_rows``), or one of width D beside a ``[N, T, D]``
                          output that is judged as an embedding (sentence-transformers'
                          pair); and ``sqnr`` when the width C differs between samples
                          or the model declares it symbolic (``sequence_outputs``:
                          per-step values of a sequence, not classes)
``[N, T, C]`` rows that   ``ctc``: greedy CTC decode (argmax per step, repeats merged,
sum to 1                  the blank dropped: the class that fills most of the reference's
(or time-major            steps, ``_ctc_blank``); 1 - exact-match rate and the character
``[T, 1, C]``: rows       error rate (edit distance / reference length), both judged; a
that sum to 1, or         ``[T, 1, C]`` sample (T > 1) is one time-major sequence
logits: named so, or      (a CRNN's ``[T, batch, C]``), decoded also from raw logits
deciding per step)        when the output's name says logits, or when they decide
                          classes step by step (``_per_step_classes``). Only when they
                          read as a CTC recognizer's (``_ctc_like``: peaked, symbols as
                          spikes between blanks); framewise scores (a VAD's states per
                          frame, held over a segment) are judged by ``argmax`` per frame,
                          and so are scores with one step per token of a token-id
                          input (``TaskJudge(tokens=...)``, ``token_outputs``: a masked
                          language model's, a tagger's), which no CTC alignment relates
``[N, T, 1]``, T >= 2,    ``threshold``: each frame's decision at ``DECISION`` (0.5), above
in [0, 1] (a probability  or not; the fraction of frames decided otherwise (value noise
per frame: a VAD's        that moves none across 0.5 counts nothing). Named, it judges
speech score)             every element of any float output so
``[N, 1]``, or ``[N]`` of   ``threshold`` as well: one binary decision's probability per
at most ``FEW_DECISIONS``  item (a VAD's speech per chunk, a wake word's, a verifier's
(16), in [0, 1], not one   same-or-not); a longer ``[N]`` is a sequence of activations
softmax row, on both      (a beat tracker's per frame, read by a peak picker), and values
sides of 0.5 or near 0    on one side, spread, or named as ``REGRESSION_NAMES``, a
or 1 almost everywhere    measurement: ``sqnr``
``[N, 1, H, W]`` or       ``detection-map``: pixels above ``MAP_THRESHOLD`` (0.3) form
``[N, H, W]`` in [0, 1],  the mask; its connected components' bounding boxes (sides of
at most 10% of pixels     at least 3 pixels) are the detections; 1 - box F1 (IoU >= 0.5),
strictly between 0.1      1 - mask IoU, and ``added_boxes``: boxes beyond the reference's
and 0.9 (``_saturated``)  count, max(0, n_got - n_ref) / max(n_ref, 1), all judged; a map
                          with more pixels in between (a saliency map, a soft mask: no
                          user thresholds it into boxes) is judged by ``sqnr``
``[N, 4+K, A]``, A > 4+K, ``boxes`` (YOLO-style): boxes cx, cy, w, h and K class scores per
class rows in [0, 1]      anchor, score threshold ``BOX_SCORE`` (0.25, where a user cuts),
                          per-class NMS (IoU 0.45); 1 - box F1 (same class, one-to-one at
                          IoU >= 0.5) over the boxes of both sides at that score
``[N, A, 5+K]``, A > 5+K, ``boxes`` as well (YOLOv5, YOLOX): cx, cy, w, h, objectness and K
objectness and scores     class scores per anchor; a class's score is objectness times
in [0, 1], most anchors   its score (their confidence). Decoded (pixels: w, h >= 0,
background                centres spread beyond ``RAW_SPAN``) or raw YOLOX (offsets in
(``box_layout``)          cells and log sizes, decoded on the square stride 8/16/32(/64)
                          grid that the anchor count gives, ``anchor_grid``)
``[N, K, 6]``, K > 6,     ``boxes`` as well (an end-to-end or NMS export: YOLOv10,
final detections          YOLO26, Ultralytics' ``nms=True``): x0, y0, x1, y1, score and
(``box_layout``)          class id per row, the rows sorted by score; read as they are
                          (the model has chosen them: no NMS), those at ``BOX_SCORE``
other ``[N, T, H]``,      ``embedding``: hidden states mean-pooled over the positions
H >= 8                    (those the attention mask keeps); 1 - mean cosine of the
                          pooled vectors, and ``ranking``: 1 - Spearman of their pairwise
                          similarities; but ``argmax`` per token when a classifier head
                          computes them (``TaskJudge(heads=...)``, ``projected_outputs``:
                          a MatMul onto fewer columns, plus a bias) and they decide a
                          class step by step (``_per_step_classes``): a tagger's emissions
                          (with one step per token, two classes suffice: a narrower
                          output judged by ``sqnr`` is read so too)
integer or boolean        ``labels`` (always; not selectable): 1 - the fraction of rows
(ids, labels, flags)      that agree exactly, a row being a sample's entry along the
                          first axis (a line of decoded ids, one label of ``[N]``); a
                          sample whose shape changed disagrees in every row. Not for
                          one computed from no float value (``float_free_outputs``: ids
                          passed through, shapes), which is compared exactly
a recurrent op's output   ``sqnr`` (below), whatever its shape: an LSTM's, GRU's or RNN's
(``Y``, ``Y_h``, ``Y_c``) hidden states or state, measured values, not class scores
through layout ops, or    or a pooled vector (``TaskJudge(recurrent=...)``,
a part or Concat of such  ``recurrent_outputs``)
anything else             ``sqnr``: noise power / signal power, summed over ALL held-out
                          samples (never a per-sample median or worst, which one blank
                          input would dominate); reported in dB
========================  ==============================================================

Each row's metric comes with why it was chosen, in words (``metric_choice``'s evidence,
or "given"): ``TaskJudge.chosen``, a verdict's ``chosen``.

The fractions of ``argmax``, ``threshold``, ``ctc``, ``detection-map``, ``boxes``, ``labels`` and
``embedding``'s ranking count items: a component over fewer than ``MIN_ITEMS`` of them is
judged by SQNR instead (below), except the ranking, whose output the pooled cosine then
decides, and ``labels``, judged as usual over however few rows (no SQNR of ids means
anything: a few rows can reject, and accept only when they agree).

**Noise floor.** The float model is run on the held-out samples with every float input
perturbed at its own resolution, and the same metric compares that with the float
model's unperturbed outputs: this is how much the task result moves under noise any
real input carries. Image-like inputs (4-D float, 1 to 4 channels on axis 1 or 3,
spatial sides of at least 8) are taken as 8-bit pictures however they were normalized:
each value moves by +-1/255 of its channel's range (one grey level), sign drawn from a
fixed-seed generator; not a decoder's past caches or a streaming model's state
(``input_roles``' ``past`` and ``state``), which hold values the model computed in
float, whatever their shape. Other float inputs move by one unit in the last place
(``numpy.spacing``), the dtype's own resolution, except their whole-number values (token
ids, counts or flags fed as float: a model that truncates them to integers would read one
ulp below ``k`` as ``k - 1``, a floor made of changed inputs rather than noise), and
except a float waveform (``[batch, T]``, ``[batch, T, 1]`` or ``[batch, 1, T]``, T of at
least ``WAVEFORM_MIN_SAMPLES``, every value within [-1, 1] on the 16-bit grid: audio decoded
from 16-bit PCM, as audio loaders return it), which moves by one PCM step, +-1/32768, held within
[-1, 1]: its recording's own resolution, which one ulp of a quiet sample is far below. A 16-bit
integer input (``int16``/``uint16``: a signal sampled so, as 16-bit PCM audio) moves by
one step of its dtype, +-1 LSB, held at the dtype's limits, unless it indexes a table
(``ids``: token ids, positions, masks, as ``input_roles`` finds them); so does a uint8
picture (image-like as above, fed as its 8-bit pixels): +-1, one grey level. Other
integer inputs (ids, indices, lengths, masks, flags) are left alone: their values are
identities, and one step would name another token or change a count, not add noise.

**Several draws.** ``TaskJudge(draws=[...])`` takes the float model's outputs under more
independent perturbations (``perturbation_draws``: draw ``d`` of sample ``i`` seeded
``(i, d)``). Every component's floor is then the mean over the draws, except for the
components over confident decisions, ``argmax``, ``threshold``, ``ctc_exact`` and ``labels``
(``TaskJudge.excuses``): there an error float32 makes itself under some draw (a confident
top-1 it flips, a line it decodes differently, a row of ids it changes) is noise, not the
candidate's error, and is not counted, and the floor is the most any one draw errs where
none of the others does (leave one out: how often a new draw of the noise leaves the
envelope of the draws before it). With one draw nothing is excused. ``boxes``' ``box_f1``
excuses nothing and is measured on ``FLOOR_DRAWS`` draws (``TaskJudge.wants_draws``), its
floor their mean: a user
thresholds at one score and gets every box that crosses it, so a candidate that moves
scores across the threshold more often than the input's noise does is judged by how
often, not forgiven box by box because float32 also crosses there under some draw; and
which near-threshold boxes cross changes from draw to draw, so one draw's count is a
coarse sample of float32's rate. A detection map's boxes are connected components of a
thresholded map, which a one-pixel change merges or splits: on PP-OCRv4 det's text pages
each new draw still breaks boxes no earlier draw broke, so a few draws do not tell its
stable boxes, and its box F1 is judged plainly against the floor (one draw: it hardly
moves from draw to draw).

**Acceptance.** Every judged component of every output must hold:
``deviation <= margin * max(floor, minimum)`` (``DEFAULT_MARGIN`` = 1.5; ``minimum`` is
``MIN_DEVIATION`` = 0.01 for the fraction metrics, 0 for ``sqnr``), or the user's target
is met: ``score >= metric_target`` for the task metrics (score = 1 - deviation for the
built-in ones), ``SQNR >= min_sqnr_db`` for ``sqnr``.

**A floor measured when it decides.** The perturbed outputs may be given as
``DeferredOutputs``, run the first time they are read. A judge reads them only for a
judgement the floor can change: a candidate whose every judged row is ``sqnr`` and meets
``min_sqnr_db`` passes whatever the floor, so, while the floor is not measured, its rows
say so and leave the floor out (``TaskJudge.floor_measured`` stays False); every other
judgement, and ``thin`` and ``undecided`` where a row counts items, measures it.

**Too few items.** The count-based components are fractions over items, and report how
many (``items``): ``argmax`` over the confident samples, ``ctc_exact`` over the lines,
``cer`` over the reference characters, ``box_f1`` over the boxes of both sides (for
``boxes``, those at ``BOX_SCORE``), ``mask_iou`` over the mask's union pixels. A fraction
over n items moves in steps of 1/n, and its floor measured on the same n items is as
coarse: with one box, one disagreement makes the deviation 1 and the floor
is 0 or 1. So a component over fewer than ``MIN_ITEMS`` (10) items is reported, not
judged, and its output is judged in addition by SQNR as a ``sqnr`` output is (summed
over all held-out samples, against the float model's perturbed SQNR floor with the
margin, or at least ``min_sqnr_db``), in a row ``<output>:sqnr`` that says why. Except
where the floor is measured on several draws and the component excuses float32's own
errors (``argmax``, ``ctc_exact``; above): a top-1 flipped or a line decoded differently
that float32 keeps under every draw is the candidate's error however few the items, so
such a component is judged as usual (a few items can reject, never accept alone) and
SQNR judges its output too. A
``boxes`` output gets two such rows, ``sqnr_coordinates`` (rows 0-3) and ``sqnr_scores``
(the class rows): coordinates in pixels next to scores in [0, 1] make a summed SQNR the
coordinates' alone (30 dB with every score rounded to 0 or 1.26). The other components
of that output are still judged when they have enough items (with 3 held-out text
lines, ``cer`` over their characters still decides). ``embedding``'s ``ranking`` over
fewer pairs adds no SQNR row: its ``cosine`` compares each sample's pooled embedding,
what a ranking of a few pairs would show, and decides alone (the raw hidden states'
SQNR would judge padded positions, and token-id inputs give it no floor).
``TaskJudge.thin`` lists the components whose items, at their allowed rate, hold fewer
than ``FEW_EXPECTED_ERRORS`` errors (too few to tell the floor from a few times it), for
a caller that can hold out more samples (the INT8 driver then holds out half).
``TaskJudge.undecided`` lists the components the floor's samples give too few items, for
a caller that can judge more samples instead (the INT8 driver then judges all of them).

**Groups.** ``TaskJudge(groups=[label per sample])`` judges each group apart against its
own floor, in rows ``<output>@<group>:<part>``; all must pass. A metric mapping may name
a group: ``{"<output>@<group>": m}`` or ``{"@<group>": m}`` (every output of that group)
before ``{"<output>": m}``, and ``{"*": m}`` names every output the others do not.
``added-boxes`` judges a detection map by ``added_boxes`` alone: for a group of inputs
with nothing to detect (text-free photos for a text detector), where every box is a
false positive and agreeing with float32's boxes or mask means nothing. ``added_boxes``
is a bound on a count, not a score: it has no item minimum and ``metric_target`` does
not replace it.

**User metrics.** ``metric=callable(ref_outputs, got_outputs) -> float``, higher is
better, where both arguments map each graph output name to its list of arrays (one per
held-out sample). The deviation is ``metric(ref, ref) - metric(ref, got)``, and the
floor the same with the perturbed float outputs; ``metric(ref, ref)`` must be finite.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from optcc import ir as oir
from optcc.errors import BadInputError
from optcc.numerics.inputs import input_roles
from optcc.numerics.metrics import real_values, special_values_problem

__all__ = [
    "METRICS", "DEFAULT_MARGIN", "MIN_DEVIATION", "Outputs", "UserMetric", "choose_metric", "perturb",
    "projected_outputs", "recurrent_outputs",
    "MIN_ITEMS", "FEW_EXPECTED_ERRORS", "REPORTED_ONLY", "EMBEDDING_NAMES", "CLASS_NAMES", "REGRESSION_NAMES",
    "sequence_outputs",
    "float_free_outputs",
    "measure", "deviations", "TaskJudge", "perturbation_draws", "perturbation_roles", "unmoved", "moves_nothing",
    "FLOOR_DRAWS",
    "row_metrics", "row_choices", "token_outputs", "metric_choice", "wants_draws", "DeferredOutputs",
    "ctc_greedy",
    "map_boxes", "yolo_boxes", "box_f1", "box_layout", "class_rows", "anchor_grid",
]

Outputs = Mapping[str, Sequence[np.ndarray]]  # output name -> one array per sample


class DeferredOutputs(Mapping[str, Sequence[np.ndarray]]):
    """``Outputs`` that ``compute`` returns the first time any of them is read (a noise
    floor's perturbed runs, made only for a judgement that reads them), then kept."""

    def __init__(self, compute: Callable[[], Outputs]) -> None:
        self._compute: Callable[[], Outputs] | None = compute
        self._values: Outputs | None = None

    @property
    def computed(self) -> bool:
        """Whether the outputs were computed (read at least once)."""
        return self._compute is None

    def _outputs(self) -> Outputs:
        if self._compute is not None:
            self._values, self._compute = self._compute(), None
        assert self._values is not None
        return self._values

    def __getitem__(self, name: str) -> Sequence[np.ndarray]:
        return self._outputs()[name]

    def __iter__(self) -> Any:
        return iter(self._outputs())

    def __len__(self) -> int:
        return len(self._outputs())


UserMetric = Callable[[Outputs, Outputs], float]
_Measured = tuple[dict[str, float], dict[str, int]]  # deviation per component; items per count-based one
METRICS = ("sqnr", "argmax", "ctc", "threshold", "detection-map", "boxes", "embedding", "added-boxes")
DEFAULT_MARGIN = 1.5
MIN_DEVIATION = 0.01
MIN_ITEMS = 10
# a count-based component whose items, at its allowed rate, hold fewer errors than this
# could not tell a model at float32's noise floor from one a few times worse
FEW_EXPECTED_ERRORS = 3.0
FLOOR_DRAWS = 4  # independent perturbation draws the INT8 driver measures the floor with
# metrics whose deviation only grows as samples other than the reference's are added (a
# summed noise power over a fixed signal, a count over fixed items): a miss on some
# samples, the others as the reference, is a miss (``TaskJudge.misses_already``)
PREFIX_DECIDED = frozenset({"sqnr", "argmax"})
PREFIX_SLACK_DB = 1e-9  # far above log10's rounding of an SQNR, far below any SQNR that matters
CONFIDENT_GAP = 0.1
SCORE_SPAN = 10.0  # positive [N, C] values within this ratio of each other are scores on a scale, not classes
MAP_THRESHOLD = 0.3
MAP_LOW = 0.1  # a map's pixel at most this, or at least 1 - this, has decided
DECISION = 0.5  # a probability above this decides yes (``threshold``: a VAD's speech per frame)
FEW_DECISIONS = 16  # an [N] output of at most this many probabilities is one decision per item, not a sequence
MAP_UNDECIDED = 0.1  # a detection map has at most this fraction of its pixels undecided
EMBEDDING_MIN_WIDTH = 8  # entries of a vector read as an embedding
CTC_DECIDED = 0.75  # a CTC recognizer is confident on at least this fraction of its steps
CTC_MAX_RUN = 2.0  # steps a CTC recognizer's symbol holds on average (a spike between blanks)
UNIT_TOLERANCE = 1e-3  # an L2-normalized row's length is 1 within float32 rounding
PROBABILITY_ULPS = 4  # a probability computed in floating point stays this many ulps of 1 within [0, 1]
MIN_BOX_SIDE = 3  # pixels; smaller components are dropped, as DB post-processing does
BOX_SCORE = 0.25  # the deployment score threshold (Ultralytics' default confidence)
NMS_IOU = 0.45
MATCH_IOU = 0.5
BACKGROUND = 0.1  # a detector's median anchor is background: its objectness is below this
RAW_SPAN = 16.0  # raw YOLOX centres are offsets within a few cells; decoded ones spread over pixels
GRID_STRIDES = ((8, 16, 32), (8, 16, 32, 64))  # YOLOX's pyramids (P5, P6), finest level first
_SEED = 0


# --------------------------------------------------------------------------- choice


def _softmax_rows(a: np.ndarray) -> bool:
    return bool(a.size) and float(a.min()) >= -1e-6 and np.allclose(a.sum(-1), 1.0, atol=1e-3)


def _unit_rows(values: Sequence[np.ndarray]) -> bool:
    """Whether every row of every sample is a vector of ``EMBEDDING_MIN_WIDTH`` or more
    entries and Euclidean length 1 (within ``UNIT_TOLERANCE``) and the rows are not
    probabilities (a one-hot row has length 1 too): an L2-normalized embedding, as face
    and image encoders emit, compared by cosine, never by its largest entry."""
    if values[0].shape[-1] < EMBEDDING_MIN_WIDTH or any(_softmax_rows(v) for v in values):
        return False
    lengths = np.concatenate([np.linalg.norm(np.asarray(v, np.float64).reshape(-1, v.shape[-1]), axis=-1)
                              for v in values])
    return bool(lengths.size) and bool(np.all(np.abs(lengths - 1.0) <= UNIT_TOLERANCE))


def _confident_somewhere(values: Sequence[np.ndarray]) -> bool:
    """Whether some row, read as class scores, is confident (top-1 probability at least
    ``CONFIDENT_GAP`` above the second): a classifier is, on some input; coordinates or
    measured values never look so (their softmax is near uniform)."""
    return any(_confident(rows).any() for rows in _finite_rows(values))


def _positive_scores(values: Sequence[np.ndarray]) -> bool:
    """Whether every finite value of every sample is positive, some above 1, and the
    largest at most ``SCORE_SPAN`` times the smallest: a row of scores on a fixed scale (a
    speech-quality model's MOS per aspect, 1 to 5), whose values the user reads and whose
    largest entry means nothing. A classifier's logits take both signs (softmax ignores
    their offset, and training leaves them about 0), its log-probabilities are negative, its
    probabilities stay within [0, 1], and exponentiated scores span orders of magnitude."""
    rows = _finite_rows(values)
    if not rows:
        return False
    low = min(float(r.min()) for r in rows)
    high = max(float(r.max()) for r in rows)
    return low > 0.0 and high > 1.0 and high <= SCORE_SPAN * low


def _finite_rows(values: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each sample's rows along the last axis (``[n, C]`` float64) that hold no NaN or
    infinity, samples left with none left out: a masked row says nothing."""
    rows = (np.asarray(v, np.float64).reshape(-1, np.asarray(v).shape[-1]) for v in values)
    return [r for r in (r[np.all(np.isfinite(r), axis=-1)] for r in rows) if r.size]


# the output ranks a named metric can judge (docs/int8.md's table); the others judge any
_METRIC_RANKS = {"boxes": (3,), "ctc": (3,), "detection-map": (3, 4), "added-boxes": (3, 4), "embedding": (2, 3)}


def _metric_misfit(metric: str, sample: np.ndarray) -> str | None:
    """Why a named built-in ``metric`` cannot judge an output of which ``sample`` is one
    sample's array (its shape as onnxruntime returns it, whatever the model declares), or
    None when it can."""
    ranks = _METRIC_RANKS.get(metric)
    shape = np.shape(sample)
    if ranks is not None and len(shape) not in ranks:
        return f"it judges outputs of rank {' or '.join(map(str, ranks))}"
    if metric in ("argmax", "ctc") and shape and shape[-1] < 2:
        return "it needs at least 2 classes on the last axis"
    return None


def _per_step_classes(values: Sequence[np.ndarray], min_classes: int = 3) -> bool:
    """Whether sequences of scores (``[N, T, C]`` or time-major ``[T, 1, C]``, C >= ``min_classes``) hold
    class scores decided step by step, as a recognizer's raw logits or a tagger's emissions
    do: most steps confident (``_confident``), and the top class changing along the
    sequence in some sample. Hidden states are not: bounded
    ones (an RNN's) are confident nowhere, and an outlier channel that dominates every
    step is one class throughout."""
    if values[0].shape[-1] < min_classes:
        return False
    rows = _finite_rows(values)
    if not rows:
        return False
    confident = np.concatenate([_confident(r) for r in rows])
    return float(confident.mean()) >= 0.5 and any(len(np.unique(r.argmax(-1))) > 1 for r in rows)


def _ctc_like(values: Sequence[np.ndarray]) -> bool:
    """Whether class-score sequences (``[N, T, C]``, or one time-major ``[T, 1, C]``) read as
    a CTC recognizer's rather than a framewise classifier's: CTC's posteriors are peaked (at
    least ``CTC_DECIDED`` of the steps confident, ``_confident``) and its symbols come as
    spikes, the top classes other than the one that fills most steps (the blank) holding
    for at most ``CTC_MAX_RUN`` steps on average. A framewise classifier (a VAD's states
    per frame, a tagger's tag per token) holds a decision over the frames of a segment, and
    its posteriors over many classes are soft where the input is ambiguous. An
    autoregressive decoder's tokens (a table-structure or attention recognizer's, read up to
    its end token) are not CTC either, though they may repeat as spikes do: its filler is
    the padding after the end, so on no line does it come before a symbol, while a CTC
    recognizer's blank comes between (and before) its symbols."""
    lines = [line[np.all(np.isfinite(line), axis=-1)]
             for v in values for line in _batch_major(np.asarray(v, np.float64))]
    lines = [line for line in lines if len(line)]
    if not lines:
        return True
    if float(np.concatenate([_confident(line) for line in lines]).mean()) < CTC_DECIDED:
        return False
    best = [line.argmax(-1) for line in lines]
    filler = int(np.bincount(np.concatenate(best)).argmax())
    symbol_steps = symbol_runs = 0
    blank_before_symbol = False  # no symbol at all leaves the question open: read as CTC
    for steps in best:
        starts = np.r_[True, steps[1:] != steps[:-1]]
        symbols = steps != filler
        symbol_steps += int(np.count_nonzero(symbols))
        symbol_runs += int(np.count_nonzero(starts & symbols))
        # a filler step before the line's last symbol: the filler is a blank, not padding after an end
        blank_before_symbol |= bool(symbols.any()) and bool((~symbols[:np.flatnonzero(symbols)[-1]]).any())
    return (blank_before_symbol or not symbol_steps) and symbol_steps <= CTC_MAX_RUN * symbol_runs


def sequence_outputs(model: ir.Model) -> set[str]:
    """The graph outputs declared ``[N, C]`` with C symbolic or unknown: a class count is
    fixed, so their last axis is a sequence (per-step values) for ``choose_metric``."""
    found = set()
    for value in model.graph.outputs:
        shape = value.shape
        if shape is not None and shape.rank() == 2 and not isinstance(shape[1], int):
            found.add(value.name)
    return found


def _constant_shape(value: ir.Value) -> tuple[int, ...] | None:
    """The shape of a constant value (an initializer or a Constant node's tensor), else None."""
    try:
        tensor = oir.const_tensor(value)
    except ValueError:  # a malformed Constant: no constant to read
        return None
    return None if tensor is None else tuple(tensor.shape)


def projected_outputs(model: ir.Model) -> set[str]:
    """The graph outputs a classifier head computes: a MatMul by a constant ``[H, C]`` weight
    with C < H (a projection onto fewer columns), plus a constant bias or not, behind
    Identity nodes. Per token (``[N, T, C]``) these are class scores, a tagger's emissions;
    hidden states end in a normalization or a residual Add instead."""
    found = set()
    for output in model.graph.outputs:
        value: ir.Value | None = output
        node = value.producer()
        while node is not None and node.op_type == "Identity":
            value = node.inputs[0]
            node = value.producer() if value is not None else None
        if node is not None and node.op_type == "Add" and len(node.inputs) == 2 and all(node.inputs):
            constant = [i for i in node.inputs if _constant_shape(i) is not None]
            if len(constant) == 1:
                value = next(i for i in node.inputs if i is not constant[0])
                node = value.producer()
        if node is None or node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.inputs[1] is None:
            continue
        weight = _constant_shape(node.inputs[1])
        if weight is not None and len(weight) == 2 and weight[1] < weight[0]:
            found.add(output.name)
    return found


# recurrent ops whose every output (Y, Y_h, Y_c) is a sequence of hidden states or a state
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})
# ops that move values without computing new ones: a recurrent output behind them is still one
LAYOUT_OPS = frozenset({"Identity", "Squeeze", "Unsqueeze", "Transpose", "Reshape", "Flatten"})
# ops that pick a part of their first input's values (a direction, a step, a unit range)
PICKING_OPS = frozenset({"Slice", "Gather", "Split"})
RECURRENT_REASON = "a recurrent op's state or hidden states, moved or picked apart only: measured values"


def recurrent_outputs(model: ir.Model) -> set[str]:
    """The graph outputs that are a recurrent op's outputs (``RECURRENT_OPS``: its hidden
    states ``Y``, its last hidden state ``Y_h``, an LSTM's cell state ``Y_c``) moved only by
    layout ops (``LAYOUT_OPS``), parts of them (``PICKING_OPS``) or Concats of them. They
    are measured values (an encoder's memory, bounded activations), whatever their shape or
    values look like: no class is the largest entry of a state, and a decoder reads every
    step of ``Y``, not their mean."""
    known: dict[ir.Value, bool] = {}
    return {output.name for output in model.graph.outputs if _recurrent(output, known)}


def _recurrent(value: ir.Value, known: dict[ir.Value, bool]) -> bool:
    """Whether ``value`` is a recurrent op's output moved by layout ops, a part of one
    picked by ``PICKING_OPS`` (one direction of a bidirectional RNN's ``Y``), or a Concat
    of such values only (``recurrent_outputs``). Walked without recursion, each value
    decided once (``known``), so a long or branching Concat chain costs its size."""
    stack = [value]
    while stack:
        top = stack[-1]
        if top in known:
            stack.pop()
            continue
        node = top.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            reads: list[ir.Value | None] | None = None
        elif node.op_type in RECURRENT_OPS:
            reads = []
        elif node.op_type == "Concat":
            reads = list(node.inputs) or None
        elif node.op_type in LAYOUT_OPS or node.op_type in PICKING_OPS:
            reads = list(node.inputs[:1]) or None
        else:
            reads = None
        if reads is None or any(v is None for v in reads):
            known[top] = False
            stack.pop()
            continue
        pending = [v for v in reads if v not in known]
        if pending:
            stack.extend(pending)
            continue
        known[top] = all(known[v] for v in reads)
        stack.pop()
    return known[value]


def _integer_like(dtype: ir.DataType | None) -> bool:
    return dtype is not None and (dtype.is_integer() or dtype == ir.DataType.BOOL)


def float_free_outputs(model: ir.Model) -> set[str]:
    """The integer or boolean graph outputs computed from no floating-point value: integer
    inputs passed through or combined, shapes read by Shape or Size. No precision change
    moves them, so they are compared exactly, not judged (``TaskJudge(exact=...)``). A value
    of unknown type, or a node with a subgraph, counts as floating point."""
    found = set()
    for output in model.graph.outputs:
        pending, seen, free = [output], set(), _integer_like(output.dtype)
        while pending and free:
            value = pending.pop()
            if id(value) in seen:
                continue
            seen.add(id(value))
            node = value.producer()
            if node is not None and node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx"):
                continue  # int64 by definition, read from a shape
            free = _integer_like(value.dtype) and (node is None or not any(
                a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()))
            if free and node is not None:
                pending.extend(v for v in node.inputs if v is not None)
        if free:
            found.add(output.name)
    return found


# words in an output's name that call a [N, C] output a pooled vector, not class scores
EMBEDDING_NAMES = ("embed", "pooler", "pooled", "sentence", "feature", "vector")
# words that begin a word of an output's name ("bbox_pred", "landmarks", not "transpose")
# and call a [N, C] output coordinates or measured values (a regressor's), whose largest
# entry means nothing: judged by SQNR
CLASS_NAMES = ("logit", "prob", "class", "cls", "label", "softmax")
REGRESSION_NAMES = ("landmark", "keypoint", "kps", "bbox", "box", "coord", "regress", "offset", "depth", "pose")


def _unit_interval(a: np.ndarray, dtype: np.dtype | None = None) -> bool:
    """Whether ``a``'s values are probabilities: within [0, 1] up to ``PROBABILITY_ULPS``
    ulps of 1 in ``dtype`` (default ``a``'s). A sigmoid computed in float32 can round to one
    ulp above 1 (onnxruntime's does, at some inputs near 17.8), and is no less a probability."""
    slack = PROBABILITY_ULPS * float(np.finfo(a.dtype if dtype is None else dtype).eps)
    return float(a.min()) >= -slack and float(a.max()) <= 1.0 + slack


def _saturated(maps: Sequence[np.ndarray]) -> bool:
    """Whether at most ``MAP_UNDECIDED`` of the maps' pixels lie strictly between
    ``MAP_LOW`` and 1 - ``MAP_LOW`` (in the map's own dtype): a detector's probability map
    is near 0 or 1 almost everywhere (its edges are thin); a saliency map or soft mask is
    not, and thresholding it would draw boxes no user draws."""
    between = sum(int(np.count_nonzero((m > m.dtype.type(MAP_LOW)) & (m < m.dtype.type(1.0 - MAP_LOW))))
                  for m in maps)
    return between <= MAP_UNDECIDED * sum(m.size for m in maps)


def choose_metric(samples: np.ndarray | Sequence[np.ndarray], name: str = "") -> str:
    """The built-in metric for an output, from its samples (one array, or one per sample:
    the shape rules read the first, the value rules all of them) and its name (see the
    module doc)."""
    return metric_choice(samples, name)[0]


def metric_choice(samples: np.ndarray | Sequence[np.ndarray], name: str = "") -> tuple[str, str]:
    """``choose_metric``'s metric for an output and, in words, the evidence that chose it."""
    values = [np.asarray(samples)] if isinstance(samples, np.ndarray) else [np.asarray(s) for s in samples]
    a = values[0]
    if not np.issubdtype(a.dtype, np.floating) or a.size == 0:
        return "sqnr", "no float values to read a task from"
    if a.ndim == 2 and a.shape[-1] >= 2:
        if _named_as(name, REGRESSION_NAMES):
            return "sqnr", "[N, C] named as coordinates or measured values"
        if any(word in name.lower() for word in EMBEDDING_NAMES):
            return "embedding", "[N, D] named as a pooled vector"
        if _unit_rows(values):
            return "embedding", "[N, D] rows of Euclidean length 1: an L2-normalized embedding"
        if _positive_scores(values) and not _named_as(name, CLASS_NAMES):
            return "sqnr", ("[N, C] positive values above 1 within one order of magnitude: scores on a scale, "
                            "not classes")
        if _confident_somewhere(values):
            return "argmax", "[N, C] class scores, confident on some sample"
        return "sqnr", "[N, C] confident on no sample: values, not class scores"
    sequences = _batch_major(a)
    if sequences.ndim == 3 and sequences.shape[1] >= 2 and sequences.shape[2] >= 2 and _softmax_rows(sequences):
        return _ctc_or_framewise(values, "[N, T, C] rows that sum to 1")
    if sequences is not a and a.shape[2] >= 2 and ("logit" in name.lower() or _per_step_classes(values)):
        return _ctc_or_framewise(values, "time-major [T, 1, C] class scores")
    if a.ndim == 3 and "logit" in name.lower() and a.shape[2] >= 2:
        return "argmax", "[N, T, C] named logits: the top class per step"
    if a.ndim == 3 and a.shape[1] >= 2 and a.shape[2] == 1 \
            and all(_unit_interval(v) for v in values):
        return "threshold", "[N, T, 1] in [0, 1]: one probability per step, decided at 0.5"
    if a.ndim in (3, 4) and (a.ndim == 3 or a.shape[1] == 1) and min(a.shape[-2:]) >= 8 \
            and all(_unit_interval(v) for v in values):
        if _saturated(values):
            return "detection-map", "a map in [0, 1], near 0 or 1 almost everywhere: a detector's probability map"
        return "sqnr", "a map in [0, 1] with many pixels in between: no user thresholds it into boxes"
    if _decision_per_sample(values) and not _named_as(name, REGRESSION_NAMES):
        return "threshold", "[N, 1] or a few [N] in [0, 1]: one probability per item, decided at 0.5"
    layout = box_layout(a)
    if layout is not None:
        return "boxes", f"YOLO-style boxes ({layout})"
    if a.ndim == 3 and a.shape[2] >= EMBEDDING_MIN_WIDTH:
        return "embedding", "[N, T, H] hidden states"
    return "sqnr", "no task shape: values"


def _decision_per_sample(values: Sequence[np.ndarray]) -> bool:
    """Whether every sample is ``[N, 1]`` or ``[N]`` with N at most ``FEW_DECISIONS``, in
    [0, 1] (``_unit_interval``), and its ``[N]`` values are not one softmax row: a binary
    decision's probability per item (a VAD's speech per chunk, a wake word's, a verifier's
    same-or-not), which its user reads above ``DECISION`` or not: the items fall on both
    sides of it, or near 0 or 1 almost everywhere (``_saturated``); values spread on one
    side are a measurement (a sigmoid-bounded regression), judged by SQNR. A longer ``[N]`` is a
    sequence of activations (a beat or onset tracker's per frame, read by a peak picker),
    and a row that sums to 1 is one sample's class scores."""
    def decisions(v: np.ndarray) -> bool:
        if v.ndim == 1:
            return 1 <= v.shape[0] <= FEW_DECISIONS and (v.shape[0] == 1 or not _softmax_rows(v))
        return v.ndim == 2 and v.shape[1] == 1 and v.size > 0

    if not all(decisions(v) and _unit_interval(v) for v in values):
        return False
    both_sides = any(float(v.max()) > DECISION for v in values) and any(float(v.min()) < DECISION for v in values)
    return both_sides or _saturated(values)


def _named_as(name: str, words: tuple[str, ...]) -> bool:
    """Whether a word of ``name`` begins with one of ``words``: ``REGRESSION_NAMES`` call
    the output coordinates or measured values, whatever its shape; ``CLASS_NAMES`` a
    classifier's scores, which still decide by their largest entry when shifted or scaled
    (logits offset to all-positive, probabilities in percent)."""
    return any(token.startswith(words) for token in re.split(r"[^a-z0-9]+", name.lower()))


def _ctc_or_framewise(values: Sequence[np.ndarray], what: str) -> tuple[str, str]:
    """``ctc`` for class-score sequences that read as a CTC recognizer's (``_ctc_like``),
    else ``argmax`` per step, with the evidence in words."""
    if _ctc_like(values):
        return "ctc", f"{what} read as a CTC recognizer's: peaked, symbols as spikes between blanks"
    return "argmax", f"{what} decided step by step, not as CTC spikes: the top class per step"


# --------------------------------------------------------------------------- perturbation


def _image_like(a: np.ndarray) -> int | None:
    """The channel axis of an image-like array (see the module doc): float, or uint8 (a
    picture fed as its 8-bit pixels); else None."""
    if a.ndim != 4 or not (np.issubdtype(a.dtype, np.floating) or a.dtype == np.uint8):
        return None
    if 1 <= a.shape[1] <= 4 and min(a.shape[2:]) >= 8:
        return 1
    if 1 <= a.shape[3] <= 4 and min(a.shape[1:3]) >= 8:
        return 3
    return None


WAVEFORM_MIN_SAMPLES = 512  # 32 ms at 16 kHz: the shortest window a speech model reads (Silero's chunk)
PCM_STEP = 1.0 / 32768.0  # one step of 16-bit PCM audio read as float in [-1, 1]


def _waveform(a: np.ndarray) -> bool:
    """Whether a float array is a waveform in [-1, 1], audio decoded from 16-bit PCM as
    float: ``[batch, T]``, ``[batch, T, 1]`` or ``[batch, 1, T]`` with ``T`` at least
    ``WAVEFORM_MIN_SAMPLES``, every value within [-1, 1] a whole number of ``PCM_STEP``
    (so a normalized embedding of that width is none) and not all whole numbers."""
    if a.ndim not in (2, 3) or not np.issubdtype(a.dtype, np.floating):
        return False
    long_axes = [axis for axis in range(1, a.ndim) if a.shape[axis] != 1]
    if len(long_axes) != 1 or a.shape[long_axes[0]] < WAVEFORM_MIN_SAMPLES:
        return False
    if not bool(np.all(np.abs(a) <= 1.0)) or bool(np.all(a == np.trunc(a))):
        return False
    levels = a.astype(np.float64) / PCM_STEP
    return bool(np.all(levels == np.round(levels)))


# integer dtypes that hold a sampled signal (16-bit PCM): moved by one step; the other
# integer dtypes hold ids, counts, masks or flags, which one step would change in meaning
SIGNAL_INTEGERS = (np.int16, np.uint16)


def perturb(feeds: Mapping[str, np.ndarray], seed: int | Sequence[int] = _SEED, not_images: Collection[str] = (),
            ids: Collection[str] = ()) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The feeds moved at their own resolution (module doc), and how, per input. Inputs
    named in ``not_images`` (a decoder's past key/value caches or a stream's state, whose
    few heads or unit axes could pass for channels) move by one ulp whatever their shape;
    integer inputs named in ``ids`` (those that index a table: token ids, positions) are
    left alone whatever their dtype, the others move by +-1 when their dtype is a 16-bit
    signal's (``SIGNAL_INTEGERS``) or when they are an 8-bit picture (uint8, image-like:
    one grey level)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    how: dict[str, str] = {}
    for name in sorted(feeds):
        a = np.asarray(feeds[name])
        picture = a.dtype == np.uint8 and name not in not_images and _image_like(a) is not None
        if (a.dtype.type in SIGNAL_INTEGERS or picture) and a.size and name not in ids:
            limits = np.iinfo(a.dtype)
            step = rng.choice(np.array([-1, 1]), size=a.shape)
            out[name] = np.clip(a.astype(np.int64) + step, limits.min, limits.max).astype(a.dtype)
            how[name] = "+-1 grey level (8-bit image)" if picture else "+-1 LSB (16-bit integer signal)"
            continue
        if not np.issubdtype(a.dtype, np.floating) or a.size == 0:
            out[name] = a
            continue
        sign = rng.choice(np.array([-1.0, 1.0]), size=a.shape)
        axis = None if name in not_images else _image_like(a)
        if axis is not None:
            others = tuple(i for i in range(a.ndim) if i != axis)
            step = (a.max(axis=others, keepdims=True) - a.min(axis=others, keepdims=True)).astype(np.float64) / 255.0
            out[name] = (a + sign * step).astype(a.dtype)
            how[name] = "+-1/255 of each channel's range (8-bit image)"
        elif name not in not_images and _waveform(a):
            out[name] = np.clip(a + sign * PCM_STEP, -1.0, 1.0).astype(a.dtype)
            how[name] = "+-1/32768 (float waveform in [-1, 1]: one 16-bit PCM step)"
        else:
            # whole numbers stay (ids, counts, flags fed as float: one ulp below k truncates
            # to k - 1), and so does the dtype's maximum (one ulp above is infinity)
            with np.errstate(over="ignore", invalid="ignore"):
                moved = (a + sign * np.spacing(a)).astype(a.dtype)
                whole = np.isfinite(a) & (a == np.trunc(a))
            out[name] = np.where(whole | ~np.isfinite(moved), a, moved)
            how[name] = "left alone (integer values)" if whole.all() else \
                "+-1 ulp (whole numbers left alone)" if whole.any() else "+-1 ulp"
    return out, how


def perturbation_roles(roles: Mapping[str, str]) -> dict[str, set[str]]:
    """``perturb``'s ``not_images`` and ``ids`` from ``input_roles``' roles: a decoder's past
    caches and a stream's state move by one ulp (a value the model computed in float, as
    exact as its dtype holds), integer inputs that index a table (ids, positions) or mask
    stay."""
    return {"not_images": {n for n, role in roles.items() if role in ("past", "state")},
            "ids": {n for n, role in roles.items() if role in ("index", "position", "mask")}}


def perturbation_draws(samples: Sequence[Mapping[str, np.ndarray]], draws: int, not_images: Collection[str] = (),
                       first: int = 0, ids: Collection[str] = (), at: Sequence[int] | None = None,
                       ) -> tuple[list[list[dict[str, np.ndarray]]], dict[str, str]]:
    """Independent perturbations ``first`` to ``draws - 1`` of every sample (``perturb``;
    draw 0 of sample ``i`` with seed ``i``, as the verifier's, draw ``d`` with seed
    ``(i, d)``), per draw one list of feeds, and how each input moves. ``at``: only the
    samples at these positions, in that order (each seeded by its position)."""
    result: list[list[dict[str, np.ndarray]]] = []
    how: dict[str, str] = {}
    for d in range(first, max(draws, 1)):
        moved = []
        for i in range(len(samples)) if at is None else at:
            feeds_moved, described = perturb(dict(samples[i]), seed=i if d == 0 else (i, d), not_images=not_images,
                                             ids=ids)
            moved.append(feeds_moved)
            how.update(described)
        result.append(moved)
    return result, how


def moves_nothing(samples: Sequence[Mapping[str, np.ndarray]], draw: int, not_images: Collection[str] = (),
                  ids: Collection[str] = ()) -> bool:
    """``unmoved(samples, moved)`` of perturbation draw ``draw`` of the samples
    (``perturbation_draws``), perturbing one sample at a time and stopping at the first
    whose inputs move: no draw of every sample is made to be thrown away."""
    return all(unmoved([samples[i]], moved) for i in range(len(samples))
               for moved in perturbation_draws(samples, draw + 1, not_images, first=draw, ids=ids, at=[i])[0])


def unmoved(samples: Sequence[Mapping[str, np.ndarray]], moved: Sequence[Mapping[str, np.ndarray]]) -> bool:
    """Whether every sample of ``moved`` (a ``perturbation_draws`` draw of ``samples``) holds
    the same inputs as its sample in ``samples``, dtype and values: no input of the model
    can move (token ids, masks). A model's outputs on them are then its outputs on
    ``samples``, and need no run of their own."""

    def same(a: np.ndarray, b: np.ndarray) -> bool:
        a, b = np.asarray(a), np.asarray(b)
        return a is b or (a.dtype == b.dtype and np.array_equal(a, b))

    return len(samples) == len(moved) and all(
        feeds.keys() == other.keys() and all(same(feeds[name], other[name]) for name in feeds)
        for feeds, other in zip(samples, moved))


# --------------------------------------------------------------------------- metrics


def _sqnr_noise(refs: Sequence[np.ndarray], gots: Sequence[np.ndarray]) -> float:
    """Noise power / signal power over all samples together (0 when identical). NaN,
    infinities and mask fills are no signal: they must be where the reference has them
    (NaN for NaN, the same infinity, a fill of the same sign: ``special_values_problem``),
    else the noise is infinite."""
    signal = noise = 0.0
    for ref, got in zip(refs, gots):
        r, g = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        real = real_values(r, g)
        if not real.all():
            if special_values_problem(r, g) is not None:
                return math.inf
            r, g = r[real], g[real]
        signal += float(np.sum(r ** 2))
        noise += float(np.sum((r - g) ** 2))
    if noise == 0.0:
        return 0.0
    return math.inf if signal == 0.0 else noise / signal


def _probabilities(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if _softmax_rows(a):
        return a
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _confident(rows: np.ndarray) -> np.ndarray:
    """Per row of class scores (``[n, C]``): whether its top-1 probability is at least
    ``CONFIDENT_GAP`` above the second."""
    p = np.sort(_probabilities(rows), -1)
    return (p[:, -1] - p[:, -2]) >= CONFIDENT_GAP


def _score_rows(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The samples' class-score rows, one ``[n, C]`` array."""
    return np.concatenate([np.asarray(a).reshape(-1, np.asarray(a).shape[-1]) for a in arrays])


def _judged_rows(ref: np.ndarray) -> np.ndarray:
    """The rows ``argmax`` judges: those float32 is confident about, all when it is about none."""
    confident = _confident(ref)
    return confident if confident.any() else np.ones_like(confident)


def _argmax_deviation(refs: Sequence[np.ndarray], gots: Sequence[np.ndarray]) -> _Measured:
    classes = np.asarray(refs[0]).shape[-1] if refs and np.asarray(refs[0]).ndim else 0
    if classes < 2:
        raise ValueError(f"the argmax metric needs at least 2 classes on the last axis; this output has {classes}")
    ref, got = _score_rows(refs), _score_rows(gots)
    confident = _judged_rows(ref)
    agree = ref.argmax(-1) == got.argmax(-1)
    return {"argmax": 1.0 - float(np.mean(agree[confident]))}, {"argmax": int(confident.sum())}


def _batch_major(a: np.ndarray) -> np.ndarray:
    """``a`` as ``[N, T, C]``: a ``[T, 1, C]`` array with T > 1 is one time-major sequence
    (``[1, T, C]``: a batch-major single sequence of one step would mean nothing to CTC)."""
    return a.transpose(1, 0, 2) if a.ndim == 3 and a.shape[1] == 1 and a.shape[0] > 1 else a


def ctc_greedy(probabilities: np.ndarray, blank: int = 0) -> list[list[int]]:
    """Greedy CTC decode of ``[N, T, C]`` (or one time-major ``[T, 1, C]`` sequence): argmax
    per step, repeats merged, blanks dropped."""
    best = _batch_major(np.asarray(probabilities)).argmax(-1)
    lines = []
    for row in best.reshape(-1, best.shape[-1]):
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        lines.append([int(c) for c in row[keep] if c != blank])
    return lines


def _edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def _ctc_blank(refs: Sequence[np.ndarray]) -> int:
    """The blank of a CTC recognizer's reference outputs: the class that fills most of
    their steps (``_ctc_like``'s filler), whichever index the model gives it (0 for
    PP-OCR, the last class for some CRNNs); the smallest such class on a tie."""
    best = [_batch_major(np.asarray(a)).argmax(-1).reshape(-1) for a in refs]
    return int(np.bincount(np.concatenate(best)).argmax()) if best and sum(b.size for b in best) else 0


def _ctc_deviation(refs: Sequence[np.ndarray], gots: Sequence[np.ndarray]) -> _Measured:
    exact = total = errors = length = 0
    blank = _ctc_blank(refs)
    for r, g in zip(refs, gots):
        for a, b in zip(ctc_greedy(r, blank), ctc_greedy(g, blank)):
            total += 1
            exact += a == b
            errors += _edit_distance(a, b)
            length += len(a)
    return ({"ctc_exact": 1.0 - exact / max(total, 1), "cer": errors / max(length, 1) if length else float(errors > 0)},
            {"ctc_exact": total, "cer": length})


def _components(mask: np.ndarray) -> np.ndarray:
    """The bounding boxes ``[x0, y0, x1, y1]`` (float64, end exclusive) of the connected
    components (4-neighbourhood) of a 2-D boolean mask, in the order of their first
    pixel in row-major order."""
    try:
        from scipy import ndimage
    except ImportError:  # pragma: no cover - scipy is optional
        return _extents(*_label_numpy(mask))
    labels, _ = ndimage.label(mask)
    return np.array([[x.start, y.start, x.stop, y.stop] for y, x in ndimage.find_objects(labels)],
                    np.float64).reshape(-1, 4)


def _label_numpy(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components by min-label propagation (no scipy): labels 1..count, numbered
    in the order of their first pixel in row-major order, 0 outside the mask."""
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1],
                                        padded[1:-1, :-2], padded[1:-1, 2:]])
        new = np.where(mask, neighbours, big)
        if np.array_equal(new, labels):
            break
        labels = new
    unique = np.unique(labels[mask])
    relabel = np.zeros(big + 1, np.int64)
    relabel[unique] = np.arange(1, len(unique) + 1)
    return relabel[labels], len(unique)


def _extents(labels: np.ndarray, count: int) -> np.ndarray:
    """The bounding boxes ``[x0, y0, x1, y1]`` (float64, end exclusive) of labels 1..count
    (each present) of a 2-D label image: each label's smallest and largest column and row."""
    boxes = np.zeros((count, 4))
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs] - 1
    boxes[:, :2] = np.inf
    np.minimum.at(boxes[:, 0], ids, xs)
    np.minimum.at(boxes[:, 1], ids, ys)
    np.maximum.at(boxes[:, 2], ids, xs + 1)
    np.maximum.at(boxes[:, 3], ids, ys + 1)
    return boxes


def map_boxes(probability_map: np.ndarray, threshold: float = MAP_THRESHOLD) -> list[np.ndarray]:
    """Per image of ``[N, 1, H, W]`` / ``[N, H, W]``: the boxes ``[x0, y0, x1, y1]`` of the
    connected components of ``map > threshold`` whose sides are at least ``MIN_BOX_SIDE``."""
    maps = np.asarray(probability_map)
    maps = maps.reshape(-1, *maps.shape[-2:])
    result = []
    for m in maps:
        boxes = _components(m > threshold)
        sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        result.append(boxes[sides >= MIN_BOX_SIDE])
    return result


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes ``[x0, y0, x1, y1]``."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _matches(ref: np.ndarray, got: np.ndarray, ref_cls: np.ndarray | None = None,
             got_cls: np.ndarray | None = None) -> int:
    """Greedy one-to-one matches at IoU >= MATCH_IOU (same class when given): the pair
    of the highest IoU left (the first in row-major order among equals) matches, its
    box on either side is used, and so on while a pair at MATCH_IOU or more is left.
    The pairs at MATCH_IOU or more, sorted once by IoU (row-major order among equals),
    are taken in turn where neither box is used yet: the same pairs, one sort instead
    of a search of the whole matrix per match."""
    iou = _iou(ref, got)
    if ref_cls is not None and got_cls is not None and iou.size:
        iou = np.where(ref_cls[:, None] == got_cls[None, :], iou, 0.0)
    rows, cols = np.nonzero(iou >= MATCH_IOU)  # row-major, the order argmax breaks ties in (no IoU is NaN)
    order = np.argsort(-iou[rows, cols], kind="stable")
    used_ref, used_got = set(), set()
    for i, j in zip(rows[order].tolist(), cols[order].tolist()):
        if i not in used_ref and j not in used_got:
            used_ref.add(i)
            used_got.add(j)
    return len(used_ref)


def box_f1(ref_boxes: Sequence[np.ndarray], got_boxes: Sequence[np.ndarray],
           ref_classes: Sequence[np.ndarray] | None = None, got_classes: Sequence[np.ndarray] | None = None,
           ) -> tuple[float, int]:
    """F1 of ``got`` against ``ref`` over all images (1 when both have none), and the
    count of unmatched ``got`` boxes (false positives)."""
    tp = n_ref = n_got = 0
    for i, (r, g) in enumerate(zip(ref_boxes, got_boxes)):
        rc = None if ref_classes is None else ref_classes[i]
        gc = None if got_classes is None else got_classes[i]
        tp += _matches(r, g, rc, gc)
        n_ref += len(r)
        n_got += len(g)
    if n_ref + n_got == 0:
        return 1.0, 0
    return 2.0 * tp / (n_ref + n_got), n_got - tp


def _map_deviation(refs: Sequence[np.ndarray], gots: Sequence[np.ndarray]) -> _Measured:
    inter = union = 0
    ref_boxes: list[np.ndarray] = []
    got_boxes: list[np.ndarray] = []
    for r, g in zip(refs, gots):
        rm, gm = np.asarray(r) > MAP_THRESHOLD, np.asarray(g) > MAP_THRESHOLD
        inter += int(np.sum(rm & gm))
        union += int(np.sum(rm | gm))
        ref_boxes += map_boxes(r)
        got_boxes += map_boxes(g)
    f1, false_positives = box_f1(ref_boxes, got_boxes)
    # F1 = 2 TP / (n_ref + n_got): a fraction over the boxes of both sides; IoU over the union's pixels
    n_ref, n_got = sum(len(b) for b in ref_boxes), sum(len(b) for b in got_boxes)
    # boxes found beyond the reference's count, relative to it (at least 1 box): on inputs with
    # nothing to detect every box is a false positive, and no F1 over shared boxes sees them
    added = max(0, n_got - n_ref) / max(n_ref, 1)
    return ({"box_f1": 1.0 - f1, "mask_iou": 1.0 - (inter / union if union else 1.0),
             "extra_boxes": float(false_positives), "added_boxes": float(added)},
            {"box_f1": n_ref + n_got, "mask_iou": union})


def _added_boxes_deviation(refs: Sequence[np.ndarray], gots: Sequence[np.ndarray]) -> _Measured:
    """A detection map's ``added_boxes`` alone: for inputs with nothing to detect, where
    every box is a false positive and agreeing with the reference's boxes means nothing."""
    n_ref = sum(len(b) for r in refs for b in map_boxes(r))
    n_got = sum(len(b) for g in gots for b in map_boxes(g))
    return {"added_boxes": max(0, n_got - n_ref) / max(n_ref, 1)}, {}


# --------------------------------------------------------------------------- YOLO layouts


def anchor_grid(anchors: int) -> np.ndarray | None:
    """``[A, 3]`` (cell x, cell y, stride) of each anchor of a raw YOLOX output with
    ``anchors`` rows, one anchor per cell on a square input, levels finest first and cells
    row-major (YOLOX's export order); None when no pyramid of ``GRID_STRIDES`` has that
    many cells. At most one pyramid fits: 21 m^2 = 85 k^2 has no solution in integers."""
    for strides in GRID_STRIDES:
        per_coarsest = sum((strides[-1] // s) ** 2 for s in strides)  # cells per coarsest cell
        if anchors % per_coarsest:
            continue
        n = math.isqrt(anchors // per_coarsest)  # coarsest cells per side
        if n < 1 or n * n * per_coarsest != anchors:
            continue
        levels = []
        for s in strides:
            side = n * strides[-1] // s
            ys, xs = np.divmod(np.arange(side * side), side)
            levels.append(np.stack([xs, ys, np.full(side * side, s)], 1))
        return np.concatenate(levels).astype(np.float64)
    return None


def _raw_offsets(coordinates: np.ndarray) -> bool:
    """Whether ``[A, 4]`` reads as raw YOLOX regression on its anchor grid: centres as
    offsets within a few cells (some below 0), and a pyramid with that many anchors."""
    centres = coordinates[:, :2]
    return float(centres.max() - centres.min()) <= RAW_SPAN and float(coordinates.min()) < 0.0 \
        and anchor_grid(len(coordinates)) is not None


def box_layout(sample: np.ndarray) -> str | None:
    """How a YOLO-style output holds its boxes, from one sample, on evidence: None when it
    does not read as boxes.

    - ``"class-rows"``: ``[N, 4+K, A]`` (YOLOv8): rows cx, cy, w, h, then K class scores
      in [0, 1]; fewer rows than anchors.
    - ``"anchor-rows"``: ``[N, A, 5+K]`` decoded (YOLOv5, YOLOX with its decoding
      exported): per anchor cx, cy, w, h in pixels, objectness, K class scores; more
      anchors than columns, objectness and scores in [0, 1], most anchors background
      (median objectness below ``BACKGROUND``), w and h never negative, and centres spread
      over more than ``RAW_SPAN`` (pixels, not cell offsets).
    - ``"anchor-grid"``: the same columns raw (YOLOX without its decoding): centre offsets
      in cells and log sizes, decoded on the square anchor grid that ``anchor_grid``
      finds from A alone.

    - ``"detections"``: ``[N, K, 6]`` final detections (an end-to-end or NMS export:
      YOLOv10, YOLO26, Ultralytics' ``nms=True``): per row x0, y0, x1, y1, score in
      [0, 1] and a whole class id, the rows sorted by score from the best down and
      every box's corners ordered (``_detection_rows``).

    An ``[N, A, 85]`` output of embeddings fails the [0, 1] columns or the background
    median; one of probabilities fails the pixel spread and has no negative offsets. A
    one-class ``[N, A, 6]`` anchor output is no list of detections: its objectness is not
    sorted over the anchors, nor its class score whole.
    """
    a = np.asarray(sample)
    if a.ndim != 3 or not np.issubdtype(a.dtype, np.floating) or a.size == 0 or not np.isfinite(a).all():
        return None
    if 5 <= a.shape[1] < a.shape[2]:
        return "class-rows" if _unit_interval(a[:, 4:]) else None
    if not 6 <= a.shape[2] < a.shape[1]:
        return None
    rows = np.asarray(a[0], np.float64)
    if a.shape[2] == 6 and _detection_rows(rows, a.dtype):
        return "detections"
    if not _unit_interval(rows[:, 4:], a.dtype) or float(np.median(rows[:, 4])) >= BACKGROUND:
        return None
    coordinates = rows[:, :4]
    centres = coordinates[:, :2]
    if float(coordinates[:, 2:].min()) >= 0.0 and float(centres.max() - centres.min()) > RAW_SPAN:
        return "anchor-rows"
    return "anchor-grid" if _raw_offsets(coordinates) else None


def _detection_rows(rows: np.ndarray, dtype: np.dtype) -> bool:
    """Whether ``[K, 6]`` rows (computed in ``dtype``) read as a model's final detections:
    scores (column 4) in [0, 1] (``_unit_interval``) and sorted from the best down, class
    ids (column 5) whole and not negative, corners ordered (x0 <= x1, y0 <= y1). The order
    is the evidence: no anchor output is sorted by its objectness, and a top-K selection
    always is."""
    scores, classes = rows[:, 4], rows[:, 5]
    return (_unit_interval(scores, dtype) and bool(np.all(np.diff(scores) <= 0.0))
            and float(classes.min()) >= 0.0 and bool(np.all(classes == np.round(classes)))
            and bool(np.all(rows[:, 2] >= rows[:, 0])) and bool(np.all(rows[:, 3] >= rows[:, 1])))


def _read_layout(sample: np.ndarray) -> str:
    """The layout ``boxes`` reads an output in: ``box_layout``'s where the evidence holds
    (the metric was named for an output that lacks it), else by shape: class rows (what
    ``boxes`` read first) unless there are more rows than columns and at least 6 columns
    (cx, cy, w, h, objectness, a class); anchor rows are raw where they read as offsets
    on a grid."""
    a = np.asarray(sample)
    found = box_layout(a)
    if found is not None:
        return found
    if a.shape[1] <= a.shape[2] or a.shape[2] < 6:
        return "class-rows"
    return "anchor-grid" if _raw_offsets(np.asarray(a[0, :, :4], np.float64)) else "anchor-rows"


def class_rows(prediction: np.ndarray, layout: str | None = None) -> np.ndarray:
    """``prediction`` (``[N, 4+K, A]``, or ``[N, A, 5+K]`` decoded or raw: ``box_layout``)
    as ``[N, 4+K, A]`` float64: cx, cy, w, h in pixels, then per class its score, which
    for anchor rows is objectness times the class score (YOLOv5's and YOLOX's confidence).
    Final detections (``[N, K, 6]``) give ``[N, 5, K]``: their score as the one score row
    (a class id is no score). ``layout``: None reads it from the prediction itself
    (``_read_layout``)."""
    p = np.asarray(prediction, np.float64)
    layout = layout or _read_layout(p)
    if layout == "class-rows":
        return p
    if layout == "detections":
        corners = p[..., :4]
        centres, sizes = (corners[..., :2] + corners[..., 2:]) / 2, corners[..., 2:] - corners[..., :2]
        return np.concatenate([centres, sizes, p[..., 4:5]], -1).transpose(0, 2, 1)
    coordinates = p[..., :4].copy()
    if layout == "anchor-grid":
        grid = anchor_grid(p.shape[1])
        if grid is None:
            raise ValueError(f"no YOLOX anchor grid has {p.shape[1]} anchors (strides {GRID_STRIDES}, square input)")
        stride = grid[:, 2:]
        coordinates[..., :2] = (coordinates[..., :2] + grid[:, :2]) * stride
        # an exponent past 50 is no box a picture holds; the cap keeps float64 finite
        coordinates[..., 2:] = np.exp(np.minimum(coordinates[..., 2:], 50.0)) * stride
    scores = p[..., 5:] * p[..., 4:5]
    return np.concatenate([coordinates, scores], -1).transpose(0, 2, 1)


def yolo_boxes(prediction: np.ndarray, score: float = BOX_SCORE, layout: str | None = None
               ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image of a YOLO-style prediction (``class_rows``: ``[N, 4+K, A]`` or
    ``[N, A, 5+K]``, in ``layout`` or the one read from it): (boxes ``[x0, y0, x1, y1]``,
    classes, scores) after a score threshold and per-class greedy NMS. Final detections
    (``[N, K, 6]``) are the model's choice already: only the threshold applies."""
    layout = layout or _read_layout(np.asarray(prediction))
    result = []
    if layout == "detections":
        for p in np.asarray(prediction, np.float64):
            keep = p[:, 4] >= score
            result.append((p[keep, :4], p[keep, 5].astype(np.int64), p[keep, 4]))
        return result
    for p in class_rows(prediction, layout):
        scores = p[4:].max(0)
        classes = p[4:].argmax(0)
        keep = np.nonzero(scores >= score)[0]
        keep = keep[np.argsort(-scores[keep], kind="stable")][:1000]
        cx, cy, w, h = p[:4, keep]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
        chosen = _nms(boxes, classes[keep])
        result.append((boxes[chosen], classes[keep[chosen]], scores[keep[chosen]]))
    return result


def _nms(boxes: np.ndarray, classes: np.ndarray) -> list[int]:
    """Greedy per-class NMS of ``boxes`` (best first): a box is kept unless a kept box
    before it of its class overlaps it by IoU over ``NMS_IOU`` (a NaN IoU suppresses).
    Each kept box marks the later boxes it suppresses at once, their IoU with it taken
    by one ``_iou`` call whose arithmetic is elementwise (each entry the IoU of those two
    boxes alone), so the kept boxes are those of the pairwise check."""
    suppressed = np.zeros(len(boxes), dtype=bool)
    chosen: list[int] = []
    for i in range(len(boxes)):
        if suppressed[i]:
            continue
        chosen.append(i)
        later = slice(i + 1, None)
        # IoU(later box, kept box), as the pairwise check computes it; not <= NMS_IOU: NaN suppresses too
        overlap = ~(_iou(boxes[later], boxes[i:i + 1])[:, 0] <= NMS_IOU)
        suppressed[later] |= overlap & (classes[later] == classes[i])
    return chosen


def _boxes_deviation(refs: Sequence[np.ndarray], gots: Sequence[np.ndarray]) -> _Measured:
    """1 - box F1 (same class, one-to-one at IoU >= ``MATCH_IOU``) between the detections
    both sides report at the deployment score ``BOX_SCORE`` after per-class NMS, over the
    boxes of both sides: every box one side reports and the other does not is an error,
    however near the threshold its score, because a user thresholding at ``BOX_SCORE``
    gets exactly these boxes. Float32's own threshold crossings under the perturbation
    are in the floor (its mean over the draws), not excused box by box."""
    layout = _read_layout(refs[0]) if len(refs) else None  # one reading for both sides
    ref_boxes: list[np.ndarray] = []
    got_boxes: list[np.ndarray] = []
    ref_classes: list[np.ndarray] = []
    got_classes: list[np.ndarray] = []
    for r, g in zip(refs, gots):
        for (rb, rc, _), (gb, gc, _) in zip(yolo_boxes(r, BOX_SCORE, layout), yolo_boxes(g, BOX_SCORE, layout)):
            ref_boxes.append(rb)
            got_boxes.append(gb)
            ref_classes.append(rc)
            got_classes.append(gc)
    f1, false_positives = box_f1(ref_boxes, got_boxes, ref_classes, got_classes)
    # F1 = 2 TP / (n_ref + n_got): a fraction over the boxes of both sides
    items = sum(len(b) for b in ref_boxes) + sum(len(b) for b in got_boxes)
    return {"box_f1": 1.0 - f1, "extra_boxes": float(false_positives)}, {"box_f1": items}


def _pooled(outputs: Sequence[np.ndarray], masks: Sequence[np.ndarray | None]) -> np.ndarray:
    """Mean over positions of ``[N, T, H]`` (the positions a ``[N, T]`` mask keeps); a
    ``[N, C]`` output is pooled already: its rows are the vectors."""
    vectors = []
    for out, mask in zip(outputs, masks):
        a = np.asarray(out, np.float64)
        if a.ndim <= 2:
            vectors.append(a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1))
        elif mask is not None and np.shape(mask) == a.shape[:2]:
            w = np.asarray(mask, np.float64)[..., None]
            vectors.append((a * w).sum(1) / np.maximum(w.sum(1), 1.0))
        else:
            vectors.append(a.mean(1))
    return np.concatenate(vectors)


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    return ranks


def _embedding_deviation(refs: Sequence[np.ndarray], gots: Sequence[np.ndarray],
                         masks: Sequence[np.ndarray | None] | None = None) -> _Measured:
    masks = list(masks) if masks is not None else [None] * len(refs)
    ref, got = _pooled(refs, masks), _pooled(gots, masks)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    cosine = np.where(norms > 0, np.sum(ref * got, axis=1) / np.where(norms > 0, norms, 1.0), 1.0)
    result = {"cosine": 1.0 - float(np.mean(cosine))}
    if len(ref) >= 3:
        def similarities(v: np.ndarray) -> np.ndarray:
            unit = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-30)
            upper = np.triu_indices(len(v), 1)
            return (unit @ unit.T)[upper]

        a, b = _ranks(similarities(ref)), _ranks(similarities(got))
        spread = float(np.std(a) * np.std(b))
        spearman = float(np.mean((a - a.mean()) * (b - b.mean())) / spread) if spread > 0 else 1.0
        result["ranking"] = 1.0 - spearman
        return result, {"ranking": len(a)}  # pairs ranked: with a few, one swap moves it by a lot
    return result, {}


def _label_rows(a: np.ndarray, per_entry: bool) -> np.ndarray:
    """A sample's rows (``labels``): its entries along the first axis, each flattened; a
    scalar is one row; ``per_entry`` (``token-labels``: one label per token): each entry."""
    a = np.asarray(a)
    return a.reshape(-1, 1) if per_entry or a.ndim == 0 else a.reshape(a.shape[0], -1)


def _rows_changed(ref: np.ndarray, got: np.ndarray, per_entry: bool = False) -> np.ndarray:
    """Per row of ``ref``, whether ``got`` holds another (every row, when the shape changed)."""
    rows = _label_rows(ref, per_entry)
    if np.shape(got) != np.shape(ref):
        return np.ones(len(rows), bool)
    return ~np.all(rows == _label_rows(got, per_entry), axis=1)


def _labels_deviation(refs: Sequence[np.ndarray], gots: Sequence[np.ndarray], per_entry: bool = False) -> _Measured:
    changed = [_rows_changed(r, g, per_entry) for r, g in zip(refs, gots)]
    total = sum(len(c) for c in changed)
    return {"labels": sum(int(c.sum()) for c in changed) / max(total, 1)}, {"labels": total}


# --------------------------------------------------------------------------- witnesses


def _argmax_unexcused(refs: Sequence[np.ndarray], gots: Sequence[np.ndarray],
                      envelope: Sequence[Sequence[np.ndarray]]) -> dict[str, float]:
    """1 - top-1 agreement on the confident samples, counting only the disagreements no
    draw of ``envelope`` shares (a confident sample float32 flips itself under some draw)."""
    ref = _score_rows(refs)
    confident = _judged_rows(ref)
    top = ref.argmax(-1)
    wrong = top != _score_rows(gots).argmax(-1)
    for draw in envelope:
        wrong &= top == _score_rows(draw).argmax(-1)
    return {"argmax": float(np.sum(wrong & confident)) / int(confident.sum())}


def _ctc_unexcused(refs: Sequence[np.ndarray], gots: Sequence[np.ndarray],
                   envelope: Sequence[Sequence[np.ndarray]]) -> dict[str, float]:
    """1 - exact match over the lines, counting only the lines whose float32 decode no draw
    of ``envelope`` changes."""
    blank = _ctc_blank(refs)
    decode = lambda arrays: [line for a in arrays for line in ctc_greedy(a, blank)]  # noqa: E731
    ref, got = decode(refs), decode(gots)
    moved = [False] * len(ref)  # the line's float32 decode changes under some draw
    for draw in envelope:
        moved = [m or a != b for m, a, b in zip(moved, ref, decode(draw))]
    wrong = sum(a != b and not m for a, b, m in zip(ref, got, moved))
    return {"ctc_exact": wrong / max(len(ref), 1)}


def _decisions(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Every element's decision at ``DECISION``, all samples in one flat array."""
    return np.concatenate([np.ravel(np.asarray(a, np.float64) > DECISION) for a in arrays]) if len(arrays) \
        else np.zeros(0, bool)


def _threshold_deviation(refs: Sequence[np.ndarray], gots: Sequence[np.ndarray]) -> _Measured:
    """The fraction of elements (a VAD's frames) whose decision at ``DECISION`` differs."""
    ref, got = _decisions(refs), _decisions(gots)
    return {"threshold": float(np.mean(ref != got)) if ref.size else 0.0}, {"threshold": int(ref.size)}


def _threshold_unexcused(refs: Sequence[np.ndarray], gots: Sequence[np.ndarray],
                         envelope: Sequence[Sequence[np.ndarray]]) -> dict[str, float]:
    """The fraction of elements whose decision differs, counting only those no draw of
    ``envelope`` flips (a frame near 0.5 that float32 flips itself under some draw)."""
    ref = _decisions(refs)
    wrong = ref != _decisions(gots)
    for draw in envelope:
        wrong &= ref == _decisions(draw)
    return {"threshold": float(wrong.sum()) / max(ref.size, 1)}


def _labels_unexcused(refs: Sequence[np.ndarray], gots: Sequence[np.ndarray],
                      envelope: Sequence[Sequence[np.ndarray]], per_entry: bool = False) -> dict[str, float]:
    """1 - exact agreement over the rows, counting only the rows no draw of ``envelope``
    changes."""
    wrong = total = 0
    for i, (ref, got) in enumerate(zip(refs, gots)):
        changed = _rows_changed(ref, got, per_entry)
        for draw in envelope:
            changed &= ~_rows_changed(ref, draw[i], per_entry)
        wrong += int(changed.sum())
        total += len(changed)
    return {"labels": wrong / max(total, 1)}


# a count-based component over scored decisions (a confident top-1, a decoded line) whose
# errors float32 itself makes under some perturbation draw are excused (``TaskJudge`` with
# two draws or more): metric -> the function counting the rest. Boxes are not among them:
# a user thresholds at one score and sees every box that crosses it, so the candidate's
# crossings count and float32's own are the floor (``_MEAN_OF_DRAWS``); a detection map's
# boxes are connected components of a thresholded map, which a one-pixel change merges or
# splits, so a few draws do not find the boxes float32 holds stable (module doc)
_UNEXCUSED: dict[str, Callable[[Sequence[np.ndarray], Sequence[np.ndarray], Sequence[Sequence[np.ndarray]]],
                               dict[str, float]]] = {
    "argmax": _argmax_unexcused, "ctc": _ctc_unexcused, "labels": _labels_unexcused,
    "token-labels": functools.partial(_labels_unexcused, per_entry=True), "threshold": _threshold_unexcused,
}


# the components ``_UNEXCUSED`` counts, per metric
_EXCUSED_PARTS = {"argmax": ("argmax",), "ctc": ("ctc_exact",), "labels": ("labels",), "token-labels": ("labels",),
                  "threshold": ("threshold",)}

# metrics whose floor is the mean over ``FLOOR_DRAWS`` perturbation draws, not one draw's:
# which near-threshold boxes cross the score threshold changes from draw to draw, so one
# draw's count of crossings is one sample of float32's rate (``TaskJudge.wants_draws``)
_MEAN_OF_DRAWS = frozenset({"boxes"})


_BUILT_IN: dict[str, Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], _Measured]] = {
    "sqnr": lambda r, g: ({"sqnr": _sqnr_noise(r, g)}, {}),
    "argmax": _argmax_deviation,
    "ctc": _ctc_deviation,
    "detection-map": _map_deviation,
    "boxes": _boxes_deviation,
    "embedding": _embedding_deviation,
    "added-boxes": _added_boxes_deviation,
    "labels": _labels_deviation,
    "token-labels": functools.partial(_labels_deviation, per_entry=True),
    "threshold": _threshold_deviation,
}
# integer outputs, judged by their rows whatever their count: ``labels`` a row per entry
# along the first axis, ``token-labels`` (one label per token of a token-id input, a
# tagger's tags) a row per token
_LABEL_METRICS = frozenset({"labels", "token-labels"})
REPORTED_ONLY = frozenset({"extra_boxes"})  # shown, not judged
_COUNTS = frozenset({"added_boxes"})  # a bound on a count, not a score: no metric_target replaces it
# a count-based component that, over too few items, leaves the decision to a component of
# its own metric that measures the same thing per sample (judged anyway), not to SQNR
_STAND_IN = {"ranking": "cosine"}
# integer and boolean outputs (ids, labels, flags): no SQNR of them means anything, so their
# rows are judged however few they are
_LABEL_KINDS = frozenset("iub")
# what a count-based component counts
_ITEMS = {"argmax": "confident sample", "threshold": "frame", "ctc_exact": "line", "cer": "reference character",
          "box_f1": "box", "mask_iou": "mask pixel", "ranking": "ranked pair", "labels": "row"}


def measure(metric: str, refs: Sequence[np.ndarray], gots: Sequence[np.ndarray],
            masks: Sequence[np.ndarray | None] | None = None) -> _Measured:
    """The deviations (0 when identical) of a built-in metric and, for each count-based
    component, how many items its fraction is over (``masks``: per sample, the ``[N, T]``
    attention mask an ``embedding`` pools over)."""
    if metric not in _BUILT_IN:
        raise BadInputError(f"unknown INT8 metric '{metric}' (use {', '.join(METRICS)} or a callable)")
    if metric == "embedding":
        return _embedding_deviation(refs, gots, masks)
    return _BUILT_IN[metric](refs, gots)


def deviations(metric: str, refs: Sequence[np.ndarray], gots: Sequence[np.ndarray],
               masks: Sequence[np.ndarray | None] | None = None) -> dict[str, float]:
    """The deviations (0 when identical) of a built-in metric (``measure`` without the counts)."""
    return measure(metric, refs, gots, masks)[0]


def _sqnr_parts(metric: str, refs: Sequence[np.ndarray], gots: Sequence[np.ndarray]) -> dict[str, float]:
    """The SQNR noise ratios that judge an output whose count-based components have too few
    items: over the whole output, except ``boxes``, whose coordinates (pixels) and class
    scores ([0, 1]) are judged apart (summed together, the SQNR is the coordinates')."""
    if metric != "boxes":
        return {"sqnr": _sqnr_noise(refs, gots)}
    layout = _read_layout(refs[0]) if len(refs) else None
    ref_rows = [class_rows(r, layout) for r in refs]  # pixels and confidences, whatever the layout
    got_rows = [class_rows(g, layout) for g in gots]
    return {"sqnr_coordinates": _sqnr_noise([r[:, :4] for r in ref_rows], [g[:, :4] for g in got_rows]),
            "sqnr_scores": _sqnr_noise([r[:, 4:] for r in ref_rows], [g[:, 4:] for g in got_rows])}


def _db(noise_ratio: float) -> float:
    if noise_ratio == 0.0:
        return math.inf
    return -10.0 * math.log10(noise_ratio) if math.isfinite(noise_ratio) else -math.inf


def _finite(x: float) -> float | str:
    if math.isfinite(x):
        return float(f"{x:.6g}")  # significant digits: SQNR noise ratios are often below 1e-6
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


# --------------------------------------------------------------------------- judge


def _row_plan(reference: Outputs, metric: Any, groups: Sequence[str] | None, sequences: Collection[str],
              heads: Collection[str], exact: Collection[str], state: Collection[str],
              tokens: Mapping[str, str] | None = None, recurrent: Collection[str] = (),
              ) -> tuple[list[tuple[str, list[int]]], dict[str, Any], dict[str, tuple[str, list[int]]], dict[str, str]]:
    """``TaskJudge``'s rows on ``reference`` (its fields of the same names): the samples of
    each group, and per row (an output, or an output in a group) its metric, its output
    name and samples, and why that metric judges it (in words). Chosen from the reference
    outputs alone."""
    tokens = tokens or {}
    count = len(next(iter(reference.values()), []))
    if groups is None:
        subsets: list[tuple[str, list[int]]] = [("", list(range(count)))]
    else:
        if len(groups) != count:
            raise BadInputError(f"{len(groups)} group labels for {count} judged samples")
        labels = list(dict.fromkeys(str(g) for g in groups))  # in order of first appearance
        subsets = [(g, [i for i, x in enumerate(groups) if str(x) == g]) for g in labels]
    plan: dict[str, str | UserMetric] = {}
    where: dict[str, tuple[str, list[int]]] = {}
    why: dict[str, str] = {}
    for group, idx in subsets:
        chosen_by_auto: list[str] = []  # this group's rows whose metric the auto rule chose
        if callable(metric) and not isinstance(metric, Mapping):
            key = "*" if not group else f"*@{group}"
            plan[key], where[key], why[key] = metric, ("*", idx), "given"
            continue
        for name, values in reference.items():
            if name in exact or name in state:
                continue
            if values and np.asarray(values[0]).dtype.kind in _LABEL_KINDS:  # ids, labels, flags
                key = name if not group else f"{name}@{group}"
                if name in tokens:
                    plan[key], where[key], why[key] = "token-labels", (name, idx), (
                        f"integer labels, one per token of input '{tokens[name]}': judged token by token")
                else:
                    plan[key], where[key], why[key] = "labels", (name, idx), "integer or boolean: ids, labels, flags"
                continue
            if not values or not np.issubdtype(np.asarray(values[0]).dtype, np.floating):
                continue
            given: Any = metric
            if isinstance(metric, Mapping):  # most specific first: output@group, @group, output, *
                names = (f"{name}@{group}", f"@{group}", name, "*") if group else (name, "*")
                given = next((metric[k] for k in names if k in metric), None)
            if given in (None, "auto") and name in recurrent:
                chosen, reason = "sqnr", RECURRENT_REASON
            elif given in (None, "auto"):
                chosen, reason = metric_choice(values, name)
            else:
                chosen, reason = given, "given"
            if isinstance(chosen, str) and (chosen not in _BUILT_IN or chosen in _LABEL_METRICS):
                raise BadInputError(
                    f"unknown INT8 metric '{chosen}' (use {', '.join(METRICS)}, 'auto' or a callable)")
            misfit = _metric_misfit(chosen, values[0]) if isinstance(chosen, str) and values else None
            if misfit is not None:
                raise BadInputError(f"INT8 metric '{chosen}' does not fit output '{name}' of shape "
                                    f"{list(np.shape(values[0]))}: {misfit} (docs/int8.md)")
            key = name if not group else f"{name}@{group}"
            plan[key], where[key], why[key] = chosen, (name, idx), reason
            if given in (None, "auto") and name not in recurrent:  # the graph decided a recurrent output
                chosen_by_auto.append(key)
        _scores_per_step(chosen_by_auto, plan, where, why, reference, heads, tokens)
        _pooled_beside_embeddings(chosen_by_auto, plan, where, why, reference)
        for key in chosen_by_auto:  # still class scores: unless their width may change
            name = where[key][0]
            if plan[key] == "argmax" and (
                    name in sequences or len({np.shape(v)[-1] for v in reference[name]}) > 1):
                plan[key] = "sqnr"  # a last axis that may change from input to input is no set of classes
                why[key] = "a last axis that may change from input to input: per-step values, not classes"
    return subsets, plan, where, why


def token_outputs(model: ir.Model, samples: Sequence[Mapping[str, np.ndarray]], outputs: Outputs) -> dict[str, str]:
    """The ``[N, T, C]`` (or time-major ``[T, 1, C]``) float outputs with one step per token,
    and the ``[N, T]`` integer outputs with one label per token: on every sample, as many
    steps as the last axis of a ``[N, T]`` token-id input (``input_roles``' ``index``),
    each mapped to that input's name. A CTC recognizer reads a signal (an image, audio) and
    aligns its frames to a shorter label sequence; an output with one step per input token
    (a masked language model's, a tagger's) has no such alignment to decode."""
    ids = [name for name, role in input_roles(model).items() if role == "index"]
    found: dict[str, str] = {}
    for name, values in outputs.items():
        if len(values) != len(samples) or not values:
            continue
        arrays = [np.asarray(v) for v in values]
        if all(a.ndim == 3 and np.issubdtype(a.dtype, np.floating) for a in arrays):
            arrays = [_batch_major(a) for a in arrays]  # a time-major [T, 1, C] sequence has its steps on axis 1 too
        elif not all(a.ndim == 2 and a.dtype.kind in _LABEL_KINDS for a in arrays):
            continue
        for source in ids:
            lengths = [np.shape(s[source]) if source in s else None for s in samples]
            if all(shape is not None and len(shape) == 2 and a.shape[1] == shape[1]
                   for a, shape in zip(arrays, lengths)):
                found[name] = source
                break
    return found


def _scores_per_step(keys: Sequence[str], plan: dict[str, Any], where: Mapping[str, tuple[str, list[int]]],
                     why: dict[str, str], reference: Outputs, heads: Collection[str],
                     tokens: Mapping[str, str]) -> None:
    """Of ``keys`` (one group's rows whose metric the auto rule chose), class scores per
    token or step, judged by ``argmax`` per step as their user reads them:

    - an output with one step per token of a token-id input (``tokens``) read as a CTC
      recognizer's (a masked language model's softmax, a tagger's): no CTC alignment
      holds between tokens and steps, and a CTC decode would merge a repeated token and
      drop every one of the class it takes for the blank;
    - a ``[N, T, C]`` output read as hidden states (or, narrower than an embedding, judged
      by SQNR) that a classifier head computes (``heads``) and that decides a class step
      by step (``_per_step_classes``; with one step per token, two classes are enough):
      a tagger's emissions."""
    for key in keys:
        name = where[key][0]
        values = reference[name]
        source = tokens.get(name)
        per_token = f"one step per token of input '{source}'" if source is not None else None
        if plan[key] == "ctc" and per_token is not None:
            plan[key] = "argmax"
            why[key] = f"{per_token}: the top class per token, not a CTC decode"
        elif plan[key] in ("embedding", "sqnr") and name in heads and np.ndim(values[0]) == 3 \
                and (plan[key] == "embedding" or per_token is not None) \
                and _per_step_classes(values, 2 if per_token is not None else 3):
            plan[key] = "argmax"
            why[key] = (f"a classifier head's class scores, {per_token}: the top class per token" if per_token
                        else "a classifier head's class scores, decided step by step: the top class per step")


def _pooled_beside_embeddings(keys: Sequence[str], plan: dict[str, Any],
                              where: Mapping[str, tuple[str, list[int]]], why: dict[str, str],
                              reference: Outputs) -> None:
    """Of ``keys`` (one group's rows whose metric the auto rule chose), a ``[N, D]`` output
    read as class scores (or, confident nowhere, judged by SQNR) is a pooled vector when
    another is a ``[N, T, D]`` embedding (a sentence encoder's token and sentence
    embeddings), unless named logits: judged as an embedding too."""
    def sample(key: str) -> np.ndarray:
        return np.asarray(reference[where[key][0]][0])

    widths = {sample(k).shape[-1] for k in keys if plan[k] == "embedding" and sample(k).ndim == 3}
    for key in keys:
        if plan[key] in ("argmax", "sqnr") and sample(key).ndim == 2 and sample(key).shape[-1] in widths \
                and "logit" not in where[key][0].lower():
            plan[key] = "embedding"
            why[key] = "[N, D] beside a [N, T, D] embedding: a pooled vector"


def row_metrics(reference: Outputs, metric: str | UserMetric | Mapping[str, str | UserMetric] | None = None, *,
                groups: Sequence[str] | None = None, sequences: Collection[str] = (), heads: Collection[str] = (),
                exact: Collection[str] = (), state: Collection[str] = (),
                tokens: Mapping[str, str] | None = None, recurrent: Collection[str] = (),
                ) -> dict[str, str | UserMetric]:
    """Each row's metric as ``TaskJudge(reference, ..., metric=metric, ...)`` plans it (its
    ``plan``), chosen from the reference outputs alone: a judge of some of these samples
    given it as ``rows`` judges them as a judge of all of them would (``select``), with no
    perturbed output of the others."""
    return row_choices(reference, metric, groups=groups, sequences=sequences, heads=heads, exact=exact,
                       state=state, tokens=tokens, recurrent=recurrent)[0]


def row_choices(reference: Outputs, metric: str | UserMetric | Mapping[str, str | UserMetric] | None = None, *,
                groups: Sequence[str] | None = None, sequences: Collection[str] = (), heads: Collection[str] = (),
                exact: Collection[str] = (), state: Collection[str] = (), tokens: Mapping[str, str] | None = None,
                recurrent: Collection[str] = (),
                ) -> tuple[dict[str, str | UserMetric], dict[str, str]]:
    """``row_metrics`` and, per row, why its metric judges it in words (a judge given them
    as ``rows`` and ``reasons`` reports them as its own)."""
    _, plan, _, why = _row_plan(reference, metric, groups, sequences, heads, exact, state, tokens, recurrent)
    return plan, why


def wants_draws(rows: Mapping[str, Any]) -> bool:
    """Whether a judge of these rows (``row_metrics``) measures its floor on ``FLOOR_DRAWS``
    draws rather than one: some row's metric excuses float32's own errors (``_UNEXCUSED``)
    or takes its floor as the mean over draws of a count that one draw samples coarsely
    (``_MEAN_OF_DRAWS``)."""
    return any(isinstance(m, str) and (m in _UNEXCUSED or m in _MEAN_OF_DRAWS) for m in rows.values())


def _planned(metric: Any, rows: Mapping[str, Any] | None) -> Any:
    """What plans a judge's rows: ``rows`` (a judge of more samples planned them) as the
    metric of each row, ids and labels left to their dtype; else ``metric``."""
    if rows is None or (callable(metric) and not isinstance(metric, Mapping)):
        return metric
    return {key: chosen for key, chosen in rows.items() if chosen not in _LABEL_METRICS}


@dataclasses.dataclass
class TaskJudge:
    """Judges candidate outputs against the float model's, relative to its noise floor.

    ``reference``: the float model's outputs on the held-out samples; ``perturbed``: its
    outputs on the same samples perturbed (``perturb``). ``metric``: None or "auto" (per
    output, ``choose_metric``), a name from ``METRICS`` (every float output), a callable
    (``UserMetric``, over all outputs), or a mapping from output name to either (keys
    ``<output>@<group>`` and ``@<group>`` name groups, ``*`` every output not named).
    ``groups``: one label per sample (e.g. "page", "photo"); each group is then judged
    apart, against its own floor, in rows ``<output>@<group>:<part>``, and every group
    must pass (a metric pooled over groups lets one kind of input hide another's errors).
    """

    reference: Outputs
    perturbed: Outputs
    metric: str | UserMetric | Mapping[str, str | UserMetric] | None = None
    margin: float = DEFAULT_MARGIN
    metric_target: float | None = None
    min_sqnr_db: float = 25.0
    perturbation: Mapping[str, str] = dataclasses.field(default_factory=dict)
    masks: Sequence[np.ndarray | None] | None = None  # per sample: the attention mask, for pooling
    groups: Sequence[str] | None = None  # per sample: its group's label
    draws: Sequence[Outputs] = ()  # more perturbation draws of the float model's outputs (seeds apart)
    sequences: Collection[str] = ()  # outputs whose last axis the model declares symbolic (``sequence_outputs``)
    heads: Collection[str] = ()  # outputs a classifier head computes (``projected_outputs``)
    # outputs with one step per token, each mapped to its token-id input (``token_outputs``)
    tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
    exact: Collection[str] = ()  # integer outputs no precision change moves (``float_free_outputs``): not judged
    recurrent: Collection[str] = ()  # a recurrent op's outputs, through layout ops (``recurrent_outputs``)
    # a streaming model's state outputs: not judged themselves, but in the next step's answers
    # (``optcc.numerics.decode.streamed``), which the outputs hold under their own names
    state: Collection[str] = ()
    # each row's metric as a judge of more samples planned it (``plan``; ``select``): kept, not
    # chosen again from these samples' values
    rows: Mapping[str, str | UserMetric] | None = None
    # why each of ``rows``' metrics judges its row, as that judge chose them (``row_choices``)
    reasons: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        # per row (an output, or an output in a group): its metric, output name and samples
        # and why that metric judges it (``chosen``)
        self.subsets, self.plan, self._where, self._why = _row_plan(
            self.reference, _planned(self.metric, self.rows), self.groups, self.sequences, self.heads, self.exact,
            self.state, self.tokens, self.recurrent)
        if self.rows is not None and self.reasons is not None:
            self._why = {key: self.reasons.get(key, why) for key, why in self._why.items()}
        self._envelope = [self.perturbed, *self.draws]
        self._measured: tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]] | None = None
        self._sqnr_floor: dict[str, dict[str, float]] = {}  # per row key, computed when first needed

    @property
    def floor(self) -> dict[str, dict[str, float]]:
        """Per row and component, the float model's own deviation under the perturbation
        (``_floor``), measured the first time it is asked for."""
        if self._measured is None:
            self._measured = self._floor()
        return self._measured[0]

    @property
    def floor_items(self) -> dict[str, dict[str, int]]:
        """Per row, the items each count-based component of the floor is over: none for a
        row judged by SQNR or a callable (they count nothing, so no floor is measured for it)."""
        if self._measured is None and not self._counts_items():
            return {key: {} for key in self.plan}
        self.floor  # noqa: B018 - the items are measured with the floor
        assert self._measured is not None
        return self._measured[1]

    @property
    def floor_measured(self) -> bool:
        """Whether the floor was measured (a judgement needed it: module docstring)."""
        return self._measured is not None

    def _counts_items(self) -> bool:
        """Whether some row's metric counts items (a built-in metric other than ``sqnr``)."""
        return any(isinstance(m, str) and m != "sqnr" for m in self.plan.values())

    def _floor_needed(self, measured: Mapping[str, Mapping[str, float]], target_db: float) -> bool:
        """Whether the judgement of these deviations reads the floor: when it is at hand (given
        as computed outputs, or measured already), or when it can change the judgement, unless
        every row is judged by SQNR alone and meets ``target_db`` (then it passes whatever
        the floor)."""
        at_hand = self._measured is not None or not any(
            isinstance(draw, DeferredOutputs) and not draw.computed for draw in self._envelope)
        # a NaN deviation meets no target
        return at_hand or any(self.plan[key] != "sqnr" or not all(_db(d) >= target_db for d in parts.values())
                              for key, parts in measured.items())

    def _floor(self) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]]:
        """Per row and component, the float model's own deviation under the perturbation:
        the mean over the draws; with two draws or more, a component whose errors float32
        makes itself are excused (``_UNEXCUSED``) gets the most any draw deviates outside
        the others' envelope (leave one out), the rate at which a new draw of the noise
        makes an error no draw made before."""
        measured = [self._measure_rows(draw) for draw in self._envelope]
        floor = {key: {part: float(np.mean([m[0][key][part] for m in measured])) for part in parts}
                 for key, parts in measured[0][0].items()}
        if len(self._envelope) > 1:
            for k, draw in enumerate(self._envelope):
                others = self._envelope[:k] + self._envelope[k + 1:]
                for key, parts in self._unexcused(draw, others).items():
                    for part, value in parts.items():
                        floor[key][part] = value if k == 0 else max(floor[key][part], value)
        return floor, measured[0][1]

    @property
    def draw_count(self) -> int:
        """How many perturbation draws the floor is measured on."""
        return len(self._envelope)

    def excuses(self) -> bool:
        """Whether some row's metric excuses float32's own errors, given two draws or more
        (``_UNEXCUSED``): only then do more draws change more than the floor's mean."""
        return any(isinstance(m, str) and m in _UNEXCUSED for m in self.plan.values())

    def wants_draws(self) -> bool:
        """Whether the floor should be measured on ``FLOOR_DRAWS`` draws rather than one
        (``wants_draws``, of this judge's rows)."""
        return wants_draws(self.plan)

    def _excused(self, metric: object, part: str) -> bool:
        """Whether component ``part`` of ``metric`` excuses float32's own errors here (two
        draws or more, ``_UNEXCUSED``): then its deviation counts only the candidate's errors."""
        return self.draw_count > 1 and isinstance(metric, str) and part in _EXCUSED_PARTS.get(metric, ())

    def _unexcused(self, got: Outputs, envelope: Sequence[Outputs]) -> dict[str, dict[str, float]]:
        """Per row whose metric excuses float32's own errors (``_UNEXCUSED``): its components
        counting only the errors no draw of ``envelope`` makes."""
        result: dict[str, dict[str, float]] = {}
        for key, name, idx in self._rows():
            metric = self.plan[key]
            if isinstance(metric, str) and metric in _UNEXCUSED:
                result[key] = _UNEXCUSED[metric](_pick(self.reference[name], idx), _pick(got[name], idx),
                                                 [_pick(draw[name], idx) for draw in envelope])
        return result

    def select(self, samples: Sequence[int]) -> TaskJudge:
        """The same judge over the samples at these indices only (their outputs and floor:
        no model runs again), its metrics included: those the auto rule chose from every
        sample's values are kept, not chosen again from the subset's (a map's undecided
        pixels differ from subset to subset), so a pass judging the held-out part of the
        verifier's samples judges each output as the verification will."""
        return dataclasses.replace(
            self, rows=self.plan, reasons=self._why,
            reference={n: _pick(v, samples) for n, v in self.reference.items()},
            perturbed=_picked(self.perturbed, samples), draws=[_picked(draw, samples) for draw in self.draws],
            masks=None if self.masks is None else _pick(self.masks, samples),
            groups=None if self.groups is None else _pick(self.groups, samples))

    def labelled_outputs(self) -> set[str]:
        """The integer outputs judged by their rows (``labels``)."""
        return {self.output_of(key) for key, metric in self.plan.items() if metric in _LABEL_METRICS}

    def output_of(self, key: str) -> str:
        """The output name a row key (an output, or an output in a group) judges."""
        return self._where[key][0]

    def _rows(self) -> list[tuple[str, str, list[int]]]:
        """(row key, output name, sample indices): one per output and group."""
        return [(key, *self._where[key]) for key in self.plan]

    def undecided(self) -> list[str]:
        """The judged count-based components whose floor is over fewer than ``MIN_ITEMS``
        items on these samples (``<row>:<part>``): the task metric cannot decide them."""
        return [f"{key}:{part}" for key, parts in self.floor_items.items() for part, n in parts.items()
                if part not in REPORTED_ONLY and n < MIN_ITEMS]

    def thin(self) -> list[str]:
        """The judged count-based components (``<row>:<part>``) whose floor's items, at their
        allowed rate (``margin * max(floor, MIN_DEVIATION)``), hold fewer than
        ``FEW_EXPECTED_ERRORS`` errors on these samples: a model a few times its floor would
        often pass them."""
        return [f"{key}:{part}" for key, parts in self.floor_items.items() for part, n in parts.items()
                if part not in REPORTED_ONLY and part not in _COUNTS and part in self.floor.get(key, {})
                and n * self.margin * max(self.floor[key][part], MIN_DEVIATION) < FEW_EXPECTED_ERRORS]

    def sqnr_floor(self, key: str) -> dict[str, float]:
        """Row ``key``'s SQNR noise ratios under the perturbation (``_sqnr_parts``)."""
        if key not in self._sqnr_floor:
            name, idx = self._where[key]
            metric = self.plan[key]
            assert isinstance(metric, str)
            per_draw = [_sqnr_parts(metric, _pick(self.reference[name], idx), _pick(draw[name], idx))
                        for draw in self._envelope]
            self._sqnr_floor[key] = {part: float(np.mean([d[part] for d in per_draw])) for part in per_draw[0]}
        return self._sqnr_floor[key]

    def metric_names(self) -> dict[str, str]:
        return {name: m if isinstance(m, str) else getattr(m, "__name__", "callable") for name, m in self.plan.items()}

    def chosen(self) -> dict[str, dict[str, str]]:
        """Per row: its metric and, in words, why it judges the row ("given": named by the
        caller; else the evidence the automatic choice read)."""
        return {key: {"metric": metric, "why": self._why[key]} for key, metric in self.metric_names().items()}

    def _deviations(self, got: Outputs) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]],
                                                 dict[str, dict[str, float]]]:
        """The candidate's deviations per row and component (with two draws or more, the
        errors float32 makes itself under some draw excused), the items they count, and
        the deviations excusing nothing."""
        plain, items = self._measure_rows(got)
        if len(self._envelope) < 2:
            return plain, items, plain
        excused = self._unexcused(got, self._envelope)
        return {key: {**parts, **excused.get(key, {})} for key, parts in plain.items()}, items, plain

    def _measure_rows(self, got: Outputs) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]]:
        result: dict[str, dict[str, float]] = {}
        items: dict[str, dict[str, int]] = {}
        for key, name, idx in self._rows():
            metric = self.plan[key]
            if isinstance(metric, str):
                masks = None if self.masks is None else _pick(self.masks, idx)
                result[key], items[key] = measure(metric, _pick(self.reference[name], idx), _pick(got[name], idx),
                                                  masks)
                continue
            ref = {n: _pick(v, idx) for n, v in self.reference.items()}
            ideal = float(metric(ref, ref))
            if not math.isfinite(ideal):
                raise BadInputError(f"the INT8 metric callback scores identical outputs {ideal} (must be finite)")
            result[key], items[key] = {"score": ideal - float(metric(ref, {n: _pick(v, idx) for n, v in got.items()}))}, {}
        return result, items

    def _sqnr_row(self, deviation: float, floor: float, target_db: float) -> dict[str, Any]:
        """The SQNR judgment: within the floor's margin, or at least ``target_db``."""
        allowed = self.margin * floor
        ok = deviation <= allowed or _db(deviation) >= target_db
        row = {"deviation": _finite(deviation), "floor": _finite(floor), "sqnr_db": _finite(_db(deviation)),
               "floor_sqnr_db": _finite(_db(floor)), "allowed": _finite(allowed), "target_db": self.min_sqnr_db,
               "passed": bool(ok)}
        if ok and deviation > allowed:  # beyond the floor's margin: the fixed target decided
            row["why"] = f"SQNR {_db(deviation):.1f} dB meets the {self.min_sqnr_db:g} dB target (not the floor's margin)"
        return row

    def __call__(self, got: Outputs) -> dict[str, Any]:
        """``passed`` and, per output (and group) and component, the deviation next to the
        floor (and, for the count-based components, how many items it is over); the floor
        left out where it cannot change the judgement (module docstring)."""
        return self._judge(got, self.min_sqnr_db)

    def misses_already(self, got: Outputs) -> bool:
        """Whether a candidate whose outputs on the first samples of this judge's (``got``:
        by name, the same count for each, in order) are known misses, whatever its outputs
        on the others: judged as if it computed the reference's own outputs on them. Decided
        only where every row's metric is one of ``PREFIX_DECIDED``, whose deviation over
        samples is a sum (SQNR's noise power over the reference's signal) or a count
        (``argmax``'s disagreeing confident rows over the reference's confident rows): a
        sample's outputs other than the reference's can only add to it. The floor, the
        allowed deviation and which rows are judged come from the reference and its
        perturbed runs alone, and every verdict is a bound on such a deviation, so a miss
        with the others perfect is a miss whatever they are. The SQNR target is eased by
        ``PREFIX_SLACK_DB`` here: a miss by less could be log10's rounding. False on every
        sample (the judgement itself decides then) or on none."""
        count = len(next(iter(got.values()), []))
        total = len(next(iter(self.reference.values()), []))
        if not 0 < count < total or any(m not in PREFIX_DECIDED for m in self.plan.values()):
            return False
        completed = {name: [*got[name], *values[count:]] for name, values in self.reference.items()}
        return not self._judge(completed, self.min_sqnr_db - PREFIX_SLACK_DB)["passed"]

    def _judge(self, got: Outputs, target_db: float) -> dict[str, Any]:
        """``__call__`` with SQNR's fixed target at ``target_db``."""
        measured, counted, plain = self._deviations(got)
        keys = {key: (name, idx) for key, name, idx in self._rows()}
        rows: dict[str, dict[str, Any]] = {}
        passed = True
        if not self._floor_needed(measured, target_db):
            for key, parts in measured.items():
                for part, deviation in parts.items():
                    rows[f"{key}:{part}"] = {
                        "metric": "sqnr", "deviation": _finite(deviation), "floor": None,
                        "sqnr_db": _finite(_db(deviation)), "target_db": self.min_sqnr_db, "passed": True,
                        "why": f"SQNR {_db(deviation):.1f} dB meets the {self.min_sqnr_db:g} dB target, which no "
                               f"floor can fail: the floor is not measured"}
            return self._verdict(True, rows)
        for key, parts in measured.items():
            name, idx = keys[key]
            metric = self.plan[key]
            undecided: list[str] = []
            for part, deviation in parts.items():
                floor = self.floor[key][part]
                row: dict[str, Any] = {"metric": metric if isinstance(metric, str) else "callable",
                                       "deviation": _finite(deviation), "floor": _finite(floor)}
                items = counted[key].get(part)
                if items is not None:
                    row["items"] = items
                if plain[key][part] != deviation:  # float32's own errors under the draws excused
                    row["deviation_with_float32s_own"] = _finite(plain[key][part])
                rows[f"{key}:{part}"] = row
                if part in REPORTED_ONLY:
                    row["judged"] = False
                    continue
                if part == "sqnr":
                    row.update(self._sqnr_row(deviation, floor, target_db))
                    passed = passed and row["passed"]
                    continue
                allowed = self.margin * max(floor, MIN_DEVIATION)
                row["allowed"] = _finite(allowed)
                if items is not None and items < MIN_ITEMS and metric not in _LABEL_METRICS:
                    noun = _ITEMS[part]
                    why = f"{part} over {items} {noun}{'' if items == 1 else 'es' if noun.endswith('x') else 's'}"
                    stand_in = _STAND_IN.get(part)
                    if stand_in in parts:
                        row.update(judged=False,
                                   why=f"{why}: not decisive (fewer than {MIN_ITEMS}); {stand_in} decides")
                        continue
                    undecided.append(why)
                    if not self._excused(metric, part):
                        row.update(judged=False, why=f"{why}: not decisive (fewer than {MIN_ITEMS}); judged by SQNR")
                        continue
                    # too few to accept on, not to reject on: an error float32 makes under none
                    # of its draws is the candidate's; judged as usual, and by SQNR as well
                    row["why"] = (f"{why}: fewer than {MIN_ITEMS}, so SQNR judges too; errors float32 "
                                  f"makes under none of its {self.draw_count} draws still count")
                ok = deviation <= allowed
                if self.metric_target is not None and part not in _COUNTS:
                    ref = {n: _pick(v, idx) for n, v in self.reference.items()}
                    score = (1.0 - deviation) if isinstance(metric, str) else float(metric(ref, ref)) - deviation
                    if not ok and score >= self.metric_target:  # the user's target decided, not the floor's margin
                        ok = True
                        row.update(score=_finite(score), target=self.metric_target)
                row["passed"] = bool(ok)
                passed = passed and ok
            if undecided and isinstance(metric, str):  # only built-in metrics count items
                floors = self.sqnr_floor(key)
                for part, deviation in _sqnr_parts(metric, _pick(self.reference[name], idx),
                                                   _pick(got[name], idx)).items():
                    row = {"metric": "sqnr", **self._sqnr_row(deviation, floors[part], target_db)}
                    row["why"] = "; ".join([f"{'; '.join(undecided)}: not decisive; judged by SQNR",
                                            *([row["why"]] if "why" in row else [])])
                    rows[f"{key}:{part}"] = row
                    passed = passed and row["passed"]
        return self._verdict(passed, rows)

    def _verdict(self, passed: bool, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The verdict of ``__call__``; with groups, also each group's samples and whether
        every judged row of it passed (``groups``)."""
        verdict = {"passed": passed, "margin": self.margin, "metrics": rows, "chosen": self.chosen(),
                   "perturbation": dict(self.perturbation)}
        if self.groups is not None:
            group_of = {key: group for group, idx in self.subsets for key in self.plan if self._where[key][1] is idx}
            verdict["groups"] = {
                group: {"samples": len(idx),
                        "passed": all(row.get("passed", True) for name, row in rows.items()
                                      if group_of.get(name.rpartition(":")[0]) == group and row.get("judged", True))}
                for group, idx in self.subsets}
        return verdict


def _pick(values: Sequence[Any], idx: Sequence[int]) -> list[Any]:
    return [values[i] for i in idx]


def _picked(outputs: Outputs, idx: Sequence[int]) -> Outputs:
    """``outputs`` at the samples ``idx``; deferred ones stay deferred (``DeferredOutputs``)."""
    if isinstance(outputs, DeferredOutputs) and not outputs.computed:
        return DeferredOutputs(lambda: {n: _pick(v, idx) for n, v in outputs.items()})
    return {n: _pick(v, idx) for n, v in outputs.items()}
