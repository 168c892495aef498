"""Save a compressed `KVCache` to safetensors and load it back: compress a long context once, ask about it later.

The file holds, per layer, only the entries the cache kept, flat (``[N, head_dim]`` ordered by batch row, KV head,
position) with their absolute positions (sliding layers' windows are kept by position) and a ``[B, H_kv]`` length
table: ragged, no padding stored. The metadata records how the cache was
made (method, budget, ratio), the model and tokenizer it belongs to, and each layer's ``seen_tokens``. A cache made
by `kvtune.compress_context` also carries its `ContextState` (the 2-D mask seen so far, which fixes the positions of
follow-up tokens, and the last logits), so that `kvtune.generate` can answer from the loaded cache exactly as from
the original. A loaded cache has no policy: it only appends.
"""

from __future__ import annotations

import copy
import hashlib
import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvtune.cache import DenseView, KVCache, Selection
from kvtune.validation import UserError

FORMAT = "kvtune-cache"
VERSION = "1"
STRUCTURE = ("model_type", "num_layers", "num_kv_heads", "head_dim", "vocab_size", "dtype")  # must match to load


@dataclass
class ContextState:
    """What a follow-up needs besides the entries: the ``[B, T]`` attention mask seen so far (follow-up positions
    continue from its row sums) and the last position's logits ``[B, vocab]`` (the first answer token when nothing
    is appended)."""

    mask: torch.Tensor
    logits: torch.Tensor


def model_fingerprint(model: PreTrainedModel) -> dict[str, Any]:
    """Shape of the cache this model writes, plus a hash of a strided sample of its weights (fine-tunes differ)."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    # plain local tensors only: offloaded (meta), sharded (FSDP DTensor) and ZeRO-3 placeholder weights are not read
    params = [p for p in model.parameters() if type(p.data) is torch.Tensor and p.device.type != "meta" and p.numel()]
    digest = hashlib.sha256()
    for param in (params[0], params[len(params) // 2], params[-1]) if params else ():
        flat = param.detach().flatten()
        digest.update(flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu().numpy().tobytes())
    return {
        "model_type": config.model_type,
        "name_or_path": str(getattr(model.config, "_name_or_path", "")),
        "num_layers": config.num_hidden_layers,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "vocab_size": config.vocab_size,
        "dtype": str(model.dtype).removeprefix("torch."),
        "weights_sha256": digest.hexdigest()[:16] if params else None,  # None: not readable here, not compared
    }


_tokenizer_hashes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The tokenizer's name and a hash of its vocabulary (token -> id), cached per tokenizer object and size."""
    size = len(tokenizer)
    cached = _tokenizer_hashes.get(tokenizer)
    if cached is None or cached[0] != size:
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
        cached = (size, hashlib.sha256(vocab.encode()).hexdigest()[:16])
        _tokenizer_hashes[tokenizer] = cached
    return {"name_or_path": str(tokenizer.name_or_path), "vocab_size": size, "vocab_sha256": cached[1]}


def copy_cache(cache: KVCache) -> KVCache:
    """An independent copy (its tensors are copied: appending to either never shows in the other) that shares the
    original's policy object; policies keep per-cache state in ``cache.policy_state``, which is copied."""
    return copy.deepcopy(cache, memo={id(cache.policy): cache.policy})


def save_cache(cache: KVCache, path: str | Path) -> Path:
    """Write ``cache`` (kept entries, layout, provenance, context state) to one safetensors file."""
    if not cache.layers or not all(layer.is_initialized for layer in cache.layers):
        raise UserError("the cache is empty: prefill a context into it before saving")
    tensors: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(cache.layers):
        layer.restore_age_order()  # saved oldest first, as a cache that never evicted in place
        view = layer.dense()
        valid = view.valid.expand(*view.keys.shape[:3])
        tensors[f"layers.{index}.keys"] = view.keys[valid].contiguous()
        tensors[f"layers.{index}.values"] = view.values[valid].contiguous()
        tensors[f"layers.{index}.lengths"] = valid.sum(dim=-1)
        tensors[f"layers.{index}.positions"] = view.positions.expand(*valid.shape)[valid].contiguous()
        if view.aux is not None:
            tensors[f"layers.{index}.aux"] = view.aux[valid].contiguous()
    seen = [layer.seen_tokens for layer in cache.layers]
    state = cache.context
    if state is not None and state.mask.shape[1] == max(seen):  # still describes the cache (nothing appended since)
        tensors["context.mask"] = state.mask.to(torch.int8)
        tensors["context.logits"] = state.logits
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "made_by": json.dumps(cache.made_by or {}),
        "seen_tokens": json.dumps(seen),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _refuse_mismatch(saved: dict[str, Any], current: dict[str, Any], what: str, keys: tuple[str, ...]) -> None:
    differing = [k for k in keys if saved.get(k) != current.get(k)]
    if differing:
        details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in differing)
        raise UserError(
            f"this cache was made by another {what} ({saved.get('name_or_path')!r}; {details}); "
            f"load it with the {what} that made it"
        )


