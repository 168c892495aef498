"""kvtune.kernels: every attention backend against one plain fp32 reference, on the layouts kvtune produces.

The CUDA varlen kernels cannot run here, so the varlen backends are driven on CPU by a reference varlen kernel
(per-sequence softmax over the packed rows, with FlashAttention's bottom-right causal alignment and window rule):
the packing arithmetic (cu_seqlens, GQA groups as heads, in-place rows with seqused_k, dropped padding queries)
is verified exactly; the kernels themselves are compared in the `gpu` tests at the end.
Tolerances: fp32 on CPU 1e-5; bf16 on GPU 2e-2 (bf16 keeps 8 bits of mantissa); fp32 on GPU 1e-4.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import varlen as torch_varlen

from kvtune.kernels import (
    BACKENDS,
    attend_ragged,
    best_backend,
    installed_kernels,
    masked_sdpa,
    pack,
    rectangular_sdpa,
    unpack,
)
from kvtune.kernels.backends import FLASH_ATTN_VARLEN, TORCH_VARLEN, VarlenBackend

ATOL_FP32 = 1e-5


# ---- references -----------------------------------------------------------------------------------------------------
def reference_attention(query, keys, values, valid, scaling, causal=True, window=None):
    """The contract, written out one (batch row, query head, query) at a time in fp32. Padding queries give NaN."""
    batch, heads, q_len, _ = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    valid = valid.expand(batch, kv_heads, length)
    out = torch.full((*query.shape[:3], values.shape[-1]), float("nan"))
    for b in range(batch):
        for h in range(heads):
            kv = h // (heads // kv_heads)
            for t in range(q_len):
                position = length - q_len + t
                if not valid[b, kv, position]:
                    continue
                seen = [j for j in range(length) if valid[b, kv, j] and (j <= position or not causal)]
                if window is not None:
                    seen = [j for j in seen if j <= position][-window:]
                logits = keys[b, kv, seen].float() @ query[b, h, t].float() * scaling
                out[b, h, t] = logits.softmax(dim=0) @ values[b, kv, seen].float()
    return out


def reference_varlen(q, k, v, cu_q, cu_k, scale, left, right, seqused_k=None):
    """A CPU stand-in for FlashAttention's varlen kernel: ``left``/``right`` window (-1: unbounded), the diagonal
    aligned bottom-right, keys of sequence i at ``cu_k[i]`` for ``seqused_k[i]`` rows (else up to ``cu_k[i+1]``)."""
    outs = []
    for i in range(cu_q.numel() - 1):
        qs = q[int(cu_q[i]) : int(cu_q[i + 1])]
        start = int(cu_k[i])
        stop = start + int(seqused_k[i]) if seqused_k is not None else int(cu_k[i + 1])
        ks, vs = k[start:stop], v[start:stop]
        n_q, n_k = qs.shape[0], ks.shape[0]
        group = qs.shape[1] // ks.shape[1]
        logits = torch.einsum("qhd,khd->hqk", qs.float(), ks.float().repeat_interleave(group, dim=1)) * scale
        diagonal = torch.arange(n_q)[:, None] + n_k - n_q
        cols = torch.arange(n_k)[None, :]
        allowed = torch.ones(n_q, n_k, dtype=torch.bool)
        if left >= 0:
            allowed &= cols >= diagonal - left
        if right >= 0:
            allowed &= cols <= diagonal + right
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        outs.append(torch.einsum("hqk,khd->qhd", probs, vs.float().repeat_interleave(group, dim=1)).to(q.dtype))
    return torch.cat(outs)


class ReferenceKernel:
    """A `VarlenKernel` running `reference_varlen`; ``in_place`` says whether it accepts ``seqused_k``."""

    def __init__(self, in_place: bool) -> None:
        self.supports_seqused_k = in_place
        self.calls = []

    def __call__(self, packed, scale, causal, window):
        self.calls.append(packed)
        left = -1 if window is None else window - 1
        right = 0 if causal or window is not None else -1
        return reference_varlen(
            packed.queries, packed.keys, packed.values, packed.cu_q, packed.cu_k, scale, left, right, packed.seqused_k
        )


# ---- layouts ----------------------------------------------------------------------------------------------------
def suffix_valid(lengths: list[list[int]], length: int) -> torch.Tensor:
    """``[B, H, L]`` validity with ``lengths[b][h]`` right-aligned entries."""
    n = torch.tensor(lengths)
    return torch.arange(length) >= (length - n)[..., None]


def tensors(batch=2, heads=6, kv_heads=2, q_len=4, length=11, dim=16, seed=0, dtype=torch.float32, capacity=0):
    """Random q/k/v; with ``capacity`` the keys/values are a slice of larger buffers (spare room, strided rows)."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, q_len, dim, generator=generator).to(dtype)
    buffers = [torch.randn(batch, kv_heads, length + capacity, dim, generator=generator).to(dtype) for _ in "kv"]
    keys, values = (b[:, :, capacity:] for b in buffers)
    return query, keys, values


