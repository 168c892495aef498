"""kvtune's right-aligned dense layer view as the packed sequences that varlen attention kernels take.

Varlen kernels (FlashAttention-2's ``flash_attn_varlen_func``, torch's ``varlen_attn``) attend over sequences
concatenated along the token axis and delimited by cumulative offsets (``cu_seqlens``). kvtune's heads may hold
different numbers of entries (Ada-KV), so every (batch row, KV head) becomes its own sequence: one KV head, and the
``H / H_kv`` query heads of its GQA group as that sequence's query heads (the kernel's own GQA). Only valid entries
take part, so padding and holes cost nothing and no mask is ever built.

Causality needs no offsets of its own: the kernels align the causal diagonal bottom-right (query ``i`` of ``n_q``
sees keys up to ``i + n_k - n_q``). Keeping only valid queries, and only valid keys, makes that alignment exact for
any validity pattern, because this call's valid tokens are the last valid keys of their sequence.

Two key layouts:

* gathered: the valid entries are copied out (``keys[valid]``), ``cu_k`` is their running count. Works for any
  pattern and under autograd (LoCoCo's chunk training).
* in place: when each (b, h) holds a contiguous suffix of valid entries (right alignment, ragged heads, left
  padding) and the view's rows are evenly strided, the keys are read where they lie: sequence ``i`` starts at its
  first valid row and the kernel's ``seqused_k[i]`` says how many rows it has. No copy of the cache per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VarlenPack:
    """The arguments of one varlen kernel call (``N = B * H_kv`` sequences, ordered by (b, h)).

    ``queries`` is ``[T_q, group, d]``, ``keys``/``values`` ``[T_k, 1, d]``; ``cu_q``/``cu_k`` are int32 ``[N + 1]``.
    ``seqused_k`` (int32 ``[N]``) is set for the in-place layout only. ``query_valid`` (``[B, H_kv, q]``) says which
    query rows were packed; None when all were. ``max_q``/``max_k`` are upper bounds (read without a device sync).
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    seqused_k: torch.Tensor | None
    query_valid: torch.Tensor | None
    shape: tuple[int, int, int, int]  # the query's [B, H, q, d_v]


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    """``[0, l0, l0 + l1, ...]`` as int32, the kernels' ``cu_seqlens``."""
    return torch.nn.functional.pad(lengths.flatten().cumsum(0), (1, 0)).to(torch.int32)


def is_suffix(valid: torch.Tensor) -> bool:
    """Whether every (b, h) row of ``valid`` (``[B, H, L]``) is a run of False followed by a run of True."""
    length = valid.shape[-1]
    counts = valid.sum(dim=-1, keepdim=True)
    return bool((valid == (torch.arange(length, device=valid.device) >= length - counts)).all())


def _row_view(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``keys``/``values`` (``[B, H, L, d]``) as ``[R, 1, d]`` views over their storage, with each (b, h)'s first
    row ``[B, H]``; None when the views' rows are not evenly strided (then the caller gathers)."""
    batch, heads, length, dim = keys.shape
    s_b, s_h, s_l, s_d = keys.stride()
    if values.stride()[:3] != keys.stride()[:3] or s_d != 1 or values.stride(-1) != 1:
        return None
    if s_l < max(dim, values.shape[-1]) or s_b % s_l or s_h % s_l:
        return None
    rows = ((batch - 1) * s_b + (heads - 1) * s_h) // s_l + length
    key_rows = keys.as_strided((rows, 1, dim), (s_l, dim, 1))
    value_rows = values.as_strided((rows, 1, values.shape[-1]), (s_l, values.shape[-1], 1))
    device = keys.device
    starts = (torch.arange(batch, device=device)[:, None] * s_b + torch.arange(heads, device=device) * s_h) // s_l
    return key_rows, value_rows, starts


def pack(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    in_place: bool = True,
) -> VarlenPack:
    """Pack one layer call (shapes as in `kvtune.kernels.attend_ragged`) for a varlen kernel.

    ``in_place=False`` forces the gathered layout (kernels without ``seqused_k``, or when gradients must flow).
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    if valid is None:
        valid = torch.ones(batch, 1, length, dtype=torch.bool, device=keys.device)
    valid = valid.expand(batch, kv_heads, length)
    key_lengths = valid.sum(dim=-1)  # [B, H_kv]
    query_valid = valid[:, :, length - q_len :]
    # One query per sequence: pack every row (no sync; FA2's decode path wants exactly one query per sequence)
    all_queries = q_len == 1 or bool(query_valid.all())
    # [B, H_kv, group, q, d] -> [B, H_kv, q, group, d]: a sequence's query rows with its group as heads
    grouped = query.view(batch, kv_heads, group, q_len, dim).transpose(2, 3)
    if all_queries:
        queries = grouped.reshape(batch * kv_heads * q_len, group, dim)
        cu_q = torch.arange(0, batch * kv_heads * q_len + 1, q_len, dtype=torch.int32, device=query.device)
    else:
        queries = grouped[query_valid]
        cu_q = _offsets(query_valid.sum(dim=-1))
    rows = _row_view(keys, values) if in_place and is_suffix(valid) else None
    if rows is not None:
        key_rows, value_rows, starts = rows
        first = (starts + length - key_lengths).flatten()
        cu_k = torch.cat([first, first.new_tensor([key_rows.shape[0]])]).to(torch.int32)
        seqused_k = key_lengths.flatten().to(torch.int32)
    else:
        key_rows, value_rows = keys[valid][:, None], values[valid][:, None]
        cu_k, seqused_k = _offsets(key_lengths), None
    return VarlenPack(
        queries=queries,
        keys=key_rows,
        values=value_rows,
        cu_q=cu_q,
        cu_k=cu_k,
        max_q=q_len,
        max_k=length,
        seqused_k=seqused_k,
        query_valid=None if all_queries else query_valid,
        shape=(batch, heads, q_len, values.shape[-1]),
    )


def unpack(out: torch.Tensor, packed: VarlenPack) -> torch.Tensor:
    """The kernel's ``[T_q, group, d_v]`` output back to ``[B, H, q, d_v]``; rows that were not packed are zero."""
    batch, heads, q_len, dim = packed.shape
    group = out.shape[1]
    if packed.query_valid is None:
        grouped = out.view(batch, heads // group, q_len, group, dim)
    else:
        grouped = out.new_zeros(batch, heads // group, q_len, group, dim)
        grouped[packed.query_valid] = out
    return grouped.transpose(2, 3).reshape(batch, heads, q_len, dim)
