"""Real behaviour on the embedded SmolLM2: memory really shrinks, compression beats chance, passkeys are found."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kvtune
from kvtune.eval.corpus import stdlib_text
from kvtune.eval.tasks import build_task
from kvtune.replay import RecordedPrefill

pytestmark = pytest.mark.slow
SCORED = ["h2o", "snapkv", "pyramidkv", "adakv_snapkv", "adakv_pyramidkv", "kvmerger", "lighttransfer"]


CONTEXT, TARGET, TEXTS, BYTES_TEXT = 3500, 256, 5, 3


def _ids(tokenizer, text, n):
    ids = tokenizer(text).input_ids
    assert len(ids) >= n, "text too short"
    return torch.tensor([ids[:n]])


def _record(model, tokenizer, index):
    """A full prefill of stdlib text ``index``'s first CONTEXT tokens, ready for any method; and the TARGET after it."""
    ids = _ids(tokenizer, stdlib_text(index), CONTEXT + TARGET)
    context, target = ids[:, :CONTEXT], ids[:, CONTEXT:]
    return RecordedPrefill(model, context, torch.ones_like(context)), target


@pytest.fixture(scope="module")
def bytes_text(embedded):
    """Text BYTES_TEXT's recording: one of the perplexity test's five, and the bytes test's replay (one prefill)."""
    model, tokenizer = embedded
    return _record(model, tokenizer, BYTES_TEXT)


def test_cache_bytes_shrink_with_the_budget(embedded, bytes_text):
    model, _ = embedded
    recorded, _ = bytes_text
    ids = recorded.input_ids
    mask = torch.ones_like(ids)
    full_bytes = recorded.cache.nbytes()
    assert full_bytes >= 30 * 2 * 3 * CONTEXT * 64 * 4  # the uncompressed cache really holds every entry
    limit = 1.1 * 256 / CONTEXT * full_bytes
    for method in ("snapkv", "adakv_snapkv"):
        replayed = recorded.compress(method, budget=256)
        assert replayed.nbytes() <= limit, method
    # the live path (compress while prefilling) stores exactly what the replay stores
    with torch.no_grad(), kvtune.compress(model, "adakv_snapkv", budget=256):
        live = model(ids, use_cache=True, logits_to_keep=1).past_key_values
    assert live.nbytes() == recorded.compress("adakv_snapkv", budget=256).nbytes() <= limit
    assert len({int(n) for lengths in live.lengths() for n in lengths.flatten()}) > 1  # ragged heads
    chunked = kvtune.new_cache(model, kvtune.methods.build("adakv_snapkv", budget=256))
    kvtune.prefill(model, chunked, ids, mask, chunk=1024)
    assert chunked.nbytes() <= limit


def _nll(model, cache, context_logits, target):
    """Mean NLL of ``target`` (``[1, T]``) continuing the context through ``cache``."""
    seen = cache.get_seq_length()
    positions = torch.arange(seen, seen + target.shape[1] - 1)[None]
    with torch.no_grad():
        out = model(input_ids=target[:, :-1], position_ids=positions, past_key_values=cache, use_cache=True)
    logits = torch.cat([context_logits[:, None], out.logits], dim=1)[0]
    return F.cross_entropy(logits.float(), target[0]).item()


def test_perplexity_full_best_and_scored_methods_beat_random(embedded, bytes_text):
    model, tokenizer = embedded
    methods = ["full", "random", *SCORED]
    nll = {m: [] for m in methods}
    for index in range(TEXTS):
        recorded, target = bytes_text if index == BYTES_TEXT else _record(model, tokenizer, index)
        for method in methods:
            cache = recorded.compress(method, budget=None if method == "full" else 512)
            nll[method].append(_nll(model, cache, recorded.logits, target))
    mean = {m: sum(v) / len(v) for m, v in nll.items()}
    print("mean NLL of the next 256 tokens:", {m: round(v, 4) for m, v in mean.items()})
    for method in methods[1:]:
        assert mean["full"] <= mean[method] + 1e-6, (method, mean)
    for method in SCORED:
        assert mean[method] <= mean["random"], (method, mean)


def test_full_cache_retrieves_ten_passkeys(embedded):
    model, tokenizer = embedded
    task = build_task("passkey")
    samples = task.samples(tokenizer, 3500, 10, seed=0)  # keys at depths 5%, 15%, ..., 95%
    answers = []
    for start in range(0, 10, 5):
        batch = samples[start : start + 5]
        answers += kvtune.generate(
            model,
            tokenizer,
            [s.context for s in batch],
            question=batch[0].question,
            answer_prefix=batch[0].answer_prefix,
            max_new_tokens=6,
        )
    assert [task.score(a, s) for a, s in zip(answers, samples)] == [1.0] * 10, answers
