"""Structured configs (registered with Hydra's ConfigStore, so a misspelt key fails loudly)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


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


ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)
