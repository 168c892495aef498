"""Shared fixtures: the embedded SmolLM2 (loaded once per session) and tiny random Llama models."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch
import transformers
from hydra.core.global_hydra import GlobalHydra
from transformers import LlamaConfig, LlamaForCausalLM

import kvtune
from kvtune import cli


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


@pytest.fixture
def kvtune_cli(monkeypatch, capsys, tmp_path):
    """``kvtune ARGS`` run in this process (no interpreter start, no imports to pay): (exit status, stdout, stderr).

    Hydra writes its run folders under tmp_path; the logging it configures and its global state are undone after
    each call. Loading any model, tokenizer or config fails the test: the commands run here must not need one (a
    user error is reported before anything loads). A few tests still run `python -m kvtune.cli` end to end.
    """

    def refuse(*args, **kwargs):
        raise AssertionError(f"kvtune_cli loads nothing: from_pretrained{args[:2]}")

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
        monkeypatch.setattr(auto, "from_pretrained", refuse)
    monkeypatch.setenv(cli.COMMAND_ENV, "")  # main() records the command there for DDP ranks; empty: none inherited

    def run(args: list[str], hydra_full_error: str = "0") -> tuple[int | str, str, str]:
        monkeypatch.setattr(sys, "argv", ["kvtune", *args])
        monkeypatch.setenv("HYDRA_FULL_ERROR", hydra_full_error)
        root = logging.getLogger()
        handlers, level, cwd = root.handlers[:], root.level, os.getcwd()
        status = 0
        try:
            os.chdir(tmp_path)  # only while the CLI runs (Hydra writes relative to it)
            cli.main()
        except SystemExit as exit:
            status = exit.code or 0
        finally:
            for handler in root.handlers:
                if handler not in handlers:
                    handler.close()
            root.handlers[:], root.level = handlers, level
            GlobalHydra.instance().clear()
            os.chdir(cwd)
        out, err = capsys.readouterr()
        return status, out, err

    return run


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
