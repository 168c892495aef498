"""RULER-style needle-in-a-haystack tasks: `niah_single`, `niah_multikey`, `niah_multivalue`, `niah_multiquery`.

Needles read "One of the special magic numbers for {key} is: {value}." with word-pair keys and 7-digit values, in
a haystack of repeated noise or natural text (`haystack=natural`, `corpus=`). The metric is RULER's
string_match_all: the fraction of gold values present in the answer.
"""

from __future__ import annotations

import random

from transformers import PreTrainedTokenizerBase

from kvtune.eval.tasks.base import Sample, register_task
from kvtune.eval.tasks.haystack import filler, fit_units, with_needles

ADJECTIVES = (
    "ancient brave calm clever curious damp eager fancy gentle golden hollow humble icy jolly keen lively lucky "
    "mellow misty noble odd pale proud quiet rapid rusty shy silent sleepy swift tall tidy vivid wild witty young"
).split()
NOUNS = (
    "anchor badger beacon canyon cedar comet falcon garden harbor island jaguar kettle lantern meadow mirror "
    "orchard otter parrot pebble quartz raven river saddle salmon spruce thistle tiger tunnel violin walrus willow"
).split()


def magic_needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def fraction_found(prediction: str, values: list[str]) -> float:
    return sum(value in prediction for value in values) / len(values)


class Needles:
    """One task family; ``keys`` needles are asked for, ``values`` per key, ``distractors`` other keys."""

    max_new_tokens = 40

    def __init__(self, name: str, keys: int, values: int, distractors: int, haystack: str, corpus: str | None):
        self.name, self.keys, self.values, self.distractors = name, keys, values, distractors
        self.haystack, self.corpus = haystack, corpus

    def samples(self, tokenizer: PreTrainedTokenizerBase, context_length: int, n: int, seed: int) -> list[Sample]:
        return [self._sample(tokenizer, context_length, random.Random(seed * 100_003 + i)) for i in range(n)]

    def _sample(self, tokenizer: PreTrainedTokenizerBase, context_length: int, rng: random.Random) -> Sample:
        pairs = rng.sample([f"{a}-{b}" for a in ADJECTIVES for b in NOUNS], self.keys + self.distractors)
        asked, others = pairs[: self.keys], pairs[self.keys :]
        gold = {key: [str(rng.randrange(1_000_000, 10_000_000)) for _ in range(self.values)] for key in asked}
        needles = [(key, value) for key in asked for value in gold[key]]
        needles += [(key, str(rng.randrange(1_000_000, 10_000_000))) for key in others]
        rng.shuffle(needles)
        depths = [rng.uniform(0.05, 0.95) for _ in needles]
        units = filler(self.haystack, self.corpus, rng)
        keys_text = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + f" and {asked[-1]}"
        plural = self.keys * self.values > 1
        question = (
            f" What {'are all the special magic numbers' if plural else 'is the special magic number'} for "
            f"{keys_text} mentioned in the provided text?"
        )
        prefix = f" The special magic number{'s' if plural else ''} for {keys_text} mentioned in the provided text "
        prefix += "are" if plural else "is"
        values = [value for key in asked for value in gold[key]]

        def build(count: int) -> Sample:
            context, spans = with_needles(units(count), [magic_needle(k, v) for k, v in needles], depths)
            meta = {"values": values, "keys": asked, "needles": spans, "needle_pairs": needles, "depths": depths}
            return Sample(context, question, prefix, [" " + ", ".join(values) + "."], meta)

        return fit_units(tokenizer, build, context_length, start=context_length // 22)

    def score(self, prediction: str, sample: Sample) -> float:
        return fraction_found(prediction, sample.meta["values"])


@register_task("niah_single")
def niah_single(haystack: str = "noise", corpus: str | None = None) -> Needles:
    return Needles("niah_single", keys=1, values=1, distractors=0, haystack=haystack, corpus=corpus)


@register_task("niah_multikey")
def niah_multikey(haystack: str = "noise", corpus: str | None = None, distractors: int = 3) -> Needles:
    return Needles("niah_multikey", keys=1, values=1, distractors=distractors, haystack=haystack, corpus=corpus)


@register_task("niah_multivalue")
def niah_multivalue(haystack: str = "noise", corpus: str | None = None, values: int = 4) -> Needles:
    return Needles("niah_multivalue", keys=1, values=values, distractors=0, haystack=haystack, corpus=corpus)


@register_task("niah_multiquery")
def niah_multiquery(haystack: str = "noise", corpus: str | None = None, queries: int = 4) -> Needles:
    return Needles("niah_multiquery", keys=queries, values=1, distractors=0, haystack=haystack, corpus=corpus)
