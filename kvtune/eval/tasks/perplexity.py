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
