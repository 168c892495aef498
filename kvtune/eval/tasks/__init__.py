"""Task registry: importing this package registers every built-in task."""

from kvtune.eval.tasks import passkey, perplexity  # noqa: F401  (importing registers them)
from kvtune.eval.tasks.base import Sample, Task, available_tasks, build_task, prompt_tokens, register_task

__all__ = ["Sample", "Task", "available_tasks", "build_task", "prompt_tokens", "register_task"]
