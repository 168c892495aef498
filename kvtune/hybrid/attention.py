"""The ``kvtune_hybrid`` attention backend: a plan's lazy layers attend to sinks + a sliding window, the rest fully.

Registered with transformers' `AttentionInterface`, so any Llama-style model runs as a hybrid by switching its
attention implementation: the function reads the layer's streaming setting from the attention module it is called
for (set by `apply_plan` from the plan's lazy layers, by ``module.layer_idx``). Masks are built from shapes alone,
per call, with keys right-aligned to the queries; this holds for a full sequence, for chunked continuation and for
`SinkWindowLayer`'s truncated cache, whose entries are the sinks followed by a contiguous recent run.

- CPU: SDPA with a boolean band mask (plus the sink columns) built per call; full layers use SDPA's causal path.
- CUDA: PyTorch's bundled FlashAttention-2 (`torch.nn.attention.varlen.varlen_attn`) with ``window_size`` for the
  band, never a materialised T x T mask; at inference sinks are attended separately (a ``q x sinks`` block) and
  merged through the log-sum-exp of both parts. Training with sinks runs compiled ``flex_attention`` with a block
  mask (sinks + band) instead, whose backward is exact (FlashAttention's log-sum-exp output carries no gradient).

Window semantics are transformers' ``sliding_window``: a query sees keys at distance ``< window``, itself included.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface

from kvtune.attention import attention_modules
from kvtune.hybrid.plan import LayerPlan

BACKEND = "kvtune_hybrid"
STREAMING_ATTR = "kvtune_streaming"


@dataclass(frozen=True)
class Streaming:
    """What one lazy layer attends to: the first ``sinks`` tokens and the keys at distance ``< window``."""

    window: int
    sinks: int


def streaming_mask(query_length: int, key_length: int, streaming: Streaming | None, device=None) -> torch.Tensor:
    """``[q, L]`` bool: causal (right-aligned) and, for a lazy layer, inside the window or on a sink."""
    rows = torch.arange(query_length, device=device)[:, None] + (key_length - query_length)
    cols = torch.arange(key_length, device=device)[None, :]
    distance = rows - cols
    allowed = distance >= 0
    if streaming is not None:
        allowed &= (distance < streaming.window) | (cols < streaming.sinks)
    return allowed


def _check_padding(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise NotImplementedError("kvtune's hybrid attention takes unpadded batches (the attention mask has zeros)")


def _sdpa(query, key, value, streaming: Streaming | None, scaling: float, dropout: float) -> torch.Tensor:
    q_len, k_len = query.shape[2], key.shape[2]
    sees_all = q_len == 1 and (streaming is None or k_len <= streaming.window + streaming.sinks)
    mask, causal = None, False
    if streaming is None and q_len == k_len:
        causal = q_len > 1
    elif not sees_all:
        mask = streaming_mask(q_len, k_len, streaming, query.device)
    group = query.shape[1] // key.shape[1]
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scaling, enable_gqa=group > 1
    )


def sink_merge(
    window_out: torch.Tensor, window_lse: torch.Tensor, query, key, value, streaming: Streaming, scaling: float
) -> torch.Tensor:
    """Add the sink keys a windowed attention left out, through the log-sum-exp of both parts.

    ``window_out`` is ``[B, H, q, d]`` and ``window_lse`` ``[B, H, q]`` (natural log) of attention restricted to the
    window; sinks already inside a query's window are not counted twice.
    """
    sinks = min(streaming.sinks, key.shape[2])
    group = query.shape[1] // key.shape[1]
    sink_keys = key[:, :, :sinks].float().repeat_interleave(group, dim=1)
    sink_values = value[:, :, :sinks].float().repeat_interleave(group, dim=1)
    logits = torch.matmul(query.float(), sink_keys.transpose(2, 3)) * scaling
    q_len, k_len = query.shape[2], key.shape[2]
    rows = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
    outside = rows - torch.arange(sinks, device=query.device)[None, :] >= streaming.window
    logits = logits.masked_fill(~outside, float("-inf"))
    sink_lse = torch.logsumexp(logits, dim=-1)
    weights = torch.exp(logits - sink_lse[..., None]).nan_to_num(0.0)
    sink_out = torch.matmul(weights, sink_values)
    total = torch.logaddexp(window_lse.float(), sink_lse)
    keep_window = torch.exp(window_lse.float() - total)[..., None]
    keep_sinks = torch.exp(sink_lse - total)[..., None].nan_to_num(0.0)
    return (window_out.float() * keep_window + sink_out * keep_sinks).to(window_out.dtype)


@lru_cache(maxsize=64)
def _block_mask(query_length: int, key_length: int, window: int, sinks: int, device: str):
    """flex_attention's block-sparse mask of a streaming layer (built once per shape, never dense)."""
    from torch.nn.attention.flex_attention import create_block_mask

    offset = key_length - query_length

    def streaming_mod(batch, head, q_idx, kv_idx):
        distance = q_idx + offset - kv_idx
        return (distance >= 0) & ((distance < window) | (kv_idx < sinks))

    return create_block_mask(streaming_mod, None, None, query_length, key_length, device=device)


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_streaming(query, key, value, streaming: Streaming, scaling: float, compiled: bool = True) -> torch.Tensor:
    """Sinks + band attention through ``flex_attention`` (``[B, H, q, d]``): exact forward and backward."""
    from torch.nn.attention.flex_attention import flex_attention

    mask = _block_mask(query.shape[2], key.shape[2], streaming.window, streaming.sinks, str(query.device))
    attend = _compiled_flex() if compiled else flex_attention
    group = query.shape[1] // key.shape[1]
    return attend(query, key, value, block_mask=mask, scale=scaling, enable_gqa=group > 1)


