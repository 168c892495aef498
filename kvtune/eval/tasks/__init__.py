"""Task registry: importing this package registers every built-in task."""

from kvtune.eval.tasks import (  # noqa: F401  (importing registers them)
    aggregation,
    longbench,
    niah,
    passkey,
    perplexity,
    variable_tracking,
)
from kvtune.eval.tasks.base import Sample, Task, available_tasks, build_task, prompt_tokens, register_task

__all__ = ["Sample", "Task", "available_tasks", "build_task", "prompt_tokens", "register_task"]
