"""Haystacks of an exact token length with needle sentences at chosen depths, shared by the synthetic tasks.

A haystack is RULER's repeated noise sentences (``"noise"``) or a window of natural text read from a seeded line of
a corpus (``"natural"``). It is consumed in whole units (noise sentences, corpus words) and needles go in at
sentence or line boundaries, so the context reads naturally around them. Lengths are searched in the model's own
tokens: `fit_count` finds how many units make the whole prompt land on the target length.
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Callable, Sequence
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from kvtune.eval.corpus import corpus_text

NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
HAYSTACKS = ("noise", "natural")
TOLERANCE = 0.02  # the largest relative miss of a fitted length before generation gives up

_WORD = re.compile(r"\S+")
_BOUNDARY = re.compile(r"\n|[.!?][ \t]+")  # a needle may follow a line break or a sentence's end


def sample_rng(task: str, seed: int, index: int) -> random.Random:
    """The RNG of one sample: independent across tasks, seeds and indices, and never the global state."""
    return random.Random(f"{task}/{seed}/{index}")


@lru_cache(maxsize=4)
def _corpus(corpus: str | None) -> str:
    return corpus_text(corpus)


class Filler:
    """Haystack text read lazily in whole units, with the offsets where a needle may go.

    Natural text starts at the first line after an offset drawn from ``rng`` (the corpus's start without one).
    """

    def __init__(self, haystack: str, rng: random.Random | None = None, corpus: str | None = None) -> None:
        if haystack not in HAYSTACKS:
            raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")
        self.natural = haystack == "natural"
        self.text, self.ends, self.slots, self._chars = "", [], [], 512
        self._stream, self._start = "", 0
        if self.natural:
            self._stream = _corpus(corpus)
            offset = rng.randrange(len(self._stream)) if rng else 0
            self._start = self._stream.find("\n", offset) + 1  # a whole line (the corpus's start when none follows)
        self._read()

    def end(self, units: int) -> int:
        """The character offset just after the first ``units`` units, reading more text as needed."""
        while len(self.ends) < units:
            self._read()
        return self.ends[units - 1] if units else 0

    def fewest_units(self) -> int:
        """The fewest units that leave room for a needle."""
        while not self.slots:
            if self._chars > 64 * len(self._stream):
                raise ValueError("the corpus has no line or sentence break to put a needle at")
            self._read()
        return bisect.bisect_right(self.ends, self.slots[0]) + 1

    def slots_before(self, end: int) -> list[int]:
        """Needle offsets inside the first ``end`` characters (a needle always has haystack after it)."""
        return self.slots[: bisect.bisect_left(self.slots, end)]

    def separator(self, slot: int) -> str:
        """What follows a needle at ``slot``: a line break in line-broken text, else a space."""
        return "\n" if slot and self.text[slot - 1] == "\n" else " "

    def _read(self) -> None:
        """Read twice as many characters as last time."""
        self._chars *= 2
        if not self.natural:
            self.text = " ".join(NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(self._chars // 16))
            self.ends = [m.end() for m in re.finditer(r"\.", self.text)]
            self.slots = [0] + [end + 1 for end in self.ends[:-1]]
            return
        text = self._stream[self._start : self._start + self._chars]
        while len(text) < self._chars:  # wrap around the corpus
            text += "\n\n" + self._stream[: self._chars - len(text) - 2]
        # A word or a break touching the window's edge may continue past it: keep only those inside.
        self.text = text
        self.ends = [m.end() for m in _WORD.finditer(text) if m.end() < len(text)]
        self.slots = [m.end() for m in _BOUNDARY.finditer(text) if m.end() < len(text)]


def place_needles(
    prefix: str, filler: Filler, end: int, needles: Sequence[str], depths: Sequence[float]
) -> tuple[str, list[tuple[int, int]]]:
    """``prefix`` then the filler's first ``end`` characters with each needle at the slot whose position in the
    result is nearest ``depth`` (a fraction of the whole text); returns the text and each needle's span."""
    slots = filler.slots_before(end)
    if not slots:
        raise ValueError("the haystack is too short to hold a needle")
    total = len(prefix) + end + sum(len(needle) + 1 for needle in needles)
    shift, floor, placed = len(prefix), 0, []
    for k in sorted(range(len(needles)), key=lambda k: depths[k]):
        want = depths[k] * total - shift  # the filler offset that puts this needle's start at its depth
        i = bisect.bisect_left(slots, want)
        near = min(slots[max(i - 1, 0) : i + 1], key=lambda s: abs(s - want))
        floor = max(floor, near)
        placed.append((floor, k))
        shift += len(needles[k]) + 1
    pieces, spans, cursor, length = [prefix], [(0, 0)] * len(needles), 0, len(prefix)
    for slot, k in placed:
        pieces.append(filler.text[cursor:slot])
        length += slot - cursor
        spans[k] = (length, length + len(needles[k]))
        pieces += [needles[k], filler.separator(slot)]
        length += len(needles[k]) + 1
        cursor = slot
    pieces.append(filler.text[cursor:end])
    return "".join(pieces), spans


def fit_count(length_of: Callable[[int], int], target: int, low: int, guess: int) -> int:
    """The count from ``low`` up whose length is nearest ``target``, for a length that grows with the count.

    Interpolation search: a handful of measurements when the length is close to linear in the count, as token
    counts of repeated units are. Fails when even the nearest length misses ``target`` by more than `TOLERANCE`.
    """
    seen: dict[int, int] = {}

    def at(count: int) -> int:
        if count not in seen:
            seen[count] = length_of(count)
        return seen[count]

    a, b = low, max(guess, low + 1)
    if at(a) < target:
        while at(b) < target:  # extrapolate past the target with a margin
            slope = max((at(b) - at(a)) / (b - a), 1e-3)
            a, b = b, b + int(1.1 * (target - at(b)) / slope) + 1
        for _ in range(64):
            if b - a <= 1:
                break
            x = a + round((target - at(a)) * (b - a) / max(at(b) - at(a), 1))
            x = min(max(x, a + 1), b - 1)
            if at(x) == target:
                break
            a, b = (x, b) if at(x) < target else (a, x)
    best = min(seen, key=lambda count: (abs(seen[count] - target), count))
    if abs(seen[best] - target) > TOLERANCE * target:
        raise ValueError(f"cannot fit {target} tokens: the nearest length is {seen[best]}")
    return best


def context_budget(tokenizer: PreTrainedTokenizerBase, context_length: int, question: str, answer_prefix: str) -> int:
    """Tokens left for the context once the question and answer prefix (tokenized on their own) are counted."""
    return context_length - len(tokenizer(question + answer_prefix, add_special_tokens=False).input_ids)


def fit_context(
    tokenizer: PreTrainedTokenizerBase,
    tokens: int,
    filler: Filler,
    needles: Sequence[str],
    depths: Sequence[float],
    prefix: str = "",
) -> tuple[str, list[tuple[int, int]]]:
    """A context of ``tokens`` tokens: ``prefix``, then haystack with the needles at their depths; and their spans."""

    def build(units: int) -> tuple[str, list[tuple[int, int]]]:
        return place_needles(prefix, filler, filler.end(units), needles, depths)

    def length(units: int) -> int:
        return len(tokenizer(build(units)[0]).input_ids)

    return build(fit_count(length, tokens, filler.fewest_units(), tokens // 4))
