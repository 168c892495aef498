"""Natural text that exists on every machine without a download: the Python standard library's own source.

Haystacks and perplexity texts come from here by default (see `data/README.md`). Users can point any task at their
own corpus (PG19, proof-pile, ...) with ``corpus=PATH``: a text file, or a directory of ``.txt``/``.md`` files.
"""

from __future__ import annotations

import importlib
import inspect
from functools import lru_cache
from pathlib import Path

# Prose-heavy modules (long docstrings and comments), in a fixed order so that samples are reproducible.
STDLIB_MODULES = (
    "argparse",
    "dataclasses",
    "subprocess",
    "typing",
    "logging",
    "threading",
    "email.message",
    "inspect",
    "pathlib",
    "collections",
    "functools",
    "unittest.case",
    "tarfile",
    "zipfile",
    "http.client",
    "asyncio.base_events",
)


def stdlib_text(index: int) -> str:
    """The source of one standard-library module; ``index`` wraps around the fixed module list."""
    return inspect.getsource(importlib.import_module(STDLIB_MODULES[index % len(STDLIB_MODULES)]))


@lru_cache(maxsize=8)
def corpus_documents(corpus: str | None = None) -> tuple[str, ...]:
    """The documents of a corpus: the standard library (``None``), one text file, or a directory of them."""
    if corpus is None or corpus == "stdlib":
        return tuple(stdlib_text(i) for i in range(len(STDLIB_MODULES)))
    path = Path(corpus).expanduser()
    if path.is_file():
        return (path.read_text(encoding="utf-8", errors="replace"),)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".md"} and p.is_file())
        if files:
            return tuple(p.read_text(encoding="utf-8", errors="replace") for p in files)
    raise FileNotFoundError(f"corpus {corpus!r} is neither 'stdlib', a text file, nor a directory of .txt/.md files")


def corpus_text(corpus: str | None = None) -> str:
    """All documents of a corpus joined into one stream (haystacks cut windows out of it)."""
    return "\n\n".join(corpus_documents(corpus))