# Each case: (name, kv_heads, q_len, length, validity); validity may be [B, 1, L] (padding) or [B, H_kv, L] (ragged).
CASES = [
    ("ragged heads, decode", 2, 1, 11, suffix_valid([[11, 3], [7, 1]], 11)),
    ("ragged heads, chunk", 2, 4, 11, suffix_valid([[11, 5], [9, 4]], 11)),
    ("left padding, first chunk", 2, 8, 8, suffix_valid([[8], [5]], 8)),
    ("left padding, chunk after cache", 2, 4, 10, suffix_valid([[10], [6]], 10)),
    ("mha, ragged", 6, 3, 9, suffix_valid([[9, 4, 3, 5, 6, 7], [3, 3, 8, 9, 4, 5]], 9)),
    ("rectangular prefill", 2, 7, 7, torch.ones(2, 1, 7, dtype=torch.bool)),
    ("rectangular chunk", 2, 3, 9, torch.ones(2, 1, 9, dtype=torch.bool)),
    ("a row all padding", 2, 3, 9, suffix_valid([[9], [0]], 9)),
    ("decode, a row all padding", 2, 1, 9, suffix_valid([[9], [0]], 9)),
]


def holes() -> torch.Tensor:
    """Kept entries, then a left-padded appended tail: invalid entries in the middle (`kvtune.api.append_tails`)."""
    valid = suffix_valid([[9, 6], [8, 8]], 12)
    valid[0, :, 9] = False  # row 0's tail was padded by one token
    valid[1, :, 8:10] = False
    return valid


def assert_matches(out, expected, atol=ATOL_FP32):
    rows = ~expected.isnan().any(dim=-1)
    torch.testing.assert_close(out.float()[rows], expected[rows], atol=atol, rtol=atol)
    assert out.isfinite().all()


