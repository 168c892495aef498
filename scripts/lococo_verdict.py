"""Did training earn its keep? Trained LoCoCo against the best training-free method, the untrained compressor and
the full cache, from a `kvtune eval` results folder (`make demo` writes one).

    python scripts/lococo_verdict.py outputs/quickstart/eval [--trained lococo_trained] [--untrained lococo_untrained]
        [--control full_with_trained_lora]

The goal (issue 11): at the same cache size, trained LoCoCo closes at least half of the held-out chunked-perplexity
gap between the best training-free method and the full cache, (best_free - trained) >= 0.5 (best_free - full), and
has a lower passkey answer NLL than every training-free method. Prints a markdown table and the verdict; the exit
status is 0 either way (this is a report, not a test).

A trained LoRA changes the model itself, not only how it reads the compressed cache. The control row (the full
cache with the trained adapter's LoRA, `make demo` evaluates it) separates the two: the verdict also prints what
compression costs against the model it compresses, trained against control, untrained against full.
"""

from __future__ import annotations

import argparse

from kvtune.eval.report import read_rows


def verdict(rows: list[dict], trained: str, untrained: str, control: str = "full_with_trained_lora") -> str:
    """The table, the two checks and, with a control row, the compression's own cost, as markdown."""
    by = {(row["task"], row.get("label") or row["method"]): row for row in rows}
    labels = sorted({label for _, label in by})
    free = [label for label in labels if label not in (trained, untrained, "full", control)]

    def value(task: str, label: str, key: str) -> float | None:
        row = by.get((task, label))
        return None if row is None else row[key]

    ppl = {label: value("perplexity", label, "score") for label in labels}
    nll = {label: value("passkey", label, "answer_nll") for label in labels}
    scored = [label for label in free if ppl[label] is not None]
    best = min(scored, key=lambda label: ppl[label]) if scored else None
    lines = ["| row | method | perplexity | passkey answer NLL |", "|---|---|---|---|"]
    for role, label in (("full cache", "full"), ("best training-free", best), ("untrained", untrained),
                        ("trained", trained), ("control: full cache, trained LoRA", control)):  # fmt: skip
        if label is None or label not in ppl:
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
    if ppl.get(control) is not None and ppl.get(untrained) is not None:
        lines.append(
            f"what compression costs the model it compresses: trained {ppl[trained] / ppl[control] - 1:+.1%} "
            f"against the full cache with the same LoRA ({ppl[control]:.3f}); untrained "
            f"{ppl[untrained] / ppl['full'] - 1:+.1%} against the full cache"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--trained", default="lococo_trained")
    parser.add_argument("--untrained", default="lococo_untrained")
    parser.add_argument("--control", default="full_with_trained_lora", help="the full cache with the trained LoRA")
    args = parser.parse_args()
    print(verdict(read_rows(args.folder), args.trained, args.untrained, args.control))


if __name__ == "__main__":
    main()
