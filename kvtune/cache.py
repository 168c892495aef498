"""A transformers `Cache` whose layers hold only the KV entries a compression method kept.

Each layer stores, for every (batch row, KV head), its own number of entries, so head-wise budgets (Ada-KV) and
per-sample lengths really free memory:

* ``kept``: entries that survived the last compaction, as flat ``[N, head_dim]`` rows ordered by
  (batch row, KV head, token), with ``kept_lengths[b, h]`` rows each. No padding is stored.
* ``tail``: entries appended since then, ``[B, H_kv, T, head_dim]``; every head gains the same tokens, so this part
  is rectangular. ``tail_valid[b, t]`` is False for left padding.

Attention reads a right-aligned dense view (built per call, freed after it) with a validity mask, see
`kvtune.attention`. The cache knows nothing about methods: a method only calls `compact`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

if TYPE_CHECKING:
    from kvtune.cache_io import ContextState


class Selection(NamedTuple):
    """What a method keeps: for each (b, h) the first ``counts[b, h]`` positions of ``indices`` (``[B, H_kv, K]``,
    ascending, into the dense view). ``keys``/``values`` replace the view's tensors when the method rewrote entries."""

    indices: torch.Tensor
    counts: torch.Tensor
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None


@dataclass
class AttentionCall:
    """What `kvtune.attention` needs besides the tensors: attached to the keys a `KVCache` returns."""

    valid: torch.Tensor
    aux: torch.Tensor | None
    layer: RaggedLayer
    layer_idx: int = -1
    cache: KVCache | None = None


