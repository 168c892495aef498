"""`variable_tracking` (RULER): follow chains of assignments ``VAR B = VAR A`` hidden in noise.

One chain starts with ``VAR X = <5-digit value>`` and hops through ``hops`` more variables, statements in order at
increasing depths; the answer lists every variable that ends up holding the value (RULER's string_match_all).
"""

from __future__ import annotations

import random
import string

from transformers import PreTrainedTokenizerBase

from kvtune.eval.tasks.base import Sample, register_task
from kvtune.eval.tasks.haystack import filler, fit_units, with_needles
from kvtune.eval.tasks.niah import fraction_found


@register_task("variable_tracking")
class VariableTracking:
    name = "variable_tracking"
    max_new_tokens = 30

    def __init__(self, hops: int = 4, haystack: str = "noise", corpus: str | None = None) -> None:
        if hops < 1:
            raise ValueError(f"hops must be at least 1, got {hops}")
        self.hops, self.haystack, self.corpus = hops, haystack, corpus

    def samples(self, tokenizer: PreTrainedTokenizerBase, context_length: int, n: int, seed: int) -> list[Sample]:
        return [self._sample(tokenizer, context_length, random.Random(seed * 100_003 + i)) for i in range(n)]

    def _sample(self, tokenizer: PreTrainedTokenizerBase, context_length: int, rng: random.Random) -> Sample:
        names: list[str] = []
        while len(names) < self.hops + 1:
            name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            if name not in names:
                names.append(name)
        value = str(rng.randrange(10_000, 100_000))
        statements = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        depths = sorted(rng.uniform(0.05, 0.95) for _ in statements)
        units = filler(self.haystack, self.corpus, rng)
        question = f" Find all variables that are assigned the value {value} in the text above."
        prefix = (
            " Answer: According to the chain(s) of variable assignment in the text above, "
            f"{len(names)} variables are assigned the value {value}, they are:"
        )

        def build(count: int) -> Sample:
            context, spans = with_needles(units(count), statements, depths)
            meta = {"values": names, "needles": spans, "depths": depths, "value": value}
            return Sample(
                "Memorize and track the chain(s) of variable assignment hidden in the following text. " + context,
                question,
                prefix,
                [" " + " ".join(names)],
                meta,
            )

        sample = fit_units(tokenizer, build, context_length, start=context_length // 22)
        offset = len("Memorize and track the chain(s) of variable assignment hidden in the following text. ")
        sample.meta["needles"] = [(start + offset, end + offset) for start, end in sample.meta["needles"]]
        return sample

    def score(self, prediction: str, sample: Sample) -> float:
        return fraction_found(prediction, sample.meta["values"])
