"""The public entry points: `compress` (a context manager over any forward or `generate`) and `generate`."""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicCache

from kvtune.attention import CACHE_KEYWORDS, layer_windows, use_kvtune_attention
from kvtune.cache import KVCache
from kvtune.cache_io import ContextState, copy_cache, model_fingerprint, tokenizer_fingerprint
from kvtune.methods import Policy, build
from kvtune.validation import UserError, check_contexts, check_method_args, check_questions


@cache
def _cache_keyword(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return next((name for name in CACHE_KEYWORDS if name in parameters), CACHE_KEYWORDS[-1])


def cache_kwargs(model: PreTrainedModel, cache: Cache | None) -> dict[str, Cache | None]:
    """``{keyword: cache}`` for ``model(...)``, under the name this transformers release's forward takes.

    PEFT wrappers take ``**kwargs`` and hand them to their base model, so the base model's signature decides.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_cache_keyword(type(base)): cache}


def _after_prefill(model: PreTrainedModel, args: tuple, kwargs: dict, output: object) -> None:
    """Forward hook: after a multi-token forward into a compressing cache, the policy's model-level pass."""
    cache = next((kwargs[k] for k in CACHE_KEYWORDS if kwargs.get(k) is not None), None)
    if not isinstance(cache, KVCache) or cache.policy is None or not cache.prefilling:
        return
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is None or input_ids.shape[1] < 2:
        return
    hook = getattr(cache.policy, "after_prefill", None)
    if hook is not None:
        mask = kwargs.get("attention_mask")
        hook(model, cache, input_ids, mask if mask is not None else torch.ones_like(input_ids))


def use_after_prefill(model: PreTrainedModel) -> None:
    """Make every prefill forward of ``model`` end with its cache policy's `Policy.after_prefill` (idempotent).

    This is the one place model-level passes run (KVzip's reconstruction), whoever drives the forward:
    `kvtune.generate`, `kvtune.prefill`, `kvtune.compress` around `model.generate`, the eval runner, `kvtune bench`.
    """
    if not getattr(model, "_kvtune_after_prefill", False):
        model.register_forward_hook(_after_prefill, with_kwargs=True)
        model._kvtune_after_prefill = True


def check_sliding_layers(model: PreTrainedModel, policy: Policy | None) -> list[int | None]:
    """The model's per-layer sliding windows (`kvtune.attention.layer_windows`), once ``policy`` is known to run
    beside them.

    Sliding layers keep their window exactly and are never compressed; the method compresses the full-attention
    layers. Methods that decide across all layers at once (``sliding_refusal`` says how) are refused on a model with
    sliding layers.
    """
    windows = layer_windows(model)
    sliding = [i for i, window in enumerate(windows) if window is not None]
    if policy is None or not sliding:
        return windows
    name = getattr(policy, "name", type(policy).__name__)
    inner = getattr(policy, "inner", None)
    refusal = getattr(policy, "sliding_refusal", None) or getattr(inner, "sliding_refusal", None)
    if refusal:
        raise UserError(
            f"method '{name}' cannot compress {type(model).__name__}: layers {sliding} use sliding windows and "
            f"{name} {refusal}; per-layer methods (snapkv, adakv_snapkv, tova, h2o, streaming_llm, kvmerger, random) "
            "compress its full-attention layers"
        )
    return windows


def new_cache(model: PreTrainedModel, policy: Policy | None = None) -> KVCache:
    """An empty kvtune cache for ``model``, compressed by ``policy`` (None: append only).

    Sliding layers (`check_sliding_layers`) keep their window; a model whose every layer slides leaves ``policy``
    nothing to compress (a warning says so). ``made_by`` records the method, budget and ratio and
    the model's fingerprint (`KVCache.save` writes it).
    """
    windows = check_sliding_layers(model, policy)
    if policy is not None and windows and all(window is not None for window in windows):
        warnings.warn(
            f"every layer of {type(model).__name__} uses a sliding window (kept exactly): "
            f"{getattr(policy, 'name', type(policy).__name__)} has no full-attention layer to compress",
            stacklevel=2,
        )
    use_kvtune_attention(model)
    use_after_prefill(model)
    cache = KVCache(model.config.get_text_config().num_hidden_layers, policy, windows)
    inner = getattr(policy, "inner", None)
    name = "full" if policy is None else getattr(policy, "name", type(policy).__name__)  # recorders have none
    cache.made_by = {
        "method": name + (f"+{inner.name}" if inner is not None else ""),
        "budget": getattr(policy, "budget", None),
        "ratio": getattr(policy, "ratio", None),
        "model": model_fingerprint(model),
    }
    return cache


@contextmanager
def compress(
    model: PreTrainedModel, method: str, budget: int | None = None, ratio: float | None = None, **kwargs
) -> Iterator[Policy]:
    """Within this block the model's forward passes and `model.generate` compress their KV cache with ``method``.

    A forward without a cache (or with an empty transformers cache) gets a `KVCache`; the cache it returns
    (``past_key_values`` of its output) is that compressed cache. Every multi-token forward is a prefill and is
    compressed to the budget; decode-time methods (h2o, streaming_llm, lighttransfer's streaming layers) also evict
    per generated token. On exit the caches stop compressing but stay valid: further tokens fed through them attend
    correctly, and so do copies of them (the policy is released, and copies share it). A transformers cache that
    already holds tokens cannot be compressed after the fact and is refused.
    """
    policy = build(method, budget=budget, ratio=ratio, **kwargs)
    check_sliding_layers(model, policy)
    use_kvtune_attention(model)
    use_after_prefill(model)
    caches: weakref.WeakSet[KVCache] = weakref.WeakSet()

    def attach(module, args, call_kwargs):
        if call_kwargs.get("use_cache") is False:
            return None
        cache = next((call_kwargs[k] for k in CACHE_KEYWORDS if call_kwargs.get(k) is not None), None)
        call_kwargs = {k: v for k, v in call_kwargs.items() if k not in CACHE_KEYWORDS}
        if isinstance(cache, Cache) and not isinstance(cache, KVCache):
            if cache.get_seq_length() > 0:
                raise ValueError(
                    f"kvtune.compress cannot compress a {type(cache).__name__} that already holds "
                    f"{cache.get_seq_length()} tokens (their queries are gone); inside compress, start from no cache "
                    "or an empty one, or use a kvtune cache (kvtune.new_cache) from the first token on"
                )
            if type(cache) is not DynamicCache:
                raise ValueError(
                    f"kvtune.compress replaces the model's cache with its own and cannot honour a "
                    f"{type(cache).__name__} (e.g. cache_implementation='static'); leave the cache to compress"
                )
            cache = None
        if cache is None:
            cache = new_cache(model, policy)
        elif isinstance(cache, KVCache) and cache.policy is None:
            cache.policy = policy
        if isinstance(cache, KVCache):
            caches.add(cache)
        return args, {**call_kwargs, **cache_kwargs(model, cache)}

    handle = model.register_forward_pre_hook(attach, with_kwargs=True)
    try:
        yield policy
    finally:
        handle.remove()
        policy.released = True
        for cache in caches:
            if cache.policy is policy:
                cache.policy = None


def _as_list(text: str | Sequence[str], batch: int) -> list[str]:
    return [text] * batch if isinstance(text, str) else list(text)


def _prompt_parts(
    tokenizer: PreTrainedTokenizerBase, context: str, question: str, answer_prefix: str, chat_template: bool
) -> tuple[str, str]:
    """Split the prompt into the part that may be compressed and the part appended after it."""
    if not chat_template:
        return context, question + answer_prefix
    marker = "\x00KVTUNE_SPLIT\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": context + marker + question}], tokenize=False, add_generation_prompt=True
    )
    head, tail = text.split(marker)
    return head, tail + answer_prefix


