"""Attention over kvtune's ragged cache, registered with transformers' attention and mask interfaces.

transformers builds one mask per forward for all layers, with no head dimension: it cannot describe layers of
different lengths or heads of different lengths. The "kvtune" backend therefore receives the raw 2-D padding mask
and reads each layer's validity from the cache itself, then hands the call to the layer's compression policy,
which sees the queries, keys and (when it asks) the attention every entry received in that very call.

The backend is active only for forwards whose cache is a `KVCache`: `use_kvtune_attention` installs hooks that
switch the model's attention implementation for such a forward and restore it afterwards, so kvtune never changes
what the model computes with any other cache (StaticCache, DynamicCache, none).

`attend` is the one place that attends over a layer (rectangular, masked or causal); `attend_with_received` also
returns the attention each key received, `attend_with_max_received` the most any one query gave it (both in one
pass over the exact probabilities, a block of queries at a time, with the output); `attend_segments` reads a
ragged layer's segments for single queries. A GPU backend replaces these.

Hybrid models: a sliding layer (from the config's ``layer_types``/``sliding_window``, read as transformers'
DynamicCache reads them: `layer_windows`) attends within its window, by position, and keeps only that window
(`RaggedLayer.slide`); policies never see it. Gemma 2's attention logit soft-capping (``softcap``) is applied
wherever logits are formed (`softcapped`): such calls, and windowed prefills, take the SDPA/eager reference path
on every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.masking_utils import AttentionMaskInterface

from kvtune.cache import AttentionCall, KVCache, RaggedLayer
from kvtune.kernels import AttendFn, best_backend

BACKEND = "kvtune"
SUPPORTED_BASES = ("sdpa", "eager")
CACHE_KEYWORDS = ("cache", "past_key_values")  # transformers >= 5.24 names it `cache`; the old name goes in 5.40
RECEIVED_BLOCK_ELEMENTS = 1 << 21  # probabilities held at once by the one-pass attention (8 MB: fastest at 2-8K on CPU)
LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' layer types kvtune attends over
UNSUPPORTED_TERMS = ("s_aux", "sinks", "position_bias")  # attention arguments kvtune does not apply: refused


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
    positions: torch.Tensor | None = None  # [B, H_kv or 1, L] long: absolute position of each entry (see cache)
    softcap: float | None = None  # attention logit soft-capping of the model (Gemma 2), for scores
    max_received: torch.Tensor | None = None  # [B, H_kv, L] fp32: the most attention one query gave each entry

    @property
    def group_size(self) -> int:
        return self.query.shape[1] // self.keys.shape[1]


def _pass_through_mask(attention_mask: torch.Tensor | None = None, **_) -> torch.Tensor | None:
    """The 2-D padding mask, untouched: kvtune's attention reads per-layer validity from the cache."""
    return attention_mask


