"""LoCoCo's compressor (Cai et al., ICML 2024): fuse a layer's KV entries into a fixed number of slots.

Faithful to the official code (``memory_compressor.py``): half of the ``mem_size`` slots keep the entries with the
highest attention scores verbatim; the other half are convex-ish mixtures of the remaining entries, with weights
``W = (1 - λ) · R + λ · softmax(ReLU(Conv1d(concat(K, V))))`` over tokens, where ``R`` is a one-hot pick of the
next-best entries and λ a learnable scalar. The same weights fuse keys and values; the official ``local_len`` option
forces the most recent entries into the verbatim half. Deliberate differences, each
documented in `docs/lococo.md`: scores and compression per KV head (GQA), an explicit bias initialisation, rows
with padding or fewer valid entries than slots handled exactly, and options: ``blend="sigmoid"`` (λ = σ(θ),
so that a start near the one-hot pick still passes gradient to the conv), ``normalize_scores`` (the policy ranks
entries by attention per query that could see them, `kvtune.methods.base.visible_queries`) and ``score_window``
(the policy ranks entries by the attention of the chunk's last queries only, `kvtune.methods.base.last_query_votes`:
TOVA's score at 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kvtune.methods.base import protect_recent


def _valid_first(mask: torch.Tensor) -> torch.Tensor:
    """Positions along the last axis with the ``True`` entries first, each group in positional order."""
    return torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices


def _take(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``source[b, h, index[b, h, i]]`` for ``[B, H, L, d]`` sources."""
    return source.gather(2, index[..., None].expand(-1, -1, -1, source.shape[-1]))


class LoCoCoCompressor(nn.Module):
    """One layer's compressor, shared by the layer's KV heads (heads go through the conv's batch axis)."""

    def __init__(
        self,
        head_dim: int,
        mem_size: int,
        keep_rate: float = 0.5,
        kernel_size: int = 21,
        lambda_init: float = 0.5,
        init_std: float = 1.0,
        local_len: int = 0,
        blend: str = "linear",
        normalize_scores: bool = False,
        score_window: int = 0,
        score_heads: str = "layer",
    ) -> None:
        super().__init__()
        if mem_size < 2:
            raise ValueError(f"mem_size must be at least 2 slots, got {mem_size}")
        if not 0.0 < keep_rate < 1.0:
            raise ValueError(f"keep_rate must lie in (0, 1), got {keep_rate}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same-length convolution), got {kernel_size}")
        self.mem_size = mem_size
        self.fused = int(mem_size * (1.0 - keep_rate))
        self.verbatim = mem_size - self.fused
        if not 0 <= local_len <= self.verbatim:
            raise ValueError(f"local_len must lie in [0, {self.verbatim}] (the verbatim slots), got {local_len}")
        if blend not in ("linear", "sigmoid"):
            raise ValueError(f"blend must be 'linear' (the official λ) or 'sigmoid' (λ = σ(θ)), got {blend!r}")
        if blend == "sigmoid" and not 0.0 < lambda_init < 1.0:
            raise ValueError(f"blend='sigmoid' needs lambda_init in (0, 1) (σ never reaches 0 or 1), got {lambda_init}")
        if score_window < 0 or score_heads not in ("layer", "group"):
            raise ValueError(
                f"score_window must be >= 0 and score_heads 'layer' or 'group', got {score_window}, {score_heads!r}"
            )
        self.local_len, self.blend_mode, self.normalize_scores = local_len, blend, normalize_scores
        self.score_window, self.score_heads = score_window, score_heads
        self.conv = nn.Conv1d(2 * head_dim, self.fused, kernel_size, padding=kernel_size // 2)
        # the raw parameter: λ itself ("linear"), or its logit ("sigmoid");
        # shape [1] as in the official code (a 0-dim parameter breaks DeepSpeed's broadcast)
        start = math.log(lambda_init / (1.0 - lambda_init)) if blend == "sigmoid" else lambda_init
        self.blend = nn.Parameter(torch.tensor([float(start)]))
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) weights as the official code (std 1), and a zero bias it forgot to initialise."""
        nn.init.normal_(self.conv.weight, 0.0, self.init_std)
        nn.init.zeros_(self.conv.bias)

    @property
    def blend_weight(self) -> torch.Tensor:
        """λ, the weight of the conv's soft distributions against the one-hot picks."""
        return torch.sigmoid(self.blend) if self.blend_mode == "sigmoid" else self.blend

    def mixing_weights(self, tokens: torch.Tensor, scores: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        """``[B, H, C, N]`` weights of the fused slots over the ``N`` remaining entries (``rest`` marks real ones)."""
        batch, heads, length, _ = tokens.shape
        logits = F.relu(self.conv(tokens.flatten(0, 1).transpose(1, 2).to(self.conv.weight.dtype)))
        # a finite floor, not -inf: a row with nothing to fuse (it keeps its entries verbatim) must not make NaNs
        floor = torch.finfo(torch.float32).min
        soft = logits.view(batch, heads, self.fused, length).float().masked_fill(~rest[:, :, None, :], floor)
        soft = soft.softmax(dim=-1)
        picks = scores.masked_fill(~rest, float("-inf")).topk(self.fused, dim=-1).indices.sort(dim=-1).values
        one_hot = torch.zeros_like(soft).scatter_(-1, picks[..., None], 1.0)
        blend = self.blend_weight
        return (1.0 - blend) * one_hot + blend * soft

    def forward(
        self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compress ``[B, H_kv, L, d]`` entries to ``mem_size`` slots per head: ``(keys, values, counts)``.

        ``scores`` (``[B, H_kv, L]``) is the attention each entry received from the last forward's queries;
        ``valid`` marks real entries. Slots are ordered [verbatim | fused]; the last ``local_len`` valid entries are
        always verbatim. Rows holding ``mem_size`` entries or fewer keep them all (``counts`` says how many of the
        slots are real).
        """
        counts = valid.sum(dim=-1)
        scores = scores.float().masked_fill(~valid, float("-inf"))
        ranked = protect_recent(scores, valid, self.local_len) if self.local_len else scores
        verbatim = ranked.topk(self.verbatim, dim=-1).indices.sort(dim=-1).values
        rest = valid.clone().scatter_(-1, verbatim, False)
        order = _valid_first(rest)  # the remaining entries, contiguous and in cache order, as the conv expects
        width = int(rest.sum(dim=-1).max())
        order = order[..., :width]
        rest_sorted = rest.gather(-1, order)
        rest_keys, rest_values = _take(keys, order), _take(values, order)
        tokens = torch.cat([rest_keys, rest_values], dim=-1) * rest_sorted[..., None]
        weights = self.mixing_weights(tokens, scores.gather(-1, order), rest_sorted).to(keys.dtype)
        compressed_keys = torch.cat([_take(keys, verbatim), weights @ rest_keys], dim=2)
        compressed_values = torch.cat([_take(values, verbatim), weights @ rest_values], dim=2)
        small = counts <= self.mem_size
        if bool(small.any()):  # rows that fit keep their entries verbatim, first-aligned
            fit = _valid_first(valid)[..., : self.mem_size]
            compressed_keys = torch.where(small[..., None, None], _take(keys, fit), compressed_keys)
            compressed_values = torch.where(small[..., None, None], _take(values, fit), compressed_values)
        return compressed_keys, compressed_values, torch.clamp(counts, max=self.mem_size)
