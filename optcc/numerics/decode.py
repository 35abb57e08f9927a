"""Multi-step decoding of KV-cache decoders, for verification.

A decoder step takes the cache of the previous steps as ``past*`` inputs and returns it
grown as ``present*`` outputs. One step on generated inputs checks little of that loop, so
the verifier runs ``DECODE_STEPS`` steps per sample: each next step feeds a model's own
``present`` outputs back as its ``past`` inputs, one new token (the original's greedy
choice, so both models see the same tokens), the attention mask grown by one and the
position advanced by one. Generated inputs (``optcc.numerics.inputs``) leave room in the
position table for ``DECODE_STEPS`` steps; a decode of more steps needs inputs generated
with that many (``generate_inputs(..., decode_steps=)``).

``greedy_agreement`` compares a candidate's greedy decode with a reference's in two ways:
*free-running* (each model feeds back its own choices, as a user's generation does: one
flipped near-tie changes every later token, so it measures when the decodes part) and
*forced* (the candidate is fed the reference's tokens, so every step is judged on the
same context). Forced agreement is also reported over the *decisive* steps only, those
whose reference top-1 margin exceeds ``margin_floor`` (the reference's own logit noise):
where the reference itself is a near-tie, its choice is no judge. ``free_running`` is the
free-running part alone, against a reference decode already run.

A lossy result (float16, INT8, quantized weights) is judged by its next-token agreement:
each model decodes ``NEXT_TOKEN_STEPS`` steps from each of its prompts
(``NEXT_TOKEN_PROMPTS`` generated ones where the user gives none), the candidate fed the
original's greedy tokens (``greedy_tokens`` of the original, ``forced_tokens`` of the
candidate: both see the same context at every step), and it is accepted when its argmax
is the original's at ``NEXT_TOKEN_AGREEMENT`` of the steps (``next_token_agreement``; a
search that keeps the first candidate passing on its own prompts asks
``NEXT_TOKEN_SEARCH_AGREEMENT`` there). The next token is the argmax of the logits at the
last position, or of a ``[batch, vocab]`` logits output (the last position's alone) as it is.
Every step counts, near-ties included. Free-running agreement (``free_agreement``: each
model fed its own tokens) is reported beside it and decides nothing: one flipped near-tie
changes every later token, so it measures where a row parts, and one flip early in a
row costs a whole row's tokens.

A streaming model (``optcc.numerics.state``: a VAD or recognizer fed chunk by chunk) runs
the same loop without tokens (``stream_plan``): ``streamed`` runs ``STREAM_STEPS`` steps
per sample, the second fed the first's state outputs and the sample's other inputs again
(the same chunk: so a sample's second step depends on that sample alone, whichever
samples are judged together), and returns the first step's outputs followed by the
second step's answers (every output but the state), named ``SECOND_STEP``. The state a
model returns is judged where its user sees it: in the next step's answers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from optcc.numerics.inputs import DECODE_STEPS, input_roles
from optcc.numerics.metrics import sqnr_db
from optcc.numerics.state import state_pairs

__all__ = ["DECODE_STEPS", "NEXT_TOKEN_AGREEMENT", "NEXT_TOKEN_PROMPT_LENGTH", "NEXT_TOKEN_PROMPTS",
           "NEXT_TOKEN_SEARCH_AGREEMENT", "NEXT_TOKEN_STEPS", "STREAM_STEPS", "SECOND_STEP",
           "DecodePlan", "GreedyAgreement", "decode_plan", "forced_tokens", "free_agreement", "free_running",
           "greedy_agreement", "greedy_tokens", "last_logits", "next_token_agreement", "run_decode", "stream_plan",
           "stream_names", "streamed"]

NEXT_TOKEN_STEPS = 32  # steps per prompt whose next token judges a lossy decoder, each fed the original's token
NEXT_TOKEN_AGREEMENT = 0.99  # the share of those steps whose argmax is the original's that accepts it
# the share a mixed search's candidate must reach on its own (held-apart) prompts: fewer differing
# steps than the result is allowed, since a search keeps the first candidate whose steps happen to
# differ little on the prompts it judged
NEXT_TOKEN_SEARCH_AGREEMENT = 0.993
NEXT_TOKEN_PROMPTS = 16  # generated prompts (samples) that decode, where the user gives none
NEXT_TOKEN_PROMPT_LENGTH = 8  # random token ids in a generated prompt, from an empty cache
STREAM_STEPS = 2  # steps a streaming model runs per sample: its state is judged in the second's answers
SECOND_STEP = "{} (step 2)"  # the name of an output's answer on the second step of a stream

_PRESENT = re.compile(r"^present", re.IGNORECASE)
_PREFIX = re.compile(r"^(past_key_values|present_key_values|past|present)[._]?", re.IGNORECASE)

Feeds = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """How one step's outputs become the next step's inputs: the state (``past``) inputs
    take the outputs that return them; a decoder also feeds a token (``ids``, chosen from
    ``logits``) and grows its mask and position; a stream (``ids`` None) feeds the rest again."""

    past_to_present: dict[str, str]
    ids: str | None
    mask: str | None
    position: str | None
    # the output whose argmax is the next token: at its last position ([batch, seq, vocab]), or
    # the last position's alone ([batch, vocab])
    logits: str | None

    @property
    def state_outputs(self) -> frozenset[str]:
        """The outputs the next step takes back as its state (``past``) inputs."""
        return frozenset(self.past_to_present.values())


def decode_plan(model: ir.Model) -> DecodePlan | None:
    """The plan for a KV-cache decoder (past inputs matched to present outputs by the rest
    of their names, else by order), or None for any other model."""
    roles = input_roles(model)
    pasts = [name for name, role in roles.items() if role == "past"]
    outputs = [o for o in model.graph.outputs]
    presents = [o.name for o in outputs if _PRESENT.match(o.name or "")]
    if not pasts or len(pasts) != len(presents):
        return None
    by_suffix = {_PREFIX.sub("", name): name for name in presents}
    pairing = {p: by_suffix.get(_PREFIX.sub("", p)) for p in pasts}
    if None in pairing.values() or len(set(pairing.values())) != len(pairing):
        pairing = dict(zip(pasts, presents))
    ids = next((n for n, r in roles.items() if r == "index"), None)
    floats = [o for o in outputs if not _PRESENT.match(o.name or "") and o.dtype is not None
              and o.dtype.is_floating_point() and o.shape is not None]
    # logits over every position where the model returns them, else the last position's alone
    # where one output alone can be them (beside a pooled [batch, hidden] output, which one
    # holds the logits is not known: no plan then, and every output keeps its tolerance)
    last = [o.name for o in floats if o.shape.rank() == 2]
    logits = next((o.name for o in floats if o.shape.rank() == 3), last[0] if len(last) == 1 else None)
    if ids is None or logits is None:
        return None
    mask = next((n for n, r in roles.items() if r == "mask"), None)
    position = next((n for n, r in roles.items() if r == "position"), None)
    return DecodePlan({p: q for p, q in pairing.items() if q is not None}, ids, mask, position, logits)


def stream_plan(model: ir.Model) -> DecodePlan | None:
    """The plan for a streaming model (``state_pairs``: its state inputs fed the outputs
    that return them, its other inputs fed again), or None for a KV-cache decoder
    (``decode_plan``) or a model without state."""
    if decode_plan(model) is not None:
        return None
    pairs = state_pairs(model)
    return DecodePlan(pairs, None, None, None, None) if pairs else None


def stream_names(names: Sequence[str], plan: DecodePlan) -> list[str]:
    """The names of ``streamed``'s outputs: ``names``, then each answer's second step."""
    return [*names, *(SECOND_STEP.format(n) for n in names if n not in plan.state_outputs)]


def streamed(run: Callable[[Feeds], Sequence[np.ndarray]], names: Sequence[str], plan: DecodePlan,
             feeds: Feeds) -> list[np.ndarray]:
    """A streaming model's outputs on ``feeds`` (``names``, as ``run`` returns them), then
    its answers on the second step (``stream_names``, module doc)."""
    (first, second), _ = run_decode(run, names, plan, feeds, steps=STREAM_STEPS)
    return [*first, *(out for name, out in zip(names, second) if name not in plan.state_outputs)]


def _next_feeds(plan: DecodePlan, feeds: Feeds, outputs: Mapping[str, np.ndarray],
                token: np.ndarray | None) -> dict:
    new = dict(feeds)
    for past, present in plan.past_to_present.items():
        new[past] = outputs[present]
    if plan.ids is None or token is None:  # a stream: its other inputs again
        return new
    new[plan.ids] = token.reshape(-1, 1).astype(feeds[plan.ids].dtype)
    if plan.mask is not None:
        mask = feeds[plan.mask]
        new[plan.mask] = np.concatenate([mask, np.ones((mask.shape[0], 1), mask.dtype)], axis=1)
    if plan.position is not None:
        position = feeds[plan.position]
        new[plan.position] = position[:, -1:] + 1
    return new


def run_decode(
    run: Callable[[Feeds], Sequence[np.ndarray]],
    names: Sequence[str],
    plan: DecodePlan,
    first: Feeds,
    *,
    steps: int = DECODE_STEPS,
    tokens: Sequence[np.ndarray] | None = None,
    until: Callable[[Sequence[np.ndarray]], bool] | None = None,
) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
    """Each step's outputs for a decode from ``first``, and the tokens fed after each step
    (``tokens`` when given, else the greedy choice from the step's own logits; none for a
    stream, whose plan has no logits). ``until``: asked with each step's outputs; True
    ends the decode after that step."""
    feeds: Feeds = dict(first)
    results: list[list[np.ndarray]] = []
    chosen: list[np.ndarray] = []
    for step in range(steps):
        outputs = list(run(feeds))
        results.append(outputs)
        if (until is not None and until(outputs)) or step == steps - 1:
            break
        named = dict(zip(names, outputs))
        token = None
        if plan.logits is not None:
            token = tokens[step] if tokens is not None else np.argmax(last_logits(named[plan.logits]), axis=-1)
            chosen.append(token)
        feeds = _next_feeds(plan, feeds, named, token)
    return results, chosen


@dataclasses.dataclass(frozen=True)
class GreedyAgreement:
    """A candidate's greedy decode against a reference's (see the module doc)."""

    free: float  # share of free-running tokens equal to the reference's
    first_divergence: list[int]  # per batch row: the first free-running step that differs (steps: none)
    forced: float  # share of forced steps whose argmax equals the reference's
    decisive: float | None  # the same over the decisive steps only (None: there were none)
    decisive_steps: int
    steps: int  # tokens compared per row
    logit_sqnr_db: float  # SQNR of the forced decode's next-token logits against the reference's

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def last_logits(logits: np.ndarray) -> np.ndarray:
    """[batch, vocab]: a step's logits ([batch, seq, vocab], or [batch, vocab] where the
    model returns the last position's alone) at its last position."""
    return logits if logits.ndim == 2 else logits[:, -1, :]


