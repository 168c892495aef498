"""`lococo`: a fixed-size cache fused by a trained LoCoCo compressor (`kvtune.lococo`), chunk by chunk.

Each chunk attends to the memory plus itself; afterwards, when a layer holds more than ``mem_size + buffer``
entries, its compressor fuses them back to ``mem_size`` using the attention this chunk's queries gave (not
accumulated, as the official code). While decoding the same rule applies, so the cache cycles between ``mem_size``
and ``mem_size + buffer``. The compressor comes from the model (`kvtune.load_adapter`); in training the fused
memory keeps its graph so that the next chunk's loss reaches the compressor (its inputs are detached: the
one-step truncated gradient of the paper's code). With ``truncate=False`` (truncated backpropagation through several
chunks, `kvtune.train.module`) the memory keeps its whole graph and the training loop detaches the cache itself.
"""

import torch

from kvtune.attention import LayerContext
from kvtune.cache import Selection
from kvtune.methods.base import Policy, dense_view, full_valid, last_query_votes, received_scores
from kvtune.methods.registry import register


@register("lococo")
class LoCoCo(Policy):
    needs_column_scores = True
    evicts_during_decoding = True
    needs_adapter = True
    sliding_refusal = "fuses with adapters trained on full-attention caches of every layer"

    def __init__(
        self, budget=None, ratio=None, window: int = 32, buffer: int = 16, chunk: int = 512, truncate: bool = True
    ) -> None:
        if ratio is not None:
            raise ValueError("lococo keeps a fixed number of slots (the adapter's mem_size); ratio= does not apply")
        if buffer < 0 or chunk < 1:
            raise ValueError(f"buffer must be >= 0 and chunk >= 1, got {buffer} and {chunk}")
        self.budget, self.ratio, self.window = budget, None, window
        self.buffer, self.prefill_chunk, self.truncate = buffer, chunk, truncate
        self.replayable = False  # compression between chunks changes what later chunks see

    def on_prefill(self, ctx: LayerContext) -> None:
        self.fuse(ctx)

    def on_decode(self, ctx: LayerContext) -> None:
        self.fuse(ctx)

    def fuse(self, ctx: LayerContext) -> None:
        compressor = ctx.adapter
        if compressor is None:
            raise ValueError(
                "method 'lococo' needs a trained LoCoCo adapter on the model: kvtune.load_adapter(model, PATH) "
                "or kvtune.generate(..., method='lococo', adapter=PATH)"
            )
        if self.budget is not None and self.budget != compressor.mem_size:
            raise ValueError(f"the adapter holds mem_size={compressor.mem_size} slots; budget={self.budget} differs")
        if self.truncate:  # this chunk has attended: the memory it used stops carrying gradient from here on
            ctx.layer.detach()
        valid = full_valid(ctx)
        if int(valid.sum(dim=-1).max()) <= compressor.mem_size + self.buffer:
            return
        with torch.no_grad():  # which entries to keep is a choice, not a path for gradients
            if compressor.score_window:  # the chunk's last queries vote, each entry once (TOVA's score at 1)
                scores = last_query_votes(ctx, compressor.score_window, compressor.score_heads)
            else:  # column sums of the chunk's queries (the official), per query that saw them if normalised
                scores = received_scores(ctx, compressor.normalize_scores)  # GQA: the query group's mean
        keys, values = (ctx.keys.detach(), ctx.values.detach()) if self.truncate else (ctx.keys, ctx.values)
        keys, values, counts = compressor(keys, values, scores, valid)
        slots = torch.arange(compressor.mem_size, device=keys.device).expand(*counts.shape, -1)
        ctx.layer.compact(Selection(slots, counts, keys=keys, values=values), view=dense_view(ctx))