@dataclass
class PromptTokens:
    """Prompts split into the part prefilled (and compressed) and the part appended after compression.

    ``window`` is the observation window a question-aware prompt asks for (its shortest question), else None.
    """

    heads: list[list[int]]
    tails: list[list[int]]
    window: int | None


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[str],
    question: str | Sequence[str] = "",
    answer_prefix: str | Sequence[str] = "",
    question_aware: bool = False,
    chat_template: bool = False,
) -> PromptTokens:
    """Tokenise ``context + question + answer_prefix`` prompts as `generate` lays them out.

    Question-agnostic: the context is the head, question and prefix the tail. Question-aware: the question joins
    the head (its tokens are the observation window) and only the answer prefix is appended.
    """
    questions, prefixes = _as_list(question, len(contexts)), _as_list(answer_prefix, len(contexts))
    parts = [_prompt_parts(tokenizer, c, q, "", chat_template) for c, q in zip(contexts, questions)]
    heads = [tokenizer(h).input_ids for h, _ in parts]
    question_ids = [tokenizer(t, add_special_tokens=False).input_ids for _, t in parts]
    prefix_ids = [tokenizer(p, add_special_tokens=False).input_ids if p else [] for p in prefixes]
    if not question_aware:
        return PromptTokens(heads, [q + p for q, p in zip(question_ids, prefix_ids)], None)
    window = max(1, min(len(q) for q in question_ids))
    return PromptTokens([h + q for h, q in zip(heads, question_ids)], prefix_ids, window)


