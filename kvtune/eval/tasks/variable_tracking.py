"""`variable_tracking` (RULER): follow a chain of assignments ``VAR B = VAR A`` scattered through a haystack.

Each chain starts with ``VAR X = <5-digit value>`` and hops through ``hops`` more variables, its statements in
order at increasing random depths; ``chains - 1`` other chains with other values interleave with it. The question
asks for every variable holding the first chain's value, so a cache must keep each link, not just the start.
"""

from __future__ import annotations

import random
import string

from transformers import PreTrainedTokenizerBase

from kvtune.eval.tasks.base import Sample, register_task
from kvtune.eval.tasks.haystack import Filler, context_budget, fit_context, sample_rng
from kvtune.eval.tasks.niah import string_match_all

INTRO = "Memorize and track the chains of variable assignments hidden in the following text.\n"


def chain_statements(names: list[str], value: int) -> list[str]:
    """``VAR A = value.``, then ``VAR B = VAR A.`` for each following name."""
    return [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]


@register_task("variable_tracking")
class VariableTracking:
    name = "variable_tracking"

    def __init__(self, chains: int = 1, hops: int = 4, haystack: str = "noise", corpus: str | None = None) -> None:
        if chains < 1 or hops < 1:
            raise ValueError(f"need chains >= 1 and hops >= 1, got {chains} and {hops}")
        self.chains, self.hops, self.haystack, self.corpus = chains, hops, haystack, corpus

    def samples(self, tokenizer: PreTrainedTokenizerBase, context_length: int, n: int, seed: int) -> list[Sample]:
        return [self._sample(tokenizer, context_length, sample_rng(self.name, seed, i)) for i in range(n)]

    def _sample(self, tokenizer: PreTrainedTokenizerBase, context_length: int, rng: random.Random) -> Sample:
        length = self.hops + 1
        names: list[str] = []
        while len(names) < self.chains * length:
            name = "".join(rng.choices(string.ascii_uppercase, k=5))
            if name not in names:
                names.append(name)
        chains = [names[c * length : (c + 1) * length] for c in range(self.chains)]
        values = rng.sample(range(10_000, 100_000), self.chains)
        statements = [s for chain, value in zip(chains, values) for s in chain_statements(chain, value)]
        depths = [d for _ in chains for d in sorted(rng.random() for _ in range(length))]
        value, gold = values[0], chains[0]
        question = f" Find all variables that are assigned the value {value} in the text above."
        prefix = (
            " Answer: According to the chain(s) of variable assignment in the text above, "
            f"{length} variables are assigned the value {value}, they are:"
        )
        tokens = context_budget(tokenizer, context_length, question, prefix)
        filler = Filler(self.haystack, rng, self.corpus)
        context, spans = fit_context(tokenizer, tokens, filler, statements, depths, INTRO)
        meta = {"values": gold, "value": value, "chains": chains, "needles": spans, "depths": depths}
        return Sample(context, question, prefix, [" " + " ".join(gold)], meta)

    def score(self, prediction: str, sample: Sample) -> float:
        return string_match_all(prediction, sample.meta["values"])
