"""A transformers `Cache` whose layers hold only the KV entries a compression method kept.

Each layer stores, for every (batch row, KV head), its own *segment* of entries in one flat ``[S, head_dim]``
buffer, so head-wise budgets (Ada-KV) and per-sample lengths really free memory. Every segment has the same spare
capacity after its entries, so that new tokens are written in place (no copy per decoding step); the buffer grows
geometrically when the spare runs out, and is rebuilt exactly (no spare) on compaction.

* Uniform layers (every segment the same length) are a ``[B, H_kv, capacity, d]`` tensor seen through a view:
  attention reads ``[:, :, :used]`` with no copy, and with no mask when every entry is valid.
* Ragged layers (Ada-KV) are read segment by segment while decoding; a right-aligned dense copy is built only for
  multi-token calls and for policies that need one.
* Per entry the layer also keeps its absolute position (the count of tokens seen before it, padding included;
  `FUSED` for a slot that fuses several tokens), a validity bit (left padding, or an entry evicted lazily while
  decoding, see `RaggedLayer.compact`) and optionally a statistic (``aux``, e.g. H2O's accumulated attention).
* Decode-time eviction of one entry per (row, head) from a full, rectangular layer (`RaggedLayer.replace`) writes
  the new token over the evicted entry: no hole, no growth, no copy. Storage order is then no longer age order
  (``in_age_order``); attention does not care (keys carry RoPE), the policies' decode steps read positions, and
  the order is restored before anything that reads it (a multi-token call, crop, save: `restore_age_order`).
* A sliding layer (``sliding_window`` set, from the model's ``layer_types``) is never compressed by a method: after
  each forward it keeps the positions its next query can still see (`RaggedLayer.slide`), the last
  ``window - 1``, as transformers' ``DynamicSlidingWindowLayer`` does.

Compaction and every reset allocate fresh tensors: no view into released storage survives, and `nbytes` counts
the storage each tensor keeps alive. The cache knows nothing about methods: a method only calls `compact`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

POSITION_DTYPE = torch.int32  # per-entry positions: 4 bytes next to 2 x head_dim x 2-4 bytes of keys and values
FUSED = -1  # position of a slot that fuses several tokens (LoCoCo's fused half): no single token's position
MIN_SPARE = 32  # spare slots per segment when a buffer grows; the spare is also at least 1/8 of the segment
LAZY_HOLES = 16  # decode-time evictions are only marked invalid until a segment holds more holes than this
LAZY_HOLES_FRACTION = 16  # ... or more than 1/16 of its entries

if TYPE_CHECKING:
    from kvtune.cache_io import ContextState


class Selection(NamedTuple):
    """What a method keeps: for each (b, h) the first ``counts[b, h]`` positions of ``indices`` (``[B, H_kv, K]``,
    ascending, into the dense view). ``keys``/``values`` replace the view's tensors when the method rewrote entries.

    ``positions`` (``[B, H_kv, K]`` long) gives the kept entries' absolute positions. When it is None they are read
    from the view at ``indices``, unless ``keys`` has a different length than the view (its entries are then new
    slots, not the view's: their positions are `FUSED`).
    """

    indices: torch.Tensor
    counts: torch.Tensor
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    positions: torch.Tensor | None = None


@dataclass
class AttentionCall:
    """What `kvtune.attention` needs besides the tensors: attached to the keys a `KVCache` returns.

    ``valid`` is None when every entry is valid (a rectangular layer: no mask needed). ``ragged`` says that the
    keys/values handed to attention are the layer's flat storage, to be read segment by segment (single queries).
    """

    layer: RaggedLayer
    valid: torch.Tensor | None
    ragged: bool = False
    layer_idx: int = -1
    cache: KVCache | None = None
    positions: torch.Tensor | None = None  # [B, H_kv, L] of the keys handed over (None for the ragged segments)


@dataclass
class DenseView:
    """A right-aligned dense view of one layer, as attention and scoring functions consume it.

    ``valid`` is ``[B, H_kv or 1, L]``: the second dimension is 1 while every head holds the same positions.
    ``aux`` is the layer's per-entry statistic aligned with ``keys`` (or None). ``positions`` is ``[B, H_kv or 1, L]``
    long: each entry's absolute position (any value where invalid, `FUSED` for fused slots).
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    aux: torch.Tensor | None
    layer: RaggedLayer
    positions: torch.Tensor | None = None


def storage_bytes(tensors) -> dict[int, int]:
    """``{data_ptr: bytes}`` of the storages these tensors keep alive."""
    found = {}
    for t in tensors:
        if t is not None:
            storage = t.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
    return found


class RaggedLayer(CacheLayerMixin):
    """One decoder layer's cache with per-(batch row, KV head) lengths. See the module docstring for the layout."""

    is_croppable = False  # `crop` works only back to what the layer still holds (see `crop`)

    def __init__(self, sliding_window: int | None = None) -> None:
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1, got {sliding_window}")
        self.sliding_window = sliding_window  # a query sees keys at distance < window (transformers' semantics)
        self.is_sliding = sliding_window is not None
        self._keys: torch.Tensor | None = None  # [S, d]
        self._values: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None  # [S] POSITION_DTYPE
        self._valid: torch.Tensor | None = None  # [S] bool, None while every used slot is valid
        self._aux: torch.Tensor | None = None  # [S] float32, a per-entry statistic of the policy
        self._base: torch.Tensor | None = None  # [B*H] entries per segment at the last (re)build
        self._base_list: list[int] = []
        self._starts_list: list[int] = []
        self._ends: torch.Tensor | None = None  # [B*H] flat index after each segment's base entries
        self._uniform = True
        self._spare = 0  # slots per segment after its base entries
        self._appended = 0  # entries past the base ones since the last (re)build (negative after `replace`s)
        self._bias: torch.Tensor | None = None  # ragged decoding's additive mask, see `segment_bias`
        self.in_age_order = True  # each segment's entries are stored oldest first (False after `replace`)
        self.batch = self.heads = 0
        self.seen_tokens = 0  # positions fed so far, padding included: drives position ids

    # ---- keys/values as transformers' layers expose them -----------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor | None:
        """The dense right-aligned keys ``[B, H_kv, L, d]`` (a view of the storage for uniform layers)."""
        return self.dense().keys if self.is_initialized else None

    @keys.setter
    def keys(self, value) -> None:
        if value is not None:
            raise AttributeError("RaggedLayer.keys is a read-only view; change the cache through update/compact")

    @property
    def values(self) -> torch.Tensor | None:
        return self.dense().values if self.is_initialized else None

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("RaggedLayer.values is a read-only view; change the cache through update/compact")

    # ---- geometry -----------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.batch if self.is_initialized else -1

    @property
    def num_heads(self) -> int:
        return self.heads

    @property
    def ragged(self) -> bool:
        """True when segments differ in length (attention then reads them one by one)."""
        return not self._uniform

    @property
    def _width(self) -> int:
        """Entries of the longest segment, holes included: the dense view's length."""
        return (max(self._base_list) if self._base_list else 0) + self._appended

    def _set_geometry(self, base: torch.Tensor, spare: int) -> None:
        self._bias = None
        self._base = base.to(torch.long)
        self._base_list = self._base.tolist()
        self._uniform = len(set(self._base_list)) <= 1
        self._spare, self._appended = spare, 0
        capacity = [n + spare for n in self._base_list]
        starts, total = [], 0
        for c in capacity:
            starts.append(total)
            total += c
        self._starts_list = starts
        self._ends = torch.tensor(starts, dtype=torch.long, device=self._base.device) + self._base

    def _view4(self, flat: torch.Tensor) -> torch.Tensor:
        """A uniform layer's flat per-slot tensor as ``[B, H, capacity, ...]``."""
        return flat.view(self.batch, self.heads, -1, *flat.shape[1:])

    def _used_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat storage index, right-aligned dense index ``b*H*W + h*W + w``) of every used slot."""
        device = self._base.device
        lengths = self._base + self._appended
        width = self._width
        starts = torch.tensor(self._starts_list, dtype=torch.long, device=device)
        segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
        offset = torch.arange(segment.numel(), device=device) - torch.repeat_interleave(
            torch.cumsum(lengths, 0) - lengths, lengths
        )
        source = starts[segment] + offset
        target = segment * width + (width - lengths[segment]) + offset
        return source, target

    # ---- transformers' layer contract -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.batch, self.heads = key_states.shape[:2]
        self.dtype, self.device = key_states.dtype, key_states.device
        self._keys = key_states.new_empty(0, key_states.shape[-1])
        self._values = value_states.new_empty(0, value_states.shape[-1])
        self._positions = torch.empty(0, dtype=POSITION_DTYPE, device=self.device)
        self._set_geometry(torch.zeros(self.batch * self.heads, dtype=torch.long, device=self.device), 0)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new tokens (valid until `mark_new_valid` says otherwise); return what attention reads."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[2]
        if new > 1:
            self.restore_age_order()  # a multi-token call's policy ranks entries by storage order
        graph = torch.is_grad_enabled() and (key_states.requires_grad or self._keys.requires_grad)
        if self._keys.shape[0] == 0 and self._uniform and key_states.is_contiguous() and value_states.is_contiguous():
            self._adopt(key_states, value_states)  # the first prefill: its own tensors are the storage, no copy
        else:
            if graph or self._appended + new > self._spare:
                # Out of spare, or tensors saved for backward that must not be written in place: a fresh buffer.
                self._regrow(new, spare=0 if graph else max(MIN_SPARE, (self._width + new) // 8))
            self._write(key_states, value_states)
        self.seen_tokens += new
        return self.attention_inputs(new)

    def _adopt(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, new, dim = key_states.shape
        self._keys, self._values = key_states.reshape(-1, dim), value_states.reshape(-1, value_states.shape[-1])
        self._positions = (
            torch.arange(new, dtype=POSITION_DTYPE, device=self.device).repeat(batch * heads) + self.seen_tokens
        )
        self._valid = None
        self._aux = None if self._aux is None else torch.zeros(self._keys.shape[0], device=self.device)
        self.in_age_order = True
        self._set_geometry(torch.full((batch * heads,), new, dtype=torch.long, device=self.device), 0)

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write the new tokens into the spare slots of every segment (in place)."""
        new = key_states.shape[2]
        at = self._base_list[0] + self._appended if self._uniform else 0
        positions = (  # a decoding step's one position is a fill, not a tensor to allocate
            self.seen_tokens
            if new == 1
            else torch.arange(self.seen_tokens, self.seen_tokens + new, dtype=POSITION_DTYPE, device=self.device)
        )
        if self._uniform:
            self._view4(self._keys)[:, :, at : at + new] = key_states
            self._view4(self._values)[:, :, at : at + new] = value_states
            self._view4(self._positions)[:, :, at : at + new] = positions
            if self._valid is not None:
                self._view4(self._valid)[:, :, at : at + new] = True
            if self._aux is not None:
                self._view4(self._aux)[:, :, at : at + new] = 0.0
        else:
            index = ((self._ends + self._appended)[:, None] + torch.arange(new, device=self.device)).flatten()
            if self._bias is not None:
                rows = torch.arange(self._bias.shape[0], device=self.device)[:, None]
                self._bias[rows, index.view(rows.shape[0], new)] = 0.0
            self._keys.index_copy_(0, index, key_states.flatten(0, 2))
            self._values.index_copy_(0, index, value_states.flatten(0, 2))
            self._positions[index] = positions if new == 1 else positions.repeat(self.batch * self.heads)
            if self._valid is not None:
                self._valid[index] = True
            if self._aux is not None:
                self._aux[index] = 0.0
        self._appended += new

    def _regrow(self, new: int, spare: int) -> None:
        """Rebuild every segment with its used entries and room for ``max(new, spare)`` more (fresh tensors)."""
        source, _ = self._used_index()
        lengths = self._base + self._appended
        room = max(new, spare)
        starts = torch.cumsum(lengths + room, 0) - (lengths + room)
        target = torch.repeat_interleave(starts, lengths) + (
            torch.arange(source.numel(), device=self.device)
            - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        )
        size = int(lengths.sum()) + room * lengths.numel()

        def moved(flat: torch.Tensor | None, fill) -> torch.Tensor | None:
            if flat is None:
                return None
            out = flat.new_full((size, *flat.shape[1:]), fill)
            out[target] = flat[source]
            return out

        self._keys, self._values = moved(self._keys, 0.0), moved(self._values, 0.0)
        self._positions, self._valid, self._aux = (
            moved(self._positions, 0),
            moved(self._valid, True),
            moved(self._aux, 0.0),
        )
        self._set_geometry(lengths, room)

    def attention_inputs(self, new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values for this call's attention, carrying an `AttentionCall` for kvtune's backend."""
        if self._uniform:
            used = self._width
            keys = self._view4(self._keys)[:, :, :used]
            values = self._view4(self._values)[:, :, :used]
            valid = None if self._valid is None else self._view4(self._valid)[:, :, :used]
            call = AttentionCall(layer=self, valid=valid, positions=self._view4(self._positions)[:, :, :used])
        elif new == 1:
            # Fresh tensor objects over the storage, so that the attribute never lands on ours.
            keys, values = self._keys.view_as(self._keys), self._values.view_as(self._values)
            call = AttentionCall(layer=self, valid=None, ragged=True)
        else:
            view = self.dense()
            keys, values = view.keys, view.values
            call = AttentionCall(layer=self, valid=view.valid, positions=view.positions)
        # Read by kvtune.attention; to any other consumer the keys are a plain tensor. The call holds no reference
        # to the tensors themselves.
        keys.kvtune_call = call
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.sliding_window)

    # ---- transformers' cache contract: batch operations, crop, offloading --------------------------------------
    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep (or repeat, or reorder) batch rows ``indices``: fresh tensors holding exactly those rows."""
        if not self.is_initialized:
            return
        indices = torch.as_tensor(indices, device=self.device).flatten()
        if indices.dtype == torch.bool:
            indices = torch.nonzero(indices).flatten()
        segments = (indices[:, None] * self.heads + torch.arange(self.heads, device=self.device)).flatten()
        source, _ = self._used_index()
        lengths = self._base + self._appended
        first = torch.cumsum(lengths, 0) - lengths  # where each segment's used slots start in `source`
        picked = lengths[segments]
        offsets = torch.arange(int(picked.sum()), device=self.device) - torch.repeat_interleave(
            torch.cumsum(picked, 0) - picked, picked
        )
        rows = source[torch.repeat_interleave(first[segments], picked) + offsets]
        self._keys, self._values = self._keys[rows], self._values[rows]
        self._positions = self._positions[rows]
        self._valid = None if self._valid is None else self._valid[rows]
        self._aux = None if self._aux is None else self._aux[rows]
        self.batch = indices.numel()
        self._set_geometry(picked, 0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]``."""
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.batch_select_indices(torch.arange(self.batch, device=self.device).repeat_interleave(repeats))

    def crop(self, max_length: int) -> None:
        """Drop the newest tokens: back to ``max_length`` seen tokens, or ``-max_length`` fewer when negative
        (transformers' convention). Only tokens the layer still holds can be cropped: every segment must hold each
        position from the new end onwards; otherwise a `ValueError` says how far back it can go."""
        if not self.is_initialized:
            return
        self.restore_age_order()
        target = self.seen_tokens + max_length if max_length < 0 else max_length
        remove = self.seen_tokens - max(target, 0)
        if remove <= 0:
            return
        held = self.croppable_tokens()
        if remove > held:
            raise ValueError(
                f"cannot crop this kvtune cache back to {target} tokens: it was compressed after that point and "
                f"holds only the last {held} of its {self.seen_tokens} tokens as they were, so it can be cropped "
                f"back at most to {self.seen_tokens - held} tokens"
            )
        if remove <= self._appended:
            self._appended -= remove  # the dropped slots become spare again
            self._bias = None
            self._spare = max(self._spare, self._appended)
        else:
            keep = self._base + self._appended - remove
            view = self.dense()
            width = view.keys.shape[2]
            indices = (width - remove - keep)[..., None] + torch.arange(int(keep.max()), device=self.device)
            self._rebuild(Selection(indices.view(self.batch, self.heads, -1), keep.view(self.batch, -1)), view)
        self.seen_tokens -= remove

    def trim(self) -> None:
        """Free the spare capacity: fresh tensors holding exactly the used slots (after a pass that appended and
        cropped, e.g. `kvzip`'s reconstruction, when nothing else rebuilds the layer)."""
        if self.is_initialized and self._spare > self._appended:
            self._regrow(0, spare=0)

    def croppable_tokens(self) -> int:
        """How many of the newest tokens every segment still holds, in order (what `crop` can remove)."""
        self.restore_age_order()
        view = self.dense()
        positions = view.positions.expand(self.batch, self.heads, -1).flip(-1)
        expected = self.seen_tokens - 1 - torch.arange(positions.shape[-1], device=self.device)
        return int((positions == expected).long().cumprod(dim=-1).sum(dim=-1).min()) if positions.numel() else 0

    def offload(self) -> None:
        """Move the storage to CPU (`prefetch` brings it back)."""
        self._move("cpu")

    def prefetch(self) -> None:
        self._move(self.device)

    def _move(self, device) -> None:
        self._bias = None
        if self.is_initialized:
            for name in ("_keys", "_values", "_positions", "_valid", "_aux", "_base", "_ends"):
                tensor = getattr(self, name)
                if tensor is not None:
                    setattr(self, name, tensor.to(device, non_blocking=True))

    # ---- kvtune's own API ---------------------------------------------------------------------------------------
    def lengths(self) -> torch.Tensor:
        """Valid entries held per (batch row, KV head): ``[B, H_kv]`` (``[0, 0]`` before the first token)."""
        if not self.is_initialized:
            return torch.zeros(0, 0, dtype=torch.long)
        if self._valid is None:
            return (self._base + self._appended).view(self.batch, self.heads)
        if self._uniform:
            return self._view4(self._valid)[:, :, : self._width].sum(dim=-1)
        return self.dense().valid.expand(self.batch, self.heads, -1).sum(dim=-1)

    def mean_length(self) -> float:
        """Entries per segment on average, holes included: a decoding step's cheap look at the layer's size (plain
        Python numbers, no tensor operation)."""
        if not self.is_initialized or not self._base_list:
            return 0.0
        return sum(self._base_list) / len(self._base_list) + self._appended

    def mark_new_valid(self, valid: torch.Tensor) -> None:
        """Record which of the tokens appended last are real (``valid`` is ``[B, new]``), e.g. not left padding."""
        if bool(valid.all()):
            return
        new = valid.shape[1]
        self._bias = None
        if self._valid is None:
            self._valid = torch.ones(self._keys.shape[0], dtype=torch.bool, device=self.device)
        if self._uniform:
            used = self._width
            self._view4(self._valid)[:, :, used - new : used] = valid[:, None, :].bool()
        else:
            index = ((self._ends + self._appended)[:, None] - new + torch.arange(new, device=self.device)).flatten()
            self._valid[index] = valid.bool().repeat_interleave(self.heads, dim=0).flatten()

    def dense(self) -> DenseView:
        """Right-aligned dense view of the whole layer (no copy for uniform layers)."""
        if self._uniform:
            used = self._width
            valid = (
                torch.ones(self.batch, 1, used, dtype=torch.bool, device=self.device)
                if self._valid is None
                else self._view4(self._valid)[:, :, :used]
            )
            return DenseView(
                keys=self._view4(self._keys)[:, :, :used],
                values=self._view4(self._values)[:, :, :used],
                valid=valid,
                aux=None if self._aux is None else self._view4(self._aux)[:, :, :used],
                layer=self,
                positions=self._view4(self._positions)[:, :, :used],
            )
        source, target = self._used_index()
        width = self._width
        slots = self.batch * self.heads * width

        def scatter(flat: torch.Tensor, fill) -> torch.Tensor:
            out = flat.new_full((slots, *flat.shape[1:]), fill)
            out[target] = flat[source]
            return out.view(self.batch, self.heads, width, *flat.shape[1:])

        valid = torch.zeros(slots, dtype=torch.bool, device=self.device)
        valid[target] = True if self._valid is None else self._valid[source]
        return DenseView(
            keys=scatter(self._keys, 0.0),
            values=scatter(self._values, 0.0),
            valid=valid.view(self.batch, self.heads, width),
            aux=None if self._aux is None else scatter(self._aux, 0.0),
            layer=self,
            positions=scatter(self._positions, 0),
        )

    def segment_bias(self) -> torch.Tensor:
        """``[B*H_kv, S]`` additive mask over the flat storage: 0 on the used, valid slots of segment (b, h), -inf
        elsewhere. Single queries of a ragged layer attend over the whole buffer with it (one product per layer
        instead of one call per segment); kept up to date by appends, rebuilt after any other change."""
        if self._bias is None:
            source, _ = self._used_index()
            lengths = self._base + self._appended
            segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=self.device), lengths)
            bias = torch.full((lengths.numel(), self._keys.shape[0]), float("-inf"), device=self.device)
            usable = torch.zeros_like(source, dtype=torch.float32)
            if self._valid is not None:
                usable.masked_fill_(~self._valid[source], float("-inf"))
            bias[segment, source] = usable
            self._bias = bias
        return self._bias

    def compact(self, selection: Selection, view: DenseView | None = None, lazy: bool = True) -> None:
        """Keep only the selected entries of ``view`` (the current dense view by default); free everything else.

        A small eviction of a uniform layer's own entries (a decoding step of H2O or StreamingLLM) only marks the
        evicted slots invalid (unless ``lazy`` is False); the layer is rebuilt once more than `LAZY_HOLES` (or 1/16)
        of a segment are holes, so that decoding does not copy the cache per step and the layer never holds more
        than that slack.
        """
        view = view if view is not None else self.dense()
        if not (lazy and self._compact_lazily(selection, view)):
            self._rebuild(selection, view)

    def _rebuild(self, selection: Selection, view: DenseView) -> None:
        """Fresh storage holding exactly the selected entries (no spare)."""
        indices, counts = selection.indices, selection.counts
        keys = view.keys if selection.keys is None else selection.keys
        values = view.values if selection.values is None else selection.values
        width = indices.shape[-1]
        keep = (torch.arange(width, device=indices.device) < counts[..., None]).flatten()
        gather = indices.clamp(max=keys.shape[2] - 1)
        uniform = bool((counts == width).all())

        def take(source: torch.Tensor) -> torch.Tensor:
            expanded = source.expand(gather.shape[0], gather.shape[1], *source.shape[2:])
            if source.dim() == 4:
                picked = expanded.gather(2, gather[..., None].expand(-1, -1, -1, source.shape[-1])).flatten(0, 2)
            else:
                picked = expanded.gather(2, gather).flatten()
            return picked.contiguous() if uniform else picked[keep]  # fresh either way: gather copies

        if selection.positions is not None:
            positions = take(selection.positions)
        elif selection.keys is None or selection.keys.shape[2] == view.keys.shape[2]:
            source = view.positions if view.positions is not None else self.dense().positions
            positions = take(source) if source.shape[-1] == view.keys.shape[2] else None
        else:
            positions = None
        self._keys, self._values = take(keys), take(values)
        if positions is None:
            positions = torch.full_like(self._keys[:, 0], FUSED)
        self._positions = positions.to(POSITION_DTYPE)
        self._aux = take(view.aux) if view.aux is not None else None
        valid = take(view.valid) if view.valid.shape[-1] == keys.shape[2] else None
        self._valid = None if valid is None or bool(valid.all()) else valid
        self.batch, self.heads = counts.shape
        self._set_geometry(counts.flatten(), 0)

    def _compact_lazily(self, selection: Selection, view: DenseView) -> bool:
        """Mark unselected entries invalid in place, when that is all the selection does and few holes result."""
        if not self._lazy_ok(view) or selection.keys is not None or selection.positions is not None:
            return False
        used = self._width
        indices, counts = selection.indices, selection.counts
        if used - int(counts.min()) > max(LAZY_HOLES, used // LAZY_HOLES_FRACTION):
            return False
        in_count = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
        keep = torch.zeros(self.batch, self.heads, used + 1, dtype=torch.bool, device=self.device)
        keep.scatter_(2, torch.where(in_count, indices, used), True)
        self._mark(keep[:, :, :used], view.aux)
        return True

    def _lazy_ok(self, view: DenseView) -> bool:
        """Whether ``view`` is this uniform layer's own storage, which may then be marked in place."""
        return (
            self._uniform
            and view.keys.shape[2] == self._width
            and not (torch.is_grad_enabled() and self._keys.requires_grad)
        )

    def _mark(self, keep: torch.Tensor, aux: torch.Tensor | None) -> None:
        if self._valid is None:
            self._valid = torch.ones(self._keys.shape[0], dtype=torch.bool, device=self.device)
        self._view4(self._valid)[:, :, : self._width] = keep
        if aux is not None:
            self.set_aux(aux)

    def evict(self, drop: torch.Tensor, view: DenseView | None = None) -> None:
        """Remove the entries ``drop`` marks (``[B, H_kv, L]`` over ``view``, the current dense view by default):
        the cheap form of `compact` for a decoding step that evicts a few entries. ``view.aux`` is written back."""
        view = view if view is not None else self.dense()
        keep = view.valid & ~drop
        holes = self._width - int(keep.sum(dim=-1).min())
        if self._lazy_ok(view) and holes <= max(LAZY_HOLES, self._width // LAZY_HOLES_FRACTION):
            self._mark(keep, view.aux)
            return
        counts = keep.sum(dim=-1)
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., : int(counts.max())]
        self._rebuild(Selection(order, counts), view)

    def steady_length(self, view_keys: torch.Tensor) -> int | None:
        """Entries every (row, head) holds when the layer is rectangular with no invalid entry and ``view_keys`` is
        its own storage (what a decoding step's policy may then change in place with `replace`), else None."""
        if self._uniform and self._valid is None and view_keys.shape[2] == self._width:
            return self._width
        return None

    def stored_positions(self) -> torch.Tensor:
        """``[B, H_kv, L]`` positions of a uniform layer's entries, in storage order (a view)."""
        return self._view4(self._positions)[:, :, : self._width]

    def _copy_newest_to(self, slots: torch.Tensor) -> None:
        """Copies the newest entry (the last slot of the dense view) into ``slots[b, h]`` (``[B, H_kv, 1]``): keys,
        values, positions and the per-entry statistic alike."""
        last = self._width - 1
        for flat in (self._keys, self._values):
            stored = self._view4(flat)
            stored.scatter_(2, slots[..., None].expand(-1, -1, -1, flat.shape[-1]), stored[:, :, last : last + 1])
        for flat in (self._positions, self._aux):
            if flat is not None:
                stored = self._view4(flat)
                stored.scatter_(2, slots, stored[:, :, last : last + 1])

    def replace(self, slots: torch.Tensor) -> None:
        """A decoding step's eviction in place: the entry at ``slots[b, h]`` (``[B, H_kv, 1]``, into the dense view
        of a `steady_length` layer) goes and the newest entry (the last slot) takes its place; the spare slot it
        leaves is reused by the next token. Nothing is allocated; the per-entry statistic moves with its entry."""
        self._copy_newest_to(slots)
        self._appended -= 1
        self.in_age_order = False

    def evict_unevenly(self, drop: torch.Tensor) -> None:
        """A decoding step that evicts a different number of entries per head (Ada-KV) and keeps the layer
        rectangular: ``drop`` (``[B, H_kv, L]`` over a `steady_length`-like view, holes allowed) marks the evicted
        entries invalid; each head's new token (the last slot) moves into its first hole, and the last slot is given
        back when every head had one. A ragged layer is first stored as its right-aligned dense view (the one
        attention was handed), padded with invalid slots. Repacked (as a compaction) when holes outgrow
        `LAZY_HOLES` or 1/16 of the width."""
        if not self._uniform:
            self._store_rectangular(self.dense())
        if self._valid is None:
            self._valid = torch.ones(self._keys.shape[0], dtype=torch.bool, device=self.device)
        last = self._width - 1
        valid = self._view4(self._valid)[:, :, : self._width]
        valid &= ~drop
        newcomer = valid[:, :, last:].clone()
        holes = ~valid[:, :, :last]
        first = holes.to(torch.uint8).argmax(dim=-1, keepdim=True)
        moved = holes.gather(2, first)
        slots = torch.where(moved, first, last)
        self._copy_newest_to(slots)
        valid[:, :, last:] &= ~moved
        valid.scatter_(2, slots, newcomer)
        self.in_age_order = False
        if bool(moved.all()):
            self._appended -= 1
            return
        counts = valid.sum(dim=-1)
        if self._width - int(counts.max()) > max(LAZY_HOLES, self._width // LAZY_HOLES_FRACTION):
            view = self.dense()
            order = torch.sort((~view.valid).to(torch.int8), dim=-1, stable=True).indices[..., : int(counts.max())]
            self._rebuild(Selection(order, counts), view)
            if not self._uniform:
                self._store_rectangular(self.dense())

    def _store_rectangular(self, view: DenseView) -> None:
        """Take a ragged layer's right-aligned dense view (fresh tensors) as its storage: uniform, padded slots
        invalid."""
        batch, heads, width = view.keys.shape[:3]
        self._keys, self._values = (
            view.keys.reshape(-1, view.keys.shape[-1]),
            view.values.reshape(-1, view.values.shape[-1]),
        )
        self._positions = view.positions.expand(batch, heads, -1).reshape(-1)
        self._valid = view.valid.expand(batch, heads, -1).reshape(-1)
        self._aux = None if view.aux is None else view.aux.reshape(-1)
        self._set_geometry(torch.full((batch * heads,), width, dtype=torch.long, device=self.device), 0)

    def restore_age_order(self) -> None:
        """Store each segment's entries oldest first again, after `replace` (fresh storage, as a compaction)."""
        if self.in_age_order or not self.is_initialized:
            return
        view = self.dense()
        positions = view.positions.expand(*view.keys.shape[:3]).long()
        valid = view.valid.expand(*view.keys.shape[:3])
        order = positions.masked_fill(~valid, torch.iinfo(torch.long).max).argsort(dim=-1, stable=True)
        self._rebuild(Selection(order, valid.sum(dim=-1)), view)
        self.in_age_order = True

    def slide(self) -> None:
        """A sliding layer, after a forward: drop the entries its next query can no longer see (positions at or
        before ``seen_tokens - window``), keeping the last ``window - 1`` positions as transformers does. Decoding
        steps only mark the oldest entry invalid until `evict` rebuilds the layer (a few holes at most)."""
        if self.sliding_window is None or not self.is_initialized:
            return
        view = self.dense()
        drop = view.positions <= self.seen_tokens - self.sliding_window
        if bool((drop & view.valid).any()):  # (invalid entries, e.g. padding, go whenever the layer is rebuilt)
            self.evict(drop, view)

    def detach(self) -> None:
        """Cut stored entries from any autograd graph (a trained compressor's output is trained by one chunk only)."""
        self._keys, self._values = self._keys.detach(), self._values.detach()

    def set_aux(self, aux: torch.Tensor) -> None:
        """Write the per-entry statistic back from a dense, right-aligned ``[B, H_kv, L]`` tensor."""
        aux = aux.detach().float()
        if self._aux is None:
            self._aux = torch.zeros(self._keys.shape[0], device=self.device)
        if self._uniform:
            self._view4(self._aux)[:, :, : self._width] = aux
        else:
            source, target = self._used_index()
            self._aux[source] = aux.flatten()[target]

    def nbytes(self) -> int:
        """Bytes of the storage this layer's tensors keep alive (deduplicated), spare capacity included."""
        return sum(self.storages().values())

    def storages(self) -> dict[int, int]:
        """``{data_ptr: bytes}`` of every storage the layer keeps alive."""
        return storage_bytes(
            [self._keys, self._values, self._positions, self._valid, self._aux, self._base, self._ends]
        )


class KVCache(Cache):
    """kvtune's cache: `RaggedLayer`s plus the compression policy (if any) that acts on them.

    ``policy`` is None once the `kvtune.compress` context that gave it has exited (the policy is marked
    ``released``; copies of the cache share the policy object, so they stop compressing too): the cache then only
    appends. ``prefilling`` says whether multi-token forwards are still compressed; `kvtune.generate` closes it
    after the context so that a question appended later stays intact (question-agnostic compression).
    """

    made_by: dict | None = None  # method, budget, ratio, model and tokenizer fingerprints (set by kvtune.api)
    context: ContextState | None = None  # what follow-ups need, set by kvtune.compress_context (kvtune.cache_io)

    def __init__(self, num_layers: int, policy=None, windows: list[int | None] | None = None) -> None:
        """``windows``: each layer's sliding window, None for full attention (`kvtune.attention.layer_windows`
        reads them from a model; `kvtune.new_cache` passes them)."""
        windows = [None] * num_layers if windows is None else list(windows)
        if len(windows) != num_layers:
            raise ValueError(f"{len(windows)} sliding windows given for {num_layers} layers")
        super().__init__(layers=[RaggedLayer(window) for window in windows])
        self._policy = policy
        self.prefilling = True
        self.policy_state: dict = {}  # cross-layer state a method keeps for this cache (LightTransfer's heap, ...)

    @property
    def policy(self):
        return None if getattr(self._policy, "released", False) else self._policy

    @policy.setter
    def policy(self, policy) -> None:
        self._policy = policy

    def __deepcopy__(self, memo):
        """A deep copy of the stored entries that shares the policy object (policies keep no per-cache state)."""
        memo[id(self._policy)] = self._policy
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            setattr(clone, name, copy.deepcopy(value, memo))
        return clone

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        keys.kvtune_call.layer_idx, keys.kvtune_call.cache = layer_idx, self
        return keys, values

    def offload(self, layer_idx: int, only_non_sliding: bool = True) -> None:
        """Move one layer's storage to CPU (synchronously: kvtune keeps no prefetch stream)."""
        self.layers[layer_idx].offload()

    def prefetch(self, layer_idx: int, only_non_sliding: bool = True) -> None:
        """Bring one offloaded layer back to its device."""
        self.layers[layer_idx].prefetch()

    def save(self, path: str | Path) -> Path:
        """Write the kept entries, their layout and provenance to one safetensors file (`kvtune.load_cache`)."""
        from kvtune.cache_io import save_cache  # (imported here: cache_io builds on this module)

        return save_cache(self, path)

    def nbytes(self) -> int:
        """Bytes of the storage all layers keep alive (deduplicated across layers)."""
        found: dict[int, int] = {}
        for layer in self.layers:
            found.update(layer.storages())
        return sum(found.values())

    def lengths(self) -> list[torch.Tensor]:
        """Per-layer ``[B, H_kv]`` entry counts (``[0, 0]`` for a layer that has seen no token yet)."""
        return [layer.lengths() for layer in self.layers]
