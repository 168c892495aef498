"""`kvzip`: query-agnostic eviction scored by context reconstruction (after KVzip, Kim et al., 2025,
"KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction").

After the prefill, the model is asked to repeat its context: a "repeat the previous context" prompt followed by
the context itself, teacher-forced, attending to the prefilled cache. An entry the model needs to reconstruct the
context is an entry some later question may need, so each cached entry is scored by the **maximum** attention it
receives from the reconstruction queries (per KV head: the maximum over its GQA query group as well). The
reconstruction runs chunk by chunk (``chunk`` context tokens after the prompt each time) through the prefilled cache
itself, each chunk cropped off again afterwards (no copy of the cache; each layer gains one chunk's room for the
pass). The statistic is taken inside the pass's attention (`kvtune.attention.attend_with_max_received`: one set
of fp32 probabilities per block of queries gives both the output and the maximum), so the pass costs one forward of
prompt + context over the cache, with at most one block of probabilities held at a time. Each KV head of each
layer then keeps its top entries, how many being decided by a flattened top-k (see Allocation below), so heads and
layers are ragged and memory is really freed. `time_reconstruction` measures the pass against the prefill.

Differences from the paper and from kvpress's `KVzipPress`, all deliberate:

* **Allocation.** As in the paper, one ranking over every layer's and head's entries decides what stays
  (``layerwise=False``, the default): the cache holds the budget summed over layers, split between layers and heads
  by the scores. ``layerwise=True`` gives every layer its own budget and ranks across that layer's heads only
  (Ada-KV's allocation, with its ``floor_alpha``), like kvtune's other methods.
* **Prompt.** A raw-text prompt (``REPEAT_PROMPT``) rather than the paper's chat-templated system and user turns;
  kvtune evaluates raw-text prompts by default. It is tokenised with the tokenizer saved next to the model
  (``model.config._name_or_path``), or given as token ids (``prompt=[...]``).
* **Every chunk repeats the prompt** (chunks are cut from the right, so that a left-padded row of a batch is
  chunked exactly as it would be alone) and attends to the whole prefilled context (not to earlier reconstruction
  chunks); every query of the pass votes (the prompt's too, as in kvpress's port of the authors' code), padding
  queries of a batch excepted. Later chunks use the same prompt (the authors' code and kvpress's port switch to
  "repeat the part ... starting with" plus the previous chunk's last 8 tokens).
* **Votes over the whole context.** A query's vote is its probability under the model's own attention, i.e. the
  softmax over every entry it sees, and every chunk votes for every entry. The authors' code (and kvpress's port)
  scores a chunk's queries only on the sinks, the span of context that chunk reconstructs and the chunk itself,
  with the softmax renormalised over those keys. The two agree while the context fits in one chunk (2,048 tokens
  by default); beyond it they differ.
* **Always kept:** the first ``sinks`` entries (4, as kvpress's port does) and a recent window (``window``, default
  1: the last entry, so the next token's query has its predecessor; a question-aware run sets it to the question's
  length, so the question is kept whole). Both count against the budget.
* **Chunked prefill** (``prefill_chunk``): the paper scores the whole context once, after a full prefill, which
  needs the whole cache in memory. kvtune keeps chunked prefill bounded instead: once the cache exceeds its budget,
  each pass reconstructs only the tokens not reconstructed yet (the chunk just fed, plus any fed while the cache was
  within budget), over what the cache holds (the entries earlier chunks kept, and the new ones). Each entry's best
  score so far travels with it (the layer's ``aux``, 4 bytes an entry) and the top entries are kept by those scores.
  So the work per chunk is one chunk's reconstruction over about the budget, not over all context seen; an entry
  gets votes only from reconstructions of its own and later chunks, and evicted entries are never attended again.
  Without chunking (a one-shot prefill) every token is reconstructed over the whole context, as above.
* **Memory.** The full prefilled cache is held until the selection (the scores need every layer's), plus one
  chunk's room per layer during the pass; a one-shot kvzip prefill therefore peaks above the full cache, while the
  other methods release each layer as they go. Chunked prefill (above) is the bounded-memory way to run it.
* No softmax-normalisation tweaks, no KVzip+ head scores; scores are in fp32.

Replays (`kvtune.replay`) share one set of scores between every budget of the same recorded prefill.
"""

from __future__ import annotations

import dataclasses
import time
from functools import cache

import torch
from transformers import AutoTokenizer

from kvtune.attention import LayerContext
from kvtune.cache import KVCache
from kvtune.methods.adakv import adaptive_counts
from kvtune.methods.base import Policy, keep_top, protect_sinks, window_then_past
from kvtune.methods.registry import register

REPEAT_PROMPT = "\n\nRepeat the previous context exactly.\n"


