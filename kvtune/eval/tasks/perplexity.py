"""`perplexity`: long natural text scored chunk by chunk through the compressed cache.

Samples are windows of exactly ``context_length`` tokens cut from the corpus at seeded offsets. The runner feeds
them ``chunk`` tokens at a time, the method compresses between chunks, and each chunk is predicted from what was
kept: the same protocol scores eviction methods and LoCoCo's fixed-size cache.
"""

from __future__ import annotations

import random
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from kvtune.eval.corpus import corpus_documents
from kvtune.eval.tasks.base import Sample, register_task


@lru_cache(maxsize=4)
def _document_tokens(tokenizer: PreTrainedTokenizerBase, corpus: str | None) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(tokenizer(doc, add_special_tokens=False).input_ids) for doc in corpus_documents(corpus))


@register_task("perplexity")
class Perplexity:
    """Chunked perplexity on natural text; ``score`` is the perplexity (lower is better)."""

    name = "perplexity"
    kind = "perplexity"
    higher_is_better = False

    def __init__(self, corpus: str | None = None, chunk: int = 512) -> None:
        if chunk < 2:
            raise ValueError(f"chunk must be at least 2 tokens, got {chunk}")
        self.corpus, self.chunk = corpus, chunk

    def samples(self, tokenizer: PreTrainedTokenizerBase, context_length: int, n: int, seed: int) -> list[Sample]:
        if context_length <= self.chunk:
            raise ValueError(f"context_length {context_length} must exceed the scoring chunk {self.chunk}")
        documents = _document_tokens(tokenizer, self.corpus)
        # Long documents give their own windows; short ones are joined into one stream so nothing is wasted.
        stream = [t for doc in documents for t in doc]
        if len(stream) < context_length:
            raise ValueError(f"the corpus holds {len(stream)} tokens, fewer than context_length={context_length}")
        rng = random.Random(seed)
        slots = len(stream) // context_length
        order = rng.sample(range(slots), k=min(n, slots)) if slots >= n else [rng.randrange(slots) for _ in range(n)]
        items = []
        for slot in order:
            ids = stream[slot * context_length : (slot + 1) * context_length]
            items.append(
                Sample(
                    context=tokenizer.decode(ids), question="", answer_prefix="", answers=[], meta={"input_ids": ids}
                )
            )
        return items

    def score(self, prediction: str, sample: Sample) -> float:
        raise NotImplementedError("perplexity is scored from token log-likelihoods by the runner, not from answers")


@register_task("continuation")
class Continuation:
    """Question-agnostic continuation perplexity: a window of natural text whose first part is the context (compressed)
    and whose last ``continuation`` tokens are the answer, so the answer NLL is the log-perplexity of what follows the
    compressed context. Unlike `perplexity`, the context is compressed once, like a question-answering task's, so any
    method that compresses a prefill (kvpress's presses too) is scored the same way.

    ``score`` is the fraction of the continuation's first ``words`` words the greedy answer reproduces in order.
    """

    name = "continuation"
    max_new_tokens = 16

    def __init__(self, corpus: str | None = None, continuation: int = 64, words: int = 5) -> None:
        if continuation < 1 or words < 1:
            raise ValueError(f"continuation and words must be at least 1, got {continuation} and {words}")
        self.corpus, self.continuation, self.words = corpus, continuation, words

    def samples(self, tokenizer: PreTrainedTokenizerBase, context_length: int, n: int, seed: int) -> list[Sample]:
        if context_length <= 2 * self.continuation:
            raise ValueError(f"context_length {context_length} must exceed twice the continuation {self.continuation}")
        windows = Perplexity(self.corpus, chunk=self.continuation).samples(tokenizer, context_length, n, seed)
        items = []
        for window in windows:
            ids = window.meta["input_ids"]
            head, tail = ids[: -self.continuation], ids[-self.continuation :]
            context, answer = tokenizer.decode(head), tokenizer.decode(tail)
            items.append(
                Sample(context=context, question="", answer_prefix="", answers=[answer], meta={"input_ids": ids})
            )
        return items

    def score(self, prediction: str, sample: Sample) -> float:
        gold, said = sample.answers[0].split()[: self.words], prediction.split()
        matched = next((i for i, (a, b) in enumerate(zip(gold, said)) if a != b), min(len(gold), len(said)))
        return matched / len(gold) if gold else 0.0