def _cuda(query, key, value, streaming: Streaming | None, scaling: float) -> torch.Tensor:
    """FlashAttention-2 through ``varlen_attn``: causal, bottom-right aligned, ``window_size=(window - 1, 0)``."""
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    flat_q = query.transpose(1, 2).reshape(batch * q_len, heads, dim)
    flat_k = key.transpose(1, 2).reshape(batch * k_len, kv_heads, dim)
    flat_v = value.transpose(1, 2).reshape(batch * k_len, kv_heads, dim)
    cu_q = torch.arange(0, (batch + 1) * q_len, q_len, device=query.device, dtype=torch.int32)
    cu_k = torch.arange(0, (batch + 1) * k_len, k_len, device=query.device, dtype=torch.int32)
    window = (-1, 0) if streaming is None else (streaming.window - 1, 0)
    with_sinks = streaming is not None and streaming.sinks > 0 and k_len > streaming.window
    if with_sinks and torch.is_grad_enabled() and query.requires_grad:
        return flex_streaming(query, key, value, streaming, scaling).transpose(1, 2)
    result = varlen_attn(
        flat_q,
        flat_k,
        flat_v,
        cu_q,
        cu_k,
        q_len,
        k_len,
        scale=scaling,
        window_size=window,
        enable_gqa=heads != kv_heads,
        return_aux=AuxRequest(lse=True) if with_sinks else None,
    )
    if not with_sinks:
        return result.view(batch, q_len, heads, dim)
    out, lse = result
    out = out.view(batch, q_len, heads, dim).transpose(1, 2)
    lse = lse.view(batch, q_len, heads).transpose(1, 2)
    return sink_merge(out, lse, query, key, value, streaming, scaling).transpose(1, 2)


def hybrid_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **_,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: streaming attention on the module's lazy layer, full causal otherwise."""
    _check_padding(attention_mask)
    streaming: Streaming | None = getattr(module, STREAMING_ATTR, None)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if query.is_cuda:
        return _cuda(query, key, value, streaming, scaling), None
    return _sdpa(query, key, value, streaming, scaling, dropout).transpose(1, 2).contiguous(), None


