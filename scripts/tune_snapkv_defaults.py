"""Choose SnapKV-family defaults by measurement: observation window, pooling kernel, pooling type, and head-averaged
against per-KV-head votes, on kvtune's own tasks, question-agnostic and question-aware, at ratios 0.5/0.75/0.9.

    python scripts/tune_snapkv_defaults.py --tasks passkey variable_tracking --samples 4 \
        --out docs/results/snapkv_defaults

Every variant of a (task, mode) is replayed from one recorded prefill per sample (`kvtune.replay`), so the grid
costs one prefill per sample and mode plus the cheap replays. Writes ``results.jsonl`` (one row per task, mode,
variant and ratio; ``label`` names the variant) and ``results.md``: per-task tables, then the variants ranked by
their answer NLL averaged over tasks and ratios (question-aware runs use the question as the window, so they rank
kernel, pooling and head-averaging only). Resumable: rows already in ``results.jsonl`` are not recomputed.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

VARIANTS: dict[str, dict[str, Any]] = {  # first round: one factor at a time around the old defaults (w32 max7 group)
    "w32 max7 group": {"window": 32, "kernel": 7, "pooling": "max", "heads": "group"},
    "w8 max7 group": {"window": 8, "kernel": 7, "pooling": "max", "heads": "group"},
    "w16 max7 group": {"window": 16, "kernel": 7, "pooling": "max", "heads": "group"},
    "w64 max7 group": {"window": 64, "kernel": 7, "pooling": "max", "heads": "group"},
    "w32 none group": {"window": 32, "kernel": 1, "pooling": "max", "heads": "group"},
    "w32 max3 group": {"window": 32, "kernel": 3, "pooling": "max", "heads": "group"},
    "w32 max15 group": {"window": 32, "kernel": 15, "pooling": "max", "heads": "group"},
    "w32 avg7 group": {"window": 32, "kernel": 7, "pooling": "avg", "heads": "group"},
    "w32 avg5 group (paper)": {"window": 32, "kernel": 5, "pooling": "avg", "heads": "group"},
    "w32 max7 layer": {"window": 32, "kernel": 7, "pooling": "max", "heads": "layer"},
    # second round: the two winners of the first (head-averaged votes, a wider max-pool) together
    "w32 max11 layer": {"window": 32, "kernel": 11, "pooling": "max", "heads": "layer"},
    "w32 max15 layer": {"window": 32, "kernel": 15, "pooling": "max", "heads": "layer"},
    "w32 max31 layer": {"window": 32, "kernel": 31, "pooling": "max", "heads": "layer"},
}


def summary(rows: list[dict[str, Any]]) -> str:
    """Variants ranked by mean answer NLL over tasks, per mode and ratio, per mode, and overall (a variant that runs
    in one mode only, e.g. a window, which question-aware runs take from the question, has no overall mean)."""
    nll: dict[tuple[str, tuple[bool, float]], list[float]] = defaultdict(list)
    for row in rows:
        nll[row["label"], (row["question_aware"], row["ratio"])].append(row["answer_nll"])
    ratios = sorted({r["ratio"] for r in rows})
    modes = sorted({r["question_aware"] for r in rows})
    columns = [(m, r) for m in modes for r in ratios]
    means = {
        label: {c: sum(nll[label, c]) / len(nll[label, c]) for c in columns if nll.get((label, c))}
        for label in sorted({r["label"] for r in rows})
    }

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    per_mode = {
        label: {m: mean([v for (mode, _), v in cells.items() if mode == m]) for m in modes}
        for label, cells in means.items()
    }
    complete = {label for label, cells in means.items() if len(cells) == len(columns)}
    overall = {label: mean(list(cells.values())) if label in complete else None for label, cells in means.items()}

    def rank(label: str) -> tuple:
        return (overall[label] is None, overall[label] or 0.0, per_mode[label][modes[0]] or 0.0)

    head = " | ".join(f"{'aware' if m else 'agnostic'} {r}" for m, r in columns)
    mode_head = " | ".join(f"{'aware' if m else 'agnostic'} mean" for m in modes)
    lines = [f"| variant | {head} | {mode_head} | mean |", "|---|" + "---|" * (len(columns) + len(modes) + 1)]

    def fmt(value: float | None) -> str:
        return "" if value is None else f"{value:.3f}"

    for label in sorted(means, key=rank):
        cells = " | ".join(fmt(means[label].get(c)) for c in columns)
        mode_cells = " | ".join(fmt(per_mode[label][m]) for m in modes)
        lines.append(f"| {label} | {cells} | {mode_cells} | {fmt(overall[label])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["passkey", "variable_tracking"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.75, 0.9])
    parser.add_argument("--modes", nargs="+", choices=["agnostic", "aware"], default=["agnostic", "aware"])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--context-length", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("docs/results/snapkv_defaults"))
    args = parser.parse_args()

    import kvtune
    from kvtune.eval.report import markdown_table
    from kvtune.eval.runner import evaluate
    from kvtune.eval.tasks import build_task

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    rows = [r for r in rows if r["samples"] == args.samples and r["context_length"] == args.context_length]
    done = {(r["task"], r["question_aware"], r["label"], r["ratio"]) for r in rows}
    model, tokenizer = kvtune.load_model("embedded")
    for mode in args.modes:
        aware = mode == "aware"
        for task_name in args.tasks:
            task = build_task(task_name)
            for label in args.variants:
                kwargs = dict(VARIANTS[label])
                if aware:
                    if kwargs.pop("window") != 32:  # the question is the window: window variants do not apply
                        continue
                for ratio in args.ratios:
                    if (task_name, aware, label, ratio) in done:
                        continue
                    row = evaluate(
                        model,
                        tokenizer,
                        task,
                        "snapkv",
                        ratio=ratio,
                        context_length=args.context_length,
                        samples=args.samples,
                        question_aware=aware,
                        method_kwargs=kwargs,
                        task_key=(task_name,),
                    )
                    row.pop("per_sample")
                    row.update(label=label, method_kwargs=kwargs)
                    rows.append(row)
                    with path.open("a") as handle:
                        handle.write(json.dumps(row) + "\n")
    (args.out / "results.md").write_text(
        f"## Variants ranked by mean answer NLL (lower is better)\n\n{summary(rows)}\n\n{markdown_table(rows)}"
    )
    print(summary(rows))


if __name__ == "__main__":
    main()
