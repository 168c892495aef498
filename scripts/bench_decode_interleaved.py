"""Decode step time of evicting methods against the stock model at the budget's context, measured alternately.

A decoding step of a method at budget B is compared with the stock model (transformers' `DynamicCache` and SDPA)
whose whole context is B tokens, as issue 14's target reads. A third row, kvtune's cache with no policy over the same
B tokens, separates what kvtune's cache and attention backend cost from what the method's per-step eviction costs.
Each repetition times every configuration once (the median step of each), and each configuration's speed is read
against the stock step of its own repetition, so that the VM's drift cancels.

    python scripts/bench_decode_interleaved.py --methods h2o adakv_tova --budget 512 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache

import kvtune
from kvtune.bench import corpus_input_ids
from kvtune.methods import build
from kvtune.models import load_model

STOCK, NO_POLICY = "stock (context = budget)", "kvtune cache, no policy (context = budget)"


def step_seconds(model, ids: torch.Tensor, cache, steps: int) -> float:
    """Prefill ``ids`` into ``cache``, then the median time of ``steps`` greedy decoding steps (the first 4 are
    left out: allocator warm-up)."""
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        if hasattr(cache, "prefilling"):
            cache.prefilling = False
        position, mask = ids.shape[1], torch.ones_like(ids)
        times = []
        for _ in range(steps + 4):
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            start = time.perf_counter()
            out = model(
                input_ids=token,
                attention_mask=mask,
                position_ids=torch.tensor([[position]]),
                past_key_values=cache,
                use_cache=True,
            )
            times.append(time.perf_counter() - start)
            position += 1
    return statistics.median(times[4:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["h2o", "adakv_tova"])
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens the methods compress to the budget")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.context <= args.budget:
        parser.error("--context must exceed --budget, so that the methods evict while decoding")
    model, tokenizer = load_model("embedded")
    model.eval()
    ids = corpus_input_ids(tokenizer, args.context, 1, model.device)
    configurations = {
        STOCK: lambda: (DynamicCache(config=model.config), ids[:, : args.budget]),
        NO_POLICY: lambda: (kvtune.new_cache(model, None), ids[:, : args.budget]),
        **{m: (lambda m=m: (kvtune.new_cache(model, build(m, budget=args.budget)), ids)) for m in args.methods},
    }
    step_seconds(model, ids[:, :64], DynamicCache(config=model.config), 4)  # first-call costs stay out
    seconds: dict[str, list[float]] = {name: [] for name in configurations}
    for repeat in range(args.repeats):
        for name, make in configurations.items():
            cache, prompt = make()
            seconds[name].append(step_seconds(model, prompt, cache, args.steps))
        print(f"repetition {repeat + 1}: " + ", ".join(f"{n} {1e3 * s[-1]:.1f} ms" for n, s in seconds.items()))
    threads = torch.get_num_threads()
    table = Table(title=f"decode step at budget {args.budget} ({threads} thread{'s' if threads > 1 else ''})")
    for column in ("configuration", "median step (ms)", "speed against stock: median (range over repetitions)"):
        table.add_column(column)
    for name, values in seconds.items():
        ratios = [stock / own for stock, own in zip(seconds[STOCK], values)]  # each against its own repetition
        spread = f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
        table.add_row(name, f"{1e3 * statistics.median(values):.1f}", spread)
    Console().print(table)


if __name__ == "__main__":
    main()
