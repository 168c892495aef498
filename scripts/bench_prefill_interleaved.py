"""Prefill time of compression methods against the stock model, measured alternately so that drift cancels.

On a shared VM the same stock prefill can take a third longer at one time than at another, so a ratio of two rows
measured minutes apart is mostly the machine. This script loads the model once and times, per repetition, the stock
model's prefill and then each method's, and reports every method against the stock prefill of its own repetition.
``--compare-attention FILE`` adds rows for another version of `kvtune/attention.py` (e.g. ``git show
REV:kvtune/attention.py > old.py``): its `attend` and `attend_with_received` are patched in for those rows.

    python scripts/bench_prefill_interleaved.py --methods h2o h2o:512 kvmerger --repeats 2
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

import kvtune
import kvtune.attention
from kvtune.eval.corpus import stdlib_text
from kvtune.models import load_model

PATCHED = ("attend", "attend_with_received")


def prefill_seconds(model, ids: torch.Tensor, method: str, budget: int, chunk: int | None) -> float:
    """One prefill of ``ids``: the stock model for ``full``, else ``method`` at ``budget`` (in chunks of ``chunk``)."""
    start = time.perf_counter()
    with torch.no_grad():
        if method == "full":
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
        else:
            cache = kvtune.new_cache(model, kvtune.methods.build(method, budget=budget))
            kvtune.prefill(model, cache, ids, torch.ones_like(ids), chunk=chunk)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", required=True, help="method or method:chunk, e.g. h2o h2o:512")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compare-attention", help="another kvtune/attention.py, for rows marked _old")
    args = parser.parse_args()
    rows = [(spec, False) for spec in args.methods]
    current = {name: getattr(kvtune.attention, name) for name in PATCHED}
    old = None
    if args.compare_attention:
        spec = importlib.util.spec_from_file_location("kvtune_old_attention", args.compare_attention)
        old = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look it up there
        spec.loader.exec_module(old)
        rows = [row for spec in args.methods for row in ((spec, False), (spec, True))]
    model, tokenizer = load_model(args.model)
    text, index = "", 0
    while len(tokenizer(text).input_ids) < args.length:
        text, index = text + stdlib_text(index), index + 1
    ids = torch.tensor([tokenizer(text).input_ids[: args.length]])
    prefill_seconds(model, ids, "full", args.budget, None)  # warm-up
    ratios: dict[tuple[str, bool], list[float]] = {row: [] for row in rows}
    for repeat in range(args.repeats):
        stock = prefill_seconds(model, ids, "full", args.budget, None)
        print(f"repeat {repeat + 1}: full {stock:.2f} s", flush=True)
        for spec, is_old in rows:
            for name in PATCHED:
                setattr(kvtune.attention, name, getattr(old, name) if is_old else current[name])
            method, _, chunk = spec.partition(":")
            seconds = prefill_seconds(model, ids, method, args.budget, int(chunk) if chunk else None)
            ratios[spec, is_old].append(seconds / stock)
            print(f"repeat {repeat + 1}: {spec}{' (old)' if is_old else ''} {seconds:.2f} s", flush=True)
    for name in PATCHED:
        setattr(kvtune.attention, name, current[name])
    table = Table(title=f"prefill at {args.length} tokens, x the stock prefill of the same repetition")
    table.add_column("method (:chunk)")
    table.add_column("attention")
    table.add_column("x stock full, each repetition")
    for (spec, is_old), values in ratios.items():
        table.add_row(spec, "compared" if is_old else "this checkout", " / ".join(f"{v:.2f}" for v in values))
    Console().print(table)


if __name__ == "__main__":
    main()