def _pass_through_mask(attention_mask: torch.Tensor | None = None, **_) -> torch.Tensor | None:
    """The 2-D padding mask, untouched: the hybrid backend builds each layer's mask from shapes."""
    return attention_mask


AttentionInterface.register(BACKEND, hybrid_attention)
AttentionMaskInterface.register(BACKEND, _pass_through_mask)


def apply_plan(model: PreTrainedModel, plan: LayerPlan, model_id: str | None = None) -> PreTrainedModel:
    """Make ``model`` (or a PEFT wrapper around it) the plan's hybrid: lazy layers stream, the others stay full."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    plan.check_model(base, model_id)
    lazy = set(plan.lazy_layers)
    for module in attention_modules(base):
        setattr(module, STREAMING_ATTR, Streaming(plan.window, plan.sinks) if module.layer_idx in lazy else None)
    base.set_attn_implementation(BACKEND)
    base.kvtune_plan = plan
    return model


@contextmanager
def planned(model: PreTrainedModel, plan: LayerPlan) -> Iterator[PreTrainedModel]:
    """``model`` as the plan's hybrid inside the block, as it was after: `kvtune bench` measures the stock model and
    its hybrid with the same weights in one run."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    implementation = base.config._attn_implementation
    streaming = {module: getattr(module, STREAMING_ATTR, None) for module in attention_modules(base)}
    previous_plan = getattr(base, "kvtune_plan", None)
    apply_plan(model, plan)
    try:
        yield model
    finally:
        for module, setting in streaming.items():
            setattr(module, STREAMING_ATTR, setting)
        base.set_attn_implementation(implementation)
        base.kvtune_plan = previous_plan


def load_hybrid(model: PreTrainedModel, folder: str | Path) -> PreTrainedModel:
    """A trained hybrid from its adapter folder (``RUN/adapter``: LoRA plus ``plan.json``), LoRA merged."""
    from peft import PeftModel

    folder = Path(folder)
    plan = LayerPlan.load(folder / "plan.json")
    plan.check_model(model)
    merged = PeftModel.from_pretrained(model, folder).merge_and_unload()
    return apply_plan(merged, plan).eval()


class SinkWindowLayer(DynamicLayer):
    """A cache layer that keeps the first ``sinks`` entries and the last ``window - 1`` (fresh tensors, so that the
    dropped entries' storage is really freed); the next query adds itself to reach ``sinks + window`` keys."""

    def __init__(self, window: int, sinks: int) -> None:
        super().__init__()
        self.window, self.sinks, self.cumulative_length = window, sinks, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        keep = self.sinks + self.window - 1
        if keys.shape[-2] > keep:
            recent = slice(keys.shape[-2] - (self.window - 1), None)
            self.keys = torch.cat([keys[..., : self.sinks, :], keys[..., recent, :]], dim=-2)
            self.values = torch.cat([values[..., : self.sinks, :], values[..., recent, :]], dim=-2)
        else:
            self.keys, self.values = keys, values
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = 0 if not self.is_initialized else self.keys.shape[-2]
        return stored + query_length, 0


def hybrid_cache(model: PreTrainedModel) -> Cache:
    """A cache for ``model`` after `apply_plan`: lazy layers keep sinks + window, full layers everything."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    plan: LayerPlan = base.kvtune_plan
    lazy = set(plan.lazy_layers)
    layers = [SinkWindowLayer(plan.window, plan.sinks) if i in lazy else DynamicLayer() for i in range(plan.num_layers)]
    return Cache(layers=layers)


def cache_storage_bytes(cache: Cache) -> list[int]:
    """Bytes each layer's key and value tensors hold, counted by storage (deduplicated), not by numel."""
    sizes = []
    for layer in cache.layers:
        seen: dict[int, int] = {}
        for tensor in (layer.keys, layer.values):
            if tensor is not None and tensor.numel():
                storage = tensor.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        sizes.append(sum(seen.values()))
    return sizes