def _next_logits(results: Sequence[Sequence[np.ndarray]], index: int) -> np.ndarray:
    """[batch, steps, vocab] float64: every step's logits at its last position."""
    return np.stack([last_logits(np.asarray(r[index], np.float64)) for r in results], axis=1)


def greedy_agreement(
    reference: Callable[[Feeds], Sequence[np.ndarray]],
    candidate: Callable[[Feeds], Sequence[np.ndarray]],
    names: Sequence[str],
    plan: DecodePlan,
    first: Feeds,
    *,
    steps: int = DECODE_STEPS,
    margin_floor: float = 0.0,
) -> GreedyAgreement:
    """Free-running and forced greedy agreement of ``candidate`` with ``reference`` over
    ``steps`` tokens per row from ``first`` (both run callables take feeds and return the
    outputs ``names``); decisive steps are those whose reference top-1 margin exceeds
    ``margin_floor``. ``first`` needs room in the position table for ``steps`` steps."""
    assert plan.logits is not None
    index = list(names).index(plan.logits)
    ref_results, ref_chosen = run_decode(reference, names, plan, first, steps=steps)
    free_share, first_divergence = free_running(candidate, names, plan, first, ref_results)
    forced_results, _ = run_decode(candidate, names, plan, first, steps=steps, tokens=ref_chosen)
    ref_logits = _next_logits(ref_results, index)
    want = ref_logits.argmax(-1)  # [batch, steps]
    forced_logits = _next_logits(forced_results, index)
    forced = forced_logits.argmax(-1)
    top2 = np.sort(ref_logits, axis=-1)[..., -2:]
    decisive = (top2[..., 1] - top2[..., 0]) > margin_floor
    sqnr = sqnr_db(float((ref_logits ** 2).sum()), float(((forced_logits - ref_logits) ** 2).sum()))
    return GreedyAgreement(
        free=free_share,
        first_divergence=first_divergence,
        forced=float((forced == want).mean()),
        decisive=float((forced == want)[decisive].mean()) if decisive.any() else None,
        decisive_steps=int(decisive.sum()),
        steps=steps,
        logit_sqnr_db=sqnr,
    )


