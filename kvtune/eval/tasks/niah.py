"""RULER's needle-in-a-haystack family: `niah_single`, `niah_multikey`, `niah_multivalue`, `niah_multiquery`.

Needles read "One of the special magic numbers for {key} is: {value}." with adjective-noun keys and 7-digit values,
each at a random depth of a noise or natural haystack. The variants differ in what must be kept: one needle among
none (single) or among look-alikes with other keys (multikey), every value of one key (multivalue), the values of
several keys (multiquery). The metric is RULER's string_match_all, the fraction of gold values in the answer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from kvtune.eval.tasks.base import Sample, register_task
from kvtune.eval.tasks.haystack import Filler, context_budget, fit_context, sample_rng
from kvtune.eval.tasks.words import ADJECTIVES, NOUNS

INTRO = (
    "Some special magic numbers are hidden in the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards.\n"
)


def string_match_all(prediction: str, gold: Sequence[str]) -> float:
    """The fraction of ``gold`` strings in ``prediction`` as whole words (case-insensitive): RULER's metric, minus
    the credit a longer number or word would earn by merely containing a gold one."""
    found = (re.search(rf"(?<![A-Za-z0-9]){re.escape(g)}(?![A-Za-z0-9])", prediction, re.IGNORECASE) for g in gold)
    return sum(match is not None for match in found) / len(gold)


def magic_needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def spoken_list(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" and {items[-1]}"


class MagicNumbers:
    """``keys`` asked keys with ``values`` values each, plus ``distractors`` needles of keys nobody asks for."""

    name: str

    def __init__(self, keys: int, values: int, distractors: int, haystack: str, corpus: str | None) -> None:
        if min(keys, values) < 1 or distractors < 0:
            raise ValueError(f"need keys >= 1, values >= 1, distractors >= 0; got {keys}, {values}, {distractors}")
        self.keys, self.values, self.distractors = keys, values, distractors
        self.haystack, self.corpus = haystack, corpus

    def samples(self, tokenizer: PreTrainedTokenizerBase, context_length: int, n: int, seed: int) -> list[Sample]:
        return [self._sample(tokenizer, context_length, sample_rng(self.name, seed, i)) for i in range(n)]

    def _sample(self, tokenizer: PreTrainedTokenizerBase, context_length: int, rng: random.Random) -> Sample:
        count = self.keys + self.distractors
        keys = [f"{a}-{b}" for a, b in zip(rng.sample(ADJECTIVES, count), rng.sample(NOUNS, count))]
        numbers = rng.sample(range(1_000_000, 10_000_000), self.keys * self.values + self.distractors)
        asked = keys[: self.keys]
        pairs = [(key, str(numbers.pop())) for key in asked for _ in range(self.values)]
        pairs += [(key, str(numbers.pop())) for key in keys[self.keys :]]
        depths = [rng.random() for _ in pairs]
        gold = [value for _, value in pairs[: self.keys * self.values]]
        many = len(gold) > 1
        what = "are all the special magic numbers" if many else "is the special magic number"
        question = f" What {what} for {spoken_list(asked)} mentioned in the provided text?"
        numbers, verb = ("numbers", "are") if many else ("number", "is")
        prefix = f" The special magic {numbers} for {spoken_list(asked)} mentioned in the provided text {verb}"
        needles = [magic_needle(key, value) for key, value in pairs]
        tokens = context_budget(tokenizer, context_length, question, prefix)
        context, spans = fit_context(tokenizer, tokens, Filler(self.haystack, rng, self.corpus), needles, depths, INTRO)
        meta = {"values": gold, "keys": asked, "pairs": pairs, "needles": spans, "depths": depths}
        return Sample(context, question, prefix, [" " + ", ".join(gold) + "."], meta)

    def score(self, prediction: str, sample: Sample) -> float:
        return string_match_all(prediction, sample.meta["values"])


@register_task("niah_single")
class NiahSingle(MagicNumbers):
    name = "niah_single"

    def __init__(self, haystack: str = "noise", corpus: str | None = None) -> None:
        super().__init__(keys=1, values=1, distractors=0, haystack=haystack, corpus=corpus)


@register_task("niah_multikey")
class NiahMultikey(MagicNumbers):
    name = "niah_multikey"

    def __init__(self, haystack: str = "noise", corpus: str | None = None, distractors: int = 3) -> None:
        super().__init__(keys=1, values=1, distractors=distractors, haystack=haystack, corpus=corpus)


@register_task("niah_multivalue")
class NiahMultivalue(MagicNumbers):
    name = "niah_multivalue"

    def __init__(self, haystack: str = "noise", corpus: str | None = None, values: int = 4) -> None:
        super().__init__(keys=1, values=values, distractors=0, haystack=haystack, corpus=corpus)


@register_task("niah_multiquery")
class NiahMultiquery(MagicNumbers):
    name = "niah_multiquery"

    def __init__(self, haystack: str = "noise", corpus: str | None = None, queries: int = 4) -> None:
        super().__init__(keys=queries, values=1, distractors=0, haystack=haystack, corpus=corpus)