@dataclass
class DenseView:
    """A right-aligned dense copy of one layer, as attention and scoring functions consume it.

    ``valid`` is ``[B, H_kv or 1, L]``: the second dimension is 1 while every head holds the same positions.
    ``aux`` is the layer's per-entry statistic aligned with ``keys`` (or None).
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    aux: torch.Tensor | None
    layer: RaggedLayer


class RaggedLayer(CacheLayerMixin):
    """One decoder layer's cache with per-(batch row, KV head) lengths. See the module docstring for the layout."""

    is_sliding = False
    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.kept_keys: torch.Tensor | None = None
        self.kept_values: torch.Tensor | None = None
        self.kept_lengths: torch.Tensor | None = None  # [B, H_kv] int64
        self.kept_aux: torch.Tensor | None = None  # [N] float32 per-entry statistic (e.g. H2O scores)
        self.tail_keys: torch.Tensor | None = None
        self.tail_values: torch.Tensor | None = None
        self.tail_valid: torch.Tensor | None = None  # [B, T] bool
        self.tail_aux: torch.Tensor | None = None  # [B, H_kv, T] float32
        self.seen_tokens = 0  # positions fed so far, padding included: drives position ids

    # ---- transformers' layer contract -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.kept_keys = key_states.new_zeros(0, head_dim)
        self.kept_values = value_states.new_zeros(0, value_states.shape[-1])
        self.kept_lengths = torch.zeros(batch, heads, dtype=torch.long, device=self.device)
        self.tail_keys = key_states[:, :, :0]
        self.tail_values = value_states[:, :, :0]
        self.tail_valid = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new tokens (valid until `mark_new_valid` says otherwise); return the dense view to attend to."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[2]
        if self.kept_aux is not None:
            self.tail_aux = torch.cat([self.tail_aux, self.tail_aux.new_zeros(*key_states.shape[:2], new)], dim=2)
        self.tail_keys = torch.cat([self.tail_keys, key_states], dim=2)
        self.tail_values = torch.cat([self.tail_values, value_states], dim=2)
        self.tail_valid = torch.cat([self.tail_valid, self.tail_valid.new_ones(key_states.shape[0], new)], dim=1)
        self.seen_tokens += new
        view = self.dense()
        # Read by kvtune.attention; to any other consumer the keys are a plain tensor. The call holds no reference
        # to the tensors themselves, so the dense copy is freed as soon as attention is done with it.
        view.keys.kvtune_call = AttentionCall(valid=view.valid, aux=view.aux, layer=self)
        return view.keys, view.values

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__()

    # ---- kvtune's own API ---------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.kept_lengths.shape[0]

    @property
    def num_heads(self) -> int:
        return self.kept_lengths.shape[1]

    def lengths(self) -> torch.Tensor:
        """Entries held per (batch row, KV head), padding excluded: ``[B, H_kv]``."""
        return self.kept_lengths + self.tail_valid.sum(dim=1, keepdim=True)

    def mark_new_valid(self, valid: torch.Tensor) -> None:
        """Record which of the tokens appended last are real (``valid`` is ``[B, new]``), e.g. not left padding."""
        self.tail_valid[:, self.tail_valid.shape[1] - valid.shape[1] :] = valid

    def _kept_padded(self, flat: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Scatter flat kept rows into ``[B, H, Lmax, ...]``, each head's entries right-aligned."""
        batch, heads = self.kept_lengths.shape
        width = int(self.kept_lengths.max()) if self.kept_lengths.numel() else 0
        lengths = self.kept_lengths.flatten()
        if bool((lengths == width).all()):
            return flat.view(batch, heads, width, *flat.shape[1:])
        starts = torch.repeat_interleave(
            torch.arange(batch * heads, device=flat.device) * width + width - lengths, lengths
        )
        offsets = torch.arange(flat.shape[0], device=flat.device) - torch.repeat_interleave(
            torch.cumsum(lengths, 0) - lengths, lengths
        )
        out = flat.new_full((batch * heads * width, *flat.shape[1:]), fill)
        out[starts + offsets] = flat
        return out.view(batch, heads, width, *flat.shape[1:])

    def dense(self) -> DenseView:
        """Right-aligned dense view of the whole layer: kept entries, then the tail."""
        width = int(self.kept_lengths.max()) if self.kept_lengths.numel() else 0
        kept_valid = torch.arange(width, device=self.device) >= (width - self.kept_lengths)[..., None]
        if bool(kept_valid.all()):
            kept_valid = kept_valid[:, :1]
        tail_valid = self.tail_valid[:, None, :].expand(-1, kept_valid.shape[1], -1)
        valid = torch.cat([kept_valid, tail_valid], dim=2)
        if width == 0:  # fresh tensor objects over the same storage, so that attributes never land on ours
            keys, values = self.tail_keys.view_as(self.tail_keys), self.tail_values.view_as(self.tail_values)
        else:
            keys = torch.cat([self._kept_padded(self.kept_keys), self.tail_keys], dim=2)
            values = torch.cat([self._kept_padded(self.kept_values), self.tail_values], dim=2)
        aux = None
        if self.kept_aux is not None:
            aux = torch.cat([self._kept_padded(self.kept_aux), self.tail_aux], dim=2) if width else self.tail_aux
        return DenseView(keys=keys, values=values, valid=valid, aux=aux, layer=self)

    def compact(self, selection: Selection, view: DenseView | None = None) -> None:
        """Keep only the selected entries of ``view`` (the current dense view by default); free everything else."""
        view = view if view is not None else self.dense()
        indices, counts = selection.indices, selection.counts
        keys = view.keys if selection.keys is None else selection.keys
        values = view.values if selection.values is None else selection.values
        width = indices.shape[-1]
        keep = torch.arange(width, device=indices.device) < counts[..., None]
        gather = indices.clamp(max=keys.shape[2] - 1)
        rows = keep.flatten()

        def take(source: torch.Tensor) -> torch.Tensor:
            picked = source.gather(2, gather[..., None].expand(-1, -1, -1, source.shape[-1]))
            return picked.flatten(0, 2)[rows].contiguous()

        self.kept_keys, self.kept_values = take(keys), take(values)
        if view.aux is not None:
            self.kept_aux = view.aux.gather(2, gather).flatten()[rows].contiguous()
            self.tail_aux = view.aux[:, :, :0]
        else:
            self.kept_aux = self.tail_aux = None
        self.kept_lengths = counts.to(torch.long).clone()
        self.tail_keys = self.tail_keys[:, :, :0]
        self.tail_values = self.tail_values[:, :, :0]
        self.tail_valid = self.tail_valid[:, :0]

    def detach(self) -> None:
        """Cut stored entries from any autograd graph (a trained compressor's output is trained by one chunk only)."""
        for name in ("kept_keys", "kept_values", "tail_keys", "tail_values"):
            setattr(self, name, getattr(self, name).detach())

    def set_aux(self, aux: torch.Tensor) -> None:
        """Write the per-entry statistic back from a dense, right-aligned ``[B, H_kv, L]`` tensor."""
        width = int(self.kept_lengths.max()) if self.kept_lengths.numel() else 0
        kept = aux[:, :, :width]
        valid = torch.arange(width, device=aux.device) >= (width - self.kept_lengths)[..., None]
        self.kept_aux = kept[valid].contiguous()
        self.tail_aux = aux[:, :, width:].contiguous()

    def nbytes(self) -> int:
        """Bytes held by this layer's tensors."""
        tensors = (self.kept_keys, self.kept_values, self.kept_lengths, self.kept_aux)
        tensors += (self.tail_keys, self.tail_values, self.tail_valid, self.tail_aux)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class KVCache(Cache):
    """kvtune's cache: `RaggedLayer`s plus the compression policy (if any) that acts on them.

    ``policy`` is None once the `kvtune.compress` context exits: the cache then only appends.
    ``prefilling`` says whether multi-token forwards are still compressed; `kvtune.generate` closes it after the
    context so that a question appended later stays intact (question-agnostic compression).
    """

    made_by: dict | None = None  # method, budget, ratio, model and tokenizer fingerprints (set by kvtune.api)
    context: ContextState | None = None  # what follow-ups need, set by kvtune.compress_context (kvtune.cache_io)

    def __init__(self, num_layers: int, policy=None) -> None:
        super().__init__(layers=[RaggedLayer() for _ in range(num_layers)])
        self.policy = policy
        self.prefilling = True
        self.policy_state: dict = {}  # cross-layer state a method keeps for this cache (LightTransfer's heap, ...)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        keys.kvtune_call.layer_idx, keys.kvtune_call.cache = layer_idx, self
        return keys, values

    def save(self, path: str | Path) -> Path:
        """Write the kept entries, their layout and provenance to one safetensors file (`kvtune.load_cache`)."""
        from kvtune.cache_io import save_cache  # (imported here: cache_io builds on this module)

        return save_cache(self, path)

    def nbytes(self) -> int:
        """Bytes held by all layers, from their own tensors."""
        return sum(layer.nbytes() for layer in self.layers)

    def lengths(self) -> list[torch.Tensor]:
        """Per-layer ``[B, H_kv]`` entry counts."""
        return [layer.lengths() for layer in self.layers]
