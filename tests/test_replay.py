"""A recorded prefill compressed afterwards keeps exactly what live compression during the prefill keeps."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import kvtune
from kvtune.replay import RecordedPrefill

METHODS = [m for m in kvtune.methods.training_free() if "+" not in m and m != "full"] + ["lighttransfer+adakv_snapkv"]
EXTRA_KWARGS = {"kvzip": {"prompt": [5, 11, 17]}}  # the tiny model has no tokenizer to spell the prompt with


def _padded_batch(lengths, vocab=97, seed=0):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), width), generator=generator)
    mask = torch.stack([torch.arange(width) >= width - n for n in lengths]).long()
    return ids * mask, mask


def _same_cache(a, b):
    for left, right in zip(a.layers, b.layers, strict=True):
        dense_a, dense_b = left.dense(), right.dense()
        assert torch.equal(dense_a.valid.expand_as(dense_b.valid), dense_b.valid.expand_as(dense_a.valid))
        keep = dense_a.valid.expand(-1, dense_a.keys.shape[1], -1)
        assert torch.allclose(dense_a.keys[keep], dense_b.keys[keep], atol=1e-6)
        assert torch.allclose(dense_a.values[keep], dense_b.values[keep], atol=1e-6)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=4)


@pytest.mark.parametrize("keep_queries", [None, 40])
@pytest.mark.parametrize("method", METHODS)
def test_replay_matches_live_compression(model, method, keep_queries):
    ids, mask = _padded_batch([90, 64, 77])
    kwargs = {"budget": 24, "window": 8, **EXTRA_KWARGS.get(method, {})}
    live = kvtune.new_cache(model, kvtune.methods.build(method, **kwargs))
    kvtune.prefill(model, live, ids, mask)
    replayed = RecordedPrefill(model, ids, mask, keep_queries=keep_queries).compress(method, **kwargs)
    _same_cache(live, replayed)
    assert replayed.nbytes() == live.nbytes()


def test_truncated_recording_refuses_a_longer_window(model):
    ids, mask = _padded_batch([60])
    recorded = RecordedPrefill(model, ids, mask, keep_queries=16)
    with pytest.raises(ValueError, match="last 32 queries"):
        recorded.compress("snapkv", budget=24)
