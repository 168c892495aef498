"""The README's main job (until LoCoCo training lands): compressed generation on the embedded SmolLM2.

A passkey hidden in ~3.5K tokens is asked for with several methods at budget 256 per KV head; the table shows the
answer, the bytes the cache really holds against the full cache, and the wall time.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

import kvtune
from kvtune.eval.tasks.passkey import PREFIX, QUESTION, passkey_context

METHODS = ["full", "streaming_llm", "h2o", "snapkv", "adakv_snapkv", "lighttransfer+adakv_snapkv"]
BUDGET, KEY = 256, 70521


def main() -> None:
    model, tokenizer = kvtune.load_model("embedded")
    context, _ = passkey_context(repeats=155, key=KEY, depth=0.4)
    question, prefix = QUESTION, PREFIX
    table = Table(
        title=f"Passkey {KEY} in {len(tokenizer(context).input_ids)} tokens, budget {BUDGET} (question-aware)"
    )
    for column in ("method", "answer", "KV cache", "vs full", "seconds"):
        table.add_column(column)
    full_bytes = None
    for method in METHODS:
        budget = None if method == "full" else BUDGET
        start = time.perf_counter()
        answer, cache = kvtune.generate(
            model,
            tokenizer,
            context,
            question=question,
            answer_prefix=prefix,
            method=method,
            budget=budget,
            question_aware=True,
            max_new_tokens=6,
            return_cache=True,
        )
        full_bytes = full_bytes or cache.nbytes()
        ok = "[green]" if str(KEY) in answer else "[red]"
        table.add_row(
            method,
            ok + answer.strip(),
            f"{cache.nbytes() / 2**20:.1f} MiB",
            f"{cache.nbytes() / full_bytes:.3f}",
            f"{time.perf_counter() - start:.0f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
