"""Peak memory of prefilling one long prompt on the embedded model: unchunked vs chunked with compression between
chunks (`prefill_chunk=`). Each configuration runs in its own process so that peak RSS is its own.

    python scripts/bench_chunked_prefill.py [--tokens 4096] [--budget 256] [--method adakv_snapkv]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(tokens: int, method: str, budget: int | None, chunk: int | None) -> dict:
    import torch

    import kvtune
    from kvtune.api import new_cache, prefill
    from kvtune.methods import build

    model, tokenizer = kvtune.load_model("embedded")
    text = open(__import__("inspect").getsourcefile(__import__("typing"))).read() * 2
    ids = torch.tensor([tokenizer(text).input_ids[:tokens]])
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cache = new_cache(model, build(method, budget=budget) if budget else None)
    start = time.perf_counter()
    prefill(model, cache, ids, torch.ones_like(ids), chunk=chunk)
    return {
        "method": method,
        "budget": budget,
        "chunk": chunk,
        "tokens": tokens,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_prefill_mib": round(baseline / 1024, 1),
        "kv_mib": round(cache.nbytes() / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--method", default="adakv_snapkv")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, budget, chunk = json.loads(args.one)
        print(json.dumps(measure(args.tokens, method, budget, chunk)))
        return
    runs = [
        ("full", None, None),
        (args.method, args.budget, None),
        (args.method, args.budget, 1024),
        (args.method, args.budget, 512),
    ]
    rows = []
    for run in runs:
        out = subprocess.run(
            [sys.executable, __file__, "--tokens", str(args.tokens), "--one", json.dumps(run)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| method | budget | prefill_chunk | seconds | peak RSS (MiB) | RSS before prefill (MiB) | KV cache (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['budget']} | {r['chunk']} | {r['seconds']} | {r['peak_rss_mib']} | "
            f"{r['rss_before_prefill_mib']} | {r['kv_mib']} |"
        )


if __name__ == "__main__":
    main()