def free_running(
    candidate: Callable[[Feeds], Sequence[np.ndarray]],
    names: Sequence[str],
    plan: DecodePlan,
    first: Feeds,
    reference: Sequence[Sequence[np.ndarray]],
) -> tuple[float, list[int]]:
    """(share of ``candidate``'s free-running greedy tokens equal to the reference's, the
    first differing step per batch row, or the step count where none differs) over as
    many steps as ``reference`` holds: the reference's own decode from ``first``, each
    step's outputs as ``run_decode`` returns them (``names`` order)."""
    assert plan.logits is not None
    index = list(names).index(plan.logits)
    steps = len(reference)
    results, _ = run_decode(candidate, names, plan, first, steps=steps)
    differs = _next_logits(results, index).argmax(-1) != _next_logits(reference, index).argmax(-1)
    return float((~differs).mean()), [int(np.argmax(row)) if row.any() else steps for row in differs]


def greedy_tokens(run: Callable[[Feeds], Sequence[np.ndarray]], names: Sequence[str], plan: DecodePlan,
                  first: Feeds, steps: int = NEXT_TOKEN_STEPS) -> np.ndarray:
    """[batch, steps] int64: a model's own greedy tokens (each step's argmax at the last
    position, fed back) over ``steps`` steps from ``first``."""
    assert plan.logits is not None
    results, _ = run_decode(run, names, plan, first, steps=steps)
    return _next_logits(results, list(names).index(plan.logits)).argmax(-1)


