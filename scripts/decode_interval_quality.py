"""What evicting every N decoding steps costs in quality: teacher-forced NLL of a long continuation fed one token at
a time (each token a decoding step, so the methods evict while it runs), per method at ``decode_interval`` 1 (every
step, the papers') and N, against the full cache, on held-out windows of the embedded model's evaluation corpus.

    python scripts/decode_interval_quality.py [--context 2048] [--continuation 256] [--budget 512] [--windows 4] \
        [--methods streaming_llm,h2o,tova,adakv_tova] [--intervals 1,32] [--out rows.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import DynamicCache

import kvtune
from kvtune.api import cache_kwargs, new_cache, prefill
from kvtune.eval.corpus import corpus_text
from kvtune.methods import build


@torch.no_grad()
def continuation_nll(model, ids: torch.Tensor, context: int, cache) -> float:
    """Mean NLL of ``ids[:, context:]``, prefilled up to ``context`` then fed one token per forward."""
    mask = torch.ones_like(ids[:, :context])
    logits, mask = prefill(model, cache, ids[:, :context], mask)
    if hasattr(cache, "prefilling"):
        cache.prefilling = False
    losses = []
    for position in range(context, ids.shape[1]):
        target = ids[:, position]
        losses.append(F.cross_entropy(logits.float(), target))
        out = model(
            input_ids=target[:, None],
            position_ids=torch.tensor([[position]]),
            **cache_kwargs(model, cache),
            use_cache=True,
        )
        logits = out.logits[:, -1]
    return float(torch.stack(losses).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--methods", default="streaming_llm,h2o,tova,adakv_tova")
    parser.add_argument("--intervals", default="1,32")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--out", default="decode_interval_quality.jsonl")
    args = parser.parse_args()
    methods, intervals = args.methods.split(","), [int(n) for n in args.intervals.split(",")]
    for method in methods:  # every option checked before the model loads
        for interval in intervals:
            build(method, budget=args.budget, decode_interval=interval)
    model, tokenizer = kvtune.load_model(args.model)
    stream = tokenizer(corpus_text(), add_special_tokens=False).input_ids
    length = args.context + args.continuation
    stride = (len(stream) - length) // max(1, args.windows)
    configs = [("full", 1)] + [(m, n) for m in methods for n in intervals]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with out.open("a") as sink, tqdm(total=args.windows * len(configs), desc="decode-interval quality") as bar:
        for window in range(args.windows):
            ids = torch.tensor([stream[window * stride : window * stride + length]])
            for method, interval in configs:
                cache = (
                    DynamicCache(config=model.config)
                    if method == "full"
                    else new_cache(model, build(method, budget=args.budget, decode_interval=interval))
                )
                row = {
                    "method": method,
                    "decode_interval": interval,
                    "budget": None if method == "full" else args.budget,
                    "context": args.context,
                    "continuation": args.continuation,
                    "window": window,
                    "nll": continuation_nll(model, ids, args.context, cache),
                }
                sink.write(json.dumps(row) + "\n")
                sink.flush()  # every row on disk as soon as it exists: an interrupted run keeps them
                rows.append(row)
                bar.update()
    print(table(rows, intervals))


def table(rows: list[dict], intervals: list[int]) -> str:
    """Mean continuation NLL per method and interval, with the difference against the full cache."""
    windows = sorted({r["window"] for r in rows})
    mean = {}
    for key in dict.fromkeys((r["method"], r["decode_interval"]) for r in rows):  # in the order measured
        values = [r["nll"] for r in rows if (r["method"], r["decode_interval"]) == key]
        mean[key] = sum(values) / len(values)
    full = mean[("full", 1)]
    lines = [
        f"continuation NLL (nats per token), {len(windows)} windows",
        "| method | " + " | ".join(f"every {n} (vs full)" for n in intervals) + " |",
        "|---|" + "---|" * len(intervals),
        f"| full | {full:.4f} |" + " |" * (len(intervals) - 1),
    ]
    for method in dict.fromkeys(m for m, _ in mean if m != "full"):
        cells = [f"{mean[(method, n)]:.4f} ({mean[(method, n)] - full:+.4f})" for n in intervals]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
