"""Passkey retrieval at ~3.5K tokens on the embedded model, every method x budget, question-agnostic and -aware.

Reported, not gated: on a 135M model eviction often loses digits of the key. Columns are exact retrievals out of
``--samples`` and the mean number of the key's digits reproduced in order.

    python scripts/passkey_report.py [--samples 10] [--budgets 256 512 1024] [--methods ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import kvtune

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from texts import passkey_context  # noqa: E402

QUESTION, PREFIX = " What is the pass key?", " The pass key is"


def digits_matched(key: str, answer: str) -> int:
    found = "".join(ch for ch in answer if ch.isdigit())
    return next((i for i, (a, b) in enumerate(zip(key, found)) if a != b), min(len(key), len(found)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--methods", nargs="+", default=[m for m in kvtune.methods.available() if "+" not in m])
    args = parser.parse_args()
    model, tokenizer = kvtune.load_model("embedded")
    keys = [
        str(int(torch.randint(10_000, 99_999, (1,), generator=torch.Generator().manual_seed(s))))
        for s in range(args.samples)
    ]
    contexts = [passkey_context(3400, int(k), depth=(i + 0.5) / args.samples) for i, k in enumerate(keys)]
    print("| method | budget | agnostic: found | agnostic: digits | aware: found | aware: digits |")
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        for budget in [None] if method == "full" else args.budgets:
            cells = []
            for aware in (False, True):
                answers = [
                    kvtune.generate(
                        model,
                        tokenizer,
                        c,
                        question=QUESTION,
                        answer_prefix=PREFIX,
                        method=method,
                        budget=budget,
                        question_aware=aware,
                        max_new_tokens=7,
                    )
                    for c in tqdm(contexts, desc=f"{method} {budget} aware={aware}", leave=False)
                ]
                cells += [
                    f"{sum(k in a for k, a in zip(keys, answers))}/{len(keys)}",
                    f"{sum(digits_matched(k, a) for k, a in zip(keys, answers)) / len(keys):.1f}",
                ]
            print(f"| {method} | {budget or 'all'} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
