"""Shared fixtures: the embedded SmolLM2 (loaded once per session) and tiny random Llama models."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvtune


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer): the embedded model, routed through kvtune's attention by the tests that use it."""
    return kvtune.load_model("embedded")


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """The embedded model's tokenizer alone (task generators count lengths in its tokens)."""
    return kvtune.models.load_tokenizer("embedded")


@pytest.fixture(scope="session")
def stock_embedded():
    """A second copy that keeps transformers' own SDPA attention: the reference for exactness."""
    model, _ = kvtune.load_model("embedded")
    return model


def tiny_llama(layers: int = 3, heads: int = 6, kv_heads: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def greedy_logits(model, ids, mask, cache, steps=3):
    """Prefill then greedy decode ``steps`` tokens; returns the logits of every valid position and step."""
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    logits = [out.logits[mask.bool()]]
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = mask.sum(1, keepdim=True) - 1
        out = model(
            input_ids=token,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        logits.append(out.logits[:, -1])
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return logits
