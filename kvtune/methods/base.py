"""The policy interface every compression method implements, and the selection helpers they share.

A policy sees one layer's attention call at a time (`kvtune.attention.LayerContext`) and tells the layer what to
keep with `RaggedLayer.compact`. Positions always index the layer's dense, right-aligned view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvtune.attention import LayerContext, allowed_mask, softcapped
from kvtune.cache import AttentionCall, DenseView, KVCache, RaggedLayer, Selection
from kvtune.validation import UserError, check_budget, check_count, check_ratio


class Policy:
    """Base policy: resolves the budget, compresses at prefill when a sample exceeds it, keeps decode untouched.

    ``budget`` is the average number of entries kept per KV head per layer, observation window included;
    ``ratio`` (the fraction removed, kvpress's convention) is the alternative, resolved per sample.
    """

    name = "base"
    needs_column_scores = False
    reads_decode_attention = False  # a decoding step's policy reads its query's attention probabilities
    evicts_during_decoding = False
    accumulates_while_decoding = False  # every decoding step feeds the policy's statistic (H2O), evicting or not
    decode_interval = 1  # decoding steps per eviction (`set_decode_interval`); 1: every step, as the papers do
    released = False  # set when the `kvtune.compress` block that made it exits: caches stop applying it
    sliding_refusal: str | None = None  # why the method cannot run beside sliding layers (None: it can)

    def __init__(self, budget: int | None = None, ratio: float | None = None, window: int = 32) -> None:
        if budget is not None and ratio is not None:
            raise UserError("give either budget= or ratio=, not both")
        if budget is None and ratio is None:
            raise UserError(f"method '{self.name}' needs budget= (entries per KV head per layer) or ratio=")
        check_budget(budget)
        check_ratio(ratio)
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.budget, self.ratio, self.window = budget, ratio, window

    # ---- budgets ----------------------------------------------------------------------------------------------------
    def target(self, lengths: torch.Tensor) -> torch.Tensor:
        """Entries to keep per sample (``[B]``) given the valid entries per (b, h) ``lengths``."""
        n = lengths.max(dim=1).values
        if self.ratio is not None:
            return torch.clamp(torch.round(n.float() * (1.0 - self.ratio)).long(), min=1)
        return torch.clamp(n, max=self.budget)

    def layer_target(self, ctx: LayerContext, lengths: torch.Tensor) -> torch.Tensor:
        """Per-sample target of this layer (PyramidKV-style policies override it)."""
        return self.target(lengths)

    def window_size(self, target: torch.Tensor | int) -> int:
        """Observation window, never larger than the smallest budget it must fit in."""
        return max(1, min(self.window, target if isinstance(target, int) else int(target.min())))

    def queries_needed(self) -> int:
        """How many of the last prompt queries the policy reads (what a truncated recording must keep)."""
        return self.window

    # ---- hooks --------------------------------------------------------------------------------------------------
    @property
    def acts_on_decode(self) -> bool:
        """Whether `on_decode` does anything: attention skips building a context per token otherwise."""
        return self.evicts_during_decoding or type(self).on_decode is not Policy.on_decode

    def acts_on_decode_step(self, call: AttentionCall) -> bool:
        """Whether this decoding step of ``call``'s layer needs `on_decode`; when not, attention builds no context
        and computes no probabilities for it (the point of a `decode_interval` above 1)."""
        if not self.acts_on_decode:
            return False
        return not self.evicts_during_decoding or self.accumulates_while_decoding or self.decode_due(call.layer)

    def set_decode_interval(self, interval: int) -> None:
        """Evict every ``interval`` decoding steps instead of every step (kvpress's ``compression_interval``): the
        layer grows to ``budget + interval`` entries per head, then the policy cuts it back to ``budget`` in one
        selection (so it holds at most ``budget + interval - 1`` between steps). The steps in between are plain
        appends, which is what makes decoding as fast as an uncompressed cache of the budget's size."""
        check_count("decode_interval")(interval)
        if interval > 1 and self.budget is None:
            raise UserError("decode_interval > 1 needs budget= (the size the cache returns to), not ratio=")
        self.decode_interval = interval

    def decode_due(self, layer: RaggedLayer) -> bool:
        """Whether a decoding step evicts: every step at interval 1, else once the layer holds ``budget + interval``
        entries per head on average (Ada-KV's heads differ; their mean is the budget)."""
        return self.decode_interval == 1 or layer.mean_length() >= self.budget + self.decode_interval

    def on_prefill(self, ctx: LayerContext) -> None:
        evict_to(self, ctx, self.layer_target(ctx, valid_lengths(ctx)))

    def on_decode(self, ctx: LayerContext) -> None:
        """Called for decoding steps (`acts_on_decode_step`). Evicting methods keep the cache from growing past its
        budget."""
        if self.evicts_during_decoding and self.decode_due(ctx.layer):
            evict_to(self, ctx, self.decode_target(valid_lengths(ctx)))

    def after_prefill(
        self, model: torch.nn.Module, cache: KVCache, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> None:
        """Called once every layer has seen a prefill forward (``input_ids`` and the full ``attention_mask`` so far),
        with the model: for methods that score with extra forward passes (`kvzip`). Default: nothing."""

    def decode_target(self, lengths: torch.Tensor) -> torch.Tensor:
        """Size to hold after a decoding step's eviction: the budget, or the size before this step once that is
        larger (a question appended after compression stays). With a `decode_interval` of N, the size N steps
        ago: the last N entries' worth goes at once, and a question longer than N is cut back to the budget."""
        held = lengths.max(dim=1).values
        before = held - self.decode_interval
        cap = before if self.budget is None else torch.full_like(before, self.budget)
        return torch.maximum(cap, before)

    def select(self, ctx: LayerContext, lengths: torch.Tensor, target: torch.Tensor) -> Selection:
        """What to keep so that sample ``b`` holds ``target[b]`` entries per head (on average, for Ada-KV)."""
        raise NotImplementedError


# ---- helpers shared by the methods ------------------------------------------------------------------------------
def evict_to(policy: Policy, ctx: LayerContext, target: torch.Tensor, aux: torch.Tensor | None = None) -> None:
    """Compact the layer to ``target[b]`` entries per head with the policy's own selection, if it holds more."""
    lengths = valid_lengths(ctx)
    if bool((lengths <= target[:, None]).all()):
        if aux is not None:
            ctx.layer.set_aux(aux)
        return
    # Evicting every few steps, the layer is rebuilt without holes: marked holes would make it look full again.
    lazy = policy.decode_interval == 1
    ctx.layer.compact(policy.select(ctx, lengths, target), view=dense_view(ctx, aux), lazy=lazy)


def over_by_one(ctx: LayerContext, target: torch.Tensor) -> bool:
    """Whether every head holds exactly one valid entry more than ``target``: a decoding step's eviction."""
    return bool((valid_lengths(ctx) == target[:, None] + 1).all())


def dense_view(ctx: LayerContext, aux: torch.Tensor | None = None) -> DenseView:
    return DenseView(ctx.keys, ctx.values, ctx.valid, ctx.aux if aux is None else aux, ctx.layer, ctx.positions)


def full_valid(ctx: LayerContext) -> torch.Tensor:
    """``[B, H_kv, L]`` validity."""
    return ctx.valid.expand(ctx.keys.shape[0], ctx.keys.shape[1], -1)


def valid_lengths(ctx: LayerContext) -> torch.Tensor:
    return full_valid(ctx).sum(dim=-1)


def ranks(valid: torch.Tensor, age: torch.Tensor | None = None) -> torch.Tensor:
    """Index of each entry among the valid entries of its head (oldest = 0); garbage where invalid.

    ``age`` (the entries' positions, see `age_positions`) ranks by position instead of storage order."""
    if age is None:
        return valid.long().cumsum(dim=-1) - 1
    order = age.long().expand_as(valid).masked_fill(~valid, torch.iinfo(torch.long).max).argsort(dim=-1, stable=True)
    slots = torch.arange(valid.shape[-1], device=valid.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, slots)


def age_positions(ctx: LayerContext) -> torch.Tensor | None:
    """The entries' positions when the layer's storage order is no longer age order (in-place decode evictions,
    `kvtune.cache.RaggedLayer.replace`), for the helpers' ``age`` argument; None while storage order is age order."""
    if ctx.layer.in_age_order:
        return None
    return ctx.positions if ctx.positions is not None else ctx.layer.dense().positions


def keep_top(scores: torch.Tensor, counts: torch.Tensor) -> Selection:
    """The ``counts[b, h]`` best positions of each head, in ascending position order.

    ``scores`` is ``[B, H_kv, L]``; use +inf to force an entry in and -inf for invalid ones.
    """
    width = int(counts.max())
    top = scores.topk(width, dim=-1).indices
    beyond = torch.arange(width, device=scores.device) >= counts[..., None]
    top = top.masked_fill(beyond, scores.shape[-1])
    return Selection(top.sort(dim=-1).values, counts)


def protect_recent(
    scores: torch.Tensor, valid: torch.Tensor, recent: torch.Tensor | int, age: torch.Tensor | None = None
) -> torch.Tensor:
    """+inf on the last ``recent`` valid entries of each head (``recent`` may be per sample ``[B]``)."""
    rank = ranks(valid, age)
    if isinstance(recent, torch.Tensor):
        recent = recent[:, None, None]
    tail = rank >= valid.sum(dim=-1, keepdim=True) - recent
    return scores.masked_fill(tail & valid, float("inf"))


def protect_sinks(
    scores: torch.Tensor, valid: torch.Tensor, sinks: int, age: torch.Tensor | None = None
) -> torch.Tensor:
    return scores.masked_fill((ranks(valid, age) < sinks) & valid, float("inf"))


def group_reduce(per_query_head: torch.Tensor, group: int, how: str = "mean") -> torch.Tensor:
    """``[B, H, L]`` -> ``[B, H_kv, L]`` by averaging (or summing) each KV head's query group."""
    grouped = per_query_head.unflatten(1, (-1, group))
    return grouped.mean(dim=2) if how == "mean" else grouped.sum(dim=2)


def visible_queries(ctx: LayerContext) -> torch.Tensor:
    """How many of this call's queries could attend to each entry: ``[1, 1, L]`` (float, >= 1).

    Column sums of attention give an entry one vote per query that could see it, so under causal attention the
    oldest entries collect the most votes whatever their use. Entries stored before this call were visible to all
    ``q`` queries; the call's own ``j``-th token (keys' last ``q`` entries) to ``q - j`` of them. Derived from the
    call's shape because the cache does not yet record an absolute position per entry; where it does, this is
    the one place to count from positions instead.
    """
    length, queries = ctx.keys.shape[2], ctx.query.shape[2]
    own = torch.arange(length, device=ctx.keys.device) - (length - queries)  # index within this call's tokens
    return (queries - own.clamp(min=0)).clamp(min=1).to(torch.float32)[None, None]


def received_scores(ctx: LayerContext, normalize: bool, how: str = "mean") -> torch.Tensor:
    """``[B, H_kv, L]`` attention each entry received from this call's queries, reduced over each GQA group.

    ``normalize`` divides by `visible_queries` (mean attention per query that could see the entry, as kvpress's
    observed-attention press does) instead of the plain column sum that favours old entries.
    """
    scores = ctx.column_scores / visible_queries(ctx) if normalize else ctx.column_scores
    return group_reduce(scores, ctx.group_size, how=how)


def window_attention(ctx: LayerContext, window: int) -> torch.Tensor:
    """Softmax attention (fp32) of the last ``window`` queries over every key: ``[B, H, window, L]``."""
    group = ctx.group_size
    query = ctx.query[:, :, -window:].float()
    keys = ctx.keys.float().repeat_interleave(group, dim=1)
    logits = softcapped(torch.matmul(query, keys.transpose(2, 3)) * ctx.scaling, ctx.softcap)
    allowed = allowed_mask(ctx.valid, ctx.query.shape[2], rows=window)
    if allowed.shape[1] > 1:
        allowed = allowed.repeat_interleave(group, dim=1)
    return logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)


def last_query_votes(ctx: LayerContext, window: int, heads: str = "layer") -> torch.Tensor:
    """``[B, H_kv, L]``: the attention the last ``window`` queries of this call gave each entry, averaged over them
    and over every query head of the layer (``heads="layer"``: TOVA's score, the same for every KV head) or over each
    KV head's query group (``"group"``). Unlike column sums, every entry of the cache gets the same number of votes,
    so old entries do not win by having been seen by more queries. A single query's probabilities come from attention
    itself when it computed them (``ctx.column_scores``)."""
    if ctx.query.shape[2] == 1 and ctx.column_scores is not None:
        received = ctx.column_scores
    else:
        received = window_attention(ctx, min(window, ctx.query.shape[2])).mean(dim=2)  # [B, H, L]
    if heads == "layer":
        return received.mean(dim=1, keepdim=True).expand(-1, ctx.keys.shape[1], -1)
    return group_reduce(received, ctx.group_size)


def snapkv_scores(
    ctx: LayerContext, window: int, kernel: int = 7, pooling: str = "max", heads: str = "group"
) -> torch.Tensor:
    """SnapKV's score per KV head: window attention averaged over queries and the GQA group (``heads="group"``) or
    over every head of the layer (``"layer"``: the same score, hence the same selection, for every KV head), then
    pooled."""
    received = window_attention(ctx, window).mean(dim=2)
    if heads == "layer":
        scores = received.mean(dim=1, keepdim=True).repeat(1, ctx.keys.shape[1], 1)
    else:
        scores = group_reduce(received, ctx.group_size)
    scores[..., -window:] = 0.0  # as in SnapKV, the window's own votes do not spill into the past when pooling
    if kernel > 1:
        pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
        flat = scores.flatten(0, 1)[:, None]
        scores = pool(flat, kernel_size=kernel, stride=1, padding=kernel // 2).view_as(scores)
    return scores


def window_then_past(
    scores: torch.Tensor, valid: torch.Tensor, window: int, age: torch.Tensor | None = None
) -> torch.Tensor:
    """Invalid entries -inf, the observation window +inf: what every SnapKV-style selection starts from."""
    scores = scores.masked_fill(~valid, float("-inf"))
    return protect_recent(scores, valid, window, age)


def per_head_counts(target: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Uniform per-head counts: every head keeps ``target[b]`` entries (or all it has)."""
    return torch.minimum(target[:, None].expand_as(lengths), lengths)


# ---- decoding steps in place (`kvtune.cache.RaggedLayer.replace`) --------------------------------------------------
def steady_decode_length(policy: Policy, ctx: LayerContext) -> int | None:
    """The decoding steady state: a single query, and a rectangular layer (its own storage, every entry valid) whose
    heads each hold ``length`` entries, one more than the policy keeps (`Policy.decode_target`). One entry per head
    then goes, and the new one takes its slot in place. None otherwise (the general selection runs), and always
    with a `Policy.decode_interval` above 1 (its evictions are many entries at once)."""
    if ctx.query.shape[2] != 1 or policy.decode_interval > 1:
        return None
    length = ctx.layer.steady_length(ctx.keys)
    if length is None or length < 2 or (policy.budget is not None and length <= policy.budget):
        return None
    return length


def newest(positions: torch.Tensor, count: int) -> torch.Tensor:
    """``[B, H_kv, L]`` bool: the ``count`` most recent entries of each head, by position (storage order may not be
    age order). A head's positions are distinct, so the threshold is its ``count``-th largest: a selection, not the
    sort of ``count`` entries that ``topk`` makes (a decoding step asks this on every layer)."""
    if count == 1:
        return positions == positions.amax(dim=-1, keepdim=True)
    return positions >= positions.kthvalue(positions.shape[-1] - count + 1, dim=-1, keepdim=True).values


def least_scored_slot(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[B, H_kv, 1]``: each head's entry of lowest score, the oldest of equal ones (as the storage-order argmin
    chose while storage order was age order)."""
    lowest = scores.amin(dim=-1, keepdim=True)
    later = torch.iinfo(positions.dtype).max
    return positions.masked_fill(scores != lowest, later).argmin(dim=-1, keepdim=True)
