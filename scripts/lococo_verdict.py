"""Did training earn its keep? Trained LoCoCo against the best training-free method, the untrained compressor and
the full cache, from a `kvtune eval` results folder (`make demo` writes one).

    python scripts/lococo_verdict.py outputs/quickstart/eval [--trained lococo_trained] [--untrained lococo_untrained]

The goal (issue 11): at the same cache size, trained LoCoCo closes at least half of the held-out chunked-perplexity
gap between the best training-free method and the full cache, (best_free - trained) >= 0.5 (best_free - full), and
has a lower passkey answer NLL than every training-free method. Prints a markdown table and the verdict; the exit
status is 0 either way (this is a report, not a test).
"""

from __future__ import annotations

import argparse

from kvtune.eval.report import read_rows


def verdict(rows: list[dict], trained: str, untrained: str) -> str:
    """The table and the two checks, as markdown."""
    by = {(row["task"], row.get("label") or row["method"]): row for row in rows}
    labels = sorted({label for _, label in by})
    free = [label for label in labels if label not in (trained, untrained, "full")]

    def value(task: str, label: str, key: str) -> float | None:
        row = by.get((task, label))
        return None if row is None else row[key]

    ppl = {label: value("perplexity", label, "score") for label in labels}
    nll = {label: value("passkey", label, "answer_nll") for label in labels}
    scored = [label for label in free if ppl[label] is not None]
    best = min(scored, key=lambda label: ppl[label]) if scored else None
    lines = ["| row | method | perplexity | passkey answer NLL |", "|---|---|---|---|"]
    for role, label in (("full cache", "full"), ("best training-free", best), ("untrained", untrained),
                        ("trained", trained)):  # fmt: skip
        if label is None:
            continue
        cells = [f"{ppl[label]:.3f}" if ppl.get(label) is not None else "-"]
        cells.append(f"{nll[label]:.3f}" if nll.get(label) is not None else "-")
        lines.append(f"| {role} | {label} | {' | '.join(cells)} |")
    if best is None or ppl.get(trained) is None or ppl.get("full") is None:
        return "\n".join([*lines, "", "not enough rows for a verdict (need full, a training-free method, trained)"])
    gap = ppl[best] - ppl["full"]
    closed = (ppl[best] - ppl[trained]) / gap if gap > 0 else float("nan")
    free_nll = [nll[label] for label in free if nll.get(label) is not None]
    beats_nll = nll.get(trained) is not None and bool(free_nll) and nll[trained] < min(free_nll)
    lines += [
        "",
        f"perplexity gap closed: {closed:.0%} of the way from {best} ({ppl[best]:.3f}) to full ({ppl['full']:.3f})"
        f" -> {'MET' if closed >= 0.5 else 'NOT MET'} (goal: >= 50%)",
        f"passkey answer NLL below every training-free method: {'MET' if beats_nll else 'NOT MET'}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--trained", default="lococo_trained")
    parser.add_argument("--untrained", default="lococo_untrained")
    args = parser.parse_args()
    print(verdict(read_rows(args.folder), args.trained, args.untrained))


if __name__ == "__main__":
    main()
