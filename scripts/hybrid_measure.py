"""Rows for the hybrid results table: full, untrained hybrids and trained runs, on the embedded model.

    python scripts/hybrid_measure.py --plan PLAN.json --rows full untrained:4 untrained:0 run:RUN_DIR ... \
        --out docs/results/hybrid/quality.jsonl [--perplexity-samples 4] [--tasks passkey niah_single --samples 4]

Decode speed and cache bytes of full against the hybrid: ``kvtune bench methods=[full] hybrid=[PLAN.json]``.

``untrained:S`` is the plan's lazy layers with S sinks and the plan's window; ``run:DIR`` a `kvtune fit` hybrid run
(its plan.json and LoRA adapter, merged); ``lora:DIR`` that run's adapter on the full model, every layer attending
fully (the control: how much of a trained row's gain is the adapter fitting the corpus, not the hybrid recovering).
Each row is appended to ``--out`` as soon as it is measured.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import time
from pathlib import Path

from peft import PeftModel

import kvtune
from kvtune.hybrid import LayerPlan, apply_plan
from kvtune.hybrid.measure import answer_nll, perplexity


def build(spec: str, plan_path: str):
    """(model, tokenizer, plan or None, label) for one row spec."""
    model, tokenizer = kvtune.load_model("embedded")
    if spec == "full":
        return model, tokenizer, None, "full"
    kind, _, arg = spec.partition(":")
    if kind == "untrained":
        plan = dataclasses.replace(LayerPlan.load(plan_path), sinks=int(arg))
        label = f"hybrid untrained, sinks={plan.sinks}"
    elif kind in ("run", "lora"):
        run = Path(arg)
        model = PeftModel.from_pretrained(model, run / "adapter").merge_and_unload()
        steps = sum(
            bool(row.get("train/loss"))
            for log in run.glob("csv/version_*/metrics.csv")
            for row in csv.DictReader(log.open())
        )
        if kind == "lora":
            return model.eval(), tokenizer, None, f"full + the adapter of {run.name} ({steps} steps)"
        plan = LayerPlan.load(run / "plan.json")
        label = f"hybrid trained ({run.name}, {steps} steps), sinks={plan.sinks}"
    else:
        raise SystemExit(f"unknown row spec {spec!r}")
    return apply_plan(model, plan).eval(), tokenizer, plan, label


def table(path: Path) -> str:
    """The quality rows of ``path`` as one markdown table: a row per model, perplexity and each task's answer NLL
    side by side (the latest row of a label and task wins)."""
    rows: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["label"], {})[row["task"]] = row
    full = rows.get("full", {}).get("perplexity")
    tasks = sorted({task for by_task in rows.values() for task in by_task} - {"perplexity"})
    samples = {task: max(r[task]["samples"] for r in rows.values() if task in r) for task in ["perplexity", *tasks]}
    lines = [
        f"| model | perplexity 4K, {samples['perplexity']} windows (NLL) | ppl gap to full closed | "
        + "".join(f"{task} answer NLL ({samples[task]}) | " for task in tasks)
        + "KV bytes at 4K (x full) |",
        "|---|---|---|" + "---|" * len(tasks) + "---|",
    ]
    untrained = {
        r["perplexity"]["sinks"]: r["perplexity"]
        for r in rows.values()
        if "perplexity" in r and "untrained" in r["perplexity"]["label"]
    }
    for label, by_task in rows.items():
        ppl = by_task.get("perplexity")
        closed = ""
        base = untrained.get(ppl.get("sinks")) if ppl else None
        if full and base and "trained (" in label and base["score"] > full["score"]:
            closed = f"{(base['score'] - ppl['score']) / (base['score'] - full['score']):.0%}"
        ratio = f" ({ppl['kv_bytes'] / full['kv_bytes']:.3f})" if full else ""
        answers = "".join(f"{by_task[t]['answer_nll']:.3f} | " if t in by_task else "- | " for t in tasks)
        lines.append(
            f"| {label} | {ppl['score']:.3f} ({ppl['answer_nll']:.4f}) | {closed} | {answers}"
            f"{ppl['kv_bytes'] / 2**20:.1f} MiB{ratio} |"
            if ppl
            else f"| {label} | no perplexity row | | {answers} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan")
    parser.add_argument("--rows", nargs="+", default=[])
    parser.add_argument("--out", required=True)
    parser.add_argument("--table", action="store_true", help="print --out's quality rows as markdown and exit")
    parser.add_argument("--context-length", type=int, default=4096)
    parser.add_argument("--perplexity-samples", type=int, default=4)
    parser.add_argument("--tasks", nargs="*", default=["passkey"], help="tasks scored by answer NLL")
    parser.add_argument("--samples", type=int, default=5, help="prompts per answer-NLL task")
    args = parser.parse_args()
    out = Path(args.out)
    if args.table:
        print(table(out))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.rows:
        model, tokenizer, plan, label = build(spec, args.plan)
        start = time.perf_counter()
        rows = [
            perplexity(model, tokenizer, plan, args.context_length, args.perplexity_samples),
            *(answer_nll(model, tokenizer, plan, task, args.context_length, args.samples) for task in args.tasks),
        ]
        if spec.startswith("run:"):  # the model card of `kvtune export --hybrid` quotes these
            measured = {
                f"{r['task']} answer NLL at {args.context_length} tokens": round(r["answer_nll"], 4) for r in rows
            }
            measured["KV bytes at that length"] = rows[0]["kv_bytes"]
            (Path(spec[4:]) / "measured.json").write_text(json.dumps(measured, indent=2))
        for row in rows:
            row.update(label=label, spec=spec, seconds=time.perf_counter() - start)
            if plan is not None:
                row.update(lazy_layers=list(plan.lazy_layers), window=plan.window, sinks=plan.sinks)
            print(json.dumps(row), flush=True)
            with out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
