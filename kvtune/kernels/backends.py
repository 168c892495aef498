"""The attention backends behind kvtune's per-layer call, one contract for all (see `AttendFn`).

* ``sdpa_masked``: SDPA over a boolean mask built from the validity. Any device, dtype and layout; the reference.
* ``sdpa_rectangular``: SDPA with no mask at all, for layers where every entry is valid: ``is_causal`` when the
  queries are the whole sequence, torch's ``causal_lower_right`` bias for a chunk after a cache (both reach the
  FlashAttention/memory-efficient kernels on CUDA in fp16/bf16).
* ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's bundled FlashAttention-2, CUDA only),
  whose signature changed across releases: 2.10 takes ``is_causal`` and no scale; later ones take ``scale`` and a
  ``window_size`` that also expresses causality, and (2.13) ``enable_gqa`` and ``seqused_k``.
* ``flash_attn_varlen``: ``flash_attn.flash_attn_varlen_func`` when the optional flash-attn package is installed.

The varlen backends serve ragged heads (Ada-KV), padded batches and holes; see `kvtune.kernels.packing`.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import cache
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kvtune.kernels.packing import VarlenPack, pack, unpack

HALF = (torch.float16, torch.bfloat16)  # what FlashAttention kernels take
MAX_FLASH_HEAD_DIM = 256


class AttendFn(Protocol):
    """One layer's attention over kvtune's right-aligned dense view.

    ``query`` ``[B, H, q, d]``; ``keys``/``values`` ``[B, H_kv, L, d]``, the last ``q`` positions being this call's
    tokens; ``valid`` ``[B, H_kv or 1, L]`` bool (None: all valid). A query sees the valid keys at or before its own
    position (every valid key when ``causal=False``), at most the ``window`` most recent of them (counted in valid
    entries, its own included; the position window when there are no holes; a window implies ``causal``).
    Returns ``[B, H, q, d]``; rows of padding queries (own entry invalid) are finite but unspecified.
    """

    def __call__(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        valid: torch.Tensor | None,
        scaling: float,
        *,
        causal: bool = True,
        window: int | None = None,
    ) -> torch.Tensor: ...


def _group(query: torch.Tensor, keys: torch.Tensor) -> int:
    return query.shape[1] // keys.shape[1]


def visible_mask(valid: torch.Tensor, query_length: int, causal: bool = True, window: int | None = None):
    """``[B, H_kv or 1, q, L]`` bool: which keys each query sees under `AttendFn`'s rule (own key always, so no row
    is empty)."""
    length = valid.shape[-1]
    rows = torch.arange(query_length, device=valid.device)[:, None] + (length - query_length)
    cols = torch.arange(length, device=valid.device)[None, :]
    allowed = valid[:, :, None, :]
    if causal:
        allowed = allowed & (cols <= rows)
    if window is not None:
        rank = valid.cumsum(dim=-1)  # 1-based index among valid entries
        allowed = allowed & (rank[:, :, None, :] > rank[:, :, -query_length:, None] - window)
    return allowed | (cols == rows)


def masked_sdpa(query, keys, values, valid, scaling, *, causal=True, window=None) -> torch.Tensor:
    """The reference backend: SDPA with the mask of `visible_mask`."""
    causal = causal or window is not None
    if valid is None:
        valid = torch.ones(keys.shape[0], 1, keys.shape[2], dtype=torch.bool, device=keys.device)
    group = _group(query, keys)
    mask = visible_mask(valid, query.shape[2], causal, window)
    if mask.shape[1] > 1:
        mask = mask.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=group > 1)


def rectangular_sdpa(query, keys, values, valid, scaling, *, causal=True, window=None) -> torch.Tensor:
    """Every entry valid (``valid`` is not read): SDPA with no materialised mask."""
    if window is not None:
        raise ValueError("sdpa_rectangular has no sliding window; use a varlen backend or sdpa_masked")
    q_len, length = query.shape[2], keys.shape[2]
    enable_gqa = _group(query, keys) > 1
    if not causal or q_len == 1 or q_len == length:  # a single query sees every key: no causal structure left
        causal = causal and q_len > 1
        return F.scaled_dot_product_attention(
            query, keys, values, is_causal=causal, scale=scaling, enable_gqa=enable_gqa
        )
    bias = causal_lower_right(q_len, length)  # a chunk after cached entries: the diagonal ends at the last key
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=bias, scale=scaling, enable_gqa=enable_gqa)


class VarlenKernel(Protocol):
    """A varlen kernel over a `VarlenPack`; returns ``[T_q, group, d_v]``."""

    @property
    def supports_seqused_k(self) -> bool: ...

    def __call__(self, packed: VarlenPack, scale: float, causal: bool, window: int | None) -> torch.Tensor: ...


@cache
def _parameters(function: Callable) -> frozenset[str]:
    return frozenset(inspect.signature(function).parameters)


class TorchVarlen:
    """``torch.nn.attention.varlen.varlen_attn``, called with the arguments its installed release takes."""

    @staticmethod
    def _function() -> Callable:
        from torch.nn.attention import varlen

        return varlen.varlen_attn

    @property
    def supports_seqused_k(self) -> bool:
        return "seqused_k" in _parameters(self._function())

    @property
    def supports_window(self) -> bool:
        return "window_size" in _parameters(self._function())

    def __call__(self, packed: VarlenPack, scale: float, causal: bool, window: int | None) -> torch.Tensor:
        function = self._function()
        parameters = _parameters(function)
        queries, kwargs = packed.queries, {}
        if "window_size" in parameters:  # causality is window (-1, 0); a sliding window is (W - 1, 0)
            left = -1 if window is None else window - 1
            kwargs["window_size"] = (left, 0) if causal or window is not None else (-1, -1)
        elif window is not None:
            raise NotImplementedError("this torch's varlen_attn has no window_size; use flash_attn_varlen")
        else:
            kwargs["is_causal"] = causal
        if "scale" in parameters:
            kwargs["scale"] = scale
        else:  # the kernel scales by d ** -0.5: fold the rest into the queries
            queries = queries * (scale * queries.shape[-1] ** 0.5)
        if "enable_gqa" in parameters:
            kwargs["enable_gqa"] = queries.shape[1] != packed.keys.shape[1]
        if packed.seqused_k is not None:
            kwargs["seqused_k"] = packed.seqused_k
        return function(
            queries, packed.keys, packed.values, packed.cu_q, packed.cu_k, packed.max_q, packed.max_k, **kwargs
        )


class FlashAttnVarlen:
    """``flash_attn.flash_attn_varlen_func`` (flash-attn 2.x, an optional extra: source build needing nvcc)."""

    supports_seqused_k = False
    supports_window = True

    def __call__(self, packed: VarlenPack, scale: float, causal: bool, window: int | None) -> torch.Tensor:
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            packed.queries,
            packed.keys,
            packed.values,
            packed.cu_q,
            packed.cu_k,
            packed.max_q,
            packed.max_k,
            softmax_scale=scale,
            causal=causal,
            window_size=(-1, -1) if window is None else (window - 1, 0),
        )


@dataclass(frozen=True)
class VarlenBackend:
    """An `AttendFn` over a varlen kernel: pack, call, unpack.

    Keys are read in place (``seqused_k``) when the kernel allows it and no gradient must flow through them (torch
    marks ``seqused_k`` inference-only); otherwise the valid entries are gathered first.
    """

    kernel: VarlenKernel

    def __call__(self, query, keys, values, valid, scaling, *, causal=True, window=None) -> torch.Tensor:
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (query, keys, values))
        packed = pack(query, keys, values, valid, in_place=self.kernel.supports_seqused_k and not training)
        # One query per sequence sees all its keys anyway; without the causal flag FA2 folds the group into rows.
        causal = causal and packed.max_q > 1
        return unpack(self.kernel(packed, scaling, causal, window), packed)


TORCH_VARLEN = VarlenBackend(TorchVarlen())
FLASH_ATTN_VARLEN = VarlenBackend(FlashAttnVarlen())
BACKENDS: dict[str, AttendFn] = {
    "sdpa_masked": masked_sdpa,
    "sdpa_rectangular": rectangular_sdpa,
    "torch_varlen": TORCH_VARLEN,
    "flash_attn_varlen": FLASH_ATTN_VARLEN,
}


def installed_kernels(device: torch.device | str) -> frozenset[str]:
    """The backends that can run on ``device`` in this environment."""
    names = {"sdpa_masked", "sdpa_rectangular"}
    if torch.device(device).type == "cuda":
        if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
            names.add("torch_varlen")
        if importlib.util.find_spec("flash_attn") is not None:
            names.add("flash_attn_varlen")
    return frozenset(names)


def best_backend(
    device: torch.device | str,
    dtype: torch.dtype,
    ragged: bool,
    window: int | None = None,
    head_dim: int = 128,
    kernels: Collection[str] | None = None,
) -> AttendFn:
    """The fastest backend for a layer call.

    ``ragged``: some entry of the view is invalid (Ada-KV heads, padding, holes). Rectangular layers without a
    window need no mask at all. Ragged ones go to a varlen kernel on CUDA in fp16/bf16 (torch's when it reads keys
    in place, else flash-attn's, which also slides windows), and to the masked reference everywhere else.
    """
    kernels = installed_kernels(device) if kernels is None else frozenset(kernels)
    if not ragged and window is None:
        return rectangular_sdpa
    flash_ready = torch.device(device).type == "cuda" and dtype in HALF and head_dim % 8 == 0
    if flash_ready and head_dim <= MAX_FLASH_HEAD_DIM:
        torch_ok = "torch_varlen" in kernels and (window is None or TORCH_VARLEN.kernel.supports_window)
        if torch_ok and TORCH_VARLEN.kernel.supports_seqused_k:
            return TORCH_VARLEN
        if "flash_attn_varlen" in kernels:
            return FLASH_ATTN_VARLEN
        if torch_ok:
            return TORCH_VARLEN
    return masked_sdpa


def attend_ragged(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    scaling: float,
    causal: bool = True,
    window: int | None = None,
) -> torch.Tensor:
    """`AttendFn` through `best_backend` (one device sync to tell rectangular from ragged; callers that know it
    already call `best_backend` themselves)."""
    ragged = valid is not None and not bool(valid.all())
    backend = best_backend(query.device, query.dtype, ragged, window, query.shape[-1])
    return backend(query, keys, values, valid, scaling, causal=causal, window=window)
