"""Recurrent state: the graph inputs a streaming model takes back from its own outputs.

A streaming model (a VAD or recognizer fed chunk by chunk, an RNN run step by step)
returns its state next to its answer, and its caller feeds that state back as an input
with the next chunk. ``state_pairs`` finds those input/output pairs from the graph alone,
conservatively: a pair is an input and an output

- whose names are the same words once a word saying which side it is on is dropped from
  each: ``in``/``input``/``past``/``prev``/``previous``/``old`` on the input's side,
  ``out``/``output``/``present``/``next``/``new``/``n`` on the output's (``in_cache0``
  and ``out_cache0``, ``state_in`` and ``state_out``, ``h`` and ``next_h``, ``state``
  and ``stateN``, ``h`` and ``hn``), words being the name's runs of letters and of
  digits, a capital letter after a small one starting a word, and a one-letter state word
  with a one-letter side word glued on (``hn``, ``cn``: an LSTM's new hidden and cell
  state) two words; at least one side word must be dropped, and the
  words left must name a state (``STATE_WORDS``: state, cache, hidden, memory, h, c...),
  so an image-to-image model's ``input_image`` and ``output_image`` are no pair;
- with the same floating-point dtype and rank, and dims that agree wherever both are
  static (a symbolic dim matches anything);
- matched one to one: a name that could pair with two is left unpaired.

Names alone never pair an integer input (a length, a counter) or a KV-cache decoder's
``past_key_values.*`` with ``present.*`` (their words differ: ``optcc.numerics.decode``
pairs those).
"""

from __future__ import annotations

import re

import onnx_ir as ir

__all__ = ["STATE_WORDS", "state_pairs"]

# words that name what a recurrent model carries from one call to the next
STATE_WORDS = frozenset({"state", "states", "cache", "caches", "hidden", "memory", "mem", "h", "c", "hx", "cx"})

_INPUT_SIDE = frozenset({"in", "input", "past", "prev", "previous", "old"})
_OUTPUT_SIDE = frozenset({"out", "output", "present", "next", "new", "n"})
_WORDS = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+")


def _key(name: str, side: frozenset[str]) -> tuple[tuple[str, ...], bool]:
    """The name's words without the words of ``side``, and whether one was dropped. A last
    word that is a state word with a side word glued on (``hn``, ``cn``) is those two words."""
    words = [w.lower() for w in _WORDS.findall(name)]
    if words:
        words[-1:] = _unglued(words[-1], side)
    kept = tuple(w for w in words if w not in side)
    return kept, len(kept) < len(words)


def _unglued(word: str, side: frozenset[str]) -> list[str]:
    """``word`` as a one-letter state word and a one-letter side word glued to it (``hn``:
    ``h`` and ``n``), else ``word`` alone: ``cin`` and ``hout`` name channels or features,
    and ``staten`` is no state's (a capital, ``stateN``, separates those)."""
    if len(word) == 2 and word[0] in STATE_WORDS and word[1] in side:
        return [word[0], word[1]]
    return [word]


def _fits(a: ir.Value, b: ir.Value) -> bool:
    """Same floating-point dtype and rank, static dims equal where both are static."""
    if a.dtype is None or a.dtype != b.dtype or not a.dtype.is_floating_point():
        return False
    if a.shape is None or b.shape is None or a.shape.rank() != b.shape.rank():
        return False
    return all(not (isinstance(x, int) and isinstance(y, int)) or x == y for x, y in zip(a.shape, b.shape))


def state_pairs(model: ir.Model) -> dict[str, str]:
    """Each state input's name mapped to the output that returns it (module doc)."""
    inputs = [v for v in model.graph.inputs if not v.is_initializer() and v.name]
    outputs = [v for v in model.graph.outputs if v.name]
    candidates: dict[str, list[str]] = {}
    for value in inputs:
        key, dropped = _key(value.name, _INPUT_SIDE)
        for output in outputs:
            other, other_dropped = _key(output.name, _OUTPUT_SIDE)
            if key == other and (dropped or other_dropped) and STATE_WORDS.intersection(key) \
                    and _fits(value, output):
                candidates.setdefault(value.name, []).append(output.name)
    chosen = {name: found[0] for name, found in candidates.items() if len(found) == 1}
    taken = list(chosen.values())
    return {name: output for name, output in chosen.items() if taken.count(output) == 1}