class _MaxAttention:
    """The reconstruction pass's policy: records, per layer, the most attention each entry held before the pass
    received from one query of the pass (computed inside the attention call, `attend_with_max_received`). It
    compresses nothing."""

    needs_column_scores = False
    needs_max_received = True

    def __init__(self) -> None:
        self.scores: dict[int, torch.Tensor] = {}

    def on_prefill(self, ctx: LayerContext) -> None:
        held = ctx.keys.shape[2] - ctx.query.shape[2]
        votes = ctx.max_received[..., :held]
        previous = self.scores.get(ctx.layer_idx)
        self.scores[ctx.layer_idx] = votes if previous is None else torch.maximum(previous, votes)

    def on_decode(self, ctx: LayerContext) -> None:
        return None


@cache
def _tokenizer(source: str):
    return AutoTokenizer.from_pretrained(source)


def prompt_ids(model: torch.nn.Module, prompt: str | list[int]) -> list[int]:
    """The reconstruction prompt as token ids (a string is tokenised with the model's saved tokenizer)."""
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    source = getattr(model.config, "_name_or_path", "")
    if not source:
        raise ValueError("kvzip tokenises its prompt with the model's saved tokenizer; pass prompt=[token ids]")
    return _tokenizer(source)(prompt, add_special_tokens=False).input_ids


@torch.no_grad()
def reconstruction_scores(
    model: torch.nn.Module,
    cache: KVCache,
    context_ids: torch.Tensor,
    context_mask: torch.Tensor,
    past_mask: torch.Tensor,
    prompt: list[int],
    chunk: int,
) -> list[torch.Tensor]:
    """Per layer ``[B, H_kv, L]`` (L: the layer's dense width now): the max attention each entry receives while the
    model repeats ``context_ids`` (``[B, T]``, with ``context_mask``) after ``prompt``, chunk by chunk.

    ``past_mask`` is the 2-D mask of every token ``cache`` has seen (positions follow it). Each chunk is fed through
    ``cache`` itself and cropped off again, so no copy of the cache is made: the first chunk grows each layer's
    buffer by one chunk's room, later chunks reuse it, and the cache leaves exactly as it came in (plus that spare).
    """
    from kvtune.api import prefill  # the api imports the methods package

    batch = context_ids.shape[0]
    prompt_block = torch.tensor([prompt] * batch, dtype=context_ids.dtype, device=context_ids.device)
    scorer, seen = _MaxAttention(), [layer.seen_tokens for layer in cache.layers]
    policy, prefilling = cache.policy, cache.prefilling
    cache.policy, cache.prefilling = scorer, True
    try:
        for end in range(context_ids.shape[1], 0, -chunk):  # from the right: a left-padded row chunks as alone
            start = max(0, end - chunk)
            ids = torch.cat([prompt_block, context_ids[:, start:end]], dim=1)
            mask = torch.cat([torch.ones_like(prompt_block), context_mask[:, start:end]], dim=1)
            prefill(model, cache, ids, mask, past_mask=past_mask)
            for layer, length in zip(cache.layers, seen):
                layer.crop(length)
    finally:
        for layer, length in zip(cache.layers, seen):
            layer.crop(length)
        cache.policy, cache.prefilling = policy, prefilling
    return [scorer.scores[i] for i in range(len(cache.layers))]


