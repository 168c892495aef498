"""`kvtune.attention`'s CPU paths against attention written out: the one-pass received attention (H2O, KVMerger)
and the mask of a chunk that follows earlier entries."""

import pytest
import torch

import kvtune.attention
from kvtune.attention import allowed_mask, attend, attend_with_received, received_attention

HKV, GROUP, DIM = 2, 3, 8


def _inputs(batch: int, q_len: int, length: int, seed: int = 0):
    torch.manual_seed(seed)
    query = torch.randn(batch, HKV * GROUP, q_len, DIM)
    return query, torch.randn(batch, HKV, length, DIM), torch.randn(batch, HKV, length, DIM)


def _written_out(query, keys, values, valid, scaling, softcap=None):
    """Softmax of the masked (soft-capped) logits, keys repeated per query head: output and column sums."""
    logits = torch.matmul(query, keys.repeat_interleave(GROUP, dim=1).transpose(2, 3)) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if valid is None:
        valid = torch.ones(query.shape[0], 1, keys.shape[2], dtype=torch.bool)
    probs = logits.masked_fill(~allowed_mask(valid, query.shape[2]), float("-inf")).softmax(dim=-1)
    return torch.matmul(probs, values.repeat_interleave(GROUP, dim=1)), probs.sum(dim=2)


CASES = {
    "one-shot": dict(batch=1, q_len=29, length=29, padded=False, softcap=None),
    "a later chunk": dict(batch=1, q_len=11, length=40, padded=False, softcap=None),
    "padded batch": dict(batch=2, q_len=13, length=37, padded=True, softcap=None),
    "soft-capped": dict(batch=2, q_len=17, length=17, padded=True, softcap=5.0),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_received_attention_comes_with_the_output(case, grad, monkeypatch):
    """Output and attention received per key, from several blocks of queries (a small block forces 4+ of them), equal
    the written-out softmax; under autograd the output keeps its graph and the statistic has none."""
    spec = CASES[case]
    monkeypatch.setattr(kvtune.attention, "RECEIVED_BLOCK_ELEMENTS", 4 * HKV * GROUP * spec["length"])
    query, keys, values = _inputs(spec["batch"], spec["q_len"], spec["length"])
    valid = None
    if spec["padded"]:
        valid = torch.ones(spec["batch"], 1, spec["length"], dtype=torch.bool)
        valid[1, :, :4] = False  # left padding
    query.requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out, received = attend_with_received(query, keys, values, valid, 0.3, softcap=spec["softcap"])
    expected_out, expected_received = _written_out(query.detach(), keys, values, valid, 0.3, spec["softcap"])
    assert torch.allclose(out, expected_out, atol=1e-5)
    assert torch.allclose(received, expected_received, atol=1e-5)
    assert (out.grad_fn is not None) == grad and received.grad_fn is None
    alone = received_attention(query.detach(), keys, valid, 0.3, spec["softcap"])  # the recordings' statistic
    assert torch.allclose(alone, expected_received, atol=1e-5)


def test_a_later_chunk_attends_as_its_explicit_mask_says():
    """A chunk after earlier entries, with nothing padded, goes through one bottom-right causal ``[q, L]`` mask and
    GQA; it sees exactly what `allowed_mask` allows (every earlier entry, and itself up to its own position)."""
    query, keys, values = _inputs(2, 7, 30)
    explicit = attend(query, keys, values, torch.ones(2, 1, 30, dtype=torch.bool), 0.3)
    assert torch.allclose(attend(query, keys, values, None, 0.3), explicit, atol=1e-6)
    assert torch.allclose(
        attend(query, keys, values, None, 0.3), _written_out(query, keys, values, None, 0.3)[0], atol=1e-5
    )