def append_tails(
    model: PreTrainedModel,
    cache: KVCache,
    tails: list[list[int]],
    mask: torch.Tensor,
    logits: torch.Tensor,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed the uncompressed tails after the prefill; returns the last logits and the extended mask."""
    if not any(tails):
        return logits, mask
    # Padding inside the sequence is masked like any other, so every row ends on a real token.
    tail_ids, tail_mask = left_pad(tails, pad_id)
    return prefill(model, cache, tail_ids, tail_mask, past_mask=mask)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one left-padded batch and its attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@torch.no_grad()
def prefill(
    model: PreTrainedModel,
    cache: KVCache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    past_mask: torch.Tensor | None = None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed ``input_ids`` through ``cache`` (in chunks of ``chunk`` tokens, compressing between them).

    Positions follow the cumulative mask, so padding never shifts RoPE phases. Returns the last position's logits
    and the full 2-D mask seen so far.
    """
    device = model.device
    mask = attention_mask if past_mask is None else torch.cat([past_mask, attention_mask], dim=1)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
    length = input_ids.shape[1]
    starts = list(range(0, length, chunk or length))
    if len(starts) > 1 and length - starts[-1] == 1:
        starts.pop()  # the last chunk takes the odd token: a 1-token forward is a decode step, never compressed
    done = mask.shape[1] - length
    logits = None
    for start, end in zip(starts, [*starts[1:], length]):
        out = model(
            input_ids=input_ids[:, start:end].to(device),
            attention_mask=mask[:, : done + end].to(device),
            position_ids=positions[:, start:end].to(device),
            **cache_kwargs(model, cache),
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1]
    return logits, mask


@torch.no_grad()
def compress_context(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    context: str | Sequence[str],
    method: str = "full",
    budget: int | None = None,
    ratio: float | None = None,
    chat_template: bool = False,
    prefill_chunk: int | None = None,
    **method_kwargs,
) -> KVCache:
    """Prefill ``context`` (a list: one left-padded batch) and compress it with ``method``, before any question.

    The cache returned is what `generate` answers from: pass it as ``context`` (with ``question=`` or
    ``questions=[...]``; each answer works on a copy), save it with ``cache.save(path)``, reload it with
    `kvtune.load_cache`. It keeps its policy, so decode-time methods go on evicting while answers are generated.
    """
    contexts = [context] if isinstance(context, str) else list(context)
    check_contexts(contexts)
    heads = tokenize_prompts(tokenizer, contexts, chat_template=chat_template).heads
    return _prefill_heads(model, tokenizer, heads, method, budget, ratio, prefill_chunk, chat_template, method_kwargs)


def _prefill_heads(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    heads: list[list[int]],
    method: str,
    budget: int | None,
    ratio: float | None,
    prefill_chunk: int | None,
    chat_template: bool,
    method_kwargs: dict,
) -> KVCache:
    """Validate, prefill the heads through a new cache compressed by ``method``, close its prefill; record the
    state follow-ups need (`ContextState`) and the tokenizer it was made with."""
    check_method_args(method, budget, ratio, prefill_chunk, **method_kwargs)
    full = method == "full" and budget is None and ratio is None
    policy = None if full else build(method, budget=budget, ratio=ratio, **method_kwargs)
    cache = new_cache(model, policy)
    cache.made_by |= {"method": method, "chat_template": chat_template, "tokenizer": tokenizer_fingerprint(tokenizer)}
    ids, mask = left_pad(heads, tokenizer.pad_token_id)
    logits, mask = prefill(model, cache, ids, mask, chunk=prefill_chunk or getattr(policy, "prefill_chunk", None))
    cache.prefilling = False
    cache.context = ContextState(mask, logits)
    return cache


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    context: str | Sequence[str] | KVCache,
    question: str | Sequence[str] = "",
    answer_prefix: str | Sequence[str] = "",
    method: str = "full",
    budget: int | None = None,
    ratio: float | None = None,
    max_new_tokens: int = 32,
    question_aware: bool = False,
    chat_template: bool = False,
    prefill_chunk: int | None = None,
    return_cache: bool = False,
    adapter: str | None = None,
    questions: Sequence[str] | None = None,
    **method_kwargs,
) -> str | list[str] | list[str | list[str]] | tuple[str | list[str] | list[str | list[str]], KVCache]:
    """Greedy answer(s) to ``context + question + answer_prefix`` with the KV cache compressed by ``method``.

    Question-agnostic by default: the context is compressed before the question is seen, then the question and
    answer prefix are appended intact. With ``question_aware=True`` the question is prefilled with the context and
    its tokens form the observation window. A list of contexts is answered as one left-padded batch.
    ``prefill_chunk`` prefills the context that many tokens at a time, compressing between chunks (bounded peak
    memory); methods that compress chunk by chunk (``lococo``) default to their own chunk. ``adapter`` applies a
    saved adapter first (`kvtune.load_adapter`). ``return_cache=True`` also returns the cache (``cache.nbytes()``).

    Compress once, ask many: ``questions=[...]`` prefills and compresses the context once and answers each question
    from its own copy of that cache, returning one answer per question (``return_cache``: the context's cache, as
    `compress_context` makes it). ``context`` may be such a cache itself (from `compress_context` or
    `kvtune.load_cache`); it is copied, never changed, and the method arguments do not apply.
    """
    if adapter is not None:
        from kvtune.adapters import load_adapter

        model = load_adapter(model, adapter)
    check_questions(questions, question_aware)
    if isinstance(context, KVCache):
        if method != "full" or budget is not None or ratio is not None or method_kwargs or question_aware:
            raise UserError(
                f"the context is a cache already compressed by {context.made_by or 'an unknown method'}: "
                "method, budget, ratio and question_aware do not apply to it"
            )
        if context.context is None or context.context.mask.shape[1] != context.get_seq_length():
            raise UserError(
                "this cache does not record the context it holds (mask and last logits), or tokens were appended "
                "after it: make it with kvtune.compress_context, or load one saved from such a cache"
            )
        cache = context
        chat_template = chat_template or bool((cache.made_by or {}).get("chat_template"))
        batch = cache.context.mask.shape[0]
        single = batch == 1  # one context: answers are strings, as for a string context
    else:
        single = isinstance(context, str)
        contexts = [context] if single else list(context)
        check_contexts(contexts)
        batch = len(contexts)
        if questions is None and question_aware:
            prompt = tokenize_prompts(tokenizer, contexts, question, answer_prefix, True, chat_template)
            method_kwargs.setdefault("window", prompt.window)
            args = (method, budget, ratio, prefill_chunk, chat_template, method_kwargs)
            cache = _prefill_heads(model, tokenizer, prompt.heads, *args)
            texts = _answer(model, tokenizer, cache, prompt.tails, max_new_tokens, copy=False)
            result = texts[0] if single else texts
            return (result, cache) if return_cache else result
        cache = compress_context(
            model, tokenizer, contexts, method, budget, ratio, chat_template, prefill_chunk, **method_kwargs
        )
    results = []
    for item in [question] if questions is None else questions:
        tails = tokenize_prompts(tokenizer, [""] * batch, item, answer_prefix, chat_template=chat_template).tails
        texts = _answer(model, tokenizer, cache, tails, max_new_tokens, copy=questions is not None or cache is context)
        results.append(texts[0] if single else texts)
    result = results if questions is not None else results[0]
    return (result, cache) if return_cache else result