def load_cache(path: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None) -> KVCache:
    """The cache saved at ``path``, on ``model``'s device, append only (no policy).

    Refused with a `UserError` when ``model`` (or ``tokenizer``, when given) is not the one that made it.
    """
    from kvtune.api import new_cache

    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    with safe_open(str(path), framework="pt", device=str(model.device)) as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise UserError(f"{path} is not a kvtune cache (saved by KVCache.save)")
        if metadata.get("version") != VERSION:
            raise UserError(f"{path} is a kvtune cache of format version {metadata.get('version')}; need {VERSION}")
        made_by = json.loads(metadata["made_by"])
        if "model" in made_by:
            saved, current = made_by["model"], model_fingerprint(model)
            weights = ("weights_sha256",) if saved.get("weights_sha256") and current["weights_sha256"] else ()
            _refuse_mismatch(saved, current, "model", (*STRUCTURE, *weights))
        if tokenizer is not None and made_by.get("tokenizer"):
            current = tokenizer_fingerprint(tokenizer)
            _refuse_mismatch(made_by["tokenizer"], current, "tokenizer", ("vocab_size", "vocab_sha256"))
        names = set(handle.keys())
        seen = json.loads(metadata["seen_tokens"])
        if len(seen) != model.config.get_text_config().num_hidden_layers:
            raise UserError(f"{path} holds {len(seen)} layers; the model has a different number")
        cache = new_cache(model)
        cache.made_by = made_by
        for index, layer in enumerate(cache.layers):
            part = {
                key: handle.get_tensor(f"layers.{index}.{key}")
                for key in ("keys", "values", "lengths", "aux", "positions")
                if f"layers.{index}.{key}" in names
            }
            _restore_layer(layer, part)
            layer.seen_tokens = seen[index]
        if "context.mask" in names:
            cache.context = ContextState(
                handle.get_tensor("context.mask").long().cpu(), handle.get_tensor("context.logits")
            )
    cache.prefilling = False
    return cache


def _restore_layer(layer, part: dict[str, torch.Tensor]) -> None:
    """Fill an empty layer with the saved entries: a right-aligned dense view of them, compacted to all of it."""
    lengths = part["lengths"]
    batch, heads = lengths.shape
    width = int(lengths.max()) if lengths.numel() else 0
    valid = torch.arange(width, device=lengths.device) >= (width - lengths)[..., None]

    def dense(flat: torch.Tensor) -> torch.Tensor:
        out = flat.new_zeros(batch, heads, width, *flat.shape[1:])
        out[valid] = flat
        return out

    keys, values = dense(part["keys"]), dense(part["values"])
    aux = dense(part["aux"]) if "aux" in part else None
    positions = dense(part["positions"]) if "positions" in part else None  # (files of the first release: FUSED)
    # fresh empty tensors: a zero-length slice of the padded copy would keep all of its storage alive
    layer.lazy_initialization(
        keys.new_empty(batch, heads, 0, keys.shape[-1]), values.new_empty(batch, heads, 0, values.shape[-1])
    )
    indices = torch.arange(width, device=lengths.device).expand(batch, heads, width)
    indices = torch.where(valid, indices, width)  # each head's valid positions first (ascending), then filler
    indices = indices.sort(dim=-1).values
    layer.compact(Selection(indices, lengths), DenseView(keys, values, valid, aux, layer, positions))
