"""Turn a results folder (`results.jsonl`) into a markdown table and a PNG plot; `kvtune report DIR` calls this."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

RESULTS = "results.jsonl"
LOWER_IS_BETTER = {"perplexity"}


def read_rows(folder: str | Path) -> list[dict[str, Any]]:
    """Rows of ``folder/results.jsonl``; a later row for the same sweep point replaces an earlier one."""
    path = Path(folder) / RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"no {RESULTS} in {folder}")
    latest: dict[tuple, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            latest[_point(row)] = row
    return list(latest.values())


def _point(row: dict[str, Any]) -> tuple:
    return (
        row["task"],
        _label(row),
        row.get("budget"),
        row.get("ratio"),
        row["context_length"],
        row.get("question_aware", False),
        row.get("seed", 0),
    )


def _label(row: dict[str, Any]) -> str:
    """How a row's method is named in tables and plots (``label=`` tells adapters of one method apart)."""
    return row.get("label") or row["method"]


def _setting(row: dict[str, Any]) -> str:
    return f"{row['task']}{' (question-aware)' if row.get('question_aware') else ''}"


def _budget_label(row: dict[str, Any]) -> str:
    if row.get("budget") is not None:
        return str(row["budget"])
    return f"ratio {row['ratio']}" if row.get("ratio") is not None else "all"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One table per task: a row per method, a column per budget; cells are ``score · answer NLL``."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_task[_setting(row)].append(row)
    parts = []
    for setting in sorted(by_task):
        task_rows = by_task[setting]
        budgets = sorted(
            {_budget_label(r) for r in task_rows}, key=lambda b: (not b.isdigit(), int(b) if b.isdigit() else 0, b)
        )
        lengths = sorted({r["context_length"] for r in task_rows})
        samples = sorted({r["samples"] for r in task_rows})
        name = task_rows[0]["task"]
        metric = "perplexity (lower is better)" if name in LOWER_IS_BETTER else "score (higher is better)"
        parts.append(
            f"### {setting}: {metric} · answer NLL (lower is better)\n\n"
            f"context {', '.join(map(str, lengths))} tokens, {', '.join(map(str, samples))} samples\n"
        )
        parts.append("| method | " + " | ".join(f"budget {b}" for b in budgets) + " | KV kept |")
        parts.append("|---|" + "---|" * (len(budgets) + 1))
        for method in sorted({_label(r) for r in task_rows}, key=lambda m: (m != "full", m)):
            cells, kept = [], []
            for budget in budgets:
                match = [r for r in task_rows if _label(r) == method and _budget_label(r) == budget]
                if match:
                    r = match[-1]
                    cells.append(f"{r['score']:.3g} · {r['answer_nll']:.3f}")
                    kept.append(f"{100 * r['kv_bytes'] / r['full_kv_bytes']:.1f}%")
                else:
                    cells.append("")
            parts.append(f"| {method} | " + " | ".join(cells) + f" | {' / '.join(kept)} |")
        parts.append("")
    return "\n".join(parts)


def plot(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Score (top) and answer NLL (bottom) against budget, one line per method, one column per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({_setting(r) for r in rows})
    fig, axes = plt.subplots(2, len(settings), figsize=(4.5 * len(settings), 7), squeeze=False)
    for col, setting in enumerate(settings):
        task_rows = [r for r in rows if _setting(r) == setting]
        budgets = sorted({r["budget"] for r in task_rows if r.get("budget") is not None})
        lower = task_rows[0]["task"] in LOWER_IS_BETTER
        for row_index, key in enumerate(("score", "answer_nll")):
            ax = axes[row_index][col]
            for method in sorted({_label(r) for r in task_rows}, key=lambda m: (m != "full", m)):
                points = sorted(
                    (r["budget"], r[key]) for r in task_rows if _label(r) == method and r.get("budget") is not None
                )
                unbudgeted = [r[key] for r in task_rows if _label(r) == method and r.get("budget") is None]
                if method == "full" and (unbudgeted or len({y for _, y in points}) == 1):
                    level = unbudgeted[-1] if unbudgeted else points[0][1]
                    ax.axhline(level, color="black", linestyle="--", label="full")
                elif points:
                    ax.plot([b for b, _ in points], [y for _, y in points], marker="o", label=method)
            if budgets:
                ax.set_xscale("log", base=2)
                ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.set_xlabel("budget (entries per KV head)")
            if key == "score":
                ax.set_title(setting)
                ax.set_ylabel("perplexity (lower is better)" if lower else "score")
            else:
                ax.set_ylabel("answer NLL (lower is better)")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_report(folder: str | Path) -> tuple[Path, Path]:
    """Write ``results.md`` and ``results.png`` next to ``results.jsonl``; returns their paths."""
    folder = Path(folder)
    rows = read_rows(folder)
    table, image = folder / "results.md", folder / "results.png"
    table.write_text(f"![score against budget](results.png)\n\n{markdown_table(rows)}")
    plot(rows, image)
    return table, image
