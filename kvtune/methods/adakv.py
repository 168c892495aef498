"""`adakv_snapkv` and `adakv_pyramidkv`: Ada-KV's head-wise budgets (Feng et al.) on SnapKV / PyramidKV scores.

Within a layer and sample, the heads share ``H_kv * base`` past entries (``base = budget - window``): a flattened
top-k over all heads' scores says how many each head wins (``count_h``), and each head gets
``alpha * base + (1 - alpha) * count_h`` of them (a floor of ``alpha`` of the average, as in the official code),
rounded by largest remainder so that the layer's total is exact. Each head then keeps its own top entries plus the
window. Scores are averaged within each GQA group, so only ``H_kv`` ragged caches are stored (Ada-KV's GQA mode).
"""

import torch

from kvtune.attention import LayerContext
from kvtune.methods.base import full_valid, keep_top, ranks
from kvtune.methods.pyramidkv import PyramidKV
from kvtune.methods.registry import register
from kvtune.methods.snapkv import SnapKV


def adaptive_head_budgets(past_scores: torch.Tensor, base: int, alpha: float) -> torch.Tensor:
    """Per-head budgets for one sample: ``past_scores`` is ``[H_kv, L]`` (-inf where not selectable)."""
    heads = past_scores.shape[0]
    available = torch.isfinite(past_scores).sum(dim=-1)
    total = min(heads * base, int(available.sum()))
    winners = past_scores.flatten().topk(total).indices // past_scores.shape[1]
    count = torch.bincount(winners, minlength=heads).double()
    share = alpha * base + (1.0 - alpha) * count
    budgets = share.floor().long()
    missing = total - int(budgets.sum())
    if missing > 0:
        order = torch.argsort(share - budgets, descending=True, stable=True)
        budgets[order[:missing]] += 1
    return torch.minimum(budgets, available)


def adaptive_counts(
    scores: torch.Tensor, valid: torch.Tensor, target: torch.Tensor, window: int, alpha: float
) -> torch.Tensor:
    """Ada-KV's per-head counts ``[B, H_kv]``: the window plus each head's adaptive share of the past.

    ``scores`` and ``valid`` are ``[B, H_kv, L]`` in the dense view; the last ``window`` valid entries of each head
    are kept whatever their score. Samples already within ``target`` keep everything.
    """
    lengths = valid.sum(dim=-1)
    in_window = ranks(valid) >= lengths[..., None] - window
    past = scores.masked_fill(in_window | ~valid, float("-inf"))
    counts = torch.empty_like(lengths)
    for b in range(lengths.shape[0]):
        base = int(target[b]) - window
        if base <= 0 or bool((lengths[b] <= target[b]).all()):
            counts[b] = torch.minimum(lengths[b], target[b])
            continue
        counts[b] = adaptive_head_budgets(past[b], base, alpha) + window
    return torch.minimum(counts, lengths)


class _AdaKV:
    """Mixin over any policy with ``scores(ctx, window)`` (window +inf, invalid -inf): replaces uniform per-head
    counts with Ada-KV's adaptive ones."""

    def __init__(self, *args, floor_alpha: float = 0.2, heads: str = "group", **kwargs) -> None:
        if heads != "group":
            raise ValueError(f"Ada-KV allocates between heads and needs per-head scores (heads='group'), got '{heads}'")
        super().__init__(*args, heads=heads, **kwargs)
        if not 0.0 <= floor_alpha <= 1.0:
            raise ValueError(f"floor_alpha must lie in [0, 1], got {floor_alpha}")
        self.floor_alpha = floor_alpha

    def select(self, ctx: LayerContext, lengths: torch.Tensor, target: torch.Tensor):
        window = self.window_size(target)
        scores = self.scores(ctx, window)
        return keep_top(scores, adaptive_counts(scores, full_valid(ctx), target, window, self.floor_alpha))


@register("adakv_snapkv")
class AdaSnapKV(_AdaKV, SnapKV):
    pass


@register("adakv_pyramidkv")
class AdaPyramidKV(_AdaKV, PyramidKV):
    pass
