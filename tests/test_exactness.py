"""With a budget at least as long as the context, every method must reproduce transformers' DynamicCache."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy_logits
from transformers import DynamicCache

import kvtune
from kvtune.eval.corpus import stdlib_text

METHODS = [m for m in kvtune.methods.training_free() if "+" not in m] + ["lighttransfer+adakv_snapkv"]
TOLERANCE = 1e-4


def _batch(tokenizer, lengths):
    rows = [tokenizer(stdlib_text(i)).input_ids[:n] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.fixture(scope="module")
def references(embedded, stock_embedded):
    _, tokenizer = embedded
    cases = {"batch1": _batch(tokenizer, [180]), "padded3": _batch(tokenizer, [150, 97, 120])}
    with torch.no_grad():
        return {
            name: (ids, mask, greedy_logits(stock_embedded, ids, mask, DynamicCache(config=stock_embedded.config)))
            for name, (ids, mask) in cases.items()
        }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["batch1", "padded3"])
@pytest.mark.parametrize("method", METHODS)
def test_uncompressed_methods_match_dynamic_cache(embedded, references, method, case):
    model, _ = embedded
    ids, mask, expected = references[case]
    budget = None if method == "full" else 4096
    with torch.no_grad(), kvtune.compress(model, method, budget=budget):
        got = greedy_logits(model, ids, mask, cache=None)
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected)):
        diff = (a - b).abs().max().item()
        assert diff <= TOLERANCE, f"{method} {case} step {step}: max abs diff {diff}"


@pytest.mark.slow
def test_kvtune_attention_matches_sdpa_on_plain_cache(embedded, references):
    """The backend kvtune installs also computes stock attention for a transformers DynamicCache."""
    model, _ = embedded
    kvtune.api.use_kvtune_attention(model)
    ids, mask, expected = references["padded3"]
    with torch.no_grad():
        got = greedy_logits(model, ids, mask, DynamicCache(config=model.config))
    assert max((a - b).abs().max().item() for a, b in zip(got, expected)) <= TOLERANCE
