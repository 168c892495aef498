"""Validation perplexity against optimiser step, one line per `kvtune fit` run (the LoCoCo ablation's curves; the
hybrids' with ``--title`` and ``--ylabel``).

    python scripts/plot_lococo_curves.py --out docs/results/lococo_ablation/curves.png NAME=RUN_DIR [NAME=RUN_DIR ...] \
        [--reference NAME=PPL] [--points EARLIER.json]

Reads each run's CSV log (``RUN_DIR/csv/version_*/metrics.csv``: ``val/ppl`` at step 0 is the untrained
compressor) and writes the plot plus the points as JSON beside it. ``--points`` adds every curve of such a JSON from an
earlier plot (runs whose folders are gone), so that a new variant is drawn beside the ones it is compared with.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
from pathlib import Path


def validation_curve(run_dir: str | Path) -> list[tuple[int, float]]:
    """``(step, val/ppl)`` points of a run, in step order (the newest CSV version wins for a repeated step)."""
    points: dict[int, float] = {}
    for path in sorted(Path(run_dir).glob("csv/version_*/metrics.csv")):
        with path.open() as handle:
            for row in csv.DictReader(handle):
                if row.get("val/ppl"):
                    points[int(row["step"])] = float(row["val/ppl"])
    return sorted(points.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="NAME=RUN_DIR")
    parser.add_argument("--points", action="append", default=[], help="a curves JSON this script wrote earlier")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="LoCoCo training, 128 slots, embedded SmolLM2")
    parser.add_argument("--ylabel", default="validation perplexity (4K chunked, held out)")
    parser.add_argument(
        "--reference", action="append", default=[], help="NAME=PPL: a horizontal line (e.g. the full model's)"
    )
    args = parser.parse_args()
    if not args.runs and not args.points:
        parser.error("give at least one NAME=RUN_DIR or --points EARLIER.json")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for path in args.points:
        curves.update({name: [tuple(p) for p in points] for name, points in json.loads(Path(path).read_text()).items()})
    for spec in args.runs:
        name, _, folder = spec.partition("=")
        curves[name] = validation_curve(folder)
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        if points:
            axis.plot([s for s, _ in points], [p for _, p in points], marker="o", label=name)
    for spec, style in zip(args.reference, itertools.cycle(["--", ":", "-."])):
        name, _, value = spec.partition("=")
        axis.axhline(float(value), linestyle=style, color="grey", label=name)
    axis.set_xlabel("optimiser step")
    axis.set_ylabel(args.ylabel)
    axis.set_title(args.title)
    axis.legend()
    figure.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    out.with_suffix(".json").write_text(json.dumps(curves, indent=2))
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
