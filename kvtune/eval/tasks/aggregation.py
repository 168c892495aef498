"""RULER's aggregation tasks: `common_words` (cwe) and `frequent_words` (fwe).

No single needle holds the answer: it is a count over the whole context, so these tasks show how much of a long
distribution a compressed cache still carries. Both fit their length by the number of list entries or words.
"""

from __future__ import annotations

import itertools
import random
import string
from collections import Counter

from transformers import PreTrainedTokenizerBase

from kvtune.eval.tasks.base import Sample, register_task
from kvtune.eval.tasks.haystack import context_budget, fit_count, sample_rng
from kvtune.eval.tasks.niah import string_match_all
from kvtune.eval.tasks.words import WORDS

CWE_INTRO = (
    "Below is a numbered list of words. Some of them appear more often than the others. "
    "Memorize the ones that appear most often.\n"
)
FWE_INTRO = (
    "Read the following coded text and keep count of how often each coded word appears. "
    "Find the most frequent coded words.\n"
)


def spread(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` counts that differ by at most one, larger ones first."""
    q, r = divmod(total, parts)
    return [q + 1] * r + [q] * (parts - r)


@register_task("common_words")
class CommonWords:
    """``common`` words appear ``common_freq`` times each in a shuffled numbered list padded with other words that
    appear ``rare_freq`` times or fewer. The default ``common_freq`` grows with the context, from ``rare_freq + 2``
    up to RULER's 30, so that the common words stay about a third of a short list."""

    name = "common_words"

    def __init__(self, common: int = 10, common_freq: int | None = None, rare_freq: int = 3) -> None:
        if not 1 <= common < len(WORDS) // 2 or rare_freq < 1:
            raise ValueError(f"need 1 <= common < {len(WORDS) // 2} and rare_freq >= 1, got {common}, {rare_freq}")
        if common_freq is not None and common_freq <= rare_freq:
            raise ValueError(f"common_freq ({common_freq}) must exceed rare_freq ({rare_freq})")
        self.common, self.common_freq, self.rare_freq = common, common_freq, rare_freq

    def samples(self, tokenizer: PreTrainedTokenizerBase, context_length: int, n: int, seed: int) -> list[Sample]:
        return [self._sample(tokenizer, context_length, sample_rng(self.name, seed, i)) for i in range(n)]

    def _sample(self, tokenizer: PreTrainedTokenizerBase, context_length: int, rng: random.Random) -> Sample:
        vocabulary = rng.sample(WORDS, len(WORDS))
        common, rare = vocabulary[: self.common], vocabulary[self.common :]
        frequency = self.common_freq or min(30, max(self.rare_freq + 2, context_length // 200))
        order_seed = rng.getrandbits(64)
        question = f" Question: What are the {self.common} most common words in the list above?"
        prefix = f" Answer: The top {self.common} words that appear most often in the list are:"

        def rare_counts(padding: int) -> list[int]:
            """How often each rare word appears among ``padding`` entries: at most ``rare_freq`` while words last."""
            return spread(padding, min(len(rare), -(-padding // self.rare_freq))) if padding > 0 else []

        def context(count: int) -> str:
            words = common * frequency
            words += [word for word, c in zip(rare, rare_counts(count - len(words))) for _ in range(c)]
            random.Random(order_seed).shuffle(words)
            return CWE_INTRO + " ".join(f"{i}. {word}" for i, word in enumerate(words, start=1))

        tokens = context_budget(tokenizer, context_length, question, prefix)
        low = self.common * frequency
        count = fit_count(lambda count: len(tokenizer(context(count)).input_ids), tokens, low, tokens // 6)
        if max(rare_counts(count - low), default=0) >= frequency:
            raise ValueError(f"{context_length} tokens need more distinct words than the {len(WORDS)} there are")
        meta = {"values": common, "frequency": frequency}
        return Sample(context(count), question, prefix, [" " + ", ".join(common)], meta)

    def score(self, prediction: str, sample: Sample) -> float:
        return string_match_all(prediction, sample.meta["values"])


@register_task("frequent_words")
class FrequentWords:
    """Made-up 3-letter words drawn from a Zipf law over ``vocabulary`` ranks (probability ``1 / rank**alpha``);
    the answer is the ``top`` most frequent, made unambiguous by moving a word or two across any tie at the cut."""

    name = "frequent_words"

    def __init__(self, top: int = 3, alpha: float = 2.0, vocabulary: int = 1000) -> None:
        if not 1 <= top < vocabulary <= 26**3 or alpha <= 0:
            raise ValueError(f"need 1 <= top < vocabulary <= {26**3} and alpha > 0, got {top}, {vocabulary}, {alpha}")
        self.top, self.alpha, self.vocabulary = top, alpha, vocabulary

    def samples(self, tokenizer: PreTrainedTokenizerBase, context_length: int, n: int, seed: int) -> list[Sample]:
        return [self._sample(tokenizer, context_length, sample_rng(self.name, seed, i)) for i in range(n)]

    def _sample(self, tokenizer: PreTrainedTokenizerBase, context_length: int, rng: random.Random) -> Sample:
        letters = string.ascii_lowercase
        coded = ["".join(letters[i // 26**k % 26] for k in range(3)) for i in rng.sample(range(26**3), self.vocabulary)]
        weights = list(itertools.accumulate(rank**-self.alpha for rank in range(1, self.vocabulary + 1)))
        rank = {word: r for r, word in enumerate(coded)}
        ranks: list[int] = []  # the draws, extended as the length search asks for more: a word list is a prefix

        def words(count: int) -> list[str]:
            """The first ``count`` draws, with ties at the top's edge broken so the answer is unique."""
            if len(ranks) < count:
                ranks.extend(rng.choices(range(self.vocabulary), cum_weights=weights, k=max(count, len(ranks))))
            drawn = [coded[r] for r in ranks[:count]]
            counts = Counter(drawn)
            while len(counts) > self.top:
                order = sorted(counts, key=lambda w: (-counts[w], rank[w]))
                winner, loser = order[self.top - 1], order[self.top]
                if counts[winner] > counts[loser]:
                    break
                drawn[len(drawn) - 1 - drawn[::-1].index(loser)] = winner
                counts[winner] += 1
                counts[loser] -= 1
            return drawn

        def context(count: int) -> str:
            return FWE_INTRO + " ... ".join(words(count))

        question = f" Question: Ignore the dots. What are the {self.top} most frequent coded words in the text above?"
        prefix = f" Answer: According to the coded text above, the {self.top} most frequent coded words are:"
        tokens = context_budget(tokenizer, context_length, question, prefix)
        count = fit_count(lambda count: len(tokenizer(context(count)).input_ids), tokens, self.top + 1, tokens // 3)
        counts = Counter(words(count))
        gold = sorted(counts, key=lambda w: (-counts[w], rank[w]))[: self.top]
        meta = {"values": gold, "counts": {w: counts[w] for w in gold}}
        return Sample(context(count), question, prefix, [" " + ", ".join(gold)], meta)

    def score(self, prediction: str, sample: Sample) -> float:
        return string_match_all(prediction, sample.meta["values"])
