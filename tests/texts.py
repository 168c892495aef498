"""Natural text available on every machine without a download: the Python standard library's own source."""

from __future__ import annotations

import importlib
import inspect

MODULES = ("argparse", "dataclasses", "subprocess", "typing", "logging", "threading", "email.message")


def stdlib_text(index: int) -> str:
    """The source of one standard-library module (docstrings and comments make it mostly prose and code)."""
    return inspect.getsource(importlib.import_module(MODULES[index]))


def passkey_context(filler_tokens: int, key: int, depth: float) -> str:
    """The classic passkey prompt: repeated filler with the key stated once at relative ``depth``."""
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    repeats = filler_tokens // 22
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    at = int(repeats * depth)
    return (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there. " + filler * at + needle + filler * (repeats - at)
    )
