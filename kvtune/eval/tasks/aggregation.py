"""RULER's aggregation tasks: `common_words` (the 10 most common words of a long numbered list) and
`frequent_words` (the 3 most frequent coded words of a Zipf-distributed text). Both need the whole context: no
single needle to keep, so they show how much of the distribution a compressed cache preserves.
"""

from __future__ import annotations

import random
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from kvtune.eval.tasks.base import Sample, register_task
from kvtune.eval.tasks.haystack import fit_units
from kvtune.eval.tasks.niah import fraction_found

SYLLABLES = "ba be bi bo bu da de di do du fa fe fi fo fu ka ke ki ko ku la le li lo lu ma me mi mo mu".split()
SYLLABLES += "na ne ni no nu pa pe pi po pu ra re ri ro ru sa se si so su ta te ti to tu va ve vi vo vu".split()


@lru_cache(maxsize=1)
def pseudo_words() -> tuple[str, ...]:
    """Pronounceable made-up words (three syllables), a fixed vocabulary no corpus can leak."""
    rng = random.Random(0)
    words: set[str] = set()
    while len(words) < 4000:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(3)))
    return tuple(sorted(words))


@register_task("common_words")
class CommonWords:
    """``common`` words appear ``common_freq`` times each (default: scaled so they fill about a quarter of the
    context), the padding words ``rare_freq`` times."""

    name = "common_words"
    max_new_tokens = 60

    def __init__(self, common: int = 10, common_freq: int | None = None, rare_freq: int = 3) -> None:
        self.common, self.common_freq, self.rare_freq = common, common_freq, rare_freq

    def samples(self, tokenizer: PreTrainedTokenizerBase, context_length: int, n: int, seed: int) -> list[Sample]:
        return [self._sample(tokenizer, context_length, random.Random(seed * 100_003 + i)) for i in range(n)]

    def _sample(self, tokenizer: PreTrainedTokenizerBase, context_length: int, rng: random.Random) -> Sample:
        vocabulary = list(pseudo_words())
        rng.shuffle(vocabulary)
        common, rare_pool = vocabulary[: self.common], vocabulary[self.common :]
        frequency = self.common_freq or max(self.rare_freq + 2, context_length // (24 * self.common))
        question = f" What are the {self.common} most common words in the above list?"
        prefix = f" Answer: The top {self.common} words that appear most often in the list are:"

        def build(rare: int) -> Sample:
            local = random.Random(rng.random())
            words = common * frequency + rare_pool[:rare] * self.rare_freq
            local.shuffle(words)
            context = "Below is a numbered list of words. " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
            return Sample(context + ".", question, prefix, [" " + ", ".join(common)], {"values": common})

        return fit_units(tokenizer, build, context_length, start=context_length // 20)

    def score(self, prediction: str, sample: Sample) -> float:
        return fraction_found(prediction, sample.meta["values"])


@register_task("frequent_words")
class FrequentWords:
    """Coded words with Zipf frequencies (word ``r`` appears about ``N / r**alpha`` times); ask for the top 3."""

    name = "frequent_words"
    max_new_tokens = 30

    def __init__(self, alpha: float = 2.0, top: int = 3) -> None:
        self.alpha, self.top = alpha, top

    def samples(self, tokenizer: PreTrainedTokenizerBase, context_length: int, n: int, seed: int) -> list[Sample]:
        return [self._sample(tokenizer, context_length, random.Random(seed * 100_003 + i)) for i in range(n)]

    def _sample(self, tokenizer: PreTrainedTokenizerBase, context_length: int, rng: random.Random) -> Sample:
        vocabulary = list(pseudo_words())
        rng.shuffle(vocabulary)
        question = (
            " Read the coded text above and track how often each coded word appears. "
            f"What are the {self.top} most frequent coded words?"
        )
        prefix = f" Answer: According to the coded text above, the {self.top} most frequent coded words are:"

        def build(total: int) -> Sample:
            counts = [max(1, int(total / rank**self.alpha)) for rank in range(1, len(vocabulary) + 1)]
            counts = [c for c in counts if c > 1] + [1] * max(0, total - sum(c for c in counts if c > 1))
            words = [w for w, c in zip(vocabulary, counts) for _ in range(c)]
            random.Random(rng.random()).shuffle(words)
            top = vocabulary[: self.top]
            meta = {"values": top, "counts": dict(zip(vocabulary[: self.top + 1], counts[: self.top + 1]))}
            return Sample("Coded text: " + " ... ".join(words) + ".", question, prefix, [" " + ", ".join(top)], meta)

        return fit_units(tokenizer, build, context_length, start=context_length // 4)

    def score(self, prediction: str, sample: Sample) -> float:
        return fraction_found(prediction, sample.meta["values"])