def forced_tokens(run: Callable[[Feeds], Sequence[np.ndarray]], names: Sequence[str], plan: DecodePlan,
                  first: Feeds, tokens: np.ndarray, allowed: int | None = None) -> np.ndarray:
    """[batch, steps] int64: a model's argmax at the last position of each step from
    ``first`` when each next step is fed ``tokens`` ([batch, steps], a reference's
    ``greedy_tokens``: step ``i + 1`` is fed column ``i``), as many steps as ``tokens`` has;
    with ``allowed``, only until the step where more than that many of its argmaxes (over
    every row) differ from ``tokens`` (fewer steps then: the later ones cannot undo it)."""
    assert plan.logits is not None
    index = list(names).index(plan.logits)
    chosen: list[np.ndarray] = []

    def beyond_allowed(outputs: Sequence[np.ndarray]) -> bool:
        chosen.append(last_logits(np.asarray(outputs[index], np.float64)).argmax(-1))
        return allowed is not None and int((np.stack(chosen, axis=1) != tokens[:, :len(chosen)]).sum()) > allowed

    run_decode(run, names, plan, first, steps=tokens.shape[1], tokens=list(tokens.T[:-1]), until=beyond_allowed)
    return np.stack(chosen, axis=1)


def next_token_agreement(reference: Sequence[np.ndarray], forced: Sequence[np.ndarray],
                         threshold: float = NEXT_TOKEN_AGREEMENT) -> dict:
    """Next-token agreement of a candidate with a reference (one [batch, steps] array per
    sample each: the reference's ``greedy_tokens`` and the candidate's ``forced_tokens`` on
    them, the last of which may hold fewer steps: a decode stopped there): the share of
    steps whose tokens are equal over every step compared, the steps per row, the rows, the
    steps compared and differing, and whether the share reaches ``threshold``."""
    differs = [np.asarray(o) != np.asarray(r)[:, :np.asarray(o).shape[1]] for r, o in zip(reference, forced)]
    compared = sum(d.size for d in differs)
    differing = sum(int(d.sum()) for d in differs)
    agreement = (compared - differing) / compared  # as the mean of the equal steps
    return {"agreement": agreement, "steps": int(np.asarray(reference[0]).shape[1]),
            "rows": sum(d.shape[0] for d in differs), "tokens": compared, "differing": differing,
            "threshold": threshold, "passed": agreement >= threshold}


def free_agreement(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict:
    """Free-running agreement of ``candidate``'s greedy tokens with ``reference``'s (one
    [batch, steps] array per sample each, ``greedy_tokens``): the share of equal tokens
    over every row of every sample, each row's first differing step (the step count where
    none differs) and the tokens compared."""
    differs, counts = _token_differences(reference, candidate)
    return {**counts, "first_divergence": [int(np.argmax(row)) if row.any() else counts["steps"] for row in differs]}


def _token_differences(reference: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> tuple[np.ndarray, dict]:
    """Where ``other``'s tokens differ from ``reference``'s (one [batch, steps] array per
    sample each), every sample's rows stacked, and the counts ``free_agreement`` reports: the
    share of equal tokens, the steps per row, the rows and the tokens compared."""
    differs = np.concatenate([np.asarray(o) != np.asarray(r) for r, o in zip(reference, other)], axis=0)
    return differs, {"agreement": float((~differs).mean()), "steps": differs.shape[1], "rows": int(differs.shape[0]),
                     "tokens": int(differs.size)}
