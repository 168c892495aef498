"""What a task is: deterministic samples at a target length in the model's own tokens, and a score per answer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from transformers import PreTrainedTokenizerBase


@dataclass
class Sample:
    """One prompt laid out as ``context + question + answer_prefix``, and its gold answers.

    ``answers[0]`` is the reference fed teacher-forced through the compressed cache for ``answer_nll``; ``meta``
    records how the sample was built (needle character spans, keys, depth) so tests can check it.
    """

    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    """A generator of samples and the task's own metric (1.0 for a right answer, 0.0 for a wrong one)."""

    name: str

    def samples(self, tokenizer: PreTrainedTokenizerBase, context_length: int, n: int, seed: int) -> list[Sample]:
        """``n`` samples whose whole prompt is ``context_length`` tokens (within 2%), the same for the same seed."""
        ...

    def score(self, prediction: str, sample: Sample) -> float:
        """The task's metric of a greedy ``prediction``, in [0, 1]."""
        ...


_TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    """Class decorator adding a task under ``name``."""

    def add(factory: Callable[..., Task]) -> Callable[..., Task]:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is already registered")
        _TASKS[name] = factory
        return factory

    return add


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def build_task(name: str, **kwargs: Any) -> Task:
    """The task ``name`` configured by ``kwargs``; unknown names fail with the valid ones."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")
    return _TASKS[name](**kwargs)


def prompt_tokens(tokenizer: PreTrainedTokenizerBase, sample: Sample) -> int:
    """Length of the whole prompt in tokens, as `kvtune.generate` lays it out (context, then question + prefix)."""
    head = len(tokenizer(sample.context).input_ids)
    return head + len(tokenizer(sample.question + sample.answer_prefix, add_special_tokens=False).input_ids)
