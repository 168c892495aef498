"""`kvmerger`: merge runs of adjacent, similar keys into one entry (Wang et al., "Model Tells You Where to Merge").

Per (sample, KV head), at prefill:

1. ``a_i``: attention each key received from this call's queries (H2O-style, summed over the GQA group); with
   ``normalize=True`` divided by the number of queries that could see it (`kvtune.methods.base.visible_queries`).
2. Protected, kept verbatim: the last ``recent`` entries and the ``heavy_ratio * budget`` entries with the largest
   ``a_i``.
3. Links between neighbours ``i, i+1`` (neither protected) whose key cosine similarity is above ``threshold`` may be
   joined. The budget is enforced exactly: the most similar eligible links are joined until ``budget`` sets remain;
   if too few links pass the threshold, the sets whose pivot received the least attention are evicted.
4. Each set merges into its pivot (largest ``a_i``) with Gaussian-kernel weights
   ``w_i ∝ exp(-||k_p - k_i||² / (2 sigma²))``, keys and values alike, stored at the pivot's position.
"""

import torch
import torch.nn.functional as F

from kvtune.attention import LayerContext
from kvtune.cache import Selection
from kvtune.methods.base import Policy, full_valid, per_head_counts, received_scores
from kvtune.methods.registry import register


def merge_head(
    keys: torch.Tensor,
    values: torch.Tensor,
    attention: torch.Tensor,
    budget: int,
    recent: int,
    heavy: int,
    threshold: float,
    sigma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One head's ``n`` entries -> ``budget`` entries: ``(kept positions ascending, merged keys, merged values)``."""
    n = keys.shape[0]
    protected = torch.zeros(n, dtype=torch.bool, device=keys.device)
    protected[n - min(recent, budget) :] = True
    heavy = min(heavy, budget - int(protected.sum()))
    if heavy > 0:
        protected[attention.masked_fill(protected, float("-inf")).topk(heavy).indices] = True
    similarity = F.cosine_similarity(keys[:-1].float(), keys[1:].float(), dim=-1)
    eligible = ~protected[:-1] & ~protected[1:] & (similarity > threshold)
    candidates = torch.nonzero(eligible).flatten()
    order = similarity[candidates].argsort(descending=True, stable=True)
    joined = torch.zeros(n - 1, dtype=torch.bool, device=keys.device)
    joined[candidates[order[: n - budget]]] = True
    set_id = torch.cat([joined.new_zeros(1, dtype=torch.long), (~joined).long().cumsum(0)])
    sets = int(set_id[-1]) + 1
    pivot_score = torch.full((sets,), float("-inf"), device=keys.device).scatter_reduce(
        0, set_id, attention, reduce="amax"
    )
    is_best = attention == pivot_score[set_id]
    position = torch.arange(n, device=keys.device)
    pivot = torch.full((sets,), n, device=keys.device).scatter_reduce(
        0, set_id, torch.where(is_best, position, n), reduce="amin"
    )
    distance = (keys.float() - keys[pivot[set_id]].float()).pow(2).sum(dim=-1)
    kernel = torch.exp(-distance / (2.0 * sigma**2))
    weight = kernel / torch.zeros(sets, device=keys.device).index_add(0, set_id, kernel)[set_id]
    merged_keys = torch.zeros(sets, keys.shape[1], device=keys.device).index_add(
        0, set_id, weight[:, None] * keys.float()
    )
    merged_values = torch.zeros(sets, values.shape[1], device=keys.device).index_add(
        0, set_id, weight[:, None] * values.float()
    )
    keep = torch.arange(sets, device=keys.device)
    if sets > budget:  # not enough similar neighbours: evict the least attended unprotected sets
        priority = pivot_score.masked_fill(protected[pivot], float("inf"))
        keep = priority.topk(budget).indices.sort().values
    return pivot[keep], merged_keys[keep].to(keys.dtype), merged_values[keep].to(values.dtype)


@register("kvmerger")
class KVMerger(Policy):
    needs_column_scores = True

    def __init__(
        self,
        budget=None,
        ratio=None,
        window: int = 32,
        threshold: float = 0.75,
        sigma: float = 5.0,
        heavy_ratio: float = 0.1,
        normalize: bool = False,
    ) -> None:
        super().__init__(budget, ratio, window)
        self.threshold, self.sigma, self.heavy_ratio, self.normalize = threshold, sigma, heavy_ratio, normalize

    def select(self, ctx: LayerContext, lengths: torch.Tensor, target: torch.Tensor):
        valid = full_valid(ctx)
        attention = received_scores(ctx, self.normalize, how="sum")
        counts = per_head_counts(target, lengths)
        width = int(counts.max())
        indices = torch.full_like(counts[..., None].expand(-1, -1, width), ctx.keys.shape[2]).clone()
        keys, values = ctx.keys.clone(), ctx.values.clone()
        for b in range(valid.shape[0]):
            for h in range(valid.shape[1]):
                positions = torch.nonzero(valid[b, h]).flatten()
                budget = int(counts[b, h])
                if positions.numel() <= budget:
                    indices[b, h, : positions.numel()] = positions
                    continue
                kept, merged_k, merged_v = merge_head(
                    ctx.keys[b, h, positions],
                    ctx.values[b, h, positions],
                    attention[b, h, positions],
                    budget,
                    recent=self.window,
                    heavy=int(self.heavy_ratio * budget),
                    threshold=self.threshold,
                    sigma=self.sigma,
                )
                indices[b, h, :budget] = positions[kept]
                keys[b, h, positions[kept]] = merged_k
                values[b, h, positions[kept]] = merged_v
        return Selection(indices, counts, keys, values)
