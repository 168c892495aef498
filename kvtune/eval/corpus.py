"""Natural text that exists on every machine without a download: the Python standard library's own source.

Two disjoint named corpora (see `data/README.md`): ``stdlib``, what haystacks and perplexity texts come from, and
``stdlib_train``, what `kvtune fit` trains on by default, so that evaluation text is held out from training. A third,
``python_reference``, is English prose: the language reference as text that ships with the standard library
(``pydoc_data.topics``, one document per topic), for training on prose as well as code; evaluation never reads it. Users
can point any task or training run at their own corpus (PG19, proof-pile, ...) with a path: a text file, or a
directory of ``.txt``/``.md`` files.
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
# Other prose-heavy modules (~340K tokens of the embedded model), none of them in STDLIB_MODULES: training text.
TRAIN_MODULES = (
    "os",
    "shutil",
    "socket",
    "ssl",
    "urllib.request",
    "configparser",
    "enum",
    "tempfile",
    "pdb",
    "pickle",
    "doctest",
    "optparse",
    "smtplib",
    "imaplib",
    "mailbox",
    "difflib",
    "locale",
    "statistics",
    "ipaddress",
    "xml.dom.minidom",
)
CORPORA = {"stdlib": STDLIB_MODULES, "stdlib_train": TRAIN_MODULES}
PROSE_CORPUS = "python_reference"


def stdlib_text(index: int, modules: tuple[str, ...] = STDLIB_MODULES) -> str:
    """The source of one standard-library module; ``index`` wraps around the fixed module list."""
    return inspect.getsource(importlib.import_module(modules[index % len(modules)]))


@lru_cache(maxsize=8)
def corpus_documents(corpus: str | None = None) -> tuple[str, ...]:
    """The documents of a corpus: a named one (``None`` is ``stdlib``), one text file, or a directory of them."""
    if corpus == PROSE_CORPUS:
        from pydoc_data.topics import topics

        return tuple(topics[name] for name in sorted(topics))
    modules = CORPORA.get(corpus or "stdlib")
    if modules is not None:
        return tuple(stdlib_text(i, modules) for i in range(len(modules)))
    path = Path(corpus).expanduser()
    if path.is_file():
        return (path.read_text(encoding="utf-8", errors="replace"),)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".md"} and p.is_file())
        if files:
            return tuple(p.read_text(encoding="utf-8", errors="replace") for p in files)
    raise FileNotFoundError(
        f"corpus {corpus!r} is neither one of {sorted([*CORPORA, PROSE_CORPUS])}, a text file, "
        "nor a directory of .txt/.md files"
    )


def corpus_text(corpus: str | None = None) -> str:
    """All documents of a corpus joined into one stream (haystacks cut windows out of it)."""
    return "\n\n".join(corpus_documents(corpus))