def _answer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cache: KVCache,
    tails: list[list[int]],
    max_new_tokens: int,
    copy: bool,
) -> list[str]:
    """Append ``tails`` to the prefilled ``cache`` (or to a copy of it), then decode greedily."""
    state = cache.context
    work = copy_cache(cache) if copy else cache
    work.context = None  # it is about to hold more than the context
    logits, mask = append_tails(model, work, tails, state.mask, state.logits, tokenizer.pad_token_id)
    answers = greedy(model, work, logits, mask, max_new_tokens, tokenizer.eos_token_id)
    return [tokenizer.decode(a, skip_special_tokens=True) for a in answers]


@torch.no_grad()
def greedy(
    model: PreTrainedModel,
    cache: KVCache,
    logits: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None,
) -> list[list[int]]:
    """Greedy decoding through ``cache``, one token per step, each row until EOS or ``max_new_tokens``.

    Always without autograd: a decode step under autograd ties the cache's storage to a graph whose saved keys
    point back at the cache, a cycle through C++ that Python's collector never frees."""
    answers: list[list[int]] = [[] for _ in range(logits.shape[0])]
    finished = torch.zeros(logits.shape[0], dtype=torch.bool)
    positions = mask.sum(dim=1, keepdim=True)
    for step in range(max_new_tokens):
        token = logits.argmax(dim=-1).cpu()
        for row, value in enumerate(token.tolist()):
            if not finished[row]:
                answers[row].append(value)
        finished |= token == eos_token_id
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(
            input_ids=token[:, None].to(model.device),
            attention_mask=mask.to(model.device),
            position_ids=positions.to(model.device),
            **cache_kwargs(model, cache),
            use_cache=True,
        )
        positions = positions + 1
        logits = out.logits[:, -1]
    return answers
