"""Quality of a hybrid against the full model: chunked-perplexity text and answer NLL (speed: `kvtune bench hybrid=`).

The hybrid attends with its window throughout (as it was trained and as the export serves it), so one forward
over the whole sequence gives exactly the NLL that chunk-by-chunk processing through its bounded cache gives; the
same held-out texts and prompts as ``kvtune eval`` (tasks from `kvtune.eval.tasks`) are scored, and the first chunk
is left out of perplexity as `kvtune.eval.runner` does. KV bytes are the plan's arithmetic at the sequence length.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvtune.api import tokenize_prompts
from kvtune.eval.tasks import build_task
from kvtune.hybrid.plan import LayerPlan


def _shape(model: PreTrainedModel) -> tuple[int, int, int]:
    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return heads, head_dim, model.dtype.itemsize


def kv_bytes(model: PreTrainedModel, plan: LayerPlan | None, length: int) -> int:
    """Bytes of keys and values after ``length`` tokens: the plan's arithmetic, or a full cache without a plan."""
    layers = model.config.get_text_config().num_hidden_layers
    plan = plan or LayerPlan("full", layers, (), window=1, sinks=0)
    return plan.kv_bytes(length, *_shape(model))


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    plan: LayerPlan | None,
    context_length: int = 4096,
    samples: int = 4,
    chunk: int = 512,
    seed: int = 0,
) -> dict[str, Any]:
    """``kvtune eval task=perplexity``'s texts and scoring (tokens after the first chunk) for the model as it is."""
    task = build_task("perplexity", chunk=chunk)
    nlls = []
    for sample in task.samples(tokenizer, context_length, samples, seed):
        ids = torch.tensor([sample.meta["input_ids"]], device=model.device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        losses = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
        nlls.append(float(losses[chunk - 1 :].mean()))
    mean = sum(nlls) / len(nlls)
    return {
        "task": "perplexity",
        "score": math.exp(mean),
        "answer_nll": mean,
        "samples": len(nlls),
        "kv_bytes": kv_bytes(model, plan, context_length),
    }


@torch.no_grad()
def answer_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    plan: LayerPlan | None,
    task_name: str = "passkey",
    context_length: int = 4096,
    samples: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Teacher-forced NLL of the gold answer after ``context + question + answer prefix`` (raw text, as eval)."""
    task = build_task(task_name)
    nlls, lengths = [], []
    for sample in task.samples(tokenizer, context_length, samples, seed):
        prompt = tokenize_prompts(tokenizer, [sample.context], sample.question, sample.answer_prefix)
        head = prompt.heads[0] + prompt.tails[0]
        gold = tokenizer(sample.answers[0], add_special_tokens=False).input_ids
        ids = torch.tensor([head + gold], device=model.device)
        logits = model(input_ids=ids, use_cache=False).logits[0, len(head) - 1 : -1].float()
        nlls.append(float(F.cross_entropy(logits, torch.tensor(gold, device=model.device))))
        lengths.append(len(head))
    mean = sum(nlls) / len(nlls)
    return {
        "task": task_name,
        "answer_nll": mean,
        "samples": len(nlls),
        "kv_bytes": kv_bytes(model, plan, round(sum(lengths) / len(lengths))),
    }
