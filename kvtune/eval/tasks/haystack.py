"""Contexts of an exact token length with needles at chosen depths: shared by the synthetic tasks.

A context is a sequence of filler *units* (sentences of noise, lines of natural text, list entries) with needle
sentences inserted between units. `fit_units` searches the number of units so that the whole prompt (context,
question and answer prefix, as `kvtune.generate` lays them out) lands on the target length in the model's tokens.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from kvtune.eval.corpus import corpus_text
from kvtune.eval.tasks.base import Sample, prompt_tokens

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HAYSTACKS = ("noise", "natural")


@lru_cache(maxsize=4)
def _corpus_lines(corpus: str | None) -> tuple[str, ...]:
    return tuple(line.strip() for line in corpus_text(corpus).splitlines() if line.strip())


def filler(haystack: str, corpus: str | None, rng: random.Random) -> Callable[[int], list[str]]:
    """``units(n)``: ``n`` filler units, noise sentences or consecutive corpus lines from a seeded offset."""
    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")
    if haystack == "noise":
        return lambda n: [NOISE] * n
    lines = _corpus_lines(corpus)
    start = rng.randrange(len(lines))
    return lambda n: [lines[(start + i) % len(lines)] for i in range(n)]


def with_needles(units: list[str], needles: list[str], depths: list[float], sep: str = " ") -> tuple[str, list]:
    """Join ``units`` with each needle inserted at the unit boundary nearest ``depth`` of the filler's characters;
    returns the text and the needles' character spans."""
    ends = list(itertools.accumulate(len(u) + len(sep) for u in units))
    total = ends[-1] if ends else 0
    slots = sorted(zip((bisect.bisect_left(ends, d * total) for d in depths), range(len(needles))))
    pieces, spans, length, placed = [], [None] * len(needles), 0, 0
    for index in range(len(units) + 1):
        while placed < len(slots) and slots[placed][0] == index:
            needle = needles[slots[placed][1]]
            spans[slots[placed][1]] = (length, length + len(needle))
            pieces.append(needle)
            length += len(needle) + len(sep)
            placed += 1
        if index < len(units):
            pieces.append(units[index])
            length += len(units[index]) + len(sep)
    return sep.join(pieces), spans


def fit_units(
    tokenizer: PreTrainedTokenizerBase, build: Callable[[int], Sample], target: int, start: int = 16
) -> Sample:
    """The sample built from the number of units whose prompt length is closest to ``target`` tokens."""
    count, best, tried = max(1, start), None, {}
    for _ in range(12):
        if count in tried:
            break
        sample = build(count)
        error = prompt_tokens(tokenizer, sample) - target
        tried[count] = (abs(error), sample)
        if best is None or abs(error) < best[0]:
            best = (abs(error), sample)
        if error == 0:
            break
        per_unit = max(1e-3, (prompt_tokens(tokenizer, sample) - prompt_tokens(tokenizer, build(0))) / count)
        count = max(1, count - round(error / per_unit))
    return best[1]
