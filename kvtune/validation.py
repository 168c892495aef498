"""Checks on what a user passes in, shared by the Python API and the CLI so that both say the same thing.

Every failure is a `UserError` (a `ValueError`): the Python API raises it, the CLI prints its message on one line
and exits with status 2. The checks need no model, so the CLI runs them before loading one.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from collections.abc import Callable
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "gpt2" or "owner/name"; anything else is a local path


class UserError(ValueError):
    """An input the user can fix; the message says what is wrong and what is accepted."""


def check_method(method: str) -> None:
    """The method name is known (``router+method`` compositions included)."""
    from kvtune.methods.registry import check_name

    check_name(method)


def check_budget(budget: Any) -> None:
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, Integral):
        raise UserError(f"budget must be a whole number of entries per KV head per layer, got {budget!r}")
    if budget < 1:
        raise UserError(f"budget must be at least 1 entry per head, got {budget}")


def check_ratio(ratio: Any) -> None:
    if ratio is None:
        return
    if isinstance(ratio, bool) or not isinstance(ratio, Real) or not 0.0 <= ratio < 1.0:
        raise UserError(f"ratio is the fraction removed and must lie in [0, 1), got {ratio!r}")


def check_prefill_chunk(chunk: Any) -> None:
    """None (one forward) or at least 2 tokens: a 1-token forward is a decode step, which prefill never compresses."""
    if chunk is None:
        return
    if isinstance(chunk, bool) or not isinstance(chunk, Integral) or chunk < 2:
        raise UserError(
            f"prefill_chunk must be None (the whole context in one forward) or at least 2 tokens, got {chunk!r} "
            "(a 1-token forward is a decode step and would not be compressed)"
        )


OBJECTIVES = ("lm", "distill", "distill+lm")


def check_objective(objective: Any) -> None:
    """A LoCoCo training objective: next-token loss, distillation from the full cache, or both."""
    if objective not in OBJECTIVES:
        raise UserError(f"method.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")


def check_count(name: str) -> Callable[[Any], None]:
    """A check that ``name`` is a whole number of at least 1."""

    def check(value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise UserError(f"{name} must be a whole number of at least 1, got {value!r}")

    return check


def check_config_key(schema: type, key: str) -> None:
    """A ``key=value`` override names a field of the command's structured config (dotted into nested sections).

    Below a free-form field (a dict, a Lightning strategy or logger config) anything goes: those are checked by
    whoever reads them. Hydra would refuse an unknown key too, but only after a multi-line report.
    """
    node: type | None = schema
    path: list[str] = []
    for part in key.split("."):
        if node is None:
            return
        fields = [f.name for f in dataclasses.fields(node)]
        if part not in fields:
            close = difflib.get_close_matches(part, fields, n=1)
            hint = f"; did you mean '{'.'.join([*path, close[0]])}'?" if close else ""
            where = f" in {'.'.join(path)}" if path else ""
            raise UserError(f"unknown key '{key}'{hint} (keys{where}: {', '.join(fields)})")
        node = _section(get_type_hints(node)[part])
        path.append(part)


def _section(annotation: Any) -> type | None:
    """The dataclass a field holds (``Section | None`` included), or None for a free-form or scalar field."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        return next((arg for arg in get_args(annotation) if dataclasses.is_dataclass(arg)), None)
    return None


def check_method_args(
    method: str, budget: Any = None, ratio: Any = None, prefill_chunk: Any = None, **method_kwargs
) -> None:
    """Everything about a compression request that can be checked without a model, policy options included."""
    from kvtune.methods.registry import build

    check_method(method)
    check_budget(budget)
    check_ratio(ratio)
    check_prefill_chunk(prefill_chunk)
    if method == "full" and budget is None and ratio is None:
        return
    try:
        build(method, budget=budget, ratio=ratio, **method_kwargs)
    except TypeError as error:  # an option the method does not take
        raise UserError(f"method '{method}' rejected its options {sorted(method_kwargs)}: {error}") from error
    except UserError:
        raise
    except ValueError as error:
        raise UserError(str(error)) from error


def check_contexts(contexts: list[str]) -> None:
    for row, context in enumerate(contexts):
        if not context.strip():
            where = "" if len(contexts) == 1 else f" (row {row})"
            raise UserError(f"the context is empty{where}: there is nothing to prefill or compress")


def check_questions(questions: list[str] | None, question_aware: bool) -> None:
    if questions is not None and question_aware:
        raise UserError(
            "questions=[...] compresses the context once, before any question is seen; question_aware=True "
            "compresses it with each question: ask them one by one"
        )
    if questions is not None and not questions:
        raise UserError("questions=[...] is empty: give at least one question")


def check_model_source(name: str) -> None:
    """``embedded``, a local directory, or something shaped like a Hub id (``name`` or ``owner/name``).

    A path that does not exist is named as such instead of reaching transformers' "Repo id must be in the form".
    """
    from kvtune.models import EMBEDDED

    name = str(name)  # a command-line value may arrive as a number
    if name == EMBEDDED:
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model {name} is a file; give the directory that holds config.json and the weights")
        return
    if not HUB_ID.match(name):
        raise UserError(f"no such directory: {name} (a model is 'embedded', a local directory or a Hub id owner/name)")


def read_text_file(path: str | Path, what: str) -> str:
    """The file's text, or a message naming the file (``what`` is the option that gave it) and the problem."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise UserError(f"{what}: no such file: {path}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(
            f"{what}: {path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}: "
            f"{error.reason}); convert it, e.g. `iconv -f latin1 -t utf-8`"
        ) from error