# ---- CPU tests --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_masked_sdpa_is_the_contract(case, window):
    _, kv_heads, q_len, length, valid = case
    query, keys, values = tensors(kv_heads=kv_heads, q_len=q_len, length=length)
    expected = reference_attention(query, keys, values, valid, 0.3, window=window)
    assert_matches(masked_sdpa(query, keys, values, valid, 0.3, window=window), expected)


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_varlen_packing_matches_the_reference(case, window, in_place):
    _, kv_heads, q_len, length, valid = case
    query, keys, values = tensors(kv_heads=kv_heads, q_len=q_len, length=length)
    kernel = ReferenceKernel(in_place)
    out = VarlenBackend(kernel)(query, keys, values, valid, 0.3, window=window)
    assert_matches(out, reference_attention(query, keys, values, valid, 0.3, window=window))
    (packed,) = kernel.calls
    assert (packed.seqused_k is not None) == in_place
    assert packed.cu_q.dtype == packed.cu_k.dtype == torch.int32
    assert packed.queries.shape[1:] == (query.shape[1] // kv_heads, query.shape[-1])  # the group as heads
    assert packed.keys.shape[1] == 1  # one KV head per sequence


def test_in_place_rows_read_the_cache_where_it_lies():
    """Keys in a buffer with spare room: the packed keys alias the buffer, and sequences start at their first valid
    row (cu_k) with seqused_k rows each."""
    query, keys, values = tensors(q_len=2, length=6, capacity=5)
    valid = suffix_valid([[6, 2], [4, 3]], 6)
    packed = pack(query, keys, values, valid)
    assert packed.keys.untyped_storage().data_ptr() == keys.untyped_storage().data_ptr()
    assert packed.seqused_k.tolist() == [6, 2, 4, 3]
    row = keys.stride(2)
    slot = [(b * keys.stride(0) + h * keys.stride(1)) // row for b in range(2) for h in range(2)]
    assert packed.cu_k[:-1].tolist() == [s + 6 - n for s, n in zip(slot, [6, 2, 4, 3])]
    for i, n in enumerate(packed.seqused_k.tolist()):
        start = int(packed.cu_k[i])
        torch.testing.assert_close(packed.keys[start : start + n, 0], keys[i // 2, i % 2, 6 - n :], rtol=0, atol=0)
    out = VarlenBackend(ReferenceKernel(True))(query, keys, values, valid, 0.25)
    assert_matches(out, reference_attention(query, keys, values, valid, 0.25))


def test_holes_are_gathered_and_exact():
    """Invalid entries between kept ones: no suffix, so the valid entries are gathered (cu_k is their count)."""
    valid = holes()
    query, keys, values = tensors(q_len=2, length=12)
    kernel = ReferenceKernel(True)
    out = VarlenBackend(kernel)(query, keys, values, valid, 0.3)
    assert kernel.calls[0].seqused_k is None
    assert kernel.calls[0].cu_k.tolist() == [0, 8, 13, 19, 25]
    assert_matches(out, reference_attention(query, keys, values, valid, 0.3))
    assert_matches(masked_sdpa(query, keys, values, valid, 0.3), reference_attention(query, keys, values, valid, 0.3))


def test_padding_queries_are_dropped_and_zero():
    query, keys, values = tensors(q_len=5, length=5)
    valid = suffix_valid([[5], [2]], 5)
    kernel = ReferenceKernel(True)
    out = VarlenBackend(kernel)(query, keys, values, valid, 0.3)
    assert kernel.calls[0].cu_q.tolist() == [0, 5, 10, 12, 14]
    assert (out[1, :, :3] == 0).all()


def test_unpack_inverts_pack_on_queries():
    query, keys, values = tensors(q_len=3, length=9)
    valid = suffix_valid([[9], [2]], 9)
    packed = pack(query, keys, values, valid)
    back = unpack(packed.queries, packed)  # the identity "kernel": queries out where they came from
    rows = torch.tensor([[True] * 3, [False, True, True]])[:, None, :, None]
    torch.testing.assert_close(back, torch.where(rows, query, torch.zeros_like(query)), rtol=0, atol=0)


def test_gradients_flow_through_the_gathered_layout():
    """LoCoCo's chunk training attends with gradients: the backend gathers, and gradients match the reference's."""
    query, keys, values = tensors(q_len=4, length=11)
    valid = suffix_valid([[11, 5], [9, 4]], 11)
    grads = []
    for backend in (VarlenBackend(ReferenceKernel(True)), masked_sdpa):
        leaves = [t.clone().requires_grad_() for t in (query, keys, values)]
        backend(*leaves, valid, 0.3).sum().backward()
        grads.append([t.grad for t in leaves])
    for mine, reference in zip(*grads):
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_len,length", [(7, 7), (3, 9), (1, 9)])
def test_rectangular_sdpa_needs_no_mask(q_len, length):
    query, keys, values = tensors(q_len=q_len, length=length)
    valid = torch.ones(2, 1, length, dtype=torch.bool)
    expected = reference_attention(query, keys, values, valid, 0.3)
    assert_matches(rectangular_sdpa(query, keys, values, None, 0.3), expected)
    assert_matches(attend_ragged(query, keys, values, valid, 0.3), expected)


def _fake_varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10's signature: a causal flag, the default scale, no window, no seqused_k."""
    return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, query.shape[-1] ** -0.5, -1, 0 if is_causal else -1)


def _fake_varlen_2_13(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
    enable_gqa=False, seqused_k=None, block_table=None, num_splits=None,
):  # fmt: skip
    """torch 2.13's signature: causality as window (-1, 0), GQA refused unless enable_gqa."""
    if not enable_gqa and query.shape[1] != key.shape[1]:
        raise ValueError("Expect query and key/value to have the same number of heads")
    left, right = window_size
    return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, scale, left, right, seqused_k)


@pytest.mark.parametrize("fake", [_fake_varlen_2_10, _fake_varlen_2_13], ids=["torch2.10", "torch2.13"])
@pytest.mark.parametrize("q_len", [1, 4])
def test_torch_varlen_adapter_speaks_each_signature(fake, q_len, monkeypatch):
    monkeypatch.setattr(torch_varlen, "varlen_attn", fake)
    query, keys, values = tensors(q_len=q_len, length=11)
    valid = suffix_valid([[11, 5], [9, 4]], 11)
    out = TORCH_VARLEN(query, keys, values, valid, 0.3)
    assert_matches(out, reference_attention(query, keys, values, valid, 0.3))
    assert TORCH_VARLEN.kernel.supports_seqused_k == (fake is _fake_varlen_2_13)


def test_torch_2_10_refuses_a_window(monkeypatch):
    monkeypatch.setattr(torch_varlen, "varlen_attn", _fake_varlen_2_10)
    query, keys, values = tensors(q_len=2, length=6)
    with pytest.raises(NotImplementedError, match="window_size"):
        TORCH_VARLEN(query, keys, values, None, 0.3, window=3)
    # ... and the selector never picks it for a window
    assert best_backend("cuda", torch.bfloat16, True, window=3, kernels={"torch_varlen"}) is masked_sdpa


def test_best_backend_choices():
    cuda_all = {"sdpa_masked", "sdpa_rectangular", "torch_varlen", "flash_attn_varlen"}
    assert best_backend("cpu", torch.float32, ragged=False) is rectangular_sdpa
    assert best_backend("cpu", torch.bfloat16, ragged=True) is masked_sdpa
    assert best_backend("cuda", torch.float32, ragged=True, kernels=cuda_all) is masked_sdpa  # FA needs 16 bits
    assert best_backend("cuda", torch.bfloat16, ragged=True, kernels=cuda_all) is TORCH_VARLEN  # reads in place
    assert best_backend("cuda", torch.bfloat16, True, kernels={"flash_attn_varlen"}) is FLASH_ATTN_VARLEN
    assert best_backend("cuda", torch.bfloat16, True, head_dim=12, kernels=cuda_all) is masked_sdpa
    assert best_backend("cuda", torch.bfloat16, False, window=64, kernels=cuda_all) is TORCH_VARLEN
    assert set(BACKENDS) == cuda_all
    assert installed_kernels("cpu") == {"sdpa_masked", "sdpa_rectangular"}  # varlen kernels are CUDA-only


def test_scaling_is_honoured():
    """Scale is passed through (not the default d ** -0.5)."""
    query, keys, values = tensors(q_len=2, length=6)
    default = masked_sdpa(query, keys, values, None, 1 / math.sqrt(query.shape[-1]))
    assert not torch.allclose(default, masked_sdpa(query, keys, values, None, 0.9))


def test_kvtune_layouts_through_the_varlen_packing(monkeypatch):
    """kvtune's own layouts (chunked prefill of a padded batch, Ada-KV heads, a left-padded question appended after
    compression, decode) give the same logits and answers through the varlen packing as through the masked path.

    `kvtune.attention.kernel_for` is made to pick the varlen backend (with a CPU reference kernel) for ragged calls."""
    from conftest import tiny_llama

    import kvtune.attention
    from kvtune.api import append_tails, greedy, new_cache, prefill
    from kvtune.methods import build

    model = tiny_llama()
    ids = torch.randint(1, 97, (3, 60), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(60) >= torch.tensor([[0], [19], [7]])).long()

    def answer(method, varlen):
        kernel = ReferenceKernel(True)

        def kernel_for(query, valid):  # what a CUDA device would pick for ragged layers, on CPU
            return VarlenBackend(kernel) if valid is not None and varlen else None

        monkeypatch.setattr(kvtune.attention, "kernel_for", kernel_for)
        cache = new_cache(model, build(method, budget=16))
        with torch.no_grad():
            logits, seen = prefill(model, cache, ids, mask, chunk=24)
            cache.prefilling = False
            logits, seen = append_tails(model, cache, [[5, 6, 7], [8], [9, 10]], seen, logits, 0)
            return logits, greedy(model, cache, logits, seen, 3, None), kernel.calls

    (reference, reference_answer, _), (logits, answer_, calls) = (
        answer("adakv_snapkv", False),
        answer("adakv_snapkv", True),
    )
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    assert answer_ == reference_answer
    assert {p.seqused_k is None for p in calls} == {True, False}  # holes gathered, suffixes read in place


# ---- GPU tests ----------------------------------------------------------------------------------------------------
def gpu_only(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


GPU_CASES = [*CASES, ("holes", 2, 2, 12, holes())]


def _on_gpu(case, dtype, dim=64):
    _, kv_heads, q_len, length, valid = case
    query, keys, values = tensors(kv_heads=kv_heads, q_len=q_len, length=length, dim=dim, capacity=3)
    expected = reference_attention(query, keys, values, valid, dim**-0.5)
    moved = [t.to("cuda", dtype) for t in (query, keys, values)]
    return moved, valid.cuda(), expected


@gpu_only
@pytest.mark.parametrize("name", ["torch_varlen", "flash_attn_varlen"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_varlen_kernels_on_gpu(name, case, window, grad):
    if name not in installed_kernels("cuda"):
        pytest.skip(f"{name} is not installed")
    (query, keys, values), valid, _ = _on_gpu(case, torch.bfloat16)
    if name == "torch_varlen" and window is not None and not TORCH_VARLEN.kernel.supports_window:
        pytest.skip("this torch's varlen_attn has no window")
    expected = reference_attention(query.cpu(), keys.cpu(), values.cpu(), valid.cpu(), 0.125, window=window)
    with torch.set_grad_enabled(grad):
        if grad:
            query.requires_grad_()
        out = BACKENDS[name](query, keys, values, valid, 0.125, window=window)
    assert_matches(out.detach().cpu(), expected, atol=2e-2)


@gpu_only
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_sdpa_backends_on_gpu(case, dtype, atol):
    (query, keys, values), valid, expected = _on_gpu(case, dtype)
    assert_matches(masked_sdpa(query, keys, values, valid, 64**-0.5).cpu(), expected, atol=atol)
    assert_matches(attend_ragged(query, keys, values, valid, 64**-0.5).cpu(), expected, atol=atol)
    if bool(valid.all()):
        assert_matches(rectangular_sdpa(query, keys, values, None, 64**-0.5).cpu(), expected, atol=atol)


@gpu_only
def test_best_backend_on_this_gpu_is_a_varlen_kernel():
    assert best_backend("cuda", torch.bfloat16, ragged=True) in (TORCH_VARLEN, FLASH_ATTN_VARLEN)
