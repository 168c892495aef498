"""Structured configs (registered with Hydra's ConfigStore, so a misspelt key fails loudly)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


def wandb_offline() -> bool:
    """W&B stays offline (runs synced later with `wandb sync`) unless a key is set or WANDB_MODE=online."""
    return not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online")


OmegaConf.register_new_resolver("kvtune_wandb_offline", wandb_offline, replace=True)


@dataclass
class GenerateConfig:
    """`kvtune generate`: answer a question about a (long) context with a compressed KV cache."""

    model: str = "embedded"
    dtype: str = "float32"
    method: str = "full"
    budget: int | None = None
    ratio: float | None = None
    context: str | None = None
    context_file: str | None = None
    question: str = ""
    answer_prefix: str = ""
    max_new_tokens: int = 32
    question_aware: bool = False
    chat_template: bool = False
    prefill_chunk: int | None = None
    method_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """`kvtune eval`: one (task, method, budget) per job; sweep them with Hydra's multirun (``-m``)."""

    model: str = "embedded"
    dtype: str = "float32"
    task: dict[str, Any] = field(default_factory=lambda: {"name": "passkey"})
    method: str = "full"
    budget: int | None = None
    ratio: float | None = None
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    context_length: int = 4096
    samples: int = 20
    seed: int = 0
    batch_size: int = 4
    question_aware: bool = False
    max_new_tokens: int | None = None
    results_dir: str | None = None  # default: the run directory, or the sweep directory under -m
    logger: Any = None  # a Lightning logger config from conf/logger (csv, wandb)


@dataclass
class BenchConfig:
    """`kvtune bench`: speed and memory of methods x budgets x context lengths x batch sizes, against `full`."""

    model: str = "embedded"
    dtype: str = "float32"
    methods: list[str] = field(default_factory=lambda: ["full", "streaming_llm", "snapkv", "adakv_snapkv"])
    budgets: list[int] = field(default_factory=lambda: [512])
    context_lengths: list[int] = field(default_factory=lambda: [4096])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    decode_tokens: int = 32
    output: str = "bench.json"


store = ConfigStore.instance()
store.store(name="generate_schema", node=GenerateConfig)
store.store(name="eval_schema", node=EvalConfig)
store.store(name="bench_schema", node=BenchConfig)