@register("kvzip")
class KVzip(Policy):
    composable = False  # its selection runs after the prefill, not inside a router's layer calls
    sliding_refusal = "selects over all layers at once after the prefill"

    def __init__(
        self,
        budget=None,
        ratio=None,
        window: int = 1,
        floor_alpha: float = 0.0,
        chunk: int = 2048,
        prompt: str | list[int] = REPEAT_PROMPT,
        layerwise: bool = False,
        sinks: int = 4,
    ) -> None:
        super().__init__(budget, ratio, window)
        if not 0.0 <= floor_alpha <= 1.0:
            raise ValueError(f"floor_alpha must lie in [0, 1], got {floor_alpha}")
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 token, got {chunk}")
        if not prompt:
            raise ValueError("kvzip needs a non-empty reconstruction prompt")
        if sinks < 0:
            raise ValueError(f"sinks must be at least 0, got {sinks}")
        self.floor_alpha, self.chunk, self.layerwise, self.sinks = floor_alpha, chunk, layerwise, sinks
        self.prompt = prompt if isinstance(prompt, str) else [int(t) for t in prompt]

    def on_prefill(self, ctx: LayerContext) -> None:
        """Nothing per layer: the scores need the whole prefilled cache (see `after_prefill`)."""

    def after_prefill(self, model, cache: KVCache, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Reconstruct the tokens not yet reconstructed, once the cache holds more than the budget, and keep the
        top entries by their scores (each entry's best score so far travels with it as the layer's ``aux``)."""
        state = cache.policy_state
        first = "kvzip_mask" not in state
        new_ids, new_mask = input_ids.cpu(), attention_mask[:, -input_ids.shape[1] :].cpu()
        state["kvzip_mask"] = new_mask if first else torch.cat([state["kvzip_mask"], new_mask], dim=1)
        pending = state.pop("kvzip_pending", None)  # tokens fed while the cache was within its budget
        if pending is not None:
            new_ids, new_mask = torch.cat([pending[0], new_ids], dim=1), torch.cat([pending[1], new_mask], dim=1)
        lengths = cache.lengths()
        targets = [self.target(held) for held in lengths]
        if all(bool((held <= target[:, None]).all()) for held, target in zip(lengths, targets)):
            state["kvzip_pending"] = (new_ids, new_mask)
            return
        shared = state.get("recording") if first else None  # a replay shares scores between budgets
        key = ("kvzip", tuple(prompt_ids(model, self.prompt)), self.chunk)
        if shared is not None and key in shared:
            votes = shared[key]
        else:
            device = model.device
            ids, mask, past = new_ids.to(device), new_mask.to(device), state["kvzip_mask"].to(device)
            votes = reconstruction_scores(model, cache, ids, mask, past, list(key[1]), self.chunk)
            if shared is not None:
                shared[key] = votes
        views = [layer.dense() for layer in cache.layers]
        if any(view.keys.shape[2] != layer_votes.shape[-1] for view, layer_votes in zip(views, votes)):
            raise RuntimeError("kvzip: the reconstruction pass did not see the layers' entries where they are")
        scores = [v if view.aux is None else torch.maximum(view.aux, v) for view, v in zip(views, votes)]
        valids = [view.valid.expand(view.keys.shape[0], view.keys.shape[1], -1) for view in views]
        windows = [self.window_size(target) for target in targets]
        ranked = [protect_sinks(window_then_past(s, v, w), v, self.sinks) for s, v, w in zip(scores, valids, windows)]
        if self.layerwise:
            counts = [
                adaptive_counts(r, v, t, w, self.floor_alpha) for r, v, t, w in zip(ranked, valids, targets, windows)
            ]
        else:
            counts = global_counts(ranked, valids, targets)
        for layer, view, layer_scores, layer_ranked, layer_counts, held in zip(
            cache.layers, views, scores, ranked, counts, lengths
        ):
            if torch.equal(layer_counts, held):
                layer.set_aux(layer_scores)
                layer.trim()  # the reconstruction's room
            else:
                layer.compact(keep_top(layer_ranked, layer_counts), dataclasses.replace(view, aux=layer_scores))


def global_counts(
    ranked: list[torch.Tensor], valids: list[torch.Tensor], targets: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Per layer ``[B, H_kv]`` counts from one ranking of every layer's and head's entries (KVzip's global
    selection): the layers' summed budget is kept, protected (+inf) entries included, and the split between layers
    and heads follows the scores."""
    counts = [valid.sum(dim=-1) for valid in valids]
    heads = ranked[0].shape[1]
    for b in range(ranked[0].shape[0]):
        if all(int(c[b].max()) <= int(t[b]) for c, t in zip(counts, targets)):
            continue
        protected = [torch.isposinf(r[b]).sum(dim=-1) for r in ranked]
        past = [r[b].masked_fill(torch.isinf(r[b]), float("-inf")) for r in ranked]  # neither padding nor protected
        flat = torch.cat([p.flatten() for p in past])
        total = sum(heads * int(t[b]) - int(p.sum()) for t, p in zip(targets, protected))
        winners = flat.topk(max(0, min(total, int(torch.isfinite(flat).sum())))).indices
        start = 0
        for layer, p in enumerate(past):
            mine = winners[(winners >= start) & (winners < start + p.numel())] - start
            won = torch.bincount(mine // p.shape[1], minlength=heads)
            counts[layer][b] = torch.minimum(won + protected[layer], counts[layer][b])
            start += p.numel()
    return counts


@torch.no_grad()
def time_reconstruction(model, input_ids: torch.Tensor, budget: int, **kwargs) -> dict[str, float]:
    """Seconds of a plain prefill of ``input_ids`` and of kvzip's reconstruction scoring after it (for `kvtune bench`).

    Timings on a shared CPU are noisy; the ratio is what to read.
    """
    from kvtune.api import new_cache, prefill

    policy = KVzip(budget=budget, **kwargs)
    cache = new_cache(model)
    mask = torch.ones_like(input_ids)
    start = time.perf_counter()
    prefill(model, cache, input_ids, mask)
    prefill_s = time.perf_counter() - start
    ids = prompt_ids(model, policy.prompt)
    start = time.perf_counter()
    reconstruction_scores(model, cache, input_ids, mask, mask, ids, policy.chunk)
    scoring_s = time.perf_counter() - start
    return {"prefill_s": prefill_s, "reconstruction_s": scoring_s, "ratio": scoring_s / prefill_s}
