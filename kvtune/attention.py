"""Attention over kvtune's ragged cache, registered with transformers' attention and mask interfaces.

transformers builds one mask per forward for all layers, with no head dimension: it cannot describe layers of
different lengths or heads of different lengths. The "kvtune" backend therefore receives the raw 2-D padding mask
and builds each layer's mask itself from the cache's validity, then hands the call to the layer's compression
policy, which sees the queries, keys and (when it asks) attention probabilities of that very call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from kvtune.cache import AttentionCall, KVCache, RaggedLayer

BACKEND = "kvtune"
SUPPORTED_BASES = ("sdpa", "eager")
QUERY_BLOCK = 512  # queries per block when probabilities are materialised


@dataclass
class LayerContext:
    """One layer's attention call, as a compression policy sees it (dense, right-aligned; see `kvtune.cache`)."""

    layer_idx: int
    num_layers: int
    layer: RaggedLayer
    cache: KVCache
    query: torch.Tensor  # [B, H, q, d], after RoPE
    keys: torch.Tensor  # [B, H_kv, L, d], the last q positions are this call's tokens
    values: torch.Tensor
    valid: torch.Tensor  # [B, H_kv or 1, L] bool
    aux: torch.Tensor | None  # [B, H_kv, L] per-entry statistic, when the layer keeps one
    column_scores: torch.Tensor | None  # [B, H, L] attention received, summed over this call's queries
    scaling: float
    adapter: torch.nn.Module | None = None  # a trained compressor of this layer (LoCoCo), when the model has one

    @property
    def group_size(self) -> int:
        return self.query.shape[1] // self.keys.shape[1]


def _pass_through_mask(attention_mask: torch.Tensor | None = None, **_) -> torch.Tensor | None:
    """The 2-D padding mask, untouched: kvtune's attention builds per-layer masks itself."""
    return attention_mask


def allowed_mask(valid: torch.Tensor, query_length: int) -> torch.Tensor:
    """``[B, Hm, q, L]`` bool: a query sees valid keys up to its own position, and always its own key (no empty row)."""
    length = valid.shape[-1]
    rows = torch.arange(query_length, device=valid.device)[:, None] + (length - query_length)
    cols = torch.arange(length, device=valid.device)[None, :]
    return (valid[:, :, None, :] & (cols <= rows)) | (cols == rows)


def _expand_heads(mask: torch.Tensor, group: int) -> torch.Tensor:
    return mask if mask.shape[1] == 1 else mask.repeat_interleave(group, dim=1)


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, scaling: float):
    """Masked GQA attention through SDPA: ``[B, H, q, d]``."""
    group = query.shape[1] // keys.shape[1]
    return F.scaled_dot_product_attention(
        query, keys, values, attn_mask=_expand_heads(allowed, group), scale=scaling, enable_gqa=group > 1
    )


@torch.no_grad()  # a statistic for selection: never part of a training graph
def received_attention(query: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention each key receives, summed over the queries: ``[B, H, L]`` (fp32).

    Computed apart from the output, over query blocks, so that at most one block of probabilities exists at a time
    and the output stays bit-identical to the SDPA path.
    """
    group = query.shape[1] // keys.shape[1]
    keys_h = keys.float().repeat_interleave(group, dim=1).transpose(2, 3)
    received = query.new_zeros(*query.shape[:2], keys.shape[2], dtype=torch.float32)
    for start in range(0, query.shape[2], QUERY_BLOCK):
        block = slice(start, start + QUERY_BLOCK)
        logits = torch.matmul(query[:, :, block].float(), keys_h) * scaling
        logits = logits.masked_fill(~_expand_heads(allowed[:, :, block], group), float("-inf"))
        received += logits.softmax(dim=-1).sum(dim=2)
    return received


def kvtune_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    kvtune_adapter: torch.nn.Module | None = None,
    **_,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: exact masked attention, then the cache's policy (if any) for this layer."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("kvtune attention expects the 2-D padding mask; custom 4-D masks are not supported")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    q_len, length = query.shape[2], key.shape[2]
    call: AttentionCall | None = getattr(key, "kvtune_call", None)
    new_valid = attention_mask[:, -q_len:] if attention_mask is not None else None
    if call is None:  # an ordinary cache (or none): the 2-D mask covers every key
        valid = (
            attention_mask[:, None, -length:]
            if attention_mask is not None
            else torch.ones(query.shape[0], 1, length, dtype=torch.bool, device=query.device)
        )
    else:
        valid = call.valid
        if new_valid is not None and not bool(new_valid.all()):
            call.layer.mark_new_valid(new_valid)
            valid = valid.clone()
            valid[:, :, -q_len:] &= new_valid[:, None, :]
    policy = call.cache.policy if call is not None and call.cache is not None else None
    compressing = policy is not None and q_len > 1 and call.cache.prefilling
    wants_scores = policy is not None and policy.needs_column_scores and (compressing or q_len == 1)
    allowed = allowed_mask(valid, q_len)
    out = attend(query, key, value, allowed, scaling)
    received = received_attention(query, key, allowed, scaling) if wants_scores else None
    if policy is not None and (compressing or q_len == 1):
        ctx = LayerContext(
            layer_idx=call.layer_idx,
            num_layers=len(call.cache.layers),
            layer=call.layer,
            cache=call.cache,
            query=query,
            keys=key,
            values=value,
            valid=valid,
            aux=call.aux,
            column_scores=received,
            scaling=scaling,
            adapter=kvtune_adapter,
        )
        (policy.on_prefill if compressing else policy.on_decode)(ctx)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(BACKEND, kvtune_attention)
AttentionMaskInterface.register(BACKEND, _pass_through_mask)


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, or a clear error naming the unsupported architecture."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(base, "layers", None)
    modules = [getattr(layer, "self_attn", None) for layer in layers] if layers is not None else []
    if not modules or any(m is None or not hasattr(m, "layer_idx") for m in modules):
        raise NotImplementedError(
            f"kvtune cannot hook the attention of {type(model).__name__} "
            f"(model_type={getattr(model.config, 'model_type', '?')}): it needs decoder layers with a `self_attn` "
            "module that calls `past_key_values.update` and transformers' attention interface (Llama, Mistral, "
            "Qwen2/3, Phi3-style models)."
        )
    if getattr(model.config, "sliding_window", None) and getattr(model.config, "use_sliding_window", True):
        raise NotImplementedError(f"{type(model).__name__} uses sliding-window layers, which kvtune does not hook yet")
    return modules


def use_kvtune_attention(model: PreTrainedModel) -> None:
    """Route the model's attention through kvtune's backend (idempotent).

    The switch outlives `kvtune.compress` on purpose: a compressed cache handed back to the user needs this backend
    to be read correctly, and with ordinary caches the backend computes the same attention as SDPA.
    """
    attention_modules(model)
    current = model.config._attn_implementation
    if current == BACKEND:
        return
    if current not in SUPPORTED_BASES:
        raise NotImplementedError(
            f"kvtune's CPU attention replaces {SUPPORTED_BASES}; the model was loaded with '{current}'"
        )
    model.set_attn_implementation(BACKEND)