def allowed_mask(
    valid: torch.Tensor,
    query_length: int,
    rows: int | None = None,
    window: int | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, Hm, rows, L]`` bool for the last ``rows`` (default and at most: all) of ``query_length`` queries: a query
    sees valid keys up to its own position, and always its own key (no empty row).

    ``window`` (a sliding layer's) also hides keys at distance ``>= window`` from the query, by absolute position
    (``positions`` ``[B, H_kv or 1, L]``, padding counted as transformers counts it; default: the column index).
    """
    length = valid.shape[-1]
    rows = query_length if rows is None else min(rows, query_length)
    own = torch.arange(query_length - rows, query_length, device=valid.device)[:, None] + (length - query_length)
    cols = torch.arange(length, device=valid.device)[None, :]
    allowed = (valid[:, :, None, :] & (cols <= own)) | (cols == own)
    if window is not None:
        if positions is None:
            positions = torch.arange(length, device=valid.device)[None, None]
        positions = positions.long()
        allowed = allowed & (positions[:, :, None, :] > positions[:, :, length - rows :, None] - window)
    return allowed


def softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's attention logit soft-capping, as its eager attention computes it (in place; no-op for None)."""
    if softcap is None:
        return logits
    return logits.div_(softcap).tanh_().mul_(softcap)


def _grouped(query: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """``[B, H, q, d]`` -> ``[B, H_kv, group, q, d]`` (a view): GQA without repeating keys or masks."""
    return query.unflatten(1, (heads_kv, -1))


def kernel_for(query: torch.Tensor, valid: torch.Tensor | None) -> AttendFn | None:
    """The GPU kernel for a layer call (`kvtune.kernels.best_backend`: FlashAttention or torch varlen for ragged
    layers, SDPA without a mask for rectangular ones), or None on CPU, where `attend`'s SDPA path is the reference.
    (Soft-capped and windowed calls never get here: the kernels have neither a soft cap nor a position window.)"""
    if not query.is_cuda:
        return None
    return best_backend(query.device, query.dtype, ragged=valid is not None, head_dim=query.shape[-1])


def attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    scaling: float,
    causal: bool = True,
    softcap: float | None = None,
    window: int | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query`` ``[B, H, q, d]`` (the last q positions) over one layer: ``[B, H, q, d]``.

    ``valid`` (``[B, H_kv or 1, L]``) marks real entries; None means all are (no mask at all). A rectangular layer
    gets exactly the SDPA call transformers' own ``sdpa`` backend makes, so its outputs are bit-identical to stock.
    ``softcap`` caps the logits as Gemma 2's eager attention does; ``window`` and ``positions`` restrict each query
    to a sliding window (`allowed_mask`).
    """
    plain = softcap is None and window is None
    kernel = kernel_for(query, valid) if plain else None
    if kernel is not None:
        return kernel(query, keys, values, valid, scaling, causal=causal)
    q_len, length = query.shape[2], keys.shape[2]
    group = query.shape[1] // keys.shape[1]
    if plain and valid is None and (q_len == 1 or q_len == length or not causal):
        return F.scaled_dot_product_attention(
            query, keys, values, attn_mask=None, dropout_p=0.0, scale=scaling, is_causal=causal and q_len > 1,
            enable_gqa=group > 1,
        )  # fmt: skip
    if plain and valid is None:  # a chunk after earlier ones: causal from the bottom right, one [q, L] mask for all
        mask = torch.ones(q_len, length, dtype=torch.bool, device=query.device).tril(length - q_len)
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=group > 1)
    if valid is None:
        valid = torch.ones(query.shape[0], 1, length, dtype=torch.bool, device=query.device)
    if plain and q_len == 1:  # the GQA group's queries as rows against one [B, Hm, 1, L] mask
        packed = query.view(query.shape[0], keys.shape[1], group, query.shape[-1])
        out = F.scaled_dot_product_attention(packed, keys, values, attn_mask=valid[:, :, None, :], scale=scaling)
        return out.view(query.shape[0], -1, 1, values.shape[-1])
    if causal:
        mask = allowed_mask(valid, q_len, window=window, positions=positions)
    else:
        mask = valid[:, :, None, :].expand(-1, -1, q_len, -1)
    if softcap is None and mask.shape[1] == 1:
        # One mask for every head (padding, a window): the call transformers' own `sdpa` backend makes, keys repeated
        # per query head, so that padded batches stay bit-identical to stock whatever the CPU's kernels round.
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling)
    if softcap is None:  # a mask per KV head (ragged heads): repeated per query head, so that SDPA stays 4-D
        mask = mask.repeat_interleave(group, dim=1)  # (a 5-D grouped call took 2.5x as long on CPU)
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=group > 1)
    grouped, keys, values = _grouped(query, keys.shape[1]), keys[:, :, None], values[:, :, None]
    logits = softcapped(torch.matmul(grouped, keys.transpose(3, 4)) * scaling, softcap)
    logits.masked_fill_(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.matmul(probs, values).flatten(1, 2)


def attend_with_received(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention and the attention each key received, summed over the queries (fp32 ``[B, H, L]``).

    On CPU without autograd both come from one pass (`_causal_probabilities`): each block of queries forms its exact
    probabilities once, multiplies them with the values and sums them per key. One 8K-token layer of the embedded
    model then takes 1.5-2.0x SDPA's time, where a second flash pass for the statistic took 2.2-2.7x. Under autograd
    (training) and on a GPU, whose kernels attend faster, the output is `attend`'s and the statistic is computed
    beside it without a graph.
    """
    q_len, length = query.shape[2], keys.shape[2]
    if q_len == 1:  # a decoding step: the probabilities are the received attention
        batch, heads, _, dim = query.shape
        logits = torch.matmul(query.view(batch, keys.shape[1], -1, dim), keys.transpose(2, 3)).mul_(scaling)
        softcapped(logits, softcap)
        if valid is not None:
            logits.masked_fill_(~valid[:, :, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        out = torch.matmul(probs.to(values.dtype), values).view(batch, heads, 1, values.shape[-1])
        return out, probs.view(batch, heads, length)
    if torch.is_grad_enabled() or query.is_cuda:
        out = attend(query, keys, values, valid, scaling, softcap=softcap)
        return out, received_attention(query, keys, valid, scaling, softcap)
    return _attend_reducing(query, keys, values, valid, scaling, softcap, reduce="sum")


@torch.no_grad()  # the reconstruction pass of `kvzip`: scores only, never part of a training graph
def attend_with_max_received(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention and, per KV head, the largest probability any valid query of its GQA group gave each key
    (fp32 ``[B, H_kv, L]``; padding queries give nothing), from the same one pass as `attend_with_received`."""
    return _attend_reducing(query, keys, values, valid, scaling, softcap, reduce="max")


@torch.no_grad()  # a statistic for selection: never part of a training graph
def received_attention(
    query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, scaling: float, softcap: float | None = None
) -> torch.Tensor:
    """Attention each key received from the causal ``query`` (the last q positions; masked as `allowed_mask`),
    summed over the queries: fp32 ``[B, H, L]``. Without the output: for recordings and under autograd."""
    received = torch.zeros(*_grouped(query, keys.shape[1]).shape[:3], keys.shape[2], device=query.device)
    for _, _, probs in _causal_probabilities(query, keys, valid, scaling, softcap):
        received[..., : probs.shape[-1]] += probs.sum(dim=3)
    return received.flatten(1, 2)


@torch.no_grad()  # outputs for a pass that needs no gradient (prefill, kvzip's reconstruction)
def _attend_reducing(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    reduce: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output ``[B, H, q, d]`` (the query's dtype) and, from the same probabilities, per key either their
    sum over the queries (``reduce="sum"``, ``[B, H, L]``) or the largest one a real query of the KV head's group
    gave (``"max"``, ``[B, H_kv, L]``)."""
    batch, heads, q_len, _ = query.shape
    heads_kv, length = keys.shape[1], keys.shape[2]
    out = torch.empty(batch, heads_kv, heads // heads_kv, q_len, values.shape[-1], device=query.device)
    if reduce == "sum":
        stat = torch.zeros(batch, heads_kv, heads // heads_kv, length, device=query.device)
    else:
        stat = torch.zeros(batch, heads_kv, length, device=query.device)
        voting = None if valid is None else valid[:, :, None, -q_len:, None]  # a query votes when it is a real token
    values_f = values.float()
    for start, stop, probs in _causal_probabilities(query, keys, valid, scaling, softcap):
        seen, rows = probs.shape[-1], probs.shape[2] * probs.shape[3]  # the group's queries as rows: no copies
        out[:, :, :, start:stop] = torch.matmul(probs.view(batch, heads_kv, rows, seen), values_f[:, :, :seen]).view(
            batch, heads_kv, -1, stop - start, values.shape[-1]
        )
        if reduce == "sum":
            stat[..., :seen] += probs.sum(dim=3)
            continue
        if voting is not None:
            probs.mul_(voting[:, :, :, start:stop])
        stat[..., :seen] = torch.maximum(stat[..., :seen], probs.amax(dim=(2, 3)))
    return out.flatten(1, 2).to(query.dtype), stat.flatten(1, 2) if reduce == "sum" else stat


def _causal_probabilities(
    query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, scaling: float, softcap: float | None
):
    """Exact fp32 causal attention probabilities, one block of queries at a time: yields ``(start, stop, probs)``
    with ``probs`` ``[B, H_kv, group, stop - start, seen]`` over the keys ``[0, seen)`` the block's queries can see
    (the rest are in their future). At most `RECEIVED_BLOCK_ELEMENTS` probabilities are held at once, so memory
    stays bounded whatever the length. Masks as `allowed_mask`: valid keys up to the query's own position, and
    always its own key."""
    batch, heads, q_len, dim = query.shape
    heads_kv, length = keys.shape[1], keys.shape[2]
    group = heads // heads_kv
    grouped, keys_t = _grouped(query, heads_kv), keys.float().transpose(2, 3).contiguous()  # 1.4x faster products
    rows = max(1, RECEIVED_BLOCK_ELEMENTS // (heads * length))
    offset = length - q_len
    for start in range(0, q_len, rows):
        stop = min(start + rows, q_len)
        count, seen = stop - start, offset + stop  # the block's queries see keys [0, seen)
        block = grouped[:, :, :, start:stop].float().mul(scaling).reshape(batch, heads_kv, group * count, dim)
        logits = softcapped(torch.matmul(block, keys_t[..., :seen]).view(batch, heads_kv, group, count, seen), softcap)
        future = torch.ones(count, count, dtype=torch.bool, device=query.device).triu(1)
        if valid is not None:
            blocked = (~valid[:, :, None, None, :seen]).expand(-1, -1, 1, count, -1).clone()
            blocked[..., seen - count :] &= ~torch.eye(count, dtype=torch.bool, device=query.device)
            blocked[..., seen - count :] |= future
            logits.masked_fill_(blocked, float("-inf"))
        else:
            logits[..., seen - count :].masked_fill_(future, float("-inf"))
        yield start, stop, torch.softmax(logits, dim=-1, out=logits)


def attend_segments(
    query: torch.Tensor, layer: RaggedLayer, scaling: float, softcap: float | None = None
) -> torch.Tensor:
    """Single-query attention over a ragged layer, straight from its flat storage: every query group scores the
    whole buffer and `RaggedLayer.segment_bias` keeps only its own segment. ``[B, H, 1, d]``."""
    batch, heads, _, dim = query.shape
    keys, values = layer._keys, layer._values
    logits = torch.matmul(query.view(batch * layer.heads, heads // layer.heads, dim), keys.t()).mul_(scaling)
    softcapped(logits, softcap).add_(layer.segment_bias()[:, None, :])
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.matmul(probs, values).view(batch, heads, 1, values.shape[-1])


_LAST_MASK: list = [None, 0, None]  # (mask, query length, its padding): every layer of a forward gets the same mask


def _padding_of_new_tokens(attention_mask: torch.Tensor | None, q_len: int) -> torch.Tensor | None:
    """``[B, q]`` validity of this call's tokens, or None when they are all real (checked once per forward)."""
    if attention_mask is None:
        return None
    if _LAST_MASK[0] is not attention_mask or _LAST_MASK[1] != q_len:
        new_valid = attention_mask[:, -q_len:].bool()
        _LAST_MASK[:] = [attention_mask, q_len, None if bool(new_valid.all()) else new_valid]
    return _LAST_MASK[2]


def kvtune_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    kvtune_adapter: torch.nn.Module | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: exact attention over the layer, then the cache's policy (if any).

    ``sliding_window`` and ``softcap`` are what the model's attention module passes for this layer (None for a
    full-attention layer without soft-capping). Learned attention sinks (gpt-oss's ``s_aux``), position biases and
    non-causal attention are refused rather than ignored."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("kvtune attention expects the 2-D padding mask; custom 4-D masks are not supported")
    unsupported = [name for name in UNSUPPORTED_TERMS if kwargs.get(name) is not None]
    if unsupported or kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        what = ", ".join(unsupported) or "is_causal=False"
        raise NotImplementedError(
            f"{type(module).__name__} attends with {what} (learned sinks, a position bias or bidirectional "
            "attention), which kvtune's attention does not apply"
        )
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    q_len = query.shape[2]
    call: AttentionCall | None = getattr(key, "kvtune_call", None)
    if call is None:  # keys that did not come from a KVCache: the 2-D mask covers every key
        valid = None if attention_mask is None else attention_mask[:, None, -key.shape[2] :].bool()
        out = attend(query, key, value, valid, scaling, softcap=softcap, window=sliding_window)
        return out.transpose(1, 2).contiguous(), None
    layer, valid, ragged = call.layer, call.valid, call.ragged
    if layer.sliding_window != sliding_window:
        raise ValueError(
            f"layer {call.layer_idx} of the model attends with sliding_window={sliding_window} but its kvtune cache "
            f"layer has {layer.sliding_window}: make the cache with kvtune.new_cache(model) (it reads the windows)"
        )
    new_valid = _padding_of_new_tokens(attention_mask, q_len)
    if new_valid is not None:
        layer.mark_new_valid(new_valid)
        if not ragged:
            valid = valid.clone() if valid is not None else new_valid.new_ones(key.shape[0], 1, key.shape[2])
            valid[:, :, -q_len:] &= new_valid[:, None, :]
    if sliding_window is not None:  # never compressed: attend within the window, then keep only what stays visible
        if ragged:  # a single query over entries that all lie inside its window (`RaggedLayer.slide`)
            out = attend_segments(query, layer, scaling, softcap)
        else:
            beyond = key.shape[2] > sliding_window or (q_len > 1 and _spans_window(call, layer))
            window = sliding_window if beyond else None
            out = attend(query, key, value, valid, scaling, softcap=softcap, window=window, positions=call.positions)
        layer.slide()
        return out.transpose(1, 2).contiguous(), None
    cache = call.cache
    policy = cache.policy if cache is not None else None
    compressing = policy is not None and q_len > 1 and cache.prefilling
    acting = compressing or (policy is not None and q_len == 1 and policy.acts_on_decode_step(call))
    view = None
    if acting:
        view = layer.dense()  # views for uniform layers; a ragged layer is copied once for its policy
        if ragged:
            key, value, valid, ragged = view.keys, view.values, view.valid, False
    received = most = None
    if ragged:
        out = attend_segments(query, layer, scaling, softcap)
    elif acting and (policy.needs_column_scores or (q_len == 1 and getattr(policy, "reads_decode_attention", False))):
        out, received = attend_with_received(query, key, value, valid, scaling, softcap)
    elif compressing and getattr(policy, "needs_max_received", False):
        out, most = attend_with_max_received(query, key, value, valid, scaling, softcap)
    else:
        out = attend(query, key, value, valid, scaling, softcap=softcap)
    if acting:
        ctx = LayerContext(
            layer_idx=call.layer_idx,
            num_layers=len(cache.layers),
            layer=layer,
            cache=cache,
            query=query,
            keys=key,
            values=value,
            valid=valid if valid is not None else view.valid,
            aux=view.aux,
            column_scores=received,
            scaling=scaling,
            adapter=kvtune_adapter,
            positions=view.positions,
            softcap=softcap,
            max_received=most,
        )
        (policy.on_prefill if compressing else policy.on_decode)(ctx)
    return out.transpose(1, 2).contiguous(), None


def _spans_window(call: AttentionCall, layer: RaggedLayer) -> bool:
    """Whether some query of this call is further than the window from some key it is handed."""
    return layer.seen_tokens - int(call.positions.min()) > layer.sliding_window


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
            "Qwen2/3, Gemma 2/3, Phi3-style models)."
        )
    layer_windows(model)
    return modules


def layer_windows(model: PreTrainedModel) -> list[int | None]:
    """Each decoder layer's sliding window (None: full attention), read from the config exactly as transformers'
    `DynamicCache(config=...)` reads it (``layer_types``, else a ``sliding_window`` on every layer: Mistral, Qwen2's
    ``use_sliding_window``/``max_window_layers``). Other layer kinds (chunked, linear, shared-KV) are refused."""
    config = model.config.get_text_config(decoder=True)
    kinds, kwargs = get_layer_types_and_kwargs(config)
    unsupported = sorted(set(kinds) - set(LAYER_TYPES))
    if unsupported:
        raise NotImplementedError(
            f"{type(model).__name__} (model_type={getattr(config, 'model_type', '?')}) has {', '.join(unsupported)} "
            f"layers; kvtune attends over {' and '.join(LAYER_TYPES)} layers only"
        )
    return [kw["sliding_window"] if kind == "sliding_attention" else None for kind, kw in zip(kinds, kwargs)]


def _forward_cache(kwargs: dict) -> object | None:
    return next((kwargs[k] for k in CACHE_KEYWORDS if kwargs.get(k) is not None), None)


def _switch_on(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the decoder: kvtune's backend for a `KVCache`, the model's own for anything else."""
    config = module.config
    saved = module.__dict__.setdefault("_kvtune_saved", [])
    saved.append(config._attn_implementation)
    if isinstance(_forward_cache(kwargs), KVCache):
        if saved[-1] not in SUPPORTED_BASES:
            raise NotImplementedError(
                f"kvtune's CPU attention replaces {SUPPORTED_BASES}; the model runs '{saved[-1]}'"
            )  # fmt: skip
        config._attn_implementation = BACKEND


def _switch_back(module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
    module.config._attn_implementation = module._kvtune_saved.pop()


def use_kvtune_attention(model: PreTrainedModel) -> None:
    """Make forwards with a `KVCache` attend through kvtune's backend (idempotent).

    Nothing else changes: the decoder's hooks set the attention implementation for the duration of each forward
    whose cache is a `KVCache` and put the model's own back afterwards, so the same model still computes exactly
    what transformers computes with its own caches (also inside `kvtune.compress`, and after it).
    """
    attention_modules(model)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if decoder.__dict__.get("_kvtune_switch"):
        return
    current = decoder.config._attn_implementation
    if current not in SUPPORTED_BASES:
        raise NotImplementedError(
            f"kvtune's CPU attention replaces {SUPPORTED_BASES}; the model was loaded with '{current}'"
        )
    decoder.register_forward_pre_hook(_switch_on, with_kwargs=True)
    decoder.register_forward_hook(_switch_back, with_kwargs=True, always_call=True)
    decoder._kvtune_switch = True
